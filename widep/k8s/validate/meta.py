"""The ``object-meta`` layer and its name rules (``k8s.io/apimachinery`` validation): names per kind, label and
annotation keys and values, and Kubernetes quantities."""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from typing import Any

from widep.k8s.names import (
    DNS1035_LABEL,
    DNS1123_LABEL,
    DNS1123_LABEL_MAX_LENGTH,
    DNS1123_SUBDOMAIN,
    DNS1123_SUBDOMAIN_MAX_LENGTH,
    LABEL_VALUE,
    LABEL_VALUE_MAX_LENGTH,
    LWS_KIND,
    QUALIFIED_NAME_MAX_LENGTH,
    QUALIFIED_NAME_PART,
    QUANTITY_PATTERN,
)
from widep.k8s.validate.problems import show
from widep.k8s.validate.schema import go_regex


def dns1123_label_msg(value: str) -> str | None:
    if len(value) > DNS1123_LABEL_MAX_LENGTH:
        return f"must be no more than {DNS1123_LABEL_MAX_LENGTH} characters (given {len(value)})"
    if not DNS1123_LABEL.match(value):
        return (
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
            "and must start and end with an alphanumeric character (e.g. 'my-name', or '123-abc')"
        )
    return None


def dns1035_label_msg(value: str) -> str | None:
    if len(value) > DNS1123_LABEL_MAX_LENGTH:
        return f"must be no more than {DNS1123_LABEL_MAX_LENGTH} characters (given {len(value)})"
    if not DNS1035_LABEL.match(value):
        return (
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with "
            "an alphabetic character, and end with an alphanumeric character (e.g. 'my-name', or 'abc-123')"
        )
    return None


def _dns1123_subdomain_msg(value: str) -> str | None:
    if len(value) > DNS1123_SUBDOMAIN_MAX_LENGTH:
        return f"must be no more than {DNS1123_SUBDOMAIN_MAX_LENGTH} characters (given {len(value)})"
    if not DNS1123_SUBDOMAIN.match(value):
        return (
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
            "or '.', and must start and end with an alphanumeric character (e.g. 'example.com')"
        )
    return None


def qualified_name_problem(value: str) -> str | None:
    """Why ``value`` is not a qualified name (label/annotation key, topology key), or None."""
    prefix, slash, name = value.rpartition("/")
    if slash and not prefix:
        return "prefix part must be non-empty"
    if prefix and (msg := _dns1123_subdomain_msg(prefix)):
        return f"prefix part {msg}"
    if not name:
        return "name part must be non-empty"
    if len(name) > QUALIFIED_NAME_MAX_LENGTH:
        return f"name part must be no more than {QUALIFIED_NAME_MAX_LENGTH} characters (given {len(name)})"
    if not QUALIFIED_NAME_PART.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and "
            "end with an alphanumeric character (e.g. 'MyName', 'my.name', or '123-abc')"
        )
    return None


def _label_value_problem(value: str) -> str | None:
    if len(value) > LABEL_VALUE_MAX_LENGTH:
        return f"must be no more than {LABEL_VALUE_MAX_LENGTH} characters (given {len(value)})"
    if not LABEL_VALUE.match(value):
        return (
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' "
            "or '.', and must start and end with an alphanumeric character"
        )
    return None


def labels_problems(labels: Any, path: tuple) -> Iterator[tuple]:
    if not isinstance(labels, dict):
        return
    for key, value in labels.items():
        if msg := qualified_name_problem(str(key)):
            yield path + (key,), f"Invalid label key {show(key)}: {msg}"
        if isinstance(value, str) and (msg := _label_value_problem(value)):
            yield path + (key,), f"Invalid label value {show(value)}: {msg}"


def annotations_problems(annotations: Any, path: tuple) -> Iterator[tuple]:
    if not isinstance(annotations, dict):
        return
    total = 0
    for key, value in annotations.items():
        if msg := qualified_name_problem(str(key)):
            yield path + (key,), f"Invalid annotation key {show(key)}: {msg}"
        total += len(str(key)) + (len(value) if isinstance(value, str) else 0)
    if total > 256 * 1024:
        yield path, f"Too long: annotations total {total} bytes, at most 262144"


#: Kinds whose names must be DNS-1035 labels (used as DNS names); others are DNS-1123 subdomains.
_DNS1035_NAMED = {"Service", LWS_KIND}

DNS1123_LABEL_NAMED = {"Namespace"}


def metadata_problems(doc: dict[str, Any], kind: str) -> Iterator[tuple]:
    meta = doc.get("metadata")
    if meta is None:
        yield ("metadata",), "Required value: metadata.name (or generateName) must be set"
        return
    if not isinstance(meta, dict):
        return
    name, generate = meta.get("name"), meta.get("generateName")
    if not name and not generate:
        yield ("metadata", "name"), "Required value: name or generateName is required"
    checker = (
        dns1035_label_msg
        if kind in _DNS1035_NAMED
        else dns1123_label_msg
        if kind in DNS1123_LABEL_NAMED
        else _dns1123_subdomain_msg
    )
    if isinstance(name, str) and name and (msg := checker(name)):
        extra = " (the LWS name is also the name of its headless Service)" if kind == LWS_KIND else ""
        yield ("metadata", "name"), f"Invalid value {show(name)}: {msg}{extra}"
    if isinstance(generate, str) and generate and not name and (msg := checker(generate.rstrip("-") or "a")):
        yield ("metadata", "generateName"), f"Invalid value {show(generate)}: {msg}"
    ns = meta.get("namespace")
    if isinstance(ns, str) and ns and (msg := dns1123_label_msg(ns)):
        yield ("metadata", "namespace"), f"Invalid value {show(ns)}: {msg}"
    yield from labels_problems(meta.get("labels"), ("metadata", "labels"))
    yield from annotations_problems(meta.get("annotations"), ("metadata", "annotations"))


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}

_DECIMAL = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
}


def parse_quantity(value: Any) -> Decimal | None:
    """A Kubernetes quantity (``"500m"``, ``"16Gi"``, ``8``, ``"1e3"``) as a Decimal, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    if not isinstance(value, str) or not go_regex(QUANTITY_PATTERN).search(value):
        return None
    m = re.match(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(.*)\Z", value)
    if m is None:
        return None
    try:
        number, suffix = Decimal(m.group(1)), m.group(2)
        if suffix in _BINARY:
            return number * _BINARY[suffix]
        if suffix in _DECIMAL:
            return number * _DECIMAL[suffix]
        return number * (Decimal(10) ** int(Decimal(suffix[1:])))
    except (InvalidOperation, ValueError, OverflowError):
        return None
