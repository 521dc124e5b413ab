"""What a pod asks of its node, how long it may take to start, and what Kubernetes makes of it (pure).

* :func:`size_pod`: CPU, memory and scratch requests (= limits, so the pod is ``Guaranteed``) from the plan:
  CPU per rank, host memory to page the rank's weights in plus process overhead plus the memory-backed
  ``/dev/shm`` (it counts against the memory limit), ephemeral storage for logs and caches on ``emptyDir``.
* :func:`start_budget_s`: the startup probe's budget from the model's size and the role.
* :func:`qos_class`: Kubernetes' QoS class of a pod spec (``pkg/apis/core/v1/helper/qos``: Guaranteed when every
  container, init containers included, has cpu and memory limits equal to its requests; BestEffort when no
  container has any cpu/memory request or limit; else Burstable).
* :func:`pod_security_level`: the least permissive Pod Security Standard (restricted < baseline < privileged)
  a namespace must allow for a pod spec, with the reasons (the rules of kubernetes.io "Pod Security Standards",
  the controls that widep's pods can touch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from widep.plan.core import DeploymentPlan, RolePlan
from widep.plan.memory import weight_bytes

GIB = 2**30
#: CPUs per GPU rank: llm-d's wide-EP pods request 32 CPUs for 8 GPUs.
CPU_PER_GPU_RANK = 4
#: Host memory per vLLM process beyond its weights: Python, CUDA context, NCCL/NIXL host buffers, tokenizer.
HOST_OVERHEAD_GIB_PER_RANK = 8
#: Scratch for logs, Python caches and temporary files of one pod.
SCRATCH_GIB = 16
#: Compile/JIT caches (DeepGEMM, FlashInfer, Triton, inductor) when they have to live on emptyDir.
JIT_CACHE_GIB = 32

#: Start budget = fixed part + seconds per GiB of checkpoint (download at a few hundred MB/s, then load)
#: + warm-up per role (DeepGEMM/FlashInfer JIT, CUDA graphs; decode captures the most graphs). DeepSeek-R1
#: (~640 GiB FP8): decode ~47 min, prefill ~42 min, against the ~45 min llm-d reports (PR #529) and its
#: 2700 s startup probes.
BUDGET_BASE_S = 300
BUDGET_S_PER_GIB = 2.5
BUDGET_WARMUP_S = {"decode": 900, "mixed": 900, "prefill": 600}
BUDGET_WARMUP_CPU_S = 120


def checkpoint_gib(plan: DeploymentPlan) -> float:
    """Size of the model's weights (all experts, the plan's weight dtype), GiB."""
    non_expert, experts = weight_bytes(plan.arch, plan.weight_dtype, 1, float(plan.arch.routed_experts))
    return (non_expert + experts) / GIB


def start_budget_s(plan: DeploymentPlan, rp: RolePlan, override: int | None = None) -> int:
    """Seconds a pod of this role may take to become healthy: ``override``, else ``vllm.ready_timeout_s``
    when the topology sets it, else derived from the checkpoint size and the role (rounded up to a minute)."""
    if override is not None:
        return override
    if "ready_timeout_s" in plan.spec.vllm.model_fields_set:
        return plan.spec.vllm.ready_timeout_s
    warm = BUDGET_WARMUP_S.get(rp.kind, 900) if plan.device == "cuda" else BUDGET_WARMUP_CPU_S
    seconds = BUDGET_BASE_S + BUDGET_S_PER_GIB * checkpoint_gib(plan) + warm
    return int(math.ceil(seconds / 60) * 60)


@dataclass(frozen=True)
class PodSize:
    """Requests (= limits) of a pod's vLLM container."""

    cpu: str
    memory: str
    ephemeral_storage: str
    shm: str
    """sizeLimit of the memory-backed /dev/shm (included in memory)."""
    how: str
    """How the numbers came about, for the file header."""


def parse_gib(quantity: str) -> int:
    """A memory quantity in whole GiB, rounded up (for sums; the quantity itself is what the pod asks)."""
    from widep.k8s.validate import parse_quantity

    value = parse_quantity(quantity)
    return math.ceil(float(value) / GIB) if value is not None else 0


def _gib(value: float, step: int) -> int:
    return int(math.ceil(max(value, 1) / step) * step)


def size_pod(
    plan: DeploymentPlan,
    rp: RolePlan,
    ranks: int,
    devices: int,
    *,
    model_on_emptydir: bool,
    jit_on_emptydir: bool,
    shm_gib: int,
    cpu: str | None = None,
    memory: str | None = None,
    ephemeral_storage: str | None = None,
) -> PodSize:
    """Requests of one pod that runs ``ranks`` DP ranks on ``devices`` GPUs (CPU slots on the CPU backend)."""
    cuda = plan.device == "cuda"
    m = rp.memory
    if cuda:
        cpus = CPU_PER_GPU_RANK * devices
        per_rank = m.weights_gib * rp.tp_size + HOST_OVERHEAD_GIB_PER_RANK
        mem = _gib(per_rank * ranks + shm_gib, 16)
    else:
        cpus = devices
        per_rank = m.weights_gib + m.kv_cache_gib + 2
        mem = _gib(per_rank * ranks + shm_gib, 1)
    scratch = (
        SCRATCH_GIB
        + (checkpoint_gib(plan) * 1.1 if model_on_emptydir else 0)
        + (JIT_CACHE_GIB if jit_on_emptydir else 0)
    )
    how = (
        f"{cpus if cpu is None else cpu} CPU ({CPU_PER_GPU_RANK if cuda else 1} per "
        f"{'GPU' if cuda else 'rank slot'}), memory {per_rank:.0f} GiB x {ranks} rank(s) "
        f"({'weights + ' + str(HOST_OVERHEAD_GIB_PER_RANK) + ' GiB' if cuda else 'weights + KV + 2 GiB'}) "
        f"+ {shm_gib} GiB /dev/shm"
    )
    return PodSize(
        cpu=cpu or str(cpus),
        memory=memory or f"{mem}Gi",
        ephemeral_storage=ephemeral_storage or f"{_gib(scratch, 16)}Gi",
        shm=f"{shm_gib}Gi",
        how=how,
    )


# ----------------------------------------------------------------------------------------------
# QoS class and Pod Security level, computed from the pod spec widep emits


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def qos_class(spec: dict[str, Any]) -> str:
    """``Guaranteed``, ``Burstable`` or ``BestEffort``, as the kubelet computes it for this pod spec."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    guaranteed = True
    from widep.k8s.validate import parse_quantity

    for c in _containers(spec):
        res = c.get("resources") or {}
        req = {k: v for k, v in (res.get("requests") or {}).items() if k in ("cpu", "memory")}
        lim = {k: v for k, v in (res.get("limits") or {}).items() if k in ("cpu", "memory")}
        for k, v in req.items():
            if parse_quantity(v) != 0:
                requests[k] = v
        for k, v in lim.items():
            if parse_quantity(v) != 0:
                limits[k] = v
        if set(lim) != {"cpu", "memory"}:
            guaranteed = False
        # requests default to limits when unset
        for k in ("cpu", "memory"):
            if k in req and k in lim and parse_quantity(req[k]) != parse_quantity(lim[k]):
                guaranteed = False
    if not requests and not limits:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


#: Pod Security Standards, baseline: capabilities that may be added.
BASELINE_CAPS = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
#: restricted: volume types allowed.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def pod_security_level(spec: dict[str, Any]) -> tuple[str, list[str]]:
    """(``restricted`` | ``baseline`` | ``privileged``, why it is not lower) for a pod spec."""
    privileged: list[str] = []
    baseline: list[str] = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            privileged.append(f"{key}: true")
    for vol in spec.get("volumes") or []:
        kinds = [k for k in vol if k != "name"]
        if "hostPath" in kinds:
            privileged.append(f"hostPath volume {vol['name']!r}")
        elif not set(kinds) <= RESTRICTED_VOLUMES:
            baseline.append(f"volume {vol['name']!r} of type {', '.join(kinds)}")
    pod_sc = spec.get("securityContext") or {}
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    pod_nonroot = pod_sc.get("runAsNonRoot")
    for c in _containers(spec):
        sc = c.get("securityContext") or {}
        name = c.get("name")
        if sc.get("privileged"):
            privileged.append(f"container {name!r} is privileged")
        caps = sc.get("capabilities") or {}
        added = set(caps.get("add") or [])
        if added - BASELINE_CAPS:
            privileged.append(f"container {name!r} adds {', '.join(sorted(added - BASELINE_CAPS))}")
        if "ALL" not in (caps.get("drop") or []) or added - {"NET_BIND_SERVICE"}:
            baseline.append(f"container {name!r} does not drop ALL capabilities (or adds more than NET_BIND_SERVICE)")
        if sc.get("allowPrivilegeEscalation") is not False:
            baseline.append(f"container {name!r} may escalate privileges")
        if not (sc.get("runAsNonRoot") or (pod_nonroot and sc.get("runAsNonRoot") is not False)):
            baseline.append(f"container {name!r} may run as root (vLLM images do)")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            baseline.append(f"container {name!r} has no RuntimeDefault seccomp profile")
    if privileged:
        return "privileged", privileged
    if baseline:
        return "baseline", baseline
    return "restricted", []


def report(docs: list[dict[str, Any]]) -> list[str]:
    """One line per pod template of ``docs``: its QoS class, the Pod Security level its namespace must
    enforce at most, and the startup budget its probe allows."""
    lines = []
    for d in docs:
        templates: list[tuple[str, dict[str, Any]]] = []
        if d.get("kind") == "LeaderWorkerSet":
            lwt = d["spec"]["leaderWorkerTemplate"]
            templates = [(k.replace("Template", ""), lwt[k]) for k in ("leaderTemplate", "workerTemplate") if k in lwt]
        elif d.get("kind") == "Deployment":
            templates = [("pods", d["spec"]["template"])]
        for which, tpl in templates:
            spec = tpl.get("spec") or {}
            level, why = pod_security_level(spec)
            budget = ""
            for c in spec.get("containers") or []:
                sp = c.get("startupProbe")
                if sp:
                    budget = f", start budget {sp['periodSeconds'] * sp['failureThreshold'] // 60} min"
            reasons = f" ({why[0]}{f' and {len(why) - 1} more' if len(why) > 1 else ''})" if why else ""
            lines.append(
                f"{d['kind']} {d['metadata']['name']} {which}: QoS {qos_class(spec)}{budget}, "
                f"Pod Security level {level}{reasons}"
            )
    return lines
