"""The vllm-router front door on Kubernetes: a Deployment and a Service, for clusters without the llm-d
inference scheduler. Pure: plain dicts, stable key order.

The router reaches each API server through the pod DNS names LeaderWorkerSet gives its pods
(``<lws>-<group>`` for a group's leader, ``<lws>-<group>-<worker>`` for workers, under the LWS's
headless Service ``<lws>``), on the rank's port.
"""

from __future__ import annotations

import math
from typing import Any

from widep.plan.core import DeploymentPlan, RolePlan
from widep.render.quoting import k8s_escape
from widep.render.vllm import router_health_failure_threshold, router_recovery_args

#: Seconds the router's startup probe allows beyond its --worker-startup-timeout-secs (its own start).
ROUTER_START_MARGIN_S = 60


def _pod_host(lws: str, replica: int, pod_index: int, namespace: str | None) -> str:
    pod = f"{lws}-{replica}" if pod_index == 0 else f"{lws}-{replica}-{pod_index}"
    return f"{pod}.{lws}" + (f".{namespace}.svc" if namespace else "")


def worker_urls(plan: DeploymentPlan, rp: RolePlan, lws: str, placement: str, namespace: str | None) -> list[str]:
    """The URL of every API server of a role, as the router inside the cluster reaches it."""
    urls = []
    seen = set()
    for r in rp.ranks:
        if r.port is None:
            continue
        per_rank = placement == "pod-per-rank" and rp.dp_local > 1
        pod_index = r.dp_rank if per_rank else r.group_node
        # a pod per rank serves its one rank on the role's base port (every pod runs the same template)
        port = rp.http_port if per_rank else r.port
        key = (r.replica, pod_index, port)
        if key in seen:
            continue
        seen.add(key)
        urls.append(f"http://{_pod_host(lws, r.replica, pod_index, namespace)}:{port}")
    return urls


def router_manifests(
    plan: DeploymentPlan,
    lws_names: dict[str, str],
    placement: str,
    namespace: str | None,
    image: str,
    labels_base: dict[str, str],
    *,
    startup_timeout_s: int | None = None,
) -> list[dict[str, Any]]:
    """Deployment + Service of the router: the topology's router section, or (a P/D topology without one)
    its defaults in P/D mode. ``startup_timeout_s``: how long the router waits for workers (the start budget)."""
    rs = plan.spec.router
    rt = plan.router
    kinds = {rp.kind for rp in plan.roles}
    port = rt.port if rt else rs.port
    prometheus_port = rt.prometheus_port if rt else rs.prometheus_port
    pd = rt.pd if rt else rs.pd != "off" and kinds >= {"prefill", "decode"}
    name = f"{plan.name}-router"
    wait_s = startup_timeout_s or plan.spec.vllm.ready_timeout_s
    argv = [
        rs.command,
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--prometheus-port",
        str(prometheus_port),
        "--prometheus-host",
        "0.0.0.0",
    ]
    urls = {rp.name: worker_urls(plan, rp, lws_names[rp.name], placement, namespace) for rp in plan.roles}
    if pd:
        argv.append("--vllm-pd-disaggregation")
        for rp in plan.roles:
            flag = "--prefill" if rp.kind == "prefill" else "--decode"
            for u in urls[rp.name]:
                argv += [flag, u]
        argv += ["--prefill-policy", rs.prefill_policy or rs.policy, "--decode-policy", rs.decode_policy or rs.policy]
    else:
        argv += ["--worker-urls", *[u for rp in plan.roles for u in urls[rp.name]], "--policy", rs.policy]
    argv += [
        "--worker-startup-timeout-secs",
        str(wait_s),
        "--health-check-interval-secs",
        str(rs.health_check_interval_s),
        "--health-failure-threshold",
        str(router_health_failure_threshold(plan)),
        *router_recovery_args(plan),
        *rs.extra_args,
    ]
    labels = {**labels_base, "app.kubernetes.io/name": "vllm-router", "app.kubernetes.io/component": "router"}
    selector = {"app.kubernetes.io/instance": plan.name, "app.kubernetes.io/component": "router"}
    # No VLLM_API_KEY env: vllm-router does not read it, it forwards the client's Authorization header to vLLM.
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    container: dict[str, Any] = {
        "name": "router",
        "image": image,
        "command": [k8s_escape(a) for a in argv[:1]],
        "args": [k8s_escape(a) for a in argv[1:]],
        "ports": [
            {"name": "http", "containerPort": port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": prometheus_port, "protocol": "TCP"},
        ],
        # vllm-router opens its port only once every worker is healthy (up to --worker-startup-timeout-secs):
        # the startup probe allows that wait plus a minute, liveness starts after it.
        "startupProbe": probe | {"failureThreshold": math.ceil((wait_s + ROUTER_START_MARGIN_S) / 10)},
        "readinessProbe": probe | {"failureThreshold": 3},
        "livenessProbe": probe | {"failureThreshold": 6},
        # requests = limits: Guaranteed QoS, the front door is the last thing to evict
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "runAsUser": 65532,
        },
    }
    meta = {"name": name, "labels": labels}
    if namespace:
        meta["namespace"] = namespace
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": dict(meta),
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": selector},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "automountServiceAccountToken": False,
                        "enableServiceLinks": False,
                        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [container],
                        "terminationGracePeriodSeconds": 30,
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": dict(meta),
            "spec": {
                "type": "ClusterIP",
                "selector": selector,
                "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
            },
        },
    ]
