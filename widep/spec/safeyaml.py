"""Reading user files safely: UTF-8 text only, bounded size, YAML without duplicate keys, alias bombs
or nesting that would exhaust the stack. Every failure is a :class:`UserError` (exit 2) naming the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from widep.errors import UserError

MAX_TEXT_BYTES = 64 * 2**20
"""Largest file widep reads as text (a topology is a few KiB; LWS manifests a few hundred)."""
MAX_ALIASES = 1000
"""YAML alias uses allowed in one stream (a "billion laughs" file needs many)."""
MAX_DEPTH = 100
"""Deepest nesting of mappings/sequences allowed (a topology is 4 deep)."""


def read_text(path: str | os.PathLike[str], what: str, *, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a file; UserError for a missing, unreadable, binary, non-UTF-8 or oversized one."""
    p = Path(path)
    shown = str(p) if len(str(p)) <= 200 else str(p)[:200] + "..."
    try:
        if not p.is_file():
            raise UserError(f"{what}: file {shown!r} not found (or not a regular file).")
        size = p.stat().st_size
        if size > max_bytes:
            raise UserError(f"{what}: {shown!r} is {size} bytes. Valid: at most {max_bytes} bytes of text.")
        data = p.read_bytes()
    except OSError as err:
        raise UserError(f"{what}: cannot read {shown!r}: {err.strerror or err}.") from None
    return decode_text(data, f"{what}: {shown!r}")


def decode_text(data: bytes, source: str, *, max_bytes: int = MAX_TEXT_BYTES) -> str:
    if len(data) > max_bytes:
        raise UserError(f"{source} is {len(data)} bytes. Valid: at most {max_bytes} bytes of text.")
    if b"\x00" in data:
        raise UserError(f"{source} is a binary file (it contains NUL bytes). Valid: UTF-8 text.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{source} is not UTF-8 text (byte {err.start}: {data[err.start : err.start + 1]!r})."
        ) from None


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys, alias bombs and very deep nesting."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name); widep refuses alias bombs")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.YAMLError(f"nesting deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a scalar", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {seen[key].line + 1}); YAML would keep only the last",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> Any:
    """One YAML document, strictly; UserError naming ``source`` otherwise."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as err:
        raise UserError(f"{source} is not valid YAML: {err}") from None
    except RecursionError:
        raise UserError(f"{source} is not valid YAML: nested too deeply.") from None
