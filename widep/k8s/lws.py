"""LeaderWorkerSet manifests from a plan (pure): one LWS and one Service per role, optionally an
InferencePool per role for the llm-d inference scheduler.

Everything a pod runs comes from the same :class:`~widep.render.vllm.ProcessCommand` data as
``widep render``: the generator renders the role, takes the commands of the first pod of a group
and turns the few values that differ between pods into bash built from the environment the LWS
pod webhook injects (``LWS_LEADER_ADDRESS``, ``LWS_GROUP_SIZE``, ``LWS_WORKER_INDEX``):

* ``--data-parallel-address``        -> ``${LWS_LEADER_ADDRESS}``
* ``--data-parallel-rank R``         -> ``$((W * D + local_rank))`` (W = worker index, D = ranks per pod)
* ``--data-parallel-start-rank S``   -> ``$((W * D))``
* ``--host`` for ``serving.host: node`` and ``VLLM_NIXL_SIDE_CHANNEL_HOST`` -> the pod IP (downward API)
* GPU ids (``CUDA_VISIBLE_DEVICES``) and CPU slots (``VLLM_CPU_OMP_THREADS_BIND``) are numbered
  inside the pod, which sees its own devices from 0; with ``pod-per-rank`` every pod serves the
  role's first port.

Placements: ``pod-per-node`` (LWS size = nodes per DP group; each pod holds a node's GPUs and starts
that node's processes, one vLLM per local rank in external mode, supervised so that a dying rank
fails the pod) and ``pod-per-rank`` (LWS size = DP size; one API server per pod; external DP mode
only, and refused for DeepEP backends whose intra-node traffic uses CUDA IPC, which cannot cross
pod boundaries).

Manifests are plain dicts with a fixed key order; :func:`dump_manifests` writes them with
``yaml.safe_dump(sort_keys=False)`` (multi-line scripts as literal blocks). Nothing here reads
files, the environment or the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

from widep.errors import UserError
from widep.k8s import frontdoor, providers
from widep.k8s import resources as sizing
from widep.k8s.names import (
    DNS1035_LABEL,
    DNS1123_LABEL,
    DNS1123_LABEL_MAX_LENGTH,
    DNS1123_SUBDOMAIN,
    DNS1123_SUBDOMAIN_MAX_LENGTH,
    EXCLUSIVE_TOPOLOGY,
    LABEL_VALUE_MAX_LENGTH,
    LWS_API_VERSION,
    LWS_GROUP_SIZE,
    LWS_LEADER_ADDRESS,
    LWS_WORKER_INDEX,
    QUALIFIED_NAME_MAX_LENGTH,
    QUALIFIED_NAME_PART,
    QUANTITY,
    SET_NAME_LABEL,
    WORKER_INDEX_LABEL,
    lws_name_max_length,
)
from widep.plan import api as plan_api
from widep.plan.core import DeploymentPlan, Rank, RolePlan
from widep.render.quoting import k8s_escape, sh_assign, sh_comment, sh_word
from widep.render.vllm import (
    DP_RANK,
    HOST,
    LEADER_ADDRESS,
    NODE_ADDRESS,
    PORT,
    START_RANK,
    EnvRef,
    ProcessCommand,
    RenderContext,
    Slot,
    render_role,
)

PLACEMENTS = ("pod-per-node", "pod-per-rank")
#: Gateway API Inference Extension v1 (llm-d's guides install GAIE v1.x, ``v1-manifests.yaml``).
INFERENCE_POOL_API_VERSION = "inference.networking.k8s.io/v1"
INFERENCE_POOL_MAX_PORTS = 8  # InferencePoolSpec.targetPorts: MaxItems=8

CONTAINER = "vllm"
CACHE_MOUNT = "/var/cache/huggingface"
SHM_MOUNT = "/dev/shm"
#: Compile/JIT caches on a volume that outlives the pod (LWS recreates a whole group on any restart).
JIT_MOUNT = "/var/cache/vllm"
JIT_ENV = (
    ("VLLM_CACHE_ROOT", f"{JIT_MOUNT}/vllm"),  # torch.compile artifacts and vLLM's own caches
    ("TORCHINDUCTOR_CACHE_DIR", f"{JIT_MOUNT}/inductor"),
    ("TRITON_CACHE_DIR", f"{JIT_MOUNT}/triton"),
    ("CUDA_CACHE_PATH", f"{JIT_MOUNT}/cuda"),
    ("FLASHINFER_WORKSPACE_BASE", f"{JIT_MOUNT}/flashinfer"),
    ("DG_JIT_CACHE_DIR", f"{JIT_MOUNT}/deep_gemm"),
)
#: Variables the manifests set beyond what ``widep render`` gives (besides the LWS ones).
K8S_ONLY_ENV = (
    ("POD_IP", "HF_HUB_CACHE", "WIDEP_SHM_DIR", "HF_HUB_OFFLINE", "VLLM_HTTP_TIMEOUT_KEEP_ALIVE")
    + tuple(k for k, _ in JIT_ENV)
    + tuple(sorted({k for pr in providers.PROVIDERS.values() for k, _ in pr.rdma_env}))
)
#: Rendered variables whose value the manifests replace: the engine-ready timeout follows the start budget.
K8S_REPLACED_ENV = ("VLLM_ENGINE_READY_TIMEOUT_S",)
#: Render variables that differ between the processes of one pod: set per process in the script.
PER_PROCESS_ENV = ("CUDA_VISIBLE_DEVICES", "VLLM_CPU_OMP_THREADS_BIND")

#: ``nvidia.com/gpu.product`` values (GPU feature discovery: the NVML device name with spaces as
#: dashes) of the SXM parts the GPU catalog describes. Clusters differ (PCIe/NVL variants, MIG or
#: sharing suffixes): override with ``--gpu-product``.
GPU_PRODUCTS: dict[str, tuple[str, ...]] = {
    "H100": ("NVIDIA-H100-80GB-HBM3",),
    "H800": ("NVIDIA-H800",),
    "H200": ("NVIDIA-H200",),
    "B200": ("NVIDIA-B200",),
    "GB200": ("NVIDIA-GB200",),
}


@dataclass(frozen=True)
class LWSOptions:
    """How to turn a plan into manifests (the ``widep lws`` flags)."""

    image: str | None = None
    """Container image; default the topology's vllm.image, else vLLM's image for the device (:func:`pod_image`)."""
    router_image: str = frontdoor.ROUTER_IMAGE
    """Image of the vllm-router Deployment (must contain the vllm-router executable)."""
    provider: str = "generic"
    """Provider profile (widep.k8s.providers): RDMA, HCA variables, privileges, node selection, cache paths."""
    front_door: str = "auto"
    """auto (P/D: router; otherwise the topology's router), router, llm-d or none."""
    routing_sidecar_image: str = frontdoor.ROUTING_SIDECAR_IMAGE
    """Image of llm-d's routing sidecar on decode pods (--front-door llm-d)."""
    jit_cache: str | None = None
    """Compile/JIT cache volume at /var/cache/vllm (hostpath:PATH, pvc:CLAIM, emptydir); default: the provider's."""
    ephemeral_storage: str | None = None
    """Ephemeral-storage request and limit per pod; default sized from the plan."""
    start_budget_s: int | None = None
    """Seconds a pod may take to start (startup probe, engine-ready timeout); default from model size and role."""
    namespace: str | None = None
    """metadata.namespace of every object; None leaves it to ``kubectl -n``."""
    placement: str = "pod-per-node"
    """pod-per-node or pod-per-rank."""
    gpu_resource: str = "nvidia.com/gpu"
    """Extended resource name of a GPU."""
    rdma_resource: str | None = None
    """Extended resource of the RDMA device plugin (one per pod); None: the topology's, else the provider's;
    '' for none."""
    exclusive_topology: str | None = None
    """Node label key for the LWS exclusive-topology annotation (one group per topology domain)."""
    inference_pool: bool = False
    """Also emit an InferencePool (GAIE v1) per role for the llm-d inference scheduler."""
    epp_port: int = 9002
    """Service port of each pool's endpoint picker (``<pool>-epp``)."""
    model_path: str | None = None
    """What vLLM loads in the pod; default the topology's model (hub id), or for widep's built-in
    tiny models their directory under the model cache volume."""
    model_cache: str | None = None
    """Model cache volume mounted at /var/cache/huggingface: hostpath:PATH, hostpath-ro:PATH, pvc:CLAIM,
    pvc-ro:CLAIM or emptydir; default: the provider's."""
    gpu_product_label: str | None = None
    """Node label holding the GPU product (node affinity); None: the provider's; '' for none."""
    gpu_products: tuple[str, ...] = ()
    """Accepted values of that label; default from the GPU kind (GPU_PRODUCTS)."""
    cpu: str | None = None
    """CPU request and limit per pod (a quantity); default sized from the plan (4 per GPU, 1 per CPU slot)."""
    memory: str | None = None
    """Memory request and limit per pod (a quantity); default sized from the plan (weights, overhead, /dev/shm)."""
    shm_size: str | None = None
    """sizeLimit of the memory-backed /dev/shm; default 1Gi per vLLM rank in the pod, at least 2Gi."""
    termination_grace_s: int = 120
    """terminationGracePeriodSeconds: time vLLM gets between SIGTERM and SIGKILL."""


@dataclass(frozen=True)
class PodProcess:
    """One process a pod's script starts, as bash words (already quoted or substituted)."""

    words: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    """Per-process variables (pod-local GPU ids / CPU slots)."""
    ports: tuple[int, ...]
    """HTTP ports it serves (rank ports)."""
    health_port: int | None
    local_rank: int
    label: str


@dataclass(frozen=True)
class PodSpecPlan:
    """What one pod template runs."""

    which: str
    """'all' (leader and workers share the template), 'leader' or 'worker'."""
    processes: tuple[PodProcess, ...]
    env: tuple[dict[str, Any], ...]
    """Container env entries (Kubernetes EnvVar dicts), in order."""
    ranks_per_pod: int
    devices: int
    """GPUs (or CPU slots) of the pod."""
    headless: bool


@dataclass(frozen=True)
class RoleLayout:
    """A role as LWS sees it."""

    rp: RolePlan
    name: str
    size: int
    ranks_per_pod: int
    templates: tuple[PodSpecPlan, ...]
    service_ports: tuple[tuple[str, int], ...]
    leader_only: bool
    """Only the leader pod serves HTTP (internal DP mode)."""


# ----------------------------------------------------------------------------------------------
# Option checks (errors for people)


def _quantity(flag: str, value: str | None) -> str | None:
    if value is None:
        return None
    value = str(value)
    if not QUANTITY.match(value):
        raise UserError(
            f"{flag}: not a Kubernetes quantity. Given: {value!r}. Valid: e.g. '32', '500m', '512Gi', '16G'"
        )
    return value


def _qualified_name(flag: str, value: str, what: str) -> None:
    prefix, _, name = value.rpartition("/")
    ok = bool(name) and len(name) <= QUALIFIED_NAME_MAX_LENGTH and QUALIFIED_NAME_PART.match(name) is not None
    if prefix:
        ok = ok and len(prefix) <= DNS1123_SUBDOMAIN_MAX_LENGTH and DNS1123_SUBDOMAIN.match(prefix) is not None
    if not ok:
        raise UserError(
            f"{flag}: not a valid {what}. Given: {value!r}. Valid: [prefix/]name, e.g. 'nvidia.com/gpu', 'rdma/ib', "
            "'kubernetes.io/hostname'"
        )


#: Longest --start-budget / --termination-grace: a week (as vllm.ready_timeout_s; probe thresholds stay int32).
MAX_WAIT_S = 604800


def front_door_router(plan: DeploymentPlan, opts: LWSOptions) -> bool:
    """True where the manifests get the vllm-router Deployment."""
    return frontdoor.resolve(plan, opts.front_door, opts.inference_pool) == "router"


def check_options(plan: DeploymentPlan, opts: LWSOptions) -> None:
    """UserError (flag, value given, what is valid) for options that cannot work with this plan."""
    if opts.placement not in PLACEMENTS:
        raise UserError(f"--placement: unknown placement. Given: {opts.placement!r}. Valid: {', '.join(PLACEMENTS)}")
    _qualified_name("--gpu-resource", opts.gpu_resource, "extended resource name")
    if "/" not in opts.gpu_resource:
        raise UserError(
            f"--gpu-resource: extended resources are domain-qualified. Given: {opts.gpu_resource!r}. Valid: e.g. "
            "nvidia.com/gpu, amd.com/gpu"
        )
    if opts.rdma_resource and opts.rdma_resource not in NO_RDMA_RESOURCE:
        _qualified_name("--rdma-resource", opts.rdma_resource, "extended resource name")
        if "/" not in opts.rdma_resource:
            raise UserError(
                f"--rdma-resource: extended resources are domain-qualified. Given: {opts.rdma_resource!r}. Valid: e.g. "
                "rdma/ib, rdma/roce_gdr, or '' for none"
            )
    if opts.gpu_product_label:
        _qualified_name("--gpu-product-label", opts.gpu_product_label, "node label key")
    for v in opts.gpu_products:
        if len(v) > LABEL_VALUE_MAX_LENGTH or not QUALIFIED_NAME_PART.match(v):
            raise UserError(
                f"--gpu-product: not a valid label value. Given: {v!r}. Valid: up to 63 of [A-Za-z0-9-_.], e.g. "
                "NVIDIA-H200"
            )
    for flag, v in (
        ("--cpu", opts.cpu),
        ("--memory", opts.memory),
        ("--shm-size", opts.shm_size),
        ("--ephemeral-storage", opts.ephemeral_storage),
    ):
        _quantity(flag, v)
    prov = providers.provider(opts.provider)
    _cache_volume(opts.jit_cache or prov.jit_cache, "--jit-cache")
    if opts.start_budget_s is not None and not 60 <= opts.start_budget_s <= MAX_WAIT_S:
        why = "too short for any vLLM start" if opts.start_budget_s < 60 else "longer than a week"
        raise UserError(f"--start-budget: {why}. Given: {opts.start_budget_s}. Valid: seconds 60..{MAX_WAIT_S}")
    frontdoor.resolve(plan, opts.front_door, opts.inference_pool)
    if not 1 <= opts.epp_port <= 65535:
        raise UserError(f"--epp-port: out of range. Given: {opts.epp_port}. Valid: 1..65535")
    if not 0 <= opts.termination_grace_s <= MAX_WAIT_S:
        why = "negative" if opts.termination_grace_s < 0 else "longer than a week"
        raise UserError(
            f"--termination-grace: {why}. Given: {opts.termination_grace_s}. Valid: seconds 0..{MAX_WAIT_S}"
        )
    if front_door_router(plan, opts):
        image = opts.router_image
        if "@" not in image and ":" not in image.rsplit("/", 1)[-1]:
            raise UserError(
                f"--router-image: no tag, so the cluster pulls whatever ':latest' is. Given: {image!r}. Valid: a "
                f"tagged image or digest, e.g. {image}:{frontdoor.ROUTER_VERSION} ({frontdoor.ROUTER_IMAGE_HOWTO})"
            )
    if opts.namespace is not None and (
        len(opts.namespace) > DNS1123_LABEL_MAX_LENGTH or not DNS1123_LABEL.match(opts.namespace)
    ):
        raise UserError(
            f"--namespace: not a DNS-1123 label. Given: {opts.namespace!r}. Valid: lower-case letters, digits and '-', "
            "at most 63"
        )
    _cache_volume(opts.model_cache or prov.model_cache)
    host = plan.spec.serving.host
    if host not in ("0.0.0.0", "::", "node"):
        raise UserError(
            f"serving.host: {host!r} is a fixed address, which a pod does not have. "
            "Valid for LeaderWorkerSet: 0.0.0.0, ::, or node (each pod's own IP)"
        )
    _check_rdma_choice(plan, opts)
    mode = plan.spec.serving.dp_mode
    for rp in plan.roles:
        name = lws_name(plan, rp)
        if opts.placement == "pod-per-rank" and rp.dp_local > 1:
            if mode != "external":
                raise UserError(
                    f"--placement pod-per-rank: one API server per pod needs serving.dp_mode external. "
                    f"Given: dp_mode {mode!r} for role {rp.name!r}. Valid: --placement pod-per-node, or dp_mode "
                    "external"
                )
            if rp.all2all_backend.startswith("deepep"):
                raise UserError(
                    f"--placement pod-per-rank: role {rp.name!r} uses {rp.all2all_backend}, whose intra-node traffic "
                    f"uses CUDA IPC, which cannot cross pod boundaries ({rp.dp_local} ranks share each node). "
                    "Given: --placement pod-per-rank. Valid: --placement pod-per-node (one pod per node), or a "
                    "non-DeepEP all2all backend"
                )
        if opts.exclusive_topology:
            _qualified_name("--exclusive-topology", opts.exclusive_topology, "node label key")
            pods = rp.nodes_per_group if opts.placement == "pod-per-node" else rp.dp_size
            gpus_per_pod = rp.dp_local * rp.tp_size if opts.placement == "pod-per-node" else rp.tp_size
            if (
                opts.exclusive_topology == "kubernetes.io/hostname"
                and pods > 1
                and pods * gpus_per_pod > plan.spec.cluster.gpus_per_node
            ):
                raise UserError(
                    f"--exclusive-topology: kubernetes.io/hostname puts a whole group on one node, but a group of role "
                    f"{rp.name!r} needs {pods} pods x {gpus_per_pod} GPUs > {plan.spec.cluster.gpus_per_node} per "
                    "node. "
                    "Given: --exclusive-topology kubernetes.io/hostname. Valid: a label spanning several nodes "
                    "(a rack or network block, e.g. cloud.google.com/gce-topology-block)"
                )
        size = lws_size(rp, opts.placement)
        # the Service adds "-api"; the controller derives StatefulSet and pod names from it
        limit = min(DNS1123_LABEL_MAX_LENGTH - len("-api"), lws_name_max_length(rp.spec.replicas, size))
        if len(name) > limit or not DNS1035_LABEL.match(name):
            raise UserError(
                f"LeaderWorkerSet name {name!r} (topology name + '-' + role) must be a DNS-1035 label (a letter first) "
                "of "
                f"at most {limit} characters here ({rp.spec.replicas} group(s) of {size} pods: the controller derives "
                f"StatefulSet, pod and label names from it). Given: name {plan.name!r}, role {rp.name!r}. "
                "Valid: a shorter topology name or role name, starting with a letter"
            )


def lws_size(rp: RolePlan, placement: str) -> int:
    """Pods per group: nodes per DP group (pod-per-node), DP size (pod-per-rank)."""
    if placement == "pod-per-rank" and rp.dp_local > 1:
        return rp.dp_size
    return rp.nodes_per_group


def _cache_volume(spec: str, flag: str = "--model-cache") -> dict[str, Any]:
    kind, _, arg = spec.partition(":")
    if kind == "hostpath" and arg.startswith("/"):
        return {"hostPath": {"path": arg, "type": "DirectoryOrCreate"}}
    if kind == "hostpath-ro" and arg.startswith("/") and flag == "--model-cache":
        return {"hostPath": {"path": arg, "type": "Directory"}}
    if (
        kind in ("pvc", "pvc-ro")
        and arg
        and DNS1123_SUBDOMAIN.match(arg)
        and len(arg) <= DNS1123_SUBDOMAIN_MAX_LENGTH
        and (kind == "pvc" or flag == "--model-cache")
    ):
        return {"persistentVolumeClaim": {"claimName": arg, **({"readOnly": True} if kind == "pvc-ro" else {})}}
    if kind == "emptydir" and not arg:
        return {"emptyDir": {}}
    ro = ", hostpath-ro:/ABSOLUTE/PATH, pvc-ro:CLAIM-NAME (read-only, pre-filled)" if flag == "--model-cache" else ""
    raise UserError(
        f"{flag}: cannot read this volume. Given: {spec!r}. "
        f"Valid: hostpath:/ABSOLUTE/PATH, pvc:CLAIM-NAME{ro}, or emptydir"
    )


# ----------------------------------------------------------------------------------------------
# Names, labels


def lws_name(plan: DeploymentPlan, rp: RolePlan) -> str:
    return f"{plan.name}-{rp.name}"


def _llmd_role(rp: RolePlan) -> str:
    return {"prefill": "prefill", "decode": "decode"}.get(rp.kind, "prefill-decode")


def _labels(plan: DeploymentPlan, rp: RolePlan) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/instance": plan.name,
        "app.kubernetes.io/component": rp.name,
        "app.kubernetes.io/managed-by": "widep",
        "llm-d.ai/inference-serving": "true",
        "llm-d.ai/role": _llmd_role(rp),
    }


def _selector(name: str, leader_only: bool) -> dict[str, str]:
    sel = {SET_NAME_LABEL: name}
    if leader_only:
        sel[WORKER_INDEX_LABEL] = "0"
    return sel


# ----------------------------------------------------------------------------------------------
# From ProcessCommands to pod scripts


def k8s_render_context(plan: DeploymentPlan, opts: LWSOptions) -> RenderContext:
    """The render context of pods: only the model path differs from ``widep render``'s."""
    return RenderContext(model_path=pod_model_path(plan, opts))


def pod_model_path(plan: DeploymentPlan, opts: LWSOptions) -> str:
    """What the pods' vLLM loads: --model-path, the topology's, or the tiny MoE in the pods' cache mount."""
    return plan_api.model_path(plan, opts.model_path, builtin_dir=f"{CACHE_MOUNT}/widep")


def _arith(d: int, offset: int) -> str:
    """``"$((W * d + offset))"`` without the redundant parts."""
    if d == 1 and not offset:
        return '"${W}"'
    expr = "W" if d == 1 else f"W * {d}"
    if offset:
        expr += f" + {offset}"
    return f'"$(({expr}))"'


def _bug(msg: str) -> UserError:
    return UserError(
        f"widep cannot express this role as a LeaderWorkerSet (a widep bug, please report): {msg}", exit_code=1
    )


def _process_words(
    plan: DeploymentPlan, rp: RolePlan, cmd: ProcessCommand, placement: str, d: int, group_node: int
) -> list[str]:
    """The process's argv as bash words, its per-pod slots filled with the pod's values (from the command's
    structured fields, never from its argv)."""
    per_pod: dict[Slot, str] = {LEADER_ADDRESS: '"${LWS_LEADER_ADDRESS}"'}
    lr = cmd.dp_rank - group_node * d
    if DP_RANK in cmd.template and placement == "pod-per-node" and lr != cmd.local_rank:
        raise _bug(f"rank {cmd.dp_rank} of {cmd.name} is not worker {group_node} x {d} + local rank {cmd.local_rank}")
    per_pod[DP_RANK] = _arith(d, lr)
    if START_RANK in cmd.template and cmd.dp_rank != group_node * d:
        raise _bug(f"start rank {cmd.dp_rank} of {cmd.name} is not worker {group_node} x {d}")
    per_pod[START_RANK] = _arith(d, 0)
    if cmd.bind == "node":
        per_pod[HOST] = '"${POD_IP}"'
    if placement == "pod-per-rank":
        per_pod[PORT] = str(rp.http_port)
    return [
        per_pod[w] if isinstance(w, Slot) and w in per_pod else sh_word(cmd.value(w) if isinstance(w, Slot) else w)
        for w in cmd.template
    ]


def _local_devices(rp: RolePlan, ranks: list[Rank], placement: str) -> list[int]:
    gpus = [g for r in ranks for g in r.gpus]
    offset = rp.spec.first_gpu if placement == "pod-per-node" else min(gpus)
    return [g - offset for g in gpus]


def secret_key_ref(ref: EnvRef) -> dict[str, Any]:
    """``valueFrom.secretKeyRef`` of a secret reference; UserError when the topology names no Secret."""
    if ref.secret is None:
        raise UserError(
            f"{ref.source or 'secret'}: a LeaderWorkerSet reads it from a Kubernetes Secret, and the topology names "
            f"only the environment variable {ref.name!r} (not a valid Secret name). Given: {ref.name!r}. "
            f"Valid: {{env: {ref.name}, secret: <secret-name>, key: {ref.key}}}"
        )
    return {"secretKeyRef": {"name": ref.secret, "key": ref.key}}


def _env_entry(name: str, value: Any, plan: DeploymentPlan) -> dict[str, Any]:
    if isinstance(value, EnvRef):
        return {"name": name, "valueFrom": secret_key_ref(value)}
    if value == NODE_ADDRESS:  # the pod's own address
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    return {"name": name, "value": k8s_escape(str(value))}


def _container_env(
    plan: DeploymentPlan, cmds: list[ProcessCommand], all_cmds: list[ProcessCommand]
) -> list[dict[str, Any]]:
    """Container env: what every process of the role shares (per-process variables excluded)."""
    first = cmds[0]
    out: list[dict[str, Any]] = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    names = set()
    for key, value in first.env_template:
        if key in PER_PROCESS_ENV:
            continue
        for other in all_cmds:
            ov = dict(other.env_template).get(key)
            if ov != value:
                raise _bug(
                    f"{key} is {value!r} for {first.name} but {ov!r} for {other.name}; a pod template cannot differ "
                    "per node"
                )
        out.append(_env_entry(key, value, plan))
        names.add(key)
    for other in all_cmds:
        extra = set(other.env_dict) - names - set(PER_PROCESS_ENV)
        if extra:
            raise _bug(f"{other.name} has variables {sorted(extra)} that {first.name} lacks")
    if "HF_HUB_CACHE" not in names:
        out.append({"name": "HF_HUB_CACHE", "value": CACHE_MOUNT})
    out.append({"name": "WIDEP_SHM_DIR", "value": SHM_MOUNT})
    return out


def role_layout(plan: DeploymentPlan, rp: RolePlan, opts: LWSOptions) -> RoleLayout:
    """Size, templates and served ports of one role's LeaderWorkerSet."""
    ctx = k8s_render_context(plan, opts)
    cmds = render_role(plan, rp, ctx)
    mode = plan.spec.serving.dp_mode
    placement = opts.placement
    group0 = [c for c in cmds if c.replica == 0]
    rank_of = {(r.replica, r.dp_rank): r for r in rp.ranks}
    node_of_group = {node: gn for gn, node in enumerate(rp.group_nodes[0])}

    if placement == "pod-per-rank" and rp.dp_local > 1:
        size, d = rp.dp_size, 1
        parts = [("all", 0, [c for c in group0 if c.dp_rank == 0])]
    else:
        placement = "pod-per-node"  # with one rank per node both placements are the same pods
        size, d = rp.nodes_per_group, rp.dp_local
        by_node: dict[int, list[ProcessCommand]] = {}
        for c in group0:
            by_node.setdefault(node_of_group[c.node], []).append(c)
        if mode == "internal" and size > 1:
            parts = [("leader", 0, by_node[0]), ("worker", 1, by_node[1])]
        else:
            parts = [("all", 0, by_node[0])]

    templates: list[PodSpecPlan] = []
    for which, gn, pcmds in parts:
        procs: list[PodProcess] = []
        for c in sorted(pcmds, key=lambda c: c.local_rank):
            ranks = [rank_of[(c.replica, r)] for r in c.dp_ranks]
            local = _local_devices(rp, ranks, placement)
            penv: list[tuple[str, str]] = []
            for key, _ in c.env:
                if key == "CUDA_VISIBLE_DEVICES":
                    penv.append((key, ",".join(map(str, local))))
                elif key == "VLLM_CPU_OMP_THREADS_BIND":  # one entry per worker, as widep render gives it
                    penv.append((key, "|".join(map(str, local))))
            words = _process_words(plan, rp, c, placement, d, gn)
            if c.headless or c.port is None:
                ports: tuple[int, ...] = ()
            elif mode in ("multiport",):
                ports = tuple(rank_of[(c.replica, r)].port for r in c.dp_ranks)
            elif placement == "pod-per-rank":
                ports = (rp.http_port,)
            else:
                ports = (c.port,)
            health = (
                c.health_port if placement == "pod-per-node" else (rp.http_port if c.health_port is not None else None)
            )
            procs.append(PodProcess(tuple(words), tuple(penv), ports, health, c.local_rank, c.name))
        env = _container_env(plan, pcmds, cmds)
        devices = sum(len(rank_of[(c.replica, r)].gpus) for c in pcmds for r in c.dp_ranks)
        templates.append(
            PodSpecPlan(
                which,
                tuple(procs),
                tuple(env),
                d if placement == "pod-per-node" else 1,
                devices,
                headless=all(not p.ports for p in procs),
            )
        )
    ports = sorted({p for t in templates for proc in t.processes for p in proc.ports})
    named = tuple(("http" if len(ports) == 1 else f"rank-{p - rp.http_port}", p) for p in ports)
    leader_only = mode == "internal" and size > 1
    return RoleLayout(
        rp, lws_name(plan, rp), size, d if placement == "pod-per-node" else 1, tuple(templates), named, leader_only
    )


def pod_script(plan: DeploymentPlan, layout: RoleLayout, tpl: PodSpecPlan) -> str:
    """The bash program of a pod (the container's ``args[0]`` after ``bash -c``)."""
    rp = layout.rp
    d = layout.ranks_per_pod
    what = {"all": "every pod", "leader": "the leader pod", "worker": "worker pods"}[tpl.which]
    if layout.size == 1 and d == 1:
        ranks_desc = "its DP rank"
    elif d == 1:
        ranks_desc = "DP rank W"
    else:
        ranks_desc = f"DP ranks W*{d} .. W*{d}+{d - 1}"
    lines = [
        sh_comment(
            f"widep: {what} of role {rp.name!r} ({plan.name}), {layout.size} pod(s) per group, DP {rp.dp_size}, "
            f"TP {rp.tp_size}, EP {rp.ep_size}; runs {ranks_desc} (W = {LWS_WORKER_INDEX})."
        ),
        "set -euo pipefail",
        f': "${{{LWS_WORKER_INDEX}:?is not set: this pod must be created by a LeaderWorkerSet}}"',
        f': "${{{LWS_LEADER_ADDRESS}:?is not set: this pod must be created by a LeaderWorkerSet}}"',
        f'if [ "${{{LWS_GROUP_SIZE}:-}}" != "{layout.size}" ]; then',
        f'  echo "widep: this group has ${{{LWS_GROUP_SIZE}:-?}} pods but the ranks below are computed for '
        f"{layout.size}; "
        f'regenerate with widep lws instead of editing size" >&2',
        "  exit 1",
        "fi",
        f'W="${{{LWS_WORKER_INDEX}}}"',
        "# Shared memory left by an earlier crash of this pod fills /dev/shm (llm-d issue #352).",
        'find "${WIDEP_SHM_DIR}" -mindepth 1 -delete 2>/dev/null || true',
    ]
    if len(tpl.processes) == 1:
        p = tpl.processes[0]
        lines.append(sh_comment(p.label + (" (headless)" if not p.ports else f", port {', '.join(map(str, p.ports))}")))
        lines.append(_command_text(p, exec_=True))
        return "\n".join(lines) + "\n"
    lines += [
        "pids=()",
        'stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; }',
        "trap stop TERM INT",
    ]
    for p in tpl.processes:
        ports = "" if not p.ports else f", port {', '.join(map(str, p.ports))}"
        lines.append(sh_comment(f"local rank {p.local_rank}: {p.label}{ports}"))
        lines.append(_command_text(p, exec_=False) + " &")
        lines.append("pids+=($!)")
    lines += [
        "# The first process to exit fails the pod (and LWS recreates the group): a DP group cannot lose a rank.",
        "status=0",
        "wait -n || status=$?",
        'echo "widep: a vLLM process of this pod exited with status ${status}; stopping the others" >&2',
        "stop",
        "wait || true",
        'if [ "${status}" -eq 0 ]; then status=1; fi',
        'exit "${status}"',
    ]
    return "\n".join(lines) + "\n"


def _command_text(p: PodProcess, exec_: bool) -> str:
    head = ["exec"] if exec_ else []
    if p.env:
        head += ["env"] + [sh_assign(k, v) for k, v in p.env]
    words = list(p.words)
    # "vllm serve MODEL" / "python -m module --model MODEL" on the first line, then one flag per line
    first_flag = next((i for i, w in enumerate(words) if w.startswith("--") and i > 0), len(words))
    if words[first_flag - 2 : first_flag - 1] == ["--model"]:
        first_flag -= 2
    out = [" ".join(head + words[:first_flag])]
    i = first_flag
    while i < len(words):
        w = words[i]
        if w.startswith("--") and i + 1 < len(words) and not words[i + 1].startswith("--"):
            out.append(f"{w} {words[i + 1]}")
            i += 2
        else:
            out.append(w)
            i += 1
    return " \\\n    ".join(out)


#: How every bash of a pod starts (the container's command, exec probes): privileged mode (``-p``) reads no
#: $BASH_ENV / $ENV file, imports no functions and ignores SHELLOPTS / BASHOPTS / CDPATH / GLOBIGNORE from the
#: environment, so no variable of the pod's env makes bash run code before the script (issue 32 class 4, defence
#: in depth behind the topology's refusal of those names); ``--noprofile --norc`` say the same for login and
#: interactive startup files.
POD_BASH = ("/bin/bash", "--noprofile", "--norc", "-p", "-c")


def health_check_script(host: str, ports: tuple[int, ...] | list[int]) -> str:
    """Bash that exits 0 only if ``GET /health`` answers 200 on every port (no curl needed)."""
    port_list = " ".join(str(p) for p in ports)
    return (
        f"for port in {port_list}; do\n"
        f'  exec 3<>"/dev/tcp/{host}/${{port}}" || exit 1\n'
        "  printf 'GET /health HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3\n"
        "  read -r -t 4 proto code rest <&3 || exit 1\n"
        "  exec 3>&-\n"
        '  [ "${code}" = 200 ] || exit 1\n'
        "done\n"
    )


# ----------------------------------------------------------------------------------------------
# Kubernetes objects


def _probe_set(plan: DeploymentPlan, tpl: PodSpecPlan, port_names: dict[int, str], budget_s: int) -> dict[str, Any]:
    """startup / readiness / liveness probes on /health of every rank port of the pod; the startup probe
    allows ``budget_s`` seconds."""
    health = sorted({proc.health_port for proc in tpl.processes if proc.health_port is not None})
    if not health:
        return {}
    timeout = 5
    if len(health) == 1:
        hp = health[0]
        action: dict[str, Any] = {"httpGet": {"path": "/health", "port": port_names.get(hp, hp)}}
    else:
        host = "${POD_IP}" if plan.spec.serving.host == "node" else "127.0.0.1"
        # a Kubernetes probe tests one port: every rank's /health needs an exec probe (no curl in vLLM's images)
        action = {"exec": {"command": [*POD_BASH, k8s_escape(health_check_script(host, health))]}}
    period = 10
    startup = {
        **action,
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": max(1, math.ceil(budget_s / period)),
    }
    readiness = {**action, "periodSeconds": period, "timeoutSeconds": timeout, "failureThreshold": 3}
    liveness = {**action, "periodSeconds": 30, "timeoutSeconds": timeout + 5, "failureThreshold": 3}
    return {"startupProbe": startup, "readinessProbe": readiness, "livenessProbe": liveness}


def role_uses_rdma(plan: DeploymentPlan, rp: RolePlan) -> bool:
    """Pods of this role talk RDMA: DeepEP/NCCL across the nodes of a group, or NIXL moving KV (P/D)."""
    return (
        plan.device == "cuda" and plan.spec.cluster.network.rdma and (rp.nodes_per_group > 1 or plan.spec.disaggregated)
    )


#: vLLM's own images: the CUDA one on Docker Hub, the x86-64 CPU build on public ECR (vLLM's docs, "Pre-built images").
CUDA_IMAGE_REPOS = ("vllm/vllm-openai", "docker.io/vllm/vllm-openai")
CPU_IMAGE_REPO = "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo"


def _image_repo(image: str) -> str:
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition("/")
    return (head + "/" if head else "") + tail.split(":", 1)[0]


def pod_image(plan: DeploymentPlan, image: str | None = None) -> str:
    """The vLLM image of the pods: --image, else the topology's vllm.image, else vLLM's image for the plan's device
    (a CPU topology gets vLLM's CPU build at the tag of the CUDA default). A CUDA image for a CPU topology (or the
    CPU build for GPUs) is refused: the pod would start and fail in vLLM's platform detection."""
    spec = plan.spec.vllm
    if image:
        chosen, field = image, "--image"
    elif "image" in spec.model_fields_set:
        chosen, field = spec.image, "vllm.image"
    else:
        tag = spec.image.rpartition(":")[2]
        return f"{CPU_IMAGE_REPO}:{tag}" if plan.device == "cpu" else spec.image
    repo = _image_repo(chosen)
    if plan.device == "cpu" and repo in CUDA_IMAGE_REPOS:
        raise UserError(
            f"{field}: {chosen!r} is vLLM's CUDA image, but cluster.gpu is CPU (vLLM's CPU backend). Given: "
            f"{chosen!r}. Valid: a vLLM CPU build, e.g. {CPU_IMAGE_REPO}:{spec.image.rpartition(':')[2]}, or your own"
        )
    if plan.device == "cuda" and repo == CPU_IMAGE_REPO:
        raise UserError(
            f"{field}: {chosen!r} is vLLM's CPU build, but cluster.gpu is {plan.gpu.name}. Given: {chosen!r}. Valid: "
            f"a CUDA build of vLLM, e.g. {type(spec).model_fields['image'].default}"
        )
    return chosen


#: ``--rdma-resource`` / ``cluster.network.rdma_resource`` values that say "request none" explicitly.
NO_RDMA_RESOURCE = ("", "none")


def rdma_resource(plan: DeploymentPlan, opts: LWSOptions) -> str | None:
    """The RDMA extended resource a pod requests: --rdma-resource; else a provider profile's own RDMA wiring
    (coreweave's rdma/ib, gke's networks: the profile names the cluster more precisely than the topology); else
    the topology's cluster.network.rdma_resource. '' and 'none' request none."""
    if opts.rdma_resource is not None:
        return None if opts.rdma_resource in NO_RDMA_RESOURCE else opts.rdma_resource
    prov = providers.provider(opts.provider)
    if prov.rdma_resource or prov.rdma_annotations:
        return prov.rdma_resource
    chosen = plan.spec.cluster.network.rdma_resource
    return None if chosen is None or chosen in NO_RDMA_RESOURCE else chosen


def deepep_across_pods(plan: DeploymentPlan, rp: RolePlan) -> bool:
    """DeepEP's internode kernels run between the pods of a group (NVSHMEM over RDMA: no RDMA, no dispatch)."""
    return role_uses_rdma(plan, rp) and rp.nodes_per_group > 1 and rp.all2all_backend.startswith("deepep")


def _check_rdma_choice(plan: DeploymentPlan, opts: LWSOptions) -> None:
    """Defect 6 of issue 28: under a profile without RDMA wiring (generic) a group whose DeepEP spans pods must say
    how its pods get RDMA; silently requesting nothing would give pods that start and then hang or crash in
    NVSHMEM's init."""
    prov = providers.provider(opts.provider)
    chosen = plan.spec.cluster.network.rdma_resource
    if chosen is not None and chosen not in NO_RDMA_RESOURCE:
        _qualified_name("cluster.network.rdma_resource", chosen, "extended resource name")
        if "/" not in chosen:
            raise UserError(
                f"cluster.network.rdma_resource: extended resources are domain-qualified. Given: {chosen!r}. "
                "Valid: e.g. rdma/ib, rdma/roce_gdr, or 'none'"
            )
    if opts.rdma_resource is not None or chosen is not None or prov.rdma_resource or prov.rdma_annotations:
        return
    for rp in plan.roles:
        if deepep_across_pods(plan, rp):
            raise UserError(
                f"cluster.network.rdma_resource: role {rp.name!r} runs {rp.all2all_backend} across the "
                f"{rp.nodes_per_group} pods of a group (NVSHMEM over RDMA between nodes), but provider "
                f"{prov.name!r} requests no RDMA device and the topology does not say how pods get one. Given: "
                "cluster.network.rdma_resource unset, no --rdma-resource. Valid: your cluster's RDMA device plugin "
                "resource (cluster.network.rdma_resource or --rdma-resource, e.g. rdma/ib, rdma/roce_gdr); 'none' "
                "where pods reach the HCAs without one (e.g. a network operator that injects them); --provider "
                "coreweave or gke; or cluster.network.rdma: false with a non-DeepEP all2all backend"
            )


def gpu_rdma_privileged(plan: DeploymentPlan, rp: RolePlan, opts: LWSOptions) -> bool:
    """A privileged container, where the provider needs one for DeepEP's GPU-initiated RDMA (IBGDA)."""
    net = plan.spec.cluster.network
    return (
        providers.provider(opts.provider).gpu_rdma_privileged
        and role_uses_rdma(plan, rp)
        and rp.all2all_backend.startswith("deepep")
        and net.ibgda
    )


def _node_affinity(plan: DeploymentPlan, opts: LWSOptions) -> dict[str, Any] | None:
    prov = providers.provider(opts.provider)
    label = prov.gpu_label if opts.gpu_product_label is None else opts.gpu_product_label
    products = opts.gpu_products or prov.gpu_values.get(plan.gpu.name, ())
    if not (label and products):
        return None
    term = {"matchExpressions": [{"key": label, "operator": "In", "values": list(products)}]}
    if prov.gpu_affinity == "required":
        return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}
    return {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": term}]}}


def _security_context(cuda: bool, rdma: bool, privileged: bool) -> dict[str, Any]:
    """Drop every capability, add back IPC_LOCK (pinned memory for RDMA/NCCL) and SYS_RAWIO where RDMA needs
    it; no privilege escalation, unless the provider needs a privileged container."""
    if privileged:
        return {"privileged": True}
    add = (["IPC_LOCK"] + (["SYS_RAWIO"] if rdma else [])) if cuda else []
    caps: dict[str, Any] = {"drop": ["ALL"]}
    if add:
        caps["add"] = add
    return {"allowPrivilegeEscalation": False, "capabilities": caps}


def _extra_env(
    plan: DeploymentPlan, rp: RolePlan, tpl: PodSpecPlan, opts: LWSOptions, budget_s: int, front: str
) -> list[dict[str, Any]]:
    """The container env: the rendered one (engine-ready timeout = the start budget), then the caches, the
    provider's RDMA variables, offline mode for a read-only model cache and the keep-alive behind a proxy."""
    env = [dict(e) for e in tpl.env]
    have = {e["name"] for e in env}
    for e in env:
        if e["name"] in K8S_REPLACED_ENV:
            e["value"] = str(budget_s)
    add: list[tuple[str, str]] = list(JIT_ENV)
    if role_uses_rdma(plan, rp):
        add += list(providers.provider(opts.provider).rdma_env)
    if (opts.model_cache or "").partition(":")[0].endswith("-ro"):
        add.append(("HF_HUB_OFFLINE", "1"))
    if front in ("router", "llm-d"):
        from widep.render.vllm import keep_alive_env

        add += [(k, str(v)) for k, v in keep_alive_env()]
    for k, v in add:
        if k not in have:
            env.append({"name": k, "value": v})
            have.add(k)
    return env


def _pod_template(
    plan: DeploymentPlan,
    layout: RoleLayout,
    tpl: PodSpecPlan,
    opts: LWSOptions,
    image: str,
    front: str = "none",
    sidecar: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rp = layout.rp
    cuda = plan.device == "cuda"
    prov = providers.provider(opts.provider)
    port_names = {p: n for n, p in layout.service_ports}
    if plan.spec.serving.dp_mode == "multiport":
        port_names[plan.spec.serving.supervisor_port] = "supervisor"
    container_ports = []
    for proc in tpl.processes:
        for p in proc.ports:
            container_ports.append({"name": port_names[p], "containerPort": p, "protocol": "TCP"})
        if proc.health_port is not None and proc.health_port not in proc.ports:
            container_ports.append(
                {
                    "name": port_names.get(proc.health_port, "health"),
                    "containerPort": proc.health_port,
                    "protocol": "TCP",
                }
            )
    model_cache = opts.model_cache or prov.model_cache
    jit_cache = opts.jit_cache or prov.jit_cache
    shm = opts.shm_size or f"{max(2, tpl.ranks_per_pod)}Gi"
    shm_gib = sizing.parse_gib(shm)
    size = sizing.size_pod(
        plan,
        rp,
        tpl.ranks_per_pod,
        tpl.devices,
        model_on_emptydir=model_cache == "emptydir",
        jit_on_emptydir=jit_cache == "emptydir",
        shm_gib=shm_gib,
        cpu=opts.cpu,
        memory=opts.memory,
        ephemeral_storage=opts.ephemeral_storage,
    )
    requests: dict[str, str] = {"cpu": size.cpu, "memory": size.memory, "ephemeral-storage": size.ephemeral_storage}
    limits: dict[str, str] = dict(requests)
    uses_rdma = role_uses_rdma(plan, rp)
    rdma_res = rdma_resource(plan, opts) if uses_rdma else None
    if cuda:
        limits[opts.gpu_resource] = requests[opts.gpu_resource] = str(tpl.devices)
        if rdma_res:
            limits[rdma_res] = requests[rdma_res] = "1"
        if uses_rdma:
            for name in prov.rdma_zero_resources:
                limits[name] = requests[name] = "0"
    budget = sizing.start_budget_s(plan, rp, opts.start_budget_s)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": list(POD_BASH),
        "args": [k8s_escape(pod_script(plan, layout, tpl))],
        "env": _extra_env(plan, rp, tpl, opts, budget, front),
    }
    if container_ports:
        container["ports"] = container_ports
    container["resources"] = {"limits": limits, "requests": requests}
    container["securityContext"] = _security_context(
        cuda, bool(uses_rdma and (rdma_res or prov.rdma_annotations)), gpu_rdma_privileged(plan, rp, opts)
    )
    ro = model_cache.partition(":")[0].endswith("-ro")
    container["volumeMounts"] = [
        {"name": "dshm", "mountPath": SHM_MOUNT},
        {"name": "model-cache", "mountPath": CACHE_MOUNT, **({"readOnly": True} if ro else {})},
        {"name": "jit-cache", "mountPath": JIT_MOUNT},
    ]
    container.update(_probe_set(plan, tpl, port_names, budget))
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": opts.termination_grace_s,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
    }
    if cuda:
        affinity = _node_affinity(plan, opts)
        if affinity:
            spec["affinity"] = affinity
        spec["tolerations"] = [{"key": opts.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    if sidecar is not None:
        spec["initContainers"] = [sidecar]
    spec["containers"] = [container]
    spec["volumes"] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        {"name": "model-cache", **_cache_volume(model_cache)},
        {"name": "jit-cache", **_cache_volume(jit_cache, "--jit-cache")},
    ]
    meta: dict[str, Any] = {"labels": _labels(plan, rp)}
    if uses_rdma and prov.rdma_annotations:
        meta["annotations"] = dict(prov.rdma_annotations)
    return {"metadata": meta, "spec": spec}


def _metadata(
    name: str, labels: dict[str, str], namespace: str | None, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def render_lws(
    plan: DeploymentPlan,
    image: str | None = None,
    namespace: str | None = None,
    placement: str = "pod-per-node",
    **options: Any,
) -> list[dict[str, Any]]:
    """The manifests of a plan: per role a LeaderWorkerSet and a Service, then the front door
    (:mod:`widep.k8s.frontdoor`): the vllm-router Deployment + Service, or llm-d's InferencePool spanning
    both P/D roles (with the routing sidecar on decode pods), or one InferencePool per role. Other keyword
    arguments: :class:`LWSOptions`."""
    opts = LWSOptions(image=image, namespace=namespace, placement=placement, **options)
    check_options(plan, opts)
    image = pod_image(plan, opts.image)
    front = frontdoor.resolve(plan, opts.front_door, opts.inference_pool)
    layouts = [role_layout(plan, rp, opts) for rp in plan.roles]
    sidecar_for: dict[str, dict[str, Any]] = {}
    pool_ports: list[int] = []
    if front == "llm-d":
        served = {lay.rp.name: [port for _, port in lay.service_ports] for lay in layouts}
        pool_ports, vllm_ports = frontdoor.pool_ports(plan, served)
        decode = next(rp for rp in plan.roles if rp.kind == "decode")
        sidecar_for[decode.name] = frontdoor.routing_sidecar(pool_ports, vllm_ports, opts.routing_sidecar_image)
    docs: list[dict[str, Any]] = []
    for layout in layouts:
        rp = layout.rp
        labels = _labels(plan, rp)
        annotations = {EXCLUSIVE_TOPOLOGY: opts.exclusive_topology} if opts.exclusive_topology else None
        lwt: dict[str, Any] = {"size": layout.size, "restartPolicy": "RecreateGroupOnPodRestart"}
        by_which = {t.which: t for t in layout.templates}
        side = sidecar_for.get(rp.name)
        if "leader" in by_which:
            lwt["leaderTemplate"] = _pod_template(plan, layout, by_which["leader"], opts, image, front, side)
            lwt["workerTemplate"] = _pod_template(plan, layout, by_which["worker"], opts, image, front)
        else:
            lwt["workerTemplate"] = _pod_template(plan, layout, by_which["all"], opts, image, front, side)
        docs.append(
            {
                "apiVersion": LWS_API_VERSION,
                "kind": "LeaderWorkerSet",
                "metadata": _metadata(layout.name, labels, opts.namespace, annotations),
                "spec": {
                    "replicas": rp.spec.replicas,
                    "startupPolicy": "LeaderCreated",
                    # the default (maxUnavailable 1, maxSurge 0) makes an update of a 1-replica role a full outage
                    "rolloutStrategy": {
                        "type": "RollingUpdate",
                        "rollingUpdateConfiguration": {"maxUnavailable": 0, "maxSurge": 1},
                    },
                    "leaderWorkerTemplate": lwt,
                },
            }
        )
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _metadata(f"{layout.name}-api", labels, opts.namespace),
                "spec": {
                    "type": "ClusterIP",
                    "selector": _selector(layout.name, layout.leader_only),
                    "ports": [
                        {"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in layout.service_ports
                    ],
                },
            }
        )
        if opts.inference_pool and front != "llm-d":
            if len(layout.service_ports) > INFERENCE_POOL_MAX_PORTS:
                raise UserError(
                    f"--inference-pool: role {rp.name!r} serves {len(layout.service_ports)} ports per pod but an "
                    f"InferencePool takes at most {INFERENCE_POOL_MAX_PORTS} targetPorts. Given: --inference-pool. "
                    "Valid: fewer ranks per pod (--placement pod-per-rank, or dp_mode hybrid/multiport), or no pool"
                )
            docs.append(
                {
                    "apiVersion": INFERENCE_POOL_API_VERSION,
                    "kind": "InferencePool",
                    "metadata": _metadata(layout.name, labels, opts.namespace),
                    "spec": {
                        "selector": {"matchLabels": _selector(layout.name, layout.leader_only)},
                        "targetPorts": [{"number": p} for _, p in layout.service_ports],
                        "endpointPickerRef": {
                            "name": f"{layout.name}-epp",
                            "port": {"number": opts.epp_port},
                            "failureMode": "FailOpen",
                        },
                    },
                }
            )
    base = {k: v for k, v in _labels(plan, plan.roles[0]).items() if k.startswith("app.kubernetes.io/")}
    # llm-d: the router chart creates the one InferencePool (router_values_for); widep emits none (one owner)
    if front == "router":
        from widep.k8s.router import router_manifests

        budget = max(sizing.start_budget_s(plan, rp, opts.start_budget_s) for rp in plan.roles)
        docs += router_manifests(
            plan,
            {rp.name: lws_name(plan, rp) for rp in plan.roles},
            opts.placement,
            opts.namespace,
            opts.router_image,
            base,
            startup_timeout_s=budget,
        )
    return docs


def llmd_release(docs: list[dict[str, Any]]) -> str | None:
    """The router chart release of llm-d's front door in ``docs`` (the topology name on the pods that carry the
    routing sidecar), None when the front door is another."""
    for d in docs:
        if d.get("kind") != "LeaderWorkerSet":
            continue
        lwt = d["spec"]["leaderWorkerTemplate"]
        for tpl in (lwt.get("leaderTemplate"), lwt["workerTemplate"]):
            if tpl and any(c.get("name") == frontdoor.SIDECAR_NAME for c in tpl["spec"].get("initContainers") or []):
                return tpl["metadata"]["labels"]["app.kubernetes.io/instance"]
    return None


def router_values_for(plan: DeploymentPlan, docs: list[dict[str, Any]], **options: Any) -> dict[str, Any] | None:
    """llm-d's router chart values for the pods in ``docs`` (None when the front door is not llm-d's): the pool
    the chart creates selects both roles' pods on the ports prefill and the routing sidecar serve. ``options``:
    the :class:`LWSOptions` ``docs`` were rendered with."""
    if llmd_release(docs) is None:
        return None
    opts = LWSOptions(**options)
    layouts = [role_layout(plan, rp, opts) for rp in plan.roles]
    served = {lay.rp.name: [port for _, port in lay.service_ports] for lay in layouts}
    ports, _ = frontdoor.pool_ports(plan, served)
    selector = frontdoor.pool_selector(plan, any(lay.leader_only for lay in layouts))
    return frontdoor.router_values(plan, selector, ports, opts.epp_port)


# ----------------------------------------------------------------------------------------------
# YAML


class _Dumper(yaml.SafeDumper):
    """SafeDumper writing multi-line strings as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)
_Dumper.ignore_aliases = lambda self, data: True  # no &id001 anchors


def dump_manifests(docs: list[dict[str, Any]], header: list[str] | None = None) -> str:
    """Multi-document YAML in the dicts' own key order; ``header`` lines become leading comments."""
    head = "".join(sh_comment(line) + "\n" for line in header or [])
    body = "---\n".join(
        yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120) for d in docs
    )
    return head + body


def header_lines(
    plan: DeploymentPlan,
    command: str,
    regenerate: str | None = None,
    *,
    image: str | None = None,
    model_path: str | None = None,
    docs: list[dict[str, Any]] | None = None,
    opts: LWSOptions | None = None,
) -> list[str]:
    """What a generated file says about itself: its source, how to regenerate it, the plan."""
    lines = [f"Generated by `{command}` - do not edit."]
    if regenerate:
        lines.append(f"Regenerate every file in lws/ with: {regenerate}")
    if plan.spec.description:
        lines.append(f"{plan.name}: {plan.spec.description}")
    for rp in plan.roles:
        lines.append(
            f"role {rp.name} ({rp.kind}): {rp.spec.replicas} group(s) of {rp.nodes_per_group} node(s) x "
            f"{rp.dp_local * rp.tp_size} {plan.gpu.name}, DP {rp.dp_size} / TP {rp.tp_size} / EP {rp.ep_size}, "
            f"{rp.all2all_backend}, dp_mode {plan.spec.serving.dp_mode}"
        )
    for w in plan.warnings + tuple(w for rp in plan.roles for w in rp.warnings):
        lines.append(f"plan warning: {w}")
    if opts is not None and docs is not None:
        prov = providers.provider(opts.provider)
        lines.append(f"provider {prov.name}: {prov.description}")
        lines += sizing.report(docs)
        if any(deepep_across_pods(plan, rp) for rp in plan.roles) and not (
            rdma_resource(plan, opts) or prov.rdma_annotations
        ):  # only after an explicit 'none' (_check_rdma_choice); read back by --validate
            lines.append("rdma: none (the cluster gives pods the HCAs without a device plugin resource)")
        for rp in plan.roles:
            if role_uses_rdma(plan, rp) and not rdma_resource(plan, opts) and not prov.rdma_annotations:
                lines.append(
                    f"note: role {rp.name} talks RDMA (DeepEP/NIXL across pods) but no RDMA device is "
                    "requested: name your cluster's (cluster.network.rdma_resource or --rdma-resource) "
                    "or pick --provider"
                )
        kinds = {d["kind"] for d in docs}
        if "Deployment" in kinds:
            lines.append("front door: vllm-router Deployment (P/D mode where the topology is P/D)")
            lines.append(f"note: {frontdoor.ROUTER_IMAGE_HOWTO}")
        llmd = llmd_release(docs) is not None
        if {rp.kind for rp in plan.roles} >= {"prefill", "decode"} and not (
            kinds & {"Deployment", "InferencePool"} or llmd
        ):
            lines.append(
                "warning: no front door (--front-door none): clients of the decode Service get local "
                "prefill and the prefill group idles"
            )
        release = llmd_release(docs)
        if release is not None:
            lines.append(
                "front door: llm-d (routing sidecar on decode pods); llm-d's router chart "
                f"({frontdoor.ROUTER_CHART} {frontdoor.ROUTER_CHART_VERSION}), release {release}, with the values "
                f"file widep writes (--router-values) creates the one InferencePool/{release} over both roles and "
                f"its endpoint picker Service {frontdoor.epp_name(release)}: this file has no InferencePool"
            )
    if docs is not None:
        lines += prerequisite_lines(docs)
    if plan.device == "cpu":
        lines.append(f"note: vLLM's CPU backend: the image must be a vLLM CPU build (given {pod_image(plan, image)}).")
    builtin = pod_model_path(plan, LWSOptions(model_path=model_path)) if plan.arch.builtin and not model_path else None
    if builtin:
        lines.append(
            f"note: the model is widep's tiny {plan.arch.builtin} MoE at {builtin} in the model cache volume: build it "
            f"there with `widep model build --arch {plan.arch.builtin} --cache-dir <cache>/widep`, or give "
            "--model-path."
        )
    return lines


def _referenced(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(kind, name) of the Secrets, ConfigMaps and PVCs the pods of ``docs`` reference, in order."""
    from widep.k8s.validate.cross import collect_pods

    out: list[tuple[str, str]] = []
    pods, _ = collect_pods(docs)
    for pod in pods:
        spec = pod.template.get("spec") or {}
        for c in list(spec.get("initContainers") or []) + list(spec.get("containers") or []):
            for e in c.get("env") or []:
                src = e.get("valueFrom") or {}
                for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    if key in src and not src[key].get("optional"):
                        out.append((kind, src[key]["name"]))
        for v in spec.get("volumes") or []:
            if "persistentVolumeClaim" in v:
                out.append(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]))
    return list(dict.fromkeys(out))


def prerequisite_lines(docs: list[dict[str, Any]]) -> list[str]:
    """What must exist before ``kubectl apply`` of ``docs``, in the order to install it, and what a pod failure
    costs. ``prerequisite: Kind/name`` lines are read back by ``widep lws --validate`` (cross-object references
    to them are not errors)."""
    kinds = {d["kind"] for d in docs}
    lines = ["Prerequisites, in the order to apply (kubectl apply of this file fails or pods stay Pending without):"]
    step = 0

    def add(text: str) -> None:
        nonlocal step
        step += 1
        lines.append(f"  {step}. {text}")

    if "LeaderWorkerSet" in kinds:
        add("the LeaderWorkerSet CRD and controller (LWS v0.10.0: kubectl apply --server-side -f its manifests.yaml)")
    release = llmd_release(docs)
    if "InferencePool" in kinds or release is not None:
        add("the Gateway API Inference Extension CRDs (GAIE v1.5.0 v1-manifests.yaml: InferencePool)")
    if release is not None:  # the chart makes the pool and the endpoint picker; helm waits for nothing of ours
        add(
            f"llm-d's router chart: helm install {release} {frontdoor.ROUTER_CHART} --version "
            f"{frontdoor.ROUTER_CHART_VERSION} -f <the router values file> (creates InferencePool/{release} and "
            f"Service/{frontdoor.epp_name(release)})"
        )
    referenced = _referenced(docs)
    if referenced:
        add("the Secrets and PersistentVolumeClaims the pods reference, in the target namespace:")
    for kind, name in referenced:
        lines.append(f"prerequisite: {kind}/{name} (create it in the target namespace first)")
    for d in docs:
        if d["kind"] != "InferencePool":
            continue
        epp = d["spec"]["endpointPickerRef"]["name"]
        add(f"an endpoint picker Service {epp} (port {d['spec']['endpointPickerRef']['port']['number']})")
        lines.append(f"prerequisite: Service/{epp} (the endpoint picker the InferencePool calls)")
    if "Deployment" in kinds:
        add(f"the router image pushed where the cluster pulls it ({frontdoor.ROUTER_IMAGE} is not public; see above)")
    add("then: kubectl apply -f THIS_FILE (ordering inside the file does not matter)")
    if "LeaderWorkerSet" in kinds:
        lines += pod_failure_lines(docs)
        lines.append(
            "Rollout: maxSurge 1, maxUnavailable 0: an update starts a new group before an old one "
            "stops (one spare group of capacity, else the update waits and the old groups keep serving)."
        )
    if "Deployment" in kinds:
        lines.append("router pod failure: the Deployment restarts it alone; it waits for the workers again.")
    return lines


def unverifiable_lines(docs: list[dict[str, Any]]) -> list[str]:
    """What no check of the manifests alone can prove (it needs the API server, the kubelet or the nodes), each with
    the command that proves it on the user's cluster."""
    kinds = {d["kind"] for d in docs}
    refs = _referenced(docs)
    text = dump_manifests(docs)
    out = [
        "the CRDs and controllers are installed at the versions named above: kubectl get crd "
        "leaderworkersets.leaderworkerset.x-k8s.io; kubectl -n lws-system get deploy"
    ]
    if refs:
        names = " ".join(f"{k.lower()}/{n}" for k, n in refs)
        out.append(
            f"the prerequisites exist in the namespace (and claims bind: ReadWriteMany where a group spans nodes): "
            f"kubectl get {names}"
        )
    out.append(
        "the images pull on the nodes (private registries, the router image is not public): kubectl get events "
        "--field-selector reason=Failed (ErrImagePull / ImagePullBackOff)"
    )
    out.append(
        "the pods schedule (GPU, RDMA and memory requests fit a node; affinity labels exist): kubectl describe pod "
        "(FailedScheduling events), kubectl get nodes -L nvidia.com/gpu.product"
    )
    if "rdma/" in text or "networking.gke.io" in text:
        out.append(
            "RDMA devices and networks attach inside the pod: kubectl exec POD -- ibv_devinfo (ports ACTIVE), "
            "and NCCL_DEBUG=INFO logs name the IB/RoCE transport, not Socket"
        )
    out.append(
        "real start times fit the probe budgets (the start budget in this header): kubectl get events "
        '("Startup probe failed"), kubectl logs --previous after a restart'
    )
    if "Deployment" in kinds or "LeaderWorkerSet" in kinds:
        out.append(
            "pod DNS names resolve between pods (LWS headless Service <lws>-<group>-<worker>.<lws>): kubectl exec "
            "POD -- getent hosts <lws>-0-1.<lws>"
        )
    if llmd_release(docs) is not None or "InferencePool" in kinds:
        out.append(
            "the endpoint picker exists and routes to both roles: kubectl get inferencepool,svc; kubectl logs "
            "deploy/<release>-epp; a request through the front door shows prefill then decode in the pods' logs"
        )
    out.append(
        "a rollout has room for the surge group (maxSurge 1): kubectl get lws -w during an update (the new group "
        "stays Pending where no spare nodes exist; the old groups keep serving)"
    )
    return out


def explain_lines(docs: list[dict[str, Any]]) -> list[str]:
    """``widep lws TOPOLOGY --explain``: what to apply in which order, what a pod failure costs, what no check of
    the manifests can prove and how to check it on the cluster."""
    lines = prerequisite_lines(docs) + [
        "",
        "Not verifiable from the manifests (needs your API server, kubelet, nodes):",
    ]
    lines += [f"  - {line}" for line in unverifiable_lines(docs)]
    return lines


def _start_budget_s(lwt: dict[str, Any]) -> int | None:
    """The longest startupProbe budget (periodSeconds x failureThreshold) of a LeaderWorkerSet's templates."""
    out = None
    for k in ("leaderTemplate", "workerTemplate"):
        for c in (lwt.get(k) or {}).get("spec", {}).get("containers") or []:
            sp = c.get("startupProbe")
            if sp:
                out = max(out or 0, int(sp.get("periodSeconds", 10)) * int(sp.get("failureThreshold", 3)))
    return out


def pod_failure_lines(docs: list[dict[str, Any]]) -> list[str]:
    """What a pod failure costs under the restart policy each LeaderWorkerSet of ``docs`` is emitted with, and why
    not the other policies of the LWS v0.10 API (RecreateGroupOnPodRestart, RecreateGroupAfterStart, None)."""
    lines = []
    policies = set()
    for d in docs:
        if d["kind"] != "LeaderWorkerSet":
            continue
        lwt = d["spec"]["leaderWorkerTemplate"]
        policy = lwt.get("restartPolicy", "RecreateGroupOnPodRestart")
        policies.add(policy)
        groups, size = int(d["spec"].get("replicas", 1)), int(lwt.get("size", 1))
        budget = _start_budget_s(lwt)
        cold = f"at most the start budget, {budget // 60} min" if budget else "no start budget set"
        rest = (
            f"the other {groups - 1} group(s) keep serving ({groups - 1}/{groups} of the capacity)"
            if groups > 1
            else "with one group, its role serves nothing meanwhile"
        )
        lines.append(
            f"pod failure ({d['metadata']['name']}, restartPolicy {policy}): a container restart or a lost pod "
            f"deletes and recreates all {size} pod(s) of its group; the group serves nothing for a cold start of "
            f"every rank ({cold}: scheduling, image pull, model load, vLLM start) and its in-flight requests "
            f"fail; {rest}."
        )
    if policies == {"RecreateGroupOnPodRestart"}:
        lines.append(
            "pod failure: not emitted from LWS v0.10's restart policies: None (only the failed pod restarts: "
            "vLLM 0.32 cannot re-admit a restarted rank into a running DP/EP group - the survivors' engines stop "
            "when a DP peer dies, ranks meet only at start, and elastic EP is refused with one API server per rank, "
            "vllm/config/parallel.py:964 - so the group would fall pod by pod), RecreateGroupAfterStart (the same "
            "cost, but a failure while a pod of the group is Pending is not acted on)."
        )
    return lines


def sensible_placements(plan: DeploymentPlan) -> list[str]:
    """Placements worth generating: pod-per-rank only where it gives other pods than pod-per-node
    and check_options accepts it."""
    out = ["pod-per-node"]
    if (
        plan.spec.serving.dp_mode == "external"
        and any(rp.dp_local > 1 for rp in plan.roles)
        and not any(rp.dp_local > 1 and rp.all2all_backend.startswith("deepep") for rp in plan.roles)
    ):
        out.append("pod-per-rank")
    return out
