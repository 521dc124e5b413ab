"""``widep sweep`` as a user runs it: a real subprocess of the installed CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def widep(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "widep", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_budget_sweep_json() -> None:
    p = widep(
        "sweep",
        "--model",
        "deepseek-r1",
        "--gpu",
        "H100",
        "--gpus",
        "8..24",
        "--isl",
        "1000",
        "--osl",
        "1000",
        "--tp",
        "1,2",
        "--max-num-seqs",
        "64,256",
        "--json",
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    counts = doc["counts"]
    assert counts["candidates"] == len(doc["candidates"]) > 0
    assert (
        counts["infeasible"]["memory"] > 0 and counts["infeasible"]["divisibility"] > 0
    )  # 8 H100 cannot hold R1; EP24
    assert counts["feasible"] == sum(1 for c in doc["candidates"] if c["status"] == "ok")
    assert {c["gpus"] for c in doc["candidates"]} == {8, 16, 24}
    assert doc["frontier"] and doc["ranked"]
    f = doc["frontier"]
    assert [x["tps_user"] for x in f] == sorted(x["tps_user"] for x in f)
    # faster users, fewer tokens per GPU
    assert all(b["tps_gpu"] <= a["tps_gpu"] for a, b in zip(f, f[1:], strict=False))
    bad = [c for c in doc["candidates"] if c["status"] != "ok"]
    assert any("does not fit in H100 memory" in c["reason"] for c in bad)  # the planner's message


def test_budget_sweep_table_and_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "sweeps" / "r1"
    p = widep(
        "sweep",
        "--model",
        "deepseek-r1",
        "--gpu",
        "H200",
        "--gpus",
        "16",
        "--modes",
        "mixed",
        "--tp",
        "1",
        "--max-num-seqs",
        "128",
        "--min-tps-user",
        "20",
        "--out",
        str(out),
        "--show-infeasible",
    )
    assert p.returncode == 0, p.stderr
    assert "candidates for deepseek-r1 on 16 x H200" in p.stdout
    assert "best tokens/s/GPU meeting >= 20 tok/s/user" in p.stdout
    assert "Pareto frontier" in p.stdout
    assert (out / "summary.csv").is_file() and (out / "summary.json").is_file() and (out / "sweep.json").is_file()
    assert (out / "sweep-pareto.png").is_file()
    # predicted sweeps: one columnar results file, directories only for the launchable short list
    assert (out / "results.jsonl").is_file()
    dirs = [d for d in out.iterdir() if d.is_dir()]
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < len(dirs) < len(summary["candidates"]) + 1
    assert all((d / "topology.yaml").is_file() and not (d / "result.json").exists() for d in dirs)
    # a second run reuses every stored point (same key) and prints the same numbers
    p2 = widep(
        "sweep",
        "--model",
        "deepseek-r1",
        "--gpu",
        "H200",
        "--gpus",
        "16",
        "--modes",
        "mixed",
        "--tp",
        "1",
        "--max-num-seqs",
        "128",
        "--min-tps-user",
        "20",
        "--out",
        str(out),
        "--show-infeasible",
    )
    assert p2.returncode == 0
    strip = lambda s: [ln for ln in s.splitlines() if "predicted in" not in ln]  # noqa: E731
    assert strip(p2.stdout) == strip(p.stdout)


def test_topology_files_predict() -> None:
    p = widep("sweep", "--topologies", "topologies/deepseek-r1-*.yaml", "--concurrency", "1..512", "--predict")
    assert p.returncode == 0, p.stderr
    for name in ("deepseek-r1-decode-2x8-h200", "deepseek-r1-pd-3x8-h200", "deepseek-r1-prefill-1x8-h200"):
        assert name in p.stdout
    assert "tok/s/user" in p.stdout and "TTFT ms" in p.stdout and "saturation" in p.stdout
    # the shell-expanded form: first file as the option value, the rest as arguments
    files = sorted(str(x.relative_to(ROOT)) for x in (ROOT / "topologies").glob("deepseek-r1-*.yaml"))
    p2 = widep("sweep", "--topologies", *files, "--concurrency", "1,64", "--json")
    assert p2.returncode == 0, p2.stderr
    doc = json.loads(p2.stdout)
    assert [c["id"] for c in doc["candidates"]] == [Path(f).stem for f in files]
    for c in doc["candidates"]:
        concs = [lv["concurrency"] for lv in c["levels"]]
        assert {1.0, 64.0} <= set(concs)
        assert all(lv["tps_gpu"] > 0 for lv in c["levels"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["sweep", "--model", "deepseek-r1", "--gpus", "3..abc"], "--gpus: '3..abc' is not a count list"),
        (["sweep", "--model", "deepseek-r1"], "needs a budget"),
        (["sweep", "--model", "deepseek-r1", "--gpus", "12", "--gpus-per-node", "8"], "no candidate topology"),
        (["sweep", "--model", "deepseek-r9", "--gpus", "16"], "unknown model preset 'deepseek-r9'"),
        (["sweep", "--topologies", "topologies/nope-*.yaml"], "no file matches"),
        (
            ["sweep", "--topologies", "topologies/deepseek-r1-decode-2x8-h200.yaml", "--model", "deepseek-r1"],
            "not both",
        ),
        (
            ["sweep", "--topologies", "topologies/deepseek-r1-decode-2x8-h200.yaml", "--concurrency", "0..8"],
            "--concurrency",
        ),
        (["sweep", "--model", "deepseek-r1", "--gpus", "16", "--modes", "mixed,disagg"], "--modes: disagg not valid"),
        (
            ["sweep", "--model", "deepseek-r1", "--gpus", "16", "--calibration", "missing.yaml"],
            "--calibration: no such file",
        ),
    ],
)
def test_user_errors(args: list[str], needle: str) -> None:
    p = widep(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert needle in p.stderr
    assert "Traceback" not in p.stderr


def test_measured_calibration_from_profiling_results() -> None:
    cals = sorted((ROOT / "profiling" / "results").glob("calibration-*x*.json"))
    if not cals:
        pytest.skip("no GPU calibration committed under profiling/results")
    p = widep(
        "sweep", "--topologies", "topologies/deepseek-r1-decode-2x8-h200.yaml", "--calibration", str(cals[0]), "--json"
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["calibration"]["name"].startswith("measured-")


def test_predict_json_contract_and_bad_input() -> None:
    """widep predict: one point with throughput per GPU / decode GPU, per-user speed, TTFT, TPOT, step
    breakdown, overlap schedule and a band from the leave-one-out residuals; the wave TTFT grows with load."""
    topo = str(ROOT / "topologies" / "deepseek-r1-pd-3x8-h200.yaml")
    out = {}
    for c in ("64", "1024"):
        p = widep(
            "predict",
            topo,
            "--concurrency",
            c,
            "--isl",
            "2000",
            "--osl",
            "1000",
            "--decode-context",
            "2500",
            "--mtp-acceptance",
            "0.7",
            "--json",
        )
        assert p.returncode == 0, p.stderr
        out[c] = json.loads(p.stdout)
    d = out["64"]
    for key in (
        "tps_per_gpu",
        "tps_per_decode_gpu",
        "tps_per_user",
        "ttft_ms",
        "tpot_ms",
        "step_ms",
        "overlap",
        "uncertainty",
    ):
        assert key in d
    assert d["mode"] == "pd" and d["decode_gpus"] < d["gpus"]
    assert d["tps_per_decode_gpu"] > d["tps_per_gpu"] > 0
    assert d["workload"]["decode_context"] == 2500 and d["workload"]["spec_acceptance"] == 0.7
    lo, hi = d["uncertainty"]["tps_per_gpu"]
    assert lo < d["tps_per_gpu"] < hi
    assert d["step_ms"]["step_ms"] > 0 and d["overlap"]["schedule"]
    assert out["1024"]["ttft_ms"] > out["64"]["ttft_ms"]
    text = widep("predict", topo, "--concurrency", "64")
    assert text.returncode == 0 and "tokens/s per decode GPU" in text.stdout and "overlap:" in text.stdout
    bad = widep("predict", topo, "--concurrency", "0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_sweep_arrival_and_one_users_pd_ttft(tmp_path: Path) -> None:
    """`widep sweep --arrival` as `widep predict --arrival`: on a 16 + 16 H200 P/D deployment one 2k-token user's
    TTFT is one prompt's prefill step + KV transfer + a decode step (< 0.5 s) in both modes; at 2,048 users the
    wave (everyone starts together) queues at the prefill group, steady arrivals do not."""
    import yaml

    doc = yaml.safe_load((ROOT / "topologies" / "deepseek-r1-pd-3x8-h200.yaml").read_text())
    doc["cluster"]["nodes"] = [{"name": f"h200-{i}", "address": f"10.0.0.{10 + i}"} for i in range(4)]
    doc["roles"][0]["nodes"] = 2
    topo = tmp_path / "pd-16-16.yaml"
    topo.write_text(yaml.safe_dump(doc))
    ttft = {}
    for arrival in ("wave", "steady"):
        p = widep("sweep", "--topologies", str(topo), "--concurrency", "1,2048", "--arrival", arrival, "--json")
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert out["workload"]["arrival"] == arrival
        (cand,) = out["candidates"]
        assert cand["mode"] == "pd" and cand["gpus"] == 32
        ttft[arrival] = {lv["concurrency"]: lv["ttft_ms"] for lv in cand["levels"]}
    assert ttft["wave"][1.0] < 500.0 and ttft["steady"][1.0] < 500.0
    assert ttft["wave"][2048.0] > 5 * ttft["steady"][2048.0]
    bad = widep("sweep", "--topologies", str(topo), "--arrival", "sometimes")
    assert bad.returncode == 2 and "sometimes" in bad.stderr
