"""The chaos benchmark's orchestration: start a deployment behind its router, SIGKILL one process of one rank while
streaming load runs, watch the group come back, stop it and count what was left (the process side; the arithmetic
is :mod:`widep.bench.chaos`).

The deployment is a real ``widep launch TOPOLOGY --router`` subprocess (its own session); the target is found
among that launch's processes (each carries ``WIDEP_RUN_ID``): ``api`` is the rank's API server (the process
serving its port), ``engine`` its EngineCore child. Times are ``time.perf_counter`` so they line up with the load
generator's records.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from widep.plan.core import DeploymentPlan
from widep.run.control import http_json
from widep.run.guard import group_members
from widep.run.procs import RUN_ID_ENV


def run_processes(run_id: str) -> list[int]:
    """Live processes started by the launch ``run_id`` (their environment carries WIDEP_RUN_ID=run_id)."""
    needle = f"{RUN_ID_ENV}={run_id}".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/stat", "rb") as s:
                if s.read().rsplit(b") ", 1)[-1][:1] == b"Z":
                    continue
            out.append(int(name))
        except OSError:
            continue
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def api_server_pids(run_id: str) -> list[int]:
    """The launch's vLLM API servers (``python -m vllm.entrypoints.openai.api_server`` or ``vllm serve``; not their
    guards, not the router)."""
    out = []
    for pid in run_processes(run_id):
        cmd = _cmdline(pid)
        if "widep.run.guard" in cmd or "--port" not in cmd:
            continue
        if "vllm.entrypoints.openai.api_server" in cmd or (Path(cmd[0]).name == "vllm" and cmd[1:2] == ["serve"]):
            out.append(pid)
    return out


def api_server_pid(run_id: str, port: int) -> int | None:
    """The API server of the launch that serves ``port`` (not its guard)."""
    for pid in api_server_pids(run_id):
        cmd = _cmdline(pid)
        if cmd[cmd.index("--port") + 1 : cmd.index("--port") + 2] == [str(port)]:
            return pid
    return None


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def role_processes(run_id: str, plan: DeploymentPlan, role: str) -> list[int]:
    """Every process of ``role``'s ranks in the launch: the sessions (guard, API server, engine core, workers) of
    the API servers that serve the role's ports (each rank runs in its guard's session)."""
    rp = next(r for r in plan.roles if r.name == role)
    ports = {r.port for r in rp.ranks if r.port is not None}
    groups = {g for port in ports if (api := api_server_pid(run_id, port)) is not None and (g := _pgid(api))}
    # by process group, not WIDEP_RUN_ID: vLLM's engine processes rename themselves over their environment
    return sorted({p for g in groups for p in group_members(g)})


def router_pids(run_id: str, command: str) -> list[int]:
    """The launch's router: its guard (whose command runs ``command``, router.command) and the guard's children.
    Found through the guard: vllm-router renames itself (``vllm::router``) over its argv and environment, so its
    own /proc entries no longer carry the command or WIDEP_RUN_ID."""
    name = os.path.basename(command)
    out = []
    for p in run_processes(run_id):
        cmd = _cmdline(p)
        if "widep.run.guard" in cmd and "--" in cmd:
            argv = cmd[cmd.index("--") + 1 :]
            if any(os.path.basename(a) == name for a in argv[:2]):
                out += [p, *_children(p)]
    return out


def engine_core_pid(api_pid: int) -> int | None:
    """The API server's EngineCore: the child named so, else its biggest spawned child (not the resource tracker)."""
    kids = [k for k in _children(api_pid) if not any("resource_tracker" in c for c in _cmdline(k))]
    named = [k for k in kids if any("EngineCore" in c for c in _cmdline(k))]
    pool = named or kids
    return max(pool, key=_rss) if pool else None


@dataclass
class Watch:
    """What a watcher thread saw after the kill: the killed attempt's processes gone, the group healthy again."""

    gone_at: float | None = None
    healthy_at: float | None = None
    last: tuple[int, float] | None = None
    """The killed attempt's last process to go: (pid, when)."""
    states: list[tuple[float, str, int]] = field(default_factory=list)


class Deployment:
    """A ``widep launch TOPOLOGY --router`` subprocess, its output in ``log``."""

    def __init__(self, topology: Path, plan: DeploymentPlan, log: Path, launch_args: list[str]) -> None:
        self.plan = plan
        self.log = log
        env = dict(os.environ, COLUMNS="200")
        self._out = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "widep", "launch", str(topology), "--router", *launch_args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, pattern: str, timeout: float) -> str:
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = rx.search(self.text())
            if m:
                return m.group(0)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the launcher exited ({self.proc.returncode}) before {pattern!r}:\n{self.tail()}")
            time.sleep(0.3)
        raise RuntimeError(f"no {pattern!r} from the launcher in {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def run_id(self) -> str:
        return self.wait_for(r"run [0-9a-f]{12}", 30).split()[1]

    def state(self, role: str) -> dict | None:
        rp = next(r for r in self.plan.roles if r.name == role)
        n = self.plan.nodes[rp.group_nodes[0][0]]
        try:
            return http_json(n.host, rp.control_port, "GET", "/state", timeout=1.0)
        except (OSError, ValueError):
            return None

    def watch(self, role: str, before: list[int], attempt: int, stop: threading.Event, out: Watch) -> None:
        """Until ``stop``: when the processes ``before`` (the killed attempt's) are all gone, and when the group is
        healthy in an attempt after ``attempt`` (two loops: a slow /state answer must not delay the first)."""

        def gone() -> None:
            # this observer thread (only it) first in line for the CPU: a late look would only add to the figure
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -20)
            except OSError:
                pass
            left = set(before)
            while not stop.is_set():
                now = time.perf_counter()
                still = alive(list(left))
                for pid in left - still:
                    out.last = (pid, now)
                left = still
                if not left:
                    out.gone_at = now
                    return
                time.sleep(0.02)

        t = threading.Thread(target=gone, daemon=True)
        t.start()
        while not stop.is_set():
            now = time.perf_counter()
            if out.healthy_at is None:
                st = self.state(role)
                if st is not None:
                    out.states.append((now, st["state"], int(st["attempt"])))
                    if st["state"] == "healthy" and int(st["attempt"]) > attempt:
                        out.healthy_at = now
            if out.healthy_at is not None:
                t.join()
                return
            time.sleep(0.05)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
        self._out.close()
        return code


def alive(pids: list[int]) -> set[int]:
    """Of ``pids``, those still alive and not zombies."""
    alive = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as s:
                if s.read().rsplit(b") ", 1)[-1][:1] != b"Z":
                    alive.add(p)
        except OSError:
            continue
    return alive


def wait_gone(run_id: str, timeout: float = 60.0) -> list[int]:
    """Processes of the launch ``run_id`` still alive after up to ``timeout`` s (checked every 50 ms): the orphans
    of a launcher that returned (the tests use it too)."""
    end = time.monotonic() + timeout
    left = run_processes(run_id)
    while left and time.monotonic() < end:
        time.sleep(0.05)
        left = run_processes(run_id)
    return left


READY_RX = re.compile(r"healthy ([0-9.]+) s after the last start")


def cold_starts(launch_log: str) -> list[float]:
    """The launcher's own figure for each attempt that became healthy (``ready: ... healthy 33.3 s after the last
    start``): its ranks' cold start, all ranks of the group starting at once (one core each on CPU)."""
    return [float(m.group(1)) for m in READY_RX.finditer(launch_log)]


def served_again(plan: DeploymentPlan, model: str, deadline: float) -> float | None:
    """Completions through the front door, one at a time, until one succeeds (``time.perf_counter`` at its end) or
    ``deadline`` (``time.monotonic``) passes (None): after a group restart, the router serves again once it has
    re-admitted the group."""
    assert plan.router is not None
    host = plan.nodes[plan.router.node].host
    body = {"model": model, "prompt": "The group is back.", "max_tokens": 4, "temperature": 0}
    while time.monotonic() < deadline:
        try:
            http_json(host, plan.router.port, "POST", "/v1/completions", body, timeout=60)
            return time.perf_counter()
        except (OSError, ValueError):
            time.sleep(0.5)
    return None


def run_once(
    topology: Path,
    plan: DeploymentPlan,
    target_text: str,
    at_s: float,
    duration_s: float,
    concurrency: int,
    out_dir: Path,
    launch_args: list[str],
    ready_timeout_s: float = 900.0,
    max_tokens: int = 32,
) -> tuple[dict, list]:
    """One chaos run: launch, load, SIGKILL at ``at_s`` into the load, stop; (summary, request records)."""
    from widep.bench.chaos import Target, summarize_run
    from widep.bench.loadgen import Level, LoadGenerator, LoadOptions, run_sync
    from widep.bench.workload import Prompt, PromptPool

    target = Target.parse(target_text)
    rp = next((r for r in plan.roles if r.name == target.role), None)
    if rp is None or target.rank >= rp.dp_size:
        raise ValueError(f"--kill: {target_text!r}: {plan.name} has no rank {target.role}/{target.rank}")
    port = next(r.port for r in rp.ranks if r.dp_rank == target.rank and r.port is not None)
    if plan.router is None:
        raise ValueError(f"{plan.name}: chaos needs the router section (router.port) to send load to")
    door = f"http://{plan.nodes[plan.router.node].host}:{plan.router.port}"
    out_dir.mkdir(parents=True, exist_ok=True)
    dep = Deployment(topology, plan, out_dir / "launch.log", launch_args)
    watch, stop = Watch(), threading.Event()
    kill: dict[str, float | int | None] = {"at": None, "pid": None, "perf": None}
    names: dict[int, str] = {}
    survivors: dict[str, tuple[list[int], dict | None]] = {}
    """Before the kill: every other role's processes and /state, and the router's processes."""
    apis: dict[str, list[int | None]] = {}
    """The target role's API servers before the kill and once its group is healthy again."""
    survived: dict[str, bool] = {}
    served: dict[str, float | None] = {"at": None}
    """When a completion through the front door first succeeded once the group was healthy again."""
    orphans: list[int] = []
    run_id = ""
    try:
        run_id = dep.run_id()
        dep.wait_for(r"\[router\] ready", ready_timeout_s)
        models = http_json(plan.nodes[plan.router.node].host, plan.router.port, "GET", "/v1/models", timeout=30)
        model = models["data"][0]["id"]
        pool = PromptPool([Prompt(f"Tell me a story about the number {i}.", 10, max_tokens) for i in range(64)])
        opts = LoadOptions(model=model, request_timeout_s=600.0)

        def killer(t0: float) -> None:
            time.sleep(max(0.0, t0 + at_s - time.perf_counter()))
            api = api_server_pid(run_id, port)
            pid = api if target.part == "api" or api is None else engine_core_pid(api)
            st = dep.state(target.role) or {"attempt": 0}
            before = role_processes(run_id, plan, target.role)
            names.update({p: " ".join(_cmdline(p))[:120] for p in before})
            if pid is None:
                return
            for other in plan.roles:
                if other.name != target.role:
                    survivors[other.name] = (role_processes(run_id, plan, other.name), dep.state(other.name))
            survivors["router"] = (router_pids(run_id, plan.spec.router.command), None)
            apis["before"] = [api_server_pid(run_id, r.port) for r in rp.ranks if r.port is not None]
            kill["perf"] = time.perf_counter()  # taken just before the kill: the figures below are not flattered
            os.kill(pid, signal.SIGKILL)
            kill["at"], kill["pid"] = float(kill["perf"]) - t0, pid
            threading.Thread(
                target=dep.watch, args=(target.role, before, int(st["attempt"]), stop, watch), daemon=True
            ).start()

        async def load() -> object:
            async with LoadGenerator([door], opts) as gen:
                await gen.warmup(pool, 2)
                t0 = time.perf_counter()
                threading.Thread(target=killer, args=(t0,), daemon=True).start()
                run = await gen.run_level(Level("concurrency", concurrency, duration_s=duration_s), pool)
                return run

        run = run_sync(load())
        t0 = run.t0_perf
        end = time.monotonic() + ready_timeout_s
        while watch.healthy_at is None and kill["at"] is not None and time.monotonic() < end:
            time.sleep(0.2)
        stop.set()
        if kill["at"] is not None:
            served["at"] = served_again(plan, model, end)
            apis["after"] = [api_server_pid(run_id, r.port) for r in rp.ranks if r.port is not None]
            for name, (pids, st) in survivors.items():
                now = dep.state(name) if st is not None else None
                same_attempt = st is None or (now is not None and now["attempt"] == st["attempt"])
                survived[name] = bool(pids) and not set(pids) - alive(pids) and same_attempt
    finally:
        stop.set()
        dep.stop()
        if run_id:
            orphans = wait_gone(run_id, 10.0)
            for p in orphans:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    kp = kill["perf"]
    summary = summarize_run(
        run.records,
        None if kp is None else float(kp) - t0,  # on the load's clock (the records' times)
        duration_s,
        None if watch.healthy_at is None or kp is None else watch.healthy_at - float(kp),
        None if watch.gone_at is None or kp is None else watch.gone_at - float(kp),
        len(orphans),
        rp.spec.recovery,
        str(target),
    )
    starts = cold_starts(dep.text())
    summary["cold_start_s"] = starts[0] if starts else None
    summary["restart_cold_start_s"] = starts[1] if len(starts) > 1 else None
    summary["killed_pid"] = kill["pid"]
    summary["kill_monotonic"] = kp  # time.monotonic of the kill: compare with the guards' death marks in the logs
    if watch.last is not None and kp is not None:
        pid, at = watch.last
        summary["teardown_last"] = {"pid": pid, "cmd": names.get(pid, "?"), "s": round(at - float(kp), 3)}
    summary["served_again_s"] = None if served["at"] is None or kp is None else round(served["at"] - float(kp), 3)
    # the killed rank's whole group restarted as one: every rank of it serves from a new API server
    old, new = apis.get("before", []), apis.get("after", [])
    summary["group_restarted"] = bool(old) and len(new) == len(old) and all(n is not None and n not in old for n in new)
    summary["survived"] = survived
    summary["launch_log"] = str(out_dir / "launch.log")
    return summary, run.records
