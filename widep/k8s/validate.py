"""Validate LeaderWorkerSet manifests (and the plain Kubernetes objects beside them) without a cluster.

No API server can run where widep is developed and tested, so this module re-creates what a real
``kubectl apply --validate=strict`` against a cluster with the LWS controller would check, in layers:

``crd-schema``
    The real LWS CRD's ``openAPIV3Schema`` (read from the CRD file, never copied into widep), as the
    API server applies it: non-nullable ``null`` values pruned and schema ``default`` values applied
    first (structural defaulting), unknown fields rejected (``fieldValidation=Strict``: every object
    schema with ``properties`` gets ``additionalProperties: false``), ``int32``/``int64`` ranges,
    quantity and label-key patterns with Go regexp anchors, and ``x-kubernetes-list-type`` map/set
    uniqueness (duplicate container, volume, env or port entries).
``object-meta``
    ``metadata`` as ``apimachinery`` validates it: ObjectMeta fields and types, name syntax per kind,
    label and annotation keys and values.
``lws-webhook``
    The LWS admission webhook (``pkg/webhooks/leaderworkerset_webhook.go`` at v0.10.0) re-implemented:
    its defaulting, then DNS-1035 name, replicas range, ``size >= 1``, ``replicas*size`` overflow,
    ``maxUnavailable``/``maxSurge`` int-or-percent rules, partition, subgroup divisibility and the
    ``subgroup-exclusive-topology`` annotation.
``lws-controller``
    What fails later, when the LWS controller creates StatefulSets and pods: pod names longer than
    63 characters, StatefulSet names too long for the ``controller-revision-hash`` label, exclusive
    topology keys that are not label keys.
``core-schema``
    Leader/worker templates (wrapped as a ``PodTemplate``) and plain Service / Deployment / ConfigMap
    / ... documents against the Kubernetes JSON schemas shipped by ``kubernetes-validate`` (strict).
``core-rules``
    A focused subset of the API server's semantic pod/service validation that JSON schema cannot
    express: enums, port ranges, ``restartPolicy: Always`` for StatefulSet/Deployment pods, volume
    mounts naming a volume, resource names and ``requests <= limits`` (extended resources such as
    ``nvidia.com/gpu``: integers, requests equal to limits), selectors matching template labels.
``cross-doc``
    Warnings across documents of one file: a Service selecting a LeaderWorkerSet's pods by labels
    no template carries; ``$(LWS_...)`` references that the LWS pod webhook never injects.

A problem found by an earlier layer at a path hides later layers' problems at the same path or
below it, so one mistake is reported once. Kinds that are neither built-in nor defined by the CRD
are reported as ``note`` ("not checked"), never silently passed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Iterable, Iterator

import jsonschema
import yaml

from widep.errors import UserError, did_you_mean

#: The Kubernetes version whose core schemas check pod templates and plain documents. The LWS
#: v0.10.0 CRD embeds the Kubernetes 1.36 PodSpec, so templates are judged by the same release.
K8S_VERSION = "1.36"
#: File name of the CRD the project is built against (shipped in ``widep/k8s/data``, a byte-identical
#: copy of ``../shared/schemas``).
CRD_FILE_NAME = "lws-crd-v0.10.0.yaml"
#: The Gateway API Inference Extension CRD (InferencePool, v1.5.0), shipped beside it; always loaded.
GAIE_CRD_FILE_NAME = "inferencepool-crd-v1.5.0.yaml"
CRD_ENV = "WIDEP_LWS_CRD"

LWS_GROUP = "leaderworkerset.x-k8s.io"
LWS_KIND = "LeaderWorkerSet"
LWS_PREFIX = "leaderworkerset.sigs.k8s.io/"
EXCLUSIVE_TOPOLOGY = LWS_PREFIX + "exclusive-topology"
SUBGROUP_EXCLUSIVE_TOPOLOGY = LWS_PREFIX + "subgroup-exclusive-topology"
#: Environment variables the LWS pod webhook injects into every container (pod_utils.go).
LWS_ENV_VARS = ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX")
#: Labels the LWS controller and pod webhook put on pods; a Service may select on them.
LWS_POD_LABELS = tuple(
    LWS_PREFIX + k
    for k in (
        "name",
        "group-index",
        "worker-index",
        "group-key",
        "template-revision-hash",
        "subgroup-index",
        "subgroup-key",
    )
)

MAX_INT32 = 2**31 - 1
SEVERITIES = ("error", "warning", "note")

# The API server's quantity syntax (k8s.io/apimachinery resource.Quantity), as the CRD spells it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_EXAMPLES = "e.g. '8', '500m', '16Gi', '1.5', '2e3'"

# k8s.io/apimachinery/pkg/util/validation
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
_QUALIFIED_NAME_PART = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
_IANA_SVC_NAME = re.compile(r"[-a-z0-9]+\Z")
_PERCENT = re.compile(r"[0-9]+%\Z")
_VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# ----------------------------------------------------------------------------------------------
# Problems and paths


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


def _show(value: Any) -> str:
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


def _given(value: Any) -> str:
    """``string '8080'``, ``integer 8``, ``array``: the type and (for scalars) the value."""
    if isinstance(value, (dict, list)):
        return _type_name(value)
    return f"{_type_name(value)} {_show(value)}"


def _type_name(value: Any) -> str:
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


class _Sink:
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
            self.problems.append(
                Problem(self.doc, self.kind, self.name, format_path(path), message, layer, severity)
            )
            if severity == "error":
                self._paths.add(path)


# ----------------------------------------------------------------------------------------------
# JSON-schema machinery shared by the CRD and the core layers


def _go_regex(pattern: str) -> re.Pattern[str]:
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
    if validator.is_type(instance, "string") and not _go_regex(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_FORMATS = jsonschema.FormatChecker(formats=())


def _int_range(bits: int):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def check(value: Any) -> bool:
        return not isinstance(value, int) or isinstance(value, bool) or lo <= value <= hi

    return check


_FORMATS.checks("int32")(_int_range(32))
_FORMATS.checks("int64")(_int_range(64))

_CrdSchemaValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"pattern": _pattern_keyword}
)
_CoreSchemaValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _pattern_keyword}
)


def _pattern_message(pattern: str, value: Any) -> str:
    if pattern == QUANTITY_PATTERN:
        return f"Invalid quantity {_show(value)}: expected a number with an optional suffix ({_QUANTITY_EXAMPLES})"
    if "[A-Za-z0-9][-A-Za-z0-9_.]*" in pattern:
        return (
            f"Invalid value {_show(value)}: must be a qualified name: an optional DNS subdomain "
            "prefix and '/', then alphanumerics, '-', '_' or '.', starting and ending with an "
            "alphanumeric (e.g. 'example.com/my-key')"
        )
    return f"Invalid value {_show(value)}: must match the regex {pattern}"


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
                f'unknown field "{key}" (strict field validation rejects it).'
                f"{did_you_mean(str(key), known)}{valid}",
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
        yield path, f"Unsupported value {_show(value)}. Valid: {', '.join(options)}.{hint}"
        return
    if kw == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        types = [t for t in types if t != "null"] or types
        yield path, f"Invalid type: expected {' or '.join(types)}, given {_given(value)}"
        return
    if kw == "format":
        if expected in ("int32", "int64"):
            bits = int(expected[3:])
            yield path, (
                f"Invalid value {value}: out of range for {expected}. "
                f"Valid: {-(2 ** (bits - 1))}..{2 ** (bits - 1) - 1}"
            )
        else:
            yield path, f"Invalid value {_show(value)}: not a valid {expected}"
        return
    if kw == "pattern":
        yield path, _pattern_message(expected, value)
        return
    if kw in ("minimum", "maximum"):
        rel = ">=" if kw == "minimum" else "<="
        yield path, f"Invalid value {_show(value)}: must be {rel} {expected}"
        return
    if kw in ("maxLength", "minLength"):
        rel = "at most" if kw == "maxLength" else "at least"
        yield path, f"Invalid value {_show(value)}: must be {rel} {expected} characters"
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
            yield path, f"Invalid type: expected {' or '.join(types)}, given {_given(value)}"
            return
        best = jsonschema.exceptions.best_match(subs) if subs else None
        if best is not None:
            yield from _describe(best)
            return
    yield path, err.message


_SCHEMA_MEMO: dict[tuple[int, str], list[tuple[tuple, str]]] = {}
_SCHEMA_MEMO_MAX = 4096


def _schema_problems(validator: jsonschema.protocols.Validator, instance: Any) -> list[tuple[tuple, str]]:
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


# ----------------------------------------------------------------------------------------------
# The CRD layer


def _strictify(node: Any) -> Any:
    """A copy of a structural schema with ``additionalProperties: false`` wherever an object lists
    its properties (and nothing preserves unknown fields), without descriptions."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: _strictify(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _strictify(value)
        elif key in ("anyOf", "allOf", "oneOf") and isinstance(value, list):
            out[key] = [_strictify(sub) for sub in value]
        else:
            out[key] = value
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def apply_schema_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it before validation, in place: a ``null``
    for a non-nullable property becomes its default or is dropped, missing properties with a
    ``default`` get it, recursively (into defaulted values too). Returns ``value``."""
    if isinstance(value, dict):
        props = schema.get("properties")
        if isinstance(props, dict):
            for key in list(value):
                sub = props.get(key)
                if sub is not None and value[key] is None and not sub.get("nullable"):
                    if "default" in sub:
                        value[key] = copy.deepcopy(sub["default"])
                    else:
                        del value[key]
            for key, sub in props.items():
                if key not in value and "default" in sub:
                    value[key] = copy.deepcopy(sub["default"])
            for key, item in value.items():
                sub = props.get(key)
                if sub is not None:
                    apply_schema_defaults(sub, item)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                if not isinstance(props, dict) or key not in props:
                    apply_schema_defaults(extra, item)
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, dict):
            for item in value:
                apply_schema_defaults(items, item)
    return value


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _list_type_problems(schema: dict[str, Any], value: Any, path: tuple, out: list) -> None:
    """``x-kubernetes-list-type: map|set`` uniqueness, as the API server checks for custom resources."""
    if isinstance(value, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None
        for key, item in value.items():
            sub = props.get(key, extra)
            if sub is not None:
                _list_type_problems(sub, item, path + (key,), out)
    elif isinstance(value, list):
        kind = schema.get("x-kubernetes-list-type")
        seen: dict[Any, int] = {}
        if kind == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    continue
                key = tuple(_freeze(item.get(k)) for k in keys)
                if key in seen:
                    shown = ", ".join(f"{k}={_show(item.get(k))}" for k in keys)
                    out.append((path + (i,), f"Duplicate value: {shown} (same as [{seen[key]}]); list entries must be unique by {', '.join(keys)}"))
                else:
                    seen[key] = i
        elif kind == "set":
            for i, item in enumerate(value):
                key = _freeze(item)
                if key in seen:
                    out.append((path + (i,), f"Duplicate value: {_show(item)} (same as [{seen[key]}]); this list is a set"))
                else:
                    seen[key] = i
        items = schema.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                _list_type_problems(items, item, path + (i,), out)


@dataclasses.dataclass(frozen=True)
class CrdKind:
    """One served version of one custom resource kind, ready to validate."""

    group: str
    version: str
    kind: str
    schema: dict[str, Any]  # strictified openAPIV3Schema
    validator: Any
    status_subresource: bool


@dataclasses.dataclass(frozen=True)
class CrdSet:
    """Every kind/version defined by one CRD file."""

    source: str
    kinds: dict[tuple[str, str, str], CrdKind]

    def lookup(self, api_version: str, kind: str) -> CrdKind | None:
        group, _, version = api_version.rpartition("/")
        return self.kinds.get((group, version, kind))

    def groups(self) -> set[str]:
        return {g for g, _, _ in self.kinds}

    def kinds_in(self, group: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for g, v, k in self.kinds:
            if g == group:
                out.setdefault(k, []).append(v)
        return out


def load_crds(path: str | os.PathLike[str]) -> CrdSet:
    """Load (once per file version: cached on path, size and mtime) the CRDs in ``path``."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as err:
        raise UserError(
            f"CRD file not readable: {p} ({err.strerror}). Given: --crd {p}. "
            f"Valid: a CustomResourceDefinition YAML such as ../shared/schemas/{CRD_FILE_NAME}"
        ) from None
    return _load_crds_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _load_crds_cached(path: str, mtime_ns: int, size: int) -> CrdSet:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(path, encoding="utf-8") as fh:
            docs = [d for d in yaml.load_all(fh, Loader=loader) if d]
    except (OSError, yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise UserError(f"CRD file {path} could not be read as YAML: {err}") from None
    kinds: dict[tuple[str, str, str], CrdKind] = {}
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
            continue
        spec = doc.get("spec") or {}
        group, kind = spec.get("group"), (spec.get("names") or {}).get("kind")
        for ver in spec.get("versions") or []:
            raw = ((ver.get("schema") or {}).get("openAPIV3Schema")) if ver.get("served", True) else None
            if not (group and kind and isinstance(raw, dict)):
                continue
            strict = _strictify(raw)
            validator = _CrdSchemaValidator(strict, format_checker=_FORMATS)
            status = "status" in ((ver.get("subresources") or {}))
            kinds[(group, ver["name"], kind)] = CrdKind(group, ver["name"], kind, strict, validator, status)
    if not kinds:
        raise UserError(
            f"{path} defines no served CustomResourceDefinition version with an openAPIV3Schema. "
            f"Valid: the LWS CRD, e.g. ../shared/schemas/{CRD_FILE_NAME}"
        )
    return CrdSet(path, kinds)


# ----------------------------------------------------------------------------------------------
# Core Kubernetes schemas (kubernetes-validate's bundled JSON schemas, strict variant)

_QUANTITY_DEF = "io.k8s.apimachinery.pkg.api.resource.Quantity"
_OBJECT_META_DEF = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


class CoreSchemas:
    """Validators for built-in kinds of one Kubernetes minor version, built on first use.

    The schemas are kubernetes-validate's ``v<version>-local-strict`` files (unknown fields
    rejected). Two things are added: quantities must match the API server's quantity syntax
    (the bundled schema accepts any string), and ``int32``/``int64`` ranges are checked.
    """

    def __init__(self, version: str) -> None:
        import importlib_resources
        from kubernetes_validate import utils as kv
        from referencing import Registry, Resource

        versions = kv.all_versions()
        full = [v for v in versions if kv.major_minor(v) == version]
        if not full:
            raise UserError(
                f"kubernetes-validate has no schemas for Kubernetes {version}. Given: {version}. "
                f"Valid: {', '.join(kv.major_minor(v) for v in versions)}"
            )
        self.version = version
        self._dir = importlib_resources.files("kubernetes_validate").joinpath("kubernetes-json-schema").joinpath(
            f"v{full[-1]}-local-strict"
        )
        defs = json.loads(self._dir.joinpath("_definitions.json").read_text(encoding="utf-8"))
        defs["$defs"][_QUANTITY_DEF] = {
            "anyOf": [{"type": "string", "pattern": QUANTITY_PATTERN}, {"type": "number"}, {"type": "null"}]
        }
        self._defs_id = defs["$id"]
        self._registry = Registry().with_resource(self._defs_id, Resource.from_contents(defs))
        self._validators: dict[str, Any] = {}
        self._names = {entry.name for entry in self._dir.iterdir()}
        self._served: dict[str, dict[str, str]] = {}

    @staticmethod
    def _file_suffix(api_version: str) -> str:
        # the naming kubernetes_validate.validate() uses: rbac.authorization.k8s.io/v1 -> rbac-v1
        return re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)

    def _load(self, file_name: str) -> dict[str, Any] | None:
        if file_name not in self._names:
            return None
        return json.loads(self._dir.joinpath(file_name).read_text(encoding="utf-8"))

    def validator(self, api_version: str, kind: str) -> Any | None:
        """The validator of a built-in ``apiVersion``/``kind``, or None if it is not one."""
        key = f"{api_version}/{kind}"
        if key not in self._validators:
            schema = self._load(f"{kind.lower()}-{self._file_suffix(api_version)}.json")
            group, _, version = api_version.rpartition("/")
            gvks = (schema or {}).get("x-kubernetes-group-version-kind") or []
            if schema is not None and any(
                g.get("group", "") == group and g.get("version") == version and g.get("kind") == kind for g in gvks
            ):
                self._validators[key] = _CoreSchemaValidator(schema, registry=self._registry, format_checker=_FORMATS)
            else:
                self._validators[key] = None
        return self._validators[key]

    def served_kinds(self, api_version: str) -> dict[str, str]:
        """Kinds (lowercase -> spelling) served for a built-in ``apiVersion``; empty if none."""
        if api_version not in self._served:
            group, _, version = api_version.rpartition("/")
            suffix = f"-{self._file_suffix(api_version)}.json"
            kinds: dict[str, str] = {}
            for name in sorted(self._names):
                if not name.endswith(suffix):
                    continue
                for gvk in (self._load(name) or {}).get("x-kubernetes-group-version-kind") or []:
                    if gvk.get("group", "") == group and gvk.get("version") == version and not gvk["kind"].endswith("List"):
                        kinds[gvk["kind"].lower()] = gvk["kind"]
            self._served[api_version] = kinds
        return self._served[api_version]

    def definition_validator(self, definition: str) -> Any:
        key = "#" + definition
        if key not in self._validators:
            schema = {"$ref": f"{self._defs_id}#/$defs/{definition}"}
            self._validators[key] = _CoreSchemaValidator(schema, registry=self._registry, format_checker=_FORMATS)
        return self._validators[key]


def core_schemas(version: str = K8S_VERSION) -> CoreSchemas:
    """The core schemas of one Kubernetes minor version, e.g. ``"1.36"``, built once per process."""
    return _core_schemas_cached(version)


@functools.lru_cache(maxsize=4)
def _core_schemas_cached(version: str) -> CoreSchemas:
    return CoreSchemas(version)


def _is_builtin_group(group: str) -> bool:
    """Groups Kubernetes itself serves: the core group, dot-less groups (apps, batch, ...) and
    ``*.k8s.io`` (but not ``*.x-k8s.io`` or ``*.sigs.k8s.io`` projects)."""
    if group == "" or "." not in group:
        return True
    return group.endswith(".k8s.io") and not group.endswith((".x-k8s.io", ".sigs.k8s.io"))


# ----------------------------------------------------------------------------------------------
# Name, label and annotation rules (k8s.io/apimachinery validation)


def _dns1123_label_msg(value: str) -> str | None:
    if len(value) > 63:
        return f"must be no more than 63 characters (given {len(value)})"
    if not _DNS1123_LABEL.match(value):
        return (
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
            "and must start and end with an alphanumeric character (e.g. 'my-name', or '123-abc')"
        )
    return None


def _dns1035_label_msg(value: str) -> str | None:
    if len(value) > 63:
        return f"must be no more than 63 characters (given {len(value)})"
    if not _DNS1035_LABEL.match(value):
        return (
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with "
            "an alphabetic character, and end with an alphanumeric character (e.g. 'my-name', or 'abc-123')"
        )
    return None


def _dns1123_subdomain_msg(value: str) -> str | None:
    if len(value) > 253:
        return f"must be no more than 253 characters (given {len(value)})"
    if not _DNS1123_SUBDOMAIN.match(value):
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
    if len(name) > 63:
        return f"name part must be no more than 63 characters (given {len(name)})"
    if not _QUALIFIED_NAME_PART.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and "
            "end with an alphanumeric character (e.g. 'MyName', 'my.name', or '123-abc')"
        )
    return None


def _label_value_problem(value: str) -> str | None:
    if len(value) > 63:
        return f"must be no more than 63 characters (given {len(value)})"
    if not _LABEL_VALUE.match(value):
        return (
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' "
            "or '.', and must start and end with an alphanumeric character"
        )
    return None


def _labels_problems(labels: Any, path: tuple) -> Iterator[tuple]:
    if not isinstance(labels, dict):
        return
    for key, value in labels.items():
        if msg := qualified_name_problem(str(key)):
            yield path + (key,), f"Invalid label key {_show(key)}: {msg}"
        if isinstance(value, str) and (msg := _label_value_problem(value)):
            yield path + (key,), f"Invalid label value {_show(value)}: {msg}"


def _annotations_problems(annotations: Any, path: tuple) -> Iterator[tuple]:
    if not isinstance(annotations, dict):
        return
    total = 0
    for key, value in annotations.items():
        if msg := qualified_name_problem(str(key)):
            yield path + (key,), f"Invalid annotation key {_show(key)}: {msg}"
        total += len(str(key)) + (len(value) if isinstance(value, str) else 0)
    if total > 256 * 1024:
        yield path, f"Too long: annotations total {total} bytes, at most 262144"


#: Kinds whose names must be DNS-1035 labels (used as DNS names); others are DNS-1123 subdomains.
_DNS1035_NAMED = {"Service", LWS_KIND}
_DNS1123_LABEL_NAMED = {"Namespace"}


def _metadata_problems(doc: dict[str, Any], kind: str) -> Iterator[tuple]:
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
        _dns1035_label_msg
        if kind in _DNS1035_NAMED
        else _dns1123_label_msg
        if kind in _DNS1123_LABEL_NAMED
        else _dns1123_subdomain_msg
    )
    if isinstance(name, str) and name and (msg := checker(name)):
        extra = " (the LWS name is also the name of its headless Service)" if kind == LWS_KIND else ""
        yield ("metadata", "name"), f"Invalid value {_show(name)}: {msg}{extra}"
    if isinstance(generate, str) and generate and not name and (msg := checker(generate.rstrip("-") or "a")):
        yield ("metadata", "generateName"), f"Invalid value {_show(generate)}: {msg}"
    ns = meta.get("namespace")
    if isinstance(ns, str) and ns and (msg := _dns1123_label_msg(ns)):
        yield ("metadata", "namespace"), f"Invalid value {_show(ns)}: {msg}"
    yield from _labels_problems(meta.get("labels"), ("metadata", "labels"))
    yield from _annotations_problems(meta.get("annotations"), ("metadata", "annotations"))


# ----------------------------------------------------------------------------------------------
# Quantities


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
            "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
            "P": Decimal("1e15"), "E": Decimal("1e18")}


def parse_quantity(value: Any) -> Decimal | None:
    """A Kubernetes quantity (``"500m"``, ``"16Gi"``, ``8``, ``"1e3"``) as a Decimal, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    if not isinstance(value, str) or not _go_regex(QUANTITY_PATTERN).search(value):
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


# ----------------------------------------------------------------------------------------------
# Core semantic rules (a focused subset of k8s.io/kubernetes/pkg/apis/core/validation)

_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_PROTOCOLS = ("TCP", "UDP", "SCTP")
_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
_STANDARD_CONTAINER_RESOURCES = ("cpu", "memory", "ephemeral-storage")


def _is_extended_resource(name: str) -> bool:
    return "/" in name and not name.split("/", 1)[0].endswith("kubernetes.io") and not name.startswith("requests.")


def _port_problem(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and not 1 <= value <= 65535:
        return f"Invalid value {value}: must be between 1 and 65535, inclusive"
    return None


def _iana_svc_name_problem(name: str) -> str | None:
    if len(name) > 15:
        return f"must be no more than 15 characters (given {len(name)})"
    if not _IANA_SVC_NAME.match(name):
        return "must contain only lowercase alphanumeric characters (a-z, 0-9) and '-'"
    if "--" in name:
        return "must not contain consecutive hyphens"
    if name.startswith("-") or name.endswith("-"):
        return "must not begin or end with a hyphen"
    if not re.search("[a-z]", name):
        return "must contain at least one letter (a-z)"
    return None


def _resources_problems(res: Any, path: tuple) -> Iterator[tuple]:
    if not isinstance(res, dict):
        return
    parsed: dict[str, dict[str, Decimal]] = {}
    for section in ("limits", "requests"):
        values = res.get(section)
        if not isinstance(values, dict):
            continue
        parsed[section] = {}
        for name, raw in values.items():
            p = path + (section, name)
            name = str(name)
            if "/" not in name:
                if name not in _STANDARD_CONTAINER_RESOURCES and not name.startswith("hugepages-"):
                    known = ("nvidia.com/gpu", "amd.com/gpu", "google.com/tpu")
                    hint = next((f" Did you mean {k!r}?" for k in known if k.endswith("/" + name)), "")
                    hint = hint or did_you_mean(name, list(_STANDARD_CONTAINER_RESOURCES))
                    yield p, (
                        f"Invalid resource name {_show(name)}: must be a standard resource "
                        f"({', '.join(_STANDARD_CONTAINER_RESOURCES)}, hugepages-<size>) or fully "
                        f"qualified (e.g. 'nvidia.com/gpu').{hint}"
                    )
                    continue
            elif msg := qualified_name_problem(name):
                yield p, f"Invalid resource name {_show(name)}: {msg}"
                continue
            q = parse_quantity(raw)
            if q is None:
                continue  # the schema layers report malformed quantities
            if q < 0:
                yield p, f"Invalid value {_show(raw)}: must be greater than or equal to 0"
                continue
            if _is_extended_resource(name) and q != q.to_integral_value():
                yield p, f"Invalid value {_show(raw)}: {name} must be a whole number (extended resources cannot be fractional)"
                continue
            parsed[section][name] = q
    limits, requests = parsed.get("limits", {}), parsed.get("requests", {})
    raw_limits = res.get("limits") if isinstance(res.get("limits"), dict) else {}
    for name, req in requests.items():
        lim = limits.get(name)
        if name in raw_limits and lim is None:
            continue  # the limit itself is invalid and already reported
        if _is_extended_resource(name):
            if lim is None:
                yield path + ("requests", name), (
                    f"Required value: a limit must be set for {name} (extended resources cannot be "
                    f"overcommitted; set limits[{name}] equal to the request)"
                )
            elif lim != req:
                yield path + ("requests", name), (
                    f"Invalid value {_show(res['requests'][name])}: must be equal to the {name} limit "
                    f"{_show(res['limits'][name])}"
                )
        elif lim is not None and req > lim:
            yield path + ("requests", name), (
                f"Invalid value {_show(res['requests'][name])}: must be less than or equal to the "
                f"{name} limit {_show(res['limits'][name])}"
            )


def _pod_template_problems(
    template: Any, path: tuple, *, owner: str, claim_names: Iterable[str] = ()
) -> Iterator[tuple]:
    """Semantic checks the API server runs on the pods (or the StatefulSet/Deployment) built from
    ``template``. ``owner`` names what creates the pods, for messages."""
    if not isinstance(template, dict):
        return
    meta = template.get("metadata")
    if isinstance(meta, dict):
        yield from _labels_problems(meta.get("labels"), path + ("metadata", "labels"))
        yield from _annotations_problems(meta.get("annotations"), path + ("metadata", "annotations"))
    spec = template.get("spec")
    if not isinstance(spec, dict):
        return
    sp = path + ("spec",)
    restart = spec.get("restartPolicy")
    if isinstance(restart, str) and restart != "Always":
        yield sp + ("restartPolicy",), (
            f"Unsupported value {_show(restart)}: {owner} pods must use 'Always'. Valid: Always"
        )
    volumes = spec.get("volumes") if isinstance(spec.get("volumes"), list) else []
    volume_names: dict[str, int] = {}
    for i, vol in enumerate(volumes):
        if not isinstance(vol, dict) or not isinstance(vol.get("name"), str):
            continue
        vname = vol["name"]
        if msg := _dns1123_label_msg(vname):
            yield sp + ("volumes", i, "name"), f"Invalid value {_show(vname)}: {msg}"
        if vname in volume_names:
            yield sp + ("volumes", i, "name"), f"Duplicate value: {_show(vname)} (same as volumes[{volume_names[vname]}])"
        volume_names.setdefault(vname, i)
    mountable = set(volume_names) | set(claim_names)
    container_names: dict[str, tuple] = {}
    port_names: dict[str, tuple] = {}
    for list_name in ("initContainers", "containers"):
        containers = spec.get(list_name)
        if not isinstance(containers, list):
            continue
        for i, c in enumerate(containers):
            if not isinstance(c, dict):
                continue
            cp = sp + (list_name, i)
            cname = c.get("name")
            if isinstance(cname, str):
                if msg := _dns1123_label_msg(cname):
                    yield cp + ("name",), f"Invalid value {_show(cname)}: {msg}"
                if cname in container_names:
                    yield cp + ("name",), f"Duplicate value: {_show(cname)} (same as {format_path(container_names[cname])})"
                container_names.setdefault(cname, cp)
            if not c.get("image"):
                yield cp + ("image",), "Required value: a container image must be set"
            crp = c.get("restartPolicy")
            if crp is not None and (list_name == "containers" or crp != "Always"):
                yield cp + ("restartPolicy",), (
                    f"Unsupported value {_show(crp)}: only init containers take a restartPolicy, and only 'Always' "
                    "(a native sidecar, Kubernetes >= 1.29). Valid: Always on initContainers"
                )
            policy = c.get("imagePullPolicy")
            if isinstance(policy, str) and policy not in _PULL_POLICIES:
                yield cp + ("imagePullPolicy",), (
                    f"Unsupported value {_show(policy)}. Valid: {', '.join(_PULL_POLICIES)}.{did_you_mean(policy, _PULL_POLICIES)}"
                )
            for j, port in enumerate(c.get("ports") if isinstance(c.get("ports"), list) else []):
                if not isinstance(port, dict):
                    continue
                pp = cp + ("ports", j)
                if msg := _port_problem(port.get("containerPort")):
                    yield pp + ("containerPort",), msg
                host = port.get("hostPort")
                if host not in (None, 0) and (msg := _port_problem(host)):
                    yield pp + ("hostPort",), msg
                proto = port.get("protocol")
                if isinstance(proto, str) and proto not in _PROTOCOLS:
                    yield pp + ("protocol",), f"Unsupported value {_show(proto)}. Valid: {', '.join(_PROTOCOLS)}.{did_you_mean(proto, _PROTOCOLS)}"
                pname = port.get("name")
                if isinstance(pname, str) and pname:
                    if msg := _iana_svc_name_problem(pname):
                        yield pp + ("name",), f"Invalid value {_show(pname)}: {msg}"
                    elif pname in port_names:
                        yield pp + ("name",), f"Duplicate value: port name {_show(pname)} (same as {format_path(port_names[pname])})"
                    port_names.setdefault(pname, pp)
            yield from _resources_problems(c.get("resources"), cp + ("resources",))
            for j, mount in enumerate(c.get("volumeMounts") if isinstance(c.get("volumeMounts"), list) else []):
                if isinstance(mount, dict) and isinstance(mount.get("name"), str) and mount["name"] not in mountable:
                    known = sorted(mountable)
                    yield cp + ("volumeMounts", j, "name"), (
                        f"Not found: {_show(mount['name'])} is not a volume of this pod. "
                        f"Valid: {', '.join(known) if known else '(no volumes defined)'}.{did_you_mean(mount['name'], known)}"
                    )


def _lws_env_ref_problems(template: Any, path: tuple) -> Iterator[tuple]:
    """``$(LWS_...)`` references to variables the LWS pod webhook never injects (Kubernetes would
    leave the text unexpanded)."""
    spec = template.get("spec") if isinstance(template, dict) else None
    if not isinstance(spec, dict):
        return
    for list_name in ("initContainers", "containers"):
        containers = spec.get(list_name)
        for i, c in enumerate(containers if isinstance(containers, list) else []):
            if not isinstance(c, dict):
                continue
            env = c.get("env") if isinstance(c.get("env"), list) else []
            defined = {e.get("name") for e in env if isinstance(e, dict) and isinstance(e.get("name"), str)}
            defined |= set(LWS_ENV_VARS)
            places: list[tuple[tuple, Any]] = []
            for field in ("command", "args"):
                for j, arg in enumerate(c.get(field) if isinstance(c.get(field), list) else []):
                    places.append(((field, j), arg))
            for j, e in enumerate(env):
                if isinstance(e, dict):
                    places.append((("env", j, "value"), e.get("value")))
            for sub, text in places:
                if not isinstance(text, str):
                    continue
                for ref in _VAR_REF.findall(text):
                    if ref.startswith("LWS_") and ref not in defined:
                        yield path + ("spec", list_name, i) + sub, (
                            f"$({ref}) is not injected by the LWS pod webhook and not defined in env, so it "
                            f"stays literal. Valid: {', '.join(LWS_ENV_VARS)}.{did_you_mean(ref, LWS_ENV_VARS)}"
                        ), "warning"


def _service_problems(doc: dict[str, Any]) -> Iterator[tuple]:
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return
    stype = spec.get("type", "ClusterIP")
    if isinstance(stype, str) and stype not in _SERVICE_TYPES:
        yield ("spec", "type"), f"Unsupported value {_show(stype)}. Valid: {', '.join(_SERVICE_TYPES)}.{did_you_mean(stype, _SERVICE_TYPES)}"
    ports = spec.get("ports")
    if not ports and stype != "ExternalName" and spec.get("clusterIP") != "None":
        yield ("spec", "ports"), "Required value: a Service needs at least one port (unless headless or ExternalName)"
    ports = ports if isinstance(ports, list) else []
    names: dict[str, int] = {}
    for i, port in enumerate(ports):
        if not isinstance(port, dict):
            continue
        pp = ("spec", "ports", i)
        if msg := _port_problem(port.get("port")):
            yield pp + ("port",), msg
        target = port.get("targetPort")
        if isinstance(target, str):
            if msg := _iana_svc_name_problem(target):
                yield pp + ("targetPort",), f"Invalid value {_show(target)}: a named targetPort {msg}"
        elif target not in (None, 0) and (msg := _port_problem(target)):
            yield pp + ("targetPort",), msg
        proto = port.get("protocol")
        if isinstance(proto, str) and proto not in _PROTOCOLS:
            yield pp + ("protocol",), f"Unsupported value {_show(proto)}. Valid: {', '.join(_PROTOCOLS)}"
        name = port.get("name")
        if len(ports) > 1 and not name:
            yield pp + ("name",), "Required value: port names are required when a Service has more than one port"
        if isinstance(name, str) and name:
            if name in names:
                yield pp + ("name",), f"Duplicate value: {_show(name)} (same as ports[{names[name]}])"
            names.setdefault(name, i)
    yield from _labels_problems(spec.get("selector"), ("spec", "selector"))


def _workload_problems(doc: dict[str, Any], kind: str) -> Iterator[tuple]:
    """Deployment / StatefulSet / ReplicaSet / DaemonSet: selector vs template labels, pod rules."""
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return
    template = spec.get("template")
    selector = spec.get("selector")
    if selector is None:
        yield ("spec", "selector"), "Required value: apps/v1 workloads must set spec.selector"
    elif isinstance(selector, dict) and isinstance(template, dict):
        labels = _get(template, "metadata", "labels")
        labels = labels if isinstance(labels, dict) else {}
        match = selector.get("matchLabels") or {}
        if isinstance(match, dict) and isinstance(labels, dict):
            missing = {k: v for k, v in match.items() if labels.get(k) != v}
            if missing:
                yield ("spec", "template", "metadata", "labels"), (
                    f"Invalid value: selector does not match template labels (selector needs "
                    f"{', '.join(f'{k}={v}' for k, v in missing.items())}; template has "
                    f"{', '.join(f'{k}={v}' for k, v in labels.items()) or 'no labels'})"
                )
    claims = _claim_names(spec.get("volumeClaimTemplates"))
    yield from _pod_template_problems(template, ("spec", "template"), owner=kind, claim_names=claims)


# ----------------------------------------------------------------------------------------------
# The LWS webhook and controller layers


def _get(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...`` or None when a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _claim_names(claims: Any) -> list[str]:
    """Names of volumeClaimTemplates (StatefulSet/LWS), which pods may mount like volumes."""
    names = [_get(c, "metadata", "name") for c in claims] if isinstance(claims, list) else []
    return [n for n in names if isinstance(n, str) and n]


def _int(value: Any) -> int | None:
    """An int32 value as the webhook's Go types would hold it; None for anything else (the
    schema layer reports those)."""
    if isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value <= MAX_INT32:
        return value
    return None


def _scaled(value: Any, total: int, round_up: bool) -> int | None:
    """intstr.GetScaledValueFromIntOrPercent; None when the value is not an int or ``N%``."""
    if _int(value) is not None:
        return value
    if isinstance(value, str) and value.endswith("%"):
        try:
            pct = int(value[:-1])
        except ValueError:
            return None
        exact = pct * total / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return None


def _webhook_defaults(lws: dict[str, Any]) -> None:
    """The LWS mutating webhook (Default()), in place, after schema defaulting."""
    spec = lws.setdefault("spec", {})
    if not isinstance(spec, dict):
        return
    lwt = spec.get("leaderWorkerTemplate")
    if isinstance(lwt, dict):
        if not lwt.get("restartPolicy"):
            lwt["restartPolicy"] = "RecreateGroupOnPodRestart"
        if lwt.get("restartPolicy") == "Default":
            lwt["restartPolicy"] = "None"
    rollout = spec.setdefault("rolloutStrategy", {})
    if isinstance(rollout, dict):
        if not rollout.get("type"):
            rollout["type"] = "RollingUpdate"
        if rollout["type"] == "RollingUpdate" and rollout.get("rollingUpdateConfiguration") is None:
            rollout["rollingUpdateConfiguration"] = {"maxUnavailable": 1, "maxSurge": 0, "partition": 0}
    net = spec.get("networkConfig")
    if net is None:
        spec["networkConfig"] = {"subdomainPolicy": "Shared"}
    elif isinstance(net, dict) and net.get("subdomainPolicy") is None:
        net["subdomainPolicy"] = "Shared"


def _int_or_percent_problems(value: Any, path: tuple) -> Iterator[tuple]:
    """ValidatePositiveIntOrPercent + IsNotMoreThan100Percent of the LWS webhook."""
    if isinstance(value, str):
        if not _PERCENT.match(value):
            yield path, (
                f"Invalid value {_show(value)}: a valid percent string must be a numeric string "
                "followed by an ending '%' (e.g. '1%', or '93%'); or give a non-negative integer"
            )
        elif int(value[:-1]) > 100:
            yield path, f"Invalid value {_show(value)}: must not be greater than 100%"
    elif _int(value) is not None and value < 0:
        yield path, f"Invalid value {value}: must be greater than or equal to 0"


def _lws_webhook_problems(raw: dict[str, Any], lws: dict[str, Any]) -> Iterator[tuple]:
    """generalValidate() of the LWS validating webhook on the defaulted object ``lws``."""
    if "spec" not in raw:
        yield ("spec",), (
            "Required value: a LeaderWorkerSet needs spec.leaderWorkerTemplate (the webhook "
            "dereferences spec.leaderWorkerTemplate.size, which only exists with it)"
        )
        return
    spec = lws.get("spec")
    if not isinstance(spec, dict):
        return
    lwt = spec.get("leaderWorkerTemplate") if isinstance(spec.get("leaderWorkerTemplate"), dict) else {}
    replicas, size = _int(spec.get("replicas")), _int(lwt.get("size"))
    rp, sp = ("spec", "replicas"), ("spec", "leaderWorkerTemplate", "size")
    if replicas is not None:
        if replicas < 0:
            yield rp, f"Invalid value {replicas}: replicas must be equal or greater than 0"
        if replicas > 1_000_000:
            yield rp, f"Invalid value {replicas}: replicas must be equal or less than 1000000"
    if size is not None and size < 1:
        yield sp, f"Invalid value {size}: size must be equal or greater than 1 (size counts the leader: 1 leader + size-1 workers)"
    if replicas is not None and size is not None and replicas * size > MAX_INT32:
        yield rp, (
            f"Invalid value {replicas}: the product of replicas and size ({replicas} × {size} = "
            f"{replicas * size}) must not exceed {MAX_INT32}"
        )
    if lwt.get("restartPolicy") == "None" and (
        _get(raw, "spec", "leaderWorkerTemplate", "restartPolicy") == "Default"
    ):
        yield ("spec", "leaderWorkerTemplate", "restartPolicy"), (
            "'Default' is deprecated; the LWS webhook rewrites it to 'None'. Write 'None' (or "
            "RecreateGroupOnPodRestart / RecreateGroupAfterStart) explicitly"
        ), "note"

    rollout = spec.get("rolloutStrategy") if isinstance(spec.get("rolloutStrategy"), dict) else {}
    ruc = rollout.get("rollingUpdateConfiguration")
    if isinstance(ruc, dict):
        base = ("spec", "rolloutStrategy", "rollingUpdateConfiguration")
        mu, ms = ruc.get("maxUnavailable"), ruc.get("maxSurge")
        bad = set()
        for key, value in (("maxUnavailable", mu), ("maxSurge", ms)):
            found = list(_int_or_percent_problems(value, base + (key,)))
            if found:
                bad.add(key)
            yield from found
        partition = _int(ruc.get("partition"))
        if partition is not None and partition < 0:
            yield base + ("partition",), f"Invalid value {partition}: must be greater than or equal to 0"
        if replicas is not None and not bad:
            muv, msv = _scaled(mu, replicas, False), _scaled(ms, replicas, True)
            if muv == 0 and msv == 0 and replicas != 0:
                yield base + ("maxUnavailable",), (
                    f"Invalid value {_show(mu)}: must not be 0 when `maxSurge` is 0 (with {replicas} "
                    f"replicas maxUnavailable={_show(mu)} allows {muv} and maxSurge={_show(ms)} adds {msv} "
                    "groups, so a rolling update could never proceed)"
                )

    policy = lwt.get("subGroupPolicy")
    sgp = ("spec", "leaderWorkerTemplate", "subGroupPolicy", "subGroupSize")
    annotations = _get(lws, "metadata", "annotations")
    annotations = annotations if isinstance(annotations, dict) else {}
    if isinstance(policy, dict):
        sgs = policy.get("subGroupSize")
        if sgs is None:
            yield sgp, "Required value: subGroupSize must be set when subGroupPolicy is given (the LWS webhook dereferences it)"
        elif _int(sgs) is not None and size is not None:
            if sgs < 1:
                yield sgp, f"Invalid value {sgs}: subGroupSize must be equal or greater than 1"
            else:
                if size % sgs != 0 and (size - 1) % sgs != 0:
                    yield sgp, f"Invalid value {sgs}: size or size - 1 must be divisible by subGroupSize (size is {size})"
                if size < sgs:
                    yield sgp, f"Invalid value {sgs}: subGroupSize cannot be larger than size ({size})"
                if policy.get("subGroupPolicyType") == "LeaderExcluded" and (size - 1) % sgs != 0:
                    yield sgp, f"Invalid value {sgs}: size-1 must be divisible by subGroupSize when using LeaderExcluded (size - 1 is {size - 1})"
    elif SUBGROUP_EXCLUSIVE_TOPOLOGY in annotations:
        yield ("metadata", "annotations", SUBGROUP_EXCLUSIVE_TOPOLOGY), (
            f"Invalid value {_show(annotations[SUBGROUP_EXCLUSIVE_TOPOLOGY])}: cannot have "
            "subgroup-exclusive-topology without subGroupSize set (add spec.leaderWorkerTemplate.subGroupPolicy)"
        )


def _lws_controller_problems(lws: dict[str, Any]) -> Iterator[tuple]:
    """Failures that surface only when the LWS controller creates StatefulSets and pods."""
    meta = lws.get("metadata") if isinstance(lws.get("metadata"), dict) else {}
    spec = lws.get("spec") if isinstance(lws.get("spec"), dict) else {}
    lwt = spec.get("leaderWorkerTemplate") if isinstance(spec.get("leaderWorkerTemplate"), dict) else {}
    annotations = meta.get("annotations") if isinstance(meta.get("annotations"), dict) else {}
    for key in (EXCLUSIVE_TOPOLOGY, SUBGROUP_EXCLUSIVE_TOPOLOGY):
        value = annotations.get(key)
        if isinstance(value, str) and (msg := qualified_name_problem(value)):
            yield ("metadata", "annotations", key), (
                f"Invalid topology key {_show(value)}: {msg}. The pod webhook copies it into "
                "podAffinity/podAntiAffinity topologyKey, so every pod would be rejected "
                "(e.g. 'kubernetes.io/hostname', 'cloud.google.com/gke-nodepool')"
            )
    name, replicas, size = meta.get("name"), _int(spec.get("replicas")), _int(lwt.get("size"))
    if not isinstance(name, str) or not name or replicas is None or size is None or replicas < 1 or size < 1:
        return
    if _dns1035_label_msg(name):
        return  # already an error of the name itself
    last = replicas - 1
    if size > 1:
        pod = f"{name}-{last}-{size - 1}"
        if len(pod) > 63:
            keep = 63 - len(f"-{last}-{size - 1}")
            yield ("metadata", "name"), (
                f"Too long for this size: worker pod {pod!r} has {len(pod)} characters; StatefulSet pods "
                f"use their name as hostname and label value (at most 63), so they could not be created. "
                f"Valid: a name of at most {keep} characters for replicas={replicas}, size={size}"
            )
            return
    sts = f"{name}-{last}" if size > 1 else name
    if len(sts) > 52:
        yield ("metadata", "name"), (
            f"StatefulSet {sts!r} has {len(sts)} characters (more than 52): its pods' "
            "controller-revision-hash label '<statefulset>-<hash of up to 10 characters>' can exceed "
            f"63 characters and the StatefulSet controller then fails to create them. Keep the name at most "
            f"{52 - (len(sts) - len(name))} characters"
        ), "warning"


# ----------------------------------------------------------------------------------------------
# Putting the layers together


def _split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _wrap_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "lws-template"}, "template": template}


def _validate_lws(sink: _Sink, doc: dict[str, Any], crd: CrdKind, core: CoreSchemas) -> dict[str, Any]:
    """All layers for one custom resource of the CRD; returns the defaulted object."""
    obj = copy.deepcopy(doc)
    notes = []
    if crd.status_subresource and "status" in obj:
        obj.pop("status")
        notes.append((("status",), "ignored: status is a subresource, the API server drops it on create", "note"))
    apply_schema_defaults(crd.schema, obj)
    found = _schema_problems(crd.validator, obj)
    lists: list[tuple] = []
    _list_type_problems(crd.schema, obj, (), lists)
    sink.extend("crd-schema", found + lists + notes)
    if not found:
        from widep.k8s.cel import cel_problems

        sink.extend("crd-cel", list(cel_problems(crd.schema, obj)))
    if isinstance(doc.get("metadata"), dict):
        meta = [(("metadata",) + p, m) for p, m in _schema_problems(core.definition_validator(_OBJECT_META_DEF), doc["metadata"])]
    else:
        meta = []
    sink.extend("object-meta", meta + list(_metadata_problems(doc, crd.kind)))
    if crd.group != LWS_GROUP or crd.kind != LWS_KIND:
        return obj
    _webhook_defaults(obj)
    sink.extend("lws-webhook", list(_lws_webhook_problems(doc, obj)))
    sink.extend("lws-controller", list(_lws_controller_problems(obj)))
    lwt = _get(obj, "spec", "leaderWorkerTemplate")
    raw_lwt = _get(doc, "spec", "leaderWorkerTemplate")
    if not isinstance(lwt, dict) or not isinstance(raw_lwt, dict):
        return obj
    claims = _claim_names(lwt.get("volumeClaimTemplates"))
    base = ("spec", "leaderWorkerTemplate")
    core_found: list[tuple] = []
    rules_found: list[tuple] = []
    for key in ("leaderTemplate", "workerTemplate"):
        template = raw_lwt.get(key)
        if not isinstance(template, dict):
            continue
        validator = core.validator("v1", "PodTemplate")
        for path, message in _schema_problems(validator, _wrap_pod_template(template)):
            if path[:1] == ("template",):
                core_found.append((base + (key,) + path[1:], message))
        rules_found.extend(
            _pod_template_problems(
                lwt.get(key), base + (key,), owner="StatefulSet (one per LWS group)", claim_names=claims
            )
        )
        rules_found.extend(_lws_env_ref_problems(template, base + (key,)))
    sink.extend("core-schema", core_found)
    sink.extend("core-rules", rules_found)
    return obj


def _validate_core(sink: _Sink, doc: dict[str, Any], kind: str, validator: Any) -> None:
    sink.extend("core-schema", _schema_problems(validator, doc))
    rules = list(_metadata_problems(doc, kind))
    if kind == "Service":
        rules.extend(_service_problems(doc))
    elif kind in ("Deployment", "StatefulSet", "ReplicaSet", "DaemonSet"):
        rules.extend(_workload_problems(doc, kind))
    sink.extend("core-rules", rules)
    if kind == "Deployment":
        from widep.k8s.frontdoor import router_container_problems

        sink.extend("front-door", router_container_problems(doc))


def _service_lws_problems(service: dict[str, Any], lws_by_name: dict[str, dict[str, Any]]) -> Iterator[tuple]:
    """A Service that selects ``leaderworkerset.sigs.k8s.io/name: X`` must be able to match pods
    of LWS X (when X is in the same file)."""
    selector = _get(service, "spec", "selector")
    if not isinstance(selector, dict) or LWS_PREFIX + "name" not in selector:
        return
    target = selector[LWS_PREFIX + "name"]
    lws = lws_by_name.get(target) if isinstance(target, str) else None
    if lws is None:
        return
    lwt = _get(lws, "spec", "leaderWorkerTemplate")
    wanted = {k: v for k, v in selector.items() if k not in LWS_POD_LABELS}
    matches = []
    for key in ("leaderTemplate", "workerTemplate"):
        template = lwt.get(key) if isinstance(lwt, dict) else None
        if not isinstance(template, dict):
            continue
        labels = _get(template, "metadata", "labels")
        labels = labels if isinstance(labels, dict) else {}
        if all(labels.get(k) == v for k, v in wanted.items()):
            matches.append(key)
    if not matches:
        yield ("spec", "selector"), (
            f"selects no pod of LeaderWorkerSet {target!r}: no leader/worker template has the labels "
            f"{', '.join(f'{k}={v}' for k, v in wanted.items())}, so the Service would have no endpoints"
        ), "warning"


def _with_shipped_crds(crds: CrdSet) -> CrdSet:
    """``crds`` plus the kinds of the InferencePool CRD shipped in widep (``crds`` wins on overlap)."""
    gaie = load_crds(packaged_crd(GAIE_CRD_FILE_NAME))
    return CrdSet(crds.source, {**gaie.kinds, **crds.kinds})


def validate_documents(
    docs: list[Any], crd_path: str | os.PathLike[str] | None = None, *, k8s_version: str = K8S_VERSION
) -> list[Problem]:
    """Validate parsed manifest documents; ``None`` entries (empty YAML documents) are skipped but
    keep their position, so ``Problem.doc`` is the 1-based position in ``docs``.

    ``crd_path`` defaults to :func:`default_crd_path`. Raises :class:`UserError` only for a
    missing/unusable CRD or schema version; everything about the documents is a :class:`Problem`.
    """
    crds = _with_shipped_crds(load_crds(crd_path if crd_path is not None else default_crd_path()))
    core = core_schemas(k8s_version)
    problems: list[Problem] = []
    services: list[tuple[int, dict[str, Any]]] = []
    lws_by_name: dict[str, dict[str, Any]] = {}
    for pos, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            problems.append(Problem(pos, "", "", "", f"a manifest must be a mapping with apiVersion and kind, given {_type_name(doc)}", "yaml"))
            continue
        kind = doc.get("kind") if isinstance(doc.get("kind"), str) else ""
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        name = meta.get("name") if isinstance(meta.get("name"), str) else ""
        sink = _Sink(pos, kind, name)
        api_version = doc.get("apiVersion")
        head = []
        if not isinstance(api_version, str) or not api_version:
            head.append((("apiVersion",), f"Required value: apiVersion must be a non-empty string, given {_show(api_version)}"))
        if not kind:
            head.append((("kind",), f"Required value: kind must be a non-empty string, given {_show(doc.get('kind'))}"))
        if head and api_version is None and doc.get("kind") is None and set(doc) == {"router"}:
            from widep.k8s.frontdoor import check_router_values

            # llm-d router chart values (widep lws --front-door llm-d --router-values FILE)
            sink.extend("router-values", [((), m) for m in check_router_values(doc)])
            problems.extend(sink.problems)
            continue
        if head:
            sink.extend("object-meta", head)
            problems.extend(sink.problems)
            continue
        group, version = _split_api_version(api_version)
        crd = crds.lookup(api_version, kind)
        if crd is not None:
            obj = _validate_lws(sink, doc, crd, core)
            if crd.kind == LWS_KIND and name:
                lws_by_name[name] = obj
        elif group in crds.groups():
            defined = crds.kinds_in(group)
            if kind in defined:
                sink.extend("crd-schema", [(("apiVersion",), f"Unsupported value {api_version!r} for {kind}. Valid: {', '.join(f'{group}/{v}' for v in defined[kind])}")])
            else:
                sink.extend("crd-schema", [(("kind",), f"Unsupported value {kind!r}: the CRD defines no such kind in {group}. Valid: {', '.join(sorted(defined))}.{did_you_mean(kind, sorted(defined))}")])
        elif api_version == "v1" and kind == "List":
            sink.extend("not-checked", [((), "not checked: the items of a v1 List are not validated; write them as separate YAML documents", "note")])
        elif (validator := core.validator(api_version, kind)) is not None:
            _validate_core(sink, doc, kind, validator)
            if kind == "Service":
                services.append((pos, doc))
        elif _is_builtin_group(group):
            served = core.served_kinds(api_version)
            if served:
                hint = did_you_mean(kind, sorted(served.values()))
                if kind.lower() in served:
                    hint = f" Did you mean {served[kind.lower()]!r}?"
                sink.extend("core-schema", [(("kind",), f"Unsupported value {kind!r}: Kubernetes {core.version} serves no such kind in {api_version}.{hint}")])
            elif "." not in group:
                sink.extend("core-schema", [(("apiVersion",), f"Unsupported value {api_version!r}: not served by Kubernetes {core.version} (removed or misspelled API version)")])
            else:
                sink.extend("not-checked", [((), f"not checked: no schema for {api_version} {kind} (not in Kubernetes {core.version} and not defined by {Path(crds.source).name})", "note")])
        else:
            sink.extend("not-checked", [((), f"not checked: no schema for {api_version} {kind} (a custom resource not defined by {Path(crds.source).name})", "note")])
        problems.extend(sink.problems)
    for pos, svc in services:
        name = _get(svc, "metadata", "name")
        sink = _Sink(pos, "Service", name if isinstance(name, str) else "")
        sink.extend("cross-doc", list(_service_lws_problems(svc, lws_by_name)))
        problems.extend(sink.problems)
    problems.sort(key=lambda p: p.doc)
    return problems


# ----------------------------------------------------------------------------------------------
# Files


class _K8sYamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when PyYAML has it
    """YAML as ``sigs.k8s.io/yaml`` reads it: YAML 1.1 scalars, but timestamps stay strings and
    a bare ``=`` is a string."""


MAX_OBJECT_BYTES = 3 * 2**19
"""1.5 MiB: the largest request the Kubernetes API server accepts for one object (etcd's default
``--max-request-bytes``); bigger documents are refused without being parsed."""

_DOC_START = re.compile(r"^---(?=[ \t\r\n]|$)", re.MULTILINE)


def _document_chunks(text: str) -> list[tuple[str, int]]:
    """The stream cut at its ``---`` lines (a document marker at column 0 ends any scalar, so this is
    where YAML cuts too): (text, line offset) per piece, each parsed on its own."""
    starts = [m.start() for m in _DOC_START.finditer(text)]
    bounds = [0, *starts] if not starts or starts[0] != 0 else starts
    out = []
    line = 0
    for i, b in enumerate(bounds):
        e = bounds[i + 1] if i + 1 < len(bounds) else len(text)
        chunk = text[b:e]
        out.append((chunk, line))
        line += chunk.count("\n")
    return out


_K8sYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_K8sYamlLoader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))
# !!binary becomes []byte in Go and then a base64 string in JSON: keep the base64 text.
_K8sYamlLoader.add_constructor(
    "tag:yaml.org,2002:binary", lambda loader, node: "".join(loader.construct_scalar(node).split())
)


def _duplicate_keys(node: yaml.Node, path: tuple, out: list[tuple]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, str] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            if isinstance(key_node, yaml.ScalarNode) and key != "<<":
                mark = key_node.start_mark
                at = f"line {mark.line + 1}, column {mark.column + 1}"
                if key in seen:
                    out.append((path + (key,), f"duplicate field {key!r} at {at} (first at {seen[key]}); strict decoding rejects it"))
                else:
                    seen[key] = at
            _duplicate_keys(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, path + (i,), out)


def parse_manifests(text: str) -> tuple[list[Any], list[Problem]]:
    """Parse multi-document YAML: (documents by position, empty ones as None; YAML problems).

    A syntax error stops parsing (later documents are not read) and becomes a problem of the
    document it is in; duplicate keys are problems too (kubectl's strict decoding rejects them).
    A document larger than the API server accepts (:data:`MAX_OBJECT_BYTES`) is a problem and is
    not parsed (its position holds None).
    """
    docs: list[Any] = []
    problems: list[Problem] = []
    for chunk, line0 in _document_chunks(text):
        size = len(chunk.encode("utf-8", "surrogatepass"))
        if size > MAX_OBJECT_BYTES:
            docs.append(None)
            problems.append(Problem(len(docs), "", "", "", (
                f"object too large: {size} bytes (from line {line0 + 1}); the Kubernetes API server refuses objects "
                f"over {MAX_OBJECT_BYTES} bytes (1.5 MiB, etcd's request limit), so it was not validated"), "yaml"))
            continue
        if not _parse_chunk(chunk, line0, docs, problems):
            break
    return docs, problems


def _parse_chunk(chunk: str, line0: int, docs: list[Any], problems: list[Problem]) -> bool:
    """Parse one piece of the stream into ``docs``; False after a syntax error (parsing stops)."""
    loader = _K8sYamlLoader(chunk)
    try:
        while loader.check_node():
            node = loader.get_node()
            dups: list[tuple] = []
            _duplicate_keys(node, (), dups)
            data = loader.construct_document(node)
            docs.append(data)
            if dups:
                meta = data.get("metadata") if isinstance(data, dict) and isinstance(data.get("metadata"), dict) else {}
                kind = data.get("kind", "") if isinstance(data, dict) else ""
                sink = _Sink(len(docs), str(kind or ""), str(meta.get("name") or ""))
                sink.extend("yaml", [(path, _shift_lines(msg, line0)) for path, msg in dups])
                problems.extend(sink.problems)
    except (yaml.YAMLError, RecursionError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1 + line0}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(err, "problem", None) or str(err) or "nested too deeply"
        context = getattr(err, "context", None)
        problems.append(Problem(len(docs) + 1, "", "", "", f"invalid YAML at {where}{what}{f' ({context})' if context else ''}", "yaml"))
        return False
    finally:
        loader.dispose()
    return True


_LINE = re.compile(r"line (\d+)")


def _shift_lines(msg: str, offset: int) -> str:
    return _LINE.sub(lambda m: f"line {int(m.group(1)) + offset}", msg) if offset else msg


def validate_text(text: str, crd_path: str | os.PathLike[str] | None = None, *, k8s_version: str = K8S_VERSION) -> tuple[int, list[Problem]]:
    """Validate multi-document YAML text: (number of non-empty documents, problems)."""
    docs, problems = parse_manifests(text)
    found = validate_documents(docs, crd_path, k8s_version=k8s_version)
    if not problems and all(d is None for d in docs):
        found.append(Problem(1, "", "", "", "no documents: the input is empty or only comments", "yaml"))
    merged = sorted(problems + found, key=lambda p: p.doc)
    return sum(d is not None for d in docs), merged


def validate_file(path: str | os.PathLike[str], crd_path: str | os.PathLike[str] | None = None, *, k8s_version: str = K8S_VERSION) -> list[Problem]:
    """Validate every document of a (multi-document) YAML file."""
    return validate_file_counted(path, crd_path, k8s_version=k8s_version)[1]


def validate_file_counted(path: str | os.PathLike[str], crd_path: str | os.PathLike[str] | None = None, *, k8s_version: str = K8S_VERSION) -> tuple[int, list[Problem]]:
    """Like :func:`validate_file`, also returning the number of non-empty documents."""
    from widep.spec.safeyaml import read_text

    text = read_text(path, "--validate")
    return validate_text(text, crd_path, k8s_version=k8s_version)


def packaged_crd(file_name: str = CRD_FILE_NAME) -> Path:
    """A CRD shipped inside widep (``widep/k8s/data``, byte-identical to ``../shared/schemas``)."""
    import importlib.resources

    return Path(str(importlib.resources.files("widep.k8s").joinpath("data", file_name)))


def default_crd_path() -> Path:
    """Where the LWS CRD is: ``$WIDEP_LWS_CRD`` if set, else the copy shipped inside widep
    (``--crd PATH`` overrides both)."""
    env = os.environ.get(CRD_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise UserError(f"{CRD_ENV} points to a missing file. Given: {CRD_ENV}={env}. Valid: the path of {CRD_FILE_NAME} (or pass --crd PATH)")
        return p
    p = packaged_crd(CRD_FILE_NAME)
    if not p.is_file():
        raise UserError(
            f"the LWS CRD {CRD_FILE_NAME} is missing from this widep installation ({p}). Pass --crd PATH (the CRD "
            "from kubernetes-sigs/lws config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml, v0.10.0) "
            f"or set {CRD_ENV}, and reinstall widep"
        )
    return p
