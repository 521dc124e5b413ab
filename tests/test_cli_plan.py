"""`widep plan` as a user runs it: a real subprocess, its output and exit codes."""

import glob
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def widep(*args, check=False):
    return subprocess.run([sys.executable, "-m", "widep", *args], capture_output=True, text=True, cwd=ROOT, check=check)


def test_plan_json_contract():
    r = widep("plan", "topologies/deepseek-r1-pd-3x8-h200.yaml", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["name"] == "deepseek-r1-pd-3x8-h200"
    pre, dec = d["roles"]
    for role in (pre, dec):
        for key in ("name", "kind", "dp_size", "ep_size", "tp_size", "nodes", "ranks", "memory", "warnings"):
            assert key in role
        for key in (
            "weights_gib",
            "expert_weights_gib",
            "non_expert_weights_gib",
            "kv_cache_gib",
            "kv_tokens",
            "max_seqs_at_context",
        ):
            assert key in role["memory"]
        for rank in role["ranks"]:
            assert {"dp_rank", "node", "local_rank", "gpus", "port", "experts"} <= set(rank)
    assert (pre["dp_size"], dec["dp_size"], dec["ep_size"]) == (8, 16, 16)


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "topologies/*.yaml"))))
def test_plan_table_every_curated_topology(path):
    r = widep("plan", path)
    assert r.returncode == 0, r.stderr
    assert "KV cache" in r.stdout and "dp rank" in r.stdout


def test_plan_does_not_hang():
    # A guard against a hang or a pathological slowdown only: the speed figure comes from profiling/cli_speed.py
    # (about 0.3 s per process there), not from a timed unit test on a shared 2-core machine.
    times = []
    for _ in range(3):
        t = time.perf_counter()
        widep("plan", "topologies/deepseek-r1-decode-4x8-h200-eplb.yaml", check=True)
        times.append(time.perf_counter() - t)
    assert sorted(times)[1] < 15.0


def test_plan_from_flags():
    r = widep("plan", "--model", "deepseek-r1", "--gpu", "H200", "--nodes", "2", "--role", "decode", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["roles"][0]["ep_size"] == 16


@pytest.mark.parametrize(
    "args,needle",
    [
        (["plan", "--model", "deepseek-r1", "--gpu", "H300"], "cluster.gpu: unknown GPU kind 'H300'"),
        (["plan", "--model", "qwen3-30b-a3b", "--gpu", "H100", "--gpus-per-node", "3"], "do not divide over EP=3"),
        (["plan", "no-such.yaml"], "not found"),
        (["plan"], "give a topology file"),
    ],
)
def test_plan_bad_input_exit_2(args, needle):
    r = widep(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_file_message(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("name: t\nmodel: {preset: deepseek-r1}\nroles: [{name: d, all2all_backend: deepep_lowlatency}]\n")
    r = widep("plan", str(f))
    assert r.returncode == 2 and "Did you mean 'deepep_low_latency'" in r.stderr
