"""The ``crd-schema`` layer: the real CRDs (LeaderWorkerSet, the GAIE InferencePool) loaded from their files, made
strict (unknown fields rejected), structural defaults applied, ``x-kubernetes-list-type`` uniqueness."""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import yaml

from widep.errors import UserError
from widep.k8s.validate.problems import show
from widep.k8s.validate.schema import FORMATS, CrdSchemaValidator

#: File name of the CRD the project is built against (shipped in ``widep/k8s/data``, a byte-identical
#: copy of ``../shared/schemas``).
CRD_FILE_NAME = "lws-crd-v0.10.0.yaml"

#: The Gateway API Inference Extension CRD (InferencePool, v1.5.0), shipped beside it; always loaded.
GAIE_CRD_FILE_NAME = "inferencepool-crd-v1.5.0.yaml"

CRD_ENV = "WIDEP_LWS_CRD"


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


def list_type_problems(schema: dict[str, Any], value: Any, path: tuple, out: list) -> None:
    """``x-kubernetes-list-type: map|set`` uniqueness, as the API server checks for custom resources."""
    if isinstance(value, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None
        for key, item in value.items():
            sub = props.get(key, extra)
            if sub is not None:
                list_type_problems(sub, item, path + (key,), out)
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
                    shown = ", ".join(f"{k}={show(item.get(k))}" for k in keys)
                    out.append(
                        (
                            path + (i,),
                            f"Duplicate value: {shown} (same as [{seen[key]}]); list entries must be unique by "
                            f"{', '.join(keys)}",
                        )
                    )
                else:
                    seen[key] = i
        elif kind == "set":
            for i, item in enumerate(value):
                key = _freeze(item)
                if key in seen:
                    out.append(
                        (path + (i,), f"Duplicate value: {show(item)} (same as [{seen[key]}]); this list is a set")
                    )
                else:
                    seen[key] = i
        items = schema.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(value):
                list_type_problems(items, item, path + (i,), out)


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
            validator = CrdSchemaValidator(strict, format_checker=FORMATS)
            status = "status" in (ver.get("subresources") or {})
            kinds[(group, ver["name"], kind)] = CrdKind(group, ver["name"], kind, strict, validator, status)
    if not kinds:
        raise UserError(
            f"{path} defines no served CustomResourceDefinition version with an openAPIV3Schema. "
            f"Valid: the LWS CRD, e.g. ../shared/schemas/{CRD_FILE_NAME}"
        )
    return CrdSet(path, kinds)


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
            raise UserError(
                f"{CRD_ENV} points to a missing file. Given: {CRD_ENV}={env}. Valid: the path of "
                f"{CRD_FILE_NAME} (or pass --crd PATH)"
            )
        return p
    p = packaged_crd(CRD_FILE_NAME)
    if not p.is_file():
        raise UserError(
            f"the LWS CRD {CRD_FILE_NAME} is missing from this widep installation ({p}). Pass --crd PATH (the CRD "
            "from kubernetes-sigs/lws config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml, v0.10.0) "
            f"or set {CRD_ENV}, and reinstall widep"
        )
    return p
