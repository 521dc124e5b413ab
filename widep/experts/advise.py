"""EPLB advice: replay a recorded expert load through vLLM's EPLB placement for a range of redundant-expert
counts, and price each candidate (balancedness, memory per GPU, KV tokens lost, predicted decode throughput).

Memory per candidate, relative to EPLB off with no redundant experts, per GPU:

* expert weights: ``redundant / EP`` more expert slots per GPU x MoE layers x one expert's bytes
  (widep.plan.memory.weight_bytes, the plan's memory model);
* DeepEP low-latency (and the other per-expert-slot backends): the receive buffer is
  ``2 x (physical experts + 1) x max tokens per rank x (2 x hidden + 16)`` bytes, so it grows with every physical
  expert; DeepEP caps it at :data:`LL_BUFFER_CAP_GIB` and, past the cap, the tokens per rank it can take (and so
  the batch per rank) shrink to what fits.

Every byte of extra memory comes out of the KV cache (``kv_tokens_lost`` = extra bytes / KV bytes per token,
rounded to KV blocks). The predicted tokens/s per GPU comes from widep's perf model at the full batch
(max_num_seqs per rank, or what the buffer cap allows, or what the KV cache holds) with the measured skew
``1 / balancedness - 1`` in place of the calibration's routing skew.

The recommendation weighs that throughput only where the perf model is calibrated: on vLLM's CPU backend its
figures are GPU kernel tables applied to a placeholder CPU datasheet (it predicts ~2.7 ms per decode step for the
tiny MoE, where CPU vLLM takes tens of ms), so there the pick is made on balancedness and memory alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from widep.errors import UserError
from widep.experts.analysis import balance_of, counts_array, eplb_placement, static_placement
from widep.experts.load import ExpertLoad, check_against_arch
from widep.plan.memory import GIB, LL_BACKENDS, LL_BUFFER_CAP_GIB, ll_buffer, weight_bytes

BALANCED_ENOUGH = 0.95
"""At or above this balancedness without EPLB, the load is called balanced and EPLB stays off."""
MIN_GAIN = 0.02
"""EPLB must predict at least this much more throughput per GPU than EPLB off to be recommended."""
MAX_CANDIDATES = 16


def pick_role(p: Any, role: str | None) -> Any:
    ep_roles = [rp for rp in p.roles if rp.spec.expert_parallel and rp.ep_size > 1]
    if role is not None:
        for rp in p.roles:
            if rp.name == role:
                return rp
        raise UserError(f"--role: no role named {role!r}. Valid: {', '.join(rp.name for rp in p.roles)}.")
    if not ep_roles:
        raise UserError("topology: no role runs expert parallel with EP > 1; EPLB has nothing to place.")
    dec = [rp for rp in ep_roles if rp.kind in ("decode", "mixed")]
    return (dec or ep_roles)[0]


def advise(load: ExpertLoad, p: Any, *, role: str | None = None, calibration: str = "published") -> dict[str, Any]:
    """The ``widep experts advise --json`` object for a planned topology (pure)."""
    arch = p.arch
    check_against_arch(load, arch)
    rp = pick_role(p, role)
    ep, E = rp.ep_size, arch.routed_experts
    if not (rp.spec.expert_parallel and ep > 1):
        raise UserError(f"--role: role {rp.name!r} has EP={ep}; EPLB needs expert parallel with EP > 1.")
    counts = counts_array(load)
    mem = rp.memory
    backend = rp.all2all_backend
    mns = rp.spec.max_num_seqs
    block = mem.block_tokens
    kv_per_tok = mem.kv_bytes_per_token

    def expert_bytes(R: int) -> float:
        return weight_bytes(arch, p.weight_dtype, rp.tp_size, (E + R) / ep)[1]

    def buffer(R: int) -> tuple[float, int]:
        if backend in LL_BACKENDS:
            return ll_buffer(E + R, arch.hidden, mns)
        return 0.0, mns

    R_cur = rp.redundant_experts
    base_extra = expert_bytes(R_cur) - expert_bytes(0) + buffer(R_cur)[0] - buffer(0)[0]
    kv_tokens_at_zero = mem.kv_tokens + int(base_extra // kv_per_tok) // block * block

    cal = _calibration(calibration)
    step = ep // math.gcd(E, ep) if E % ep else ep
    first = (-E) % ep
    candidates: list[dict[str, Any]] = []
    sources: set[str] = set()
    options: list[tuple[bool, int]] = [(False, 0)] + [(True, first + i * step) for i in range(MAX_CANDIDATES)]
    stopped = None
    for eplb_on, R in options:
        if R > E:
            stopped = f"redundant experts stop at {E} (every expert replicated once)"
            break
        extra = expert_bytes(R) - expert_bytes(0) + buffer(R)[0] - buffer(0)[0]
        lost = math.ceil(extra / kv_per_tok / block) * block if extra > 0 else 0
        kv_left = kv_tokens_at_zero - lost
        if kv_left < rp.max_model_len:
            stopped = f"{R} redundant experts leave {kv_left} KV tokens per GPU, below max_model_len={rp.max_model_len}"
            break
        if eplb_on:
            p2l, src = eplb_placement(counts, E + R, ep, rp.nodes_per_group)
            sources.add(src)
        else:
            p2l = static_placement(E, E)
        bal = balance_of(counts, p2l, ep)
        buf_b, usable = buffer(R)
        tps = _predict(
            p,
            rp,
            cal,
            skew=1.0 / max(bal.mean, 1e-9) - 1.0,
            kv_tokens=kv_left,
            max_num_seqs=usable,
            eplb=eplb_on,
            redundant=R,
        )
        candidates.append(
            {
                "eplb_enabled": eplb_on,
                "redundant_experts": R,
                "experts_per_gpu": (E + R) // ep,
                "balancedness": round(bal.mean, 4),
                "worst_layer_balancedness": round(bal.worst, 4),
                "extra_memory_gib_per_gpu": round(extra / GIB, 3),
                "extra_expert_weights_gib_per_gpu": round((expert_bytes(R) - expert_bytes(0)) / GIB, 3),
                "all2all_buffer_gib_per_gpu": round(buf_b / GIB, 3),
                "buffer_tokens_per_rank": usable,
                "buffer_capped": usable < mns,
                "kv_tokens_lost": lost,
                "kv_tokens_per_gpu": kv_left,
                "predicted_tps_per_gpu": None if tps is None else round(tps, 2),
            }
        )
    rec = _recommend(candidates, rp, use_tps=p.gpu.device != "cpu")
    return {
        "model": arch.name,
        "topology": p.spec.name,
        "role": rp.name,
        "ep_size": ep,
        "all2all_backend": backend,
        "algorithm": sorted(sources)[0] if sources else EPLB_NOT_RUN,
        "ll_buffer_cap_gib": LL_BUFFER_CAP_GIB if backend in LL_BACKENDS else None,
        "candidates_stop": stopped or f"{MAX_CANDIDATES} candidates",
        "candidates": candidates,
        "recommendation": rec,
        "eplb": {
            "enabled": rec["eplb_enabled"],
            "redundant_experts": rec["redundant_experts"],
            "window_size": rp.spec.eplb.window_size,
            "step_interval": rp.spec.eplb.step_interval,
            "log_balancedness": rec["eplb_enabled"],
        },
        "cpu_note": (
            "vLLM's CPU backend refuses EPLB: apply these settings on a GPU deployment."
            if p.gpu.device == "cpu"
            else None
        ),
    }


EPLB_NOT_RUN = "none (no EPLB candidate fits)"


def measured_skews(path: str, p: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(perf-model role overrides, what was measured per role) from an expert-load file for ``widep predict``.

    Each EP role's skew is ``1 / balancedness - 1`` of the recorded load over its EP ranks: the static placement
    of the plan without EPLB, vLLM's EPLB placement (with the role's redundant experts) with EPLB on.
    """
    from widep.experts.analysis import placement_from_plan
    from widep.experts.load import read_expert_load

    load = read_expert_load(path)
    check_against_arch(load, p.arch, path)
    counts = counts_array(load)
    overrides: dict[str, dict[str, Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    for rp in p.roles:
        if not (rp.spec.expert_parallel and rp.ep_size > 1):
            continue
        if rp.spec.eplb.enabled:
            p2l, src = eplb_placement(counts, rp.physical_experts, rp.ep_size, rp.nodes_per_group)
        else:
            p2l, src = placement_from_plan(rp), "plan (static, no EPLB)"
        bal = balance_of(counts, p2l, rp.ep_size)
        skew = 1.0 / max(bal.mean, 1e-9) - 1.0
        overrides[rp.name] = {"skew": skew}
        info[rp.name] = {"balancedness": round(bal.mean, 4), "skew": round(skew, 4), "placement": src}
    if not overrides:
        raise UserError("--expert-load: no role of this topology runs expert parallel with EP > 1.")
    return overrides, info


def _calibration(name: str) -> Any:
    from widep.perf.calibration import load_calibration

    return load_calibration(name)


def _predict(p: Any, rp: Any, cal: Any, **over: Any) -> float | None:
    """Decode tokens/s per GPU at the full batch with the measured skew (None where the perf model refuses)."""
    from widep.perf.model import Workload, predict_plan

    over["physical_experts"] = p.arch.routed_experts + over["redundant"]
    batch = max(1, min(over["max_num_seqs"], over["kv_tokens"] // max(rp.memory.context_len, 1)))
    conc = float(batch * rp.dp_size * rp.spec.replicas * len([r for r in p.roles if r.kind == rp.kind]))
    ctx = float(rp.memory.context_len)
    w = Workload(isl=max(1, int(ctx // 2)), osl=max(1, int(ctx // 2)))
    try:
        _, levels = predict_plan(p, w, [conc], cal, saturation=False, role_overrides={rp.name: over})
    except (UserError, ValueError, ZeroDivisionError):
        return None
    v = levels[0].tps_gpu
    return None if v is None or not np.isfinite(v) else float(v)


def _recommend(cands: list[dict[str, Any]], rp: Any, use_tps: bool = True) -> dict[str, Any]:
    off = cands[0]
    on = cands[1:]
    if off["balancedness"] >= BALANCED_ENOUGH:
        return {
            "redundant_experts": 0,
            "eplb_enabled": False,
            "why": f"the load is already balanced without EPLB (balancedness {off['balancedness']:.3f} >= "
            f"{BALANCED_ENOUGH}); redundant experts would only take KV memory.",
        }
    if not on:
        return {"redundant_experts": 0, "eplb_enabled": False, "why": "no EPLB candidate fits in memory."}
    have_tps = (
        use_tps and off["predicted_tps_per_gpu"] is not None and all(c["predicted_tps_per_gpu"] is not None for c in on)
    )
    if have_tps:
        best = max(on, key=lambda c: (c["predicted_tps_per_gpu"], -c["redundant_experts"]))
        gain = best["predicted_tps_per_gpu"] / max(off["predicted_tps_per_gpu"], 1e-9) - 1.0
        if gain < MIN_GAIN:
            return {
                "redundant_experts": 0,
                "eplb_enabled": False,
                "why": f"the best EPLB candidate ({best['redundant_experts']} redundant) predicts only "
                f"{100 * gain:+.1f}% tokens/s per GPU; memory is better spent on KV.",
            }
        return {
            "redundant_experts": best["redundant_experts"],
            "eplb_enabled": True,
            "why": f"balancedness {off['balancedness']:.3f} -> {best['balancedness']:.3f}, predicted tokens/s per GPU "
            f"{off['predicted_tps_per_gpu']:.1f} -> {best['predicted_tps_per_gpu']:.1f} ({100 * gain:+.1f}%) for "
            f"{best['extra_memory_gib_per_gpu']:.2f} GiB per GPU ({best['kv_tokens_lost']} KV tokens).",
        }
    # no (calibrated) throughput prediction (the perf model refuses this hardware, or it is CPU): the smallest
    # redundancy that gets within 0.01 of the best balancedness
    top = max(c["balancedness"] for c in on)
    best = min((c for c in on if c["balancedness"] >= top - 0.01), key=lambda c: c["redundant_experts"])
    return {
        "redundant_experts": best["redundant_experts"],
        "eplb_enabled": True,
        "why": f"balancedness {off['balancedness']:.3f} -> {best['balancedness']:.3f} for "
        f"{best['extra_memory_gib_per_gpu']:.2f} GiB per GPU ({best['kv_tokens_lost']} KV tokens); "
        + (
            "no throughput prediction for this hardware."
            if use_tps
            else "decided on balancedness: the perf model is not calibrated for CPU (its tok/s column is a guess)."
        ),
    }
