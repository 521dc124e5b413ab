"""``widep doctor``: node preflight before a long start.

:func:`gather_host_facts` looks at the host once (the only side effects); :func:`run_checks` judges
the facts against :class:`DoctorRequirements` with pure functions; :func:`summarize` turns the rows
into an exit code. :func:`requirements_from_plan` says what one node of a planned topology needs,
and ``widep launch`` calls :func:`check_host` to run the same checks first. The package is split along its seams:
:mod:`~widep.doctor.facts` (plain data, pure parsers), :mod:`~widep.doctor.gather` (the only side effects),
:mod:`~widep.doctor.checks` (pure judgements).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from widep.doctor.checks import run_checks, summarize
from widep.doctor.facts import (
    ALL2ALL_BACKEND_MODULES,
    CPU_EP_PLUGIN_MODULE,
    DEEP_GEMM_MODULE,
    NIXL_CONNECTOR_MODULE,
    NVSHMEM_BACKENDS,
    CheckResult,
    DoctorRequirements,
    GiB,
    HostFacts,
    MiB,
)
from widep.doctor.gather import gather_host_facts
from widep.errors import UserError

if TYPE_CHECKING:
    from widep.plan import DeploymentPlan

# /dev/shm: llm-d sizes it "roughly 32MB per local DP plus scratch space" and settled on 2 GiB for
# 8 local ranks ("for NCCL 2.27 to be safe"); 1 GiB + 128 MiB per local rank gives that 2 GiB.
SHM_BASE_BYTES = GiB
SHM_PER_RANK_BYTES = 128 * MiB


def requirements_from_plan(plan: DeploymentPlan, node: int) -> DoctorRequirements:
    """What node ``node`` (index into ``plan.nodes``) must provide for its ranks. Pure.

    * GPUs: enough for the highest GPU id a rank there uses, of the planned kind and memory.
    * Modules: what each role's all2all backend imports, deep_gemm for FP8 weights with
      ``deep_gemm: true``, nixl for P/D (NixlConnector).
    * RDMA, unlimited memlock and NVSHMEM checks when an NVSHMEM backend spans nodes or KV moves
      between P/D groups and ``cluster.network.rdma`` is on.
    * Ports, on the address the renderer binds them to: each rank's HTTP port on ``serving.host``
      (the node's address for ``host: node``); the DP handshake (rpc) port on group leaders and
      NIXL side-channel ports on the node's address (all addresses when the node has none); widep's
      group-control port on group leaders; the DP supervisor port on all addresses.
    * The model's location and an estimate of its size on disk.
    """
    from widep.plan.memory import weight_bytes

    if not 0 <= node < len(plan.nodes):
        names = ", ".join(f"{i} ({n.name})" for i, n in enumerate(plan.nodes))
        raise UserError(f"--node: Given: {node}. Valid for topology {plan.name}: {names}.")
    spec = plan.spec
    cuda = plan.device == "cuda"
    any_host = "0.0.0.0"
    node_host = plan.nodes[node].address or any_host
    http_host = node_host if spec.serving.host == "node" else spec.serving.host
    # widep's group-control endpoint (run/bare_metal.py) binds all addresses only with host 0.0.0.0.
    control_host = any_host if spec.serving.host == "0.0.0.0" else node_host
    ranks = []
    ports: list[tuple[str, int]] = []
    modules: list[str] = []
    nvshmem = rdma_needed = False
    for role in plan.roles:
        here = [r for r in role.ranks if r.node == node]
        if not here:
            continue
        ranks.extend(here)
        backend = role.all2all_backend
        if not cuda and role.spec.expert_parallel and role.ep_size > 1:
            modules.append(CPU_EP_PLUGIN_MODULE)
        if cuda:
            modules.extend(ALL2ALL_BACKEND_MODULES.get(backend, ()))
            if role.spec.deep_gemm and plan.weight_dtype == "fp8":
                modules.append(DEEP_GEMM_MODULE)
            if spec.disaggregated:
                modules.append(NIXL_CONNECTOR_MODULE)
            if backend in NVSHMEM_BACKENDS:
                nvshmem = True
                if role.nodes_per_group > 1:
                    rdma_needed = True
            if spec.disaggregated:
                rdma_needed = True  # KV moves between P/D groups on different nodes (NIXL)
        elif spec.disaggregated:
            modules.append(NIXL_CONNECTOR_MODULE)  # NixlConnector on the CPU backend too (DRAM over UCX)
        for r in here:
            if r.port is not None:
                ports.append((http_host, r.port))
            if r.side_channel_port is not None:
                ports.append((node_host, r.side_channel_port))  # one per engine, all its TP workers
        for group in role.group_nodes:
            if group[0] == node:
                ports.append((node_host, role.rpc_port))
                ports.append((control_host, role.control_port))
            if spec.serving.dp_mode == "multiport" and node in group:
                ports.append((any_host, spec.serving.supervisor_port))
    router = getattr(plan, "router", None)
    if router is not None and router.node == node:
        rhost = node_host if spec.router.host == "node" else spec.router.host
        ports.extend([(rhost, router.port), (rhost, router.prometheus_port)])
    if not ranks and not (router is not None and router.node == node):
        used = sorted({r.node for role in plan.roles for r in role.ranks})
        raise UserError(
            f"--node: Given: {node} ({plan.nodes[node].name}), which runs no rank of topology {plan.name}. "
            f"Valid: {', '.join(f'{i} ({plan.nodes[i].name})' for i in used)}."
        )
    rdma_needed = rdma_needed and spec.cluster.network.rdma
    slots = sum(len(r.gpus) for r in ranks)
    arch = plan.arch
    model_path = spec.model.path or (None if arch.builtin else arch.hf_id)
    model_bytes = int(sum(weight_bytes(arch, plan.weight_dtype, 1, arch.routed_experts))) if model_path else None
    memory_min = None
    if not cuda:
        memory_min = int(
            sum(
                (role.memory.weights_gib + role.memory.kv_cache_gib) * GiB
                for role in plan.roles
                for r in role.ranks
                if r.node == node
            )
        )
    local_ranks = len(ranks)
    return DoctorRequirements(
        gpus_needed=max((g for r in ranks for g in r.gpus), default=-1) + 1 if cuda else 0,
        gpu_kind=plan.gpu.name if cuda else None,
        gpu_memory_bytes=int(plan.gpu.memory_gib * GiB) if cuda else None,
        vllm_version=spec.vllm.version,
        needed_modules=tuple(modules),
        ports=tuple(ports),
        interfaces=(spec.cluster.network.interface,) if spec.cluster.network.interface else (),
        rdma=rdma_needed,
        model_path=model_path,
        model_bytes=model_bytes,
        shm_bytes_min=SHM_BASE_BYTES + SHM_PER_RANK_BYTES * local_ranks,
        memlock_unlimited_needed=rdma_needed,
        device="cuda" if cuda else "cpu",
        nvshmem=nvshmem,
        cpu_ranks=0 if cuda else min(slots, spec.cluster.cpu_cores or slots),
        memory_bytes_min=memory_min,
        source=f"topology {plan.name}, node {node} ({plan.nodes[node].name}), {local_ranks} rank(s)",
    )


def check_host(req: DoctorRequirements, **gather_kwargs: object) -> tuple[list[CheckResult], HostFacts]:
    """Gather this host's facts and check them: ``(results, facts)``; ``summarize(results)`` is the verdict."""
    facts = gather_host_facts(req, **gather_kwargs)  # type: ignore[arg-type]
    return run_checks(req, facts), facts


__all__ = [
    "CheckResult",
    "DoctorRequirements",
    "HostFacts",
    "gather_host_facts",
    "check_host",
    "requirements_from_plan",
    "run_checks",
    "summarize",
]
