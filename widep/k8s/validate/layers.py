"""The layers put together: :func:`validate_documents` runs every layer over a list of documents, plus the
``cross-doc`` warnings (Services selecting LWS pods by labels no template carries)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from widep.errors import did_you_mean
from widep.k8s.names import (
    LWS_GROUP,
    LWS_KIND,
    LWS_POD_LABELS,
    LWS_PREFIX,
)
from widep.k8s.validate.core_rules import (
    lws_env_ref_problems,
    pod_template_problems,
    service_problems,
    workload_problems,
)
from widep.k8s.validate.core_schema import K8S_VERSION, OBJECT_META_DEF, CoreSchemas, core_schemas, is_builtin_group
from widep.k8s.validate.crd import (
    GAIE_CRD_FILE_NAME,
    CrdKind,
    CrdSet,
    apply_schema_defaults,
    default_crd_path,
    list_type_problems,
    load_crds,
    packaged_crd,
)
from widep.k8s.validate.lws_rules import lws_controller_problems, lws_webhook_problems, webhook_defaults
from widep.k8s.validate.meta import metadata_problems
from widep.k8s.validate.problems import Problem, Sink, claim_names, get, show, type_name
from widep.k8s.validate.schema import schema_problems


def _split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def wrap_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "lws-template"}, "template": template}


def _validate_lws(sink: Sink, doc: dict[str, Any], crd: CrdKind, core: CoreSchemas) -> dict[str, Any]:
    """All layers for one custom resource of the CRD; returns the defaulted object."""
    obj = copy.deepcopy(doc)
    notes = []
    if crd.status_subresource and "status" in obj:
        obj.pop("status")
        notes.append((("status",), "ignored: status is a subresource, the API server drops it on create", "note"))
    apply_schema_defaults(crd.schema, obj)
    found = schema_problems(crd.validator, obj)
    lists: list[tuple] = []
    list_type_problems(crd.schema, obj, (), lists)
    sink.extend("crd-schema", found + lists + notes)
    if not found:
        from widep.k8s.cel import cel_problems

        sink.extend("crd-cel", list(cel_problems(crd.schema, obj)))
    if isinstance(doc.get("metadata"), dict):
        meta = [
            (("metadata",) + p, m)
            for p, m in schema_problems(core.definition_validator(OBJECT_META_DEF), doc["metadata"])
        ]
    else:
        meta = []
    sink.extend("object-meta", meta + list(metadata_problems(doc, crd.kind)))
    if crd.group != LWS_GROUP or crd.kind != LWS_KIND:
        return obj
    webhook_defaults(obj)
    sink.extend("lws-webhook", list(lws_webhook_problems(doc, obj)))
    sink.extend("lws-controller", list(lws_controller_problems(obj)))
    lwt = get(obj, "spec", "leaderWorkerTemplate")
    raw_lwt = get(doc, "spec", "leaderWorkerTemplate")
    if not isinstance(lwt, dict) or not isinstance(raw_lwt, dict):
        return obj
    claims = claim_names(lwt.get("volumeClaimTemplates"))
    base = ("spec", "leaderWorkerTemplate")
    core_found: list[tuple] = []
    rules_found: list[tuple] = []
    for key in ("leaderTemplate", "workerTemplate"):
        template = raw_lwt.get(key)
        if not isinstance(template, dict):
            continue
        validator = core.validator("v1", "PodTemplate")
        for path, message in schema_problems(validator, wrap_pod_template(template)):
            if path[:1] == ("template",):
                core_found.append((base + (key,) + path[1:], message))
        rules_found.extend(
            pod_template_problems(
                lwt.get(key), base + (key,), owner="StatefulSet (one per LWS group)", claim_names=claims
            )
        )
        rules_found.extend(lws_env_ref_problems(template, base + (key,)))
    sink.extend("core-schema", core_found)
    sink.extend("core-rules", rules_found)
    return obj


def _validate_core(sink: Sink, doc: dict[str, Any], kind: str, validator: Any) -> None:
    sink.extend("core-schema", schema_problems(validator, doc))
    rules = list(metadata_problems(doc, kind))
    if kind == "Service":
        rules.extend(service_problems(doc))
    elif kind in ("Deployment", "StatefulSet", "ReplicaSet", "DaemonSet"):
        rules.extend(workload_problems(doc, kind))
    sink.extend("core-rules", rules)
    if kind == "Deployment":
        from widep.k8s.frontdoor import router_container_problems

        sink.extend("front-door", router_container_problems(doc))


def _service_lws_problems(service: dict[str, Any], lws_by_name: dict[str, dict[str, Any]]) -> Iterator[tuple]:
    """A Service that selects ``leaderworkerset.sigs.k8s.io/name: X`` must be able to match pods
    of LWS X (when X is in the same file)."""
    selector = get(service, "spec", "selector")
    if not isinstance(selector, dict) or LWS_PREFIX + "name" not in selector:
        return
    target = selector[LWS_PREFIX + "name"]
    lws = lws_by_name.get(target) if isinstance(target, str) else None
    if lws is None:
        return
    lwt = get(lws, "spec", "leaderWorkerTemplate")
    wanted = {k: v for k, v in selector.items() if k not in LWS_POD_LABELS}
    matches = []
    for key in ("leaderTemplate", "workerTemplate"):
        template = lwt.get(key) if isinstance(lwt, dict) else None
        if not isinstance(template, dict):
            continue
        labels = get(template, "metadata", "labels")
        labels = labels if isinstance(labels, dict) else {}
        if all(labels.get(k) == v for k, v in wanted.items()):
            matches.append(key)
    if not matches:
        yield (
            ("spec", "selector"),
            (
                f"selects no pod of LeaderWorkerSet {target!r}: no leader/worker template has the labels "
                f"{', '.join(f'{k}={v}' for k, v in wanted.items())}, so the Service would have no endpoints"
            ),
            "warning",
        )


def _with_shipped_crds(crds: CrdSet) -> CrdSet:
    """``crds`` plus the kinds of the InferencePool CRD shipped in widep (``crds`` wins on overlap)."""
    gaie = load_crds(packaged_crd(GAIE_CRD_FILE_NAME))
    return CrdSet(crds.source, {**gaie.kinds, **crds.kinds})


def validate_documents(
    docs: list[Any],
    crd_path: str | os.PathLike[str] | None = None,
    *,
    k8s_version: str = K8S_VERSION,
    prerequisites: set[tuple[str, str]] | None = None,
    charts: dict[tuple[str, str], str] | None = None,
    rdma_declared: bool = False,
) -> list[Problem]:
    """Validate parsed manifest documents; ``None`` entries (empty YAML documents) are skipped but
    keep their position, so ``Problem.doc`` is the 1-based position in ``docs``.

    ``prerequisites``: (kind, name) of objects the user provides (``# prerequisite: Kind/name`` header lines),
    which references across objects may name (``cross-object``, :mod:`widep.k8s.validate.cross`); ``charts``:
    (kind, name) -> the ``helm install`` that also creates it (an object of ``docs`` by that name is flagged);
    ``rdma_declared``: the header says pods get RDMA without a resource (``# rdma: none``).
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
            problems.append(
                Problem(
                    pos,
                    "",
                    "",
                    "",
                    f"a manifest must be a mapping with apiVersion and kind, given {type_name(doc)}",
                    "yaml",
                )
            )
            continue
        kind = doc.get("kind") if isinstance(doc.get("kind"), str) else ""
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        name = meta.get("name") if isinstance(meta.get("name"), str) else ""
        sink = Sink(pos, kind, name)
        api_version = doc.get("apiVersion")
        head = []
        if not isinstance(api_version, str) or not api_version:
            head.append(
                (("apiVersion",), f"Required value: apiVersion must be a non-empty string, given {show(api_version)}")
            )
        if not kind:
            head.append((("kind",), f"Required value: kind must be a non-empty string, given {show(doc.get('kind'))}"))
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
                sink.extend(
                    "crd-schema",
                    [
                        (
                            ("apiVersion",),
                            f"Unsupported value {api_version!r} for {kind}. Valid: "
                            f"{', '.join(f'{group}/{v}' for v in defined[kind])}",
                        )
                    ],
                )
            else:
                sink.extend(
                    "crd-schema",
                    [
                        (
                            ("kind",),
                            f"Unsupported value {kind!r}: the CRD defines no such kind in {group}. Valid: "
                            f"{', '.join(sorted(defined))}.{did_you_mean(kind, sorted(defined))}",
                        )
                    ],
                )
        elif api_version == "v1" and kind == "List":
            sink.extend(
                "not-checked",
                [
                    (
                        (),
                        "not checked: the items of a v1 List are not validated; write them as separate YAML documents",
                        "note",
                    )
                ],
            )
        elif (validator := core.validator(api_version, kind)) is not None:
            _validate_core(sink, doc, kind, validator)
            if kind == "Service":
                services.append((pos, doc))
        elif is_builtin_group(group):
            served = core.served_kinds(api_version)
            if served:
                hint = did_you_mean(kind, sorted(served.values()))
                if kind.lower() in served:
                    hint = f" Did you mean {served[kind.lower()]!r}?"
                sink.extend(
                    "core-schema",
                    [
                        (
                            ("kind",),
                            f"Unsupported value {kind!r}: Kubernetes {core.version} serves no such kind in "
                            f"{api_version}.{hint}",
                        )
                    ],
                )
            elif "." not in group:
                sink.extend(
                    "core-schema",
                    [
                        (
                            ("apiVersion",),
                            f"Unsupported value {api_version!r}: not served by Kubernetes {core.version} "
                            "(removed or misspelled API version)",
                        )
                    ],
                )
            else:
                sink.extend(
                    "not-checked",
                    [
                        (
                            (),
                            f"not checked: no schema for {api_version} {kind} (not in Kubernetes {core.version} "
                            f"and not defined by {Path(crds.source).name})",
                            "note",
                        )
                    ],
                )
        else:
            sink.extend(
                "not-checked",
                [
                    (
                        (),
                        f"not checked: no schema for {api_version} {kind} (a custom resource not defined by "
                        f"{Path(crds.source).name})",
                        "note",
                    )
                ],
            )
        problems.extend(sink.problems)
    from widep.k8s.validate.cross import cross_object_problems

    cross = cross_object_problems(docs, prerequisites, charts, rdma_declared)
    svc_docs = dict(services)
    for pos in sorted(set(cross) | set(svc_docs)):
        doc = docs[pos - 1]
        name = get(doc, "metadata", "name")
        sink = Sink(pos, str(doc.get("kind") or ""), name if isinstance(name, str) else "")
        sink.extend("cross-object", cross.get(pos, []))
        if pos in svc_docs:
            sink.extend("cross-doc", list(_service_lws_problems(svc_docs[pos], lws_by_name)))
        problems.extend(sink.problems)
    problems.sort(key=lambda p: p.doc)
    return problems
