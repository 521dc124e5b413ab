"""MoE model architectures, read from Hugging Face ``config.json`` files.

Every figure the planner uses (parameter counts, bytes per rank, KV bytes per token) is computed
from the architecture, never typed in. Presets are ordinary ``config.json`` files under
``widep/spec/presets/models/`` with one extra ``_widep`` key (hub id, default weight dtype, the
published totals used by the tests as a cross-check).

Supported families: DeepSeek-V2/V3/R1 and Kimi-K2 (MLA), Qwen3-MoE, Mixtral, gpt-oss.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from widep.errors import UserError, did_you_mean

PRESET_DIR = "presets/models"

# Bytes per parameter of linear-layer weights for each weight dtype (block scales added separately).
WEIGHT_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "mxfp4": 0.5, "int4": 0.5}
# Extra bytes per parameter for quantisation scales: FP8 128x128 blocks carry one fp32 scale per
# 16384 weights; MXFP4 carries one e8m0 scale per 32 weights.
SCALE_BYTES = {"bf16": 0.0, "fp16": 0.0, "fp8": 4.0 / (128 * 128), "mxfp4": 1.0 / 32, "int4": 2.0 / 128}


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model, split the way wide EP splits them across GPUs."""

    embedding: int
    """Input embedding plus LM head (vocab-parallel under TP, replicated across DP)."""
    attention: int
    """All attention projections and their norms, summed over layers (sharded by TP)."""
    dense_mlp: int
    """Dense FFN layers (the first ``first_k_dense`` layers of DeepSeek models)."""
    shared_experts: int
    """Shared experts of MoE layers (replicated across DP, sharded by TP)."""
    router: int
    """Router (gate) weights and biases."""
    norms: int
    """Layer norms not counted with attention, and the final norm."""
    routed_expert: int
    """Parameters of ONE routed expert in ONE layer."""
    routed_experts: int
    """All routed experts over all MoE layers."""

    @property
    def non_expert(self) -> int:
        """Everything except routed experts: what every DP rank holds (divided by TP)."""
        return self.embedding + self.attention + self.dense_mlp + self.shared_experts + self.router + self.norms

    @property
    def total(self) -> int:
        """Total parameters (without MTP / next-token-prediction layers)."""
        return self.non_expert + self.routed_experts


@dataclass(frozen=True)
class MoEArch:
    """The architecture facts widep needs, normalised across model families."""

    name: str
    """Preset name or the config file's path."""
    model_type: str
    """Hugging Face ``model_type`` (deepseek_v3, qwen3_moe, mixtral, gpt_oss, ...)."""
    hidden: int
    num_layers: int
    num_moe_layers: int
    vocab: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    """Per-head dim of q/k for GQA models; for MLA, qk_nope + qk_rope."""
    routed_experts: int
    shared_experts: int
    top_k: int
    moe_intermediate: int
    dense_intermediate: int
    tie_embeddings: bool
    max_position_embeddings: int
    mla: bool
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    attention_bias: bool = False
    expert_bias: bool = False
    qk_norm: bool = False
    full_attention_layers: int = 0
    """Layers whose KV grows with context (all layers, unless sliding-window layers exist)."""
    sliding_window: int | None = None
    default_weight_dtype: str = "bf16"
    hf_id: str | None = None
    builtin: str | None = None
    """Name of a widep-built model (``tiny-moe``): built locally, never downloaded."""
    published_total_b: float | None = None
    published_active_b: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- parameter counts -------------------------------------------------------------
    @property
    def params(self) -> ParamCounts:
        return _count_params(self)

    @property
    def active_params(self) -> int:
        """Parameters touched per token: non-expert weights plus top-k routed experts per MoE layer."""
        p = self.params
        return p.non_expert + self.num_moe_layers * self.top_k * p.routed_expert

    # ---- KV cache ---------------------------------------------------------------------
    def kv_elements_per_token_per_layer(self, tp: int) -> float:
        """KV elements one GPU stores per token per layer at tensor-parallel size ``tp``.

        MLA caches the compressed latent (kv_lora_rank + rope dims) once per token; it cannot be
        split by heads, so every TP rank holds the full latent (TP duplicates MLA KV). GQA caches K
        and V for its KV heads, split over TP ranks and replicated when TP exceeds the KV heads.
        """
        if self.mla:
            return float(self.kv_lora_rank + self.qk_rope_head_dim)
        heads_per_rank = max(1.0, self.num_kv_heads / tp)
        return 2.0 * heads_per_rank * self.head_dim

    def kv_bytes_per_token(self, tp: int, kv_dtype: str) -> float:
        """KV bytes per token per GPU over all layers that grow with context."""
        if self.mla and kv_dtype == "fp8":
            # vLLM's fp8_ds_mla layout: 512 fp8 latent + 4 fp32 scales + 64 bf16 rope = 656 B/layer.
            per_layer = float(self.kv_lora_rank + 4 * 4 + 2 * self.qk_rope_head_dim)
        else:
            per_layer = self.kv_elements_per_token_per_layer(tp) * KV_BYTES[kv_dtype]
        return per_layer * self.full_attention_layers

    def summary(self) -> dict[str, Any]:
        p = self.params
        return {
            "name": self.name,
            "model_type": self.model_type,
            "total_params_b": round(p.total / 1e9, 2),
            "active_params_b": round(self.active_params / 1e9, 2),
            "routed_experts": self.routed_experts,
            "shared_experts": self.shared_experts,
            "top_k": self.top_k,
            "moe_layers": self.num_moe_layers,
            "attention": "MLA" if self.mla else f"GQA {self.num_heads}q/{self.num_kv_heads}kv",
        }


KV_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0}


def _count_params(a: MoEArch) -> ParamCounts:
    h = a.hidden
    embedding = a.vocab * h * (1 if a.tie_embeddings else 2)
    # attention, per layer
    if a.mla:
        qk_head = a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank:
            q = h * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.num_heads * qk_head
        else:
            q = h * a.num_heads * qk_head
        kv = h * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
        kv += a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
        o = a.num_heads * a.v_head_dim * h
        attn = q + kv + o
    else:
        q = h * a.num_heads * a.head_dim
        kvp = 2 * h * a.num_kv_heads * a.head_dim
        o = a.num_heads * a.head_dim * h
        attn = q + kvp + o
        if a.attention_bias:
            attn += a.num_heads * a.head_dim + 2 * a.num_kv_heads * a.head_dim + h
        if a.qk_norm:
            attn += 2 * a.head_dim
        if a.model_type == "gpt_oss":
            attn += a.num_heads  # attention sinks
    attention = attn * a.num_layers
    norms = 2 * h * a.num_layers + h
    dense_layers = a.num_layers - a.num_moe_layers
    dense_mlp = dense_layers * 3 * h * a.dense_intermediate
    expert = 3 * h * a.moe_intermediate
    if a.expert_bias:
        expert += 2 * a.moe_intermediate + h
    shared = a.num_moe_layers * a.shared_experts * 3 * h * a.moe_intermediate
    router = a.num_moe_layers * (h * a.routed_experts + (a.routed_experts if a.model_type in _ROUTER_BIAS else 0))
    return ParamCounts(
        embedding=embedding,
        attention=attention,
        dense_mlp=dense_mlp,
        shared_experts=shared,
        router=router,
        norms=norms,
        routed_expert=expert,
        routed_experts=a.num_moe_layers * a.routed_experts * expert,
    )


# Families whose router carries a per-expert bias (DeepSeek-V3's e_score_correction_bias, gpt-oss).
_ROUTER_BIAS = {"deepseek_v3", "kimi_k2", "gpt_oss"}


# Bounds on config.json numbers: what any model vLLM serves has, with a wide margin (the largest today:
# 7168 hidden, 94 layers, 128 heads, 512 routed experts, top-10, 262144 positions, 256k vocabulary).
CONFIG_BOUNDS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 131072),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "n_routed_experts": (0, 4096),
    "num_experts": (0, 4096),
    "num_local_experts": (0, 4096),
    "num_experts_per_tok": (1, 4096),
    "experts_per_token": (1, 4096),
    "moe_intermediate_size": (1, 1 << 20),
    "intermediate_size": (1, 1 << 20),
    "shared_expert_intermediate_size": (0, 1 << 20),
    "n_shared_experts": (0, 64),
    "vocab_size": (1, 1 << 22),
    "max_position_embeddings": (1, 1 << 24),
    "head_dim": (1, 4096),
    "first_k_dense_replace": (0, 1024),
    "moe_layer_freq": (1, 1024),
    "decoder_sparse_step": (1, 1024),
    "kv_lora_rank": (1, 65536),
    "q_lora_rank": (1, 65536),
    "qk_nope_head_dim": (0, 4096),
    "qk_rope_head_dim": (0, 4096),
    "v_head_dim": (0, 4096),
    "sliding_window": (1, 1 << 24),
}


def _check_config(cfg: dict[str, Any], name: str) -> None:
    """UserError listing every config.json value of the wrong type or out of bounds (before any arithmetic)."""
    problems = []
    for key, (lo, hi) in CONFIG_BOUNDS.items():
        v = cfg.get(key)
        if v is None:
            continue
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or (isinstance(v, float) and not (math.isfinite(v) and v.is_integer()))
        ):
            problems.append(f"{key}: must be a whole number. Given: {v!r}.")
        elif not lo <= v <= hi:
            problems.append(f"{key}: {v!r} is out of range. Valid: {lo}..{hi} (bounds of any model vLLM serves).")
    for key, kind in (
        ("quantization_config", dict),
        ("mlp_only_layers", list),
        ("layer_types", list),
        ("text_config", dict),
        ("_widep", dict),
        ("model_type", str),
    ):
        if cfg.get(key) is not None and not isinstance(cfg[key], kind):
            problems.append(f"{key}: must be a {kind.__name__}. Given: {type(cfg[key]).__name__}.")
    if isinstance(cfg.get("mlp_only_layers"), list) and not all(
        isinstance(i, int) and not isinstance(i, bool) for i in cfg["mlp_only_layers"]
    ):
        problems.append("mlp_only_layers: must be a list of layer indices (whole numbers).")
    if not problems:
        routed = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts")
        top_k = cfg.get("num_experts_per_tok") or cfg.get("experts_per_token")
        if routed and top_k and top_k > routed:
            problems.append(f"num_experts_per_tok: top-{int(top_k)} of {int(routed)} experts. Valid: 1..{int(routed)}.")
        heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
        if heads and kv and kv > heads:
            problems.append(
                f"num_key_value_heads: {int(kv)} > num_attention_heads {int(heads)}. Valid: 1..{int(heads)}."
            )
    if problems:
        raise UserError(f"model {name!r}: invalid config.json:\n  " + "\n  ".join(problems))


def arch_from_config(cfg: dict[str, Any], name: str) -> MoEArch:
    """Normalise a Hugging Face config dict into :class:`MoEArch`; UserError if it is not MoE."""
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "_widep": cfg.get("_widep", {})}
    _check_config(cfg, name)
    meta = cfg.get("_widep", {})
    mt = str(cfg.get("model_type", "")).lower()
    routed = cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    if not routed:
        raise UserError(
            f"model {name!r}: this config.json describes a dense model (model_type={mt or 'unknown'!r}, no "
            "n_routed_experts / num_experts / num_local_experts). widep plans expert-parallel deployments of "
            "MoE models. Valid: DeepSeek-V2/V3/R1, Kimi-K2, Qwen3-MoE, Mixtral, gpt-oss configs."
        )

    def need(key: str) -> Any:
        if key not in cfg or cfg[key] is None:
            raise UserError(f"model {name!r}: config.json lacks {key!r}, which a {mt or 'MoE'} config must have.")
        return cfg[key]

    hidden = int(need("hidden_size"))
    layers = int(need("num_hidden_layers"))
    heads = int(need("num_attention_heads"))
    mla = "kv_lora_rank" in cfg and cfg.get("kv_lora_rank") is not None
    if mla:
        first_dense = int(cfg.get("first_k_dense_replace", 0))
        freq = int(cfg.get("moe_layer_freq", 1))
        moe_layers = sum(1 for i in range(layers) if i >= first_dense and i % freq == 0)
    elif mt in ("qwen3_moe", "qwen2_moe"):
        step = int(cfg.get("decoder_sparse_step", 1))
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        moe_layers = sum(1 for i in range(layers) if i not in mlp_only and (i + 1) % step == 0)
    else:
        moe_layers = layers
    top_k = int(cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or 0)
    if top_k <= 0:
        raise UserError(f"model {name!r}: config.json lacks num_experts_per_tok (the router's top-k).")
    moe_inter = int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0)
    dense_inter = int(cfg.get("intermediate_size") or moe_inter)
    shared = int(cfg.get("n_shared_experts") or 0)
    if mt == "qwen2_moe" and cfg.get("shared_expert_intermediate_size") and moe_inter:
        shared = max(1, round(cfg["shared_expert_intermediate_size"] / moe_inter))
    layer_types = cfg.get("layer_types")
    full_layers = layers
    if layer_types and cfg.get("sliding_window"):
        full_layers = sum(1 for t in layer_types if t == "full_attention")
    if mla:
        head_dim = int(cfg.get("qk_nope_head_dim", 0)) + int(cfg.get("qk_rope_head_dim", 0))
    else:
        head_dim = int(cfg.get("head_dim") or hidden // heads)
    quant = cfg.get("quantization_config") or {}
    qm = str(quant.get("quant_method", "")).lower()
    default_dtype = meta.get("weight_dtype") or ("fp8" if qm == "fp8" else "mxfp4" if qm == "mxfp4" else "bf16")
    return MoEArch(
        name=name,
        model_type=mt,
        hidden=hidden,
        num_layers=layers,
        num_moe_layers=moe_layers,
        vocab=int(need("vocab_size")),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        routed_experts=int(routed),
        shared_experts=shared,
        top_k=top_k,
        moe_intermediate=moe_inter,
        dense_intermediate=dense_inter,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        mla=mla,
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=int(cfg.get("kv_lora_rank") or 0),
        qk_nope_head_dim=int(cfg.get("qk_nope_head_dim") or 0),
        qk_rope_head_dim=int(cfg.get("qk_rope_head_dim") or 0),
        v_head_dim=int(cfg.get("v_head_dim") or 0),
        attention_bias=bool(cfg.get("attention_bias", False)),
        expert_bias=mt == "gpt_oss",
        qk_norm=mt == "qwen3_moe",
        full_attention_layers=full_layers,
        sliding_window=cfg.get("sliding_window") if layer_types else None,
        default_weight_dtype=default_dtype,
        hf_id=meta.get("hf_id"),
        builtin=meta.get("builtin"),
        published_total_b=meta.get("published_total_b"),
        published_active_b=meta.get("published_active_b"),
        extra={"quantization_config": quant},
    )


def preset_names() -> list[str]:
    """Names of the model presets shipped with widep."""
    root = resources.files("widep.spec") / PRESET_DIR
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


@cache
def load_preset(name: str) -> MoEArch:
    """The architecture of a named preset; UserError with the valid names otherwise."""
    names = preset_names()
    if name not in names:
        raise UserError(
            f"model.preset: unknown model preset {name!r}.{did_you_mean(name, names)} Valid: {', '.join(names)}."
        )
    path = resources.files("widep.spec") / PRESET_DIR / f"{name}.json"
    return arch_from_config(json.loads(path.read_text()), name)


def load_config_file(path: str | Path) -> MoEArch:
    """Read a local ``config.json`` (or a model directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UserError(f"model.config: no such file {str(p)!r}. Give a Hugging Face config.json or a model directory.")
    from widep.spec.safeyaml import read_text

    try:
        cfg = json.loads(read_text(p, "model.config"))
    except (json.JSONDecodeError, RecursionError, ValueError) as err:
        raise UserError(f"model.config: {str(p)!r} is not valid JSON ({err}).") from None
    if not isinstance(cfg, dict):
        raise UserError(f"model.config: {str(p)!r} must hold a JSON object, got {type(cfg).__name__}.")
    return arch_from_config(cfg, str(p))
