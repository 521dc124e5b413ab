"""Close the loop: fit the model's free terms to measured ``widep bench`` runs of a deployment.

A run directory is what ``widep bench --out`` writes: one llm-d Benchmark Report per level
(``level-*.report.yaml``: concurrency, ISL/OSL, output tok/s, TTFT, TPOT). Each run is paired with the
topology it measured. :func:`fit_runs` adjusts the terms of :data:`TERMS` that move the predictions
(host time per step, per-kernel launch gap, the all-to-all's per-op latency, overlap efficiency) by a
bounded coordinate search in log space, minimising the squared log errors of tokens/s per GPU and TPOT
over every measured level; it returns the fitted calibration and the residuals per point before and
after. The hardware the runs used can be described by measured figures (:func:`measure_host`: memory
bandwidth and FLOP rate of this machine), which the calibration carries under ``hardware``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from widep.errors import UserError
from widep.perf.calibration import A2ATable, Calibration
from widep.perf.kernels import expert_gemm_doc, moe_phases_doc

# term -> (lower, upper) bounds of the search
TERMS: dict[str, tuple[float, float]] = {
    "host_step_us": (10.0, 200_000.0),
    "kernel_gap_eager_us": (0.1, 5_000.0),
    "a2a_latency_us": (1.0, 100_000.0),
    "overlap_efficiency": (0.01, 1.0),
    "request_overhead_us": (10.0, 1_000_000.0),
}


@dataclass(frozen=True)
class MeasuredLevel:
    run: str
    level: str
    concurrency: float
    isl: int
    osl: int
    tps_gpu: float
    tpot_ms: float | None
    ttft_ms: float | None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def read_run(run_dir: str | Path) -> list[MeasuredLevel]:
    """The concurrency levels of one ``widep bench --out`` directory (validated llm-d reports)."""
    from widep.bench.report import read_report

    run = Path(run_dir)
    label = f"{run.parent.name}/{run.name}" if run.name == "bench" else run.name  # measured sweeps: <point>/bench
    files = sorted(run.glob("level-*.report.yaml"))
    if not files:
        raise UserError(
            f"calibrate: {run_dir} holds no level-*.report.yaml. Valid: directories written by widep bench --out."
        )
    out = []
    for f in files:
        br = read_report(f).dump()
        load = _get(br, "scenario", "load", "standardized") or {}
        agg = _get(br, "results", "request_performance", "aggregate") or {}
        conc = load.get("concurrency")
        tps = _get(agg, "throughput", "output_token_rate", "mean")
        if conc is None or tps is None:
            continue  # rate levels and empty levels carry no closed-loop point
        gpus = sum(_get(c, "standardized", "accelerator", "count") or 0 for c in _get(br, "scenario", "stack") or [])
        isl = _get(load, "input_seq_len", "value") or _get(agg, "requests", "input_length", "mean")
        osl = _get(load, "output_seq_len", "value") or _get(agg, "requests", "output_length", "mean")
        out.append(
            MeasuredLevel(
                run=label,
                level=f.name[len("level-") : -len(".report.yaml")],
                concurrency=float(conc),
                isl=max(1, round(float(isl))),
                osl=max(1, round(float(osl))),
                tps_gpu=float(tps) / max(gpus, 1),
                tpot_ms=_get(agg, "latency", "time_per_output_token", "mean"),
                ttft_ms=_get(agg, "latency", "time_to_first_token", "mean"),
            )
        )
    if not out:
        raise UserError(
            f"calibrate: {run_dir} has no concurrency level with output throughput. "
            "Valid: widep bench --concurrency runs."
        )
    return out


def _with_term(cal: Calibration, term: str, value: float, backends: set[str]) -> Calibration:
    if term == "a2a_latency_us":
        tabs = tuple(replace(t, latency_us=value) if t.backend in backends else t for t in cal.a2a)
        return replace(cal, a2a=tabs)
    return replace(cal, **{term: value})


def _term_value(cal: Calibration, term: str, backends: set[str]) -> float:
    if term == "a2a_latency_us":
        vals = [t.latency_us for t in cal.a2a if t.backend in backends]
        return vals[0] if vals else 0.0
    return float(getattr(cal, term))


def predict_levels(plan_obj: Any, levels: list[MeasuredLevel], cal: Calibration) -> list[dict[str, float | None]]:
    """The model at each measured level (fixed-length closed loop: wave arrivals)."""
    from widep.perf.model import Workload, predict_plan

    out = []
    for lv in levels:
        _, pr = predict_plan(
            plan_obj, Workload(isl=lv.isl, osl=lv.osl, arrival="wave"), [lv.concurrency], cal, saturation=False
        )
        p = pr[0]
        out.append({"tps_gpu": p.tps_gpu, "tpot_ms": p.tpot_ms, "ttft_ms": p.ttft_ms})
    return out


def _residuals(runs: list[tuple[Any, list[MeasuredLevel]]], cal: Calibration) -> np.ndarray:
    res = []
    for plan_obj, levels in runs:
        for lv, p in zip(levels, predict_levels(plan_obj, levels, cal), strict=True):
            res.append(math.log(max(p["tps_gpu"], 1e-12) / lv.tps_gpu))
            if lv.tpot_ms and p["tpot_ms"]:
                res.append(math.log(p["tpot_ms"] / lv.tpot_ms))
            if lv.ttft_ms and p["ttft_ms"]:  # the wave's TTFT sets closed-loop throughput too (half weight)
                res.append(0.5 * math.log(p["ttft_ms"] / lv.ttft_ms))
    return np.asarray(res)


def fit_runs(
    runs: list[tuple[Any, list[MeasuredLevel]]],
    cal: Calibration,
    terms: tuple[str, ...] = tuple(TERMS),
    rounds: int = 3,
    grid: int = 9,
) -> tuple[Calibration, list[str]]:
    """Fit ``terms`` (those that move any prediction) to the measured levels; (calibration, terms fitted)."""
    backends = {rp.all2all_backend for plan_obj, _ in runs for rp in plan_obj.roles if rp.ep_size > 1}
    base = _residuals(runs, cal)
    live = []
    for t in terms:
        if t not in TERMS:
            raise UserError(f"calibrate --terms: {t!r} is not a free term. Valid: {', '.join(TERMS)}.")
        v = _term_value(cal, t, backends)
        lo, hi = TERMS[t]
        probe = _with_term(cal, t, min(hi, max(lo, v * 2.0 + lo)), backends)
        if np.max(np.abs(_residuals(runs, probe) - base)) > 1e-6:
            live.append(t)
    best, best_loss = cal, float(np.sum(base**2))
    spans = {t: (math.log(TERMS[t][0]), math.log(TERMS[t][1])) for t in live}
    for _ in range(rounds):
        for t in live:
            lo, hi = spans[t]
            for x in np.linspace(lo, hi, grid):
                trial = _with_term(best, t, float(math.exp(x)), backends)
                loss = float(np.sum(_residuals(runs, trial) ** 2))
                if loss < best_loss - 1e-12:
                    best, best_loss = trial, loss
            cur = math.log(max(_term_value(best, t, backends), 1e-12))
            half = (hi - lo) / 4.0
            glo, ghi = (math.log(b) for b in TERMS[t])
            spans[t] = (max(glo, cur - half), min(ghi, cur + half))
    return replace(
        best,
        name=f"{cal.name}+measured",
        description=f"{cal.description}; {', '.join(live) or 'no term'} "
        f"fitted to {sum(len(lv) for _, lv in runs)} measured levels",
    ), live


def residual_rows(
    runs: list[tuple[Any, list[MeasuredLevel]]], before: Calibration, after: Calibration
) -> list[dict[str, Any]]:
    rows = []
    for plan_obj, levels in runs:
        pb, pa = predict_levels(plan_obj, levels, before), predict_levels(plan_obj, levels, after)
        for lv, b, a in zip(levels, pb, pa, strict=True):

            def pct(pred: float | None, meas: float | None) -> float | None:
                return None if not pred or not meas else round(100.0 * (pred / meas - 1.0), 1)

            rows.append(
                {
                    "run": lv.run,
                    "level": lv.level,
                    "concurrency": lv.concurrency,
                    "isl": lv.isl,
                    "osl": lv.osl,
                    "measured_tps_gpu": round(lv.tps_gpu, 3),
                    "predicted_tps_gpu": round(a["tps_gpu"], 3),
                    "error_tps_pct": pct(a["tps_gpu"], lv.tps_gpu),
                    "error_tps_pct_before": pct(b["tps_gpu"], lv.tps_gpu),
                    "measured_tpot_ms": None if lv.tpot_ms is None else round(lv.tpot_ms, 3),
                    "predicted_tpot_ms": None if a["tpot_ms"] is None else round(a["tpot_ms"], 3),
                    "error_tpot_pct": pct(a["tpot_ms"], lv.tpot_ms),
                    "error_tpot_pct_before": pct(b["tpot_ms"], lv.tpot_ms),
                    "measured_ttft_ms": None if lv.ttft_ms is None else round(lv.ttft_ms, 3),
                    "predicted_ttft_ms": None if a["ttft_ms"] is None else round(a["ttft_ms"], 3),
                }
            )
    return rows


def measure_host(threads: int = 1, seconds: float = 0.6) -> dict[str, float]:
    """This machine as a 'GPU' slot of the CPU preset: streaming memory bandwidth (TB/s, a copy of 256 MB)
    and matmul FLOP rate (TFLOP/s, fp32 and bf16 1024^3) with ``threads`` threads (vLLM's CPU backend pins
    one OpenMP thread group per rank). Medians of repeated timings."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:

        def rate(fn: Any, work: float) -> float:
            fn()
            ts = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end or len(ts) < 3:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return work / float(np.median(ts))

        n = 32 * 1024 * 1024
        src, dst = torch.ones(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
        bw = rate(lambda: dst.copy_(src), 2.0 * n * 8)
        a32 = torch.randn(1024, 1024)
        f32 = rate(lambda: a32 @ a32, 2.0 * 1024**3)
        a16 = a32.to(torch.bfloat16)
        f16 = rate(lambda: a16 @ a16, 2.0 * 1024**3)
    finally:
        torch.set_num_threads(old)
    best = max(f32, f16)
    return {
        "hbm_tbps": bw / 1e12,
        "bf16_tflops": best / 1e12,
        "fp8_tflops": best / 1e12,
        "fp32_tflops": f32 / 1e12,
        "threads": float(threads),
    }


def calibration_document(cal: Calibration) -> dict[str, Any]:
    """``cal`` as a ``widep-perf-calibration/1`` document (what load_calibration reads back)."""

    def tab(t: A2ATable) -> dict[str, Any]:
        return {
            "bytes_model": t.bytes_model,
            "source": t.source,
            "latency_us": t.latency_us,
            "intranode": {"dispatch_gbps": t.intranode_dispatch_gbps, "combine_gbps": t.intranode_combine_gbps},
            "internode": {
                "ep": list(t.internode_ep),
                "dispatch_gbps": list(t.internode_dispatch_gbps),
                "combine_gbps": list(t.internode_combine_gbps),
            },
        }

    return {
        "format": "widep-perf-calibration/1",
        "name": cal.name,
        "description": cal.description,
        "ref_link": {"gpu": cal.ref_gpu, "nvlink_gbps": cal.ref_nvlink_gbps, "nic_gbps": cal.ref_nic_gbps},
        "hbm": {
            "weights_efficiency": cal.hbm_weights_efficiency,
            "kv_read_efficiency": cal.hbm_kv_read_efficiency,
            "activation_bytes_per_hidden": cal.activation_bytes_per_hidden,
        },
        "gemm": {
            "fp8_efficiency": cal.gemm_fp8_efficiency,
            "bf16_efficiency": cal.gemm_bf16_efficiency,
            "block_m": cal.gemm_block_m,
            "roofline_p": cal.roofline_p,
            "grouped_curve": {k: v for k, v in cal.grouped_curve},
            "grouped_curve_dtype": cal.grouped_curve_dtype,
        },
        "attention": {
            "decode_efficiency": cal.attention_decode_efficiency,
            "prefill_efficiency": cal.attention_prefill_efficiency,
        },
        "overheads": {
            "kernels_per_layer": cal.kernels_per_layer,
            "kernel_gap_us": {
                "full_graph": cal.kernel_gap_full_graph_us,
                "piecewise": cal.kernel_gap_piecewise_us,
                "eager": cal.kernel_gap_eager_us,
            },
            "host_step_us": cal.host_step_us,
            "host_per_seq_us": cal.host_per_seq_us,
            "request_us": cal.request_overhead_us,
            "graph_max_tokens": cal.graph_max_tokens,
        },
        "tp_allreduce": {
            "per_layer": cal.tp_allreduce_per_layer,
            "latency_us": cal.tp_allreduce_latency_us,
            "nvlink_efficiency": cal.tp_allreduce_nvlink_efficiency,
        },
        "dbo": {
            "efficiency": cal.overlap_efficiency,
            "vllm_efficiency": cal.dbo_vllm_efficiency,
            "a2a_sm_fraction_nvlink": cal.a2a_sm_fraction_nvlink,
            "a2a_sm_fraction_rdma": cal.a2a_sm_fraction_rdma,
            "comm_sms_normal": cal.comm_sms_normal,
        },
        "routing": {
            "stat_coef": cal.routing_stat_coef,
            "skew_no_eplb": cal.routing_skew_no_eplb,
            "skew_eplb": cal.routing_skew_eplb,
            "redundant_relief": cal.routing_redundant_relief,
            "dp_imbalance_random": cal.dp_imbalance_random,
            "dp_imbalance_balanced": cal.dp_imbalance_balanced,
            "dp_imbalance_internal": cal.dp_imbalance_internal,
            "seq_corr": cal.routing_seq_corr,
        },
        "fabric": {"roce_a2a_efficiency": cal.roce_a2a_efficiency, "roce_kv_efficiency": cal.roce_kv_efficiency},
        "speculative": {"acceptance": cal.spec_acceptance, "draft_pass_us": cal.spec_draft_us},
        "kv_transfer": {"nic_efficiency": cal.kv_transfer_nic_efficiency, "latency_us": cal.kv_transfer_latency_us},
        "a2a": {t.backend: tab(t) for t in cal.a2a},
        "hardware": {k: dict(v) for k, v in cal.hardware.items()},
        **({"expert_gemm": expert_gemm_doc(cal.expert_gemm)} if cal.expert_gemm else {}),
        **({"moe_phases": moe_phases_doc(cal.moe_phases)} if cal.moe_phases else {}),
    }
