"""``cross-object``: what every single-object validator passes but a cluster still breaks on, checked across the
documents of one file (widep's output or any user file).

* a Service / InferencePool selector must match the labels of some pod template in the file (LWS pods get the
  controller's ``leaderworkerset.sigs.k8s.io/*`` labels on top of their template's);
* every referenced port must be one a container of the selected pod listens on: Service ``targetPort``,
  InferencePool ``targetPorts``, router worker URLs (``http://<pod>.<lws>:<port>`` in a container's args). A
  container listens on its ``containerPort`` entries and on the ``--port N`` of its command (vLLM, sidecars);
* names referenced across objects (Secrets, ConfigMaps, PVCs, the InferencePool's endpoint-picker Service) exist
  in the file or are declared user-provided prerequisites (header lines ``# prerequisite: Kind/name``);
* env entries with both ``value`` and ``valueFrom`` (the API server rejects them);
* probe budgets: a container that waits (``--worker-startup-timeout-secs T`` of vllm-router, which opens no port
  until every worker is healthy; ``VLLM_ENGINE_READY_TIMEOUT_S`` of vLLM) must not be killed by its liveness probe
  before T: a startupProbe (or, without one, the liveness probe) must allow T seconds;
* LWS ``size`` against the group size a pod's script checks (``LWS_GROUP_SIZE != N``) and the worker indices
  router URLs name;
* DeepEP (``--all2all-backend deepep_*``) across the pods of an LWS group without an RDMA device request, an RDMA
  network annotation or a ``# rdma: none`` header line;
* names a named chart also creates: a header line ``# ... helm install RELEASE CHART ...`` of a chart widep knows
  (llm-d's routerlib charts: :func:`widep.k8s.frontdoor.chart_objects`) declares what that release creates; those
  objects count as existing, and an object of the file with the same kind and name is flagged (two owners: the
  install fails or they fight).

Each problem names the object, the field, the value and what would be valid.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from widep.k8s.names import LWS_PREFIX, SET_NAME_LABEL, WORKER_INDEX_LABEL

#: A header line declaring an object the user provides (``# prerequisite: Secret/hf-token``).
PREREQUISITE_LINE = re.compile(r"^#\s*prerequisite:\s*([A-Za-z]+)/([a-z0-9.-]+)", re.MULTILINE)
_PORT_FLAG = re.compile(r"(?<![\w-])--port(?:=|\s+)[\"']?(\d+)")
_URL = re.compile(r"^https?://([A-Za-z0-9.-]+):(\d+)(?:/.*)?$")
_GROUP_SIZE = re.compile(r'"\$\{LWS_GROUP_SIZE:-\}"\s*!=\s*"(\d+)"')
_WAIT_FLAG = "--worker-startup-timeout-secs"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "ReplicaSet", "DaemonSet", "Job")


def prerequisites_of(text: str) -> set[tuple[str, str]]:
    """(kind, name) of every ``# prerequisite: Kind/name`` line in a file's text."""
    return {(m.group(1), m.group(2)) for m in PREREQUISITE_LINE.finditer(text)}


#: A header line declaring that the cluster gives pods RDMA without a device plugin resource or network annotation.
RDMA_NONE_LINE = re.compile(r"^#\s*rdma:\s*none\b", re.MULTILINE)

#: A comment line installing a chart: ``# ... helm install RELEASE CHART [flags]`` (also ``helm upgrade --install``).
HELM_LINE = re.compile(
    r"^#[^\n]*?\bhelm\s+(?:upgrade\s+(?:--install|-i)|install)\s+(?P<release>[a-z0-9][a-z0-9.-]*)\s+(?P<chart>\S+)"
    r"(?P<rest>[^\n]*)$",
    re.MULTILINE,
)
_NO_POOL = re.compile(r"router\.inferencePool\.create=false\b")


def charts_of(text: str) -> dict[tuple[str, str], str]:
    """(kind, name) -> the ``helm install RELEASE CHART`` (a header comment line) that creates it, for the charts
    whose objects widep knows (llm-d's router charts)."""
    from widep.k8s.frontdoor import ROUTERLIB_CHARTS, chart_objects

    out: dict[tuple[str, str], str] = {}
    for m in HELM_LINE.finditer(text):
        chart = m.group("chart").rstrip("/").rsplit("/", 1)[-1].split("@")[0].split(":")[0]
        if chart not in ROUTERLIB_CHARTS:
            continue
        release = m.group("release")
        for obj in chart_objects(release, create_pool=_NO_POOL.search(m.group("rest")) is None):
            out.setdefault(obj, f"helm install {release} {m.group('chart')}")
    return out


@dataclass
class Pod:
    """One pod template of the file and what it listens on."""

    doc: int
    owner: str
    """'LeaderWorkerSet/x' or 'Deployment/y'."""
    path: tuple
    template: dict[str, Any]
    labels: dict[str, str]
    worker_indices: str
    """'leader', 'workers' or 'all' (LWS), 'all' otherwise."""
    ports: set[int] = field(default_factory=set)
    named: dict[str, int] = field(default_factory=dict)


def _d(value: Any) -> dict[str, Any]:
    """``value`` when it is a mapping, else an empty one (any shape gives problems, never exceptions)."""
    return value if isinstance(value, dict) else {}


def _l(value: Any) -> list[Any]:
    """``value`` when it is a list, else an empty one."""
    return value if isinstance(value, list) else []


def _containers(spec: Any) -> Iterator[tuple[str, int, dict[str, Any]]]:
    if not isinstance(spec, dict):
        return
    for key in ("initContainers", "containers"):
        items = spec.get(key)
        if isinstance(items, list):
            for i, c in enumerate(items):
                if isinstance(c, dict):
                    yield key, i, c


def _words(c: dict[str, Any]) -> list[str]:
    return [str(w) for key in ("command", "args") if isinstance(c.get(key), list) for w in c[key]]


def _listening(template: dict[str, Any]) -> tuple[set[int], dict[str, int]]:
    ports: set[int] = set()
    named: dict[str, int] = {}
    spec = template.get("spec")
    for key, _, c in _containers(spec):
        if key == "initContainers" and c.get("restartPolicy") != "Always":
            continue  # a plain init container exits before the pod serves
        for p in _l(c.get("ports")):
            if isinstance(p, dict) and isinstance(p.get("containerPort"), int):
                ports.add(p["containerPort"])
                if isinstance(p.get("name"), str):
                    named[p["name"]] = p["containerPort"]
        for m in _PORT_FLAG.finditer("\n".join(_words(c))):
            ports.add(int(m.group(1)))
    return ports, named


def _labels(template: Any) -> dict[str, str]:
    labels = _d(template.get("metadata")).get("labels") if isinstance(template, dict) else None
    labels = labels if isinstance(labels, dict) else {}
    return {str(k): str(v) for k, v in labels.items()}


def collect_pods(docs: list[Any]) -> tuple[list[Pod], dict[str, dict[str, Any]]]:
    """Every pod template in ``docs`` and the LeaderWorkerSets by name."""
    pods: list[Pod] = []
    lws: dict[str, dict[str, Any]] = {}
    for pos, doc in enumerate(docs, start=1):
        if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
            continue
        kind, name = doc.get("kind"), str(_d(doc.get("metadata")).get("name") or "")
        if kind == "LeaderWorkerSet":
            lws[name] = doc
            lwt = doc["spec"].get("leaderWorkerTemplate")
            if not isinstance(lwt, dict):
                continue
            has_leader = isinstance(lwt.get("leaderTemplate"), dict)
            for key in ("leaderTemplate", "workerTemplate"):
                t = lwt.get(key)
                if not isinstance(t, dict):
                    continue
                which = "leader" if key == "leaderTemplate" else ("workers" if has_leader else "all")
                labels = {**_labels(t), SET_NAME_LABEL: name}
                if which == "leader":
                    labels[WORKER_INDEX_LABEL] = "0"
                pods.append(
                    Pod(pos, f"LeaderWorkerSet/{name}", ("spec", "leaderWorkerTemplate", key), t, labels, which)
                )
        elif kind in WORKLOAD_KINDS and isinstance(doc["spec"].get("template"), dict):
            t = doc["spec"]["template"]
            pods.append(Pod(pos, f"{kind}/{name}", ("spec", "template"), t, _labels(t), "all"))
    for p in pods:
        p.ports, p.named = _listening(p.template)
    return pods, lws


def _matches(pod: Pod, selector: dict[str, Any]) -> bool:
    """Could a pod of this template carry every label of ``selector``? (worker-index of LWS workers: 1..size-1,
    group-index and other controller labels: any value.)"""
    for k, v in selector.items():
        if k == WORKER_INDEX_LABEL and pod.worker_indices == "workers":
            if str(v) == "0":
                return False
            continue
        if k == WORKER_INDEX_LABEL and pod.worker_indices == "all":
            continue
        if k.startswith(LWS_PREFIX) and k not in (SET_NAME_LABEL, WORKER_INDEX_LABEL) and pod.owner.startswith("Lea"):
            continue
        if pod.labels.get(k) != str(v):
            return False
    return True


def _selected(pods: list[Pod], selector: dict[str, Any]) -> list[Pod]:
    return [p for p in pods if _matches(p, selector)]


def _ports_text(pod: Pod) -> str:
    return ", ".join(map(str, sorted(pod.ports))) or "none"


def _service_problems(doc: dict[str, Any], pods: list[Pod]) -> Iterator[tuple]:
    spec = _d(doc.get("spec"))
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not selector or spec.get("type") == "ExternalName":
        return
    if not pods:
        return  # the pods live in another file: nothing to compare with
    chosen = _selected(pods, selector)
    if not chosen:
        shown = ", ".join(f"{k}={v}" for k, v in selector.items())
        owners = ", ".join(sorted({p.owner for p in pods})) or "none"
        yield (
            ("spec", "selector"),
            f"selects no pod: no pod template in this file has the labels {shown} (pod templates: {owners}), so "
            "the Service gets no endpoints. Valid: the labels of a pod template here",
        )
        return
    for i, port in enumerate(_l(spec.get("ports"))):
        if not isinstance(port, dict):
            continue
        target = port.get("targetPort", port.get("port"))
        for pod in chosen:
            if not pod.ports:
                continue  # no containerPort and no --port: what it listens on is not in the manifest
            if isinstance(target, str):
                if target not in pod.named:
                    yield (
                        ("spec", "ports", i, "targetPort"),
                        f"{target!r} names no containerPort of {pod.owner} ({'.'.join(pod.path)}). "
                        f"Valid: {', '.join(sorted(pod.named)) or 'a named containerPort'}",
                    )
            elif isinstance(target, int) and target not in pod.ports:
                yield (
                    ("spec", "ports", i, "targetPort"),
                    f"{target} is no port a container of {pod.owner} ({'.'.join(pod.path)}) listens on. "
                    f"Valid: {_ports_text(pod)}",
                )


def _pool_problems(doc: dict[str, Any], pods: list[Pod], names: set[tuple[str, str]]) -> Iterator[tuple]:
    spec = _d(doc.get("spec"))
    selector = _d(spec.get("selector")).get("matchLabels")
    if isinstance(selector, dict) and selector:
        chosen = _selected(pods, selector)
        if not chosen:
            shown = ", ".join(f"{k}={v}" for k, v in selector.items())
            yield (
                ("spec", "selector", "matchLabels"),
                f"selects no pod: no pod template in this file has the labels {shown}. "
                "Valid: the labels of the model server pod templates here",
            )
        for i, tp in enumerate(_l(spec.get("targetPorts"))):
            number = tp.get("number") if isinstance(tp, dict) else None
            for pod in chosen:
                if pod.ports and isinstance(number, int) and number not in pod.ports:
                    yield (
                        ("spec", "targetPorts", i, "number"),
                        f"{number} is no port a container of {pod.owner} ({'.'.join(pod.path)}) listens on. "
                        f"Valid: {_ports_text(pod)}",
                    )
    ref = spec.get("endpointPickerRef")
    if isinstance(ref, dict) and isinstance(ref.get("name"), str):
        kind = ref.get("kind") or "Service"
        if (kind, ref["name"]) not in names:
            yield (
                ("spec", "endpointPickerRef", "name"),
                f"{kind}/{ref['name']} is neither in this file nor a declared prerequisite: the pool points at an "
                f"endpoint picker nobody creates. Valid: an object of this file, or a header line "
                f"'# prerequisite: {kind}/{ref['name']}' naming what installs it",
            )


def _probe_budget(probe: Any) -> int | None:
    if not isinstance(probe, dict):
        return None
    period = probe.get("periodSeconds", 10)
    threshold = probe.get("failureThreshold", 3)
    delay = probe.get("initialDelaySeconds", 0)
    if not all(isinstance(x, int) for x in (period, threshold, delay)):
        return None
    return delay + period * threshold


def _wait_seconds(c: dict[str, Any]) -> tuple[int, str] | None:
    words = _words(c)
    for i, w in enumerate(words[:-1]):
        if w == _WAIT_FLAG and words[i + 1].isdigit():
            return int(words[i + 1]), f"{_WAIT_FLAG} {words[i + 1]} (it opens no port before every worker is healthy)"
    for e in _l(c.get("env")):
        if isinstance(e, dict) and e.get("name") == "VLLM_ENGINE_READY_TIMEOUT_S" and str(e.get("value", "")).isdigit():
            return int(e["value"]), f"VLLM_ENGINE_READY_TIMEOUT_S={e['value']}"
    return None


def _container_problems(pod: Pod, names: set[tuple[str, str]]) -> Iterator[tuple]:
    spec = pod.template.get("spec")
    for key, i, c in _containers(spec):
        base = pod.path + ("spec", key, i)
        for j, e in enumerate(_l(c.get("env"))):
            if not isinstance(e, dict):
                continue
            if "value" in e and "valueFrom" in e:
                yield (
                    base + ("env", j),
                    f"env {e.get('name')!r} has both value and valueFrom (the API server rejects it: 'may not have "
                    "both value and valueFrom'). Valid: one of them",
                    "error",
                )
            src = e.get("valueFrom") if isinstance(e.get("valueFrom"), dict) else {}
            for ref_key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                ref = src.get(ref_key)
                if isinstance(ref, dict) and isinstance(ref.get("name"), str) and not ref.get("optional"):
                    if (kind, ref["name"]) not in names:
                        yield (
                            base + ("env", j, "valueFrom", ref_key, "name"),
                            f"{kind}/{ref['name']} is neither in this file nor a declared prerequisite (the pod "
                            f"stays in CreateContainerConfigError). Valid: an object of this file, or a header "
                            f"line '# prerequisite: {kind}/{ref['name']}'",
                            "note",
                        )
        waits = _wait_seconds(c)
        if waits is not None and key == "containers":
            seconds, why = waits
            startup = _probe_budget(c.get("startupProbe"))
            live = _probe_budget(c.get("livenessProbe"))
            if startup is not None and startup < seconds:
                yield (
                    base + ("startupProbe", "failureThreshold"),
                    f"the startup probe allows {startup} s but the container waits up to {seconds} s ({why}). "
                    f"Valid: initialDelaySeconds + periodSeconds x failureThreshold >= {seconds}",
                )
            elif startup is None and live is not None and live < seconds:
                yield (
                    base + ("livenessProbe",),
                    f"the liveness probe restarts the container after {live} s but it waits up to {seconds} s "
                    f"({why}). Valid: a startupProbe allowing >= {seconds} s",
                )
    for j, v in enumerate(_l(_d(spec).get("volumes"))):
        if not isinstance(v, dict):
            continue
        for vkey, kind, nkey in (
            ("secret", "Secret", "secretName"),
            ("configMap", "ConfigMap", "name"),
            ("persistentVolumeClaim", "PersistentVolumeClaim", "claimName"),
        ):
            src = v.get(vkey)
            if isinstance(src, dict) and isinstance(src.get(nkey), str) and not src.get("optional"):
                if (kind, src[nkey]) not in names:
                    yield (
                        pod.path + ("spec", "volumes", j, vkey, nkey),
                        f"{kind}/{src[nkey]} is neither in this file nor a declared prerequisite (the pod stays "
                        f"Pending/ContainerCreating). Valid: an object of this file, or a header line "
                        f"'# prerequisite: {kind}/{src[nkey]}'",
                        "note",
                    )


def _lws_size_problems(pod: Pod, lws: dict[str, dict[str, Any]]) -> Iterator[tuple]:
    if not pod.owner.startswith("LeaderWorkerSet/"):
        return
    doc = lws[pod.owner.split("/", 1)[1]]
    size = _d(doc["spec"].get("leaderWorkerTemplate")).get("size", 1)
    for key, i, c in _containers(pod.template.get("spec")):
        for m in _GROUP_SIZE.finditer("\n".join(_words(c))):
            if int(m.group(1)) != size:
                yield (
                    ("spec", "leaderWorkerTemplate", "size"),
                    f"{size}, but the script of {'.'.join(pod.path)}.spec.{key}[{i}] computes its ranks for "
                    f"groups of {m.group(1)} pods (and exits otherwise). Valid: {m.group(1)}",
                )


_DEEPEP = re.compile(r"--all2all-backend(?:=|\s+)[\"']?(deepep_[a-z_]+)|VLLM_ALL2ALL_BACKEND=[\"']?(deepep_[a-z_]+)")
#: Pod annotations that attach RDMA networks without an extended resource (Multus, GKE multi-networking).
RDMA_NETWORK_ANNOTATIONS = ("k8s.v1.cni.cncf.io/networks", "networking.gke.io/interfaces")


def _rdma_problems(pod: Pod, lws: dict[str, dict[str, Any]], rdma_declared: bool) -> Iterator[tuple]:
    """DeepEP across the pods of an LWS group needs RDMA between them: some container must request an RDMA device
    (an extended resource named like rdma), or the pod must attach RDMA networks by annotation, or the file's
    header must declare that the cluster provides RDMA otherwise (``# rdma: none``)."""
    if rdma_declared or not pod.owner.startswith("LeaderWorkerSet/"):
        return
    size = _d(_d(lws[pod.owner.split("/", 1)[1]]["spec"]).get("leaderWorkerTemplate")).get("size", 1)
    if not isinstance(size, int) or size < 2:
        return
    spec = _d(pod.template.get("spec"))
    backend = None
    for _, _, c in _containers(spec):
        env = " ".join(f"{e.get('name')}={e.get('value')}" for e in _l(c.get("env")) if isinstance(e, dict))
        if m := _DEEPEP.search("\n".join(_words(c)) + "\n" + env):
            backend = m.group(1) or m.group(2)
    if backend is None:
        return
    annotations = _d(_d(pod.template.get("metadata")).get("annotations"))
    if any(a in annotations for a in RDMA_NETWORK_ANNOTATIONS):
        return
    for _, _, c in _containers(spec):
        res = _d(c.get("resources"))
        if any("rdma" in str(k).lower() for part in ("limits", "requests") for k in _d(res.get(part))):
            return
    yield (
        ("spec", "leaderWorkerTemplate", "size"),
        f"{size}: the pods of a group run {backend} between them (NVSHMEM over RDMA), but {'.'.join(pod.path)} "
        "requests no RDMA device and attaches no RDMA network: DeepEP's internode kernels fail. Valid: an RDMA "
        "extended resource in the container's limits (e.g. rdma/ib: 1), a network annotation "
        f"({' or '.join(RDMA_NETWORK_ANNOTATIONS)}), or a header line '# rdma: none' where the cluster gives pods "
        "the HCAs another way",
    )


def _url_problems(pod: Pod, pods: list[Pod], lws: dict[str, dict[str, Any]], services: dict) -> Iterator[tuple]:
    for key, i, c in _containers(pod.template.get("spec")):
        args = c.get("args")
        if not isinstance(args, list):
            continue
        for j, w in enumerate(args):
            m = _URL.match(str(w))
            if not m:
                continue
            host, port = m.group(1), int(m.group(2))
            path = pod.path + ("spec", key, i, "args", j)
            parts = host.split(".")
            if len(parts) >= 2 and parts[1] in lws:
                set_name = parts[1]
                doc = lws[set_name]
                size = _d(doc["spec"].get("leaderWorkerTemplate")).get("size", 1)
                replicas = doc["spec"].get("replicas", 1)
                if not isinstance(size, int) or not isinstance(replicas, int):
                    continue  # the schema layers report it
                pm = re.fullmatch(re.escape(set_name) + r"-(\d+)(?:-(\d+))?", parts[0])
                if pm is None:
                    yield (
                        path,
                        f"{w!r}: {parts[0]!r} is no pod name of LeaderWorkerSet {set_name} "
                        f"(pods are {set_name}-<group> and {set_name}-<group>-<worker>)",
                    )
                    continue
                group, worker = int(pm.group(1)), int(pm.group(2) or 0)
                if group >= replicas or worker >= size or pm.group(2) == "0":
                    yield (
                        path,
                        f"{w!r}: pod {parts[0]} does not exist: LeaderWorkerSet {set_name} has replicas "
                        f"{replicas} and size {size}. Valid: group 0..{replicas - 1}, worker 1..{size - 1}",
                    )
                    continue
                which = "leader" if worker == 0 else "workers"
                targets = [
                    p for p in pods if p.owner == f"LeaderWorkerSet/{set_name}" and p.worker_indices in (which, "all")
                ]
                for p in targets:
                    if p.ports and port not in p.ports:
                        yield (
                            path,
                            f"{w!r}: port {port} is no port pod {parts[0]} ({'.'.join(p.path)}) listens "
                            f"on. Valid: {_ports_text(p)}",
                        )
            elif parts[0] in services:
                svc_ports = [
                    p.get("port") for p in _l(_d(services[parts[0]].get("spec")).get("ports")) if isinstance(p, dict)
                ]
                if port not in svc_ports:
                    yield (
                        path,
                        f"{w!r}: Service {parts[0]} has no port {port}. Valid: "
                        f"{', '.join(map(str, svc_ports)) or 'none'}",
                    )


def _chart_problems(doc: dict[str, Any], charts: dict[tuple[str, str], str]) -> Iterator[tuple]:
    name = _d(doc.get("metadata")).get("name")
    install = charts.get((str(doc.get("kind")), name)) if isinstance(name, str) else None
    if install is None:
        return
    fix = (
        "remove it from this file (the chart's values make it: router.modelServers select the pods and ports)"
        if doc.get("kind") == "InferencePool"
        else "rename it, or install the chart under another release name"
    )
    yield (
        ("metadata", "name"),
        f"{name!r}: `{install}` (this file's header) also creates {doc.get('kind')}/{name}: two owners of one "
        f"object (helm refuses to install over it, or the two overwrite each other). Valid: {fix}",
    )


def cross_object_problems(
    docs: list[Any],
    prerequisites: set[tuple[str, str]] | None = None,
    charts: dict[tuple[str, str], str] | None = None,
    rdma_declared: bool = False,
) -> dict[int, list]:
    """Problems per document position (1-based): ``{pos: [(path, message, severity), ...]}``. ``charts``: objects
    a chart installed beside this file creates (:func:`charts_of`)."""
    pods, lws = collect_pods(docs)
    names: set[tuple[str, str]] = set(prerequisites or ())
    services: dict[str, dict[str, Any]] = {}
    for doc in docs:
        if isinstance(doc, dict) and isinstance(doc.get("kind"), str):
            name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
            if isinstance(name, str):
                names.add((doc["kind"], name))
                if doc["kind"] == "Service":
                    services[name] = doc
    # a LeaderWorkerSet makes a headless Service of its own name
    names |= {("Service", n) for n in lws}
    out: dict[int, list] = {}
    for pos, doc in enumerate(docs, start=1):
        if not isinstance(doc, dict):
            continue
        if charts:
            out.setdefault(pos, []).extend(_chart_problems(doc, charts))
        if doc.get("kind") == "Service" and doc.get("apiVersion") == "v1":
            out.setdefault(pos, []).extend(_service_problems(doc, pods))
        elif doc.get("kind") == "InferencePool":
            out.setdefault(pos, []).extend(_pool_problems(doc, pods, names))
    for pod in pods:
        found = out.setdefault(pod.doc, [])
        found.extend(_container_problems(pod, names))
        found.extend(_lws_size_problems(pod, lws))
        found.extend(_rdma_problems(pod, lws, rdma_declared))
        found.extend(_url_problems(pod, pods, lws, services))
    # what the API server accepts but a running cluster breaks on is a warning (it fails --validate all the same);
    # what it rejects says "error" itself
    return {k: [item if len(item) > 2 else (*item, "warning") for item in v] for k, v in out.items() if v}
