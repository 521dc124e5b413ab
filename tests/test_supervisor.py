"""The one supervisor over the backend protocol, as the author of a new backend meets it.

``EchoBackend`` below is written the way a new backend module is (``BackendBase`` plus the protocol's methods of
:mod:`widep.run.backend`). Its processes are real, started through widep's guard, and answer HTTP, but they are
widep's echo server (an OpenAI-compatible server that is no model) instead of vLLM: the supervisor's restart policy,
readiness rules, smoke completion and teardown do not depend on what serves, and an echo server is healthy in about
a second where CPU vLLM takes about 50 (the launch tests cover the real thing). Also: the registry, and every
option of a request reaching every backend's commands (``--profile`` on Ray).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from launch_helpers import ROOT, free_ports, topology_copy
from rich.console import Console

from widep.errors import UserError
from widep.plan import plan as make_plan
from widep.render.vllm import ProcessCommand
from widep.run.backend import BACKENDS, Backend, BackendBase, DryRun, Endpoint, Poll, load_backend
from widep.run.control import probe
from widep.run.host import prepare_launch
from widep.run.launch import Group, Launch, LaunchRequest
from widep.run.procs import RankProcess, signal_name, start_rank, stop_ranks, tail
from widep.run.state import Failure, RestartPolicy
from widep.run.supervisor import Supervisor
from widep.spec.topology import load_topology

MODEL = "echo-model"


class EchoBackend(BackendBase):
    """Every process of the launch on this machine, as an echo server on a port of its own (the plan's nodes are
    pretend nodes with the same ports); ``broken`` maps a process name to the attempts in which it runs
    ``program`` instead (a crash, a hang)."""

    name = "echo"

    def __init__(
        self,
        console: Console,
        broken: dict[str, tuple[int, ...]] | None = None,
        program: tuple[str, ...] = (sys.executable, "-c", "import sys; sys.exit(3)"),
    ) -> None:
        self.console, self.broken, self.program = console, broken or {}, program
        self.procs: dict[str, list[RankProcess]] = {}
        self.started: list[tuple[int, str]] = []

    def resolve(self, request: LaunchRequest) -> LaunchRequest:
        return request

    def dry_run(self, launch: Launch) -> DryRun:
        return DryRun("echo servers", launch.processes)

    def prepare(self, launch: Launch) -> list[Group]:
        self.launch = launch
        self.ports = dict(zip((c.name for c in launch.processes), free_ports(len(launch.processes)), strict=True))
        return list(launch.groups)

    def _argv(self, c: ProcessCommand, attempt: int) -> tuple[str, ...]:
        if attempt in self.broken.get(c.name, ()):
            return self.program
        return (
            sys.executable,
            "-m",
            "widep.bench.echo_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.ports[c.name]),
            "--model",
            MODEL,
        )

    def start(self, group: Group, attempt: int) -> str:
        procs = []
        for c in group.processes:
            cmd = replace(c, template=self._argv(c, attempt), env_template=())
            procs.append(start_rank(cmd, self.launch.run_dir, attempt, dict(os.environ), self.launch.run_id, 5.0))
            self.started.append((attempt, c.name))
        self.procs[group.label] = procs
        return ", ".join(c.name for c in group.processes)

    def poll(self, group: Group, now: float) -> Poll:
        failures = tuple(
            Failure(p.name, p.cmd.node_name, signal_name(code), now, tail(p.log))
            for p in self.procs.get(group.label, [])
            if (code := p.poll()) is not None
        )
        health = {e.process.name: probe(e.host, e.port, timeout=1.0)[0] for e in self.endpoints(group)}
        return Poll(failures=failures, health=health)

    def endpoints(self, group: Group) -> list[Endpoint]:
        return [Endpoint(c, "127.0.0.1", self.ports[c.name]) for c in group.processes if c.health_port]

    def log_tail(self, group: Group, process: str) -> tuple[str, ...]:
        return next((tail(p.log) for p in self.procs.get(group.label, []) if p.name == process), ())

    def stop(self, group: Group) -> None:
        stop_ranks(self.procs.pop(group.label, []), 5.0)

    def shutdown(self) -> None:
        for label in list(self.procs):
            stop_ranks(self.procs.pop(label), 5.0)


def launch_of(tmp_path: Path, **options: object) -> Launch:
    p = make_plan(load_topology(topology_copy("tiny-moe-cpu-dp2.yaml", tmp_path)))
    return prepare_launch(LaunchRequest(p, run_dir=tmp_path / "run", model_path=MODEL, **options))


def supervise(backend: EchoBackend, launch: Launch) -> tuple[int, str]:
    out = io.StringIO()
    backend.console = Console(file=out, width=200)
    code = Supervisor(backend, launch, backend.console).run()
    return code, out.getvalue()


def gone(backend: EchoBackend) -> bool:
    return not backend.procs


def test_ready_then_the_smoke_completion_through_the_front_door(tmp_path):
    launch = launch_of(tmp_path, once=True, prompt="hello there")
    backend = EchoBackend(Console())
    code, out = supervise(backend, launch)
    assert code == 0, out
    assert f"ready: {launch.plan.name} (run {launch.run_id}" in out
    assert "serve/0" in out and "serve/1" in out  # the readiness table
    assert backend.started == [(0, "serve/0"), (0, "serve/1")]
    assert gone(backend)


def test_a_crash_restarts_the_whole_group_in_step(tmp_path, capsys):
    launch = launch_of(tmp_path, once=True, policy=RestartPolicy("on-failure", max_restarts=2, backoff_s=0.0))
    backend = EchoBackend(Console(), broken={"serve/1": (0,)})
    code, out = supervise(backend, launch)
    assert code == 0, out
    assert "[serve] attempt 0 failed: serve/1 on pretend-1: exited with code 3" in out
    assert "restart in 0 s (2 restart(s) left)" in out
    assert backend.started == [(0, "serve/0"), (0, "serve/1"), (1, "serve/0"), (1, "serve/1")]
    assert f"ready: {launch.plan.name}" in out and "completion from serve" in capsys.readouterr().out


def test_no_restarts_left_fails_with_the_earliest_failure_last(tmp_path):
    launch = launch_of(tmp_path, policy=RestartPolicy("never"))
    backend = EchoBackend(Console(), broken={"serve/1": (0,)})
    code, out = supervise(backend, launch)
    assert code == 1
    assert out.rstrip().splitlines()[-1].startswith("failure: serve/1 on pretend-1: exited with code 3")
    assert gone(backend)


def test_a_process_that_never_becomes_healthy_times_out_with_its_log(tmp_path):
    hang = (sys.executable, "-c", "print('stuck loading', flush=True); import time; time.sleep(60)")
    launch = launch_of(tmp_path, policy=RestartPolicy("never"), ready_timeout_s=3.0)
    backend = EchoBackend(Console(), broken={"serve/1": (0,)}, program=hang)
    t = time.monotonic()
    code, out = supervise(backend, launch)
    assert code == 1 and time.monotonic() - t < 30
    assert (
        "failure: serve/1 on pretend-1 @ 127.0.0.1: did not become healthy in 3 s (still waiting: serve/1)\n"
        "    stuck loading" in out
    )
    assert gone(backend)


def test_the_registry_names_every_backend_and_loads_them_lazily():
    assert list(BACKENDS) == ["bare-metal", "ray", "slurm"]
    for name in BACKENDS:
        b = load_backend(name, Console())
        assert b.name == name
        for method in [m for m in vars(Backend) if not m.startswith("_") and callable(getattr(Backend, m))]:
            assert callable(getattr(b, method)), f"{name} lacks {method}"
    with pytest.raises(UserError, match=r"--backend: 'slurmish' is not a backend. Valid: bare-metal, ray, slurm."):
        load_backend("slurmish", Console())


@pytest.mark.parametrize("backend", ["bare-metal", "ray"])
def test_every_option_reaches_every_backend(tmp_path, backend):
    """The dry run shows the commands the backend would start: --profile turns the profiler on for both."""
    topo = topology_copy("tiny-moe-cpu-dp2.yaml", tmp_path)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "widep",
            "launch",
            str(topo),
            "--backend",
            backend,
            "--dry-run",
            "--profile",
            "--node",
            "0",
            "--model-path",
            "/m",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, COLUMNS="400"),
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--profiler-config") == (2 if backend == "ray" else 1)
    assert f'"torch_profiler_dir":"{tmp_path / "run" / "profiles"}/serve/rank-0"' in r.stdout


def test_bare_metal_follows_logs_and_serves_the_group_state(tmp_path):
    """The bare-metal backend itself (guard, control endpoint, --follow) with its process's program swapped for the
    echo server (the launch tests run it with vLLM)."""
    from widep.run.bare_metal import BareMetal
    from widep.run.control import http_json

    p = make_plan(load_topology(topology_copy("tiny-moe-cpu.yaml", tmp_path)))
    backend = BareMetal(Console())
    request = backend.resolve(
        LaunchRequest(p, run_dir=tmp_path / "run", model_path=MODEL, once=True, follow=True, skip_preflight=True)
    )
    launch = prepare_launch(request)
    echo = {
        c.name: replace(
            c,
            template=(
                sys.executable,
                "-m",
                "widep.bench.echo_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(c.port),
                "--model",
                MODEL,
            ),
        )
        for c in launch.processes
    }
    launch = replace(
        launch,
        processes=tuple(echo.values()),
        groups=tuple(replace(g, processes=tuple(echo[c.name] for c in g.processes)) for g in launch.groups),
    )
    seen: dict = {}

    def on_ready() -> int:
        g = launch.groups[0]
        seen.update(http_json("127.0.0.1", g.control_port, "GET", "/state"))
        return 0

    out = io.StringIO()
    backend.console = Console(file=out, width=200)
    assert Supervisor(backend, launch, backend.console).run(on_ready=on_ready) == 0
    assert seen["group"] == "serve" and seen["state"] == "healthy" and seen["attempt"] == 0
    text = out.getvalue()
    assert f"[serve/0] PORT={launch.processes[0].port}" in text  # --follow: the process's own output, prefixed
    assert (tmp_path / "run" / "attempt-0" / "serve" / "rank-0" / "vllm.log").is_file()
    assert not backend.procs
