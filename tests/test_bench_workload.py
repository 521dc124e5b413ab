"""Workload shapes, prompt building (real tokenizer of the tiny MoE), arrivals and level splits."""

from __future__ import annotations

import numpy as np
import pytest

from widep.bench.adapters import split_level
from widep.bench.loadgen import Level, arrival_times, normalize_endpoint
from widep.bench.workload import (
    PRESETS,
    LengthSpec,
    PromptBuilder,
    PromptPool,
    WorkloadSpec,
    build_prompts,
    parse_length,
    preset,
)
from widep.errors import UserError


def test_parse_length_forms():
    assert parse_length("1000") == LengthSpec(distribution="fixed", mean=1000)
    u = parse_length("uniform:800-1200")
    assert (u.distribution, u.min, u.max, u.mean) == ("uniform", 800, 1200, 1000)
    n = parse_length("normal:1000,100")
    assert (n.distribution, n.mean, n.std) == ("normal", 1000, 100.0)
    ln = parse_length("lognormal:1000,300,10,5000")
    assert (ln.distribution, ln.min, ln.max) == ("lognormal", 10, 5000)
    for spec in (u, n, ln, parse_length("7")):
        assert parse_length(spec.describe()).distribution == spec.distribution


@pytest.mark.parametrize(
    "text, needle",
    [
        ("abc", "Valid:"),
        ("gauss:1,2", "Valid:"),
        ("uniform:5", "LO-HI"),
        ("normal:100", "MEAN,STD"),
        ("normal:100,0", "std > 0"),
        ("0", "Given: '0'"),
        ("uniform:10-5", "max must be >= min"),
    ],
)
def test_parse_length_errors_are_for_people(text, needle):
    with pytest.raises(UserError) as err:
        parse_length(text, field="--isl")
    assert needle in str(err.value) and "--isl" in str(err.value)


def test_parse_length_did_you_mean():
    with pytest.raises(UserError, match="Did you mean 'normal'"):
        parse_length("norml:1000,10")


def test_distributions_sample_within_bounds_and_near_their_mean():
    rng = np.random.default_rng(1)
    assert set(parse_length("64").sample(rng, 100).tolist()) == {64}
    u = parse_length("uniform:10-20").sample(rng, 5000)
    assert u.min() == 10 and u.max() == 20
    n = parse_length("normal:1000,100").sample(rng, 20000)
    assert abs(n.mean() - 1000) < 5 and abs(n.std() - 100) < 5
    ln = parse_length("lognormal:1000,300").sample(rng, 20000)
    assert abs(ln.mean() - 1000) < 15 and abs(ln.std() - 300) < 15 and ln.min() >= 1
    clipped = parse_length("normal:10,100,1,20").sample(rng, 2000)
    assert clipped.min() == 1 and clipped.max() == 20


def test_presets():
    assert preset("10:1").isl == 10 * preset("10:1").osl
    assert preset("100:1").isl == 100 * preset("100:1").osl
    assert set(PRESETS) >= {"10:1", "100:1"}
    with pytest.raises(UserError, match="Valid: 10:1"):
        preset("10-1")


def test_prompts_have_exact_token_counts_with_the_model_tokenizer(tiny_moe_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_moe_dir))
    builder = PromptBuilder(str(tiny_moe_dir))
    assert builder.exact and builder.note is None
    wl = WorkloadSpec(isl=parse_length("uniform:1-300"), osl=parse_length("17"), tokenizer=str(tiny_moe_dir))
    prompts = build_prompts(wl, 60, level_seed=3, builder=builder)
    for p in prompts:
        assert len(tok.encode(p.text, add_special_tokens=False)) == p.input_tokens
        assert p.output_tokens == 17
    assert len({p.input_tokens for p in prompts}) > 10  # lengths really vary
    # reproducible from the seeds, different across levels
    again = build_prompts(wl, 60, level_seed=3, builder=builder)
    assert [p.text for p in again] == [p.text for p in prompts]
    assert build_prompts(wl, 5, level_seed=4, builder=builder)[0].text != prompts[0].text


def test_word_fallback_says_so_and_counts_words():
    b = PromptBuilder(None)
    assert not b.exact and "approximate" in b.note
    text, n = b.build(50, np.random.default_rng(0))
    assert n == 50 and len(text.split()) == 50


def test_bad_tokenizer_dir(tmp_path):
    with pytest.raises(UserError, match="local directory"):
        PromptBuilder(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="could not be loaded"):
        PromptBuilder(str(tmp_path))


def test_prompt_pool_reuse_makes_prompts_unique():
    b = PromptBuilder(None)
    wl = WorkloadSpec(isl=parse_length("8"), osl=parse_length("4"))
    pool = PromptPool(build_prompts(wl, 3, level_seed=0, builder=b))
    texts = [pool.get(i).text for i in range(9)]
    assert len(set(texts)) == 9
    assert pool.get(4).text.startswith("4: ") and pool.get(4).text.endswith(pool.get(1).text)


def test_poisson_arrivals():
    rng = np.random.default_rng(0)
    t = arrival_times(50.0, rng, n=5000)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    gaps = np.diff(t)
    assert abs(gaps.mean() - 0.02) < 0.001
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential: CV 1
    smooth = np.diff(arrival_times(50.0, rng, n=5000, burstiness=4.0))
    assert abs(smooth.std() / smooth.mean() - 0.5) < 0.05  # gamma(4): CV 1/2
    d = arrival_times(20.0, rng, duration_s=30.0)
    assert d.max() < 30.0 and abs(len(d) - 600) < 100


def test_split_level_over_endpoints():
    assert split_level(Level("concurrency", 5, num_requests=11), 2) == [(0, 3.0, 6), (1, 2.0, 5)]
    # fewer concurrency than endpoints: idle endpoints are left out
    assert split_level(Level("concurrency", 1, num_requests=4), 3) == [(0, 1.0, 2)]
    assert split_level(Level("rate", 3.0, num_requests=9), 3) == [(i, 1.0, 3) for i in range(3)]
    assert split_level(Level("rate", 2.0, duration_s=10), 2) == [(0, 1.0, 10), (1, 1.0, 10)]


def test_level_ids_and_endpoint_normalisation():
    assert Level("concurrency", 8, num_requests=1).id == "c8"
    assert Level("rate", 2.5, duration_s=1).id == "r2.5"
    with pytest.raises(ValueError):
        Level("rate", 1.0)
    assert normalize_endpoint("http://h:8000/v1/") == "http://h:8000"
    assert normalize_endpoint(" http://h:8000 ") == "http://h:8000"
