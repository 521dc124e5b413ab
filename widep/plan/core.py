"""The planner: TopologySpec -> DeploymentPlan, a pure function returning frozen objects.

It decides, for every role: which nodes and GPUs each DP rank gets, its HTTP and side-channel
ports, which physical experts it holds, and the per-GPU memory budget; and it refuses, with the
field, the value and the valid options, anything vLLM would refuse after a 10-minute start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from widep.errors import UserError, did_you_mean
from widep.plan.memory import MemoryBudget, memory_budget
from widep.spec.hardware import GPUSpec, get_gpu
from widep.spec.models import MoEArch, load_config_file, load_preset
from widep.spec.topology import NodeSpec, RoleSpec, TopologySpec
from widep.spec.vllm_versions import VLLMVersionTable, check_backend, first_version_with, table_for


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

    @property
    def is_leader(self) -> bool:
        return self.dp_rank == 0

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
            "redundant_experts": self.spec.eplb.redundant_experts,
            "eplb": self.spec.eplb.enabled,
            "dbo": self.spec.dbo.enabled,
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


def check_kv_load_failure_policy(spec: TopologySpec, vt: VLLMVersionTable) -> None:
    """'recompute' needs a vLLM that takes kv_load_failure_policy (0.32 does)."""
    if spec.disaggregated and spec.serving.kv_load_failure_policy != "fail" and not vt.has_kv_load_failure_policy:
        _fail(
            "serving.kv_load_failure_policy",
            f"{spec.serving.kv_load_failure_policy!r} with vLLM {spec.vllm.version}: widep renders "
            "kv_load_failure_policy only for vLLM 0.20-0.39. Valid: fail (vLLM's own behaviour there).",
        )


def _valid_redundant(E: int, ep: int, limit: int = 4) -> list[int]:
    out, r = [], 0
    while len(out) < limit and r <= 1023:
        if (E + r) % ep == 0:
            out.append(r)
        r += 1
    return out


def _check_tp_heads(arch: MoEArch, tp: int, gpn: int, field_path: str) -> None:
    """vLLM shards attention heads over TP: the heads must split evenly (and KV heads split or replicate evenly)."""
    kv = arch.num_kv_heads
    kv_ok = arch.mla or (kv % tp == 0 if tp <= kv else tp % kv == 0)
    if arch.num_heads % tp or not kv_ok:
        valid = [
            t
            for t in range(1, gpn + 1)
            if gpn % t == 0 and arch.num_heads % t == 0 and (arch.mla or (kv % t == 0 if t <= kv else t % kv == 0))
        ]
        _fail(
            field_path,
            f"tp={tp} does not split {arch.name}'s {arch.num_heads} attention heads "
            f"({kv} KV heads) evenly; vLLM refuses it. Valid: {valid}.",
        )


def plan(spec: TopologySpec) -> DeploymentPlan:
    """Plan a topology. Pure: no files, processes, sockets or environment are touched.

    Raises UserError (field path, value given, valid values) for anything vLLM would reject.
    """
    arch = resolve_arch(spec)
    gpu = get_gpu(spec.cluster.gpu)
    vt = table_for(spec.vllm.version)
    nodes = tuple(spec.cluster.node_list)
    node_index = {n.name: i for i, n in enumerate(nodes)}
    weight_dtype = spec.model.weight_dtype or arch.default_weight_dtype
    kv_dtype = "bf16" if spec.model.kv_cache_dtype in ("auto", "bf16", "fp16") else spec.model.kv_cache_dtype
    if gpu.device == "cpu" and weight_dtype not in ("bf16", "fp16"):
        _fail(
            "model.weight_dtype",
            f"{weight_dtype!r} on the CPU backend: widep's CPU topologies serve 16-bit weights. Valid: bf16, fp16.",
        )
    is_cpu = gpu.device == "cpu"
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
    mode = spec.serving.dp_mode
    check_pd_model_agreement(spec)
    check_pd_kv_layout_agreement(spec)
    check_kv_load_failure_policy(spec, vt)
    if mode == "multiport" and not vt.has_multi_port_lb:
        _fail(
            "serving.dp_mode",
            f"'multiport' needs vLLM >= {first_version_with('has_multi_port_lb')} (the DP supervisor); "
            f"vLLM {spec.vllm.version} lacks it. Valid: external, hybrid, internal.",
        )

    used_nodes: set[int] = set()
    gpu_owner: dict[tuple[int, int], str] = {}
    port_owner: dict[tuple[int, int], str] = {}
    roles: list[RolePlan] = []
    plan_warnings: list[str] = []

    def claim_port(node: int, port: int, what: str, field_path: str) -> None:
        if port > 65535:
            _fail(
                field_path,
                f"{what} would use port {port} on node {nodes[node].name}, past the last TCP port 65535. "
                "Valid: a lower base port (ports count up per local rank / role).",
            )
        key = (node, port)
        if key in port_owner and port_owner[key] != what:
            _fail(
                field_path,
                f"port {port} on node {nodes[node].name} is used twice: by {port_owner[key]} and by {what}. "
                "Give the roles different ports (roles[i].port / rpc_port / nixl_side_channel_port, serving.*_port).",
            )
        port_owner[key] = what

    for ri, role in enumerate(spec.roles):
        fp = f"roles[{ri}]"
        if role.first_gpu >= spec.cluster.gpus_per_node:
            _fail(
                f"{fp}.first_gpu",
                f"GPU index {role.first_gpu} does not exist: nodes have {spec.cluster.gpus_per_node} GPUs "
                f"(cluster.gpus_per_node). Valid: 0..{spec.cluster.gpus_per_node - 1}.",
            )
        gpn = role.gpus_per_node or (spec.cluster.gpus_per_node - role.first_gpu)
        if role.first_gpu + gpn > spec.cluster.gpus_per_node:
            _fail(
                f"{fp}.gpus_per_node",
                f"GPUs {role.first_gpu}..{role.first_gpu + gpn - 1} per node, but nodes have "
                f"{spec.cluster.gpus_per_node} "
                f"(cluster.gpus_per_node). Valid: first_gpu + gpus_per_node <= {spec.cluster.gpus_per_node}.",
            )
        if gpn % role.tp:
            valid = [t for t in range(1, gpn + 1) if gpn % t == 0]
            _fail(f"{fp}.tp", f"tp={role.tp} does not divide the {gpn} GPUs per node of this role. Valid: {valid}.")
        _check_tp_heads(arch, role.tp, gpn, f"{fp}.tp")
        # nodes of each replica
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
                    "per group, "
                    "or add nodes to cluster.nodes.",
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
                            f"no node named {ref!r}.{did_you_mean(ref, list(node_index))} Valid: "
                            f"{', '.join(node_index)}.",
                        )
                    chosen.append(node_index[ref])
            if len(set(chosen)) != len(chosen):
                _fail(f"{fp}.nodes", f"a node is listed twice: {role.nodes}.")
            if len(chosen) % role.replicas:
                _fail(f"{fp}.nodes", f"{len(chosen)} node(s) do not split into {role.replicas} replicas evenly.")
            per_group = len(chosen) // role.replicas
        used_nodes.update(chosen)
        groups = tuple(tuple(chosen[g * per_group : (g + 1) * per_group]) for g in range(role.replicas))

        dp_local = gpn // role.tp
        dp_size = dp_local * per_group
        ep_size = dp_size * role.tp if role.expert_parallel else 1
        warnings: list[str] = []

        # ---- all2all backend and version/feature rules ----
        backend = role.all2all_backend or default_backend(role, gpu, ep_size, vt)
        check_backend(spec.vllm.version, backend, f"{fp}.all2all_backend")
        if is_cpu and backend != "allgather_reducescatter":
            _fail(
                f"{fp}.all2all_backend",
                f"{backend!r} on the CPU backend: vLLM's CPU communicator implements only allgather_reducescatter and "
                "silently falls back to it. Valid: allgather_reducescatter.",
            )
        if role.eplb.enabled:
            if is_cpu:
                _fail(
                    f"{fp}.eplb.enabled",
                    "EPLB needs CUDA, ROCm or XPU; vLLM refuses it on the CPU backend. Valid: false.",
                )
            if not role.expert_parallel:
                _fail(
                    f"{fp}.eplb.enabled",
                    "EPLB needs expert parallel (roles[].expert_parallel: true). Given: expert_parallel=false.",
                )
            if ep_size <= 1:
                _fail(f"{fp}.eplb.enabled", f"EPLB needs EP > 1; this role has EP={ep_size}.")
        if role.eplb.redundant_experts and not role.eplb.enabled:
            _fail(
                f"{fp}.eplb.redundant_experts",
                f"{role.eplb.redundant_experts} redundant experts without EPLB: vLLM rejects this. Valid: set "
                "eplb.enabled: true, or 0.",
            )
        if role.dbo.enabled:
            if not vt.has_dbo:
                _fail(f"{fp}.dbo.enabled", f"DBO needs vLLM >= 0.11; vLLM {spec.vllm.version} lacks --enable-dbo.")
            if is_cpu:
                _fail(f"{fp}.dbo.enabled", "DBO is forced off on the CPU backend. Valid: false.")
            if backend not in vt.dbo_backends:
                _fail(
                    f"{fp}.dbo.enabled",
                    f"DBO on CUDA needs all2all backend in {list(vt.dbo_backends)}; this role uses {backend!r}.",
                )
        if mode == "multiport":
            if dp_local < 2 or dp_size < 2:
                _fail(
                    "serving.dp_mode",
                    f"'multiport' needs at least 2 DP ranks per node; role {role.name!r} has {dp_local}. Valid: "
                    "external, hybrid, internal.",
                )

        # ---- experts ----
        E, R = arch.routed_experts, role.eplb.redundant_experts
        physical = E + R
        if role.expert_parallel and physical % ep_size:
            divisors = [d for d in range(1, E + 1) if E % d == 0 and d <= len(nodes) * spec.cluster.gpus_per_node]
            hint = f"an EP size (DP x TP) that divides {E} experts: {divisors}"
            if vt.redundant_experts_even_the_split and not is_cpu:
                hint += f"; or eplb.enabled with redundant_experts in {_valid_redundant(E, ep_size)} for EP={ep_size}"
            _fail(
                f"{fp}.eplb.redundant_experts" if R else f"{fp}.nodes",
                f"{E} routed + {R} redundant experts = {physical} do not divide over EP={ep_size} "
                f"(DP {dp_size} x TP {role.tp}); vLLM requires an even split. Valid: {hint}.",
            )
        experts_per_gpu = physical // ep_size if role.expert_parallel else physical
        slots = expert_slots(E, R)

        # ---- lengths ----
        max_model_len = role.max_model_len or min(arch.max_position_embeddings, 32768)
        if max_model_len > arch.max_position_embeddings:
            warnings.append(
                f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                f"{arch.max_position_embeddings}; vLLM needs VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 for that."
            )
        mnbt = role.max_num_batched_tokens or (max(role.max_num_seqs, 256) if role.kind == "decode" else 8192)
        if mnbt < role.max_num_seqs:
            _fail(
                f"{fp}.max_num_batched_tokens",
                f"{mnbt} is below max_num_seqs={role.max_num_seqs}; vLLM requires max_num_batched_tokens >= "
                "max_num_seqs.",
            )
        context_len = role.context_len or max_model_len

        # ---- memory ----
        role_kv_dtype = kv_dtype_of(spec, role)
        cuda_graphs = not role.enforce_eager and not (backend == "deepep_high_throughput" and dp_size > 1)
        fixed_kv = role.kv_cache_gib if role.kv_cache_gib is not None else (1.0 if is_cpu else None)
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
            fixed_kv_gib=fixed_kv,
        )
        used = mem.weights_gib + mem.all2all_buffer_gib + mem.activation_gib + mem.cuda_graph_gib + mem.overhead_gib
        if not is_cpu and (mem.kv_cache_gib <= 0 or used + (mem.kv_cache_gib if mem.fixed_kv else 0) > mem.budget_gib):
            more_nodes = _min_nodes_that_fit(spec, role, arch, gpu, weight_dtype)
            _fail(
                f"{fp}.gpu_memory_utilization",
                f"role {role.name!r} does not fit in {gpu.name} memory: budget {mem.budget_gib:.1f} GiB "
                f"({role.gpu_memory_utilization} x {mem.total_gib:.1f}) but weights need {mem.weights_gib:.1f} GiB "
                f"({mem.non_expert_weights_gib:.1f} non-expert + {mem.expert_weights_gib:.1f} experts), all2all "
                "buffers "
                f"{mem.all2all_buffer_gib:.1f}, activations {mem.activation_gib:.1f}, CUDA graphs "
                f"{mem.cuda_graph_gib:.1f}, "
                f"runtime {mem.overhead_gib:.1f} GiB"
                + (f", and a fixed KV cache of {mem.kv_cache_gib:.1f} GiB" if mem.fixed_kv else "")
                + f". Valid: more GPUs per group ({more_nodes}), FP8 weights, a smaller max_num_batched_tokens, "
                "or a higher gpu_memory_utilization.",
            )
        if mem.kv_tokens < max_model_len:
            _fail(
                f"{fp}.max_model_len",
                f"max_model_len={max_model_len} but each rank's KV cache holds only {mem.kv_tokens} tokens "
                f"({mem.kv_cache_gib:.2f} GiB at {mem.kv_bytes_per_token:.0f} B/token); vLLM refuses to start. "
                f"Valid: max_model_len <= {mem.kv_tokens}, or more KV memory.",
            )
        if not is_cpu and mem.kv_cache_gib < 0.1 * mem.budget_gib:
            warnings.append(
                f"memory is tight: only {mem.kv_cache_gib:.1f} GiB ({100 * mem.kv_cache_gib / mem.budget_gib:.0f}% of "
                "the "
                "budget) is left for the KV cache."
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
            warnings.append(
                "DeepEP across nodes without RDMA (cluster.network.rdma: false) will not initialise NVSHMEM."
            )
        if role.eplb.enabled and R == 0:
            warnings.append("EPLB is on with 0 redundant experts: it can only move experts, not replicate hot ones.")

        # ---- ports ----
        http_port = role.port or spec.serving.port
        rpc_port = role.rpc_port or spec.serving.rpc_port
        control_port = spec.serving.control_port + ri
        side_base = (role.nixl_side_channel_port or spec.serving.nixl_side_channel_port) if spec.disaggregated else None
        side_field = f"{fp}.nixl_side_channel_port" if role.nixl_side_channel_port else "serving.nixl_side_channel_port"
        ranks: list[Rank] = []
        for g, group in enumerate(groups):
            claim_port(group[0], rpc_port, f"{role.name} DP handshake (rpc_port)", f"{fp}.rpc_port")
            claim_port(group[0], control_port, f"{role.name} widep group control", "serving.control_port")
            for gn, node in enumerate(group):
                if mode == "multiport":
                    claim_port(
                        node, spec.serving.supervisor_port, f"{role.name} DP supervisor", "serving.supervisor_port"
                    )
                for lr in range(dp_local):
                    dp_rank = gn * dp_local + lr
                    first = role.first_gpu + lr * role.tp
                    gpus = tuple(range(first, first + role.tp))
                    for gid in gpus:
                        key = (node, gid)
                        if key in gpu_owner:
                            _fail(
                                f"{fp}.first_gpu",
                                f"GPU {gid} of node {nodes[node].name} is given to both {gpu_owner[key]} and "
                                f"{role.name}. "
                                "Give roles disjoint nodes or GPU ranges (first_gpu, gpus_per_node).",
                            )
                        gpu_owner[key] = f"{role.name} rank {dp_rank}"
                    if mode in ("external", "multiport"):
                        port: int | None = http_port + lr
                    elif mode == "hybrid":
                        port = http_port
                    else:
                        port = http_port if gn == 0 else None
                    if port is not None:
                        claim_port(
                            node,
                            port,
                            f"{role.name} HTTP" + (f" rank {dp_rank}" if mode in ("external", "multiport") else ""),
                            f"{fp}.port",
                        )
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
                        claim_port(
                            node, side, f"{role.name} NIXL side channel rank {dp_rank} ({side_field})", side_field
                        )
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
        roles.append(
            RolePlan(
                spec=role,
                index=ri,
                dp_size=dp_size,
                ep_size=ep_size,
                tp_size=role.tp,
                dp_local=dp_local,
                nodes_per_group=per_group,
                group_nodes=groups,
                ranks=tuple(ranks),
                all2all_backend=backend,
                max_model_len=max_model_len,
                max_num_batched_tokens=mnbt,
                physical_experts=physical,
                experts_per_gpu=experts_per_gpu,
                memory=mem,
                rpc_port=rpc_port,
                http_port=http_port,
                control_port=control_port,
                warnings=tuple(warnings),
                kv_dtype=role_kv_dtype,
                nixl_side_channel_port=side_base,
            )
        )
    router = None
    rs = spec.router
    if rs.enabled:
        if isinstance(rs.node, int):
            if not 0 <= rs.node < len(nodes):
                _fail("router.node", f"node index {rs.node} is out of range. Valid: 0..{len(nodes) - 1}.")
            rnode = rs.node
        else:
            if rs.node not in node_index:
                _fail(
                    "router.node",
                    f"no node named {rs.node!r}.{did_you_mean(rs.node, list(node_index))} Valid: "
                    f"{', '.join(node_index)}.",
                )
            rnode = node_index[rs.node]
        pd = rs.pd == "on" or (rs.pd == "auto" and {r.kind for r in roles} >= {"prefill", "decode"})
        if pd and not {r.kind for r in roles} >= {"prefill", "decode"}:
            _fail("router.pd", "'on' needs a prefill and a decode role in this topology. Valid: auto, off.")
        claim_port(rnode, rs.port, "router", "router.port")
        claim_port(rnode, rs.prometheus_port, "router metrics", "router.prometheus_port")
        router = RouterPlan(node=rnode, port=rs.port, prometheus_port=rs.prometheus_port, pd=pd)
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
    # The renderer's checks (extra_args / extra_env against what widep sets), so that `plan` refuses what
    # `render`, `lws` and `launch` refuse.
    from widep.render.vllm import check_extras

    check_extras(result)
    return result


def _min_nodes_that_fit(spec: TopologySpec, role: RoleSpec, arch: MoEArch, gpu: GPUSpec, dtype: str) -> str:
    """A hint: the smallest GPU count per group whose weights fit, or why none does."""
    gpn = role.gpus_per_node or spec.cluster.gpus_per_node
    for n in range(1, 65):
        ep = n * gpn
        if role.expert_parallel and (arch.routed_experts + role.eplb.redundant_experts) % ep:
            continue
        mem = memory_budget(
            arch=arch,
            gpu=gpu,
            weight_dtype=dtype,
            kv_dtype="bf16",
            tp=role.tp,
            dp_size=ep // role.tp,
            ep_size=ep,
            experts_per_gpu=(arch.routed_experts + role.eplb.redundant_experts) / ep,
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
