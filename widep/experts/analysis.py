"""Pure arithmetic on an expert-load record: per-rank load, balancedness, hottest experts, EPLB replay.

Balancedness of one MoE layer is ``mean(tokens per EP rank) / max(tokens per EP rank)`` over the EP ranks of
that layer (1.0 = perfectly even; 1/EP = one rank takes everything). A rank's tokens are the sum over the
physical expert slots it holds of that logical expert's count divided by the number of replicas the expert
has (redundant replicas split an expert's load evenly). The file's figure is the mean of the per-layer values;
the worst layer is reported too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from widep.experts.load import ExpertLoad


def counts_array(load: ExpertLoad) -> np.ndarray:
    return np.asarray(load.counts, dtype=float)


def placement_from_plan(rp: Any) -> np.ndarray:
    """Logical expert of each physical slot, in EP-rank order (GPU g holds slots [g*S, (g+1)*S)), from one
    replica of a planned role (the plan's rank -> expert map; a DP rank of TP GPUs holds TP x S slots)."""
    slots: list[int] = []
    for rank in rp.ranks:
        if rank.replica == 0:
            slots.extend(rank.experts)
    return np.asarray(slots, dtype=int)


def rank_loads(counts: np.ndarray, phy2log: np.ndarray, ep: int) -> np.ndarray:
    """Tokens per EP rank, per layer: [layers, ep]. ``phy2log`` is [physical] (same every layer) or [layers,
    physical]; every physical slot takes count / (replicas of its logical expert)."""
    L, E = counts.shape
    p2l = np.broadcast_to(phy2log, (L, phy2log.shape[-1])) if phy2log.ndim == 1 else phy2log
    P = p2l.shape[1]
    if P % ep:
        raise ValueError(f"{P} physical experts do not split over EP={ep}")
    replicas = np.zeros((L, E))
    for li in range(L):
        replicas[li] = np.bincount(p2l[li], minlength=E)
    if (replicas == 0).any():
        raise ValueError("a logical expert has no physical slot")
    per_slot = np.take_along_axis(counts, p2l, axis=1) / np.take_along_axis(replicas, p2l, axis=1)
    return per_slot.reshape(L, ep, P // ep).sum(axis=2)


def balancedness(loads: np.ndarray) -> np.ndarray:
    """mean / max tokens per rank, per layer (a layer with no tokens counts as balanced)."""
    mx = loads.max(axis=1)
    return np.where(mx > 0, loads.mean(axis=1) / np.where(mx > 0, mx, 1.0), 1.0)


def hottest(counts: np.ndarray, n: int = 5) -> list[dict[str, Any]]:
    """The n (layer, expert) pairs with the largest share of their layer's tokens."""
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12)
    flat = np.argsort(-share, axis=None)[:n]
    out = []
    for idx in flat:
        li, ei = np.unravel_index(idx, share.shape)
        out.append(
            {
                "layer": int(li),
                "expert": int(ei),
                "tokens": float(counts[li, ei]),
                "share_of_layer": round(float(share[li, ei]), 4),
                "times_mean": round(float(share[li, ei] * counts.shape[1]), 3),
            }
        )
    return out


@dataclass(frozen=True)
class Balance:
    mean: float
    worst: float
    worst_layer: int
    per_layer: tuple[float, ...]

    def as_dict(self, with_layers: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "balancedness": round(self.mean, 4),
            "worst_layer_balancedness": round(self.worst, 4),
            "worst_layer": self.worst_layer,
        }
        if with_layers:
            d["per_layer"] = [round(b, 4) for b in self.per_layer]
        return d


def balance_of(counts: np.ndarray, phy2log: np.ndarray, ep: int) -> Balance:
    b = balancedness(rank_loads(counts, phy2log, ep))
    return Balance(float(b.mean()), float(b.min()), int(b.argmin()), tuple(float(x) for x in b))


# ---------------------------------------------------------------------------------------------------------
# EPLB placement

EPLB_SOURCE_VLLM = "vllm.distributed.eplb.policy.default.DefaultEplbPolicy.rebalance_experts"


def eplb_placement(counts: np.ndarray, num_physical: int, ep: int, nodes: int = 1) -> tuple[np.ndarray, str]:
    """(phy2log [layers, physical], which algorithm) from vLLM's own EPLB rebalancing of the installed vLLM.

    Called with num_groups=1 (the global policy: widep does not know the model's expert groups, and vLLM falls
    back to the global policy whenever groups do not split over nodes). Without an importable vLLM, a faithful
    re-implementation of the same DeepSeek EPLB steps is used (replicate the expert with the highest load per
    replica, then greedy balanced packing of equal-count packs) and the source string says so.
    """
    try:
        import torch
        from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
    except Exception as err:  # any import failure falls back; the reason is reported
        return _own_eplb(counts, num_physical, ep), f"widep's re-implementation (vLLM not importable: {err})"
    p2l = DefaultEplbPolicy.rebalance_experts(torch.from_numpy(counts.astype(np.float32)), num_physical, 1, 1, ep)
    return np.asarray(p2l.numpy(), dtype=int), EPLB_SOURCE_VLLM


def _own_eplb(counts: np.ndarray, num_physical: int, ep: int) -> np.ndarray:
    L, E = counts.shape
    per = num_physical // ep
    out = np.zeros((L, num_physical), dtype=int)
    for li in range(L):
        w = counts[li]
        logcnt = np.ones(E)
        phy = list(range(E))
        for _ in range(num_physical - E):
            e = int(np.argmax(w / logcnt))
            phy.append(e)
            logcnt[e] += 1
        loads = np.asarray([w[e] / logcnt[e] for e in phy])
        order = np.argsort(-loads, kind="stable")
        pack_w, pack_n = np.zeros(ep), np.zeros(ep, dtype=int)
        packs: list[list[int]] = [[] for _ in range(ep)]
        for i in order:
            cand = [p for p in range(ep) if pack_n[p] < per]
            p = min(cand, key=lambda k: pack_w[k])
            packs[p].append(phy[i])
            pack_w[p] += loads[i]
            pack_n[p] += 1
        out[li] = [e for pk in packs for e in pk]
    return out


def static_placement(num_logical: int, num_physical: int) -> np.ndarray:
    """vLLM's placement without rebalancing: 0..E-1 then i % E for redundant slots (widep.plan.expert_slots)."""
    return np.asarray(list(range(num_logical)) + [i % num_logical for i in range(num_physical - num_logical)])


def layer_rank_matrix(counts: np.ndarray, phy2log: np.ndarray, ep: int) -> np.ndarray:
    return rank_loads(counts, phy2log, ep)


def summarize(load: ExpertLoad, phy2log: Sequence[int] | np.ndarray | None, ep: int | None) -> dict[str, Any]:
    """The ``widep experts show --json`` object (ranks only with a placement)."""
    c = counts_array(load)
    share = c / np.maximum(c.sum(axis=1, keepdims=True), 1e-12)
    d: dict[str, Any] = {
        "model": load.model,
        "layers": load.layers,
        "experts": load.experts,
        "tokens": load.tokens,
        "source": load.source,
        "routed_tokens": float(c.sum()),
        "expert_max_over_mean": round(float((share.max(axis=1) * load.experts).mean()), 4),
        "hottest": hottest(c),
        "formula": "per layer: mean(tokens per EP rank) / max(tokens per EP rank); file value = mean over layers",
    }
    if phy2log is not None and ep:
        bal = balance_of(c, np.asarray(phy2log), ep)
        d["ep_ranks"] = ep
        d.update(bal.as_dict())
        d["rank_tokens"] = [[round(float(x), 3) for x in row] for row in rank_loads(c, np.asarray(phy2log), ep)]
    return d
