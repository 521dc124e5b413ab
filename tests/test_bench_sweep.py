"""The built-in generator and sweeps against real local streaming HTTP servers.

The servers are ``widep.bench.echo_server`` processes: real aiohttp servers on 127.0.0.1 that stream
OpenAI-style SSE chunks (one per token, a usage chunk, [DONE]) and serve vLLM's /metrics gauges.
They stand in for vLLM where a test needs speed or has to kill a server mid-level; the real CPU
vLLM is exercised in test_bench_vllm.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from llmd_benchmark_report import BenchmarkReportV02, load_benchmark_report

from widep.bench.loadgen import Level
from widep.bench.plot import load_points, pareto_front, plot_runs
from widep.bench.report import read_records, read_report, stack_from_endpoints
from widep.bench.stats import Slo
from widep.bench.sweep import SweepConfig, run_sweep
from widep.bench.workload import WorkloadSpec, parse_length
from widep.cli import main
from widep.errors import UserError


@dataclass
class Echo:
    url: str
    proc: subprocess.Popen

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def echo():
    started: list[Echo] = []

    def start(ttft_ms: float = 1.0, itl_ms: float = 0.5, port: int = 0) -> Echo:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "widep.bench.echo_server",
                "--port",
                str(port),
                "--ttft-ms",
                str(ttft_ms),
                "--itl-ms",
                str(itl_ms),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        line = proc.stdout.readline().strip()
        assert line.startswith("PORT="), f"echo server did not start: {line!r}"
        e = Echo(f"http://127.0.0.1:{line[5:]}", proc)
        started.append(e)
        return e

    yield start
    for e in started:
        e.kill()


def free_port() -> int:
    """A free port below the ephemeral range (launch_helpers.free_ports says why)."""
    from launch_helpers import free_ports

    return free_ports(1)[0]


def cfg_for(endpoints, levels, *, isl="32", osl="16", gpus=None, **kw) -> SweepConfig:
    wl = WorkloadSpec(isl=parse_length(isl), osl=parse_length(osl))
    base = dict(
        endpoints=tuple(endpoints),
        model="echo",
        workload=wl,
        levels=tuple(levels),
        stack=stack_from_endpoints(endpoints, gpus=gpus or 2 * len(endpoints), model="echo"),
        warmup_requests=0,
        scrape_interval_s=0.2,
        request_timeout_s=30,
    )
    base.update(kw)
    return SweepConfig(**base)


def test_sweep_writes_valid_reports_jsonl_csv_and_plots(echo, tmp_path):
    a, b = echo(), echo()
    levels = [
        Level("concurrency", 1, num_requests=12),
        Level("concurrency", 4, num_requests=24),
        Level("rate", 40.0, num_requests=30),
    ]
    out = tmp_path / "run-a"
    outcomes = run_sweep(cfg_for([a.url, b.url + "/v1"], levels, slo=Slo(ttft_ms=1000), warmup_requests=2), out)
    assert [o.status for o in outcomes] == ["done", "done", "done"]

    for lv in levels:
        # a valid llm-d v0.2.1 Benchmark Report, checked by the package's own loader
        doc = yaml.safe_load((out / f"level-{lv.id}.report.yaml").read_text())
        br = load_benchmark_report(doc)
        assert isinstance(br, BenchmarkReportV02) and doc["version"] == "0.2.1"
        agg = doc["results"]["request_performance"]["aggregate"]
        assert agg["requests"]["total"] == lv.num_requests and agg["requests"]["failures"] == 0
        assert agg["requests"]["output_length"]["mean"] == 16
        assert agg["latency"]["time_per_output_token"]["units"] == "ms/token"
        assert doc["scenario"]["stack"][0]["standardized"]["accelerator"]["count"] == 4
        load = doc["scenario"]["load"]["standardized"]
        assert load.get("concurrency") == lv.concurrency and load.get("rate_qps") == lv.rate
        # /metrics of both ranks, scraped during the level
        comps = doc["results"]["observability"]["components"]
        assert {c["replica_id"] for c in comps} == {a.url, b.url}
        assert all("running_requests" in c["aggregate"] for c in comps)

        recs = read_records(out / f"level-{lv.id}.requests.jsonl")
        assert len(recs) == lv.num_requests and all(r.ok for r in recs)
        assert {r.completion_tokens for r in recs} == {16} and {r.prompt_tokens for r in recs} == {32}
        assert all(r.chunks == 16 and len(r.itls_s) == 15 for r in recs)
        # round robin over both endpoints by request number
        assert {r.endpoint for r in recs if r.index % 2 == 0} == {a.url}
        assert {r.endpoint for r in recs if r.index % 2 == 1} == {b.url}

        summ = json.loads((out / f"level-{lv.id}.summary.json").read_text())["summary"]
        thr = agg["throughput"]["output_token_rate"]["mean"]
        assert summ["output_tps"] == pytest.approx(thr)
        assert summ["output_tps_per_gpu"] == pytest.approx(thr / 4)
        assert summ["tps_per_user"] == pytest.approx(1000.0 / agg["latency"]["time_per_output_token"]["mean"])
        assert summ["goodput"]["requests"] == lv.num_requests
        assert (out / f"level-{lv.id}.metrics.jsonl").stat().st_size > 0

    # every request had a prompt of its own, warm-up included (no prefix-cache hits between them)
    import urllib.request

    keys = set()
    for e in (a, b):
        keys |= set(json.loads(urllib.request.urlopen(e.url + "/stamps").read()))
    assert len(keys) == 2 + 12 + 24 + 30

    open_loop = read_records(out / "level-r40.requests.jsonl")
    assert all(r.scheduled_s is not None for r in open_loop)
    lag = json.loads((out / "level-r40.summary.json").read_text())["summary"]["send_lag_ms"]
    assert lag["p50"] < 5.0, lag  # requests leave on schedule
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("run,level,kind") and len(rows) == 4
    assert {r.split(",")[1] for r in rows[1:]} == {"c1", "c4", "r40"}

    # a second run, overlaid on the first in the plots
    out2 = tmp_path / "run-b"
    run_sweep(cfg_for([a.url], [Level("concurrency", 2, num_requests=8)], label="single"), out2)
    files = plot_runs([out, out2], tmp_path / "cmp")
    names = sorted(p.name for p in files)
    assert names == sorted(f"cmp-{k}.{e}" for k in ("pareto", "latency", "dist") for e in ("png", "svg"))
    for p in files:
        head = p.read_bytes()[:512]
        assert head.startswith(b"\x89PNG") if p.suffix == ".png" else b"<svg" in p.read_bytes()
    pts = load_points(out)
    assert [p.tag for p in pts] == ["1", "4", "40/s"]
    assert pts[1].gpus == 4 and pts[1].tps_per_gpu == pytest.approx(pts[1].output_tps / 4)


def test_server_killed_mid_level_becomes_errors(echo, tmp_path):
    a, b = echo(itl_ms=5), echo(itl_ms=5)  # 40 tokens: ~0.2 s per request
    killer = threading.Timer(0.7, b.kill)
    killer.start()
    out = tmp_path / "kill"
    try:
        outcomes = run_sweep(cfg_for([a.url, b.url], [Level("concurrency", 4, num_requests=40)], osl="40"), out)
    finally:
        killer.cancel()
    assert outcomes[0].status == "done"
    recs = read_records(out / "level-c4.requests.jsonl")
    bad = [r for r in recs if not r.ok]
    assert len(recs) == 40 and 0 < len(bad) < 40
    assert {r.endpoint for r in bad} == {b.url}
    assert any(r.error.startswith("cannot connect") for r in bad)
    assert any(r.chunks > 0 for r in bad), [r.error for r in bad]  # cut off mid-stream
    assert all(r.ok for r in recs if r.endpoint == a.url)
    br = read_report(out / "level-c4.report.yaml").dump()
    assert br["results"]["request_performance"]["aggregate"]["requests"]["failures"] == len(bad)


def test_dead_levels_are_recorded_and_retried_on_resume(echo, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    levels = [Level("concurrency", 1, num_requests=3), Level("concurrency", 2, num_requests=4)]
    out = tmp_path / "dead"
    outcomes = run_sweep(cfg_for([url], levels), out)
    assert [o.status for o in outcomes] == ["failed", "failed"]  # not fatal: the second level ran too
    fail = json.loads((out / "level-c1.failure.json").read_text())
    assert "cannot connect" in fail["error"] and fail["summary"]["failed"] == 3
    assert not (out / "level-c1.report.yaml").exists()
    assert len((out / "summary.csv").read_text().splitlines()) == 1  # header only

    echo(port=port)  # the endpoint comes up; the same sweep again retries the failed levels
    outcomes = run_sweep(cfg_for([url], levels), out)
    assert [o.status for o in outcomes] == ["done", "done"]
    assert not list(out.glob("*.failure.json"))
    assert json.loads((out / "sweep.json").read_text())["resumed"] == 1


def test_resume_skips_completed_levels_and_refuses_other_settings(echo, tmp_path):
    a = echo()
    out = tmp_path / "resume"
    run_sweep(cfg_for([a.url], [Level("concurrency", 1, num_requests=4)]), out)
    uid = yaml.safe_load((out / "level-c1.report.yaml").read_text())["run"]["uid"]
    outcomes = run_sweep(
        cfg_for([a.url], [Level("concurrency", 1, num_requests=4), Level("concurrency", 2, num_requests=4)]), out
    )
    assert [o.status for o in outcomes] == ["skipped", "done"]
    assert outcomes[0].summary["completed"] == 4
    assert yaml.safe_load((out / "level-c1.report.yaml").read_text())["run"]["uid"] == uid
    assert len((out / "summary.csv").read_text().splitlines()) == 3
    with pytest.raises(UserError, match="workload was"):
        run_sweep(cfg_for([a.url], [Level("concurrency", 4, num_requests=4)], isl="64"), out)


def test_warmup_that_reaches_no_endpoint_stops_the_sweep(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError) as err:
        run_sweep(cfg_for([url], [Level("concurrency", 1, num_requests=2)], warmup_requests=2), tmp_path / "w")
    assert err.value.exit_code == 1 and "every warm-up request failed" in str(err.value)


def test_level_time_bound_cancels_requests_as_incomplete(echo, tmp_path):
    a = echo(itl_ms=20)  # 30 tokens: ~0.6 s per request
    t0 = time.monotonic()
    out = tmp_path / "bound"
    outcomes = run_sweep(
        cfg_for([a.url], [Level("concurrency", 2, num_requests=20)], osl="30", level_timeout_s=1.5), out
    )
    assert time.monotonic() - t0 < 6
    s = outcomes[0].summary
    assert outcomes[0].status == "done" and s["completed"] >= 2 and s["incomplete"] >= 1
    assert s["total"] == s["completed"] + s["failed"] + s["incomplete"] < 20
    recs = read_records(out / "level-c2.requests.jsonl")
    assert all("level time bound" in r.error for r in recs if r.incomplete)


def test_pareto_front():
    pts = [(10, 100), (20, 90), (15, 80), (30, 50), (5, 120), (30, 40)]
    assert pareto_front(pts) == [4, 0, 1, 3]


# ------------------------------------------------------------------------------------- CLI


def test_cli_sweep_and_plot(echo, tmp_path, capsys):
    a, b = echo(), echo()
    out = tmp_path / "cli"
    rc = main(
        [
            "bench",
            "--endpoint",
            a.url,
            "--endpoint",
            b.url,
            "--gpus",
            "2",
            "--concurrency",
            "1,2",
            "--rate",
            "50",
            "--isl",
            "uniform:8-24",
            "--osl",
            "8",
            "--num-requests",
            "6",
            "--out",
            str(out),
            "--scrape-interval",
            "0",
            "--accelerator",
            "H200",
            "--slo-tpot-ms",
            "50",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "model: echo (from" in err and "approximate" in err  # served name found, fallback noted
    assert sorted(p.name for p in out.glob("*.report.yaml")) == [
        "level-c1.report.yaml",
        "level-c2.report.yaml",
        "level-r50.report.yaml",
    ]
    doc = yaml.safe_load((out / "level-c2.report.yaml").read_text())
    assert doc["scenario"]["stack"][0]["standardized"]["accelerator"]["model"] == "H200"
    assert doc["scenario"]["load"]["standardized"]["input_seq_len"]["distribution"] == "uniform"
    rc = main(
        [
            "bench",
            "run",
            "--endpoint",
            a.url,
            "--gpus",
            "2",
            "--model",
            "echo",
            "--concurrency",
            "1",
            "--shape",
            "1k:100",
            "--isl",
            "16",
            "--num-requests",
            "2",
            "--out",
            str(tmp_path / "cli2"),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "c1" in captured.out and "done" in captured.out  # the result table goes to stdout
    rc = main(["bench", "plot", str(out), str(tmp_path / "cli2"), "-o", str(tmp_path / "p")])
    printed = capsys.readouterr().out.split()
    assert rc == 0 and len(printed) == 6 and all(Path(p).exists() for p in printed)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--concurrency", "1", "--isl", "8", "--osl", "8"], "--gpus is required"),
        (["--gpus", "1", "--isl", "8", "--osl", "8"], "no levels to run"),
        (["--gpus", "1", "--concurrency", "1,x", "--isl", "8", "--osl", "8"], "whole numbers"),
        (["--gpus", "1", "--concurrency", "1", "--shape", "10to1"], "Valid: 10:1"),
        (["--gpus", "1", "--concurrency", "1", "--isl", "8"], "input and output lengths"),
        (
            ["--gpus", "1", "--concurrency", "1", "--isl", "8", "--osl", "8", "--num-requests", "2", "--duration", "3"],
            "not both",
        ),
        (["--gpus", "1", "--concurrency", "1", "--isl", "8", "--osl", "8", "--extra-body", "{"], "not JSON"),
    ],
)
def test_cli_user_errors(args, needle, tmp_path, capsys):
    rc = main(["bench", "--endpoint", "http://127.0.0.1:9", "--model", "m", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err


def test_cli_topology_without_planner_api(tmp_path, capsys, monkeypatch):
    topo = tmp_path / "t.yaml"
    topo.write_text("x: 1\n")
    monkeypatch.setitem(sys.modules, "widep.plan.api", None)  # as if the planner had no such API
    rc = main(
        [
            "bench",
            "--topology",
            str(topo),
            "--concurrency",
            "1",
            "--isl",
            "8",
            "--osl",
            "8",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "endpoints_for_topology" in err and "--endpoint URL" in err


def test_cli_generator_checks(tmp_path, capsys):
    import shutil

    if shutil.which("inference-perf") is None:
        rc = main(
            [
                "bench",
                "--endpoint",
                "http://127.0.0.1:9",
                "--gpus",
                "1",
                "--model",
                "m",
                "--concurrency",
                "1",
                "--isl",
                "8",
                "--osl",
                "8",
                "--out",
                str(tmp_path / "o"),
                "--generator",
                "inference-perf",
            ]
        )
        err = capsys.readouterr().err
        assert rc == 2 and "inference-perf command, which is not installed" in err
    rc = main(
        [
            "bench",
            "--endpoint",
            "http://127.0.0.1:9",
            "--gpus",
            "1",
            "--model",
            "m",
            "--concurrency",
            "1",
            "--isl",
            "8",
            "--osl",
            "8",
            "--out",
            str(tmp_path / "o"),
            "--generator",
            "vllm",
            "--vllm-python",
            sys.executable,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and ("--tokenizer" in err or "needs vLLM importable" in err)
