"""The expert-load file: ``{"model", "layers", "experts", "counts", "tokens", "source"}``.

``counts[layer][expert]`` is the number of tokens routed to logical expert ``expert`` in MoE layer ``layer``
(each token counts once for each of its top-k experts). ``tokens`` is how many tokens were routed (optional;
``sum(counts[l]) == tokens x top_k`` for a complete record). ``source`` says where it came from (free text).
Files from any tool are accepted as long as they have this shape; bad input is a UserError naming the problem.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from widep.errors import UserError


@dataclass(frozen=True)
class ExpertLoad:
    """One validated record of expert load."""

    model: str
    layers: int
    experts: int
    counts: tuple[tuple[float, ...], ...]
    """counts[layer][expert]: tokens routed to that logical expert in that MoE layer."""
    tokens: int | None
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "layers": self.layers,
            "experts": self.experts,
            "counts": [[_num(c) for c in row] for row in self.counts],
            "tokens": self.tokens,
            "source": self.source,
        }


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def parse_expert_load(doc: Any, where: str = "expert load") -> ExpertLoad:
    """Check a decoded JSON document and return an :class:`ExpertLoad` (UserError naming the problem)."""
    if not isinstance(doc, dict):
        raise UserError(
            f"{where}: the file must hold a JSON object with layers, experts and counts. Given: {type(doc).__name__}."
        )
    known = {"model", "layers", "experts", "counts", "tokens", "source"}
    extra = sorted(set(doc) - known)
    if extra:
        raise UserError(f"{where}: unknown keys {extra}. Valid: {sorted(known)}.")
    for key in ("layers", "experts", "counts"):
        if key not in doc:
            raise UserError(
                f"{where}: {key!r} is missing. The format is {{model, layers, experts, counts, tokens, "
                "source}; counts[layer][expert]."
            )
    layers, experts = doc["layers"], doc["experts"]
    for key, val in (("layers", layers), ("experts", experts)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise UserError(f"{where}: {key} must be a positive integer. Given: {val!r}.")
    counts = doc["counts"]
    if not isinstance(counts, list) or not counts:
        raise UserError(f"{where}: counts is empty; it must be a list of {layers} layers x {experts} experts.")
    if len(counts) != layers:
        raise UserError(f"{where}: counts has {len(counts)} rows but layers is {layers}; counts[layer][expert].")
    rows: list[tuple[float, ...]] = []
    for li, row in enumerate(counts):
        if not isinstance(row, list) or len(row) != experts:
            got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
            raise UserError(f"{where}: counts[{li}] has {got} but experts is {experts}.")
        vals: list[float] = []
        for ei, c in enumerate(row):
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
                raise UserError(f"{where}: counts[{li}][{ei}] must be a finite number. Given: {c!r}.")
            if c < 0:
                raise UserError(f"{where}: counts[{li}][{ei}] is negative ({c}); token counts are >= 0.")
            vals.append(float(c))
        rows.append(tuple(vals))
    if sum(sum(r) for r in rows) <= 0:
        raise UserError(f"{where}: every count is 0; the record holds no routed tokens.")
    tokens = doc.get("tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
        raise UserError(f"{where}: tokens must be a non-negative integer or null. Given: {tokens!r}.")
    model = doc.get("model") or ""
    source = doc.get("source") or ""
    if not isinstance(model, str) or not isinstance(source, str):
        raise UserError(f"{where}: model and source must be strings.")
    return ExpertLoad(model=model, layers=layers, experts=experts, counts=tuple(rows), tokens=tokens, source=source)


def read_expert_load(path: str | Path) -> ExpertLoad:
    """Read and check an expert-load JSON file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such expert-load file.") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e.msg} at line {e.lineno}).") from None
    return parse_expert_load(doc, str(path))


def check_against_arch(load: ExpertLoad, arch: Any, where: str = "expert load") -> None:
    """The record must describe the topology's model: as many MoE layers and routed experts."""
    if load.experts != arch.routed_experts:
        raise UserError(
            f"{where}: experts={load.experts} but the topology's model {arch.name} has {arch.routed_experts} routed "
            "experts. Record the deployment this topology describes."
        )
    if load.layers != arch.num_moe_layers:
        raise UserError(
            f"{where}: layers={load.layers} but the topology's model {arch.name} has {arch.num_moe_layers} MoE "
            "layers. Record the deployment this topology describes."
        )


def write_expert_load(load: ExpertLoad, path: str | Path) -> None:
    Path(path).write_text(json.dumps(load.as_dict(), indent=None) + "\n")
