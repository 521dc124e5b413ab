"""Kernel-true terms of the step model: DeepGEMM's expert GEMMs and the non-GEMM phases of a MoE layer (pure).

The routed experts of a DeepSeek-style MoE layer run two FP8 grouped GEMMs per micro-batch: gate_up
(N = 2 x inter, K = hidden) and down (N = hidden, K = inter), DeepGEMM's m-grouped *masked* kernel in decode
(DeepEP low-latency hands it a (experts, max rows, K) buffer) and its m-grouped *contiguous* kernel in prefill.
One call over G local experts with m rows each costs

    t_mem  = (weights + activations in + outputs) / min(HBM x hbm_efficiency, SMs x sm_stream_gbps)
    t_comp = 2 x G x pad(m, block_m) x N x K / (FP8 peak x compute_efficiency[layout])
    t      = (t_mem^p + t_comp^p)^(1/p)

per GEMM (``gate_up`` and ``down`` each have their own efficiencies). The pad to one 64-row tile makes the call
flat in m up to 64 rows per expert; the SM stream cap is why an H200 streams the same kernel barely faster than an
H100 (the masked kernel is bound by what 132 SMs issue, not by HBM: DeepGEMM on 2 x H200 moved gate_up at
2.8-3.4 TB/s of 4.8, down at 2.0-2.6, profiling/results/deep-kernels-h200x2.json). An eager call adds
``dispatch_us`` of host time over CUDA-graph replay.

The non-GEMM phases (``route``: router GEMM + grouped top-k + FP8 cast of the tokens; ``permute``: the received
rows sorted into the experts' layout; ``reduce``: the top-k weighted sum of the expert outputs; ``act``: SiLU x mul
+ FP8 cast between the two GEMMs) cost ``floor + bytes / (HBM x efficiency)`` each: the floor is the launch and
host cost of the phase's kernels in the measured (eager, plain torch) implementation, the efficiency the rate its
kernels stream their bytes at. The step model prices the phases of the serving path (vLLM's fused kernels, inside
its CUDA graphs) with the bytes term alone: :func:`serving_phase_bytes` at the calibration's weight-streaming
efficiency [assumption: fused memory-bound kernels]; their launches are among ``kernels_per_layer``.

:func:`read_deepgemm` reads ``profiling/gpu/deepgemm_bench.py`` output (and the earlier on-device runs),
:func:`fit_expert_gemm` / :func:`fit_moe_phases` fit the terms (``widep calibrate --kernels``), and
:func:`gemm_fidelity` / :func:`phase_fidelity` give the per-shape table ``profiling/fidelity.py`` prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from widep.errors import UserError

GEMMS = ("gate_up", "down")
LAYOUTS = ("masked", "contiguous")
PHASES = ("route", "permute", "act", "reduce")
DEEPGEMM_FORMATS = ("widep-deepgemm/1", "widep-turn3-deepgemm/1")
SCALE_BLOCK = 128.0


@dataclass(frozen=True)
class GemmEff:
    hbm_efficiency: float
    """Share of the datasheet HBM bandwidth the kernel streams weights + activations at (when HBM binds)."""
    sm_stream_gbps: float
    """Bytes per second per SM the kernel's loads reach (when the SMs bind), GB/s."""
    compute_masked: float
    """Share of the FP8 peak of the padded rows, masked layout (decode)."""
    compute_contiguous: float
    """Same, contiguous layout (prefill)."""


@dataclass(frozen=True)
class ExpertGemm:
    gate_up: GemmEff
    down: GemmEff
    block_m: int = 64
    roofline_p: float = 3.0
    dispatch_us: float = 15.0
    """Host dispatch of one eager call over CUDA-graph replay, µs."""
    card: str = ""
    source: str = ""

    def of(self, gemm: str) -> GemmEff:
        return self.gate_up if gemm == "gate_up" else self.down


@dataclass(frozen=True)
class PhaseCost:
    floor_us: float
    """Eager launch + host cost of the phase's kernels in the measured implementation, µs per layer."""
    efficiency: float
    """Share of the datasheet HBM bandwidth the phase's kernels stream their bytes at."""


@dataclass(frozen=True)
class MoePhases:
    route: PhaseCost
    permute: PhaseCost
    act: PhaseCost
    reduce: PhaseCost
    card: str = ""
    source: str = ""

    def of(self, phase: str) -> PhaseCost:
        return getattr(self, phase)


# ------------------------------------------------------------------------------------------------- bytes


def gemm_bytes(groups: Any, m: Any, n: Any, k: Any, weight_bytes_per_param: float = 1.0) -> tuple[Any, Any]:
    """(weight bytes incl. 128x128 block scales, activation bytes: FP8 rows in + scales + BF16 rows out)."""
    w = groups * n * k * weight_bytes_per_param
    rows = groups * m
    act = rows * (k * (1.0 + 4.0 / SCALE_BLOCK) + 2.0 * n)
    return w, act


def phase_bytes(phase: str, tokens: Any, rows: Any, hidden: float, inter: float, experts: float) -> Any:
    """Bytes one phase moves per MoE layer: ``tokens`` on this rank, ``rows`` expert rows it receives."""
    if phase == "route":  # router GEMM reads the tokens (BF16) and its weights; FP8 cast reads BF16, writes FP8
        return tokens * hidden * 5.0 + experts * hidden * 2.0
    if phase == "permute":  # received FP8 rows dequantised and sorted by expert: read 1 + write 2 + gather 2 + 2
        return rows * hidden * 7.0
    if phase == "act":  # gate_up output (BF16, 2 x inter) read, FP8 rows + scales written
        return rows * (4.0 * inter + inter * (1.0 + 4.0 / SCALE_BLOCK))
    if phase == "reduce":  # top-k expert outputs read (BF16, with the weighted product), one BF16 row written
        return rows * hidden * 4.0 + tokens * hidden * 2.0
    raise ValueError(phase)


def serving_phase_bytes(phase: str, tokens: Any, rows: Any, hidden: float, inter: float, experts: float) -> Any:
    """Bytes of the same phase in vLLM's fused path: router GEMM (BF16 tokens + weights) with the top-k over its
    FP32 logits; FP8 rows moved once (ep_scatter); the fused SiLU x mul + FP8 quant; the weighted gather
    (ep_gather) reading each BF16 expert output once."""
    if phase == "route":
        return tokens * hidden * 2.0 + experts * hidden * 2.0 + tokens * experts * 4.0 * 2.0
    if phase == "permute":
        return rows * hidden * (1.0 + 4.0 / SCALE_BLOCK) * 2.0
    if phase == "act":
        return phase_bytes("act", tokens, rows, hidden, inter, experts)
    if phase == "reduce":
        return rows * hidden * 2.0 + tokens * hidden * 2.0
    raise ValueError(phase)


# ------------------------------------------------------------------------------------------------- times


def _soft_max(tc: Any, tm: Any, p: float) -> Any:
    if p == 2.0:
        return np.sqrt(tc * tc + tm * tm)
    hi = np.maximum(np.maximum(tc, tm), 1e-30)
    return hi * ((tc / hi) ** p + (tm / hi) ** p) ** (1.0 / p)


def gemm_seconds(
    eg: ExpertGemm,
    gemm: str,
    masked: Any,
    groups: Any,
    m: Any,
    n: Any,
    k: Any,
    hbm_bps: Any,
    sms: Any,
    peak_flops: Any,
    weight_bytes_per_param: float = 1.0 + 4.0 / (SCALE_BLOCK * SCALE_BLOCK),
) -> tuple[Any, Any, Any, Any]:
    """(time, memory-bound part, compute-bound part, memory part had HBM alone bound the stream) of one grouped GEMM
    call (numpy-friendly, graph replay)."""
    e = eg.of(gemm)
    w, act = gemm_bytes(groups, m, n, k, weight_bytes_per_param)
    bw_hbm = hbm_bps * e.hbm_efficiency
    bw = np.minimum(bw_hbm, sms * e.sm_stream_gbps * 1e9)
    t_mem = (w + act) / bw
    padded = groups * np.ceil(np.maximum(m, 1e-9) / eg.block_m - 1e-9) * eg.block_m
    c = np.where(masked, e.compute_masked, e.compute_contiguous)
    t_comp = 2.0 * padded * n * k / (peak_flops * c)
    return _soft_max(t_comp, t_mem, eg.roofline_p), t_mem, t_comp, (w + act) / bw_hbm


def phase_seconds(
    mp: MoePhases,
    phase: str,
    tokens: Any,
    rows: Any,
    hidden: float,
    inter: float,
    experts: float,
    hbm_bps: Any,
    floor_us: Any = None,
) -> Any:
    """One phase's time per MoE layer; ``floor_us`` None: the measured implementation's eager floor."""
    pc = mp.of(phase)
    fl = pc.floor_us if floor_us is None else floor_us
    return fl * 1e-6 + phase_bytes(phase, tokens, rows, hidden, inter, experts) / (hbm_bps * pc.efficiency)


# ------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class GemmRow:
    card: str
    layout: str
    gemm: str
    groups: int
    m: float
    n: int
    k: int
    us: float
    timing: str
    """graph (CUDA-graph replay), or single-minus-dispatch (an eager call less the measured dispatch cost)."""
    source: str
    single_us: float | None = None


def _card_of(device_name: str) -> str:
    from widep.spec.hardware import gpu_catalog

    up = device_name.upper()
    for name in sorted(gpu_catalog(), key=len, reverse=True):
        if name != "CPU" and name.upper() in up:
            return name
    raise UserError(
        f"kernel measurements: device {device_name!r} is not a GPU kind widep knows. "
        "Valid: a device whose name holds one of the kinds of widep/spec/presets/gpus.yaml (H100, H200, ...)."
    )


def read_deepgemm(path: str | Path, dispatch_us: float | None = None) -> list[GemmRow]:
    """Rows of a DeepGEMM measurement file: ``widep-deepgemm/1`` (profiling/gpu/deepgemm_bench.py), the earlier
    ``widep-turn3-deepgemm/1`` run, or ``deep_kernels_bench.py`` output (eager single calls: ``dispatch_us`` is
    subtracted)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--kernels: cannot read {str(p)!r}: {err}") from None
    src = p.name
    card = _card_of(str(doc.get("device_name", "")))
    out: list[GemmRow] = []
    if doc.get("format") in DEEPGEMM_FORMATS:
        for r in doc.get("rows", []):
            out.append(
                GemmRow(
                    card=card,
                    layout=r["kind"],
                    gemm=r["gemm"],
                    groups=int(r["groups"]),
                    m=float(r["total_rows"]) / int(r["groups"]),
                    n=int(r["n"]),
                    k=int(r["k"]),
                    us=float(r["graph"]["median_us"]),
                    timing="graph",
                    source=src,
                    single_us=float(r["single"]["median_us"]),
                )
            )
        return out
    if "gemm_masked" in doc or "gemm_contiguous" in doc:
        if dispatch_us is None:
            raise UserError(f"--kernels: {src} holds eager single calls; give the dispatch cost to subtract.")
        for layout, key in (("masked", "gemm_masked"), ("contiguous", "gemm_contiguous")):
            for r in (doc.get(key) or {}).get("rows", []):
                g = int(r["groups"])
                m = float(r.get("total_rows", g * r["rows_per_expert"])) / g
                out.append(
                    GemmRow(
                        card=card,
                        layout=layout,
                        gemm="gate_up" if int(r["k"]) > int(r["n"]) else "down",
                        groups=g,
                        m=m,
                        n=int(r["n"]),
                        k=int(r["k"]),
                        us=float(r["median_us"]) - dispatch_us,
                        timing="single-minus-dispatch",
                        source=src,
                        single_us=float(r["median_us"]),
                    )
                )
        return out
    raise UserError(
        f"--kernels: {src} has format {doc.get('format')!r}. Valid: {', '.join(DEEPGEMM_FORMATS)} "
        "(profiling/gpu/deepgemm_bench.py) or profiling/gpu/deep_kernels_bench.py output."
    )


def measured_dispatch_us(rows: Sequence[GemmRow]) -> float:
    """Median eager-call cost over graph replay of the masked rows timed both ways."""
    d = [r.single_us - r.us for r in rows if r.timing == "graph" and r.single_us and r.layout == "masked"]
    if not d:
        raise UserError("--kernels: no row was timed both eagerly and in a CUDA graph, so no dispatch cost.")
    return float(np.median(d))


@dataclass(frozen=True)
class PhaseRow:
    card: str
    phase: str
    """Model phase (the bench's ``regroup`` is ``permute``)."""
    tokens: int
    rows: int
    ep: int
    us: float
    source: str


def read_moe_layer(path: str | Path) -> list[PhaseRow]:
    """Non-GEMM phases of ``profiling/gpu/moe_layer_bench.py`` runs (route, regroup -> permute, reduce)."""
    p = Path(path)
    doc = json.loads(p.read_text())
    meta = doc.get("meta") or {}
    card = _card_of(str(meta.get("device_name") or doc.get("device_name") or meta.get("gpu") or ""))
    cfg = doc.get("config") or {}
    topk = int(cfg.get("topk", 8))
    ep = int(meta.get("world_size") or cfg.get("ep") or doc.get("ep") or 0)
    out = []
    for r in doc.get("results", []):
        for bench, phase in (("route", "route"), ("regroup", "permute"), ("reduce", "reduce")):
            ph = (r.get("phases") or {}).get(bench)
            if ph:
                t = int(r["tokens"])
                out.append(PhaseRow(card, phase, t, t * topk, ep, float(ph["median_us"]), p.name))
    return out


# ------------------------------------------------------------------------------------------------- fitting

R1_HIDDEN, R1_INTER, R1_EXPERTS = 7168.0, 2048.0, 256.0


def _gpu(card: str) -> Any:
    from widep.spec.hardware import get_gpu

    return get_gpu(card)


def predict_gemm_us(eg: ExpertGemm, r: GemmRow) -> float:
    g = _gpu(r.card)
    t, _, _, _ = gemm_seconds(
        eg, r.gemm, r.layout == "masked", r.groups, r.m, r.n, r.k, g.hbm_tbps * 1e12, g.sms, g.fp8_tflops * 1e12
    )
    return float(t) * 1e6


def _coordinate_search(x0: np.ndarray, lo: np.ndarray, hi: np.ndarray, loss: Any, rounds: int = 200) -> np.ndarray:
    """Bounded coordinate search in log space (multiplicative steps shrinking from 20% to 0.1%)."""
    x = x0.copy()
    best = loss(x)
    step = 0.2
    while step > 1e-3 and rounds > 0:
        rounds -= 1
        moved = False
        for i in range(len(x)):
            for f in (1.0 + step, 1.0 / (1.0 + step)):
                y = x.copy()
                y[i] = min(max(x[i] * f, lo[i]), hi[i])
                v = loss(y)
                if v < best - 1e-12:
                    x, best, moved = y, v, True
        if not moved:
            step /= 2.0
    return x


def fit_expert_gemm(
    rows: Sequence[GemmRow], dispatch_us: float, block_m: int = 64, roofline_p: float | None = 2.0
) -> ExpertGemm:
    """Efficiencies of both GEMMs minimising the squared log error over ``rows``; the roofline corner is the model's
    p = 2 (a free p fits these rows no better: 2.04) unless ``roofline_p`` is None (fitted too)."""
    if not rows:
        raise UserError("--kernels: no DeepGEMM rows to fit.")
    names = ("hbm_efficiency", "sm_stream_gbps", "compute_masked", "compute_contiguous")
    lo = np.array([0.2, 2.0, 0.05, 0.05] * 2 + [1.0])
    hi = np.array([1.0, 60.0, 1.0, 1.0] * 2 + [16.0])
    x0 = np.array([0.8, 22.0, 0.55, 0.6] * 2 + [3.0])
    if roofline_p is not None:
        lo[8] = hi[8] = x0[8] = roofline_p
    has = {(r.gemm, r.layout) for r in rows}

    def build(x: np.ndarray) -> ExpertGemm:
        ge = {
            g: GemmEff(**dict(zip(names, map(float, x[4 * i : 4 * i + 4]), strict=True))) for i, g in enumerate(GEMMS)
        }
        return ExpertGemm(ge["gate_up"], ge["down"], block_m, float(x[8]), dispatch_us)

    meas = np.array([r.us for r in rows])

    def loss(x: np.ndarray) -> float:
        eg = build(x)
        pred = np.array([predict_gemm_us(eg, r) for r in rows])
        return float(np.sum(np.log(pred / meas) ** 2))

    x = _coordinate_search(x0, lo, hi, loss)
    eg = build(x)
    for g in GEMMS:  # a layout no row measured keeps the other layout's compute efficiency
        e = eg.of(g)
        if (g, "contiguous") not in has:
            eg = replace(eg, **{g: replace(e, compute_contiguous=e.compute_masked)})
        elif (g, "masked") not in has:
            eg = replace(eg, **{g: replace(e, compute_masked=e.compute_contiguous)})
    return eg


def fit_moe_phases(rows: Sequence[PhaseRow], base: MoePhases | None = None) -> MoePhases:
    """Floor and streaming efficiency of each measured phase (the others keep ``base``'s)."""
    if not rows:
        raise UserError("--kernels: no MoE-layer phase rows to fit.")
    card = rows[0].card
    hbm = _gpu(card).hbm_tbps * 1e12
    fitted: dict[str, PhaseCost] = {}
    for phase in PHASES:
        sel = [r for r in rows if r.phase == phase]
        if not sel:
            continue
        meas = np.array([r.us for r in sel])
        byts = np.array([phase_bytes(phase, r.tokens, r.rows, R1_HIDDEN, R1_INTER, R1_EXPERTS) for r in sel])

        def loss(x: np.ndarray, meas: np.ndarray = meas, byts: np.ndarray = byts) -> float:
            pred = x[0] + byts / (hbm * x[1]) * 1e6
            return float(np.sum(np.log(pred / meas) ** 2))

        x = _coordinate_search(np.array([meas.min() * 0.5, 0.2]), np.array([0.1, 0.005]), np.array([1e5, 1.0]), loss)
        fitted[phase] = PhaseCost(float(x[0]), float(x[1]))
    if base is None:
        if "permute" not in fitted:
            raise UserError("--kernels: the MoE-layer rows have no permute (regroup) phase to fit.")
        # act streams like permute (both elementwise over the received rows) [assumption]
        fitted.setdefault("act", fitted["permute"])
        for phase in PHASES:
            fitted.setdefault(phase, PhaseCost(0.0, 0.5))
        return MoePhases(**fitted, card=card, source=", ".join(sorted({r.source for r in rows})))
    return replace(base, **fitted, card=card, source=", ".join(sorted({r.source for r in rows})))


# ------------------------------------------------------------------------------------------------- fidelity


def gemm_fidelity(eg: ExpertGemm, rows: Sequence[GemmRow]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        pred = predict_gemm_us(eg, r)
        out.append(
            {
                "card": r.card,
                "layout": r.layout,
                "gemm": r.gemm,
                "groups": r.groups,
                "rows_per_expert": round(r.m, 1),
                "measured_us": round(r.us, 2),
                "predicted_us": round(pred, 2),
                "error_pct": round(100.0 * (pred / r.us - 1.0), 2),
                "timing": r.timing,
                "source": r.source,
            }
        )
    return out


def phase_fidelity(mp: MoePhases, rows: Sequence[PhaseRow]) -> list[dict[str, Any]]:
    """Per phase and per layer (sum of its measured non-GEMM phases) predicted vs measured."""
    out = []
    by_layer: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
    for r in rows:
        g = _gpu(r.card)
        pred = (
            float(phase_seconds(mp, r.phase, r.tokens, r.rows, R1_HIDDEN, R1_INTER, R1_EXPERTS, g.hbm_tbps * 1e12))
            * 1e6
        )
        out.append(
            {
                "card": r.card,
                "ep": r.ep,
                "tokens": r.tokens,
                "phase": r.phase,
                "measured_us": round(r.us, 1),
                "predicted_us": round(pred, 1),
                "error_pct": round(100.0 * (pred / r.us - 1.0), 1),
                "source": r.source,
            }
        )
        by_layer.setdefault((r.source, r.ep, r.tokens), []).append((r.us, pred))
    for (src, ep, t), v in sorted(by_layer.items()):
        meas, pred = sum(x[0] for x in v), sum(x[1] for x in v)
        out.append(
            {
                "card": rows[0].card,
                "ep": ep,
                "tokens": t,
                "phase": "layer",
                "measured_us": round(meas, 1),
                "predicted_us": round(pred, 1),
                "error_pct": round(100.0 * (pred / meas - 1.0), 1),
                "source": src,
            }
        )
    return out


# ------------------------------------------------------------------------------------------------- documents


def expert_gemm_doc(eg: ExpertGemm) -> dict[str, Any]:
    def eff(e: GemmEff) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in e.__dict__.items()}

    return {
        "card": eg.card,
        "source": eg.source,
        "block_m": eg.block_m,
        "roofline_p": round(eg.roofline_p, 4),
        "dispatch_us": round(eg.dispatch_us, 2),
        "gate_up": eff(eg.gate_up),
        "down": eff(eg.down),
    }


def moe_phases_doc(mp: MoePhases) -> dict[str, Any]:
    d: dict[str, Any] = {"card": mp.card, "source": mp.source}
    for phase in PHASES:
        pc = mp.of(phase)
        d[phase] = {"floor_us": round(pc.floor_us, 2), "efficiency": round(pc.efficiency, 4)}
    return d


def _num(d: Any, key: str, where: str, lo: float, hi: float) -> float:
    v = d.get(key) if isinstance(d, dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= float(v) <= hi):
        raise UserError(f"calibration {where}.{key} must be a number in [{lo}, {hi}]. Given: {v!r}.")
    return float(v)


def parse_expert_gemm(d: Any, where: str) -> ExpertGemm | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise UserError(f"calibration {where} must be a mapping. Given: {d!r}.")

    def eff(g: str) -> GemmEff:
        e = d.get(g)
        w = f"{where}.{g}"
        return GemmEff(
            hbm_efficiency=_num(e, "hbm_efficiency", w, 1e-3, 1.0),
            sm_stream_gbps=_num(e, "sm_stream_gbps", w, 1e-3, 1e4),
            compute_masked=_num(e, "compute_masked", w, 1e-3, 1.0),
            compute_contiguous=_num(e, "compute_contiguous", w, 1e-3, 1.0),
        )

    return ExpertGemm(
        gate_up=eff("gate_up"),
        down=eff("down"),
        block_m=int(_num(d, "block_m", where, 1, 1024)),
        roofline_p=_num(d, "roofline_p", where, 1.0, 64.0),
        dispatch_us=_num(d, "dispatch_us", where, 0.0, 1e4),
        card=str(d.get("card", "")),
        source=str(d.get("source", "")),
    )


def parse_moe_phases(d: Any, where: str) -> MoePhases | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise UserError(f"calibration {where} must be a mapping. Given: {d!r}.")

    def pc(phase: str) -> PhaseCost:
        e = d.get(phase)
        w = f"{where}.{phase}"
        return PhaseCost(
            floor_us=_num(e, "floor_us", w, 0.0, 1e6),
            efficiency=_num(e, "efficiency", w, 1e-4, 1.0),
        )

    return MoePhases(**{p: pc(p) for p in PHASES}, card=str(d.get("card", "")), source=str(d.get("source", "")))


def kernel_summary(rows: Sequence[dict[str, Any]], bound: float) -> dict[str, Any]:
    errs = [abs(r["error_pct"]) for r in rows]
    return {"rows": len(rows), "max_abs_pct": max(errs) if errs else math.nan, "within": all(e <= bound for e in errs)}
