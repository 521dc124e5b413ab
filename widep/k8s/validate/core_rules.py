"""The ``core-rules`` layer: a focused subset of the API server's semantic pod/service/workload validation
(``k8s.io/kubernetes/pkg/apis/core/validation``) that JSON schema cannot express."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from decimal import Decimal
from typing import Any

from widep.errors import did_you_mean
from widep.k8s.names import LWS_ENV_PREFIX, LWS_ENV_VARS
from widep.k8s.validate.meta import (
    annotations_problems,
    dns1123_label_msg,
    labels_problems,
    parse_quantity,
    qualified_name_problem,
)
from widep.k8s.validate.problems import claim_names, format_path, get, show

_IANA_SVC_NAME = re.compile(r"[-a-z0-9]+\Z")

_VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

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
                    yield (
                        p,
                        (
                            f"Invalid resource name {show(name)}: must be a standard resource "
                            f"({', '.join(_STANDARD_CONTAINER_RESOURCES)}, hugepages-<size>) or fully "
                            f"qualified (e.g. 'nvidia.com/gpu').{hint}"
                        ),
                    )
                    continue
            elif msg := qualified_name_problem(name):
                yield p, f"Invalid resource name {show(name)}: {msg}"
                continue
            q = parse_quantity(raw)
            if q is None:
                continue  # the schema layers report malformed quantities
            if q < 0:
                yield p, f"Invalid value {show(raw)}: must be greater than or equal to 0"
                continue
            if _is_extended_resource(name) and q != q.to_integral_value():
                yield (
                    p,
                    f"Invalid value {show(raw)}: {name} must be a whole number (extended resources cannot be "
                    "fractional)",
                )
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
                yield (
                    path + ("requests", name),
                    (
                        f"Required value: a limit must be set for {name} (extended resources cannot be "
                        f"overcommitted; set limits[{name}] equal to the request)"
                    ),
                )
            elif lim != req:
                yield (
                    path + ("requests", name),
                    (
                        f"Invalid value {show(res['requests'][name])}: must be equal to the {name} limit "
                        f"{show(res['limits'][name])}"
                    ),
                )
        elif lim is not None and req > lim:
            yield (
                path + ("requests", name),
                (
                    f"Invalid value {show(res['requests'][name])}: must be less than or equal to the "
                    f"{name} limit {show(res['limits'][name])}"
                ),
            )


def pod_template_problems(
    template: Any, path: tuple, *, owner: str, claim_names: Iterable[str] = ()
) -> Iterator[tuple]:
    """Semantic checks the API server runs on the pods (or the StatefulSet/Deployment) built from
    ``template``. ``owner`` names what creates the pods, for messages."""
    if not isinstance(template, dict):
        return
    meta = template.get("metadata")
    if isinstance(meta, dict):
        yield from labels_problems(meta.get("labels"), path + ("metadata", "labels"))
        yield from annotations_problems(meta.get("annotations"), path + ("metadata", "annotations"))
    spec = template.get("spec")
    if not isinstance(spec, dict):
        return
    sp = path + ("spec",)
    restart = spec.get("restartPolicy")
    if isinstance(restart, str) and restart != "Always":
        yield (
            sp + ("restartPolicy",),
            (f"Unsupported value {show(restart)}: {owner} pods must use 'Always'. Valid: Always"),
        )
    volumes = spec.get("volumes") if isinstance(spec.get("volumes"), list) else []
    volume_names: dict[str, int] = {}
    for i, vol in enumerate(volumes):
        if not isinstance(vol, dict) or not isinstance(vol.get("name"), str):
            continue
        vname = vol["name"]
        if msg := dns1123_label_msg(vname):
            yield sp + ("volumes", i, "name"), f"Invalid value {show(vname)}: {msg}"
        if vname in volume_names:
            yield (
                sp + ("volumes", i, "name"),
                f"Duplicate value: {show(vname)} (same as volumes[{volume_names[vname]}])",
            )
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
                if msg := dns1123_label_msg(cname):
                    yield cp + ("name",), f"Invalid value {show(cname)}: {msg}"
                if cname in container_names:
                    yield (
                        cp + ("name",),
                        f"Duplicate value: {show(cname)} (same as {format_path(container_names[cname])})",
                    )
                container_names.setdefault(cname, cp)
            if not c.get("image"):
                yield cp + ("image",), "Required value: a container image must be set"
            crp = c.get("restartPolicy")
            if crp is not None and (list_name == "containers" or crp != "Always"):
                yield (
                    cp + ("restartPolicy",),
                    (
                        f"Unsupported value {show(crp)}: only init containers take a restartPolicy, and only 'Always' "
                        "(a native sidecar, Kubernetes >= 1.29). Valid: Always on initContainers"
                    ),
                )
            policy = c.get("imagePullPolicy")
            if isinstance(policy, str) and policy not in _PULL_POLICIES:
                yield (
                    cp + ("imagePullPolicy",),
                    (
                        f"Unsupported value {show(policy)}. Valid: "
                        f"{', '.join(_PULL_POLICIES)}.{did_you_mean(policy, _PULL_POLICIES)}"
                    ),
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
                    yield (
                        pp + ("protocol",),
                        f"Unsupported value {show(proto)}. Valid: "
                        f"{', '.join(_PROTOCOLS)}.{did_you_mean(proto, _PROTOCOLS)}",
                    )
                pname = port.get("name")
                if isinstance(pname, str) and pname:
                    if msg := _iana_svc_name_problem(pname):
                        yield pp + ("name",), f"Invalid value {show(pname)}: {msg}"
                    elif pname in port_names:
                        yield (
                            pp + ("name",),
                            f"Duplicate value: port name {show(pname)} (same as {format_path(port_names[pname])})",
                        )
                    port_names.setdefault(pname, pp)
            yield from _resources_problems(c.get("resources"), cp + ("resources",))
            for j, mount in enumerate(c.get("volumeMounts") if isinstance(c.get("volumeMounts"), list) else []):
                if isinstance(mount, dict) and isinstance(mount.get("name"), str) and mount["name"] not in mountable:
                    known = sorted(mountable)
                    yield (
                        cp + ("volumeMounts", j, "name"),
                        (
                            f"Not found: {show(mount['name'])} is not a volume of this pod. "
                            f"Valid: {', '.join(known) if known else '(no volumes defined)'}."
                            f"{did_you_mean(mount['name'], known)}"
                        ),
                    )


def lws_env_ref_problems(template: Any, path: tuple) -> Iterator[tuple]:
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
                    if ref.startswith(LWS_ENV_PREFIX) and ref not in defined:
                        yield (
                            path + ("spec", list_name, i) + sub,
                            (
                                f"$({ref}) is not injected by the LWS pod webhook and not defined in env, so it "
                                f"stays literal. Valid: {', '.join(LWS_ENV_VARS)}.{did_you_mean(ref, LWS_ENV_VARS)}"
                            ),
                            "warning",
                        )


def service_problems(doc: dict[str, Any]) -> Iterator[tuple]:
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return
    stype = spec.get("type", "ClusterIP")
    if isinstance(stype, str) and stype not in _SERVICE_TYPES:
        yield (
            ("spec", "type"),
            f"Unsupported value {show(stype)}. Valid: "
            f"{', '.join(_SERVICE_TYPES)}.{did_you_mean(stype, _SERVICE_TYPES)}",
        )
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
                yield pp + ("targetPort",), f"Invalid value {show(target)}: a named targetPort {msg}"
        elif target not in (None, 0) and (msg := _port_problem(target)):
            yield pp + ("targetPort",), msg
        proto = port.get("protocol")
        if isinstance(proto, str) and proto not in _PROTOCOLS:
            yield pp + ("protocol",), f"Unsupported value {show(proto)}. Valid: {', '.join(_PROTOCOLS)}"
        name = port.get("name")
        if len(ports) > 1 and not name:
            yield pp + ("name",), "Required value: port names are required when a Service has more than one port"
        if isinstance(name, str) and name:
            if name in names:
                yield pp + ("name",), f"Duplicate value: {show(name)} (same as ports[{names[name]}])"
            names.setdefault(name, i)
    yield from labels_problems(spec.get("selector"), ("spec", "selector"))


def workload_problems(doc: dict[str, Any], kind: str) -> Iterator[tuple]:
    """Deployment / StatefulSet / ReplicaSet / DaemonSet: selector vs template labels, pod rules."""
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return
    template = spec.get("template")
    selector = spec.get("selector")
    if selector is None:
        yield ("spec", "selector"), "Required value: apps/v1 workloads must set spec.selector"
    elif isinstance(selector, dict) and isinstance(template, dict):
        labels = get(template, "metadata", "labels")
        labels = labels if isinstance(labels, dict) else {}
        match = selector.get("matchLabels") or {}
        if isinstance(match, dict) and isinstance(labels, dict):
            missing = {k: v for k, v in match.items() if labels.get(k) != v}
            if missing:
                yield (
                    ("spec", "template", "metadata", "labels"),
                    (
                        f"Invalid value: selector does not match template labels (selector needs "
                        f"{', '.join(f'{k}={v}' for k, v in missing.items())}; template has "
                        f"{', '.join(f'{k}={v}' for k, v in labels.items()) or 'no labels'})"
                    ),
                )
    claims = claim_names(spec.get("volumeClaimTemplates"))
    yield from pod_template_problems(template, ("spec", "template"), owner=kind, claim_names=claims)
