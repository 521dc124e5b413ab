"""How long ``widep sweep`` takes to score a budget of ~10,000 candidate topologies (no GPU needed).

    python profiling/sweep_speed.py                   # DeepSeek-R1, H200, 16..64 GPUs, default grid
    python profiling/sweep_speed.py --runs 7 --json

Times, per run (wall clock and this process's CPU time, since the machine may be shared):
  enumerate  - expand the grid into candidates
  feasible   - the planner's rules and memory budget per candidate (fast path)
  score      - the vectorised model at every concurrency level + the saturation level (numpy)
  frontier   - the Pareto frontier over every (candidate, level) point
  total      - all of the above: what ``widep sweep`` spends before printing/writing files
Prints the median of ``--runs`` runs (the first run also pays for imports and caches; it is reported apart).

The whole command (``--command``): ``python -m widep sweep --model M --gpu G --gpus A..B --out DIR`` run
``--runs`` times as a child process (a fresh DIR each time, then once more resuming from the last DIR); CPU time is the
child's user + system time (resource.getrusage), so interpreter start, imports, the columnar results file,
the summary and the plots all count. Reports candidates per CPU-second (median), the load average before
and after, and the target of issue 17 (>= 5,000 candidates per CPU-second). ``--baseline DIR`` times the same
command from another checkout between these runs (``git worktree add /tmp/base <rev>``) and reports the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from widep.perf.calibration import load_calibration
from widep.perf.enumerate import Budget, enumerate_candidates
from widep.perf.model import Workload
from widep.perf.sweep import PredictExecutor, frontier, items_from_candidates


def one_run(budget: Budget, cal_name: str) -> dict:
    cal = load_calibration(cal_name)
    t: dict[str, tuple[float, float]] = {}

    def mark(name: str, w0: float, c0: float) -> tuple[float, float]:
        w, c = time.perf_counter(), time.process_time()
        t[name] = (w - w0, c - c0)
        return w, c

    w, c = time.perf_counter(), time.process_time()
    w0, c0 = w, c
    cands = enumerate_candidates(budget)
    w, c = mark("enumerate", w, c)
    items = items_from_candidates(cands)
    w, c = mark("feasible", w, c)
    results = list(PredictExecutor(cal, Workload(isl=budget.isl, osl=budget.osl)).run(items))
    w, c = mark("score", w, c)
    front = frontier(results)
    w, c = mark("frontier", w, c)
    t["total"] = (w - w0, c - c0)
    levels = sum(len(r.levels) for r in results)
    return {
        "candidates": len(cands),
        "feasible": sum(r.status == "ok" for r in results),
        "levels": levels,
        "frontier": len(front),
        "times": t,
    }


def command_runs(args: argparse.Namespace) -> dict:
    import resource
    import shutil
    import subprocess
    import tempfile

    cmd = [sys.executable, "-m", "widep", "sweep", "--model", args.model, "--gpu", args.gpu, "--gpus", args.gpus]
    here = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="widep-sweep-speed-"))
    load0 = os.getloadavg()[0]
    rows = []
    base_cpu: list[float] = []

    def timed(out: Path, cwd: Path) -> tuple[float, float, Any]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        w0 = time.perf_counter()
        # run from the checkout's root so `-m widep` imports that tree (the baseline's, with --baseline)
        p = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, check=False, cwd=cwd)
        wall = time.perf_counter() - w0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            raise SystemExit(f"widep sweep failed ({cwd}): {p.stderr[-2000:]}")
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), p

    try:
        for i in range(args.runs + 1):
            out = tmp / f"run{min(i, args.runs - 1)}"
            if i < args.runs and out.exists():
                shutil.rmtree(out)
            if args.baseline and i < args.runs:  # interleaved, so both see the same load
                base_cpu.append(timed(tmp / f"base{i}", Path(args.baseline))[1])
            wall, cpu, p = timed(out, here)
            rows.append({"resume": i == args.runs, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)})
        m = next(ln for ln in p.stdout.splitlines() if "candidates for" in ln)
        n = int(m.split()[0])
        files = {f.name: f.stat().st_size for f in (tmp / f"run{args.runs - 1}").iterdir() if f.is_file()}
        dirs = sum(1 for f in (tmp / f"run{args.runs - 1}").iterdir() if f.is_dir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fresh = [r for r in rows if not r["resume"]]
    cpu = statistics.median(r["cpu_s"] for r in fresh)
    return {
        "command": " ".join(cmd[1:]) + " --out DIR",
        "candidates": n,
        "runs": rows,
        "median_cpu_s": round(cpu, 3),
        "median_wall_s": round(statistics.median(r["wall_s"] for r in fresh), 3),
        "candidates_per_cpu_s": round(n / cpu),
        "resume_cpu_s": rows[-1]["cpu_s"],
        "target_per_cpu_s": 5000,
        "baseline": (
            {
                "checkout": args.baseline,
                "median_cpu_s": round(statistics.median(base_cpu), 3),
                "candidates_per_cpu_s": round(n / statistics.median(base_cpu)),
                "speedup": round(statistics.median(base_cpu) / cpu, 3),
            }
            if base_cpu
            else None
        ),
        "files": files,
        "point_dirs": dirs,
        "cpus": os.cpu_count(),
        "load_avg_1m": {"before": round(load0, 2), "after": round(os.getloadavg()[0], 2)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deepseek-r1")
    ap.add_argument("--gpu", default="H200")
    ap.add_argument("--gpus", default="16..64")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calibration", default="published")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--command", action="store_true", help="time the whole widep sweep command (see above)")
    ap.add_argument(
        "--baseline",
        default=None,
        help="with --command: another checkout of widep (e.g. a git worktree of an older commit) whose same command "
        "is timed in between, for a ratio under the same load",
    )
    args = ap.parse_args(argv)
    if args.command:
        res = command_runs(args)
        if args.json:
            print(json.dumps(res, indent=1))
            return 0
        print(
            f"{res['command']}: {res['candidates']} candidates; {len(res['runs']) - 1} fresh runs + 1 resumed on "
            f"{res['cpus']} CPUs (load {res['load_avg_1m']['before']} -> {res['load_avg_1m']['after']})"
        )
        for r in res["runs"]:
            print(f"  {'resume' if r['resume'] else 'fresh '}  {r['cpu_s']:6.2f} s cpu  {r['wall_s']:6.2f} s wall")
        print(
            f"  => median {res['median_cpu_s']:.2f} CPU-s: {res['candidates_per_cpu_s']:,} candidates per CPU-second "
            f"(target {res['target_per_cpu_s']:,}); files {res['files']}; {res['point_dirs']} topology dirs"
        )
        if res["baseline"]:
            b = res["baseline"]
            print(
                f"  baseline {b['checkout']}: median {b['median_cpu_s']:.2f} CPU-s ({b['candidates_per_cpu_s']:,} per "
                f"CPU-second); this tree is {b['speedup']:.2f}x faster"
            )
        return 0
    lo, _, hi = args.gpus.partition("..")
    gpus = tuple(range(int(lo), int(hi or lo) + 1))
    budget = Budget(model=args.model, gpu=args.gpu, gpus=gpus)
    first = one_run(budget, args.calibration)
    runs = [one_run(budget, args.calibration) for _ in range(args.runs)]
    med = {
        k: (statistics.median(r["times"][k][0] for r in runs), statistics.median(r["times"][k][1] for r in runs))
        for k in first["times"]
    }
    per10k = med["total"][0] / first["candidates"] * 10_000
    res = {
        "budget": {"model": args.model, "gpu": args.gpu, "gpus": args.gpus},
        "candidates": first["candidates"],
        "feasible": first["feasible"],
        "levels": first["levels"],
        "frontier": first["frontier"],
        "runs": args.runs,
        "median_s": {k: {"wall": round(v[0], 3), "cpu": round(v[1], 3)} for k, v in med.items()},
        "first_run_total_s": round(first["times"]["total"][0], 3),
        "wall_s_per_10k_candidates": round(per10k, 3),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(
        f"{res['candidates']} candidates ({res['feasible']} feasible, {res['levels']} predicted levels, "
        f"{res['frontier']} frontier points); median of {args.runs} runs on {res['cpus']} CPUs (load "
        f"{res['load_avg_1m']}):"
    )
    for k, v in res["median_s"].items():
        print(f"  {k:10s} {v['wall']:7.3f} s wall  {v['cpu']:7.3f} s cpu")
    print(
        f"  => {res['wall_s_per_10k_candidates']:.2f} s per 10,000 candidates (first run, with warm-up: "
        f"{res['first_run_total_s']:.2f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
