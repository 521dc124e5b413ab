"""Public operating points, the fit of the model's free terms, and leave-one-out errors (pure functions).

``widep/perf/data/operating-points.yaml`` lists every public point the model is fitted to or checked
against, each rebuilt as a widep topology. :func:`predict_point` reads the model at a point the way it
was published; :func:`fit` adjusts the free terms (:data:`FREE_TERMS`: the overlap efficiency of two
micro-batches and the correlation of expert choices within a sequence) to minimise the squared log error over
the fitted points by a bounded coordinate search; :func:`leave_one_out` refits without each point in turn and
predicts it. Two terms for four fitted points: everything else is published, measured or a stated assumption
(widep/perf/data/calibration-published.yaml), and host time per step is left to `widep calibrate`, which
fits it from measured runs of the deployment itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import yaml

from widep.errors import UserError
from widep.perf.calibration import Calibration

# term -> (lower bound, upper bound); all enter the fit in log space except where bounds include 0
FREE_TERMS: dict[str, tuple[float, float]] = {
    "overlap_efficiency": (0.05, 1.0),
    "routing_seq_corr": (0.0, 1.0),
}
# Where every fit starts, whatever the calibration it refits holds: a held-out fold must not inherit the
# full fit through the packaged calibration (a term that its remaining points do not move stays here).
PRIORS: dict[str, float] = {
    "overlap_efficiency": 0.5,  # half of what two micro-batches could hide
    "routing_seq_corr": 0.0,  # tokens route independently (the textbook balls-in-bins assumption)
}


@dataclass(frozen=True)
class OperatingPoint:
    id: str
    source: str
    engine: str
    metric: str
    published: float
    workload: dict[str, Any]
    topology: dict[str, Any]
    tps_user: float | None = None
    concurrency: float | None = None
    use: str = "fit"
    why: str = ""
    """Why a point is only checked, not fitted (``use: check``)."""


@lru_cache(maxsize=1)
def operating_points() -> tuple[OperatingPoint, ...]:
    """The packaged list of public operating points."""
    doc = yaml.safe_load((resources.files("widep.perf") / "data" / "operating-points.yaml").read_text())
    out = []
    for d in doc["points"]:
        topo = dict(d["topology"])
        topo.setdefault("name", d["id"])
        out.append(
            OperatingPoint(
                id=d["id"],
                source=d["source"],
                engine=d["engine"],
                metric=d["metric"],
                published=float(d["published"]),
                workload=dict(d["workload"]),
                topology=topo,
                tps_user=d.get("tps_user"),
                concurrency=d.get("concurrency"),
                use=d.get("use", "fit"),
                why=str(d.get("why", "")),
            )
        )
    return tuple(out)


@lru_cache(maxsize=32)
def _planned(point_id: str) -> Any:
    from widep.plan.core import plan
    from widep.spec.topology import parse_topology

    pt = next(p for p in operating_points() if p.id == point_id)
    return plan(parse_topology(pt.topology, pt.id))


def predict_point(pt: OperatingPoint, cal: Calibration) -> dict[str, Any]:
    """The model read at a published point: {'predicted': value, 'batch': ..., 'breakdown': ...}."""
    from widep.perf.model import (
        ArchConst,
        RoleBatch,
        Workload,
        role_input_from_plan,
        serve_decode_only,
        serve_prefill_only,
    )

    p = _planned(pt.id)
    arch = ArchConst.of(p.arch, p.weight_dtype, p.kv_dtype)
    roles = [replace(role_input_from_plan(r, p.gpu), engine=pt.engine) for r in p.roles]
    rb = RoleBatch.build(arch, roles, cal)
    wk = dict(pt.workload)
    # published serving figures are sustained averages: steady arrivals, not benchmark waves
    w = Workload(arrival="steady", **wk)
    ranks = float(rb.ranks[0, 0])
    if pt.metric == "prefill_tps_gpu":
        # a saturated prefill figure: prompts wait at every rank (four times what the ranks hold at once)
        per_rank = 4.0 * float(roles[0].max_num_batched_tokens) / max(w.isl_computed, 1.0)
        perf = serve_prefill_only(rb, cal, w, np.asarray([[per_rank * ranks]]))
        return {
            "predicted": float(perf.tps_gpu[0, 0]),
            "batch": float(perf.batch[0, 0]),
            "breakdown": perf.steps["prefill"].row(0, 0),
        }
    if pt.metric == "tps_gpu_at_concurrency":
        at = serve_decode_only(rb, cal, w, np.asarray([[float(pt.concurrency or 0.0)]]))
        if not at.batch[0, 0] >= 1.0:
            raise UserError(f"operating point {pt.id}: concurrency {pt.concurrency} gives no decode batch.")
        return {
            "predicted": float(at.tps_gpu[0, 0]),
            "batch": float(at.batch[0, 0]),
            "breakdown": at.steps["decode"].row(0, 0),
        }
    batches = np.unique(np.concatenate([np.arange(1.0, 64.0), np.geomspace(64.0, 4096.0, 120)]))
    perf = serve_decode_only(rb, cal, w, (batches * ranks)[None, :])
    b = perf.batch[0]
    live = b >= batches - 1e-9
    if not live.any():
        raise UserError(f"operating point {pt.id}: the deployment holds no decode batch (KV cache too small).")
    idx = np.flatnonzero(live)
    tg, tu = perf.tps_gpu[0, idx], perf.tps_user[0, idx]
    if pt.metric == "tps_gpu_saturated":
        j = int(idx[-1])
        return {
            "predicted": float(perf.tps_gpu[0, j]),
            "batch": float(b[j]),
            "breakdown": perf.steps["decode"].row(0, j),
        }
    if pt.metric == "tps_gpu_at_tps_user":
        target = float(pt.tps_user or 0.0)
        if tu[-1] <= target <= tu[0]:
            val = float(np.interp(target, tu[::-1], tg[::-1]))
            bat = float(np.interp(target, tu[::-1], b[idx][::-1]))
        else:  # users stay faster than the target up to the largest batch: that batch's throughput
            val, bat = float(tg[-1]), float(b[idx][-1])
        j = int(idx[int(np.argmin(np.abs(b[idx] - bat)))])
        return {"predicted": val, "batch": bat, "breakdown": perf.steps["decode"].row(0, j)}
    raise UserError(
        f"operating point {pt.id}: metric {pt.metric!r} is not known. "
        "Valid: tps_gpu_at_tps_user, tps_gpu_at_concurrency, tps_gpu_saturated, prefill_tps_gpu."
    )


def errors(points: Sequence[OperatingPoint], cal: Calibration) -> np.ndarray:
    """log(predicted / published) per point."""
    return np.asarray([math.log(predict_point(p, cal)["predicted"] / p.published) for p in points])


def fit(
    points: Sequence[OperatingPoint],
    cal: Calibration,
    terms: Sequence[str] = tuple(FREE_TERMS),
    rounds: int = 3,
    grid: int = 9,
) -> Calibration:
    """Coordinate search over the free terms (bounded grids that shrink each round) minimising sum of log errors²,
    from :data:`PRIORS`."""
    best = replace(cal, **{t: PRIORS[t] for t in terms})
    best_loss = float(np.sum(errors(points, best) ** 2))
    spans = {t: FREE_TERMS[t] for t in terms}
    for _ in range(rounds):
        for t in terms:
            lo, hi = spans[t]
            for v in np.linspace(lo, hi, grid):
                trial = replace(best, **{t: float(v)})
                loss = float(np.sum(errors(points, trial) ** 2))
                if loss < best_loss - 1e-12:
                    best, best_loss = trial, loss
            cur = getattr(best, t)
            half = (hi - lo) / 4.0
            blo, bhi = FREE_TERMS[t]
            spans[t] = (max(blo, cur - half), min(bhi, cur + half))
    return replace(
        best, name=f"{cal.name}+fit", description=f"{cal.description}; free terms fitted to {len(points)} public points"
    )


def leave_one_out(cal: Calibration, points: Sequence[OperatingPoint] | None = None) -> list[dict[str, Any]]:
    """For each point: refit on the others, predict it; also the in-sample prediction of the full fit."""
    pts = list(points or operating_points())
    fitted = [p for p in pts if p.use == "fit"]
    full = fit(fitted, cal)
    rows = []
    for p in pts:
        others = [q for q in fitted if q.id != p.id]
        held = fit(others, cal) if others else cal
        pred = predict_point(p, held)["predicted"]
        ins = predict_point(p, full)
        rows.append(
            {
                "id": p.id,
                "engine": p.engine,
                "metric": p.metric,
                "published": p.published,
                "predicted_fit": ins["predicted"],
                "predicted_loo": pred,
                "error_fit_pct": 100.0 * (ins["predicted"] / p.published - 1.0),
                "error_loo_pct": 100.0 * (pred / p.published - 1.0),
                "batch": ins["batch"],
                "use": p.use,
                "why": p.why,
                "source": p.source,
                "terms_loo": {t: round(getattr(held, t), 4) for t in FREE_TERMS},
            }
        )
    return rows
