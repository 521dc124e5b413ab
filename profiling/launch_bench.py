"""Cold start to ready through `widep launch` vs the same vLLM command run by hand; and the time from a
rank's death to the group's teardown.

    .venv/bin/python profiling/launch_bench.py --runs 3

Each run alternates: (a) by hand: start the rendered vLLM command directly, poll /health every 0.2 s;
(b) widep: `widep launch TOPO --once`-style launch, time until the launcher prints "ready". Then, with a
DP1 launch that is healthy, SIGKILL the rank's API server and time until the launcher has torn the
group down (every process of the attempt gone) and until it has started the next attempt.
Prints medians, spread and the widep/by-hand ratio. CPU vLLM on this machine, tiny MoE.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from launch_helpers import LaunchProc, api_server_pids, processes_of_run, topology_copy


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def by_hand(topo: Path, model: str) -> float:
    from widep.plan import plan
    from widep.render.vllm import RenderContext, render
    from widep.spec.topology import load_topology

    p = plan(load_topology(topo))
    (c,) = render(p, RenderContext(model_path=model, python=sys.executable, cpu_count=os.cpu_count()))
    env = dict(os.environ) | {k: str(v) for k, v in c.env}
    t = time.perf_counter()
    proc = subprocess.Popen(
        list(c.argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        while not healthy(c.port):
            if proc.poll() is not None:
                raise RuntimeError("vLLM exited")
            time.sleep(0.2)
        return time.perf_counter() - t
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        time.sleep(1)


def through_widep(topo: Path, model: str, tmp: Path) -> float:
    t = time.perf_counter()
    lp = LaunchProc(
        [str(topo), "--model-path", model, "--python", sys.executable, "--run-dir", str(tmp / f"run-{time.time_ns()}")]
    )
    try:
        lp.wait_for(r"ready: ", 300)
        return time.perf_counter() - t
    finally:
        lp.stop(signal.SIGTERM)


def death_to_teardown(topo: Path, model: str, tmp: Path) -> tuple[float, float]:
    lp = LaunchProc(
        [
            str(topo),
            "--model-path",
            model,
            "--python",
            sys.executable,
            "--backoff",
            "0",
            "--run-dir",
            str(tmp / f"death-{time.time_ns()}"),
        ]
    )
    try:
        lp.wait_for(r"ready: ", 300)
        run = lp.run_id()
        (pid,) = api_server_pids(run)
        before = set(processes_of_run(run))
        t = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while set(processes_of_run(run)) & before:
            time.sleep(0.02)
        teardown = time.perf_counter() - t
        lp.wait_for(r"attempt 1: started", 60)
        restart = time.perf_counter() - t
        return teardown, restart
    finally:
        lp.stop(signal.SIGTERM)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = ap.parse_args()
    from widep.tinymoe import ensure_tiny_moe

    model = str(ensure_tiny_moe("qwen3_moe"))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        topo = topology_copy("tiny-moe-cpu.yaml", tmp)
        hand, widep, deaths = [], [], []
        for i in range(args.runs):
            hand.append(by_hand(topo, model))
            widep.append(through_widep(topo, model, tmp))
            print(f"run {i + 1}: by hand {hand[-1]:.1f} s, widep {widep[-1]:.1f} s", flush=True)
        for i in range(args.runs):
            deaths.append(death_to_teardown(topo, model, tmp))
            print(
                f"death {i + 1}: teardown {deaths[-1][0]:.2f} s, next attempt started {deaths[-1][1]:.2f} s", flush=True
            )
    med = statistics.median
    ratios = [w / h for w, h in zip(widep, hand, strict=False)]
    out = {
        "runs": args.runs,
        "cold_start_by_hand_s": {"median": med(hand), "min": min(hand), "max": max(hand)},
        "cold_start_widep_s": {"median": med(widep), "min": min(widep), "max": max(widep)},
        "ratio_widep_over_hand": {"median": med(ratios), "per_run": ratios},
        "death_to_teardown_s": {"median": med(d[0] for d in deaths), "max": max(d[0] for d in deaths)},
        "death_to_next_attempt_s": {"median": med(d[1] for d in deaths), "max": max(d[1] for d in deaths)},
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
