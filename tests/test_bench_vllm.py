"""widep bench against the real CPU vLLM serving the tiny MoE (one DP rank: see docs/architecture.md)."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
import yaml
from llmd_benchmark_report import BenchmarkReportV02, load_benchmark_report
from vllm_helpers import start_vllm

from widep.bench.report import read_records
from widep.cli import main


def _free_port() -> int:
    """A free port below the ephemeral range (launch_helpers.free_ports says why)."""
    from launch_helpers import free_ports

    return free_ports(1)[0]


def _generation_tokens(url: str) -> float:
    """vLLM's own counter of generated tokens (all engines)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    vals = re.findall(r"^vllm:generation_tokens_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    assert vals, "vllm:generation_tokens_total missing from /metrics"
    return sum(float(v) for v in vals)


@pytest.mark.vllm
def test_bench_against_real_cpu_vllm(vllm_python, tiny_moe_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_moe_dir))
    specials = len(tok("wide").input_ids) - len(tok("wide", add_special_tokens=False).input_ids)
    argv = [
        "--model",
        str(tiny_moe_dir),
        "--enforce-eager",
        "--served-model-name",
        "tiny-moe",
        "--max-model-len",
        "512",
    ]
    with start_vllm(argv, {"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=300, python=vllm_python) as srv:
        # 1. built-in generator, two levels; model name and tokenizer found from /v1/models
        before = _generation_tokens(srv.url)
        out = tmp_path / "builtin"
        rc = main(
            [
                "bench",
                "--endpoint",
                srv.url,
                "--gpus",
                "1",
                "--concurrency",
                "1,2",
                "--isl",
                "24",
                "--osl",
                "8",
                "--num-requests",
                "4",
                "--warmup",
                "1",
                "--out",
                str(out),
                "--scrape-interval",
                "0.25",
                "--accelerator",
                "cpu",
            ]
        )
        err = capsys.readouterr().err
        assert rc == 0, err
        assert "model: tiny-moe" in err and f"tokenizer: {tiny_moe_dir}" in err
        generated = _generation_tokens(srv.url) - before
        total_completion = 8  # the warm-up request
        for level in ("c1", "c2"):
            doc = yaml.safe_load((out / f"level-{level}.report.yaml").read_text())
            assert isinstance(load_benchmark_report(doc), BenchmarkReportV02)
            recs = read_records(out / f"level-{level}.requests.jsonl")
            assert len(recs) == 4 and all(r.ok for r in recs), [r.error for r in recs]
            # the server's usage: exactly the requested lengths (ignore_eos), prompt as tokenized here
            assert {r.completion_tokens for r in recs} == {8}
            assert {r.prompt_tokens - r.expected_input_tokens for r in recs} == {specials}
            assert {r.expected_input_tokens for r in recs} == {24}
            assert all(1 <= r.chunks <= 8 and r.ttft_s > 0 and r.tpot_s > 0 for r in recs)
            total_completion += sum(r.completion_tokens for r in recs)
            agg = doc["results"]["request_performance"]["aggregate"]
            assert agg["requests"]["output_length"]["mean"] == 8
            comps = doc["results"]["observability"]["components"]
            assert comps[0]["replica_id"] == srv.url and "kv_cache_usage" in comps[0]["aggregate"]
        # usage in the streams agrees with the server's own Prometheus counter
        assert generated == total_completion

        # 2. a rank that does not answer: its requests are errors, the level still reports
        dead = f"http://127.0.0.1:{_free_port()}"
        out2 = tmp_path / "dead-rank"
        rc = main(
            [
                "bench",
                "--endpoint",
                srv.url,
                "--endpoint",
                dead,
                "--gpus",
                "2",
                "--concurrency",
                "2",
                "--isl",
                "16",
                "--osl",
                "4",
                "--num-requests",
                "6",
                "--warmup",
                "0",
                "--out",
                str(out2),
            ]
        )
        capsys.readouterr()
        assert rc == 0
        recs = read_records(out2 / "level-c2.requests.jsonl")
        assert sorted((r.endpoint, r.ok) for r in recs) == sorted([(dead, False)] * 3 + [(srv.url, True)] * 3)
        assert all(r.error.startswith("cannot connect") for r in recs if not r.ok)
        summ = json.loads((out2 / "level-c2.summary.json").read_text())["summary"]
        assert (summ["completed"], summ["failed"]) == (3, 3)

        # 3. vllm bench serve as the generator, landing in the same report format
        out3 = tmp_path / "vllm-gen"
        rc = main(
            [
                "bench",
                "--endpoint",
                srv.url,
                "--gpus",
                "1",
                "--model",
                "tiny-moe",
                "--tokenizer",
                str(tiny_moe_dir),
                "--concurrency",
                "2",
                "--isl",
                "24",
                "--osl",
                "8",
                "--num-requests",
                "4",
                "--generator",
                "vllm",
                "--vllm-python",
                vllm_python,
                "--out",
                str(out3),
            ]
        )
        err = capsys.readouterr().err
        assert rc == 0, err + "\n".join(p.read_text()[-2000:] for p in out3.glob("*.native/*.log"))
        doc = yaml.safe_load((out3 / "level-c2.report.yaml").read_text())
        assert isinstance(load_benchmark_report(doc), BenchmarkReportV02)
        assert doc["scenario"]["load"]["standardized"]["tool"] == "vllm-benchmark"
        assert doc["scenario"]["load"]["standardized"]["tool_version"] not in ("", "unknown")
        recs = read_records(out3 / "level-c2.requests.jsonl")
        assert len(recs) == 4 and all(r.ok for r in recs)
        assert {r.completion_tokens for r in recs} == {8}
        assert all(r.ttft_s > 0 and len(r.itls_s) >= 1 for r in recs)
        assert (out3 / "level-c2.native" / "ep0.json").exists()
