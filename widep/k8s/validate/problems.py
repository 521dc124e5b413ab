"""What a validation finds: :class:`Problem` (one finding, with its YAML path and layer), path formatting, value
descriptions for messages, and the sink that keeps one finding per path (an earlier layer hides later ones below)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

MAX_INT32 = 2**31 - 1

SEVERITIES = ("error", "warning", "note")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One finding about one document.

    ``doc`` is the 1-based position of the document in its file (or in the list given to
    :func:`validate_documents`); ``path`` is a YAML path such as
    ``spec.leaderWorkerTemplate.workerTemplate.spec.containers[0].ports[0].containerPort``
    (map keys that are not identifiers are written in brackets: ``limits[nvidia.com/gpu]``).
    ``severity`` is ``error`` (a cluster would reject it), ``warning`` (accepted but broken at run
    time) or ``note`` (information, e.g. a kind that was not checked); only errors and warnings fail.
    """

    doc: int
    kind: str
    name: str
    path: str
    message: str
    layer: str
    severity: str = "error"

    @property
    def failing(self) -> bool:
        """True for errors and warnings; notes never fail a validation."""
        return self.severity != "note"

    def format(self, source: str | None = None) -> str:
        """``FILE: doc N (Kind/name): path.to.field: message`` (``warning:``/``note:`` marked)."""
        where = f"doc {self.doc} ({self.kind or '?'}/{self.name or '?'})"
        head = f"{source}: {where}" if source else where
        tag = "" if self.severity == "error" else f"{self.severity}: "
        path = f"{self.path}: " if self.path else ""
        return f"{head}: {path}{tag}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SIMPLE_KEY = re.compile(r"[A-Za-z_$][A-Za-z0-9_-]*\Z")


def format_path(parts: Iterable[Any]) -> str:
    """``('spec', 'containers', 0, 'resources', 'limits', 'nvidia.com/gpu')`` →
    ``spec.containers[0].resources.limits[nvidia.com/gpu]``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY.match(str(part)):
            out += ("." if out else "") + str(part)
        else:
            out += f"[{part}]"
    return out


def show(value: Any) -> str:
    """A short, YAML-ish rendering of a value for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def given(value: Any) -> str:
    """``string '8080'``, ``integer 8``, ``array``: the type and (for scalars) the value."""
    if isinstance(value, (dict, list)):
        return type_name(value)
    return f"{type_name(value)} {show(value)}"


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


class Sink:
    """Collects one document's problems; a later layer's problem is dropped when an earlier
    layer already reported the same path or one of its ancestors."""

    def __init__(self, doc: int, kind: str, name: str) -> None:
        self.doc, self.kind, self.name = doc, kind, name
        self.problems: list[Problem] = []
        self._paths: set[tuple] = set()

    def extend(self, layer: str, items: Iterable[tuple]) -> None:
        """Add ``(path_tuple, message)`` or ``(path_tuple, message, severity)`` items of one layer."""
        prior = set(self._paths)
        for item in items:
            path, message = tuple(item[0]), item[1]
            severity = item[2] if len(item) > 2 else "error"
            if any(path[:i] in prior for i in range(len(path) + 1)):
                continue
            self.problems.append(Problem(self.doc, self.kind, self.name, format_path(path), message, layer, severity))
            if severity == "error":
                self._paths.add(path)


def get(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...`` or None when a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def claim_names(claims: Any) -> list[str]:
    """Names of volumeClaimTemplates (StatefulSet/LWS), which pods may mount like volumes."""
    names = [get(c, "metadata", "name") for c in claims] if isinstance(claims, list) else []
    return [n for n in names if isinstance(n, str) and n]
