"""The planner: TopologySpec -> DeploymentPlan, a pure function returning frozen objects.

It decides, for every role: which nodes and GPUs each DP rank gets, its HTTP and side-channel
ports, which physical experts it holds, and the per-GPU memory budget; and it refuses, with the
field, the value and the valid options, anything vLLM would refuse after a 10-minute start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from widep.errors import UserError, did_you_mean
from widep.plan import rules as R
from widep.plan.extras import check_extras
from widep.plan.memory import MemoryBudget, memory_budget
from widep.spec.hardware import GPUSpec, get_gpu
from widep.spec.models import MoEArch, load_config_file, load_preset
from widep.spec.topology import NodeSpec, RoleSpec, TopologySpec
from widep.spec.vllm_versions import TABLES, FaultTolerance, VLLMVersionTable, first_version_with, table_for


@dataclass(frozen=True)
class Rank:
    """One DP rank: one vLLM engine (and, except headless, its API server) on ``tp`` GPUs."""

    role: str
    replica: int
    """Which independent copy of the role's DP group."""
    dp_rank: int
    """Global DP rank inside the group (--data-parallel-rank)."""
    node: int
    """Index of the node in cluster.nodes."""
    node_name: str
    group_node: int
    """Index of the node inside this DP group (0 = the group's leader node)."""
    local_rank: int
    """DP rank index on its node."""
    gpus: tuple[int, ...]
    """GPU ids on the node (CUDA_VISIBLE_DEVICES)."""
    port: int | None
    """HTTP port of the API server that serves this rank (None: served by another node's server)."""
    experts: tuple[int, ...]
    """Logical expert id of each physical expert slot this rank holds (over its TP GPUs)."""
    side_channel_port: int | None = None
    """NIXL side-channel port of this rank's first GPU (P/D only)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "dp_rank": self.dp_rank,
            "node": self.node,
            "node_name": self.node_name,
            "group_node": self.group_node,
            "local_rank": self.local_rank,
            "gpus": list(self.gpus),
            "port": self.port,
            "experts": list(self.experts),
            "side_channel_port": self.side_channel_port,
        }


@dataclass(frozen=True)
class RolePlan:
    """A role resolved: sizes, ranks, memory and warnings."""

    spec: RoleSpec
    index: int
    """Position of the role in the topology's roles list."""
    dp_size: int
    ep_size: int
    tp_size: int
    dp_local: int
    """DP ranks per node."""
    nodes_per_group: int
    group_nodes: tuple[tuple[int, ...], ...]
    """Node indices of each replica's DP group, leader node first."""
    ranks: tuple[Rank, ...]
    all2all_backend: str
    max_model_len: int
    max_num_batched_tokens: int
    physical_experts: int
    experts_per_gpu: int
    memory: MemoryBudget
    rpc_port: int
    http_port: int
    control_port: int
    """widep's group-control port on each replica's leader node."""
    warnings: tuple[str, ...] = ()
    kv_dtype: str = "bf16"
    """KV cache precision of this role (model.kv_cache_dtype unless the role overrides it)."""
    nixl_side_channel_port: int | None = None
    """P/D: base NIXL side-channel port of this role (VLLM_NIXL_SIDE_CHANNEL_PORT); rank r uses base + r."""
    redundant_experts: int = 0
    """Redundant experts, resolved: eplb.redundant_experts, or for 'auto' the count vLLM computes (the least that
    makes routed + redundant divide over EP when EPLB is on; 0 when it is off)."""
    fault_tolerance: FaultTolerance | None = None
    """The version's fault-tolerance facts when this role turns it on (the recovery API the orchestrator calls)."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def gpus(self) -> int:
        return self.dp_size * self.tp_size * self.spec.replicas

    def as_dict(self) -> dict[str, Any]:
        m = self.memory
        return {
            "name": self.name,
            "kind": self.kind,
            "replicas": self.spec.replicas,
            "recovery": self.spec.recovery,
            "dp_size": self.dp_size,
            "ep_size": self.ep_size,
            "tp_size": self.tp_size,
            "dp_local": self.dp_local,
            "nodes": self.nodes_per_group,
            "group_nodes": [list(g) for g in self.group_nodes],
            "gpus": self.gpus,
            "all2all_backend": self.all2all_backend,
            "expert_parallel": self.spec.expert_parallel,
            "physical_experts": self.physical_experts,
            "experts_per_gpu": self.experts_per_gpu,
            "redundant_experts": self.redundant_experts,
            "redundant_experts_auto": self.spec.eplb.redundant_experts == "auto",
            "eplb": self.spec.eplb.enabled,
            "dbo": self.spec.dbo.enabled,
            "fault_tolerance": None
            if self.fault_tolerance is None
            else {
                "engine_recovery_timeout_s": self.spec.fault_tolerance.engine_recovery_timeout_s,
                "on_fault": self.spec.fault_tolerance.on_fault,
                "instructions": list(self.fault_tolerance.instructions),
                "apply_path": self.fault_tolerance.apply_path,
                "status_path": self.fault_tolerance.status_path,
                "request_id_required": self.fault_tolerance.request_id_required,
            },
            "elastic_ep": None
            if not self.spec.elastic_ep.enabled
            else {"max_dp_size": self.spec.elastic_ep.max_dp_size or self.dp_size},
            "max_num_seqs": self.spec.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": self.spec.gpu_memory_utilization,
            "http_port": self.http_port,
            "rpc_port": self.rpc_port,
            "control_port": self.control_port,
            "kv_cache_dtype": self.kv_dtype,
            "block_size": self.spec.block_size,
            "nixl_side_channel_port": self.nixl_side_channel_port,
            "ranks": [r.as_dict() for r in self.ranks],
            "memory": {
                "total_gib": round(m.total_gib, 3),
                "budget_gib": round(m.budget_gib, 3),
                "weights_gib": round(m.weights_gib, 3),
                "expert_weights_gib": round(m.expert_weights_gib, 3),
                "non_expert_weights_gib": round(m.non_expert_weights_gib, 3),
                "all2all_buffer_gib": round(m.all2all_buffer_gib, 3),
                "activation_gib": round(m.activation_gib, 3),
                "cuda_graph_gib": round(m.cuda_graph_gib, 3),
                "overhead_gib": round(m.overhead_gib, 3),
                "kv_cache_gib": round(m.kv_cache_gib, 3),
                "kv_bytes_per_token": round(m.kv_bytes_per_token, 1),
                "kv_tokens": m.kv_tokens,
                "context_len": m.context_len,
                "max_seqs_at_context": m.max_seqs_at_context,
            },
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class RouterPlan:
    """Where the front door runs and what it fronts."""

    node: int
    port: int
    prometheus_port: int
    pd: bool
    """P/D hand-off (prefill URLs and decode URLs passed separately)."""

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "port": self.port, "prometheus_port": self.prometheus_port, "pd": self.pd}


@dataclass(frozen=True)
class DeploymentPlan:
    """Everything widep decided about a topology; input to render, lws, perf and bench."""

    spec: TopologySpec
    arch: MoEArch
    gpu: GPUSpec
    vllm: VLLMVersionTable
    nodes: tuple[NodeSpec, ...]
    roles: tuple[RolePlan, ...]
    weight_dtype: str
    kv_dtype: str
    warnings: tuple[str, ...] = field(default=())
    router: RouterPlan | None = None
    """The vllm-router front door, when enabled."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> str:
        return self.gpu.device

    @property
    def total_gpus(self) -> int:
        return sum(r.gpus for r in self.roles)

    def role(self, name: str) -> RolePlan:
        for r in self.roles:
            if r.name == name:
                return r
        raise UserError(f"--role: no role {name!r} in {self.name}. Valid: {', '.join(r.name for r in self.roles)}.")

    def endpoints(self, role: str | None = None) -> list[tuple[str, str, int]]:
        """(role, host, port) of every HTTP API server, in rank order, for the given role or all."""
        out: list[tuple[str, str, int]] = []
        for rp in self.roles:
            if role is not None and rp.name != role:
                continue
            seen: set[tuple[int, int]] = set()
            for r in rp.ranks:
                if r.port is None or (r.node, r.port) in seen:
                    continue
                seen.add((r.node, r.port))
                out.append((rp.name, self.nodes[r.node].host, r.port))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.spec.description,
            "model": self.arch.summary() | {"weight_dtype": self.weight_dtype, "kv_cache_dtype": self.kv_dtype},
            "gpu": self.gpu.name,
            "vllm_version": self.spec.vllm.version,
            "dp_mode": self.spec.serving.dp_mode,
            "total_gpus": self.total_gpus,
            "nodes": [{"name": n.name, "address": n.address} for n in self.nodes],
            "roles": [r.as_dict() for r in self.roles],
            "router": self.router.as_dict() if self.router else None,
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------------------------------------


def resolve_arch(spec: TopologySpec) -> MoEArch:
    if spec.model.preset:
        return load_preset(spec.model.preset)
    assert spec.model.config is not None  # guaranteed by ModelSpec's validator
    return load_config_file(spec.model.config)


def default_backend(role: RoleSpec, gpu: GPUSpec, ep_size: int, vllm: VLLMVersionTable) -> str:
    if gpu.device == "cpu" or ep_size <= 1 or not role.expert_parallel:
        return "allgather_reducescatter" if "allgather_reducescatter" in vllm.all2all_backends else "naive"
    if role.kind == "prefill":
        return "deepep_high_throughput"
    return "deepep_low_latency"


def expert_slots(num_logical: int, num_redundant: int) -> list[int]:
    """Logical expert of each physical slot, as vLLM's initial EPLB map: 0..E-1 then i % E for redundant ones."""
    return list(range(num_logical)) + [i % num_logical for i in range(num_redundant)]


def _fail(field_path: str, msg: str) -> None:
    raise UserError(f"{field_path}: {msg}")


def kv_dtype_of(spec: TopologySpec, role: RoleSpec) -> str:
    """The KV cache precision a role runs: its own kv_cache_dtype, else the model's ('auto' is the 16-bit default)."""
    given = role.kv_cache_dtype or spec.model.kv_cache_dtype
    return "bf16" if given in ("auto", "bf16", "fp16") else given


# vLLM arguments that change which weights, tokenizer or activation dtype a role loads: P/D roles must agree on them,
# or the decode rank reads KV that another model (or another tokenisation of the prompt) wrote.
MODEL_IDENTITY_FLAGS = (
    "--revision",
    "--code-revision",
    "--tokenizer",
    "--tokenizer-revision",
    "--hf-overrides",
    "--quantization",
    "--dtype",
)


def _extra_flag_values(args: list[str], flags: tuple[str, ...]) -> dict[str, str]:
    """flag -> value for the given flags found in a role's extra_args (``--flag v`` or ``--flag=v``; _ or -)."""
    out: dict[str, str] = {}
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg.partition("=")
        name = name.replace("_", "-")
        if name in flags:
            out[name] = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    return out


def check_pd_model_agreement(spec: TopologySpec) -> None:
    """P/D: prefill and decode roles load the same model (weights, tokenizer, dtype): the KV they hand over is
    only meaningful to the same model. UserError naming the roles' fields that differ."""
    pd = [(i, r) for i, r in enumerate(spec.roles) if r.kind in ("prefill", "decode")]
    if len(pd) < 2:
        return
    (i0, r0), values0 = pd[0], _extra_flag_values(pd[0][1].extra_args, MODEL_IDENTITY_FLAGS)
    for i, r in pd[1:]:
        values = _extra_flag_values(r.extra_args, MODEL_IDENTITY_FLAGS)
        for flag in MODEL_IDENTITY_FLAGS:
            a, b = values0.get(flag), values.get(flag)
            if a != b:
                _fail(
                    f"roles[{i}].extra_args",
                    f"{r.kind} role {r.name!r} loads the model with {flag} {b if b is not None else '(vLLM default)'} "
                    "but "
                    f"{r0.kind} role {r0.name!r} (roles[{i0}].extra_args) with {flag} "
                    f"{a if a is not None else '(vLLM default)'}; "
                    "KV handed from prefill to decode is only valid for the same model. "
                    f"Valid: the same {flag} on every prefill and decode role (or none).",
                )


def check_pd_kv_layout_agreement(spec: TopologySpec) -> None:
    """P/D: prefill and decode roles agree on KV block size and KV precision, which fix the layout of every block
    NIXL moves. (vLLM 0.32 pulls between unequal block sizes only when decode's is a multiple of prefill's, on
    GPUs without a host buffer, and asserts inside the engine otherwise; widep requires equal ones.)"""
    pd = [(i, r) for i, r in enumerate(spec.roles) if r.kind in ("prefill", "decode")]
    if len(pd) < 2:
        return
    i0, r0 = pd[0]
    for i, r in pd[1:]:
        if r.block_size != r0.block_size:
            _fail(
                f"roles[{i}].block_size",
                f"{r.kind} role {r.name!r} has block_size {r.block_size or '(vLLM default)'} but {r0.kind} role "
                f"{r0.name!r} (roles[{i0}].block_size) has {r0.block_size or '(vLLM default)'}; NIXL moves whole KV "
                f"blocks between them. Valid: the same block_size on every prefill and decode role.",
            )
        a, b = kv_dtype_of(spec, r0), kv_dtype_of(spec, r)
        if a != b:
            _fail(
                f"roles[{i}].kv_cache_dtype",
                f"{r.kind} role {r.name!r} stores KV as {b} but {r0.kind} role {r0.name!r} "
                f"(roles[{i0}].kv_cache_dtype, default model.kv_cache_dtype) as {a}; the decode rank would read "
                "prefill's bytes as another precision. Valid: the same kv_cache_dtype on every prefill and decode "
                "role.",
            )


def check_record_routed_experts(spec: TopologySpec, vt: VLLMVersionTable, is_cpu: bool, mla: bool) -> None:
    """serving.record_routed_experts needs a vLLM with --enable-return-routed-experts and what vLLM's AuxOutput
    check asks (prefix caching, no P/D connector). On CPU the routed-expert return comes from widep's vLLM plugin
    (widep/vllm_cpu_ep.py: vLLM's own AuxOutput connector wired into the V1 CPU model runner)."""
    if not spec.serving.record_routed_experts:
        return
    if not vt.has_return_routed_experts:
        _fail(
            "serving.record_routed_experts",
            f"true with vLLM {spec.vllm.version}: --enable-return-routed-experts exists from vLLM 0.32 on. Valid: "
            "false, or vllm.version 0.32.0 or newer.",
        )
    pd = [r.name for r in spec.roles if r.kind != "mixed"]
    if pd:
        _fail(
            "serving.record_routed_experts",
            f"true with prefill/decode roles {pd}: vLLM refuses it with the P/D KV connector "
            "('--enable-return-routed-experts is incompatible with NixlConnector; PD auxiliary output is not "
            "supported.'). Valid: false, or record on a topology of mixed roles.",
        )
    if is_cpu and mla:
        _fail(
            "serving.record_routed_experts",
            f"true with the MLA model {spec.model.preset or spec.model.config!r} on vLLM's CPU backend: vLLM turns "
            "prefix caching off for MLA on CPU ('MLA is enabled on a non-GPU platform; forcing chunked prefill and "
            "prefix caching to be disabled.') and routed-expert return requires it ('AuxOutput Connector requires "
            "prefix caching.'). Valid: false, or a model without MLA (e.g. preset tiny-moe).",
        )


SURGICAL_UNAVAILABLE = (
    "vLLM 0.32 cannot drop a dead rank from a running DP/EP group served by per-rank API servers: "
    "--enable-elastic-ep raises NotImplementedError in ParallelConfig (vllm/config/parallel.py:963-964, 'Elastic EP is "
    "not compatible with data_parallel_external_lb or data_parallel_hybrid_lb. Elastic EP relies on a single API "
    "server and core client to coordinate scale up/down.'; its scale-down also needs the leaving rank alive to hand "
    "its experts over); --enable-fault-tolerance fails in every CPU worker (WorkerSentinel, "
    "vllm/v1/worker/sentinel/gpu_worker_sentinel.py:42: 'Fault tolerance requires an FT-capable all2all backend (one "
    "of ['deepep_low_latency', 'nixl_ep']), but got 'allgather_reducescatter'.') and, where it runs, only re-forms "
    "the DP group at the same size with the same ranks after aborting the survivors' requests (EngineCoreSentinel "
    "on_fault / retry / _reinit_dp_group, vllm/v1/fault_tolerance/engine_core_sentinel.py:79-160)"
)
"""Why ``recovery: surgical`` is refused (shown by `widep plan`)."""


def surgical_unavailable(vt: VLLMVersionTable) -> str:
    """Why ``recovery: surgical`` is refused on the vLLM line ``vt`` (shown by `widep plan`)."""
    ft = vt.fault_tolerance
    if ft is not None and "scale_down" in ft.instructions:
        return (
            f"vLLM {vt.line}'s fault tolerance can drop faulted ranks (instruction 'scale_down' with "
            f"params.removed_dp_ranks posted to every rank's {ft.apply_path}, with --enable-fault-tolerance, one API "
            "server per rank and an FT-capable all2all backend: deepep_low_latency or nixl_ep, i.e. CUDA), but widep "
            "does not drive it: no run of it exists on this "
            "project's machines, whose CPU vLLM 0.32 refuses fault tolerance in every worker (WorkerSentinel, "
            "vllm/v1/worker/sentinel/gpu_worker_sentinel.py:42) and has only 'retry', which re-forms the group at "
            "the same size"
        )
    if vt.elastic_ep_external_lb:
        return (
            f"vLLM {vt.line} accepts elastic EP behind per-rank API servers, but its scale-down is cooperative: the "
            "leaving rank hands its experts over before it goes (distributed/elastic_ep/), which a SIGKILLed rank "
            f"cannot; its fault tolerance has only {', '.join(ft.instructions) if ft else 'no instruction'} "
            "(re-forms the group at the same size)"
        )
    return SURGICAL_UNAVAILABLE


def check_recovery(spec: TopologySpec, vt: VLLMVersionTable) -> None:
    for i, r in enumerate(spec.roles):
        if r.recovery == "surgical":
            _fail(
                f"roles[{i}].recovery",
                f"'surgical' with vLLM {spec.vllm.version}: {surgical_unavailable(vt)}. Valid: group.",
            )


def check_cpu_cores(spec: TopologySpec, is_cpu: bool) -> None:
    """cluster.cpu_cores budgets CPU-backend rank slots: CPU kinds only, at most one core per slot."""
    cores = spec.cluster.cpu_cores
    if cores is not None and not is_cpu:
        _fail(
            "cluster.cpu_cores", f"{cores} on GPU kind {spec.cluster.gpu!r}: it budgets CPU-backend ranks. Valid: CPU."
        )
    if cores is not None and cores > spec.cluster.gpus_per_node:
        _fail(
            "cluster.cpu_cores",
            f"{cores} cores for {spec.cluster.gpus_per_node} rank slots per node (cluster.gpus_per_node). "
            f"Valid: 1..{spec.cluster.gpus_per_node} (fewer cores than slots shares them).",
        )


def check_kv_load_failure_policy(spec: TopologySpec, vt: VLLMVersionTable) -> None:
    """'recompute' needs a vLLM that takes kv_load_failure_policy (0.32 does)."""
    if spec.disaggregated and spec.serving.kv_load_failure_policy != "fail" and not vt.has_kv_load_failure_policy:
        _fail(
            "serving.kv_load_failure_policy",
            f"{spec.serving.kv_load_failure_policy!r} with vLLM {spec.vllm.version}: widep renders "
            "kv_load_failure_policy only for vLLM 0.20-0.39. Valid: fail (vLLM's own behaviour there).",
        )


def _refuse(refusal: R.Refusal | None, role_field: str = "") -> None:
    """UserError naming the field when a rule refuses (``role_field``: the role's, e.g. ``roles[2]``)."""
    if refusal is not None:
        _fail(refusal.at(role_field), refusal.message)


class _Claims:
    """Which node/port and node/GPU pairs the roles planned so far hold; refuses a second owner."""

    def __init__(self, nodes: tuple[NodeSpec, ...]) -> None:
        self.nodes = nodes
        self.ports: dict[tuple[int, int], str] = {}
        self.gpus: dict[tuple[int, int], str] = {}

    def port(self, node: int, port: int, what: str, field_path: str) -> None:
        if port > 65535:
            _fail(
                field_path,
                f"{what} would use port {port} on node {self.nodes[node].name}, past the last TCP port 65535. "
                "Valid: a lower base port (ports count up per local rank / role).",
            )
        key = (node, port)
        if key in self.ports and self.ports[key] != what:
            _fail(
                field_path,
                f"port {port} on node {self.nodes[node].name} is used twice: by {self.ports[key]} and by {what}. "
                "Give the roles different ports (roles[i].port / rpc_port / nixl_side_channel_port, serving.*_port).",
            )
        self.ports[key] = what

    def gpu(self, node: int, gid: int, who: str, role: str, fp: str) -> None:
        key = (node, gid)
        if key in self.gpus:
            _fail(
                f"{fp}.first_gpu",
                f"GPU {gid} of node {self.nodes[node].name} is given to both {self.gpus[key]} and {role}. "
                "Give roles disjoint nodes or GPU ranges (first_gpu, gpus_per_node).",
            )
        self.gpus[key] = who


def _role_gpus_per_node(spec: TopologySpec, role: RoleSpec, arch: MoEArch, fp: str) -> int:
    """GPUs per node of the role, after the GPU-range and TP rules."""
    cgpn = spec.cluster.gpus_per_node
    _refuse(R.first_gpu_exists(role.first_gpu, cgpn), fp)
    gpn = role.gpus_per_node or (cgpn - role.first_gpu)
    _refuse(R.gpus_fit_node(role.first_gpu, gpn, cgpn), fp)
    _refuse(R.tp_divides_node(role.tp, gpn), fp)
    _refuse(R.tp_splits_heads(role.tp, gpn, arch.name, arch.num_heads, arch.num_kv_heads, arch.mla), fp)
    return gpn


def _role_nodes(
    role: RoleSpec, nodes: tuple[NodeSpec, ...], used_nodes: set[int], gpn: int, fp: str
) -> tuple[tuple[int, ...], ...]:
    """Node indices of each replica's DP group (leader first); marks them used."""
    node_index = {n.name: i for i, n in enumerate(nodes)}
    if isinstance(role.nodes, int):
        per_group = role.nodes
        need = per_group * role.replicas
        free = [i for i in range(len(nodes)) if i not in used_nodes]
        if need > len(free):
            _fail(
                f"{fp}.nodes",
                f"role {role.name!r} needs {need} node(s) ({per_group} x {role.replicas} replica(s), "
                f"{need * gpn} GPUs) but only {len(free)} of the cluster's {len(nodes)} node(s) are free "
                f"({len(used_nodes)} used by earlier roles). Valid: at most {len(free) // role.replicas} node(s) "
                "per group, or add nodes to cluster.nodes.",
            )
        chosen = free[:need]
    else:
        chosen = []
        for j, ref in enumerate(role.nodes):
            if isinstance(ref, int):
                if not 0 <= ref < len(nodes):
                    _fail(f"{fp}.nodes[{j}]", f"node index {ref} is out of range. Valid: 0..{len(nodes) - 1}.")
                chosen.append(ref)
            else:
                if ref not in node_index:
                    _fail(
                        f"{fp}.nodes[{j}]",
                        f"no node named {ref!r}.{did_you_mean(ref, list(node_index))} Valid: {', '.join(node_index)}.",
                    )
                chosen.append(node_index[ref])
        if len(set(chosen)) != len(chosen):
            _fail(f"{fp}.nodes", f"a node is listed twice: {role.nodes}.")
        if len(chosen) % role.replicas:
            _fail(f"{fp}.nodes", f"{len(chosen)} node(s) do not split into {role.replicas} replicas evenly.")
        per_group = len(chosen) // role.replicas
    used_nodes.update(chosen)
    return tuple(tuple(chosen[g * per_group : (g + 1) * per_group]) for g in range(role.replicas))


def _role_warnings(
    spec: TopologySpec,
    role: RoleSpec,
    fp: str,
    arch: MoEArch,
    mem: MemoryBudget,
    backend: str,
    dp_size: int,
    per_group: int,
    max_model_len: int,
    context_len: int,
    redundant: int,
    is_cpu: bool,
) -> list[str]:
    """What runs but runs badly."""
    warnings: list[str] = []
    deprecated = table_for(spec.vllm.version).deprecated_backends
    if backend in deprecated:
        warnings.append(
            f"{fp}.all2all_backend: {backend!r} is deprecated in vLLM {spec.vllm.version}; use {deprecated[backend]!r}."
        )
    if max_model_len > arch.max_position_embeddings:
        warnings.append(
            f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
            f"{arch.max_position_embeddings}; vLLM needs VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 for that."
        )
    if not is_cpu and mem.kv_cache_gib < 0.1 * mem.budget_gib:
        warnings.append(
            f"memory is tight: only {mem.kv_cache_gib:.1f} GiB ({100 * mem.kv_cache_gib / mem.budget_gib:.0f}% of "
            "the budget) is left for the KV cache."
        )
    if mem.max_seqs_at_context < role.max_num_seqs:
        warnings.append(
            f"the KV cache holds {mem.max_seqs_at_context} sequences of {context_len} tokens per rank, fewer than "
            f"max_num_seqs={role.max_num_seqs}: long requests will queue or be preempted."
        )
    if arch.mla and role.tp > 1:
        warnings.append(
            f"MLA with TP={role.tp}: every TP rank stores the full latent KV cache (duplicated {role.tp}x); "
            "prefer TP=1 and more DP ranks."
        )
    if backend == "deepep_high_throughput" and role.kind in ("decode", "mixed") and dp_size > 1 and not is_cpu:
        warnings.append(
            "deepep_high_throughput with DP > 1 disables CUDA graphs: decode steps will be slow. "
            "deepep_low_latency is the decode backend."
        )
    if backend == "deepep_low_latency" and role.kind == "prefill":
        warnings.append(
            "deepep_low_latency on a prefill role: dispatch is chunked to small batches; deepep_high_throughput is "
            "faster there."
        )
    if backend.startswith("deepep") and per_group > 1 and not spec.cluster.network.rdma and not is_cpu:
        warnings.append("DeepEP across nodes without RDMA (cluster.network.rdma: false) will not initialise NVSHMEM.")
    if role.eplb.enabled and redundant == 0:
        warnings.append("EPLB is on with 0 redundant experts: it can only move experts, not replicate hot ones.")
    if role.eplb.redundant_experts == "auto" and role.eplb.enabled:
        warnings.append(
            f"{fp}.eplb.redundant_experts: 'auto' gives {redundant} (what vLLM {spec.vllm.version} computes: the least "
            f"that makes {arch.routed_experts} routed experts divide over EP={dp_size * role.tp})."
        )
    if role.fault_tolerance.enabled and is_cpu:
        warnings.append(
            f"{fp}.fault_tolerance: vLLM's recovery side (the worker sentinel) is written for the GPU worker; on the "
            "CPU backend it is untested."
        )
    if role.elastic_ep.enabled and role.eplb.enabled:
        warnings.append(
            f"{fp}.elastic_ep: vLLM's async EPLB (its default) needs the NIXL package on every node for elastic EP; "
            "without it vLLM refuses to start."
        )
    return warnings


def _role_ranks(
    spec: TopologySpec,
    role: RoleSpec,
    ri: int,
    groups: tuple[tuple[int, ...], ...],
    dp_local: int,
    dp_size: int,
    slots: list[int],
    experts_per_gpu: int,
    claims: _Claims,
) -> tuple[Rank, ...]:
    """Every rank of the role: node, GPUs, HTTP and side-channel ports, experts; claims the ports and GPUs."""
    fp, mode, nodes = f"roles[{ri}]", spec.serving.dp_mode, claims.nodes
    http_port = role.port or spec.serving.port
    rpc_port = role.rpc_port or spec.serving.rpc_port
    control_port = spec.serving.control_port + ri
    side_base = (role.nixl_side_channel_port or spec.serving.nixl_side_channel_port) if spec.disaggregated else None
    side_field = f"{fp}.nixl_side_channel_port" if role.nixl_side_channel_port else "serving.nixl_side_channel_port"
    ranks: list[Rank] = []
    for g, group in enumerate(groups):
        claims.port(group[0], rpc_port, f"{role.name} DP handshake (rpc_port)", f"{fp}.rpc_port")
        claims.port(group[0], control_port, f"{role.name} widep group control", "serving.control_port")
        for gn, node in enumerate(group):
            if mode == "multiport":
                claims.port(node, spec.serving.supervisor_port, f"{role.name} DP supervisor", "serving.supervisor_port")
            for lr in range(dp_local):
                dp_rank = gn * dp_local + lr
                first = role.first_gpu + lr * role.tp
                gpus = tuple(range(first, first + role.tp))
                for gid in gpus:
                    claims.gpu(node, gid, f"{role.name} rank {dp_rank}", role.name, fp)
                if mode in ("external", "multiport"):
                    port: int | None = http_port + lr
                elif mode == "hybrid":
                    port = http_port
                else:
                    port = http_port if gn == 0 else None
                if port is not None:
                    what = f"{role.name} HTTP" + (f" rank {dp_rank}" if mode in ("external", "multiport") else "")
                    claims.port(node, port, what, f"{fp}.port")
                side = None
                if side_base is not None:
                    # one side channel per engine (all its TP workers), on base + DP rank (vLLM 0.32
                    # nixl/base_scheduler.py: VLLM_NIXL_SIDE_CHANNEL_PORT + data_parallel_index)
                    side = side_base + dp_rank
                    if side > 65535:
                        _fail(
                            side_field,
                            f"{side_base} + DP rank {dp_rank} = {side} is above 65535. "
                            f"Valid: at most {65535 - dp_size + 1}.",
                        )
                    claims.port(node, side, f"{role.name} NIXL side channel rank {dp_rank} ({side_field})", side_field)
                if role.expert_parallel:
                    base = dp_rank * role.tp * experts_per_gpu
                    experts = tuple(slots[base : base + role.tp * experts_per_gpu])
                else:
                    experts = tuple(slots)
                ranks.append(
                    Rank(
                        role=role.name,
                        replica=g,
                        dp_rank=dp_rank,
                        node=node,
                        node_name=nodes[node].name,
                        group_node=gn,
                        local_rank=lr,
                        gpus=gpus,
                        port=port,
                        experts=experts,
                        side_channel_port=side,
                    )
                )
    return tuple(ranks)


def _plan_role(
    spec: TopologySpec,
    ri: int,
    arch: MoEArch,
    gpu: GPUSpec,
    vt: VLLMVersionTable,
    weight_dtype: str,
    used_nodes: set[int],
    claims: _Claims,
) -> RolePlan:
    """One role: sizes, the planner's rules in order (rules.py), memory, warnings and ranks."""
    role, fp, is_cpu = spec.roles[ri], f"roles[{ri}]", gpu.device == "cpu"
    nodes = claims.nodes
    gpn = _role_gpus_per_node(spec, role, arch, fp)
    groups = _role_nodes(role, nodes, used_nodes, gpn, fp)
    per_group = len(groups[0])
    dp_local = gpn // role.tp
    dp_size = dp_local * per_group
    ep_size = dp_size * role.tp if role.expert_parallel else 1

    # ---- all2all backend and version/feature rules ----
    backend = role.all2all_backend or default_backend(role, gpu, ep_size, vt)
    _refuse(R.backend_runs(backend, spec.vllm.version, vt.line, vt.all2all_backends, vt.removed_backends), fp)
    _refuse(R.backend_on_cpu(is_cpu, backend), fp)
    _refuse(R.eplb_possible(role.eplb.enabled, is_cpu, role.expert_parallel, ep_size), fp)
    E, version, mode = arch.routed_experts, spec.vllm.version, spec.serving.dp_mode
    auto = role.eplb.redundant_experts == "auto"
    first_auto = first_version_with("eplb_auto_redundancy")
    _refuse(R.redundant_auto_supported(auto, vt.eplb_auto_redundancy, version, E, ep_size, first_auto), fp)
    if auto:
        red = (ep_size - E % ep_size) % ep_size if role.eplb.enabled and role.expert_parallel else 0
    else:
        red = int(role.eplb.redundant_experts)
    _refuse(R.redundant_needs_eplb(red if not auto else 0, role.eplb.enabled), fp)
    _refuse(R.dbo_possible(role.dbo.enabled, vt.has_dbo, version, is_cpu, backend, vt.dbo_backends), fp)
    _refuse(R.multiport_ranks(mode, dp_local, dp_size, role.name), fp)
    ft, newest = role.fault_tolerance, TABLES[-1]
    newest_ft = newest.fault_tolerance.instructions if newest.fault_tolerance else ()
    ft_instr = vt.fault_tolerance.instructions if vt.fault_tolerance else None
    _refuse(
        R.fault_tolerance_possible(ft.enabled, ft.on_fault, version, mode, ft_instr, newest_ft, newest.versions[0]),
        fp,
    )
    ee = role.elastic_ep
    elastic = R.elastic_ep_possible(
        ee.enabled,
        vt.elastic_ep,
        vt.elastic_ep_external_lb,
        version,
        mode,
        role.eplb.enabled,
        ee.max_dp_size,
        dp_size,
        first_version_with("elastic_ep_external_lb"),
    )
    _refuse(elastic, fp)

    # ---- experts and lengths ----
    physical = E + red
    max_gpus = len(nodes) * spec.cluster.gpus_per_node
    even_hint = vt.redundant_experts_even_the_split and not is_cpu
    _refuse(R.experts_divide(E, red, ep_size, dp_size, role.tp, role.expert_parallel, max_gpus, even_hint), fp)
    experts_per_gpu = physical // ep_size if role.expert_parallel else physical
    max_model_len = role.max_model_len or min(arch.max_position_embeddings, 32768)
    mnbt = role.max_num_batched_tokens or (max(role.max_num_seqs, 256) if role.kind == "decode" else 8192)
    _refuse(R.batched_tokens_cover_seqs(mnbt, role.max_num_seqs), fp)
    context_len = role.context_len or max_model_len

    # ---- memory ----
    role_kv_dtype = kv_dtype_of(spec, role)
    cuda_graphs = not role.enforce_eager and not (backend == "deepep_high_throughput" and dp_size > 1)
    mem = memory_budget(
        arch=arch,
        gpu=gpu,
        weight_dtype=weight_dtype,
        kv_dtype=role_kv_dtype,
        tp=role.tp,
        dp_size=dp_size,
        ep_size=ep_size,
        experts_per_gpu=experts_per_gpu if role.expert_parallel else physical / role.tp,
        backend=backend,
        max_num_seqs=role.max_num_seqs,
        max_num_batched_tokens=mnbt,
        gpu_memory_utilization=role.gpu_memory_utilization,
        cuda_graphs=cuda_graphs,
        context_len=context_len,
        fixed_kv_gib=role.kv_cache_gib if role.kv_cache_gib is not None else (1.0 if is_cpu else None),
    )
    more = partial(_min_nodes_that_fit, spec, role, arch, gpu, weight_dtype)
    _refuse(R.memory_fits(mem, is_cpu, role.name, gpu.name, role.gpu_memory_utilization, more), fp)
    _refuse(R.kv_holds_context(mem, max_model_len), fp)
    warnings = _role_warnings(
        spec, role, fp, arch, mem, backend, dp_size, per_group, max_model_len, context_len, red, is_cpu
    )
    slots = expert_slots(E, red)
    ranks = _role_ranks(spec, role, ri, groups, dp_local, dp_size, slots, experts_per_gpu, claims)
    return RolePlan(
        spec=role,
        index=ri,
        dp_size=dp_size,
        ep_size=ep_size,
        tp_size=role.tp,
        dp_local=dp_local,
        nodes_per_group=per_group,
        group_nodes=groups,
        ranks=ranks,
        all2all_backend=backend,
        max_model_len=max_model_len,
        max_num_batched_tokens=mnbt,
        physical_experts=physical,
        experts_per_gpu=experts_per_gpu,
        memory=mem,
        rpc_port=role.rpc_port or spec.serving.rpc_port,
        http_port=role.port or spec.serving.port,
        control_port=spec.serving.control_port + ri,
        warnings=tuple(warnings),
        kv_dtype=role_kv_dtype,
        nixl_side_channel_port=(role.nixl_side_channel_port or spec.serving.nixl_side_channel_port)
        if spec.disaggregated
        else None,
        redundant_experts=red,
        fault_tolerance=vt.fault_tolerance if ft.enabled else None,
    )


def _router_plan(spec: TopologySpec, roles: list[RolePlan], claims: _Claims) -> RouterPlan | None:
    rs, nodes = spec.router, claims.nodes
    if not rs.enabled:
        return None
    node_index = {n.name: i for i, n in enumerate(nodes)}
    if isinstance(rs.node, int):
        if not 0 <= rs.node < len(nodes):
            _fail("router.node", f"node index {rs.node} is out of range. Valid: 0..{len(nodes) - 1}.")
        rnode = rs.node
    else:
        if rs.node not in node_index:
            _fail(
                "router.node",
                f"no node named {rs.node!r}.{did_you_mean(rs.node, list(node_index))} Valid: {', '.join(node_index)}.",
            )
        rnode = node_index[rs.node]
    pd = rs.pd == "on" or (rs.pd == "auto" and {r.kind for r in roles} >= {"prefill", "decode"})
    if pd and not {r.kind for r in roles} >= {"prefill", "decode"}:
        _fail("router.pd", "'on' needs a prefill and a decode role in this topology. Valid: auto, off.")
    claims.port(rnode, rs.port, "router", "router.port")
    claims.port(rnode, rs.prometheus_port, "router metrics", "router.prometheus_port")
    return RouterPlan(node=rnode, port=rs.port, prometheus_port=rs.prometheus_port, pd=pd)


def plan(spec: TopologySpec) -> DeploymentPlan:
    """Plan a topology. Pure: no files, processes, sockets or environment are touched.

    Raises UserError (field path, value given, valid values) for anything vLLM would reject.
    """
    arch = resolve_arch(spec)
    gpu = get_gpu(spec.cluster.gpu)
    vt = table_for(spec.vllm.version)
    nodes = tuple(spec.cluster.node_list)
    weight_dtype = spec.model.weight_dtype or arch.default_weight_dtype
    kv_dtype = "bf16" if spec.model.kv_cache_dtype in ("auto", "bf16", "fp16") else spec.model.kv_cache_dtype
    is_cpu = gpu.device == "cpu"
    _refuse(R.weight_dtype_on_cpu(is_cpu, weight_dtype))
    check_cpu_cores(spec, is_cpu)
    check_pd_model_agreement(spec)
    check_pd_kv_layout_agreement(spec)
    check_kv_load_failure_policy(spec, vt)
    check_record_routed_experts(spec, vt, is_cpu, arch.mla)
    check_recovery(spec, vt)
    mv = first_version_with("has_multi_port_lb")
    _refuse(R.multiport_supported(spec.serving.dp_mode, vt.has_multi_port_lb, spec.vllm.version, mv))

    used_nodes: set[int] = set()
    claims = _Claims(nodes)
    roles = [_plan_role(spec, ri, arch, gpu, vt, weight_dtype, used_nodes, claims) for ri in range(len(spec.roles))]
    router = _router_plan(spec, roles, claims)
    plan_warnings: list[str] = []
    kinds = {r.kind for r in roles}
    if spec.disaggregated and kinds != {"prefill", "decode"}:
        lone = next(iter(kinds))
        other = "decode" if lone == "prefill" else "prefill"
        plan_warnings.append(
            f"only a {lone} role: its KV transfer (NIXL) pairs with a {other} group deployed from another topology."
        )
    if is_cpu and any(r.dp_size > 1 and r.spec.expert_parallel for r in roles):
        plan_warnings.append(
            "DP >= 2 expert parallel on vLLM's CPU backend answers through widep's vLLM plugin (widep_cpu_ep: MoE "
            "all_gatherv/reduce_scatterv and expert_map that vLLM 0.32 lacks on CPU); it must be installed where vLLM "
            "runs and not switched off (WIDEP_CPU_EP_PLUGIN, VLLM_PLUGINS). Unquantized experts only; no EPLB, DBO, "
            "DeepEP or DeepGEMM on CPU."
        )
    result = DeploymentPlan(
        spec=spec,
        arch=arch,
        gpu=gpu,
        vllm=vt,
        nodes=nodes,
        roles=tuple(roles),
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        warnings=tuple(plan_warnings),
        router=router,
    )
    # The extra_args / extra_env ownership check (plan/extras.py), so that `plan` refuses what `render`, `lws`
    # and `launch` refuse.
    check_extras(result)
    return result


def _min_nodes_that_fit(spec: TopologySpec, role: RoleSpec, arch: MoEArch, gpu: GPUSpec, dtype: str) -> str:
    """A hint: the smallest GPU count per group whose weights fit, or why none does."""
    gpn = role.gpus_per_node or spec.cluster.gpus_per_node
    for n in range(1, 65):
        ep = n * gpn
        red = role.eplb.redundant_experts
        red = (ep - arch.routed_experts % ep) % ep if red == "auto" else red
        if role.expert_parallel and (arch.routed_experts + red) % ep:
            continue
        mem = memory_budget(
            arch=arch,
            gpu=gpu,
            weight_dtype=dtype,
            kv_dtype="bf16",
            tp=role.tp,
            dp_size=ep // role.tp,
            ep_size=ep,
            experts_per_gpu=(arch.routed_experts + red) / ep,
            backend="deepep_low_latency",
            max_num_seqs=role.max_num_seqs,
            max_num_batched_tokens=role.max_num_batched_tokens or 8192,
            gpu_memory_utilization=role.gpu_memory_utilization,
            cuda_graphs=True,
            context_len=1,
        )
        if mem.kv_cache_gib > 0.15 * mem.budget_gib:
            return f"e.g. {n} node(s) x {gpn} GPUs"
    return "none up to 64 nodes"
