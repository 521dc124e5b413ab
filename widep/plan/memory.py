"""Per-GPU memory model: weights, all-to-all buffers, activations, CUDA graphs, and the KV cache left over.

Pure arithmetic on the architecture, the GPU kind and a role's parallel settings. Every constant a
person might want to tune is in :data:`MEMORY_CONSTANTS` with the reason for its value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from widep.spec.hardware import GPUSpec
from widep.spec.models import SCALE_BYTES, WEIGHT_BYTES, MoEArch

GIB = float(2**30)

MEMORY_CONSTANTS = {
    # CUDA context, NCCL communicators, allocator fragmentation: non-torch memory vLLM counts inside
    # the gpu-memory-utilization budget.
    "runtime_overhead_gib": 1.5,
    # CUDA-graph pools for decode batch sizes (vLLM's estimate for large MoE models is 0.5-2 GiB).
    "cuda_graph_gib": 1.0,
    # Activation peak of the profiling forward pass, bytes per token per hidden unit: residual, norms,
    # attention projections and their fp32 intermediates.
    "activation_bytes_per_token_hidden": 24.0,
    # MoE intermediate activations: gate+up output and SwiGLU result in bf16 per routed copy.
    "activation_bytes_per_token_expert_inter": 8.0,
    # DeepEP high-throughput: VLLM_DEEPEP_BUFFER_SIZE_MB (1024) for NVLink plus as much for RDMA.
    "deepep_ht_buffer_gib": 2.0,
    # KV block sizes: FlashMLA pages are 64 tokens; other attention backends use 16.
    "mla_block_tokens": 64,
    "block_tokens": 16,
}


@dataclass(frozen=True)
class MemoryBudget:
    """Where one GPU's memory goes, in GiB (2^30 bytes), and the KV capacity that results."""

    total_gib: float
    """Memory the GPU reports."""
    budget_gib: float
    """gpu_memory_utilization x total: what vLLM may use."""
    weights_gib: float
    non_expert_weights_gib: float
    """Attention, dense layers, shared experts, embeddings, norms, router (replicated over DP, split by TP)."""
    expert_weights_gib: float
    """The routed experts this GPU holds (including redundant replicas)."""
    all2all_buffer_gib: float
    """DeepEP/NVSHMEM (or all-gather) communication buffers."""
    activation_gib: float
    """Peak activations of a max_num_batched_tokens step, plus sampler logits."""
    cuda_graph_gib: float
    overhead_gib: float
    """CUDA context, NCCL, allocator fragmentation."""
    kv_cache_gib: float
    """What is left for the KV cache (or the fixed size the topology asks for)."""
    kv_bytes_per_token: float
    """KV bytes one GPU stores per token, all layers."""
    kv_tokens: int
    """Tokens of KV cache per GPU (= per DP rank)."""
    block_tokens: int
    context_len: int
    max_seqs_at_context: int
    """Concurrent sequences of ``context_len`` tokens the KV cache holds per DP rank."""
    fixed_kv: bool = False
    """True when the KV size was given (kv_cache_gib / CPU backend) rather than left over."""

    def as_dict(self) -> dict[str, float | int | bool]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _linear_bytes(dtype: str) -> float:
    return WEIGHT_BYTES[dtype] + SCALE_BYTES[dtype]


def weight_bytes(arch: MoEArch, dtype: str, tp: int, experts_per_gpu: float) -> tuple[float, float]:
    """(non-expert bytes, routed-expert bytes) on one GPU.

    FP8 checkpoints quantise every linear layer; MXFP4/INT4 ones only the routed experts (attention,
    shared experts, router, embeddings stay 16-bit). Embeddings/LM head are vocab-parallel over TP.
    """
    p = arch.params
    expert_b = _linear_bytes(dtype)
    dense_linear_b = _linear_bytes(dtype) if dtype == "fp8" else 2.0
    non_expert = (
        (p.attention + p.dense_mlp + p.shared_experts) * dense_linear_b / tp
        + p.embedding * 2.0 / tp
        + (p.norms + p.router) * 2.0
    )
    experts = experts_per_gpu * arch.num_moe_layers * p.routed_expert * expert_b
    return non_expert, experts


LL_BUFFER_CAP_GIB = 32.0
"""DeepEP low-latency buffer cap per GPU: past it the tokens per rank the buffer takes shrink to what fits."""
LL_BACKENDS = ("deepep_low_latency", "pplx", "nixl_ep", "mori_low_latency", "deepep_v2")
"""Backends whose receive buffer has a slot per (physical expert, token) pair."""


def ll_buffer(num_physical: int, hidden: int, tokens: int) -> tuple[float, int]:
    """(bytes, usable tokens per rank) of a low-latency buffer for ``num_physical`` expert slots (logical +
    redundant), with :data:`LL_BUFFER_CAP_GIB` applied."""
    per_token = 2.0 * (num_physical + 1) * (2 * hidden + 16)
    usable = min(tokens, int(LL_BUFFER_CAP_GIB * GIB // per_token))
    return per_token * usable, usable


def all2all_buffer_bytes(
    backend: str,
    arch: MoEArch,
    max_tokens_per_rank: int,
    dp_size: int,
    ep_size: int,
    physical_experts: int | None = None,
) -> float:
    """Bytes of communication buffers per GPU for an all2all backend.

    deepep_low_latency: DeepEP's low-latency layout holds, double-buffered, a receive slot per
    (physical expert, token) pair: 2 x (physical experts + 1) x max_tokens x (hidden x 2 bytes + 16 bytes header),
    where physical experts = logical + EPLB's redundant ones (default: the logical count), capped at
    LL_BUFFER_CAP_GIB (the tokens per rank it takes shrink instead). deepep_high_throughput: fixed NVLink + RDMA
    buffers. allgather_reducescatter: a gathered copy of every DP rank's hidden states (in and out).
    """
    if ep_size <= 1:
        return 0.0
    h = arch.hidden
    if backend in LL_BACKENDS:
        return ll_buffer(physical_experts or arch.routed_experts, h, max_tokens_per_rank)[0]
    if backend in ("deepep_high_throughput", "mori_high_throughput"):
        return MEMORY_CONSTANTS["deepep_ht_buffer_gib"] * GIB
    # allgather_reducescatter, naive, flashinfer: gathered hidden states of all DP ranks, in and out
    return 2.0 * max_tokens_per_rank * dp_size * h * 2


def block_tokens_for(arch: MoEArch) -> int:
    return int(MEMORY_CONSTANTS["mla_block_tokens"] if arch.mla else MEMORY_CONSTANTS["block_tokens"])


def seqs_at_context(kv_tokens: int, context_len: int, block: int) -> int:
    per_seq = math.ceil(context_len / block) * block
    return kv_tokens // per_seq if per_seq else 0


def memory_budget(
    *,
    arch: MoEArch,
    gpu: GPUSpec,
    weight_dtype: str,
    kv_dtype: str,
    tp: int,
    dp_size: int,
    ep_size: int,
    experts_per_gpu: float,
    backend: str,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    gpu_memory_utilization: float,
    cuda_graphs: bool,
    context_len: int,
    fixed_kv_gib: float | None = None,
) -> MemoryBudget:
    """The per-GPU memory budget of one rank of a role (pure)."""
    non_expert, experts = weight_bytes(arch, weight_dtype, tp, experts_per_gpu)
    a2a_tokens = (
        max_num_seqs
        if backend in ("deepep_low_latency", "pplx", "nixl_ep", "mori_low_latency")
        else max_num_batched_tokens
    )
    physical = round(experts_per_gpu * ep_size)  # logical + redundant expert slots of the EP group
    a2a = all2all_buffer_bytes(backend, arch, a2a_tokens, dp_size, ep_size, physical)
    act = (
        max_num_batched_tokens
        * (
            MEMORY_CONSTANTS["activation_bytes_per_token_hidden"] * arch.hidden
            + MEMORY_CONSTANTS["activation_bytes_per_token_expert_inter"] * arch.top_k * arch.moe_intermediate
        )
        + max_num_seqs * arch.vocab * 4.0
    )
    is_cpu = gpu.device == "cpu"
    graphs = MEMORY_CONSTANTS["cuda_graph_gib"] * GIB if (cuda_graphs and not is_cpu) else 0.0
    overhead = 0.0 if is_cpu else MEMORY_CONSTANTS["runtime_overhead_gib"] * GIB
    total = gpu.memory_gib * GIB
    budget = gpu_memory_utilization * total
    weights = non_expert + experts
    if fixed_kv_gib is not None:
        kv = fixed_kv_gib * GIB
    else:
        kv = budget - weights - a2a - act - graphs - overhead
    kv_per_token = arch.kv_bytes_per_token(tp, "fp8" if kv_dtype == "fp8" else "bf16")
    kv_tokens = int(max(kv, 0.0) // kv_per_token) if kv_per_token else 0
    block = block_tokens_for(arch)
    kv_tokens = (kv_tokens // block) * block
    return MemoryBudget(
        total_gib=total / GIB,
        budget_gib=budget / GIB,
        weights_gib=weights / GIB,
        non_expert_weights_gib=non_expert / GIB,
        expert_weights_gib=experts / GIB,
        all2all_buffer_gib=a2a / GIB,
        activation_gib=act / GIB,
        cuda_graph_gib=graphs / GIB,
        overhead_gib=overhead / GIB,
        kv_cache_gib=kv / GIB,
        kv_bytes_per_token=kv_per_token,
        kv_tokens=kv_tokens,
        block_tokens=block,
        context_len=context_len,
        max_seqs_at_context=seqs_at_context(kv_tokens, context_len, block),
        fixed_kv=fixed_kv_gib is not None,
    )
