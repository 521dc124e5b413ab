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
MAX_NODES = 50_000
"""YAML nodes (scalars, sequences, mappings) allowed in one stream, counted while composing, before any Python
object is built: the largest topology (4096 nodes with names and addresses, 1024 extra args per role) has fewer
than 50,000, and a file of millions of tiny list items is refused after this many instead of taking minutes and
gigabytes."""
MAX_TOPOLOGY_BYTES = 4 * 2**20
"""Largest topology file (the biggest real one is a few hundred KiB: 4096 nodes with addresses). Checked from the
file's size before it is read."""


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
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name); widep refuses alias bombs")
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise yaml.YAMLError(f"more than {MAX_NODES} YAML nodes (values); a topology has far fewer")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.YAMLError(f"nesting deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Duplicate keys are refused among a mapping's own keys; YAML merge keys (``<<: *base``) are standard
        YAML 1.1 and accepted: their keys are defaults that the mapping's own keys override (PyYAML's rule)."""
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
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


_EventLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _bound_cost(text: str) -> None:
    """Count nodes, aliases and nesting with libyaml's parser (C, no Python objects built) before composing in
    Python, so an oversized document is refused in a fraction of a second and a few MB of memory."""
    nodes = aliases = depth = 0
    for event in yaml.parse(text, Loader=_EventLoader):
        if isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent, yaml.CollectionStartEvent)):
            nodes += 1
            if nodes > MAX_NODES:
                raise yaml.YAMLError(f"more than {MAX_NODES} YAML nodes (values); a topology has far fewer")
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name); widep refuses alias bombs")
        elif isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise yaml.YAMLError(f"nesting deeper than {MAX_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def load_yaml(text: str, source: str) -> Any:
    """One YAML document, strictly; UserError naming ``source`` otherwise."""
    try:
        _bound_cost(text)
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as err:
        raise UserError(f"{source} is not valid YAML: {err}") from None
    except ValueError as err:  # an integer of more digits than Python converts (sys.get_int_max_str_digits())
        why = str(err).split(";")[0]
        raise UserError(f"{source}: a number is too long ({why}). Valid: numbers of a few digits.") from None
    except RecursionError:
        raise UserError(f"{source} is not valid YAML: nested too deeply.") from None
