"""Per-level statistics on hand-made request timings (pure functions, no servers)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from widep.bench.metrics import Sample, parse_gauges, summarize_samples
from widep.bench.records import RequestRecord
from widep.bench.stats import PERCENTILES, Slo, describe, error_kinds, summarize


def rec(i, start, ttft, n_out, tpot, *, n_in=100, ok=True, error=None, incomplete=False, sched=None):
    """A successful request: first token at ttft, then n_out-1 tokens tpot apart, [DONE] 1 ms later."""
    if not ok:
        return RequestRecord(
            index=i,
            endpoint="http://a",
            start_s=start,
            error=error or "boom",
            incomplete=incomplete,
            e2e_s=None if incomplete else 0.01,
            scheduled_s=sched,
        )
    last = ttft + (n_out - 1) * tpot
    return RequestRecord(
        index=i,
        endpoint="http://a",
        start_s=start,
        ttft_s=ttft,
        last_token_s=last,
        e2e_s=last + 0.001,
        itls_s=[tpot] * (n_out - 1),
        chunks=n_out,
        prompt_tokens=n_in,
        completion_tokens=n_out,
        expected_input_tokens=n_in,
        expected_output_tokens=n_out,
        ok=True,
        scheduled_s=sched,
    )


def test_describe_matches_numpy_and_report_keys():
    vals = [5.0, 1.0, 3.0, 2.0, 4.0]
    d = describe(vals, scale=10.0)
    assert d["mean"] == pytest.approx(30.0)
    assert d["min"] == 10.0 and d["max"] == 50.0
    assert d["p50"] == pytest.approx(30.0)
    assert d["p90"] == pytest.approx(np.percentile([10, 20, 30, 40, 50], 90))  # 46
    assert d["p90"] == pytest.approx(46.0)
    assert d["stddev"] == pytest.approx(np.std([10, 20, 30, 40, 50]))
    assert set(d) == {"mean", "stddev", "min", "max", *(k for k, _ in PERCENTILES)}
    assert describe([]) is None


def test_tpot_is_last_minus_first_over_n_minus_one():
    r = rec(0, 0.0, ttft=0.2, n_out=11, tpot=0.05)
    assert r.tpot_s == pytest.approx(0.05)
    one = rec(1, 0.0, ttft=0.2, n_out=1, tpot=0.05)
    assert one.tpot_s is None  # no second token, no TPOT
    # the server's usage, not the chunk count, decides n (two tokens in one chunk)
    two_per_chunk = RequestRecord(
        index=2,
        endpoint="e",
        start_s=0,
        ttft_s=0.1,
        last_token_s=0.5,
        e2e_s=0.5,
        chunks=5,
        completion_tokens=9,
        ok=True,
    )
    assert two_per_chunk.tpot_s == pytest.approx(0.4 / 8)


def test_level_throughput_per_gpu_and_per_user():
    # 4 requests, 2 at a time, each: TTFT 100 ms, 10 tokens 20 ms apart -> 0.28 s (+1 ms to [DONE])
    recs = [
        rec(0, 0.0, 0.1, 10, 0.02),
        rec(1, 0.0, 0.1, 10, 0.02),
        rec(2, 0.281, 0.1, 10, 0.02),
        rec(3, 0.281, 0.1, 10, 0.02),
    ]
    s = summarize(recs, gpus=4)
    assert s.total == 4 and s.completed == 4 and s.failed == 0 and s.incomplete == 0
    assert s.duration_s == pytest.approx(0.281 + 0.281)
    assert s.output_tokens == 40 and s.input_tokens == 400
    assert s.output_tps == pytest.approx(40 / 0.562)
    assert s.total_tps == pytest.approx(440 / 0.562)
    assert s.output_tps_per_gpu == pytest.approx(40 / 0.562 / 4)
    assert s.request_rate == pytest.approx(4 / 0.562)
    assert s.tpot_ms["mean"] == pytest.approx(20.0)
    assert s.tps_per_user == pytest.approx(50.0)  # 1000 / 20 ms
    assert s.tps_per_user_req_mean == pytest.approx(50.0)
    assert s.ttft_ms["p50"] == pytest.approx(100.0)
    assert s.itl_ms["mean"] == pytest.approx(20.0) and s.itl_ms["max"] == pytest.approx(20.0)
    assert s.e2e_ms["max"] == pytest.approx(281.0)
    assert s.ntpot_ms["mean"] == pytest.approx(28.1)
    assert s.mean_inflight == pytest.approx(4 * 0.281 / 0.562)  # Little's law: 2 in flight
    assert s.send_lag_ms is None and s.goodput is None


def test_failures_incomplete_and_errors_do_not_count_as_tokens():
    recs = [
        rec(0, 0.0, 0.1, 10, 0.01),
        rec(1, 0.0, 0.0, 0, 0, ok=False, error="HTTP 500: x"),
        rec(2, 0.0, 0.0, 0, 0, ok=False, error="HTTP 500: x"),
        rec(3, 0.05, 0.0, 0, 0, ok=False, error="cancelled by the level time bound", incomplete=True),
    ]
    s = summarize(recs, gpus=1)
    assert (s.total, s.completed, s.failed, s.incomplete) == (4, 1, 2, 1)
    assert s.output_tokens == 10 and s.input_tokens == 100
    assert s.errors == {"HTTP 500: x": 2, "cancelled by the level time bound": 1}
    assert error_kinds(recs, limit=1) == {"HTTP 500: x": 2}
    none_ok = summarize(recs[1:], gpus=1)
    assert none_ok.completed == 0 and none_ok.ttft_ms is None and none_ok.tps_per_user is None


def test_goodput_against_slos():
    fast = rec(0, 0.0, 0.05, 10, 0.01)  # TTFT 50 ms, TPOT 10 ms
    slow_first = rec(1, 0.0, 0.5, 10, 0.01)  # TTFT 500 ms
    slow_decode = rec(2, 0.0, 0.05, 10, 0.1)  # TPOT 100 ms
    failed = rec(3, 0.0, 0, 0, 0, ok=False)
    recs = [fast, slow_first, slow_decode, failed]
    s = summarize(recs, gpus=2, slo=Slo(ttft_ms=200, tpot_ms=50), duration_s=2.0)
    assert s.goodput["requests"] == 1
    assert s.goodput["fraction"] == pytest.approx(0.25)
    assert s.goodput["request_rate"] == pytest.approx(0.5)
    assert s.goodput["output_tps"] == pytest.approx(10 / 2.0)
    assert s.goodput["output_tps_per_gpu"] == pytest.approx(2.5)
    assert s.goodput["slo"] == {"ttft_ms": 200, "tpot_ms": 50}
    assert Slo(e2e_ms=200).met_by(fast) and not Slo(e2e_ms=200).met_by(slow_first)  # 141 vs 591 ms
    assert summarize(recs, gpus=1, slo=Slo()).goodput is None  # no SLO given, no goodput


def test_send_lag_from_scheduled_times():
    recs = [
        rec(i, start=i * 0.1 + lag, ttft=0.01, n_out=2, tpot=0.01, sched=i * 0.1)
        for i, lag in enumerate([0.0005, 0.001, 0.002, 0.0])
    ]
    s = summarize(recs, gpus=1)
    assert s.send_lag_ms["max"] == pytest.approx(2.0)
    assert s.send_lag_ms["mean"] == pytest.approx(0.875)


def test_empty_level_and_bad_gpus():
    s = summarize([], gpus=1)
    assert s.total == 0 and s.duration_s == 0.0 and s.output_tps == 0.0
    with pytest.raises(ValueError):
        summarize([], gpus=0)


def test_record_json_round_trip():
    r = rec(7, 1.5, 0.1, 5, 0.02, sched=1.4)
    back = RequestRecord.from_json(r.to_json())
    assert back.itls_s == pytest.approx(r.itls_s)
    assert back.tpot_s == pytest.approx(r.tpot_s)
    assert (back.index, back.start_s, back.scheduled_s, back.completion_tokens) == (7, 1.5, 1.4, 5)


def test_parse_gauges_sums_engines_and_averages_kv():
    text = """# HELP vllm:num_requests_running Number of requests
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m x"} 3.0
vllm:num_requests_running{engine="1",model_name="m x"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m x"} 1.0 1700000000000
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9.0
vllm:kv_cache_usage_perc{engine="0",model_name="m x"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m x"} 0.75
vllm:prompt_tokens_total{engine="0"} 123.0
vllm:kv_cache_usage_perc{engine="2"} NaN
"""
    g = parse_gauges(text)
    assert g == {"running": 5.0, "waiting": 1.0, "kv_cache_usage": 0.5}
    assert parse_gauges("up 1\n") == {}


def test_summarize_samples_per_endpoint():
    ss = [
        Sample("a", 0.0, 0.0, running=1, waiting=0, kv_cache_usage=0.1),
        Sample("a", 1.0, 1.0, running=3, waiting=2, kv_cache_usage=0.3),
        Sample("b", 0.0, 0.0, error="ClientConnectorError: refused"),
    ]
    out = summarize_samples(ss)
    assert out["a"]["running"]["mean"] == pytest.approx(2.0)
    assert out["a"]["kv_cache_usage"]["max"] == pytest.approx(0.3)
    assert out["b"]["failed_scrapes"] == 1 and out["b"]["running"] is None
    assert "refused" in out["b"]["last_error"]
    assert not math.isnan(out["a"]["waiting"]["p99"])
