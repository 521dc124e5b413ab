"""The CEL rules (``x-kubernetes-validations``) of the CRDs widep ships, re-implemented.

There is no CEL evaluator among widep's dependencies, so the rules the shipped CRDs carry are written
out here in Python, each keyed by its exact rule text. A rule a CRD carries that is not in
:data:`RULES` is never silently passed: it is reported as a ``note`` ("not checked").

The LWS v0.10.0 CRD has no CEL rules; the Gateway API Inference Extension v1.5.0 CRD (InferencePool)
has two: unique ``targetPorts`` numbers and ``endpointPickerRef.port`` when the referent is a Service.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


def _unique_port_numbers(value: Any) -> bool:
    numbers = [p.get("number") for p in value if isinstance(p, dict)] if isinstance(value, list) else []
    return len(numbers) == len(set(map(repr, numbers)))


def _port_when_service(value: Any) -> bool:
    if not isinstance(value, dict):
        return True
    return value.get("kind", "Service") != "Service" or "port" in value


#: Rule text -> a Python function of the value at the rule's place (True = the rule holds).
RULES: dict[str, Callable[[Any], bool]] = {
    "self.all(p1, self.exists_one(p2, p1.number==p2.number))": _unique_port_numbers,
    "self.kind != 'Service' || has(self.port)": _port_when_service,
}


def cel_problems(schema: Any, value: Any, path: tuple = ()) -> Iterator[tuple]:
    """``(path, message[, severity])`` for every CEL rule of ``schema`` that ``value`` (already
    defaulted, as the API server evaluates rules after defaulting) breaks."""
    if not isinstance(schema, dict):
        return
    for rule in schema.get("x-kubernetes-validations") or []:
        text = rule.get("rule", "")
        check = RULES.get(text)
        if check is None:
            yield path, f"not checked: CEL rule {text!r} (widep does not evaluate this rule)", "note"
        elif not check(value):
            yield path, f"Invalid value: {rule.get('message') or 'failed rule: ' + text}"
    if isinstance(value, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        for key, item in value.items():
            if key in props:
                yield from cel_problems(props[key], item, path + (key,))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from cel_problems(schema["items"], item, path + (i,))
