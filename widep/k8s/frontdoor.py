"""Front doors on Kubernetes: what sends a request to prefill and then to decode (pure).

``router``
    vllm-router in P/D mode (``--vllm-pd-disaggregation``) as a Deployment + Service, as on bare metal: the
    prefill and decode URLs are the LeaderWorkerSet pods' DNS names (:mod:`widep.k8s.router`). The image
    must contain the ``vllm-router`` executable (PyPI ``vllm-router``; :data:`ROUTER_IMAGE` names the one widep
    expects, built as the file header says); ``--validate`` warns on a router image without a tag and on a
    router container whose command is not a known router entry point.
``llm-d``
    llm-d's stack: ONE InferencePool (GAIE v1) selecting the pods of both roles (``llm-d.ai/role`` tells prefill
    from decode), the routing sidecar on every decode pod as a native sidecar (an init container with
    ``restartPolicy: Always``) listening on the pool's ports in front of decode's vLLM ports, and the endpoint
    picker's P/D configuration as the values file of llm-d's router chart (:func:`router_values`). The chart owns
    the pool: with its default ``router.inferencePool.create: true`` it creates ``InferencePool/<release>`` from
    the values' ``modelServers`` (and its endpoint picker runs ``--pool-name <release>``), so widep's manifests
    contain no InferencePool of their own (two owners of one name: the install fails or they fight). Every name
    the chart makes is derived from the release name here (:func:`chart_objects`), the release being the topology
    name.
``none``
    no front door (clients pick a Service themselves; a P/D pair then does not disaggregate).

Sources: ../shared/reference/llm-d-wide-ep.md §2.2-2.3 (wide-ep-lws router values at llm-d HEAD, the sidecar's
flags in llm-d-inference-scheduler ``pkg/sidecar/proxy/options.go``).
"""

from __future__ import annotations

from typing import Any

import yaml

from widep.errors import UserError
from widep.k8s.names import WORKER_INDEX_LABEL
from widep.plan.core import DeploymentPlan

FRONT_DOORS = ("auto", "router", "llm-d", "none")
#: The image the router Deployment runs unless --router-image names another: vllm-router from PyPI, the version
#: widep's own router tests run (pyproject's ``router`` extra).
ROUTER_VERSION = "0.1.17"
ROUTER_IMAGE = f"vllm-router:{ROUTER_VERSION}"
ROUTER_IMAGE_HOWTO = (
    f"the router image must contain vllm-router {ROUTER_VERSION}: build {ROUTER_IMAGE} FROM python:3.12-slim "
    f"with RUN pip install vllm-router=={ROUTER_VERSION}, push it, pass --router-image REGISTRY/{ROUTER_IMAGE}"
)
#: Commands that start vllm-router (the console script, or its module).
ROUTER_ENTRY_POINTS = (
    ("vllm-router",),
    ("python", "-m", "vllm_router.launch_router"),
    ("python3", "-m", "vllm_router.launch_router"),
)
#: llm-d's P/D routing sidecar (llm-d HEAD's wide-ep-lws decode pods) and its KV connector protocol.
ROUTING_SIDECAR_IMAGE = "ghcr.io/llm-d/llm-d-router-disagg-sidecar:v0.9.0"
ROUTER_CHART = "oci://ghcr.io/llm-d/charts/llm-d-router-standalone"
ROUTER_CHART_VERSION = "v0.9.0"
SIDECAR_NAME = "routing-proxy"
#: Longest release name (= topology name) whose endpoint picker Service the router chart names ``<release>-epp``
#: without truncating it: v0.9.0 ``routerlib/templates/_helpers.tpl`` ``llm-d-router.name`` is
#: ``.Release.Name | lower | trim | trunc 40`` + ``-epp``.
ROUTER_RELEASE_MAX = 40
#: Charts built on llm-d's routerlib (v0.9.0): what they create is :func:`chart_objects`.
ROUTERLIB_CHARTS = ("llm-d-router-standalone", "llm-d-router-gateway")


def chart_release(plan: DeploymentPlan) -> str:
    """The router chart's release name for a plan: the one place every chart-made name comes from."""
    return plan.name


def epp_name(release: str) -> str:
    """The endpoint picker's Deployment / Service / ConfigMap name the chart derives from its release."""
    return release.lower().strip()[:ROUTER_RELEASE_MAX] + "-epp"


def chart_objects(release: str, create_pool: bool = True) -> list[tuple[str, str]]:
    """(kind, name) of the namespaced objects a routerlib chart (v0.9.0 templates ``_inferencepool.yaml``,
    ``_deployment.yaml``, ``_service.yaml``, ``_config.yaml`` and the standalone proxy preset's ConfigMap ``envoy``)
    creates for ``release``; ``create_pool`` is ``router.inferencePool.create``."""
    epp = epp_name(release)
    out = [("InferencePool", release)] if create_pool else []
    return out + [("Deployment", epp), ("Service", epp), ("ConfigMap", epp), ("ConfigMap", "envoy")]


def resolve(plan: DeploymentPlan, choice: str, inference_pool: bool) -> str:
    """The front door to emit: 'router', 'llm-d' or 'none'. Outside P/D, --inference-pool adds one InferencePool
    per role to any of them (see render_lws)."""
    if choice not in FRONT_DOORS:
        raise UserError(f"--front-door: unknown front door. Given: {choice!r}. Valid: {', '.join(FRONT_DOORS)}")
    pd = {rp.kind for rp in plan.roles} >= {"prefill", "decode"}
    if choice == "auto":
        if pd:
            return "llm-d" if inference_pool else "router"
        return "router" if plan.router is not None else "none"
    if choice == "llm-d" and not pd:
        raise UserError(
            "--front-door llm-d: llm-d's P/D stack needs a prefill and a decode role. "
            f"Given: roles {', '.join(f'{rp.name} ({rp.kind})' for rp in plan.roles)}. "
            "Valid: --front-door router|none, or --inference-pool for one pool per role"
        )
    if choice == "llm-d" and len(plan.name) > ROUTER_RELEASE_MAX:
        raise UserError(
            f"--front-door llm-d: the topology name is the router chart's release name, and the chart truncates "
            f"longer release names when it names the endpoint picker Service (the InferencePool would point at a "
            f"Service that does not exist). Given: name {plan.name!r} ({len(plan.name)} characters). "
            f"Valid: a topology name of at most {ROUTER_RELEASE_MAX} characters"
        )
    if pd and inference_pool and choice != "llm-d":
        raise UserError(
            f"--inference-pool: one pool per role cannot route P/D (the scheduler must see both roles in one pool). "
            f"Given: --front-door {choice} --inference-pool. Valid: --front-door llm-d (one pool over both roles)"
        )
    return choice


# ----------------------------------------------------------------------------------------------
# llm-d: one pool, the routing sidecar, the EPP values


def pool_ports(plan: DeploymentPlan, served: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    """(the pool's target ports = the prefill pods' ports, the decode pods' vLLM ports behind the sidecar).

    The sidecar listens on port+i and forwards to vllm-port+i, so both lists must be runs of consecutive ports
    of the same length, and the sidecar's ports must not be ports decode's vLLM already uses."""
    pre = [rp for rp in plan.roles if rp.kind == "prefill"]
    dec = [rp for rp in plan.roles if rp.kind == "decode"]
    if len(pre) != 1 or len(dec) != 1:
        raise UserError(
            "--front-door llm-d: one InferencePool serves one prefill and one decode role. "
            f"Given: {len(pre)} prefill and {len(dec)} decode roles. Valid: exactly one of each, or --front-door router"
        )
    p, d = served[pre[0].name], served[dec[0].name]
    why = None
    if not p or not d:
        why = "a role serves no HTTP port"
    elif len(p) != len(d):
        why = f"prefill pods serve {len(p)} port(s) but decode pods {len(d)}"
    elif p != list(range(p[0], p[0] + len(p))) or d != list(range(d[0], d[0] + len(d))):
        why = "the ports of a pod are not consecutive"
    elif set(p) & set(d) or set(p) & {plan.spec.serving.supervisor_port, plan.spec.serving.nixl_side_channel_port}:
        why = f"decode's vLLM already uses port(s) {sorted(set(p) & (set(d) | {plan.spec.serving.supervisor_port}))}"
    if len(p) > 8:
        why = f"{len(p)} ports per pod, but an InferencePool takes at most 8 targetPorts"
    if plan.spec.serving.host not in ("0.0.0.0", "::"):
        why = (
            f"it reaches vLLM on localhost, but serving.host {plan.spec.serving.host!r} binds vLLM to the pod IP "
            "only (use serving.host 0.0.0.0)"
        )
    if why:
        raise UserError(
            f"--front-door llm-d: the routing sidecar cannot front decode: {why}. Given: prefill ports {p}, decode "
            f"ports {d}. Valid: the same number of consecutive ports per pod on both roles, decode's port "
            "(roles[].port) away from prefill's (e.g. 8200 vs 8000), at most 8 ranks per pod"
        )
    return p, d


def routing_sidecar(pool: list[int], vllm: list[int], image: str) -> dict[str, Any]:
    """llm-d's routing proxy as a native sidecar (init container, ``restartPolicy: Always``)."""
    return {
        "name": SIDECAR_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",
        "args": [
            f"--port={pool[0]}",
            f"--vllm-port={vllm[0]}",
            f"--data-parallel-size={len(pool)}",
            "--kv-connector=nixlv2",
            "--secure-proxy=false",
            "--zap-log-level=1",
        ],
        "ports": [{"name": f"proxy-{i}", "containerPort": port, "protocol": "TCP"} for i, port in enumerate(pool)],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
    }


def pool_selector(plan: DeploymentPlan, leader_only: bool) -> dict[str, str]:
    sel = {"app.kubernetes.io/instance": plan.name, "llm-d.ai/inference-serving": "true"}
    if leader_only:
        sel[WORKER_INDEX_LABEL] = "0"
    return sel


def chart_pool(release: str, values: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    """The InferencePool the router chart renders from ``values`` for ``release`` (v0.9.0
    ``routerlib/templates/_inferencepool.yaml``): widep validates it (GAIE CRD, selector and ports against the
    pods) but does not emit it."""
    router = values["router"]
    meta: dict[str, Any] = {"name": release}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = {"app.kubernetes.io/name": epp_name(release)}
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": meta,
        "spec": {
            "targetPorts": [{"number": p["number"]} for p in router["modelServers"]["targetPorts"]],
            "selector": {"matchLabels": dict(router["modelServers"]["matchLabels"])},
            "endpointPickerRef": {
                "name": epp_name(release),
                "port": {"number": router["epp"].get("extProcPort", 9002)},
                "failureMode": "FailOpen",
            },
        },
    }


#: The endpoint picker's P/D configuration (llm-d HEAD ``guides/wide-ep-lws/router/wide-ep-lws.values.yaml``):
#: the profile handler runs the decode profile, asks the decider, then the prefill profile; prefill picks by
#: prefix-cache hits and queue length, decode by active requests.
EPP_CONFIG: dict[str, Any] = {
    "apiVersion": "llm-d.ai/v1alpha1",
    "kind": "EndpointPickerConfig",
    "plugins": [
        {"type": "disagg-headers-handler"},
        {"type": "always-disagg-pd-decider"},
        {"type": "disagg-profile-handler", "parameters": {"deciderPluginName": "always-disagg-pd-decider"}},
        {"type": "prefill-filter"},
        {"type": "decode-filter"},
        {"type": "prefix-cache-scorer"},
        {"type": "queue-scorer"},
        {"type": "active-request-scorer"},
    ],
    "schedulingProfiles": [
        {
            "name": "prefill",
            "plugins": [
                {"pluginRef": "prefill-filter"},
                {"pluginRef": "prefix-cache-scorer", "weight": 3},
                {"pluginRef": "queue-scorer", "weight": 2},
                {"pluginRef": "active-request-scorer", "weight": 2},
            ],
        },
        {"name": "decode", "plugins": [{"pluginRef": "decode-filter"}, {"pluginRef": "active-request-scorer"}]},
    ],
}


def router_values(
    plan: DeploymentPlan, selector: dict[str, str], ports: list[int], epp_port: int = 9002
) -> dict[str, Any]:
    """Values of llm-d's router chart for this plan: the pool it creates (``modelServers``: the pods of both roles
    on the pool ports; ``inferencePool.create: true`` said explicitly, since the chart's pool is the only one) and
    the EPP's P/D configuration."""
    config_file = f"{plan.name}-pd.yaml"
    return {
        "router": {
            "extraServicePorts": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8081}],
            "inferencePool": {"create": True, "failureMode": "FailOpen"},
            "epp": {
                "extProcPort": epp_port,
                "pluginsConfigFile": config_file,
                "pluginsCustomConfig": {config_file: yaml.safe_dump(EPP_CONFIG, sort_keys=False)},
            },
            "modelServers": {
                "targetPorts": [{"number": p} for p in ports],
                "matchLabels": dict(selector),
            },
        },
    }


def router_values_text(plan: DeploymentPlan, values: dict[str, Any], manifests: str) -> str:
    release = chart_release(plan)
    head = [
        f"Values of llm-d's router chart for {plan.name} (generated by widep lws --front-door llm-d; do not edit).",
        f"helm install {release} {ROUTER_CHART} --version {ROUTER_CHART_VERSION} -f THIS_FILE",
        f"The chart owns the InferencePool: release {release} creates InferencePool/{release} (modelServers below:",
        f"the pods of {manifests} on their pool ports) and its endpoint picker Service {epp_name(release)}.",
    ]
    from widep.k8s.lws import dump_manifests

    return dump_manifests([values], head)  # multi-line strings (the EPP config) as literal blocks


def check_router_values(values: Any, pool: dict[str, Any] | None = None) -> list[str]:
    """Problems of a router values document: plugin references that name no plugin, profiles the P/D handler
    needs, target ports (1..8, unique) and, given the InferencePool, agreement with it."""
    out: list[str] = []
    try:
        router = values["router"]
        files = router["epp"]["pluginsCustomConfig"]
        cfg = yaml.safe_load(files[router["epp"]["pluginsConfigFile"]])
        ports = [p["number"] for p in router["modelServers"]["targetPorts"]]
        labels = router["modelServers"]["matchLabels"]
    except (KeyError, TypeError, yaml.YAMLError) as err:
        return [f"not a router values file widep understands: {err!r}"]
    types = {p.get("name", p["type"]) for p in cfg.get("plugins", [])}
    for prof in cfg.get("schedulingProfiles", []):
        for ref in prof.get("plugins", []):
            if ref.get("pluginRef") not in types:
                out.append(
                    f"profile {prof.get('name')!r} references plugin {ref.get('pluginRef')!r}, which is not defined"
                )
    if {p.get("name") for p in cfg.get("schedulingProfiles", [])} != {"prefill", "decode"}:
        out.append("the P/D profile handler needs exactly the scheduling profiles 'prefill' and 'decode'")
    if not 1 <= len(ports) <= 8 or len(set(ports)) != len(ports):
        out.append(f"targetPorts must be 1..8 unique ports, given {ports}")
    if pool is not None:
        spec = pool.get("spec", {})
        if [p.get("number") for p in spec.get("targetPorts", [])] != ports:
            out.append("targetPorts differ from the InferencePool's")
        if spec.get("selector", {}).get("matchLabels") != labels:
            out.append("matchLabels differ from the InferencePool's selector")
    return out


# ----------------------------------------------------------------------------------------------
# --validate: the router's image and entry point


def router_container_problems(doc: dict[str, Any]) -> list[tuple[tuple, str, str]]:
    """Warnings for a Deployment running vllm-router: an image without a tag (or digest) and a command that is
    not a known router entry point (an image's own ENTRYPOINT cannot be checked from the manifest)."""
    spec = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    labels = ((doc.get("metadata") or {}).get("labels")) or {}
    out: list[tuple[tuple, str, str]] = []
    for i, c in enumerate(spec.get("containers") or []):
        if not isinstance(c, dict):
            continue
        command = [str(w) for w in (c.get("command") or [])]
        words = command + [str(w) for w in (c.get("args") or [])]
        is_router = labels.get("app.kubernetes.io/name") == "vllm-router" or any(
            "vllm-router" in w or "vllm_router" in w for w in words[:3]
        )
        if not is_router:
            continue
        path = ("spec", "template", "spec", "containers", i)
        image = str(c.get("image") or "")
        name = image.rsplit("/", 1)[-1]
        if "@" not in image and ":" not in name:
            message = (
                f"router image {image!r} has no tag: pin the vllm-router version, e.g. "
                f"{image}:{ROUTER_VERSION} ({ROUTER_IMAGE_HOWTO})"
            )
            out.append((path + ("image",), message, "warning"))
        head = tuple(w.rsplit("/", 1)[-1] if j == 0 else w for j, w in enumerate(command))
        if not any(head[: len(ep)] == ep for ep in ROUTER_ENTRY_POINTS):
            known = " or ".join(" ".join(ep) for ep in ROUTER_ENTRY_POINTS[:2])
            message = (
                f"router command {command or '(image entrypoint)'} is not a known "
                f"vllm-router entry point. Valid: {known}"
            )
            out.append((path + ("command",), message, "warning"))
    return out
