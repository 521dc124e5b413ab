"""Cost of recording expert load: serving throughput of the DP2/EP2 default with vLLM's routed-expert return on
(``serving.record_routed_experts: true`` -> ``--enable-return-routed-experts``, on CPU through widep's vLLM plugin)
against the same deployment without it, tiny MoE on CPU vLLM, through ``widep bench --topology``.

    .venv/bin/python profiling/record_overhead.py --runs 3 --out profiling/results/record-overhead-cpu.json

Both deployments are launched once with ``widep launch`` and stay up side by side (other ports, the same pinned
cores). Each run loads both AT THE SAME TIME with the same closed-loop load for the same duration (two ``widep
bench`` processes), so that both figures of a run share whatever else the machine does in that minute (this
machine is shared: benching them one after the other gave on/off ratios from 0.65 to 1.09 in three runs); the
run's ratio is on/off output tokens/s. The result is the median of the runs' ratios (and the median figures).
Done when the median ratio is >= 0.95.
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
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from launch_helpers import LaunchProc, free_ports, wait_gone


def topologies(tmp: Path) -> dict[str, Path]:
    out = {}
    for key in ("off", "on"):
        doc = yaml.safe_load((ROOT / "topologies/tiny-moe-cpu-ep2.yaml").read_text())
        port, rpc, control = free_ports(3)
        doc["name"] = f"record-{key}"
        doc["serving"].update({"port": port, "rpc_port": rpc, "control_port": control})
        doc["serving"]["record_routed_experts"] = key == "on"
        out[key] = tmp / f"{key}.yaml"
        out[key].write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def bench_argv(topo: Path, out: Path, level: int, isl: int, osl: int, seconds: float, model: str) -> list[str]:
    argv = [sys.executable, "-m", "widep", "bench", "--topology", str(topo), "--concurrency", str(level)]
    argv += ["--isl", str(isl), "--osl", str(osl), "--duration", str(seconds), "--warmup", "2", "--out", str(out)]
    return argv + ["--scrape-interval", "0", "--accelerator", "cpu", "--model", model, "--tokenizer", model]


def summary(out: Path, level: int) -> dict:
    s = json.loads((out / f"level-c{level}.summary.json").read_text())["summary"]
    return {
        "output_tps": s["output_tps"],
        "itl_ms": s["itl_ms"]["p50"],
        "ttft_ms": s["ttft_ms"]["p50"],
        "completed": s.get("completed"),
        "failed": s["failed"],
    }


def bench_both(topos: dict[str, Path], tmp: Path, i: int, level: int, isl: int, osl: int, seconds: float, model: str):
    procs = {}
    for key, topo in topos.items():
        argv = bench_argv(topo, tmp / f"bench-{key}-{i}", level, isl, osl, seconds, model)
        procs[key] = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for key, proc in procs.items():
        _, err = proc.communicate(timeout=seconds * 4 + 300)
        if proc.returncode != 0:
            raise SystemExit(f"bench failed for {topos[key]}: {err[-2000:]}")
    return {key: summary(tmp / f"bench-{key}-{i}", level) for key in topos}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0, help="load duration per run")
    ap.add_argument("--model-path", default=None, help="default: the tiny MoE widep builds")
    ap.add_argument("--out", type=Path, default=ROOT / "profiling/results/record-overhead-cpu.json")
    args = ap.parse_args()
    from widep.tinymoe import ensure_tiny_moe

    model = args.model_path or str(ensure_tiny_moe())
    tmp = Path(tempfile.mkdtemp(prefix="widep-record-prof-"))
    launches: dict[str, LaunchProc] = {}
    runs: list[dict[str, dict]] = []
    try:
        topos = topologies(tmp)
        for key, topo in topos.items():
            launches[key] = LaunchProc(
                [str(topo), "--run-dir", str(tmp / f"run-{key}"), "--model-path", model, "--python", sys.executable],
                env={"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")},
            )
            launches[key].wait_for(rf"ready: record-{key}", 900)
        for i in range(args.runs):
            run = bench_both(topos, tmp, i, args.concurrency, args.isl, args.osl, args.seconds, model)
            run["ratio"] = run["on"]["output_tps"] / run["off"]["output_tps"]
            runs.append(run)
            print(
                f"run {i}: off {run['off']['output_tps']:.1f} tok/s, on {run['on']['output_tps']:.1f} tok/s, "
                f"on/off {run['ratio']:.3f}",
                flush=True,
            )
    finally:
        for lp in launches.values():
            run_id = lp.run_id()
            lp.stop(signal.SIGTERM)
            wait_gone(run_id, 60)
    med = {k: statistics.median(r[k]["output_tps"] for r in runs) for k in ("off", "on")}
    ratio = statistics.median(r["ratio"] for r in runs)
    result = {
        "machine": f"{os.cpu_count()} cores (shared), CPU vLLM 0.32, tiny MoE, DP2/EP2 default topology",
        "runs": args.runs,
        "concurrency": args.concurrency,
        "isl": args.isl,
        "osl": args.osl,
        "seconds_per_run": args.seconds,
        "method": "both deployments loaded at the same time, same closed-loop load and duration",
        "median_output_tps": med,
        "median_ratio_on_over_off": ratio,
        "overhead_pct": round(100 * (1 - ratio), 2),
        "raw": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"median output tok/s: recording off {med['off']:.1f}, on {med['on']:.1f}; median on/off ratio {ratio:.3f} "
        f"(overhead {100 * (1 - ratio):.1f}%, target <= 5%)"
    )


if __name__ == "__main__":
    main()
