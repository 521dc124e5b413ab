"""The sweep loop: items (enumerated candidates or topology files) -> an executor -> results on disk.

Layout of ``--out DIR`` (one directory per point, resumable, failures recorded):

    DIR/sweep.json                  what was swept: budget or files, workload, levels, executor key
    DIR/<item-id>/result.json       the candidate (roles, flags), status ok | infeasible | failed, the reason
                                    (the planner's message), one record per concurrency level
    DIR/<item-id>/topology.yaml     the topology file of a feasible candidate (widep plan/launch take it); for
                                    sweeps of more than ``topology_files_max`` items only for the ones asked
                                    for (the CLI: the frontier and the printed ranking), see write_topologies
    DIR/summary.csv, summary.json   one row per item, plus the Pareto frontier
    DIR/sweep-pareto.png/.svg ...   plots (a separate, read-only step: :func:`plot_sweep`)

Executors: anything with ``name``, ``key()`` (a JSON-able dict; a stored result is reused only when its
key matches) and ``run(items) -> iterator of ItemResult`` (results may come one at a time, so a slow
executor's finished points are on disk before the next starts). :class:`PredictExecutor` scores all
items at once with the vectorised model. A measuring executor (launch, bench, tear down per item) plugs
in the same way: give it to :func:`run_sweep`; its ``run`` must yield a ``failed`` result (with the
error) rather than raise, and tear down before yielding.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from widep.errors import UserError
from widep.perf.calibration import Calibration
from widep.perf.enumerate import Candidate, check, planner_reason
from widep.perf.model import (
    BOUND_NAMES,
    LIMIT_NAMES,
    ArchConst,
    Perf,
    RoleBatch,
    RoleInput,
    Workload,
    role_input_from_plan,
    serve_decode_only,
    serve_mixed,
    serve_pd,
    serve_prefill_only,
)
from widep.spec.models import MoEArch, load_preset

RESULT_FORMAT = "widep-sweep-result/1"


@dataclass
class SweepItem:
    """One point of a sweep: a deployment, whether it can run, and what the model needs to score it."""

    id: str
    description: str
    mode: str
    """mixed, pd, decode-only, prefill-only."""
    gpus: int
    arch: MoEArch | None
    weight_dtype: str
    kv_dtype: str
    roles: tuple[RoleInput, ...]
    feasible: bool
    category: str = ""
    reason: str = ""
    source: str = ""
    """The topology file, or 'enumerated'."""
    candidate: Candidate | None = None
    topology_doc: Callable[[], dict[str, Any]] | None = None
    planner_message: Callable[[], str | None] | None = None

    def candidate_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "description": self.description,
            "mode": self.mode,
            "gpus": self.gpus,
            "source": self.source,
        }
        if self.candidate is not None:
            d |= self.candidate.as_dict()
        d["feasible"] = self.feasible
        if not self.feasible:
            d |= {"category": self.category, "reason": self.reason}
        return d


def items_from_candidates(cands: Sequence[Candidate]) -> list[SweepItem]:
    """Sweep items of enumerated candidates, with the fast feasibility verdict."""
    out = []
    for c in cands:
        v = check(c)
        arch = load_preset(c.model)
        kv = "fp8" if c.kv_cache_dtype == "fp8" else "bf16"
        out.append(
            SweepItem(
                id=c.id,
                description=c.describe(),
                mode=c.mode,
                gpus=c.gpus,
                arch=arch,
                weight_dtype=arch.default_weight_dtype,
                kv_dtype=kv,
                roles=v.roles,
                feasible=v.ok,
                category=v.category,
                reason=(f"{v.field}: {v.reason}" if not v.ok else ""),
                source="enumerated",
                candidate=c,
                topology_doc=c.topology_doc,
                planner_message=(lambda c=c: planner_reason(c)),
            )
        )
    return out


def items_from_topologies(paths: Sequence[str | Path]) -> list[SweepItem]:
    """Sweep items of topology files: planned (the planner's error makes an item infeasible)."""
    from widep.plan.core import plan
    from widep.spec.topology import load_topology

    out: list[SweepItem] = []
    seen: set[str] = set()
    for path in paths:
        p = Path(path)
        ident = p.stem
        while ident in seen:
            ident += "-2"
        seen.add(ident)
        spec = load_topology(p)  # an invalid file is the user's error: raise it
        try:
            pl = plan(spec)
        except UserError as err:
            out.append(
                SweepItem(
                    id=ident,
                    description=spec.description or spec.name,
                    mode="?",
                    gpus=0,
                    arch=None,
                    weight_dtype="",
                    kv_dtype="",
                    roles=(),
                    feasible=False,
                    category=_category_of(str(err)),
                    reason=str(err),
                    source=str(p),
                    topology_doc=lambda spec=spec: spec.model_dump(exclude_defaults=True),
                )
            )
            continue
        roles = tuple(role_input_from_plan(rp, pl.gpu) for rp in pl.roles)
        kinds = {r.kind for r in roles}
        mode = (
            "mixed" if kinds == {"mixed"} else "pd" if kinds == {"prefill", "decode"} else f"{next(iter(kinds))}-only"
        )
        desc = "; ".join(
            f"{rp.name} ({rp.kind}) DP{rp.dp_size}xTP{rp.tp_size}=EP{rp.ep_size} x{rp.spec.replicas}, "
            f"{rp.all2all_backend}"
            + (", DBO" if rp.spec.dbo.enabled else "")
            + (f", EPLB+{rp.redundant_experts}" if rp.spec.eplb.enabled else "")
            for rp in pl.roles
        )
        if len([r for r in roles if r.kind == "prefill"]) > 1 or len([r for r in roles if r.kind == "decode"]) > 1:
            out.append(
                SweepItem(
                    id=ident,
                    description=desc,
                    mode=mode,
                    gpus=pl.total_gpus,
                    arch=pl.arch,
                    weight_dtype=pl.weight_dtype,
                    kv_dtype=pl.kv_dtype,
                    roles=roles,
                    feasible=False,
                    category="config",
                    reason="the model predicts one prefill and one decode role per deployment",
                    source=str(p),
                )
            )
            continue
        out.append(
            SweepItem(
                id=ident,
                description=desc,
                mode=mode,
                gpus=pl.total_gpus,
                arch=pl.arch,
                weight_dtype=pl.weight_dtype,
                kv_dtype=pl.kv_dtype,
                roles=roles,
                feasible=True,
                source=str(p),
                topology_doc=lambda spec=spec: spec.model_dump(exclude_defaults=True),
            )
        )
    return out


def _category_of(msg: str) -> str:
    if ".gpu_memory_utilization:" in msg:
        return "memory"
    if ".max_model_len:" in msg:
        return "kv_cache"
    if "do not divide over EP" in msg:
        return "divisibility"
    return "config"


# ---------------------------------------------------------------------------------------------------------
# Results


LEVEL_FIELDS = (
    "concurrency",
    "batch_per_rank",
    "tps_gpu",
    "tps_user",
    "ttft_ms",
    "tpot_ms",
    "step_ms",
    "requests_per_s",
    "input_tps_gpu",
    "bound",
    "limit",
    "saturation",
)


class LevelBlock:
    """Level columns of many items as numpy matrices (one row per item): numbers as float (NaN: none),
    bound/limit as codes into ``names``, saturation as bool. Items point into it (:class:`LevelTable`)."""

    __slots__ = ("mats", "names")

    def __init__(self, mats: dict[str, np.ndarray], names: dict[str, Sequence[str]]) -> None:
        self.mats = mats
        self.names = names

    def values(self, field: str, row: int, idx: np.ndarray) -> list[Any]:
        a = self.mats[field][row, idx]
        if field in self.names:
            nm = self.names[field]
            return [nm[i] for i in a.tolist()]
        out = a.tolist()
        if a.dtype.kind == "f" and np.isnan(a).any():
            return [None if math.isnan(x) else x for x in out]
        return out


class LevelTable(Sequence[dict[str, Any]]):
    """One item's levels: a row of a :class:`LevelBlock` in level order; a dict per level is built only
    when asked for (a predicted sweep has 10^5 levels: dicts for all would cost more than the model)."""

    __slots__ = ("_sat", "block", "idx", "row", "sat_pos", "xy")

    def __init__(
        self, block: LevelBlock, row: int, idx: np.ndarray, xy: np.ndarray | None = None, sat_pos: int | None = None
    ) -> None:
        self.block = block
        self.row = row
        self.idx = idx
        self.sat_pos = sat_pos
        """Position of the saturation level, when known."""
        self._sat: dict[str, Any] | None = None
        self.xy = xy
        """Optional (3, len) float array of tokens/s/user (NaN: none), tokens/s/GPU, TTFT ms, in level order."""

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        if j == self.sat_pos and self._sat is not None:
            return dict(self._sat)
        col = int(self.idx[j])
        mats, names = self.block.mats, self.block.names
        out: dict[str, Any] = {}
        for f in LEVEL_FIELDS:
            v = mats[f][self.row, col].item()
            if f in names:
                v = names[f][v]
            elif isinstance(v, float) and math.isnan(v):
                v = None
            out[f] = v
        if j == self.sat_pos:  # asked for by the summary, the ranking and the tables: built once
            self._sat = dict(out)
        return out

    def column(self, name: str) -> list[Any]:
        return self.block.values(name, self.row, self.idx)


def _column(levels: Sequence[dict[str, Any]], name: str) -> list[Any]:
    if isinstance(levels, LevelTable):
        return levels.column(name)
    return [lv.get(name) for lv in levels]


@dataclass
class ItemResult:
    """What an executor found for one item."""

    id: str
    status: str
    """ok, infeasible or failed."""
    executor: str
    key: dict[str, Any]
    mode: str = ""
    gpus: int = 0
    description: str = ""
    category: str = ""
    reason: str = ""
    levels: Sequence[dict[str, Any]] = field(default_factory=list)
    """One record per concurrency: concurrency, tps_gpu, tps_user, ttft_ms, tpot_ms, batch_per_rank, ..."""

    def as_dict(self) -> dict[str, Any]:
        return {"format": RESULT_FORMAT} | self.__dict__ | {"levels": list(self.levels)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ItemResult:
        d = dict(d)
        d.pop("format", None)
        d.pop("candidate", None)
        return cls(**d)

    @property
    def saturation(self) -> dict[str, Any] | None:
        """The level flagged as saturation (else the one with the most tokens/s/GPU)."""
        if not self.levels:
            return None
        if isinstance(self.levels, LevelTable) and self.levels.sat_pos is not None:
            return self.levels[self.levels.sat_pos]
        flags = _column(self.levels, "saturation")
        if any(flags):
            return self.levels[flags.index(True)]
        tps = _column(self.levels, "tps_gpu")
        return self.levels[tps.index(max(tps))]

    def best(self, min_tps_user: float | None = None, max_ttft_ms: float | None = None) -> dict[str, Any] | None:
        """The level with the most tokens/s/GPU that meets the SLOs (None when none does)."""
        tps, user, ttft = (_column(self.levels, n) for n in ("tps_gpu", "tps_user", "ttft_ms"))
        ok = [
            j
            for j in range(len(tps))
            if (min_tps_user is None or (user[j] or 0.0) >= min_tps_user)
            and (max_ttft_ms is None or (ttft[j] is not None and ttft[j] <= max_ttft_ms))
        ]
        return self.levels[max(ok, key=lambda j: tps[j])] if ok else None


class Executor(Protocol):
    name: str

    def key(self) -> dict[str, Any]: ...

    def run(self, items: Sequence[SweepItem]) -> Iterator[ItemResult]: ...


class PredictExecutor:
    """Scores items with the analytic model, all at once (numpy), at each concurrency level.

    ``levels=None`` uses powers of two up to the largest capacity among the items. Each item also gets
    its saturation level (every rank at its largest batch), flagged ``saturation``.
    """

    name = "predict"
    columnar = True
    """Results go to one columnar file (see run_sweep), not one directory per point."""

    def __init__(self, cal: Calibration, workload: Workload, levels: Sequence[float] | None = None) -> None:
        self.cal = cal
        self.workload = workload
        self.levels = None if levels is None else sorted(set(float(x) for x in levels))
        if self.levels is not None and (not self.levels or self.levels[0] < 1):
            raise UserError(f"--concurrency: levels must be >= 1. Given: {levels}.")

    def key(self) -> dict[str, Any]:
        return {
            "executor": self.name,
            "calibration": self.cal.fingerprint(),
            "workload": self.workload.as_dict(),
            "levels": self.levels,
        }

    def run(self, items: Sequence[SweepItem]) -> Iterator[ItemResult]:
        key = self.key()
        for it in items:
            if not it.feasible:
                yield ItemResult(
                    id=it.id,
                    status="infeasible",
                    executor=self.name,
                    key=key,
                    mode=it.mode,
                    gpus=it.gpus,
                    description=it.description,
                    category=it.category,
                    reason=it.reason,
                )
        scored = self.score([it for it in items if it.feasible])
        for it, levels in scored:
            yield ItemResult(
                id=it.id,
                status="ok",
                executor=self.name,
                key=key,
                mode=it.mode,
                gpus=it.gpus,
                description=it.description,
                levels=levels,
            )

    # -- vectorised scoring -----------------------------------------------------------------------------
    def score_arrays(self, items: Sequence[SweepItem]) -> list[tuple[list[SweepItem], Perf, int]]:
        """Group items by (model, precision, mode); per group a Perf of shape (n, K+1); last column = saturation."""
        groups: dict[tuple[str, str, str, str], list[SweepItem]] = {}
        for it in items:
            assert it.arch is not None  # feasible items carry their architecture
            groups.setdefault((it.arch.name, it.weight_dtype, it.kv_dtype, it.mode), []).append(it)
        out = []
        w, cal = self.workload, self.cal
        for (_, wd, kd, mode), its in groups.items():
            arch = ArchConst.of(its[0].arch, wd, kd)  # type: ignore[arg-type]
            fn: Callable[[np.ndarray], Perf]
            if mode == "mixed":
                rb = RoleBatch.build(arch, [it.roles[0] for it in its], cal)
                fn = functools.partial(serve_mixed, rb, cal, w)
            elif mode == "pd":
                rp = RoleBatch.build(arch, [next(r for r in it.roles if r.kind == "prefill") for it in its], cal)
                rd = RoleBatch.build(arch, [next(r for r in it.roles if r.kind == "decode") for it in its], cal)
                fn = functools.partial(serve_pd, rp, rd, cal, w)
            elif mode == "decode-only":
                rd = RoleBatch.build(arch, [it.roles[0] for it in its], cal)
                fn = functools.partial(serve_decode_only, rd, cal, w)
            else:
                rp = RoleBatch.build(arch, [it.roles[0] for it in its], cal)
                fn = functools.partial(serve_prefill_only, rp, cal, w)
            cap = fn(np.ones((len(its), 1))).capacity[:, :1]
            if self.levels is None:
                top = max(1.0, float(np.max(cap)))
                lv = 2.0 ** np.arange(0, math.floor(math.log2(top)) + 1)
            else:
                lv = np.asarray(self.levels)
            C = np.concatenate([np.broadcast_to(lv, (len(its), len(lv))), np.maximum(cap, 1.0)], axis=1)
            out.append((its, fn(C), len(lv)))
        return out

    def score(self, items: Sequence[SweepItem]) -> list[tuple[SweepItem, Sequence[dict[str, Any]]]]:
        out: list[tuple[SweepItem, Sequence[dict[str, Any]]]] = []
        for its, perf, k in self.score_arrays(items):
            n, m = perf.tps_gpu.shape
            sat = np.zeros((n, m), bool)
            sat[:, k] = True
            conc = perf.concurrency
            # drop a requested level that equals the saturation level (keep the flagged one)
            dup = np.zeros((n, m), bool)
            dup[:, :k] = np.abs(conc[:, :k] - conc[:, k : k + 1]) < 1e-6
            mats = {
                "concurrency": np.round(conc, 4),
                "batch_per_rank": np.round(perf.batch, 4),
                "tps_gpu": np.round(perf.tps_gpu, 4),
                "tps_user": np.round(perf.tps_user, 4),
                "ttft_ms": np.round(perf.ttft * 1e3, 4),
                "tpot_ms": np.round(perf.tpot * 1e3, 4),
                "step_ms": np.round(perf.step * 1e3, 4),
                "requests_per_s": np.round(perf.requests_per_s, 4),
                "input_tps_gpu": np.round(perf.input_tps_gpu, 4),
                "bound": np.asarray(perf.bound, np.int64),
                "limit": np.asarray(perf.limit, np.int64),
                "saturation": sat,
            }
            mats = {k: np.broadcast_to(v, (n, m)) for k, v in mats.items()}
            block = LevelBlock(mats, {"bound": BOUND_NAMES, "limit": LIMIT_NAMES})
            order = np.argsort(conc, axis=1, kind="stable")
            xy = np.stack([mats["tps_user"], mats["tps_gpu"], mats["ttft_ms"]])
            xy = np.take_along_axis(xy, np.broadcast_to(order, xy.shape), axis=2)
            has_dup = dup.any(axis=1)
            for i, it in enumerate(its):
                oi = order[i]
                rows_xy = xy[:, i, :]
                if has_dup[i]:
                    keep = ~dup[i][oi]
                    oi = oi[keep]
                    rows_xy = rows_xy[:, keep]
                out.append((it, LevelTable(block, i, oi, rows_xy, int(np.flatnonzero(oi == k)[0]))))
        return out


# ---------------------------------------------------------------------------------------------------------
# The loop


def _write_json(path: Path, obj: Any, *, compact: bool = False) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(
        json.dumps(obj, separators=(",", ":"), default=str) if compact else json.dumps(obj, indent=1, default=str)
    )
    tmp.replace(path)


def write_topologies(items: Sequence[SweepItem], out: Path) -> list[Path]:
    """``topology.yaml`` in each item's directory (for items that have a topology)."""
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    written = []
    for it in items:
        if it.topology_doc is None:
            continue
        d = Path(out) / it.id
        d.mkdir(parents=True, exist_ok=True)
        p = d / "topology.yaml"
        p.write_text(yaml.dump(it.topology_doc(), sort_keys=False, Dumper=dumper))
        written.append(p)
    return written


RESULTS_FILE = "results.jsonl"
CHUNK_FORMAT = "widep-sweep-chunk/1"
ITEM_FIELDS = ("id", "status", "executor", "mode", "gpus", "description", "category", "reason")


_LEVEL_KINDS = {"bound": "str", "limit": "str", "saturation": "bool"}


def _pack(field: str, values: np.ndarray) -> dict[str, Any]:
    """A level column as compressed bytes: numbers as float64 (NaN: none), names and flags as codes."""
    import base64
    import zlib

    kind = _LEVEL_KINDS.get(field, "num")
    if kind == "str":
        vocab = sorted({v for v in values.tolist() if v is not None})
        code = {v: i for i, v in enumerate(vocab)}
        arr = np.asarray([code.get(v, 65535) for v in values.tolist()], np.uint16)
        extra: dict[str, Any] = {"vocab": vocab}
    elif kind == "bool":
        arr, extra = np.asarray(values, np.uint8), {"bool": True}
    else:
        arr, extra = np.asarray(values, np.float64), {}
    return {"dtype": arr.dtype.str, "data": base64.b64encode(zlib.compress(arr.tobytes(), 1)).decode()} | extra


def _unpack(col: dict[str, Any]) -> tuple[np.ndarray, list[str] | None]:
    """(array, names): numbers as float64, flags as bool, names as int codes into the returned vocabulary."""
    import base64
    import zlib

    arr = np.frombuffer(zlib.decompress(base64.b64decode(col["data"])), np.dtype(col["dtype"]))
    if "vocab" in col:
        vocab = list(col["vocab"]) + [None]
        return np.minimum(arr.astype(np.int64), len(vocab) - 1), vocab
    if col.get("bool"):
        return arr.astype(bool), None
    return arr.astype(np.float64), None


def _level_arrays(results: Sequence[ItemResult]) -> dict[str, np.ndarray]:
    """Every level of ``results`` (in order) as one flat array per field (codes for bound/limit, as names)."""
    parts: dict[str, list[np.ndarray]] = {f: [] for f in LEVEL_FIELDS}
    run: list[LevelTable] = []

    def flush_run() -> None:
        if not run:
            return
        blk = run[0].block
        m = next(iter(blk.mats.values())).shape[1]
        flat = np.concatenate([lt.row * m + np.asarray(lt.idx) for lt in run]) if run else np.zeros(0, int)
        for f in LEVEL_FIELDS:
            a = np.ascontiguousarray(blk.mats[f]).reshape(-1)[flat]
            if f in blk.names:
                a = np.asarray(blk.names[f], object)[a]
            parts[f].append(a)
        run.clear()

    for r in results:
        lv = r.levels
        if isinstance(lv, LevelTable):
            if run and run[0].block is not lv.block:
                flush_run()
            run.append(lv)
            continue
        flush_run()
        for f in LEVEL_FIELDS:
            vals = [x.get(f) for x in lv]
            if f in _LEVEL_KINDS:
                parts[f].append(np.asarray(vals, object if _LEVEL_KINDS[f] == "str" else bool))
            else:
                parts[f].append(np.asarray([np.nan if v is None else v for v in vals], float))
    flush_run()
    return {f: (np.concatenate(p) if p else np.zeros(0)) for f, p in parts.items()}


def _chunk_line(results: Sequence[ItemResult], key: dict[str, Any]) -> str:
    """One chunk of results as one JSON line: item columns, and level columns flattened and packed
    (``_pack``; ``n_levels`` per item says where each item's levels start)."""
    cols: dict[str, list[Any]] = {f: [getattr(r, f) for r in results] for f in ITEM_FIELDS}
    n_levels = [len(r.levels) for r in results]
    lv = _level_arrays(results)
    packed = {f: _pack(f, v) for f, v in lv.items()}
    return json.dumps(
        {"format": CHUNK_FORMAT, "key": key, "items": cols, "n_levels": n_levels, "levels": packed},
        separators=(",", ":"),
        default=str,
    )


def _read_chunks(path: Path) -> Iterator[tuple[dict[str, Any], list[ItemResult]]]:
    """(key, results) of every complete chunk line (a line cut short by a kill is skipped: recomputed)."""
    if not path.is_file():
        return
    with open(path) as fh:
        for line in fh:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(d, dict) or d.get("format") != CHUNK_FORMAT:
                continue
            items, counts = d["items"], d["n_levels"]
            mats, names = {}, {}
            for f in LEVEL_FIELDS:
                arr, vocab = _unpack(d["levels"][f])
                mats[f] = arr.reshape(1, -1)
                if vocab is not None:
                    names[f] = vocab
            block = LevelBlock(mats, names)
            xy = np.stack([mats["tps_user"][0], mats["tps_gpu"][0], mats["ttft_ms"][0]])
            res, at = [], 0
            for i, n in enumerate(counts):
                idx = np.arange(at, at + n)
                at += n
                fields = {f: items[f][i] for f in ITEM_FIELDS}
                flags = mats["saturation"][0, idx]
                sat = int(np.argmax(flags)) if flags.any() else None
                res.append(ItemResult(key=d["key"], levels=LevelTable(block, 0, idx, xy[:, idx], sat), **fields))
            yield d["key"], res


def run_sweep(
    items: Sequence[SweepItem],
    executor: Executor,
    out: Path | None = None,
    *,
    resume: bool = True,
    meta: dict[str, Any] | None = None,
    on_result: Callable[[ItemResult], None] | None = None,
    topology_files_max: int = 2000,
    chunk: int = 2048,
) -> list[ItemResult]:
    """Run ``executor`` over ``items``; with ``out``, reuse matching stored results and store new ones.

    Predicted sweeps (executors with ``columnar = True``) store every result in one columnar file,
    ``out/results.jsonl``, one line per chunk of ``chunk`` items, appended as chunks finish: resuming reuses
    the complete chunks of the same executor key and recomputes the rest. Other executors (measured
    points) store ``out/<item-id>/result.json`` per point. Infeasible items get the planner's own message as
    their reason. Feasible items get ``out/<item-id>/topology.yaml`` when the sweep has at most
    ``topology_files_max`` items (the CLI writes the frontier's and the ranking's in any case).
    """
    key = executor.key()
    columnar = bool(getattr(executor, "columnar", False))
    done: dict[str, ItemResult] = {}
    store: Path | None = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(
            out / "sweep.json",
            {
                "format": "widep-sweep/1",
                "executor": key,
                **(meta or {}),
                "items": len(items),
                "results": RESULTS_FILE if columnar else "<item-id>/result.json",
            },
        )
        store = out / RESULTS_FILE
        wanted = {it.id for it in items}
        if columnar and resume:
            for k, rs in _read_chunks(store):
                if k == key:
                    done.update((r.id, r) for r in rs if r.id in wanted and r.status in ("ok", "infeasible"))
            if not done and store.exists():
                store.unlink()  # nothing reusable (another workload or calibration): start the file afresh
        elif columnar and store.exists():
            store.unlink()
        elif resume:
            for it in items:
                f = out / it.id / "result.json"
                if f.is_file():
                    try:
                        r = ItemResult.from_dict(json.loads(f.read_text()))
                    except (json.JSONDecodeError, TypeError, OSError):
                        continue
                    if r.key == key and r.status in ("ok", "infeasible"):
                        done[it.id] = r
    pending = [it for it in items if it.id not in done]
    by_id = {it.id: it for it in items}
    results: dict[str, ItemResult] = dict(done)
    with_topology = len(items) <= topology_files_max
    # the planner's own message for infeasible points costs a full plan each: for large sweeps the fast
    # check's reason stands (same category; `widep plan` on the candidate gives the full message)
    with_messages = len(items) <= topology_files_max
    buf: list[ItemResult] = []

    def flush() -> None:
        if buf and store is not None:
            with open(store, "a") as fh:
                fh.write(_chunk_line(buf, key) + "\n")
            buf.clear()

    for r in executor.run(pending):
        it = by_id[r.id]
        if r.status == "infeasible" and it.planner_message is not None and out is not None and with_messages:
            msg = it.planner_message()
            if msg:
                r.reason = msg
        results[r.id] = r
        if out is not None:
            if r.status == "ok" and with_topology:
                write_topologies([it], out)
            if columnar:
                buf.append(r)
                if len(buf) >= chunk:
                    flush()
            else:
                d = out / r.id
                d.mkdir(exist_ok=True)
                _write_json(d / "result.json", r.as_dict() | {"candidate": it.candidate_dict()}, compact=True)
        if on_result is not None:
            on_result(r)
    flush()
    ordered = [results[it.id] for it in items if it.id in results]
    if out is not None:
        write_summary(ordered, out)
    return ordered


# ---------------------------------------------------------------------------------------------------------
# Frontier and summary


def frontier(
    results: Iterable[ItemResult], max_ttft_ms: float | None = None
) -> list[tuple[ItemResult, dict[str, Any]]]:
    """The Pareto frontier over (tokens/s/user, tokens/s/GPU) of every level of every ok result.

    With ``max_ttft_ms`` only levels whose TTFT meets it take part.

    Same definition as ``widep.bench.plot.pareto_front`` (both maximised, ordered by tokens/s/user);
    computed with numpy because a sweep has 10^5 points.
    """
    results = list(results)
    if results and all(
        r.status != "ok" or (isinstance(r.levels, LevelTable) and r.levels.xy is not None) for r in results
    ):
        return _frontier_arrays(results, max_ttft_ms)
    owners: list[tuple[ItemResult, int]] = []
    xs: list[Any] = []
    ys: list[Any] = []
    ts: list[Any] = []
    for r in results:
        if r.status != "ok" or not r.levels:
            continue
        u, g = _column(r.levels, "tps_user"), _column(r.levels, "tps_gpu")
        owners += [(r, j) for j in range(len(u))]
        xs += u
        ys += g
        if max_ttft_ms is not None:
            ts += _column(r.levels, "ttft_ms")
    if not owners:
        return []
    x = np.asarray([v if v is not None else np.nan for v in xs], float)
    y = np.asarray(ys, float)
    ok = ~np.isnan(x) & (x > 0) & (y > 0)
    if max_ttft_ms is not None:
        t = np.asarray([v if v is not None else np.inf for v in ts], float)
        ok &= t <= max_ttft_ms
    valid = np.flatnonzero(ok)
    if valid.size == 0:
        return []
    vx, vy = x[valid], y[valid]
    order = np.lexsort((-vy, -vx))  # by x descending, then y descending
    sy = vy[order]
    prev_best = np.concatenate([[-np.inf], np.maximum.accumulate(sy)[:-1]])
    idx = order[sy > prev_best]
    idx = idx[np.argsort(vx[idx], kind="stable")]
    out = []
    for i in valid[idx]:
        r, j = owners[i]
        out.append((r, r.levels[j]))
    return out


def _frontier_arrays(results: list[ItemResult], max_ttft_ms: float | None) -> list[tuple[ItemResult, dict[str, Any]]]:
    """:func:`frontier` on the arrays the predict executor keeps (no per-level Python objects)."""
    ok = [r for r in results if r.status == "ok" and len(r.levels)]
    if not ok:
        return []
    blocks = [r.levels.xy for r in ok]  # type: ignore[union-attr]
    xy = np.concatenate(blocks, axis=1)
    owner = np.repeat(np.arange(len(ok)), [b.shape[1] for b in blocks])
    local = np.concatenate([np.arange(b.shape[1]) for b in blocks])
    x, y, t = xy
    good = ~np.isnan(x) & (x > 0) & (y > 0)
    if max_ttft_ms is not None:
        good &= ~np.isnan(t) & (t <= max_ttft_ms)
    valid = np.flatnonzero(good)
    if valid.size == 0:
        return []
    vx, vy = x[valid], y[valid]
    order = np.lexsort((-vy, -vx))
    sy = vy[order]
    prev_best = np.concatenate([[-np.inf], np.maximum.accumulate(sy)[:-1]])
    idx = order[sy > prev_best]
    idx = idx[np.argsort(vx[idx], kind="stable")]
    return [(ok[owner[i]], ok[owner[i]].levels[int(local[i])]) for i in valid[idx]]


SUMMARY_FIELDS = (
    "id",
    "status",
    "mode",
    "gpus",
    "description",
    "category",
    "reason",
    "on_frontier",
    "sat_concurrency",
    "sat_tps_gpu",
    "sat_tps_user",
    "sat_ttft_ms",
    "sat_tpot_ms",
    "sat_batch_per_rank",
    "sat_bound",
    "sat_limit",
)


def summary_rows(
    results: Sequence[ItemResult], front_points: list[tuple[ItemResult, dict[str, Any]]] | None = None
) -> list[dict[str, Any]]:
    front = {r.id for r, _ in (frontier(results) if front_points is None else front_points)}
    rows = []
    for r in results:
        sat = r.saturation or {}
        rows.append(
            {
                "id": r.id,
                "status": r.status,
                "mode": r.mode,
                "gpus": r.gpus,
                "description": r.description,
                "category": r.category,
                "reason": r.reason,
                "on_frontier": r.id in front,
                "sat_concurrency": sat.get("concurrency"),
                "sat_tps_gpu": sat.get("tps_gpu"),
                "sat_tps_user": sat.get("tps_user"),
                "sat_ttft_ms": sat.get("ttft_ms"),
                "sat_tpot_ms": sat.get("tpot_ms"),
                "sat_batch_per_rank": sat.get("batch_per_rank"),
                "sat_bound": sat.get("bound"),
                "sat_limit": sat.get("limit"),
            }
        )
    return rows


SUMMARY_JSON_MAX = 2000


def write_summary(results: Sequence[ItemResult], out: Path) -> None:
    front = frontier(results)
    rows = summary_rows(results, front)
    with open(out / "summary.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(SUMMARY_FIELDS)
        wr.writerows([row[f] for f in SUMMARY_FIELDS] for row in rows)
    big = len(rows) > SUMMARY_JSON_MAX  # large sweeps: every candidate is in summary.csv (and results.jsonl)
    _write_json(
        out / "summary.json",
        {
            "format": "widep-sweep-summary/1",
            "count": len(rows),
            **({"candidates_in": "summary.csv"} if big else {"candidates": rows}),
            "frontier": [{"id": r.id, **lv} for r, lv in front],
        },
    )


def load_results(out: Path) -> list[ItemResult]:
    """Every stored result under a sweep directory (for plots and re-reading): the columnar file's (the
    latest chunk of an item wins) and the per-point directories' (measured points)."""
    by_id: dict[str, ItemResult] = {}
    for _, rs in _read_chunks(Path(out) / RESULTS_FILE):
        by_id.update((r.id, r) for r in rs)
    res = list(by_id.values())
    for f in sorted(Path(out).glob("*/result.json")):
        try:
            res.append(ItemResult.from_dict(json.loads(f.read_text())))
        except (json.JSONDecodeError, TypeError, OSError):
            continue
    return res


# ---------------------------------------------------------------------------------------------------------
# Plots (read-only: from results)


def _cloud(ok: Sequence[ItemResult], most: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens/s/user, tokens/s/GPU) of every decode level, sampled down to ``most`` points (seeded); and the count."""
    parts = []
    for r in ok:
        xy = getattr(r.levels, "xy", None)
        if xy is not None:
            parts.append(np.asarray(xy[:2], float))
        else:
            parts.append(
                np.asarray(
                    [[lv.get("tps_user") or np.nan for lv in r.levels], [lv.get("tps_gpu") or 0.0 for lv in r.levels]],
                    float,
                ).reshape(2, -1)
            )
    pts = np.concatenate(parts, axis=1) if parts else np.zeros((2, 0))
    pts = pts[:, np.isfinite(pts[0]) & (pts[0] > 0)]
    n = pts.shape[1]
    if n > most:
        pts = pts[:, np.sort(np.random.default_rng(0).choice(n, most, replace=False))]
    return pts[0], pts[1], n


def _cloud_chart(
    ok: Sequence[ItemResult], front: list[tuple[ItemResult, dict[str, Any]]], prefix: Path, label_top: int, most: int
) -> list[Path]:
    """The Pareto chart of many candidates: a sampled grey cloud, the frontier and labels of some of its points."""
    from widep.perf.chart import Label, Series, render

    xs, ys, n_all = _cloud(ok, most)
    what = f"{len(ok)} candidates x levels" + (f" ({len(xs)} of {n_all} shown)" if len(xs) < n_all else "")
    fx = [lv["tps_user"] for _, lv in front]
    fy = [lv["tps_gpu"] for _, lv in front]
    series = [Series(xs.tolist(), ys.tolist(), "dots", "#c8c8c8", what, 1.6)]
    labels = []
    if front:
        series += [
            Series(fx, fy, "dashed", "#808080", "frontier (predicted)"),
            Series(fx, fy, "markers", "#d62728", "", 3.0),
        ]
        step = max(1, len(front) // label_top)
        labels = [
            Label(lv["tps_user"], lv["tps_gpu"], f"{r.id} @{lv['concurrency']:g}", "#d62728") for r, lv in front[::step]
        ]
    return render(
        prefix.parent / f"{prefix.name}-pareto",
        series,
        title="Throughput per GPU vs speed per user (labels: candidate @ concurrency)",
        xlabel="tokens/s/user  (1000 / mean TPOT ms)",
        ylabel="output tokens/s/GPU",
        labels=labels,
    )


def plot_sweep(
    results: Sequence[ItemResult],
    prefix: Path,
    *,
    measured: Sequence[Path] = (),
    lines: bool | None = None,
    label_top: int = 12,
    cloud_max: int = 2000,
) -> list[Path]:
    """Pareto plot of tokens/s/user (x) vs tokens/s/GPU (y), in the style of ``widep bench plot``.

    ``lines`` (default: when there are at most 12 candidates) draws one line per candidate over its
    concurrency levels, points labelled by concurrency, as the bench plots do, so a measured run
    (``measured``: ``widep bench --out`` directories) overlays it; otherwise every point is a grey dot
    and the frontier is highlighted. Also writes TTFT/TPOT against tokens/s/GPU for line plots.
    """
    ok = [r for r in results if r.status == "ok" and any(_column(r.levels, "tps_user"))]
    if not ok and not measured:
        raise UserError(
            "sweep plot: no feasible candidate with decode output to plot. Given: only infeasible or prefill-only "
            "results."
        )
    lines = len(ok) <= 12 if lines is None else lines
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    front = frontier(ok)
    if not lines and not measured:  # the chart of a large sweep, drawn without matplotlib (widep/perf/chart.py)
        return _cloud_chart(ok, front, prefix, label_top, cloud_max)

    # matplotlib.figure, not pyplot: no GUI backend to set up (a third of the plot's time)
    import matplotlib
    from matplotlib.figure import Figure

    from widep.bench.plot import load_points

    matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text as text, not glyph paths: smaller and faster

    def _save(fig: Any, prefix: Path, name: str) -> list[Path]:
        paths = [prefix.parent / f"{prefix.name}-{name}.{ext}" for ext in ("png", "svg")]
        for pth in paths:
            fig.savefig(pth, dpi=110)  # fixed margins (below): "tight" would render every figure twice
        return paths

    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    written: list[Path] = []

    fig = Figure(figsize=(8, 5.5))
    fig.subplots_adjust(left=0.1, right=0.97, top=0.93, bottom=0.1)
    ax = fig.subplots()
    if lines:
        for k, r in enumerate(ok):
            lv = [x for x in r.levels if x.get("tps_user")]
            col = colors[k % len(colors)]
            ax.plot(
                [x["tps_user"] for x in lv], [x["tps_gpu"] for x in lv], "o--", color=col, label=f"{r.id} (predicted)"
            )
            for x in lv:
                ax.annotate(
                    f"{x['concurrency']:g}",
                    (x["tps_user"], x["tps_gpu"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                    color=col,
                )
    else:
        # the cloud is a seeded sample of at most cloud_max points, rasterised: the files stay small
        xs, ys, n_all = _cloud(ok, cloud_max)
        what = f"{len(ok)} candidates x levels" + (f" ({len(xs)} of {n_all} shown)" if len(xs) < n_all else "")
        ax.scatter(xs, ys, s=4, color="lightgrey", label=what, rasterized=True)
    if front:
        ax.plot(
            [lv["tps_user"] for _, lv in front],
            [lv["tps_gpu"] for _, lv in front],
            "--",
            color="grey",
            lw=1,
            label="frontier (predicted)",
        )
        if not lines:
            ax.scatter(
                [lv["tps_user"] for _, lv in front], [lv["tps_gpu"] for _, lv in front], s=14, color="C3", zorder=3
            )
            step = max(1, len(front) // label_top)
            for r, lv in front[::step]:
                ax.annotate(
                    f"{r.id} @{lv['concurrency']:g}",
                    (lv["tps_user"], lv["tps_gpu"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=6,
                    color="C3",
                )
    for k, d in enumerate(measured):
        pts = [p for p in load_points(Path(d)) if p.tps_per_user is not None]
        if not pts:
            continue
        col = colors[(len(ok) + k) % len(colors)] if lines else colors[k % len(colors)]
        ax.plot(
            [p.tps_per_user for p in pts],
            [p.tps_per_gpu for p in pts],
            "s-",
            color=col,
            label=f"{pts[0].run} (measured)",
        )
        for p in pts:
            ax.annotate(
                p.tag,
                (p.tps_per_user, p.tps_per_gpu),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=8,
                color=col,
            )
    ax.set_xlabel("tokens/s/user  (1000 / mean TPOT ms)")
    ax.set_ylabel("output tokens/s/GPU")
    ax.set_title("Throughput per GPU vs speed per user (labels: concurrency)")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    written += _save(fig, prefix, "pareto")

    if lines and ok:
        fig = Figure(figsize=(11, 4.5))
        fig.subplots_adjust(left=0.07, right=0.98, top=0.88, bottom=0.12, wspace=0.25)
        a1, a2 = fig.subplots(1, 2)
        for k, r in enumerate(ok):
            col = colors[k % len(colors)]
            lv = [x for x in r.levels if x.get("tps_user")]
            xs = [x["tps_gpu"] for x in lv]
            a1.plot(xs, [x["ttft_ms"] for x in lv], "o--", color=col, label=f"{r.id} (predicted)")
            a2.plot(xs, [x["tpot_ms"] for x in lv], "o--", color=col, label=f"{r.id} (predicted)")
        a1.set_ylabel("TTFT (ms)")
        a2.set_ylabel("TPOT (ms/token)")
        for ax_ in (a1, a2):
            ax_.set_xlabel("output tokens/s/GPU")
            ax_.grid(True, alpha=0.3)
            ax_.legend(fontsize=7)
        fig.suptitle("Predicted latency vs throughput")
        written += _save(fig, prefix, "latency")
        return written
