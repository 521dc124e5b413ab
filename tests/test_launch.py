"""`widep launch` with real CPU vLLM ranks of the tiny MoE.

One rank: completion, status, logs, SIGKILL of the launcher. The DP2/EP2 group (two launchers pretending to be two
nodes on 127.0.0.1 and 127.0.0.2) answers completions on both ranks (CPU vLLM through widep's vLLM plugin) and
asserts coordination across launchers, readiness, restart in step and clean shutdown. Wide EP under load, faults
under load, the router and equivalence with DP1 are in tests/test_wide_ep.py (one launcher).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from launch_helpers import ROOT, LaunchProc, api_server_pids, processes_of_run, topology_copy, wait_gone

pytestmark = pytest.mark.vllm


def test_one_rank_answers_a_completion_and_sigkill_leaves_no_orphans(tmp_path, tiny_moe_dir, vllm_python):
    topo = topology_copy("tiny-moe-cpu.yaml", tmp_path)
    lp = LaunchProc(
        [str(topo), "--model-path", str(tiny_moe_dir), "--python", vllm_python, "--run-dir", str(tmp_path / "run")]
    )
    try:
        lp.wait_for(r"ready: tiny-moe-cpu", 240)
        run_id = lp.run_id()
        import yaml

        port = yaml.safe_load(topo.read_text())["serving"]["port"]
        body = json.dumps({"model": str(tiny_moe_dir), "prompt": "Hello", "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.loads(r.read())
        assert out["usage"]["completion_tokens"] == 8
        assert isinstance(out["choices"][0]["text"], str)
        assert processes_of_run(run_id), "the rank's processes carry the run id"
        # `widep status` sees the rank and the group's attempt from the leader's control endpoint
        st = subprocess.run(
            [sys.executable, "-m", "widep", "status", str(topo), "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert st.returncode == 0, st.stderr
        sd = json.loads(st.stdout)
        assert sd["healthy"] and sd["endpoints"][0]["health"] == "healthy"
        assert sd["groups"][0]["control"]["attempt"] == 0 and sd["groups"][0]["control"]["state"] == "healthy"
        # logs land where docs/architecture.md says
        assert (tmp_path / "run" / "attempt-0" / "serve" / "rank-0" / "vllm.log").is_file()
        # the launcher is SIGKILLed: the guard notices (PR_SET_PDEATHSIG) and takes the rank's whole group down
        lp.stop(signal.SIGKILL)
        assert wait_gone(run_id, 60) == []
    finally:
        lp.stop(signal.SIGKILL)


def test_dp2_group_two_launchers_restart_in_step_and_stop_cleanly(tmp_path, tiny_moe_dir, vllm_python):
    topo = topology_copy("tiny-moe-cpu-dp2.yaml", tmp_path)
    common = ["--model-path", str(tiny_moe_dir), "--python", vllm_python, "--backoff", "1", "--grace", "5"]
    leader = LaunchProc([str(topo), "--node", "0", "--run-dir", str(tmp_path / "n0"), *common])
    follower = LaunchProc([str(topo), "--node", "1", "--run-dir", str(tmp_path / "n1"), *common])
    try:
        leader.wait_for(r"ready: tiny-moe-cpu-dp2", 300)
        run0, run1 = leader.run_id(), follower.run_id()
        follower.wait_for(r"attempt 0: started serve/1", 30)
        import yaml

        port = yaml.safe_load(topo.read_text())["serving"]["port"]
        for host in ("127.0.0.1", "127.0.0.2"):  # every rank answers: MoE dispatch/combine across the launchers
            body = json.dumps(
                {"model": str(tiny_moe_dir), "prompt": "Hello", "max_tokens": 4, "temperature": 0}
            ).encode()
            req = urllib.request.Request(
                f"http://{host}:{port}/v1/completions", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                assert json.loads(r.read())["usage"]["completion_tokens"] == 4
        fpids = api_server_pids(run1)
        assert len(fpids) == 1, "the follower runs one rank"
        os.kill(fpids[0], signal.SIGKILL)  # kill rank 1 on "node 1"
        follower.wait_for(r"reporting to the group leader", 60)
        leader.wait_for(r"attempt 0 failed", 60)
        follower.wait_for(r"leader moved to attempt 1|attempt 1: started serve/1", 120)
        leader.wait_for(r"ready: tiny-moe-cpu-dp2", 300, count=2)
        assert (tmp_path / "n0" / "attempt-1" / "serve" / "rank-0" / "vllm.log").is_file()
        assert (tmp_path / "n1" / "attempt-1" / "serve" / "rank-1" / "vllm.log").is_file()
        # SIGTERM both launchers: exit 0, nothing left behind
        assert leader.stop(signal.SIGTERM) == 0
        assert follower.stop(signal.SIGTERM) in (0, 1)
        assert wait_gone(run0, 60) == [] and wait_gone(run1, 60) == []
    finally:
        leader.stop(signal.SIGKILL)
        follower.stop(signal.SIGKILL)


def _launch(args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "widep", "launch", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, **kw
    )


def test_taken_port_refused_before_anything_starts(tmp_path, tiny_moe_dir, vllm_python):
    topo = topology_copy("tiny-moe-cpu.yaml", tmp_path)
    import yaml

    port = yaml.safe_load(topo.read_text())["serving"]["port"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        r = _launch(
            [str(topo), "--model-path", str(tiny_moe_dir), "--python", vllm_python, "--run-dir", str(tmp_path / "run")]
        )
    assert r.returncode == 2
    assert f"taken: 127.0.0.1:{port}" in r.stderr
    assert "nothing was started" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_missing_model_refused(tmp_path, vllm_python):
    topo = topology_copy("tiny-moe-cpu.yaml", tmp_path)
    r = _launch(
        [
            str(topo),
            "--model-path",
            str(tmp_path / "no-model"),
            "--python",
            vllm_python,
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    assert r.returncode == 2 and "is not a model directory" in r.stderr
    assert not (tmp_path / "run").exists()


def test_entry_point_without_vllm_refused(tmp_path, tiny_moe_dir):
    topo = topology_copy("tiny-moe-cpu.yaml", tmp_path)
    venv = tmp_path / "novllm"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    r = _launch([str(topo), "--model-path", str(tiny_moe_dir), "--python", str(venv / "bin" / "python")])
    assert r.returncode == 2 and "cannot import vllm" in r.stderr


def test_dry_run_starts_nothing(tmp_path):
    topo = topology_copy("tiny-moe-cpu-dp2.yaml", tmp_path)
    r = _launch([str(topo), "--node", "1", "--dry-run", "--model-path", "/models/x"])
    assert r.returncode == 0, r.stderr
    assert "--data-parallel-rank 1" in r.stdout and "VLLM_CPU_OMP_THREADS_BIND" in r.stdout


def test_unknown_node_refused(tmp_path):
    topo = topology_copy("tiny-moe-cpu-dp2.yaml", tmp_path)
    r = _launch([str(topo), "--node", "5", "--dry-run"])
    assert r.returncode == 2 and "--node: 5 is not a node" in r.stderr


def test_status_of_a_deployment_that_is_down(tmp_path):
    topo = topology_copy("tiny-moe-cpu-dp2.yaml", tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "widep", "status", str(topo), "--json", "--timeout", "0.5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    d = json.loads(r.stdout)
    assert not d["healthy"] and {e["health"] for e in d["endpoints"]} == {"refused"}
    assert d["groups"][0]["control"] is None
