"""Fidelity of the analytic model against every public operating point, with leave-one-out errors.

    python profiling/fidelity.py                # table: published, fitted, leave-one-out
    python profiling/fidelity.py --json
    python profiling/fidelity.py --write        # also refresh widep/perf/data/fit-residuals.json (the band
                                                # `widep predict` reports) and print the fitted free terms

The points and their sources are widep/perf/data/operating-points.yaml. The free terms of
widep/perf/fit.py (overlap efficiency, DP-imbalance coefficient with a DP-aware balancer, host time per
step) are fitted to all points ("fit" column) and, for each point, refitted without it and used to predict
it ("LOO" column): the leave-one-out error is the prediction error on a point the fit never saw.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from widep.perf import kernels as K
from widep.perf.calibration import load_calibration
from widep.perf.fit import FREE_TERMS, fit, leave_one_out, operating_points

RESIDUALS = Path(__file__).resolve().parents[1] / "widep" / "perf" / "data" / "fit-residuals.json"
RESULTS = Path(__file__).resolve().parent / "results"
# the kernel measurements the calibration's expert_gemm / moe_phases terms were fitted to (widep calibrate --kernels)
DEEPGEMM_GRAPH = RESULTS / "deepgemm-h100x1.json"  # DeepGEMM itself, CUDA-graph replay, one H100
DEEPGEMM_EAGER = RESULTS / "deep-kernels-h200x2.json"  # DeepGEMM on H200, eager single calls
MOE_LAYERS = (RESULTS / "moe-layer-h100x2.json", RESULTS / "moe-layer-h100x4.json")
GEMM_BOUND_PCT, PHASE_BOUND_PCT = 10.0, 20.0


def kernel_tables(cal) -> dict:
    """Every measured expert GEMM shape and MoE-layer non-GEMM phase against the calibration's kernel terms."""
    out: dict = {"gemm": [], "phases": []}
    if cal.expert_gemm is not None:
        graph = K.read_deepgemm(DEEPGEMM_GRAPH)
        eager = K.read_deepgemm(DEEPGEMM_EAGER, K.measured_dispatch_us(graph))
        out["gemm"] = K.gemm_fidelity(cal.expert_gemm, graph + eager)
        out["dispatch_us_measured"] = round(K.measured_dispatch_us(graph), 2)
    if cal.moe_phases is not None:
        out["phases"] = K.phase_fidelity(cal.moe_phases, [r for f in MOE_LAYERS for r in K.read_moe_layer(f)])
    graph_rows = [r for r in out["gemm"] if r["timing"] == "graph"]
    out["gemm_max_abs_pct_graph"] = max((abs(r["error_pct"]) for r in graph_rows), default=None)
    layer = [r for r in out["phases"] if r["phase"] == "layer"]
    out["phases_layer_max_abs_pct"] = max((abs(r["error_pct"]) for r in layer), default=None)
    return out


def print_kernel_tables(kt: dict) -> None:
    if kt["gemm"]:
        print(
            f"\nexpert GEMMs (DeepGEMM measured vs model; bound +-{GEMM_BOUND_PCT:.0f}% on the graph-replay rows "
            f"of the card measured; eager dispatch measured {kt['dispatch_us_measured']} us per call)"
        )
        print(
            f"{'card':5s} {'layout':10s} {'gemm':7s} {'G':>3s} {'rows/exp':>8s} {'meas us':>9s} {'pred us':>9s} "
            f"{'err':>7s}"
        )
        for r in kt["gemm"]:
            print(
                f"{r['card']:5s} {r['layout']:10s} {r['gemm']:7s} {r['groups']:3d} {r['rows_per_expert']:8.0f} "
                f"{r['measured_us']:9.1f} {r['predicted_us']:9.1f} {r['error_pct']:+6.1f}%"
                + ("" if r["timing"] == "graph" else f"  ({r['timing']}, check)")
            )
        print(f"graph-replay rows: max |error| {kt['gemm_max_abs_pct_graph']:.1f}%")
    if kt["phases"]:
        print(
            "\nnon-GEMM MoE phases (plain-torch MoE layer, measured vs model; "
            f"bound +-{PHASE_BOUND_PCT:.0f}% per layer)"
        )
        print(f"{'card':5s} {'EP':>3s} {'tokens':>6s} {'phase':8s} {'meas us':>9s} {'pred us':>9s} {'err':>7s}")
        for r in kt["phases"]:
            print(
                f"{r['card']:5s} {r['ep']:3d} {r['tokens']:6d} {r['phase']:8s} {r['measured_us']:9.1f} "
                f"{r['predicted_us']:9.1f} {r['error_pct']:+6.1f}%"
            )
        print(f"per layer (route + permute + reduce): max |error| {kt['phases_layer_max_abs_pct']:.1f}%")


def run(calibration: str = "published") -> dict:
    cal = load_calibration(calibration)
    t0 = time.perf_counter()
    rows = leave_one_out(cal)
    full = fit([p for p in operating_points() if p.use == "fit"], cal)
    used = [r for r in rows if r["use"] == "fit"]
    loo = [math.log(1.0 + r["error_loo_pct"] / 100.0) for r in used]
    return {
        "calibration": cal.summary(),
        "fitted_terms": {t: round(getattr(full, t), 4) for t in FREE_TERMS},
        "rows": rows,
        "rms_log_loo": math.sqrt(sum(x * x for x in loo) / len(loo)),
        "max_abs_loo_pct": max(abs(r["error_loo_pct"]) for r in used),
        "max_abs_fit_pct": max(abs(r["error_fit_pct"]) for r in used),
        "checks": {r["id"]: round(r["error_loo_pct"], 1) for r in rows if r["use"] != "fit"},
        "kernels": kernel_tables(cal),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration", default="published")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.calibration)
    if args.write:
        RESIDUALS.write_text(
            json.dumps(
                {
                    "format": "widep-fit-residuals/1",
                    "note": "leave-one-out residuals of widep/perf/data/operating-points.yaml "
                    "(profiling/fidelity.py --write)",
                    "rms_log": round(res["rms_log_loo"], 4),
                    "points": sum(1 for r in res["rows"] if r["use"] == "fit"),
                    "residuals_pct": {r["id"]: round(r["error_loo_pct"], 1) for r in res["rows"] if r["use"] == "fit"},
                    "checks_pct": res["checks"],
                    "fitted_terms": res["fitted_terms"],
                },
                indent=1,
            )
            + "\n"
        )
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(
        f"calibration {res['calibration']['name']} ({res['calibration']['fingerprint']}); "
        f"fitted terms (all points): {res['fitted_terms']}"
    )
    print(
        f"{'point':24s} {'engine':9s} {'metric':20s} {'published':>10s} {'fit':>9s} {'err':>6s} {'LOO':>9s} {'err':>6s}"
    )
    for r in res["rows"]:
        print(
            f"{r['id']:24s} {r['engine']:9s} {r['metric']:20s} {r['published']:10,.0f} {r['predicted_fit']:9,.0f} "
            f"{r['error_fit_pct']:+5.0f}% {r['predicted_loo']:9,.0f} {r['error_loo_pct']:+5.0f}%"
            + ("" if r["use"] == "fit" else "  (check only, not fitted)")
        )
    print(
        f"fitted points, LOO: log RMS {res['rms_log_loo']:.3f}, max |error| {res['max_abs_loo_pct']:.0f}%; "
        f"in-sample max |error| {res['max_abs_fit_pct']:.0f}% ({res['seconds']} s)"
    )
    for r in res["rows"]:
        if r["use"] != "fit":
            print(f"check only: {r['id']}: {r['why']}")
    print_kernel_tables(res["kernels"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
