"""Model catalog: parameter counts come out of the architecture and match published totals."""

import json

import pytest

from widep.errors import UserError
from widep.spec.models import arch_from_config, load_config_file, load_preset, preset_names


@pytest.mark.parametrize("name", [n for n in preset_names() if n != "tiny-moe"])
def test_total_params_match_published(name):
    a = load_preset(name)
    assert a.published_total_b is not None
    assert a.params.total / 1e9 == pytest.approx(a.published_total_b, rel=0.03)


def test_deepseek_r1_by_hand():
    a = load_preset("deepseek-r1")
    attn = 7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256 + 128 * 128 * 7168
    assert attn == pytest.approx(187.1e6, rel=1e-3)
    expert = 3 * 7168 * 2048
    assert a.params.routed_expert == expert == 44_040_192
    assert a.num_moe_layers == 58
    assert a.params.routed_experts == 58 * 256 * expert
    assert a.params.total / 1e9 == pytest.approx(671.0, abs=0.1)
    assert a.active_params / 1e9 == pytest.approx(37.5, abs=0.2)
    # MLA: 576 values per token per layer, 61 layers, BF16 -> 70,272 B/token (DeepSeek's "70 KB").
    assert a.kv_bytes_per_token(tp=1, kv_dtype="bf16") == 576 * 2 * 61 == 70_272
    # TP does not split the latent: every TP rank stores it all.
    assert a.kv_bytes_per_token(tp=4, kv_dtype="bf16") == 70_272
    assert a.kv_bytes_per_token(tp=1, kv_dtype="fp8") == 656 * 61


def test_qwen3_30b_by_hand():
    a = load_preset("qwen3-30b-a3b")
    assert a.params.routed_expert == 3 * 2048 * 768
    assert a.num_moe_layers == 48 and a.routed_experts == 128 and a.top_k == 8
    # GQA: 4 KV heads x 128 dims, K and V, 48 layers, BF16.
    assert a.kv_bytes_per_token(tp=1, kv_dtype="bf16") == 2 * 4 * 128 * 2 * 48 == 98_304
    assert a.kv_bytes_per_token(tp=2, kv_dtype="bf16") == 98_304 / 2
    assert a.kv_bytes_per_token(tp=8, kv_dtype="bf16") == 2 * 1 * 128 * 2 * 48  # replicated past 4 KV heads


def test_gpt_oss_sliding_window_layers_do_not_grow():
    a = load_preset("gpt-oss-120b")
    assert a.full_attention_layers == 18
    assert a.default_weight_dtype == "mxfp4"


def test_dense_config_refused(tmp_path):
    cfg = {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "vocab_size": 32000,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="dense model"):
        load_config_file(tmp_path)


def test_config_dir_and_file(tmp_path):
    cfg = json.loads(
        (__import__("pathlib").Path(__file__).parents[1] / "widep/spec/presets/models/mixtral-8x7b.json").read_text()
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_config_file(tmp_path).routed_experts == 8
    assert load_config_file(tmp_path / "config.json").top_k == 2
    with pytest.raises(UserError, match="no such file"):
        load_config_file(tmp_path / "nope.json")


def test_unknown_preset_suggests():
    with pytest.raises(UserError, match="Did you mean 'deepseek-r1'"):
        load_preset("deepseek-r2")


def test_missing_key_named():
    with pytest.raises(UserError, match="vocab_size"):
        arch_from_config(
            {
                "model_type": "mixtral",
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 1,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
            },
            "x",
        )


def test_tiny_preset_matches_the_builder():
    """The planner's tiny-moe preset describes exactly the model widep.tinymoe builds."""
    import widep.tinymoe as tm

    preset = json.loads(
        (__import__("pathlib").Path(__file__).parents[1] / "widep/spec/presets/models/tiny-moe.json").read_text()
    )
    built = tm._arch_config(preset["_widep"]["builtin"])
    for key, value in built.items():
        if key in ("rms_norm_eps", "initializer_range"):
            continue
        assert preset[key] == value, key
