"""JSON-schema machinery shared by the CRD and the core layers: Go regexp patterns, ``int32``/``int64`` formats,
messages for people from ``jsonschema`` errors, and a memo of schema results."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema

from widep.errors import did_you_mean
from widep.k8s.names import (
    QUANTITY_PATTERN,
)
from widep.k8s.validate.problems import given, show

_QUANTITY_EXAMPLES = "e.g. '8', '500m', '16Gi', '1.5', '2e3'"


def go_regex(pattern: str) -> re.Pattern[str]:
    """Compile an OpenAPI ``pattern`` with Go RE2 semantics for ``$`` (end of text, not "before a
    final newline" as in Python)."""
    return _compile_go_regex(pattern)


@functools.lru_cache(maxsize=256)
def _compile_go_regex(pattern: str) -> re.Pattern[str]:
    out, i, in_class = [], 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if ch == "[" and not in_class:
            in_class = True
        elif ch == "]" and in_class:
            in_class = False
        elif ch == "$" and not in_class:
            ch = r"\Z"
        out.append(ch)
        i += 1
    return re.compile("".join(out))


def _pattern_keyword(validator, pattern, instance, schema):  # jsonschema keyword signature
    if validator.is_type(instance, "string") and not go_regex(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


FORMATS = jsonschema.FormatChecker(formats=())


def _int_range(bits: int):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def check(value: Any) -> bool:
        return not isinstance(value, int) or isinstance(value, bool) or lo <= value <= hi

    return check


FORMATS.checks("int32")(_int_range(32))

FORMATS.checks("int64")(_int_range(64))

CrdSchemaValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"pattern": _pattern_keyword})

CoreSchemaValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _pattern_keyword})


def _pattern_message(pattern: str, value: Any) -> str:
    if pattern == QUANTITY_PATTERN:
        return f"Invalid quantity {show(value)}: expected a number with an optional suffix ({_QUANTITY_EXAMPLES})"
    if "[A-Za-z0-9][-A-Za-z0-9_.]*" in pattern:
        return (
            f"Invalid value {show(value)}: must be a qualified name: an optional DNS subdomain "
            "prefix and '/', then alphanumerics, '-', '_' or '.', starting and ending with an "
            "alphanumeric (e.g. 'example.com/my-key')"
        )
    return f"Invalid value {show(value)}: must match the regex {pattern}"


def _describe(err: jsonschema.ValidationError) -> Iterator[tuple[tuple, str]]:
    """Turn one jsonschema error into ``(path, message)`` items worded like the API server."""
    path = tuple(err.absolute_path)
    kw, expected, value = err.validator, err.validator_value, err.instance
    if kw == "additionalProperties" and expected is False and isinstance(value, dict):
        known = list((err.schema.get("properties") or {}).keys())
        for key in value:
            if key in known:
                continue
            valid = f" Valid: {', '.join(known)}." if len(known) <= 15 else ""
            yield (
                path + (key,),
                f'unknown field "{key}" (strict field validation rejects it).{did_you_mean(str(key), known)}{valid}',
            )
        return
    if kw == "required":
        for name in expected:
            if err.message == f"{name!r} is a required property":
                yield path + (name,), "Required value: this field must be set"
                return
        yield path, err.message
        return
    if kw == "enum":
        options = [str(o) for o in expected]
        hint = did_you_mean(str(value), options) if isinstance(value, str) else ""
        yield path, f"Unsupported value {show(value)}. Valid: {', '.join(options)}.{hint}"
        return
    if kw == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        types = [t for t in types if t != "null"] or types
        yield path, f"Invalid type: expected {' or '.join(types)}, given {given(value)}"
        return
    if kw == "format":
        if expected in ("int32", "int64"):
            bits = int(expected[3:])
            yield (
                path,
                (
                    f"Invalid value {value}: out of range for {expected}. "
                    f"Valid: {-(2 ** (bits - 1))}..{2 ** (bits - 1) - 1}"
                ),
            )
        else:
            yield path, f"Invalid value {show(value)}: not a valid {expected}"
        return
    if kw == "pattern":
        yield path, _pattern_message(expected, value)
        return
    if kw in ("minimum", "maximum"):
        rel = ">=" if kw == "minimum" else "<="
        yield path, f"Invalid value {show(value)}: must be {rel} {expected}"
        return
    if kw in ("maxLength", "minLength"):
        rel = "at most" if kw == "maxLength" else "at least"
        yield path, f"Invalid value {show(value)}: must be {rel} {expected} characters"
        return
    if kw in ("anyOf", "oneOf"):
        subs = err.context or []
        for sub in subs:  # a quantity (core schemas: oneOf string-with-pattern / number)
            if sub.validator == "pattern" and sub.validator_value == QUANTITY_PATTERN:
                yield path, _pattern_message(QUANTITY_PATTERN, value)
                return
        types = []
        for option in expected:
            t = option.get("type") if isinstance(option, dict) else None
            for name in [t] if isinstance(t, str) else list(t or []):
                if name != "null" and name not in types:
                    types.append(name)
        if types and all(s.validator == "type" for s in subs):
            yield path, f"Invalid type: expected {' or '.join(types)}, given {given(value)}"
            return
        best = jsonschema.exceptions.best_match(subs) if subs else None
        if best is not None:
            yield from _describe(best)
            return
    yield path, err.message


_SCHEMA_MEMO: dict[tuple[int, str], list[tuple[tuple, str]]] = {}

_SCHEMA_MEMO_MAX = 4096


def schema_problems(validator: jsonschema.protocols.Validator, instance: Any) -> list[tuple[tuple, str]]:
    """Schema problems of ``instance``; memoised on its canonical JSON, so a stream repeating the same
    objects (thousands of near-identical Services) validates each distinct one once."""
    try:
        key = (id(validator), json.dumps(instance, sort_keys=True, separators=(",", ":")))
    except (TypeError, ValueError):
        return _schema_problems_uncached(validator, instance)
    hit = _SCHEMA_MEMO.get(key)
    if hit is None:
        if len(_SCHEMA_MEMO) >= _SCHEMA_MEMO_MAX:
            _SCHEMA_MEMO.clear()
        hit = _SCHEMA_MEMO[key] = _schema_problems_uncached(validator, instance)
    return list(hit)


def _schema_problems_uncached(validator: jsonschema.protocols.Validator, instance: Any) -> list[tuple[tuple, str]]:
    out: list[tuple[tuple, str]] = []
    for err in validator.iter_errors(instance):
        out.extend(_describe(err))
    out.sort(key=lambda item: [str(p) for p in item[0]])
    return out
