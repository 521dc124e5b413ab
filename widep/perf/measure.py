"""Measured sweeps: for each point, launch it for real, benchmark it, tear it down, record the levels.

The executor plugs into :func:`widep.perf.sweep.run_sweep` like the predicting one, so measured points
land in the same per-point directories (resumable; failures recorded, never raised) and overlay the
predicted ones in plots. Launching reuses `widep launch` (one launcher process per node, or the Ray
backend); benchmarking reuses `widep bench`'s sweep (llm-d reports per level under the point's folder).

Bare-metal measured sweeps start every node's launcher from this machine, so every node of the topology
must be this machine (loopback addresses or its own names); use ``launch="ray"`` to measure topologies
that span real nodes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from widep.errors import UserError
from widep.perf.sweep import ItemResult, SweepItem


@dataclass(frozen=True)
class MeasureOptions:
    out: Path
    """The sweep's output directory (each point's run and bench files go under <out>/<id>/)."""
    launch: str = "bare-metal"
    concurrency: tuple[int, ...] = (1, 4)
    isl: int = 128
    osl: int = 32
    requests_per_level: int = 16
    model_path: str | None = None
    python: str | None = None
    ready_timeout_s: float = 600.0
    ray_address: str | None = None


def _is_local(addr: str | None, name: str, me: set[str]) -> bool:
    return (addr or "").startswith("127.") or addr in me or name in me


def _probe_all(urls: list[str]) -> bool:
    from urllib.parse import urlparse

    from widep.run.control import probe

    for u in urls:
        pu = urlparse(u)
        if probe(pu.hostname or "127.0.0.1", pu.port or 80)[0] != "healthy":
            return False
    return True


class MeasureExecutor:
    """Launch, bench and tear down each feasible item, one at a time."""

    name = "measure"

    def __init__(self, opts: MeasureOptions) -> None:
        if opts.launch not in ("bare-metal", "ray"):
            raise UserError(f"--launch: {opts.launch!r} is not a launch backend. Valid: bare-metal, ray.")
        self.opts = opts

    def key(self) -> dict[str, Any]:
        o = self.opts
        return {
            "executor": "measure",
            "launch": o.launch,
            "concurrency": list(o.concurrency),
            "isl": o.isl,
            "osl": o.osl,
            "requests_per_level": o.requests_per_level,
        }

    def run(self, items: Sequence[SweepItem]) -> Iterator[ItemResult]:
        for it in items:
            base = dict(
                id=it.id, executor=self.name, key=self.key(), mode=it.mode, gpus=it.gpus, description=it.description
            )
            if not it.feasible:
                yield ItemResult(status="infeasible", category=it.category, reason=it.reason, **base)
                continue
            try:
                levels = self._measure(it)
            except (UserError, OSError, RuntimeError, subprocess.SubprocessError) as err:
                yield ItemResult(status="failed", reason=str(err), **base)
                continue
            yield ItemResult(status="ok", levels=levels, **base)

    # ------------------------------------------------------------------------------------------
    def _topology_file(self, it: SweepItem, workdir: Path) -> Path:
        if it.source and it.source != "enumerated" and Path(it.source).is_file():
            return Path(it.source)
        if it.topology_doc is None:
            raise UserError(f"{it.id}: no topology to launch")
        path = workdir / "topology.yaml"
        path.write_text(yaml.safe_dump(it.topology_doc(), sort_keys=False))
        return path

    def _measure(self, it: SweepItem) -> list[dict[str, Any]]:
        from widep.plan import plan
        from widep.plan.api import endpoints_for_topology
        from widep.run.preflight import local_identities
        from widep.spec.topology import load_topology

        o = self.opts
        point = o.out / it.id
        point.mkdir(parents=True, exist_ok=True)
        topo = self._topology_file(it, point)
        p = plan(load_topology(topo))
        if o.launch == "bare-metal":
            me = local_identities()
            remote = [f"{n.name} ({n.address})" for n in p.nodes if not _is_local(n.address, n.name, me)]
            if remote:
                raise UserError(
                    f"bare-metal measured sweeps start every node's launcher from this machine, but "
                    f"{', '.join(remote)} is not this machine. Use --launch ray for multi-node topologies."
                )
        urls, gpus, _ = endpoints_for_topology(topo)
        procs = self._start(topo, p, point)
        try:
            deadline = time.monotonic() + o.ready_timeout_s
            while not _probe_all(urls):
                dead = [pr for pr in procs if pr.poll() is not None]
                if dead:
                    raise RuntimeError(
                        f"a launcher of {it.id} exited ({dead[0].returncode}) before the deployment was ready; "
                        f"logs under {point / 'run'}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{it.id} did not become healthy in {o.ready_timeout_s:.0f} s; logs under {point / 'run'}"
                    )
                time.sleep(1.0)
            return self._bench(urls, gpus, point / "bench")
        finally:
            self._stop(procs)

    def _start(self, topo: Path, p, point: Path) -> list[subprocess.Popen]:
        o = self.opts
        common = []
        if o.model_path:
            common += ["--model-path", o.model_path]
        if o.python:
            common += ["--python", o.python]
        log = open(point / "launch.log", "ab")  # closed with the processes
        procs = []
        if o.launch == "ray":
            cmd = [
                sys.executable,
                "-m",
                "widep",
                "launch",
                str(topo),
                "--backend",
                "ray",
                "--run-dir",
                str(point / "run"),
                *common,
            ]
            if o.ray_address:
                cmd += ["--address", o.ray_address]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        else:
            nodes = sorted({r.node for rp in p.roles for r in rp.ranks} | ({p.router.node} if p.router else set()))
            for n in nodes:
                cmd = [
                    sys.executable,
                    "-m",
                    "widep",
                    "launch",
                    str(topo),
                    "--node",
                    str(n),
                    "--run-dir",
                    str(point / "run" / f"n{n}"),
                    "--restart",
                    "never",
                    *common,
                ]
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
        return procs

    def _stop(self, procs: list[subprocess.Popen]) -> None:
        """SIGTERM every launcher (each tears its ranks down), wait, then SIGKILL what is left."""
        for pr in procs:
            if pr.poll() is None:
                os.kill(pr.pid, signal.SIGTERM)
        end = time.monotonic() + 90
        for pr in procs:
            try:
                pr.wait(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(pr.pid, signal.SIGKILL)
                pr.wait()

    def _bench(self, urls: list[str], gpus: int, out: Path) -> list[dict[str, Any]]:
        from widep.bench.loadgen import Level, run_sync
        from widep.bench.report import stack_from_endpoints
        from widep.bench.sweep import SweepConfig, fetch_served_model, run_sweep
        from widep.bench.workload import LengthSpec, WorkloadSpec

        o = self.opts
        model, _ = run_sync(fetch_served_model(urls[0]))
        cfg = SweepConfig(
            endpoints=tuple(urls),
            model=model,
            workload=WorkloadSpec(isl=LengthSpec(mean=o.isl), osl=LengthSpec(mean=o.osl)),
            levels=tuple(Level("concurrency", c, num_requests=max(o.requests_per_level, c)) for c in o.concurrency),
            stack=stack_from_endpoints(urls, gpus=gpus, model=model),
            scrape_interval_s=None,
        )
        outcomes = run_sweep(cfg, out)
        levels = []
        for oc in outcomes:
            s = oc.summary or {}
            if oc.status == "failed" or not s:
                levels.append({"concurrency": oc.level.concurrency, "status": "failed", "error": oc.error})
                continue
            levels.append(
                {
                    "concurrency": oc.level.concurrency,
                    "tps_gpu": s.get("output_tps_per_gpu"),
                    "tps_user": s.get("tps_per_user"),
                    "ttft_ms": (s.get("ttft_ms") or {}).get("p50"),
                    "tpot_ms": (s.get("tpot_ms") or {}).get("p50"),
                    "completed": s.get("completed"),
                    "failed": s.get("failed"),
                }
            )
        return levels
