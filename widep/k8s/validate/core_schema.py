"""The ``core-schema`` layer: Kubernetes' own JSON schemas as ``kubernetes-validate`` ships them (strict variant),
for pod templates and plain documents."""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from widep.errors import UserError
from widep.k8s.names import (
    QUANTITY_PATTERN,
)
from widep.k8s.validate.schema import FORMATS, CoreSchemaValidator

#: The Kubernetes version whose core schemas check pod templates and plain documents. The LWS
#: v0.10.0 CRD embeds the Kubernetes 1.36 PodSpec, so templates are judged by the same release.
K8S_VERSION = "1.36"

_QUANTITY_DEF = "io.k8s.apimachinery.pkg.api.resource.Quantity"

OBJECT_META_DEF = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


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
        self._dir = (
            importlib_resources.files("kubernetes_validate")
            .joinpath("kubernetes-json-schema")
            .joinpath(f"v{full[-1]}-local-strict")
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
                self._validators[key] = CoreSchemaValidator(schema, registry=self._registry, format_checker=FORMATS)
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
                    if (
                        gvk.get("group", "") == group
                        and gvk.get("version") == version
                        and not gvk["kind"].endswith("List")
                    ):
                        kinds[gvk["kind"].lower()] = gvk["kind"]
            self._served[api_version] = kinds
        return self._served[api_version]

    def definition_validator(self, definition: str) -> Any:
        key = "#" + definition
        if key not in self._validators:
            schema = {"$ref": f"{self._defs_id}#/$defs/{definition}"}
            self._validators[key] = CoreSchemaValidator(schema, registry=self._registry, format_checker=FORMATS)
        return self._validators[key]


def core_schemas(version: str = K8S_VERSION) -> CoreSchemas:
    """The core schemas of one Kubernetes minor version, e.g. ``"1.36"``, built once per process."""
    return _core_schemas_cached(version)


@functools.lru_cache(maxsize=4)
def _core_schemas_cached(version: str) -> CoreSchemas:
    return CoreSchemas(version)


def is_builtin_group(group: str) -> bool:
    """Groups Kubernetes itself serves: the core group, dot-less groups (apps, batch, ...) and
    ``*.k8s.io`` (but not ``*.x-k8s.io`` or ``*.sigs.k8s.io`` projects)."""
    if group == "" or "." not in group:
        return True
    return group.endswith(".k8s.io") and not group.endswith((".x-k8s.io", ".sigs.k8s.io"))
