"""The planner's rules, one named function each, over plain values: the one copy that both :func:`widep.plan.plan`
and the sweep's fast path (:func:`widep.perf.enumerate.check`) apply.

Each rule returns None when the values pass, else a :class:`Refusal`: the field it names (relative to the role,
``roles[i].`` being the caller's, unless ``top``), the planner's message, the sweep's category and its one-line
reason. The planner raises ``UserError(f"{field}: {message}")``; the sweep records the category and the brief.
No pydantic here: the callers read the values off a ``TopologySpec`` or a sweep candidate. Adding a rule: write it
here, call it from ``plan/core.py`` and, when a sweep candidate can break it, from ``perf/enumerate.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from widep.plan.memory import MemoryBudget


@dataclass(frozen=True)
class Refusal:
    """Why a topology cannot run, as the planner says it and as the sweep records it."""

    field: str
    """The field at fault, relative to the role (``eplb.enabled``) unless ``top`` (``serving.dp_mode``)."""
    message: str
    """The planner's message: the value given and what is valid."""
    category: str = "config"
    """The sweep's class of reason: 'config', 'divisibility', 'memory' or 'kv_cache'."""
    brief: str = ""
    """The sweep's one-line reason ('' = the message)."""
    top: bool = False
    """``field`` is a top-level field of the topology, not one of the role."""

    def at(self, role_field: str) -> str:
        """The full field path, given the role's (``roles[2]``)."""
        return self.field if self.top else f"{role_field}.{self.field}"

    @property
    def reason(self) -> str:
        return self.brief or self.message


# ---- topology-wide ----


def weight_dtype_on_cpu(is_cpu: bool, weight_dtype: str) -> Refusal | None:
    if is_cpu and weight_dtype not in ("bf16", "fp16"):
        return Refusal(
            "model.weight_dtype",
            f"{weight_dtype!r} on the CPU backend: widep's CPU topologies serve 16-bit weights. Valid: bf16, fp16.",
            top=True,
        )
    return None


def multiport_supported(mode: str, has_multi_port_lb: bool, version: str, first_version: str) -> Refusal | None:
    if mode == "multiport" and not has_multi_port_lb:
        return Refusal(
            "serving.dp_mode",
            f"'multiport' needs vLLM >= {first_version} (the DP supervisor); "
            f"vLLM {version} lacks it. Valid: external, hybrid, internal.",
            top=True,
        )
    return None


# ---- a role's GPUs and TP ----


def first_gpu_exists(first_gpu: int, cluster_gpn: int) -> Refusal | None:
    if first_gpu >= cluster_gpn:
        return Refusal(
            "first_gpu",
            f"GPU index {first_gpu} does not exist: nodes have {cluster_gpn} GPUs "
            f"(cluster.gpus_per_node). Valid: 0..{cluster_gpn - 1}.",
        )
    return None


def gpus_fit_node(first_gpu: int, gpn: int, cluster_gpn: int) -> Refusal | None:
    if first_gpu + gpn > cluster_gpn:
        return Refusal(
            "gpus_per_node",
            f"GPUs {first_gpu}..{first_gpu + gpn - 1} per node, but nodes have {cluster_gpn} "
            f"(cluster.gpus_per_node). Valid: first_gpu + gpus_per_node <= {cluster_gpn}.",
        )
    return None


def tp_divides_node(tp: int, gpn: int) -> Refusal | None:
    if gpn % tp:
        valid = [t for t in range(1, gpn + 1) if gpn % t == 0]
        return Refusal("tp", f"tp={tp} does not divide the {gpn} GPUs per node of this role. Valid: {valid}.")
    return None


def _heads_split(t: int, num_heads: int, kv: int, mla: bool) -> bool:
    return num_heads % t == 0 and (mla or (kv % t == 0 if t <= kv else t % kv == 0))


def tp_splits_heads(tp: int, gpn: int, model: str, num_heads: int, num_kv_heads: int, mla: bool) -> Refusal | None:
    """vLLM shards attention heads over TP: the heads must split evenly (and KV heads split or replicate evenly)."""
    if _heads_split(tp, num_heads, num_kv_heads, mla):
        return None
    valid = [t for t in range(1, gpn + 1) if gpn % t == 0 and _heads_split(t, num_heads, num_kv_heads, mla)]
    return Refusal(
        "tp",
        f"tp={tp} does not split {model}'s {num_heads} attention heads "
        f"({num_kv_heads} KV heads) evenly; vLLM refuses it. Valid: {valid}.",
    )


# ---- a role's all2all backend and features ----


def backend_runs(
    backend: str, version: str, line: str, backends: Sequence[str], removed: Mapping[str, str]
) -> Refusal | None:
    """The all2all backend is one this vLLM version really runs."""
    if backend in backends:
        return None
    why = removed.get(backend, "unknown to this version")
    return Refusal(
        "all2all_backend",
        f"all2all backend {backend!r} with vLLM {version}: {why}. Valid for vLLM {line}: {', '.join(backends)}.",
        brief=f"all2all backend {backend!r} is not run by vLLM {version}",
    )


def backend_on_cpu(is_cpu: bool, backend: str) -> Refusal | None:
    if is_cpu and backend != "allgather_reducescatter":
        return Refusal(
            "all2all_backend",
            f"{backend!r} on the CPU backend: vLLM's CPU communicator implements only allgather_reducescatter and "
            "silently falls back to it. Valid: allgather_reducescatter.",
        )
    return None


def eplb_possible(enabled: bool, is_cpu: bool, expert_parallel: bool, ep: int) -> Refusal | None:
    if not enabled:
        return None
    brief = f"EPLB needs CUDA and EP > 1 (EP={ep})"
    if is_cpu:
        return Refusal(
            "eplb.enabled",
            "EPLB needs CUDA, ROCm or XPU; vLLM refuses it on the CPU backend. Valid: false.",
            brief=brief,
        )
    if not expert_parallel:
        return Refusal(
            "eplb.enabled",
            "EPLB needs expert parallel (roles[].expert_parallel: true). Given: expert_parallel=false.",
            brief="EPLB needs expert parallel",
        )
    if ep <= 1:
        return Refusal("eplb.enabled", f"EPLB needs EP > 1; this role has EP={ep}.", brief=brief)
    return None


def redundant_needs_eplb(redundant: int, eplb: bool) -> Refusal | None:
    if redundant and not eplb:
        return Refusal(
            "eplb.redundant_experts",
            f"{redundant} redundant experts without EPLB: vLLM rejects this. Valid: set eplb.enabled: true, or 0.",
            brief="redundant experts need EPLB",
        )
    return None


def dbo_possible(
    enabled: bool, has_dbo: bool, version: str, is_cpu: bool, backend: str, dbo_backends: Sequence[str]
) -> Refusal | None:
    if not enabled:
        return None
    brief = f"DBO needs one of {list(dbo_backends)}; given {backend!r}"
    if not has_dbo:
        return Refusal("dbo.enabled", f"DBO needs vLLM >= 0.11; vLLM {version} lacks --enable-dbo.", brief=brief)
    if is_cpu:
        return Refusal("dbo.enabled", "DBO is forced off on the CPU backend. Valid: false.", brief=brief)
    if backend not in dbo_backends:
        return Refusal(
            "dbo.enabled",
            f"DBO on CUDA needs all2all backend in {list(dbo_backends)} (vLLM {version}); this role uses {backend!r}. "
            "Valid: one of those backends, or dbo.enabled: false.",
            brief=brief,
        )
    return None


def redundant_auto_supported(
    auto: bool, auto_ok: bool, version: str, E: int, ep: int, first_version: str
) -> Refusal | None:
    """eplb.redundant_experts: 'auto' needs a vLLM that computes the count itself (EPLBConfig default None)."""
    if auto and not auto_ok:
        counts = ", ".join(str(r) for r in valid_redundant(E, ep, 3))
        return Refusal(
            "eplb.redundant_experts",
            f"'auto' with vLLM {version}: only vLLM >= {first_version} picks the redundant experts itself "
            f"(EPLBConfig.num_redundant_experts unset); vLLM {version} defaults to 0. Valid: a count that makes {E} "
            f"routed experts divide over EP={ep} ({counts}, ...), or vllm.version {first_version}.",
            brief=f"redundant_experts 'auto' needs vLLM >= {first_version}",
        )
    return None


def fault_tolerance_possible(
    enabled: bool,
    on_fault: str,
    version: str,
    mode: str,
    instructions: Sequence[str] | None,
    newest_instructions: Sequence[str],
    newest_version: str,
) -> Refusal | None:
    """--enable-fault-tolerance: a version that has it (``instructions`` None: not read there), per-rank API servers
    (vLLM refuses it without external LB and with more than one API server), and an instruction that version's
    recovery API accepts."""
    if not enabled:
        return None
    if instructions is None:
        return Refusal(
            "fault_tolerance.enabled",
            f"vLLM {version}: widep renders --enable-fault-tolerance for vLLM 0.20-0.39 only (read in the 0.32, 0.33 "
            "and 0.34 wheels). Valid: false, or vllm.version 0.32.0 or newer.",
            brief=f"fault tolerance is not rendered for vLLM {version}",
        )
    if mode != "external":
        return Refusal(
            "fault_tolerance.enabled",
            f"with serving.dp_mode {mode!r}: vLLM {version} refuses fault tolerance unless every DP rank has its own "
            "API server ('Fault tolerance requires external load balancer mode', engine/arg_utils.py) and one API "
            "server process. Valid: serving.dp_mode external, or fault_tolerance.enabled false.",
            brief="fault tolerance needs dp_mode external",
        )
    if on_fault not in instructions:
        return Refusal(
            "fault_tolerance.on_fault",
            f"{on_fault!r} with vLLM {version}: its recovery API accepts only {list(instructions)}"
            + (f"; {on_fault!r} came with vLLM {newest_version}" if on_fault in newest_instructions else "")
            + f". Valid: {', '.join(instructions)}"
            + (f", or vllm.version {newest_version}." if on_fault in newest_instructions else "."),
            brief=f"fault tolerance instruction {on_fault!r} is not in vLLM {version}",
        )
    return None


def elastic_ep_possible(
    enabled: bool,
    has_elastic: bool,
    external_ok: bool,
    version: str,
    mode: str,
    eplb: bool,
    max_dp_size: int | None,
    dp_size: int,
    external_from: str,
) -> Refusal | None:
    """--enable-elastic-ep: the rules of ParallelConfig (config/parallel.py) for this version."""
    if not enabled:
        return None
    if not has_elastic:
        return Refusal(
            "elastic_ep.enabled",
            f"vLLM {version}: widep renders --enable-elastic-ep for vLLM 0.20-0.39 only (read in the 0.32, 0.33 and "
            "0.34 wheels). Valid: false, or vllm.version 0.32.0 or newer.",
            brief=f"elastic EP is not rendered for vLLM {version}",
        )
    if not eplb:
        return Refusal(
            "elastic_ep.enabled",
            f"elastic EP without EPLB: vLLM {version} raises 'Elastic EP is only supported with enable_eplb=True'. "
            "Valid: eplb.enabled true, or elastic_ep.enabled false.",
            brief="elastic EP needs EPLB",
        )
    if mode == "hybrid":
        return Refusal(
            "serving.dp_mode",
            f"'hybrid' with elastic EP: vLLM {version} refuses elastic EP with hybrid load balancing. Valid: internal"
            + (", external, multiport." if external_ok else "."),
            brief="elastic EP does not run with dp_mode hybrid",
            top=True,
        )
    if mode in ("external", "multiport") and not external_ok:
        return Refusal(
            "serving.dp_mode",
            f"{mode!r} with elastic EP: vLLM {version} raises NotImplementedError for elastic EP behind per-rank API "
            f"servers (external LB); its external-LB mode came with vLLM {external_from}. Valid: internal (one API "
            f"server coordinates the scaling), or vllm.version {external_from}.",
            brief=f"elastic EP behind per-rank API servers needs vLLM >= {external_from}",
            top=True,
        )
    if max_dp_size is not None and max_dp_size < dp_size:
        return Refusal(
            "elastic_ep.max_dp_size",
            f"{max_dp_size} is below the group's DP size {dp_size}; vLLM refuses it. Valid: >= {dp_size}.",
            brief=f"elastic_ep.max_dp_size {max_dp_size} < DP {dp_size}",
        )
    return None


def multiport_ranks(mode: str, dp_local: int, dp_size: int, role: str) -> Refusal | None:
    if mode == "multiport" and (dp_local < 2 or dp_size < 2):
        return Refusal(
            "serving.dp_mode",
            f"'multiport' needs at least 2 DP ranks per node; role {role!r} has {dp_local}. Valid: "
            "external, hybrid, internal.",
            top=True,
        )
    return None


# ---- experts, batch and memory ----


def valid_redundant(E: int, ep: int, limit: int = 4) -> list[int]:
    """The first ``limit`` redundant-expert counts that make E + R divide by EP."""
    out: list[int] = []
    r = 0
    while len(out) < limit and r <= 1023:
        if (E + r) % ep == 0:
            out.append(r)
        r += 1
    return out


def experts_divide(
    E: int, R: int, ep: int, dp: int, tp: int, expert_parallel: bool, max_gpus: int, redundant_hint: bool
) -> Refusal | None:
    """Routed + redundant experts split evenly over EP (vLLM requires it). ``max_gpus``: the cluster's GPUs (the
    hint lists EP sizes up to it); ``redundant_hint``: suggest redundant experts too (GPU lines that even the
    split with them)."""
    physical = E + R
    if not expert_parallel or physical % ep == 0:
        return None
    divisors = [d for d in range(1, E + 1) if E % d == 0 and d <= max_gpus]
    hint = f"an EP size (DP x TP) that divides {E} experts: {divisors}"
    if redundant_hint:
        hint += f"; or eplb.enabled with redundant_experts in {valid_redundant(E, ep)} for EP={ep}"
    return Refusal(
        "eplb.redundant_experts" if R else "nodes",
        f"{E} routed + {R} redundant experts = {physical} do not divide over EP={ep} "
        f"(DP {dp} x TP {tp}); vLLM requires an even split. Valid: {hint}.",
        category="divisibility",
        brief=f"{E} routed + {R} redundant experts = {physical} do not divide over EP={ep}",
    )


def batched_tokens_cover_seqs(max_num_batched_tokens: int, max_num_seqs: int) -> Refusal | None:
    if max_num_batched_tokens < max_num_seqs:
        return Refusal(
            "max_num_batched_tokens",
            f"{max_num_batched_tokens} is below max_num_seqs={max_num_seqs}; vLLM requires max_num_batched_tokens >= "
            "max_num_seqs.",
            brief=f"max_num_batched_tokens {max_num_batched_tokens} < max_num_seqs {max_num_seqs}",
        )
    return None


def memory_fits(
    mem: MemoryBudget, is_cpu: bool, role: str, gpu: str, gmu: float, more_gpus: Callable[[], str] | None = None
) -> Refusal | None:
    """Weights, all2all buffers, activations, CUDA graphs, runtime (and a fixed KV cache) fit the budget, with some
    KV cache left. ``more_gpus``: the planner's hint (how many GPUs per group would fit), called only on refusal."""
    used = mem.weights_gib + mem.all2all_buffer_gib + mem.activation_gib + mem.cuda_graph_gib + mem.overhead_gib
    if is_cpu or (mem.kv_cache_gib > 0 and used + (mem.kv_cache_gib if mem.fixed_kv else 0) <= mem.budget_gib):
        return None
    hint = f"more GPUs per group ({more_gpus()})" if more_gpus else "more GPUs per group"
    return Refusal(
        "gpu_memory_utilization",
        f"role {role!r} does not fit in {gpu} memory: budget {mem.budget_gib:.1f} GiB "
        f"({gmu} x {mem.total_gib:.1f}) but weights need {mem.weights_gib:.1f} GiB "
        f"({mem.non_expert_weights_gib:.1f} non-expert + {mem.expert_weights_gib:.1f} experts), all2all buffers "
        f"{mem.all2all_buffer_gib:.1f}, activations {mem.activation_gib:.1f}, CUDA graphs {mem.cuda_graph_gib:.1f}, "
        f"runtime {mem.overhead_gib:.1f} GiB"
        + (f", and a fixed KV cache of {mem.kv_cache_gib:.1f} GiB" if mem.fixed_kv else "")
        + f". Valid: {hint}, FP8 weights, a smaller max_num_batched_tokens, or a higher gpu_memory_utilization.",
        category="memory",
        brief=f"needs {used:.1f} GiB before any KV cache ({mem.weights_gib:.1f} weights) but the budget is "
        f"{mem.budget_gib:.1f} GiB",
    )


def kv_holds_context(mem: MemoryBudget, max_model_len: int) -> Refusal | None:
    if mem.kv_tokens < max_model_len:
        return Refusal(
            "max_model_len",
            f"max_model_len={max_model_len} but each rank's KV cache holds only {mem.kv_tokens} tokens "
            f"({mem.kv_cache_gib:.2f} GiB at {mem.kv_bytes_per_token:.0f} B/token); vLLM refuses to start. "
            f"Valid: max_model_len <= {mem.kv_tokens}, or more KV memory.",
            category="kv_cache",
            brief=f"KV cache holds {mem.kv_tokens} tokens per rank, below max_model_len {max_model_len}",
        )
    return None
