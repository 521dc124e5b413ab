"""widep experts: the expert-load file format, balancedness over EP ranks, EPLB advice, predict --expert-load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from widep.cli import main
from widep.errors import UserError
from widep.experts.advise import LL_BUFFER_CAP_GIB, advise, ll_buffer
from widep.experts.analysis import balancedness, rank_loads, static_placement
from widep.experts.load import parse_expert_load
from widep.plan.core import plan
from widep.spec.topology import load_topology

ROOT = Path(__file__).parents[1]
R1 = ROOT / "topologies" / "deepseek-r1-decode-2x8-h200.yaml"
TINY = ROOT / "topologies" / "tiny-moe-cpu-ep2.yaml"


def zipf_counts(layers: int, experts: int, seed: int = 0, s: float = 1.0) -> list[list[int]]:
    """A skewed synthetic record: each layer's experts get Zipf(s) shares in a random order."""
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, experts + 1) ** s
    rows = np.stack([rng.permutation(w) for _ in range(layers)])
    return (rows / rows.sum(1, keepdims=True) * 800_000).round().astype(int).tolist()


def write(tmp_path: Path, name: str, doc: dict) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def record(counts: list[list[int]], model: str = "deepseek-r1") -> dict:
    return {
        "model": model,
        "layers": len(counts),
        "experts": len(counts[0]),
        "counts": counts,
        "tokens": 100_000,
        "source": "synthetic",
    }


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"layers": 2, "experts": 2, "counts": []}, "counts is empty"),
        ({"layers": 2, "experts": 2, "counts": [[1, 2]]}, "counts has 1 rows but layers is 2"),
        ({"layers": 1, "experts": 3, "counts": [[1, 2]]}, "counts[0] has 2 values but experts is 3"),
        ({"layers": 1, "experts": 2, "counts": [[1, -2]]}, "counts[0][1] is negative"),
        ({"layers": 1, "experts": 2, "counts": [[0, 0]]}, "every count is 0"),
        ({"layers": 0, "experts": 2, "counts": [[1, 2]]}, "layers must be a positive integer"),
        ({"layers": 1, "experts": 2, "counts": [[1, "x"]]}, "counts[0][1] must be a finite number"),
        ({"experts": 2, "counts": [[1, 2]]}, "'layers' is missing"),
        ({"layers": 1, "experts": 2, "counts": [[1, 2]], "extra": 1}, "unknown keys ['extra']"),
        ([1, 2], "must hold a JSON object"),
    ],
)
def test_bad_files_exit_2_naming_the_problem(tmp_path: Path, capsys, doc, needle: str) -> None:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    assert main(["experts", "show", str(p)]) == 2
    assert needle in capsys.readouterr().err


def test_layers_experts_must_match_the_topology_model(tmp_path: Path, capsys) -> None:
    p = write(tmp_path, "r.json", record(zipf_counts(2, 8), "tiny"))
    assert main(["experts", "show", str(p), "--topology", str(R1)]) == 2
    err = capsys.readouterr().err
    assert "experts=8" in err and "256 routed experts" in err
    p = write(tmp_path, "r2.json", record(zipf_counts(3, 8), "tiny"))
    assert main(["experts", "show", str(p), "--topology", str(TINY)]) == 2
    assert "layers=3" in capsys.readouterr().err
    assert main(["experts", "show", str(tmp_path / "missing.json")]) == 2


def test_balancedness_is_mean_over_max_per_layer_across_ranks() -> None:
    counts = np.asarray([[4.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    loads = rank_loads(counts, static_placement(4, 4), 2)  # rank 0: experts 0,1; rank 1: experts 2,3
    assert loads.tolist() == [[4.0, 4.0], [2.0, 2.0]]
    loads = rank_loads(np.asarray([[6.0, 0.0, 1.0, 1.0]]), static_placement(4, 4), 2)
    assert balancedness(loads).tolist() == pytest.approx([4.0 / 6.0])
    # a redundant replica splits its expert's load evenly: expert 0 on both ranks (slots 0,1,2 | 3,0,...)
    p2l = np.asarray([[0, 1, 2, 0, 3, 1]])
    loads = rank_loads(np.asarray([[6.0, 2.0, 1.0, 1.0]]), p2l, 2)
    assert loads.tolist() == [[3.0 + 1.0 + 1.0, 3.0 + 1.0 + 1.0]]
    assert balancedness(np.asarray([[0.0, 0.0]])).tolist() == [1.0]


def test_show_json_and_png(tmp_path: Path, capsys) -> None:
    p = write(tmp_path, "r.json", record(zipf_counts(58, 256)))
    png = tmp_path / "heat.png"
    assert main(["experts", "show", str(p), "--topology", str(R1), "--png", str(png), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ep_ranks"] == 16 and len(d["per_layer"]) == 58 and len(d["rank_tokens"][0]) == 16
    assert 1 / 16 <= d["balancedness"] < 0.6
    assert d["hottest"][0]["share_of_layer"] > 0.05
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def r1_advice() -> dict:
    load = parse_expert_load(record(zipf_counts(58, 256)))
    return advise(load, plan(load_topology(R1)))


def test_advise_skewed_r1_memory_grows_balance_improves(r1_advice: dict) -> None:
    c = r1_advice["candidates"]
    assert r1_advice["algorithm"].startswith("vllm.distributed.eplb")
    assert [x["redundant_experts"] for x in c[1:4]] == [0, 16, 32]
    on = c[1:]
    mem = [x["extra_memory_gib_per_gpu"] for x in on]
    assert all(b > a for a, b in zip(mem, mem[1:], strict=False))
    assert 2.0 < on[1]["extra_memory_gib_per_gpu"] < 3.0  # one DeepSeek-R1 expert slot per GPU: ~2.4 GiB, FP8
    lost = [x["kv_tokens_lost"] for x in on]
    assert all(b > a for a, b in zip(lost, lost[1:], strict=False))
    bal = [x["balancedness"] for x in c]
    assert bal[0] < bal[1] < bal[2]
    assert all(b >= a - 0.005 for a, b in zip(bal[1:], bal[2:], strict=False))
    assert c[0]["predicted_tps_per_gpu"] < c[2]["predicted_tps_per_gpu"]
    rec = r1_advice["recommendation"]
    assert rec["eplb_enabled"] and rec["redundant_experts"] > 0
    assert r1_advice["eplb"]["enabled"] and r1_advice["eplb"]["redundant_experts"] == rec["redundant_experts"]


def test_advise_respects_the_deepep_low_latency_buffer_cap(tmp_path: Path) -> None:
    text = (
        R1.read_text()
        .replace("max_num_seqs: 256", "max_num_seqs: 4096")
        .replace("max_num_batched_tokens: 256", "max_num_batched_tokens: 4096")
    )
    topo = tmp_path / "big-batch.yaml"
    topo.write_text(text)
    d = advise(parse_expert_load(record(zipf_counts(58, 256))), plan(load_topology(topo)))
    c = d["candidates"]
    assert all(x["all2all_buffer_gib_per_gpu"] <= LL_BUFFER_CAP_GIB + 1e-6 for x in c)
    capped = [x for x in c if x["buffer_capped"]]
    assert capped and all(x["buffer_tokens_per_rank"] < 4096 for x in capped)
    assert not c[0]["buffer_capped"]
    toks = [x["buffer_tokens_per_rank"] for x in c]
    assert all(b <= a for a, b in zip(toks, toks[1:], strict=False))
    b, usable = ll_buffer(256 + 256, 7168, 4096)
    assert b <= LL_BUFFER_CAP_GIB * 2**30 and usable < 4096


def test_planner_sizes_the_deepep_ll_buffer_from_physical_experts(tmp_path: Path) -> None:
    """widep/plan/memory.py: the low-latency buffer has a slot per physical (logical + redundant) expert, capped at
    32 GiB; the plan of a topology with R redundant experts agrees with advise's candidate for R."""
    from widep.plan.memory import all2all_buffer_bytes

    mems = {}
    for r in (0, 32, 256):
        topo = tmp_path / f"r{r}.yaml"
        eplb = f"    eplb: {{enabled: true, redundant_experts: {r}}}\n" if r else ""
        topo.write_text(
            R1.read_text().replace(
                "    all2all_backend: deepep_low_latency\n", "    all2all_backend: deepep_low_latency\n" + eplb
            )
        )
        rp = plan(load_topology(topo)).roles[0]
        assert rp.physical_experts == 256 + r
        mems[r] = rp.memory
    b = [mems[r].all2all_buffer_gib for r in (0, 32, 256)]
    assert b[0] < b[1] < b[2]
    assert b[1] == pytest.approx(ll_buffer(256 + 32, 7168, 256)[0] / 2**30)
    assert mems[0].kv_tokens > mems[32].kv_tokens > mems[256].kv_tokens
    d = advise(parse_expert_load(record(zipf_counts(58, 256))), plan(load_topology(R1)))
    cand = {c["redundant_experts"]: c for c in d["candidates"] if c["eplb_enabled"]}
    assert cand[32]["all2all_buffer_gib_per_gpu"] == pytest.approx(b[1], abs=1e-3)
    assert abs(cand[32]["kv_tokens_per_gpu"] - mems[32].kv_tokens) <= 2 * mems[32].block_tokens
    # the cap: 4096 tokens per rank x 513 slots would be 56 GiB; the buffer stays at 32 GiB
    big = all2all_buffer_bytes("deepep_low_latency", plan(load_topology(R1)).arch, 4096, 16, 16, 512)
    assert big <= LL_BUFFER_CAP_GIB * 2**30 < 2.0 * 513 * 4096 * (2 * 7168 + 16)


def test_uniform_load_recommends_eplb_off(tmp_path: Path, capsys) -> None:
    p = write(tmp_path, "u.json", record([[1000] * 256 for _ in range(58)]))
    assert main(["experts", "advise", str(p), "--topology", str(R1), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["candidates"][0]["balancedness"] == 1.0
    assert d["recommendation"]["eplb_enabled"] is False and d["recommendation"]["redundant_experts"] == 0
    assert d["eplb"]["enabled"] is False
    assert main(["experts", "advise", str(p), "--topology", str(R1)]) == 0
    assert "recommendation: EPLB off" in capsys.readouterr().out


def test_predict_uses_the_measured_imbalance(tmp_path: Path, capsys) -> None:
    skewed = write(tmp_path, "s.json", record(zipf_counts(58, 256)))
    uniform = write(tmp_path, "u.json", record([[1000] * 256 for _ in range(58)]))
    out = {}
    for name, extra in (
        ("default", []),
        ("skewed", ["--expert-load", str(skewed)]),
        ("uniform", ["--expert-load", str(uniform)]),
    ):
        assert main(["predict", str(R1), "--concurrency", "2048", "--json", *extra]) == 0
        out[name] = json.loads(capsys.readouterr().out)
    assert out["skewed"]["tps_per_gpu"] < out["default"]["tps_per_gpu"] < out["uniform"]["tps_per_gpu"]
    assert out["uniform"]["expert_load"]["roles"]["decode"]["skew"] == 0.0
    bad = write(tmp_path, "b.json", record(zipf_counts(2, 8), "tiny"))
    assert main(["predict", str(R1), "--concurrency", "8", "--expert-load", str(bad)]) == 2


def test_aggregator_reads_vllms_routed_experts_field() -> None:
    """The response field as vLLM's completion server encodes it (vllm.utils.serial_utils.numpy2base64)."""
    from vllm.utils.serial_utils import numpy2base64

    from widep.experts.record import NOT_ENABLED, Aggregator

    routed = np.asarray([[[0, 1], [2, 3]], [[0, 2], [3, 1]], [[0, 1], [1, 3]]], dtype=np.uint8)  # 3 tokens, 2 layers
    agg = Aggregator(layers=2, experts=4)
    agg.add_response({"choices": [{"text": "x", "routed_experts": numpy2base64(routed)}]})
    assert agg.counts.tolist() == [[3, 2, 1, 0], [0, 2, 1, 3]]
    assert agg.tokens == 3 and agg.requests == 1
    # a model with a dense first layer: the response has 3 layers, the first is not MoE
    agg3 = Aggregator(layers=2, experts=4)
    agg3.add(np.concatenate([np.zeros((3, 1, 2), np.uint8), routed], axis=1))
    assert agg3.counts.tolist() == agg.counts.tolist()
    load = agg.result("tiny", "test")
    assert load.counts[0] == (3.0, 2.0, 1.0, 0.0)
    with pytest.raises(UserError, match="--enable-return-routed-experts"):
        agg.add_response({"choices": [{"text": "x", "routed_experts": None}]})
    assert "serving.record_routed_experts: true" in NOT_ENABLED
    with pytest.raises(UserError, match="outside 0..3"):
        agg.add(np.full((1, 2, 2), 7, np.uint8))


def test_record_flag_is_rendered_when_the_topology_asks(tmp_path: Path) -> None:
    from widep.render.vllm import RenderContext, render

    text = R1.read_text() + "serving:\n  record_routed_experts: true\n"
    topo = tmp_path / "rec.yaml"
    topo.write_text(text)
    ctx = RenderContext(model_path="/m")
    on = render(plan(load_topology(topo)), ctx)
    off = render(plan(load_topology(R1)), ctx)
    assert len(on) == 16 and all("--enable-return-routed-experts" in c.argv for c in on)
    assert not any("--enable-return-routed-experts" in c.argv for c in off)
    old = tmp_path / "old.yaml"
    old.write_text(text + "vllm:\n  version: 0.11.0\n")
    with pytest.raises(UserError, match="serving.record_routed_experts: true with vLLM 0.11.0"):
        plan(load_topology(old))
    # on vLLM's CPU backend widep's vLLM plugin wires vLLM's AuxOutput connector into the CPU model runner: accepted
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text(TINY.read_text().replace("serving:\n", "serving:\n  record_routed_experts: true\n"))
    assert all("--enable-return-routed-experts" in c.argv for c in render(plan(load_topology(cpu)), ctx))
    # an MLA model on CPU: vLLM turns prefix caching off there, and the AuxOutput connector requires it
    mla = tmp_path / "mla.yaml"
    mla.write_text(cpu.read_text().replace("preset: tiny-moe", "preset: deepseek-v3\n  weight_dtype: bf16"))
    with pytest.raises(UserError, match="AuxOutput Connector requires prefix caching"):
        plan(load_topology(mla))
    # P/D: vLLM refuses routed-expert return with the NIXL KV connector
    pd = tmp_path / "pd.yaml"
    pd.write_text(
        (ROOT / "topologies" / "tiny-moe-cpu-pd.yaml")
        .read_text()
        .replace("serving:\n", "serving:\n  record_routed_experts: true\n")
    )
    with pytest.raises(UserError, match="incompatible with NixlConnector"):
        plan(load_topology(pd))


def hf_expert_counts(model_dir: Path, n_prompts: int = 16) -> list[list[int]]:
    """counts[layer][expert] of top-2 routing computed by transformers' forward of the built weights (the same
    checkpoint vLLM serves; the same skew from vLLM's own routed-expert return: tests/test_experts_vllm.py)."""
    import torch
    import transformers

    from widep.experts.record import prompts

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    E, k = model.config.num_experts, model.config.num_experts_per_tok
    counts = np.zeros((model.config.num_hidden_layers, E), dtype=int)
    with torch.no_grad():
        for text in prompts(n_prompts):
            ids = tok(text, return_tensors="pt")
            out = model(**ids, output_router_logits=True)
            for li, logits in enumerate(out.router_logits):
                top = torch.topk(logits, k, dim=-1).indices.reshape(-1).numpy()
                counts[li] += np.bincount(top, minlength=E)
    return counts.tolist()


def test_skewed_router_skews_the_tiny_moe(tiny_moe_dir: Path) -> None:
    from widep.tinymoe import ensure_tiny_moe, model_dir_name

    skewed_dir = ensure_tiny_moe("qwen3_moe", tiny_moe_dir.parent, router_skew=0.1)
    assert skewed_dir.name == model_dir_name("qwen3_moe", 0.1) != tiny_moe_dir.name
    balanced = np.asarray(hf_expert_counts(tiny_moe_dir), float)
    skewed = np.asarray(hf_expert_counts(skewed_dir), float)
    b_bal = balancedness(rank_loads(balanced, static_placement(8, 8), 2)).mean()
    b_skew = balancedness(rank_loads(skewed, static_placement(8, 8), 2)).mean()
    assert b_skew < 0.75 < b_bal, (b_skew, b_bal)
    assert skewed[:, :4].sum() > 0.7 * skewed.sum()  # the low-numbered half (EP rank 0) takes most of the picks
