"""The analytic step-time and serving model of wide-EP MoE inference (pure functions, numpy-vectorised).

One *step* is one forward pass of one DP rank (``tp`` GPUs) with ``d`` decode sequences (``q`` query
tokens each: 1 + speculative drafts) at mean KV length ``ctx_d``, plus ``p`` prefill tokens whose
attention spans ``ctx_p`` tokens on average. Its time, per GPU, is the sum of

* dense GEMMs (attention projections, dense FFN layers, shared experts, LM head): the replicated
  weights streamed from HBM once per micro-batch, against their FLOPs (rows padded to a GEMM tile);
* routed-expert GEMMs: only the local experts the batch activates (expected distinct experts under
  top-k routing, 1 - (1 - k/E_phys)^tokens), with the busiest rank's rows (routing imbalance: the
  maximum of EP Poisson loads plus a popularity skew that EPLB and redundant experts shrink);
* attention: MLA latent (or GQA) KV read from HBM against attention FLOPs that grow with context;
* elementwise activation traffic, TP all-reduces, kernel gaps (CUDA graphs or eager) and host work;
* expert all-to-all (dispatch + combine per MoE layer and micro-batch; bytes per backend, bandwidth
  from the DeepEP/pplx tables by EP size, NVLink inside a node and RDMA across nodes),

where each kernel's compute and memory times combine as a soft roofline (t_c^p + t_m^p)^(1/p) >=
max(t_c, t_m), and two micro-batches (DBO) hide ``dbo_overlap`` of min(compute, all-to-all) at the price of
reading the weights twice. Serving turns step times into per-user speed and TTFT at a concurrency: the
batch per rank is the concurrency per rank capped by max_num_seqs, the KV capacity and the token budget;
a mixed role pays for the prefill chunks that ride in every step, P/D pays the KV transfer over the NIC
and may be limited by its prefill group; closed-loop queueing (Little's law) adds the wait when the
concurrency exceeds what the deployment holds.

Every efficiency and kernel figure comes from a :class:`~widep.perf.calibration.Calibration`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from widep.errors import UserError
from widep.perf.calibration import Calibration
from widep.perf.kernels import gemm_seconds, serving_phase_bytes
from widep.plan.memory import SCALE_BYTES, WEIGHT_BYTES, block_tokens_for
from widep.spec.hardware import GPUSpec
from widep.spec.models import MoEArch

GB = 1e9

# Overlap schedules per engine (see step_time): 0 vLLM DBO (two micro-batches above the rendered token
# thresholds), 1 SGLang two-batch overlap (splits every batch of two or more sequences), 2 DeepSeek's
# decode five-stage pipeline (attention split in two: communication packs against all compute); DeepSeek's
# prefill runs two micro-batches with each all-to-all against one compute phase of the other, as TBO does
# (schedule 3; deepseek-ai/profile-data README: "two micro-batches to overlap computation and all-to-all").
ENGINES = {"vllm": 0, "sglang": 1, "deepseek": 2}
SCHEDULE_NAMES = ("vllm-dbo", "sglang-tbo", "deepseek-5stage", "deepseek-prefill-2mb")
HOPPER_SMS = 132.0

# Codes of what dominates a step and what caps the batch (arrays hold the index).
BOUND_NAMES = ("hbm", "compute", "all2all", "overhead")
LIMIT_NAMES = ("concurrency", "max_num_seqs", "kv_cache", "token_budget", "prefill")


@dataclass(frozen=True)
class Workload:
    """The traffic a prediction is for."""

    isl: int = 2000
    """Input (prompt) tokens per request."""
    osl: int = 2000
    """Output tokens per request."""
    prefix_hit: float = 0.0
    """Fraction of prompt tokens found in the prefix cache (not recomputed)."""
    spec_tokens: int | None = None
    """Draft tokens per step (MTP / speculative decoding); None: what each topology configures."""
    decode_context: float | None = None
    """Mean KV length of decoding sequences; default isl + osl / 2."""
    arrival: str = "wave"
    """Closed-loop traffic shape: 'wave' (fixed lengths, every user starts together: vllm bench / llm-d /
    widep bench) or 'steady' (arrivals spread out: a production mix)."""
    spec_acceptance: float | None = None
    """Chance that each further MTP draft token is accepted; None: the calibration's."""

    def __post_init__(self) -> None:
        if self.arrival not in ("wave", "steady"):
            raise UserError(f"arrival: {self.arrival!r} is not valid. Valid: wave, steady.")
        if self.spec_acceptance is not None and not 0.0 <= self.spec_acceptance <= 1.0:
            raise UserError(f"--mtp-acceptance must be in [0, 1]. Given: {self.spec_acceptance}.")
        if self.decode_context is not None and self.decode_context < 1:
            raise UserError(f"--decode-context must be >= 1. Given: {self.decode_context}.")
        if self.isl < 1 or self.osl < 1:
            raise UserError(f"--isl/--osl must be >= 1. Given: isl={self.isl}, osl={self.osl}.")
        if not 0.0 <= self.prefix_hit < 1.0:
            raise UserError(f"--prefix-hit must be in [0, 1). Given: {self.prefix_hit}.")

    @property
    def ctx_decode(self) -> float:
        return float(self.decode_context) if self.decode_context else self.isl + self.osl / 2.0

    @property
    def isl_computed(self) -> float:
        return self.isl * (1.0 - self.prefix_hit)

    @property
    def ctx_prefill(self) -> float:
        """Mean attention span of a computed prompt token: the cached prefix plus half the rest (causal)."""
        return self.isl * self.prefix_hit + self.isl_computed / 2.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "isl": self.isl,
            "osl": self.osl,
            "prefix_hit": self.prefix_hit,
            "spec_tokens": self.spec_tokens,
            "decode_context": self.ctx_decode,
            "arrival": self.arrival,
            "spec_acceptance": self.spec_acceptance,
        }

    def acceptance(self, cal: Calibration) -> float:
        return cal.spec_acceptance if self.spec_acceptance is None else float(self.spec_acceptance)


@dataclass(frozen=True)
class RoleInput:
    """One role's parallel layout and capacities: what the model needs from a plan or a sweep candidate."""

    kind: str
    gpu: GPUSpec
    tp: int
    dp: int
    ep: int
    replicas: int
    nodes: int
    """Nodes per DP group (> 1: the all-to-all crosses the network)."""
    expert_parallel: bool
    physical_experts: int
    redundant: int
    eplb: bool
    dbo: bool
    dbo_decode_threshold: int
    dbo_prefill_threshold: int
    backend: str
    cuda_graphs: bool
    max_num_batched_tokens: int
    max_num_seqs: int
    kv_tokens: int
    spec_tokens: int = 0
    engine: str = "vllm"
    """Whose overlap schedule: 'vllm' (DBO), 'sglang' (two-batch overlap) or 'deepseek' (decode 5-stage pipeline)."""
    balancer: str = "balanced"
    """How the front door (router or clients) places requests on API servers: 'balanced' (load-aware: a DP-aware
    router policy) or 'random' (random, consistent_hash, round_robin: blind to load)."""
    fabric: str = "infiniband"
    """cluster.network.fabric: 'infiniband' or 'roce' (scales the internode all-to-all and the KV transfer)."""
    dp_mode: str = "external"
    """serving.dp_mode: 'external' / 'multiport' (one API server per DP rank: the front door picks the rank),
    'hybrid' (one per node: vLLM's internal DP load balancer picks among the node's ranks) or 'internal' (one
    for the group: the internal balancer picks among all ranks)."""
    skew: float | None = None
    """Measured popularity skew of the busiest EP rank (max/mean - 1 of recorded expert load, ``widep experts``);
    None: the calibration's skew_no_eplb / skew_eplb terms."""

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.replicas

    @property
    def ranks(self) -> int:
        return self.dp * self.replicas


def spec_tokens_of(extra_args: Sequence[str]) -> int:
    """num_speculative_tokens from a role's ``--speculative-config`` extra argument (0 without one)."""
    import json

    args = list(extra_args)
    for i, a in enumerate(args):
        val = None
        if a.startswith("--speculative-config="):
            val = a.split("=", 1)[1]
        elif a in ("--speculative-config", "-sc") and i + 1 < len(args):
            val = args[i + 1]
        if val:
            try:
                return int(json.loads(val).get("num_speculative_tokens", 0))
            except (ValueError, AttributeError):
                raise UserError(
                    "roles[].extra_args: --speculative-config must be JSON with num_speculative_tokens. Given: "
                    f"{val!r}."
                ) from None
    return 0


RANDOM_POLICIES = ("random", "consistent_hash", "round_robin")
DP_MODES = ("external", "multiport", "hybrid", "internal")


def balancer_of(plan: Any) -> str:
    """'random' when the topology's router spreads requests without looking at load (random, consistent_hash,
    round_robin: in a closed loop round robin evens the arrivals, not the departures, so per-rank counts
    wander like Poisson ones), else 'balanced' (a load-aware router policy, or none: external LB assumes a
    DP-aware front door)."""
    router = getattr(getattr(plan, "spec", None), "router", None)
    policy = getattr(router, "policy", None) if router is not None and getattr(router, "enabled", True) else None
    return "random" if policy in RANDOM_POLICIES else "balanced"


def network_of(plan: Any) -> tuple[GPUSpec, str]:
    """The plan's GPU with its inter-node bandwidth per GPU from cluster.network (nics_per_node NICs at the
    catalog's per-NIC rate shared by the node's GPUs), and the fabric ('infiniband' or 'roce')."""
    gpu = plan.gpu
    cluster = getattr(getattr(plan, "spec", None), "cluster", None)
    net = getattr(cluster, "network", None)
    nics = getattr(net, "nics_per_node", None)
    if nics is not None and cluster is not None:
        from dataclasses import replace as _replace

        gpu = _replace(gpu, nic_gbps=gpu.nic_gbps * nics / max(cluster.gpus_per_node, 1))
    return gpu, getattr(net, "fabric", "infiniband")


def dp_mode_of(plan: Any) -> str:
    """The topology's serving.dp_mode ('external' when the plan has none)."""
    serving = getattr(getattr(plan, "spec", None), "serving", None)
    mode = getattr(serving, "dp_mode", "external")
    return mode if mode in DP_MODES else "external"


def role_input_from_plan(rp: Any, gpu: GPUSpec) -> RoleInput:
    """A :class:`RoleInput` from a planner ``RolePlan``."""
    s = rp.spec
    cuda_graphs = (
        not s.enforce_eager
        and not (rp.all2all_backend == "deepep_high_throughput" and rp.dp_size > 1)
        and gpu.device != "cpu"
    )
    return RoleInput(
        kind=rp.kind,
        gpu=gpu,
        tp=rp.tp_size,
        dp=rp.dp_size,
        ep=rp.ep_size,
        replicas=s.replicas,
        nodes=rp.nodes_per_group,
        expert_parallel=s.expert_parallel,
        physical_experts=rp.physical_experts,
        redundant=rp.redundant_experts,
        eplb=s.eplb.enabled,
        dbo=s.dbo.enabled,
        dbo_decode_threshold=s.dbo.decode_token_threshold,
        dbo_prefill_threshold=s.dbo.prefill_token_threshold,
        backend=rp.all2all_backend,
        cuda_graphs=cuda_graphs,
        max_num_batched_tokens=rp.max_num_batched_tokens,
        max_num_seqs=s.max_num_seqs,
        kv_tokens=rp.memory.kv_tokens,
        spec_tokens=spec_tokens_of(s.extra_args),
    )


# ---------------------------------------------------------------------------------------------------------
# Architecture constants


@dataclass(frozen=True)
class ArchConst:
    """Per-token figures of a model at a weight and KV precision (not yet divided by TP)."""

    name: str
    layers: int
    moe_layers: int
    full_layers: int
    window: float
    hidden: int
    experts: int
    top_k: int
    vocab: int
    heads: int
    dense_params: float
    """Attention + dense FFN + shared experts: the GEMM weights every token passes (sharded by TP)."""
    lm_params: float
    router_params: float
    expert_params: float
    """One routed expert of one layer."""
    dense_bytes_per_param: float
    expert_bytes_per_param: float
    dense_dtype: str
    expert_dtype: str
    kv_bytes_mla: float | None
    """KV bytes per token (all layers) for MLA (TP-independent); None for GQA."""
    kv_per_layer_gqa: tuple[float, float]
    """(num_kv_heads, head_dim x bytes x 2) for GQA KV per layer."""
    att_decode_flops: float
    """Attention FLOPs per query token per context token per layer, all heads (absorbed MLA / GQA)."""
    att_prefill_flops: float
    """Same for prefill (MLA not absorbed: qk 192 + v 128 per head)."""
    dispatch_bytes: float
    """Bytes of one dispatched token copy: FP8 hidden + fp32 scale per 128."""
    combine_bytes: float
    block_tokens: int

    @classmethod
    def of(cls, arch: MoEArch, weight_dtype: str, kv_dtype: str) -> ArchConst:
        p = arch.params
        lin = WEIGHT_BYTES[weight_dtype] + SCALE_BYTES[weight_dtype]
        dense_b = lin if weight_dtype == "fp8" else 2.0
        if arch.mla:
            dec = 2.0 * arch.num_heads * ((arch.kv_lora_rank + arch.qk_rope_head_dim) + arch.kv_lora_rank)
            pre = 2.0 * arch.num_heads * ((arch.qk_nope_head_dim + arch.qk_rope_head_dim) + arch.v_head_dim)
            kv_mla = arch.kv_bytes_per_token(1, "fp8" if kv_dtype == "fp8" else "bf16")
        else:
            dec = pre = 2.0 * arch.num_heads * 2 * arch.head_dim
            kv_mla = None
        kvb = 1.0 if kv_dtype == "fp8" else 2.0
        lm = arch.vocab * arch.hidden
        return cls(
            name=arch.name,
            layers=arch.num_layers,
            moe_layers=arch.num_moe_layers,
            full_layers=arch.full_attention_layers or arch.num_layers,
            window=float(arch.sliding_window or 0),
            hidden=arch.hidden,
            experts=arch.routed_experts,
            top_k=arch.top_k,
            vocab=arch.vocab,
            heads=arch.num_heads,
            dense_params=float(p.attention + p.dense_mlp + p.shared_experts),
            lm_params=float(lm),
            router_params=float(p.router),
            expert_params=float(p.routed_expert),
            dense_bytes_per_param=dense_b,
            expert_bytes_per_param=lin,
            dense_dtype="fp8" if weight_dtype == "fp8" else "bf16",
            expert_dtype=weight_dtype,
            kv_bytes_mla=kv_mla,
            kv_per_layer_gqa=(float(arch.num_kv_heads), 2.0 * arch.head_dim * kvb),
            att_decode_flops=dec,
            att_prefill_flops=pre,
            dispatch_bytes=arch.hidden + arch.hidden / 128.0 * 4.0,
            combine_bytes=arch.hidden * 2.0,
            block_tokens=block_tokens_for(arch),
        )

    def kv_bytes_per_token(self, tp: np.ndarray) -> np.ndarray:
        """KV bytes per token per GPU (MLA duplicates the latent on every TP rank; GQA splits KV heads)."""
        if self.kv_bytes_mla is not None:
            return np.full_like(tp, self.kv_bytes_mla, dtype=float)
        heads, per_head = self.kv_per_layer_gqa
        return np.maximum(1.0, heads / tp) * per_head * self.full_layers

    def ctx_layers(self, ctx: np.ndarray) -> np.ndarray:
        """Context tokens summed over layers (sliding-window layers see at most their window)."""
        slid = self.layers - self.full_layers
        if slid and self.window:
            return self.full_layers * ctx + slid * np.minimum(ctx, self.window)
        return self.layers * ctx


# ---------------------------------------------------------------------------------------------------------
# Role batches: struct of arrays, shape (N, 1) so loads of shape (N, K) broadcast


_BYTES_MODEL = {"expert_copy": 0, "rank_copy": 1, "gather": 2, "node_copy": 3}


@dataclass
class RoleBatch:
    """N roles as column arrays, with their per-GPU bytes and link bandwidths precomputed."""

    arch: ArchConst
    n: int
    a: dict[str, np.ndarray] = field(default_factory=dict)

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.__dict__["a"][name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def build(cls, arch: ArchConst, roles: Sequence[RoleInput], cal: Calibration) -> RoleBatch:
        n = len(roles)
        if cal.hardware:  # measured figures of a hardware kind replace its datasheet ones
            from dataclasses import replace as _replace

            roles = [_replace(r, gpu=cal.gpu_for(r.gpu)) for r in roles]

        def col(values: Any, dtype: Any = float) -> np.ndarray:
            return np.asarray(values, dtype=dtype).reshape(n, 1)

        a: dict[str, np.ndarray] = {}
        a["hbm"] = col([r.gpu.hbm_tbps * 1e12 for r in roles])
        a["sms"] = col([float(getattr(r.gpu, "sms", 132)) for r in roles])
        dense_peak = [(r.gpu.fp8_tflops if arch.dense_dtype == "fp8" else r.gpu.bf16_tflops) * 1e12 for r in roles]
        a["dense_peak"] = col(dense_peak)
        a["expert_peak"] = col([r.gpu.tflops(arch.expert_dtype) * 1e12 for r in roles])
        a["bf16_peak"] = col([r.gpu.bf16_tflops * 1e12 for r in roles])
        a["nvlink"] = col([r.gpu.nvlink_gbps * GB for r in roles])
        # KV transfer rides the same NICs: RoCE's bulk RDMA reads at their own efficiency
        a["nic"] = col([r.gpu.nic_gbps * GB * (cal.roce_kv_efficiency if r.fabric == "roce" else 1.0) for r in roles])
        for name in (
            "tp",
            "dp",
            "ep",
            "replicas",
            "nodes",
            "physical_experts",
            "redundant",
            "dbo_decode_threshold",
            "dbo_prefill_threshold",
            "max_num_batched_tokens",
            "max_num_seqs",
            "kv_tokens",
            "spec_tokens",
        ):
            a[name] = col([getattr(r, name) for r in roles])
        for name in ("expert_parallel", "eplb", "dbo", "cuda_graphs"):
            a[name] = col([getattr(r, name) for r in roles], bool)
        a["ranks"] = a["dp"] * a["replicas"]
        a["gpus"] = a["ranks"] * a["tp"]
        a["use_a2a"] = a["expert_parallel"] & (a["ep"] > 1)
        for r in roles:
            if r.engine not in ENGINES:
                raise UserError(f"engine: {r.engine!r} is not known. Valid: {', '.join(ENGINES)}.")
            if r.balancer not in ("balanced", "random"):
                raise UserError(f"balancer: {r.balancer!r} is not known. Valid: balanced, random.")
            if r.dp_mode not in DP_MODES:
                raise UserError(f"dp_mode: {r.dp_mode!r} is not known. Valid: {', '.join(DP_MODES)}.")
        a["schedule"] = col([ENGINES[r.engine] for r in roles])
        a["dp_coef"] = col(
            [cal.dp_imbalance_random if r.balancer == "random" else cal.dp_imbalance_balanced for r in roles]
        )
        # DP ranks behind one API server (its internal load balancer places among them; the front door among
        # servers): 1 in external / multiport mode, the ranks of a node in hybrid mode, the group in internal
        a["lb_ranks"] = col(
            [
                1.0
                if r.dp_mode in ("external", "multiport")
                else float(max(r.dp // max(r.nodes, 1), 1) if r.dp_mode == "hybrid" else r.dp)
                for r in roles
            ]
        )
        a["dp_internal"] = col([cal.dp_imbalance_internal for _ in roles])
        a["intranode"] = a["nodes"] <= 1
        # all-to-all figures per backend
        tables = {r.backend: cal.a2a_for(r.backend) for r in roles if r.expert_parallel and r.ep > 1}
        memo: dict[tuple[str, bool, int, float, float, str], tuple[float, float, float, float, float, float]] = {}

        def link(r: RoleInput) -> tuple[float, float, float, float, float, float]:
            k = (r.backend, r.nodes <= 1, r.ep, r.gpu.nvlink_gbps, r.gpu.nic_gbps, r.fabric)
            if k not in memo:
                t = tables.get(r.backend)
                if t is None:
                    memo[k] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
                    return memo[k]
                # NVLink leg at this GPU's NVLink (intranode table of the reference GPU, scaled)
                sc_nvl = r.gpu.nvlink_gbps / cal.ref_nvlink_gbps
                nvl_d = t.intranode_dispatch_gbps * GB * sc_nvl
                nvl_c = t.intranode_combine_gbps * GB * sc_nvl
                if r.nodes <= 1:
                    memo[k] = (t.latency_us * 1e-6, _BYTES_MODEL[t.bytes_model], nvl_d, nvl_c, nvl_d, nvl_c)
                else:
                    sc = r.gpu.nic_gbps / cal.ref_nic_gbps * (cal.roce_a2a_efficiency if r.fabric == "roce" else 1.0)
                    memo[k] = (
                        t.latency_us * 1e-6,
                        _BYTES_MODEL[t.bytes_model],
                        float(t.internode_gbps(r.ep, "dispatch")) * GB * sc,
                        float(t.internode_gbps(r.ep, "combine")) * GB * sc,
                        nvl_d,
                        nvl_c,
                    )
            return memo[k]

        links = np.asarray([link(r) for r in roles], float).reshape(n, 6)
        (a["a2a_lat"], a["a2a_model"], a["a2a_bw_d"], a["a2a_bw_c"], a["a2a_nvl_d"], a["a2a_nvl_c"]) = (
            links[:, i : i + 1] for i in range(6)
        )
        # per-GPU weight bytes read per micro-batch
        tp = a["tp"]
        a["dense_bytes"] = (
            arch.dense_params * arch.dense_bytes_per_param + arch.lm_params * 2.0
        ) / tp + arch.router_params * 2.0
        a["expert_frac"] = np.where(a["expert_parallel"], 1.0, 1.0 / tp)
        a["slots"] = np.where(a["expert_parallel"], a["physical_experts"] / a["ep"], a["physical_experts"])
        a["kv_bytes_tok"] = arch.kv_bytes_per_token(tp)
        a["skew"] = np.where(
            a["eplb"],
            cal.routing_skew_eplb * arch.experts / (arch.experts + cal.routing_redundant_relief * a["redundant"]),
            cal.routing_skew_no_eplb,
        )
        measured = [r.skew for r in roles]
        if any(m is not None for m in measured):
            a["skew"] = np.where(
                col([m is not None for m in measured], bool), col([m or 0.0 for m in measured]), a["skew"]
            )
        return cls(arch=arch, n=n, a=a)

    def take(self, idx: np.ndarray) -> RoleBatch:
        return RoleBatch(arch=self.arch, n=len(idx), a={k: v[idx] for k, v in self.a.items()})


# ---------------------------------------------------------------------------------------------------------
# One step


@dataclass
class Step:
    """Times in seconds and traffic per GPU of one step (arrays broadcast to the load's shape)."""

    total: np.ndarray
    dense: np.ndarray
    experts: np.ndarray
    attention: np.ndarray
    activations: np.ndarray
    moe_phases: np.ndarray
    """Non-GEMM phases of the MoE layers (route, act, permute, reduce) over the step."""
    expert_stream_cap: np.ndarray
    """Part of ``experts``: time the expert weight stream spends over HBM pricing because the SMs cap it."""
    tp_allreduce: np.ndarray
    launch: np.ndarray
    host: np.ndarray
    all2all: np.ndarray
    """All-to-all time over the step (before overlap)."""
    all2all_exposed: np.ndarray
    contention: np.ndarray
    """Compute slowed by the SMs that overlapping communication kernels hold."""
    overlap_hidden: np.ndarray
    schedule: np.ndarray
    """Overlap schedule index into SCHEDULE_NAMES, -1 where the step runs as one micro-batch."""
    hbm_bytes: np.ndarray
    flops: np.ndarray
    hbm_roofline: np.ndarray
    """hbm_bytes / datasheet HBM bandwidth: no step can be faster."""
    micro_batches: np.ndarray
    imbalance: np.ndarray
    active_experts: np.ndarray
    expert_bytes: np.ndarray
    """Routed-expert weight bytes one GPU reads in the step (all MoE layers and micro-batches)."""
    memory_time: np.ndarray
    """Time the HBM traffic alone would take at the calibrated efficiencies."""
    compute_time: np.ndarray
    """Time the FLOPs alone would take at the calibrated efficiencies."""

    def bound(self) -> np.ndarray:
        """Index into BOUND_NAMES of the largest of memory, compute, exposed all-to-all and overheads."""
        over = self.launch + self.host + self.tp_allreduce
        shape = self.total.shape
        cands = np.stack(
            [np.broadcast_to(x, shape) for x in (self.memory_time, self.compute_time, self.all2all_exposed, over)]
        )
        return np.argmax(cands, axis=0)

    def row(self, i: int, j: int = 0) -> dict[str, float]:
        def v(x: np.ndarray) -> float:
            return float(np.broadcast_to(x, self.total.shape)[i, j])

        return {
            "step_ms": v(self.total) * 1e3,
            "dense_ms": v(self.dense) * 1e3,
            "experts_ms": v(self.experts) * 1e3,
            "attention_ms": v(self.attention) * 1e3,
            "activations_ms": v(self.activations) * 1e3,
            "moe_phases_ms": v(self.moe_phases) * 1e3,
            "expert_stream_cap_ms": v(self.expert_stream_cap) * 1e3,
            "tp_allreduce_ms": v(self.tp_allreduce) * 1e3,
            "launch_ms": v(self.launch) * 1e3,
            "host_ms": v(self.host) * 1e3,
            "all2all_ms": v(self.all2all) * 1e3,
            "all2all_exposed_ms": v(self.all2all_exposed) * 1e3,
            "overlap_hidden_ms": v(self.overlap_hidden) * 1e3,
            "sm_contention_ms": v(self.contention) * 1e3,
            "hbm_gb": v(self.hbm_bytes) / GB,
            "tflop": v(self.flops) / 1e12,
            "hbm_roofline_ms": v(self.hbm_roofline) * 1e3,
            "micro_batches": v(self.micro_batches),
            "schedule": v(self.schedule),
            "imbalance": v(self.imbalance),
            "active_experts_per_gpu": v(self.active_experts),
        }


def _soft_max(tc: np.ndarray, tm: np.ndarray, p: float) -> np.ndarray:
    if p == 2.0:  # the published corner: the same value without two fractional powers
        return np.sqrt(tc * tc + tm * tm)
    hi = np.maximum(np.maximum(tc, tm), 1e-30)
    return hi * ((tc / hi) ** p + (tm / hi) ** p) ** (1.0 / p)


def _pad(rows: np.ndarray, block: int) -> np.ndarray:
    return np.ceil(rows / block - 1e-9) * block


def step_time(
    rb: RoleBatch,
    cal: Calibration,
    d: Any,
    q: Any,
    ctx_d: Any,
    p: Any,
    ctx_p: Any,
    prompt_len: Any = 2048.0,
    fill: Any = 1.0,
) -> Step:
    """Time of one step of each role in ``rb`` at the given loads (arrays broadcast against (N, 1)).

    ``prompt_len``: prompt tokens one prefill sequence brings to the step (their expert choices are correlated).
    ``fill``: mean tokens over the DP ranks / this (the busiest) rank's tokens: below 1 some ranks run short or
    empty steps in lockstep, so the experts receive fewer tokens than ranks x this rank's load.
    """
    A = rb.arch
    d = np.asarray(d, float)
    q = np.asarray(q, float)
    p = np.asarray(p, float)
    ctx_d = np.asarray(ctx_d, float)
    ctx_p = np.asarray(ctx_p, float)
    tp = rb.tp
    T = d * q + p
    thr = np.where(p > 0, T > rb.dbo_prefill_threshold, T > rb.dbo_decode_threshold)
    split = rb.dbo & np.where(rb.schedule == 0, thr, T >= 2)
    nmb = np.where(split, 2.0, 1.0)
    Tm = T / nmb
    hbm = rb.hbm
    bm = cal.gemm_block_m
    P = cal.roofline_p
    spec_f = (A.layers + rb.spec_tokens) / A.layers  # MTP / draft layers ride along

    # dense GEMMs (+ LM head for the tokens that need logits)
    dense_mem = rb.dense_bytes / (hbm * cal.hbm_weights_efficiency)
    dense_eff = cal.gemm_fp8_efficiency if A.dense_dtype == "fp8" else cal.gemm_bf16_efficiency
    logit_rows = d * q / nmb
    dense_flops_mb = 2.0 * (A.dense_params * _pad(Tm, bm) + A.lm_params * _pad(logit_rows, bm)) / tp
    t_dense = nmb * spec_f * _soft_max(dense_flops_mb / (rb.dense_peak * dense_eff), dense_mem, P)
    t_dense = np.where(T > 0, t_dense, 0.0)

    # routed experts: expected active experts, busiest rank's rows
    ep_f = np.maximum(rb.ep, 1.0)
    fill = np.asarray(fill, float)
    tokens_routed = Tm * np.where(rb.expert_parallel, rb.dp * fill, 1.0)
    k_over = np.minimum(A.top_k / rb.physical_experts, 1.0)
    p_active = 1.0 - (1.0 - k_over) ** tokens_routed
    rows_gpu = Tm * A.top_k / np.where(rb.expert_parallel, tp / fill, 1.0)
    # tokens of one sequence pick correlated experts: the load statistics see fewer independent draws
    # (variance x 1 - rho + rho x sum of squared tokens per sequence / tokens)
    lp = np.minimum(np.asarray(prompt_len, float), np.maximum(Tm, 1.0))
    per_seq = (d * q * q + p * lp) / np.maximum(T, 1e-9)
    infl = 1.0 - cal.routing_seq_corr + cal.routing_seq_corr * np.maximum(per_seq, 1.0)
    stat = cal.routing_stat_coef * np.sqrt(2.0 * np.log(ep_f) * infl / np.maximum(rows_gpu, 1.0))
    imb = np.where(rb.use_a2a, 1.0 + rb.skew + stat, 1.0)
    active = rb.slots * p_active
    rows_hot = rows_gpu * imb
    m = rows_hot / np.maximum(active, 1e-9)
    exp_bytes = active * A.expert_params * A.expert_bytes_per_param * rb.expert_frac
    eg = cal.expert_gemm
    stream_cap: Any = 0.0
    if eg is not None and A.expert_dtype == "fp8":
        # kernel-true: DeepGEMM's gate_up and down grouped GEMMs, each with its own streaming / compute
        # efficiency, weight stream capped per SM, flat up to one 64-row tile (widep/perf/kernels.py)
        inter = A.expert_params / (3.0 * A.hidden)
        masked = p <= 0  # decode steps: masked layout behind DeepEP LL; steps with prefill: contiguous
        t_gu, mem_gu, comp_gu, hbm_gu = gemm_seconds(
            eg,
            "gate_up",
            masked,
            active,
            m,
            2.0 * inter * rb.expert_frac,
            A.hidden,
            hbm,
            rb.sms,
            rb.expert_peak,
            A.expert_bytes_per_param,
        )
        t_dn, mem_dn, comp_dn, hbm_dn = gemm_seconds(
            eg,
            "down",
            masked,
            active,
            m,
            A.hidden,
            inter * rb.expert_frac,
            hbm,
            rb.sms,
            rb.expert_peak,
            A.expert_bytes_per_param,
        )
        eager = ~rb.cuda_graphs  # an eager call cannot take less than its host dispatch
        disp = eg.dispatch_us * 1e-6
        t_exp_layer = np.where(eager, np.maximum(t_gu, disp) + np.maximum(t_dn, disp), t_gu + t_dn)
        exp_mem, exp_comp = mem_gu + mem_dn, comp_gu + comp_dn
        # the part of the weight stream the SMs, not HBM, bound (H200: most of it)
        stream_cap = np.maximum(exp_mem - hbm_gu - hbm_dn, 0.0)
    elif cal.grouped_curve and cal.grouped_curve_dtype == ("fp8" if A.expert_dtype == "fp8" else "bf16"):
        exp_mem = exp_bytes / (hbm * cal.hbm_weights_efficiency)
        xs = np.log2([c[0] for c in cal.grouped_curve])
        ys = np.asarray([c[1] for c in cal.grouped_curve])
        eff = np.interp(np.log2(np.maximum(m, 1.0)), xs, ys)
        exp_comp = 2.0 * A.expert_params * rb.expert_frac * active * m / (rb.expert_peak * eff)
        t_exp_layer = np.maximum(exp_comp, exp_mem)
    else:
        exp_mem = exp_bytes / (hbm * cal.hbm_weights_efficiency)
        exp_eff = cal.gemm_fp8_efficiency if A.expert_dtype == "fp8" else cal.gemm_bf16_efficiency
        exp_comp = 2.0 * A.expert_params * rb.expert_frac * active * _pad(m, bm) / (rb.expert_peak * exp_eff)
        t_exp_layer = _soft_max(exp_comp, exp_mem, P)
    t_exp = np.where(T > 0, nmb * spec_f * A.moe_layers * t_exp_layer, 0.0)
    t_stream_cap = np.where(T > 0, nmb * spec_f * A.moe_layers * stream_cap, 0.0)

    # attention: decode KV read vs FLOPs; prefill FLOPs
    kv_read = d * ctx_d * rb.kv_bytes_tok
    att_dec_flops = A.att_decode_flops / tp * d * q * A.ctx_layers(ctx_d)
    t_att_dec = _soft_max(
        att_dec_flops / (rb.bf16_peak * cal.attention_decode_efficiency),
        kv_read / (hbm * cal.hbm_kv_read_efficiency),
        P,
    )
    att_pf_flops = A.att_prefill_flops / tp * p * A.ctx_layers(ctx_p)
    kv_write = (d * q + p) * rb.kv_bytes_tok
    t_att = (
        t_att_dec
        + att_pf_flops / (rb.bf16_peak * cal.attention_prefill_efficiency)
        + kv_write / (hbm * cal.hbm_weights_efficiency)
    )

    # elementwise traffic, TP all-reduces, kernel gaps, host
    act_bytes = T * cal.activation_bytes_per_hidden * A.hidden * A.layers * spec_f
    t_act = act_bytes / (hbm * cal.hbm_weights_efficiency)
    # non-GEMM MoE phases (route, act; permute and reduce where the all-to-all does not do them in its kernels,
    # as DeepEP low-latency does): the bytes of vLLM's fused kernels (widep/perf/kernels.py)
    mp = cal.moe_phases
    if mp is not None:
        inter_ = A.expert_params / (3.0 * A.hidden) * rb.expert_frac

        def ph_t(name: str) -> np.ndarray:
            return serving_phase_bytes(name, Tm, rows_hot, A.hidden, inter_, A.experts) / (
                hbm * cal.hbm_weights_efficiency
            )

        in_a2a = rb.use_a2a & (rb.a2a_model == 0)  # DeepEP LL / pplx permute and reduce in their own kernels
        ph = ph_t("route") + ph_t("act") + np.where(in_a2a, 0.0, ph_t("permute") + ph_t("reduce"))
        t_moe_ph = np.where(T > 0, nmb * spec_f * A.moe_layers * ph, 0.0)
    else:
        t_moe_ph = np.zeros_like(t_act)
    ar_bytes = 2.0 * (tp - 1.0) / tp * Tm * A.hidden * 2.0
    t_ar = np.where(
        tp > 1,
        nmb
        * A.layers
        * spec_f
        * cal.tp_allreduce_per_layer
        * (cal.tp_allreduce_latency_us * 1e-6 + ar_bytes / (rb.nvlink * cal.tp_allreduce_nvlink_efficiency)),
        0.0,
    )
    gap = np.where(
        ~rb.cuda_graphs,
        cal.kernel_gap_eager_us,
        np.where((p <= 0) & (T <= cal.graph_max_tokens), cal.kernel_gap_full_graph_us, cal.kernel_gap_piecewise_us),
    )
    t_launch = nmb * A.layers * spec_f * cal.kernels_per_layer * gap * 1e-6
    seqs = d + np.where(p > 0, np.maximum(p / 2048.0, 1.0), 0.0)  # prefill: one request per ~2K prompt tokens
    t_host = (cal.host_step_us + cal.host_per_seq_us * seqs) * 1e-6

    # expert all-to-all per MoE layer and micro-batch
    tok = Tm / tp
    ep = ep_f
    k = float(A.top_k)
    # copies per token: expert_copy k; rank_copy distinct ranks; node_copy distinct *other* nodes over RDMA
    # (DeepEP normal kernels send once per node and forward over NVLink), distinct other ranks inside a node
    units = np.where(rb.intranode, ep, np.maximum(rb.nodes, 1.0))
    distinct = units * (1.0 - (1.0 - 1.0 / units) ** k)
    copies = np.where(
        rb.a2a_model == 0,
        k,
        np.where(rb.a2a_model == 3, distinct * (units - 1.0) / units, ep * (1.0 - (1.0 - 1.0 / ep) ** k)),
    )
    disp_b = np.where(rb.a2a_model == 2, Tm * (rb.dp - 1.0) * A.hidden * 2.0, tok * copies * A.dispatch_bytes)
    comb_b = np.where(rb.a2a_model == 2, Tm * (rb.dp - 1.0) * A.hidden * 2.0, tok * copies * A.combine_bytes)
    skew_io = np.where(rb.a2a_model == 2, 1.0, imb)
    bw_d = np.where(rb.a2a_bw_d > 0, rb.a2a_bw_d, 1.0)  # rows without all-to-all: masked below
    bw_c = np.where(rb.a2a_bw_c > 0, rb.a2a_bw_c, 1.0)
    # DeepEP normal kernels across nodes pipeline two legs: RDMA to one rank per other node, then NVLink
    # forwarding to every destination rank inside the node; the slower leg sets the time. The NVLink leg carries
    # a copy per distinct destination rank other than the sender, at the GPU's NVLink (H800: 200 GB/s per
    # direction, where it binds; H100 / H200: 450, where RDMA does)
    fwd = np.where((rb.a2a_model == 3) & ~rb.intranode, ep * (1.0 - (1.0 - 1.0 / ep) ** k) * (ep - 1.0) / ep, 0.0)
    nvl_d = tok * fwd * A.dispatch_bytes / np.where(rb.a2a_nvl_d > 0, rb.a2a_nvl_d, 1.0)
    nvl_c = tok * fwd * A.combine_bytes / np.where(rb.a2a_nvl_c > 0, rb.a2a_nvl_c, 1.0)
    t_disp = np.maximum(disp_b / bw_d, nvl_d)
    t_comb = np.maximum(comb_b / bw_c, nvl_c)
    t_layer = 2.0 * rb.a2a_lat + skew_io * (t_disp + t_comb)
    t_a2a = np.where(rb.use_a2a & (T > 0), nmb * spec_f * A.moe_layers * t_layer, 0.0)

    t_comp = t_dense + t_exp + t_att + t_act + t_moe_ph + t_ar + t_launch
    # Overlap, per MoE layer and micro-batch: A = attention + dense work, M = routed-expert GEMMs,
    # D / C = dispatch / combine. Only their wire part can hide (the SM part of an NVLink all-to-all is
    # copy work; over RDMA the send/receive kernels are short); a hidden op hides behind one compute
    # phase of the other micro-batch. DBO / TBO order per layer: d0|A1, d1|M0, c0|M1, c1|A0(next layer),
    # so each op meets one phase: hidden = min(D,A) + min(D,M) + min(C,M) + min(C,A). DeepSeek's decode
    # pipeline splits attention in two and packs communication against all compute: min(2(D+C), 2(A+M)).
    per = np.maximum(nmb * spec_f * A.moe_layers, 1.0)
    A_l = (t_dense + t_att + t_act + t_ar + t_launch) * (A.moe_layers / A.layers) / per + t_moe_ph / per
    M_l = t_exp / per
    sm_frac = np.where(rb.intranode, cal.a2a_sm_fraction_nvlink, cal.a2a_sm_fraction_rdma)
    D_w = (rb.a2a_lat + skew_io * t_disp) * (1.0 - sm_frac)
    C_w = (rb.a2a_lat + skew_io * t_comb) * (1.0 - sm_frac)
    pair = np.minimum(D_w, A_l) + np.minimum(D_w, M_l) + np.minimum(C_w, M_l) + np.minimum(C_w, A_l)
    packed = np.minimum(2.0 * (D_w + C_w), 2.0 * (A_l + M_l))
    sched = np.where((rb.schedule == 2) & (p > 0), 3, rb.schedule)  # DeepSeek's 5-stage pipeline is decode's
    hid_layer = np.where(sched == 2, packed, pair) / 2.0  # per micro-batch
    # vLLM's DBO runs each micro-batch on its own thread and yields at every dispatch / combine (DeepEP's
    # receive hook): the other micro-batch's phase is already queued when the wire time starts, so the op
    # hides up to that phase at ``dbo_vllm_efficiency``; TBO / DeepSeek schedules at the fitted efficiency
    eff = np.where(sched == 0, cal.dbo_vllm_efficiency, cal.overlap_efficiency)
    hidden = np.where(rb.use_a2a & (nmb > 1) & (T > 0), eff * hid_layer * per, 0.0)
    hidden = np.minimum(hidden, t_a2a)
    exposed = t_a2a - hidden
    # SM contention: while DeepEP's normal kernels are in flight they hold comm_sms SMs, so the compute
    # that overlaps them runs on the rest (low-latency kernels hold none while data is on the wire).
    sms_frac = np.where(rb.a2a_model == 3, cal.comm_sms_normal / HOPPER_SMS, 0.0)
    contention = hidden * sms_frac / np.maximum(1.0 - sms_frac, 0.05)
    draft = rb.spec_tokens * cal.spec_draft_us * 1e-6
    total = t_comp + exposed + contention + t_host + draft

    hbm_bytes = (nmb * spec_f * (rb.dense_bytes + A.moe_layers * exp_bytes) + kv_read + kv_write + act_bytes) * (T > 0)
    flops = (
        nmb
        * spec_f
        * (
            2.0 * (A.dense_params * Tm + A.lm_params * logit_rows) / tp
            + 2.0 * A.expert_params * rb.expert_frac * rows_gpu * A.moe_layers
        )
        + att_dec_flops
        + att_pf_flops
    )
    return Step(
        total=total,
        dense=t_dense,
        experts=t_exp,
        attention=t_att,
        activations=t_act,
        moe_phases=t_moe_ph,
        expert_stream_cap=np.broadcast_to(t_stream_cap, total.shape),
        tp_allreduce=t_ar,
        launch=t_launch,
        host=np.broadcast_to(t_host, total.shape),
        all2all=t_a2a,
        all2all_exposed=exposed,
        contention=contention,
        overlap_hidden=hidden,
        schedule=np.broadcast_to(np.where(nmb > 1, sched, -1.0), total.shape),
        hbm_bytes=hbm_bytes,
        flops=flops,
        hbm_roofline=hbm_bytes / hbm,
        micro_batches=nmb,
        imbalance=imb,
        active_experts=active,
        expert_bytes=np.where(T > 0, nmb * spec_f * A.moe_layers * exp_bytes, 0.0),
        memory_time=np.where(T > 0, nmb * spec_f * (dense_mem + A.moe_layers * exp_mem), 0.0)
        + kv_read / (hbm * cal.hbm_kv_read_efficiency)
        + (kv_write + act_bytes) / (hbm * cal.hbm_weights_efficiency),
        compute_time=nmb * spec_f * (dense_flops_mb / (rb.dense_peak * dense_eff) + A.moe_layers * exp_comp)
        + att_dec_flops / (rb.bf16_peak * cal.attention_decode_efficiency)
        + att_pf_flops / (rb.bf16_peak * cal.attention_prefill_efficiency),
    )


# ---------------------------------------------------------------------------------------------------------
# Serving


def accepted_per_step(spec_tokens: np.ndarray, acceptance: float) -> np.ndarray:
    """Expected output tokens per step per sequence with ``spec_tokens`` drafts: 1 + a + a^2 + ... + a^n."""
    n = np.asarray(spec_tokens, float)
    if acceptance >= 1.0:
        return 1.0 + n
    return (1.0 - acceptance ** (n + 1.0)) / (1.0 - acceptance)


@dataclass
class Perf:
    """Predicted serving metrics of N deployments at K concurrency levels (arrays (N, K))."""

    concurrency: np.ndarray
    batch: np.ndarray
    """Decode sequences per DP rank (prefill-only: prompt tokens per prefill step)."""
    tps_gpu: np.ndarray
    """Output tokens/s per GPU of the whole deployment (prefill-only: input tokens/s per GPU)."""
    tps_user: np.ndarray
    """Output tokens/s per user (1 / TPOT); NaN for prefill-only."""
    ttft: np.ndarray
    tpot: np.ndarray
    step: np.ndarray
    requests_per_s: np.ndarray
    input_tps_gpu: np.ndarray
    bound: np.ndarray
    limit: np.ndarray
    capacity: np.ndarray
    """Concurrency at which the batch stops growing (N, 1)."""
    steps: dict[str, Step] = field(default_factory=dict)
    """The step breakdowns behind the numbers: 'decode' (or 'mixed'), 'prefill'."""
    dp_imbalance: np.ndarray | None = None
    """Requests on the busiest DP rank over the mean (:func:`dp_busiest`): the lockstep step runs its load."""


def front_end(cal: Calibration, per_server: Any) -> np.ndarray:
    """Time a request spends in the API server before its first step (HTTP, tokenisation, scheduling), when the
    server handles the requests that arrive together one after another: mean (n + 1) / 2 of them."""
    return cal.request_overhead_us * 1e-6 * (np.maximum(np.asarray(per_server, float), 1.0) + 1.0) / 2.0


def dp_busiest(rb: RoleBatch, n: np.ndarray) -> np.ndarray:
    """Busiest DP rank's share over the mean when each rank holds ``n`` requests on average.

    Requests land on ranks like balls in bins: the maximum of G Poisson(n) loads is about
    n + sqrt(2 n ln G) [derived]; a placement policy with a smaller variance of per-rank counts scales the
    excess by its coefficient (random / round robin 1, DP-aware least-loaded ``dp_imbalance_balanced``).
    Every rank waits for the busiest at each MoE layer (attention-DP lockstep: the all-to-all synchronises
    them), so it sets the step. Two levels place a request when an API server fronts L > 1 ranks (hybrid:
    a node's ranks; internal: the group's): the front door picks one of G / L servers (its policy's
    coefficient over loads of L n: excess c_f sqrt(2 ln(G/L) / (L n))), then vLLM's internal DP balancer
    picks a rank on queue counts its coordinator publishes at intervals (placements between two publishes see
    the same stale counts: coefficient ``dp_imbalance_internal``, excess c_i sqrt(2 ln L / n)); the two
    independent excesses add in quadrature.
    """
    G = np.maximum(rb.ranks, 1.0)
    L = np.minimum(rb.lb_ranks, G)
    nn = np.maximum(n, 1.0)
    front = rb.dp_coef**2 * 2.0 * np.log(G / L) / (L * nn)
    inner = rb.dp_internal**2 * 2.0 * np.log(L) / nn
    return 1.0 + np.sqrt(front + inner) * (G > 1)


def _kv_cap(rb: RoleBatch, per_seq_tokens: float) -> np.ndarray:
    block = rb.arch.block_tokens
    per = math.ceil(per_seq_tokens / block) * block
    return np.floor(rb.kv_tokens / max(per, 1))


def _wait(C: np.ndarray, X: np.ndarray, service: np.ndarray) -> np.ndarray:
    """Closed-loop queueing: C users cycle through a system that completes X requests/s (Little's law)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.maximum(0.0, np.nan_to_num(C / X - service, nan=0.0, posinf=0.0))


def serve_mixed(rb: RoleBatch, cal: Calibration, w: Workload, C: np.ndarray) -> Perf:
    """Mixed roles (prefill and decode on the same ranks, chunked prefill) at total concurrency C."""
    C = np.asarray(C, float)
    spec = rb.spec_tokens if w.spec_tokens is None else np.full_like(rb.spec_tokens, w.spec_tokens)
    q = 1.0 + spec
    qa = accepted_per_step(spec, w.acceptance(cal))
    isl_c = w.isl_computed
    G = rb.ranks
    cap_kv = _kv_cap(rb, w.isl + w.osl / 2.0)
    cap_tok = rb.max_num_batched_tokens / (q + qa * isl_c / w.osl)
    cap = np.maximum(np.minimum(np.minimum(rb.max_num_seqs, cap_kv), np.floor(cap_tok)), 0.0)
    c = C / G
    b = np.minimum(c, cap)
    limit = np.where(c <= cap, 0, np.where(cap == rb.max_num_seqs, 1, np.where(cap == cap_kv, 2, 3)))
    d = np.maximum(b, 1.0)
    dmax = np.minimum(d * dp_busiest(rb, d), np.maximum(cap, d))  # the busiest rank sets every step
    B = rb.max_num_batched_tokens
    budget = np.maximum(B - dmax * q, 1.0)
    chunk = np.minimum(isl_c, budget)
    n_chunks = np.ceil(isl_c / budget - 1e-9)
    st_dec = step_time(rb, cal, dmax, q, w.ctx_decode, 0.0, w.ctx_prefill)
    if w.arrival == "wave":
        # every user starts together: the busiest rank prefills its whole wave in token-budget chunks
        # (decoding the already-prefilled half alongside), then the wave decodes
        pf_tokens = dmax * isl_c
        n_pf = np.ceil(pf_tokens / B - 1e-9)
        st = step_time(rb, cal, dmax / 2.0, q, w.ctx_decode, np.minimum(pf_tokens, B), w.ctx_prefill, prompt_len=isl_c)
        S_pf = st.total
        ttft = S_pf * (n_pf + 1.0) / 2.0 + front_end(cal, dmax)
        dec_steps = np.maximum((w.osl - 1.0) / qa, 1e-9)
        slow = np.minimum(n_pf / 2.0, dec_steps)  # decode steps a request spends beside others' prefill
        S = (slow * S_pf + (dec_steps - slow) * st_dec.total) / dec_steps
        st = st_dec
        E = ttft + dec_steps * S
        X = G * b / E  # Little's law over the users the ranks hold; the rest wait for a later wave
        ttft = ttft + _wait(C, X, E)
    else:
        p = d * qa * isl_c / w.osl  # mean prompt tokens per rank per step
        share = np.clip(p / chunk, 0.0, 1.0)  # steps in which a rank carries a prefill chunk
        p_any = 1.0 - (1.0 - share) ** G  # ... and some rank does: every rank waits for it
        st = step_time(rb, cal, dmax, q, w.ctx_decode, chunk, w.ctx_prefill, prompt_len=chunk)
        S_chunk = st.total
        S = p_any * S_chunk + (1.0 - p_any) * st_dec.total
        ttft_service = n_chunks * S_chunk + 0.5 * S + front_end(cal, d)
        X = G * b * qa / (w.osl * S)
        E = ttft_service + (w.osl - 1.0) / qa * S
        ttft = ttft_service + _wait(C, X, E)
    ok = cap >= 1
    nan = np.nan
    return Perf(
        concurrency=np.broadcast_to(C, S.shape).copy(),
        batch=np.where(ok, b, 0.0),
        tps_gpu=np.where(ok, X * w.osl / rb.gpus, 0.0),
        tps_user=np.where(ok, qa / S, nan),
        ttft=np.where(ok, ttft, nan),
        tpot=np.where(ok, S / qa, nan),
        step=S,
        requests_per_s=np.where(ok, X, 0.0),
        input_tps_gpu=np.where(ok, X * w.isl / rb.gpus, 0.0),
        bound=st.bound(),
        limit=np.broadcast_to(limit, S.shape).copy(),
        capacity=cap * G,
        steps={"mixed": st},
        dp_imbalance=np.broadcast_to(dmax / d, S.shape).copy(),
    )


def _prefill_capacity(rp: RoleBatch, cal: Calibration, w: Workload) -> tuple[np.ndarray, np.ndarray, Step]:
    """(max requests/s of the prefill group by compute, prompt tokens per full step, its step)."""
    isl_c = max(w.isl_computed, 1.0)
    pb = np.minimum(rp.max_num_batched_tokens, np.maximum(rp.max_num_seqs, 1.0) * isl_c)
    st = step_time(rp, cal, 0.0, 1.0, 0.0, pb, w.ctx_prefill, prompt_len=isl_c)
    # at capacity every rank has prompts waiting in its scheduler, so every rank runs full steps: the DP
    # imbalance of how prompts land on ranks (dp_busiest) costs only below capacity
    X = rp.ranks * pb / (isl_c * st.total)
    return X, pb, st


def mean_clipped(n: np.ndarray, f: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Mean over ranks of min(load, cap) when loads spread evenly over [n (2 - f), n f] around the mean ``n``
    (f: the busiest rank's share, :func:`dp_busiest`). Below capacity every rank runs its load (n); far above
    it every rank is full (cap); in between only the ranks above ``cap`` are clipped. [derived]"""
    lo, hi = n * (2.0 - f), n * f
    width = np.maximum(hi - lo, 1e-12)
    excess = np.where(cap >= hi, 0.0, np.where(cap <= lo, n - cap, (hi - cap) ** 2 / (2.0 * width)))
    return np.minimum(n - excess, cap)


def busiest_load(rb: RoleBatch, b: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Decode sequences on the busiest DP rank when ranks hold ``b`` on average (never above ``cap``)."""
    bb = np.maximum(b, 1.0)
    return np.minimum(bb * dp_busiest(rb, bb), np.maximum(cap, bb))


def _prefill_limited(
    rd: RoleBatch,
    cal: Calibration,
    w: Workload,
    b0: np.ndarray,
    Xp: np.ndarray,
    q: np.ndarray,
    qa: np.ndarray,
    cap: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode batch per rank when the prefill group completes only Xp requests/s (and which rows are starved).

    Solves b = Xp * osl * S(b) / (ranks * qa) from above (a contraction: b / S(b) grows with b), on the
    starved rows only.
    """
    b0 = np.broadcast_to(b0, np.broadcast_shapes(b0.shape, (rd.n, 1))).astype(float)
    Gd = rd.ranks
    cap = np.broadcast_to(cap, b0.shape)
    S0 = step_time(rd, cal, busiest_load(rd, b0, cap), q, w.ctx_decode, 0.0, 0.0).total
    starved = Gd * b0 * qa / (w.osl * S0) > Xp
    rows = np.flatnonzero(starved.any(axis=1))
    if rows.size == 0:
        return b0, starved
    sub = rd.take(rows)
    bb = b0[rows]
    xp, qq, qqa = (np.broadcast_to(a, (rd.n, 1))[rows] for a in (Xp, q, qa))
    cc = cap[rows]
    for _ in range(12):
        S = step_time(sub, cal, busiest_load(sub, bb, cc), qq, w.ctx_decode, 0.0, 0.0).total
        bb = np.minimum(b0[rows], xp * w.osl * S / (sub.ranks * qqa))
    b = b0.copy()
    b[rows] = np.where(starved[rows], bb, b0[rows])
    return b, starved


def serve_pd(rp: RoleBatch, rd: RoleBatch, cal: Calibration, w: Workload, C: np.ndarray) -> Perf:
    """Prefill group rp and decode group rd (aligned row by row) at total concurrency C."""
    C = np.asarray(C, float)
    spec = rd.spec_tokens if w.spec_tokens is None else np.full_like(rd.spec_tokens, w.spec_tokens)
    q = 1.0 + spec
    qa = accepted_per_step(spec, w.acceptance(cal))
    Gd = rd.ranks
    kv_req = w.isl * rp.kv_bytes_tok
    xfer = cal.kv_transfer_latency_us * 1e-6 + kv_req / (np.minimum(rp.nic, rd.nic) * cal.kv_transfer_nic_efficiency)
    Xp_cmp, pb, _ = _prefill_capacity(rp, cal, w)
    Xp_kv = rp.gpus * rp.nic * cal.kv_transfer_nic_efficiency / kv_req
    Xp = np.minimum(Xp_cmp, Xp_kv)
    cap_kv = _kv_cap(rd, w.isl + w.osl / 2.0)
    cap = np.maximum(np.minimum(rd.max_num_seqs, cap_kv), 0.0)
    c = C / Gd
    b0 = np.minimum(c, cap)

    def decode_step(b: np.ndarray) -> Step:
        return step_time(rd, cal, busiest_load(rd, b, cap), q, w.ctx_decode, 0.0, 0.0)

    isl_c = max(w.isl_computed, 1.0)
    if w.arrival == "wave":
        # the whole wave queues at the prefill group; decode then runs the full batch. A prefill rank's first
        # step carries the prompts of the wave that landed on it (the busiest rank's share, up to the token
        # budget): one user's prompt is a one-prompt step, not a full batch. Prompts beyond one step per rank
        # wait for the group to drain them (mean half the drain beyond the first step).
        b, starved = b0, np.zeros_like(b0, dtype=bool)
        b_cap = cap
        st = decode_step(b)
        S = st.total
        held = Gd * b
        per_p = held / rp.ranks
        p_load = np.clip(np.ceil(per_p * dp_busiest(rp, per_p) - 1e-9) * isl_c, isl_c, pb)
        fill = np.clip(per_p * isl_c / p_load, 1.0 / rp.ranks, 1.0)
        pf_st = step_time(rp, cal, 0.0, 1.0, 0.0, p_load, w.ctx_prefill, prompt_len=isl_c, fill=fill)
        S_pf = pf_st.total
        S_full = step_time(rp, cal, 0.0, 1.0, 0.0, pb, w.ctx_prefill, prompt_len=isl_c).total
        queue = np.maximum(held / Xp - S_full, 0.0) / 2.0
        ttft = queue + S_pf * np.ceil(isl_c / rp.max_num_batched_tokens) + xfer + S + front_end(cal, b0)
        E = ttft + (w.osl - 1.0) / qa * S
        X = held / E
        ttft = ttft + _wait(C, X, E)
    else:
        b, starved = _prefill_limited(rd, cal, w, b0, Xp, q, qa, cap)
        b_cap, _ = _prefill_limited(rd, cal, w, cap, Xp, q, qa, cap)
        st = decode_step(b)
        S = st.total
        X = Gd * b * qa / (w.osl * S)
        rho = np.clip(X / Xp, 0.0, 1.0)
        p_load = np.clip(rho * pb, isl_c, pb)
        fill = np.clip(rho * pb / p_load, 1.0 / rp.ranks, 1.0)
        pf_st = step_time(rp, cal, 0.0, 1.0, 0.0, p_load, w.ctx_prefill, prompt_len=isl_c, fill=fill)
        S_pf = pf_st.total
        ttft_service = S_pf * np.ceil(isl_c / rp.max_num_batched_tokens) + xfer + S + front_end(cal, b)
        E = ttft_service + (w.osl - 1.0) / qa * S
        ttft = ttft_service + _wait(C, X, E)
    gpus = rp.gpus + rd.gpus
    limit = np.where(starved, 4, np.where(c <= cap, 0, np.where(cap == rd.max_num_seqs, 1, 2)))
    ok = cap >= 1
    nan = np.nan
    return Perf(
        concurrency=np.broadcast_to(C, S.shape).copy(),
        batch=np.where(ok, b, 0.0),
        tps_gpu=np.where(ok, X * w.osl / gpus, 0.0),
        tps_user=np.where(ok, qa / S, nan),
        ttft=np.where(ok, ttft, nan),
        tpot=np.where(ok, S / qa, nan),
        step=S,
        requests_per_s=np.where(ok, X, 0.0),
        input_tps_gpu=np.where(ok, X * w.isl / gpus, 0.0),
        bound=st.bound(),
        limit=np.broadcast_to(limit, S.shape).copy(),
        capacity=np.maximum(b_cap, 1.0) * Gd,
        steps={"decode": st, "prefill": pf_st},
        dp_imbalance=np.broadcast_to(busiest_load(rd, b, cap) / np.maximum(b, 1.0), S.shape).copy(),
    )


def serve_decode_only(rd: RoleBatch, cal: Calibration, w: Workload, C: np.ndarray) -> Perf:
    """A decode group whose prefill runs elsewhere (never the bottleneck): KV arrives over the NIC."""
    C = np.asarray(C, float)
    spec = rd.spec_tokens if w.spec_tokens is None else np.full_like(rd.spec_tokens, w.spec_tokens)
    q = 1.0 + spec
    qa = accepted_per_step(spec, w.acceptance(cal))
    G = rd.ranks
    cap_kv = _kv_cap(rd, w.isl + w.osl / 2.0)
    cap = np.maximum(np.minimum(rd.max_num_seqs, cap_kv), 0.0)
    c = C / G
    b = np.minimum(c, cap)
    st = step_time(rd, cal, busiest_load(rd, b, cap), q, w.ctx_decode, 0.0, 0.0)
    S = st.total
    X = G * b * qa / (w.osl * S)
    xfer = cal.kv_transfer_latency_us * 1e-6 + w.isl * rd.kv_bytes_tok / (rd.nic * cal.kv_transfer_nic_efficiency)
    ttft_service = xfer + S + front_end(cal, b)
    ttft = ttft_service + _wait(C, X, ttft_service + (w.osl - 1.0) / qa * S)
    ok = cap >= 1
    nan = np.nan
    return Perf(
        concurrency=np.broadcast_to(C, S.shape).copy(),
        batch=np.where(ok, b, 0.0),
        tps_gpu=np.where(ok, X * w.osl / rd.gpus, 0.0),
        tps_user=np.where(ok, qa / S, nan),
        ttft=np.where(ok, ttft, nan),
        tpot=np.where(ok, S / qa, nan),
        step=S,
        requests_per_s=np.where(ok, X, 0.0),
        input_tps_gpu=np.where(ok, X * w.isl / rd.gpus, 0.0),
        bound=st.bound(),
        limit=np.broadcast_to(np.where(c <= cap, 0, np.where(cap == rd.max_num_seqs, 1, 2)), S.shape).copy(),
        capacity=cap * G,
        steps={"decode": st},
        dp_imbalance=np.broadcast_to(busiest_load(rd, b, cap) / np.maximum(b, 1.0), S.shape).copy(),
    )


def serve_prefill_only(rp: RoleBatch, cal: Calibration, w: Workload, C: np.ndarray) -> Perf:
    """A prefill group alone: C concurrent prompts; throughput in computed input tokens/s per GPU."""
    C = np.asarray(C, float)
    isl_c = max(w.isl_computed, 1.0)
    G = rp.ranks
    n_chunks = np.ceil(isl_c / rp.max_num_batched_tokens - 1e-9)
    cap_req = np.maximum(np.floor(np.minimum(rp.max_num_batched_tokens / isl_c, rp.max_num_seqs)), 1.0)
    n = C / G  # prompts per rank (mean); past capacity the rest wait in the ranks' schedulers
    f = dp_busiest(rp, np.minimum(n, cap_req))
    tokens = np.minimum(np.maximum(n * f, 1.0) * isl_c, rp.max_num_batched_tokens)  # the busiest rank's step
    st = step_time(rp, cal, 0.0, 1.0, 0.0, tokens, w.ctx_prefill, prompt_len=isl_c)
    S = st.total
    # chunked prefill fills the token budget: a rank with prompts waiting runs B tokens a step (part of a prompt
    # rides in the next step), so the cap in prompts is B / isl, not its floor
    r = mean_clipped(n, f, np.minimum(rp.max_num_seqs, rp.max_num_batched_tokens / isl_c))
    X = G * r / (S * n_chunks)
    service = S * n_chunks
    ttft = service + _wait(C, X, service)
    nan = np.full(S.shape, np.nan)
    cap = cap_req * G
    return Perf(
        concurrency=np.broadcast_to(C, S.shape).copy(),
        batch=tokens,
        tps_gpu=X * isl_c / rp.gpus,
        tps_user=nan,
        ttft=ttft,
        tpot=nan.copy(),
        step=S,
        requests_per_s=X,
        input_tps_gpu=X * isl_c / rp.gpus,
        bound=st.bound(),
        limit=np.broadcast_to(np.where(C / G <= cap_req, 0, 3), S.shape).copy(),
        capacity=np.maximum(cap, G),
        steps={"prefill": st},
        dp_imbalance=np.broadcast_to(f, S.shape).copy(),
    )


# ---------------------------------------------------------------------------------------------------------
# Whole deployments (a DeploymentPlan)


@dataclass(frozen=True)
class LevelPrediction:
    """Predicted metrics of one deployment at one concurrency."""

    concurrency: float
    batch_per_rank: float
    tps_gpu: float
    tps_user: float | None
    ttft_ms: float | None
    tpot_ms: float | None
    step_ms: float
    requests_per_s: float
    input_tps_gpu: float
    bound: str
    limit: str
    breakdown: dict[str, float]
    saturation: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "breakdown"
        } | {"breakdown": {k: round(v, 4) for k, v in self.breakdown.items()}}


def _f(x: Any) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def levels_from_perf(perf: Perf, i: int, sat_col: int | None = None) -> list[LevelPrediction]:
    """Row ``i`` of a :class:`Perf` as a list of :class:`LevelPrediction`."""
    out = []
    key = next(iter(perf.steps))
    for j in range(perf.tps_gpu.shape[1]):
        ttft, tpot = _f(perf.ttft[i, j]), _f(perf.tpot[i, j])
        out.append(
            LevelPrediction(
                concurrency=float(perf.concurrency[i, j]),
                batch_per_rank=float(perf.batch[i, j]),
                tps_gpu=float(perf.tps_gpu[i, j]),
                tps_user=_f(perf.tps_user[i, j]),
                ttft_ms=None if ttft is None else ttft * 1e3,
                tpot_ms=None if tpot is None else tpot * 1e3,
                step_ms=float(perf.step[i, j]) * 1e3,
                requests_per_s=float(perf.requests_per_s[i, j]),
                input_tps_gpu=float(perf.input_tps_gpu[i, j]),
                bound=BOUND_NAMES[int(perf.bound[i, j])],
                limit=LIMIT_NAMES[int(perf.limit[i, j])],
                breakdown=perf.steps[key].row(i, j)
                | ({} if perf.dp_imbalance is None else {"dp_imbalance": float(perf.dp_imbalance[i, j])}),
                saturation=sat_col is not None and j == sat_col,
            )
        )
    return out


def with_saturation(levels: np.ndarray, cap: float, saturation: bool) -> tuple[np.ndarray, int | None]:
    """``levels`` with the capacity ``cap`` inserted in order (when asked); and the index of that level."""
    if not saturation or not cap >= 1:
        return levels, None
    cap = float(round(cap, 6))
    merged = np.unique(np.concatenate([levels, [cap]]))
    return merged, int(np.searchsorted(merged, cap))


def predict_plan(
    plan: Any,
    workload: Workload,
    concurrency: Sequence[float],
    cal: Calibration,
    *,
    saturation: bool = True,
    engine: str = "vllm",
    role_overrides: dict[str, dict[str, Any]] | None = None,
) -> tuple[str, list[LevelPrediction]]:
    """Predict a planned deployment at each concurrency: (mode, levels).

    mode is 'mixed', 'pd', 'decode-only' or 'prefill-only'. Several mixed roles share the load in
    proportion to their GPUs. With ``saturation`` the deployment's batch capacity is added as a level
    (flagged ``saturation``): the concurrency at which every rank runs its largest batch. ``role_overrides``
    replaces :class:`RoleInput` fields of the named roles (e.g. ``skew`` measured by ``widep experts``).
    """
    arch = ArchConst.of(plan.arch, plan.weight_dtype, plan.kv_dtype)
    from dataclasses import replace as _replace

    balancer, dp_mode = balancer_of(plan), dp_mode_of(plan)
    gpu, fabric = network_of(plan)
    roles = [
        _replace(role_input_from_plan(rp, gpu), engine=engine, balancer=balancer, dp_mode=dp_mode, fabric=fabric)
        for rp in plan.roles
    ]
    if role_overrides:  # RoleInput fields per role name (widep experts: measured skew, KV tokens, batch cap)
        roles = [_replace(r, **role_overrides.get(rp.name, {})) for r, rp in zip(roles, plan.roles, strict=True)]
    kinds = [r.kind for r in roles]
    levels = np.asarray(sorted(set(float(c) for c in concurrency)), float)
    if levels.size == 0 or levels.min() < 1:
        raise UserError(f"--concurrency: levels must be >= 1. Given: {list(concurrency)}.")
    if set(kinds) == {"mixed"}:
        rb = RoleBatch.build(arch, roles, cal)
        share = rb.gpus[:, 0] / rb.gpus.sum()
        total_cap = float(serve_mixed(rb, cal, workload, levels[None, :1] * share[:, None]).capacity[:, 0].sum())
        C, sat = with_saturation(levels, total_cap, saturation)
        perf = serve_mixed(rb, cal, workload, C[None, :] * share[:, None])
        if len(roles) > 1:  # independent groups: throughput adds up; the slowest group sets the latencies
            wts = share[:, None]
            perf = Perf(
                concurrency=C[None, :],
                batch=(perf.batch * wts).sum(0, keepdims=True),
                tps_gpu=(perf.tps_gpu * wts).sum(0, keepdims=True),
                tps_user=np.nanmin(perf.tps_user, 0, keepdims=True),
                ttft=np.nanmax(perf.ttft, 0, keepdims=True),
                tpot=np.nanmax(perf.tpot, 0, keepdims=True),
                step=np.max(perf.step, 0, keepdims=True),
                requests_per_s=perf.requests_per_s.sum(0, keepdims=True),
                input_tps_gpu=(perf.input_tps_gpu * wts).sum(0, keepdims=True),
                bound=perf.bound[:1],
                limit=perf.limit[:1],
                capacity=np.asarray([[total_cap]]),
                steps={"mixed": perf.steps["mixed"]},
            )
        return "mixed", levels_from_perf(perf, 0, sat)
    pre = [r for r in roles if r.kind == "prefill"]
    dec = [r for r in roles if r.kind == "decode"]
    if len(pre) > 1 or len(dec) > 1:
        raise UserError(
            f"perf: the model predicts one prefill and one decode role per deployment. Given roles: {kinds}. "
            "Valid: mixed roles, or at most one prefill and one decode role."
        )
    if pre and dec:
        rp, rd = RoleBatch.build(arch, pre, cal), RoleBatch.build(arch, dec, cal)
        C, sat = with_saturation(
            levels, float(serve_pd(rp, rd, cal, workload, levels[None, :1]).capacity[0, 0]), saturation
        )
        return "pd", levels_from_perf(serve_pd(rp, rd, cal, workload, C[None, :]), 0, sat)
    if dec:
        rd = RoleBatch.build(arch, dec, cal)
        C, sat = with_saturation(
            levels, float(serve_decode_only(rd, cal, workload, levels[None, :1]).capacity[0, 0]), saturation
        )
        return "decode-only", levels_from_perf(serve_decode_only(rd, cal, workload, C[None, :]), 0, sat)
    rp = RoleBatch.build(arch, pre, cal)
    C, sat = with_saturation(
        levels, float(serve_prefill_only(rp, cal, workload, levels[None, :1]).capacity[0, 0]), saturation
    )
    return "prefill-only", levels_from_perf(serve_prefill_only(rp, cal, workload, C[None, :]), 0, sat)
