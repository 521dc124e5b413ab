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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from widep.perf.calibration import load_calibration  # noqa: E402
from widep.perf.enumerate import Budget, enumerate_candidates  # noqa: E402
from widep.perf.model import Workload  # noqa: E402
from widep.perf.sweep import PredictExecutor, frontier, items_from_candidates  # noqa: E402


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
    return {"candidates": len(cands), "feasible": sum(r.status == "ok" for r in results), "levels": levels,
            "frontier": len(front), "times": t}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deepseek-r1")
    ap.add_argument("--gpu", default="H200")
    ap.add_argument("--gpus", default="16..64")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calibration", default="published")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    lo, _, hi = args.gpus.partition("..")
    gpus = tuple(range(int(lo), int(hi or lo) + 1))
    budget = Budget(model=args.model, gpu=args.gpu, gpus=gpus)
    first = one_run(budget, args.calibration)
    runs = [one_run(budget, args.calibration) for _ in range(args.runs)]
    med = {k: (statistics.median(r["times"][k][0] for r in runs), statistics.median(r["times"][k][1] for r in runs))
           for k in first["times"]}
    per10k = med["total"][0] / first["candidates"] * 10_000
    res = {
        "budget": {"model": args.model, "gpu": args.gpu, "gpus": args.gpus},
        "candidates": first["candidates"], "feasible": first["feasible"], "levels": first["levels"], "frontier": first["frontier"],
        "runs": args.runs, "median_s": {k: {"wall": round(v[0], 3), "cpu": round(v[1], 3)} for k, v in med.items()},
        "first_run_total_s": round(first["times"]["total"][0], 3),
        "wall_s_per_10k_candidates": round(per10k, 3),
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"{res['candidates']} candidates ({res['feasible']} feasible, {res['levels']} predicted levels, "
          f"{res['frontier']} frontier points); median of {args.runs} runs on {res['cpus']} CPUs (load {res['load_avg_1m']}):")
    for k, v in res["median_s"].items():
        print(f"  {k:10s} {v['wall']:7.3f} s wall  {v['cpu']:7.3f} s cpu")
    print(f"  => {res['wall_s_per_10k_candidates']:.2f} s per 10,000 candidates (first run, with warm-up: {res['first_run_total_s']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
