"""vllm-router as the front door: planned, rendered, started by the launcher after the ranks it fronts are
healthy, restarted when it dies, stopped first; one replica killed -> the router keeps answering from the other.

Real processes throughout: vllm-router (the PyPI wheel's Rust binary) in front of real CPU vLLM servers of the
tiny MoE, two independent single-rank replicas (multi-rank MoE completions fail inside vLLM on CPU:
docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from launch_helpers import ROOT, LaunchProc, api_server_pids, free_ports, wait_gone

from widep.errors import UserError
from widep.plan import plan
from widep.render.vllm import RenderContext, render_router
from widep.spec.topology import load_topology, parse_topology


def two_replicas(tmp_path, **router):
    doc = yaml.safe_load((ROOT / "topologies/tiny-moe-cpu-2x.yaml").read_text())
    port, rpc, control, rport, prom = free_ports(5)
    doc["serving"].update({"port": port, "rpc_port": rpc, "control_port": control})
    doc["router"].update({"port": rport, "prometheus_port": prom} | router)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, doc


def test_router_rendered_regular_and_pd():
    p = plan(load_topology(ROOT / "topologies/tiny-moe-cpu-2x.yaml"))
    rc = render_router(p, RenderContext())
    a = list(rc.argv)
    assert a[0] == "vllm-router" and a[a.index("--policy") + 1] == "cache_aware"
    assert a[a.index("--worker-urls") + 1 : a.index("--worker-urls") + 3] == [
        "http://127.0.0.1:8300",
        "http://127.0.0.2:8300",
    ]
    pd = load_topology(ROOT / "topologies/deepseek-r1-pd-3x8-h200.yaml")
    d = pd.model_dump(mode="json")
    d["router"] = {"enabled": True, "node": "h200-0", "port": 30000, "decode_policy": "power_of_two"}
    p = plan(parse_topology(d))
    a = list(render_router(p, RenderContext()).argv)
    assert "--vllm-pd-disaggregation" in a and a.count("--prefill") == 8 and a.count("--decode") == 16
    assert a[a.index("--decode-policy") + 1] == "power_of_two" and a[a.index("--prefill-policy") + 1] == "cache_aware"


def test_router_port_collision_and_bad_policy_refused():
    d = yaml.safe_load((ROOT / "topologies/tiny-moe-cpu-2x.yaml").read_text())
    d["router"]["port"] = 8300
    with pytest.raises(UserError, match="router.port: port 8300 on node pretend-0 is used twice"):
        plan(parse_topology(d))
    d["router"]["port"] = 8380
    d["router"]["policy"] = "cache-aware"
    with pytest.raises(UserError, match="router.policy: 'cache-aware' is not valid. Did you mean 'cache_aware'"):
        plan(parse_topology(d))


def test_launch_bad_policy_flag_refused(tmp_path):
    path, _ = two_replicas(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "widep", "launch", str(path), "--node", "0", "--router-policy", "fastest"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "router.policy: 'fastest' is not valid" in r.stderr
    assert not list(tmp_path.glob("runs*"))


def test_taken_router_port_refused_before_anything_starts(tmp_path, tiny_moe_dir, vllm_python):
    path, doc = two_replicas(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", doc["router"]["port"]))
        s.listen()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "widep",
                "launch",
                str(path),
                "--node",
                "0",
                "--model-path",
                str(tiny_moe_dir),
                "--python",
                vllm_python,
                "--run-dir",
                str(tmp_path / "run"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 2 and f"127.0.0.1:{doc['router']['port']}" in r.stderr and "nothing was started" in r.stderr
    assert not (tmp_path / "run").exists()


def completion(port: int, model: str) -> dict:
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.mark.vllm
@pytest.mark.skipif(
    shutil.which("vllm-router") is None
    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "vllm-router")),
    reason="vllm-router is not installed (scripts/dev installs it)",
)
def test_router_in_front_of_two_replicas(tmp_path, tiny_moe_dir, vllm_python):
    path, doc = two_replicas(tmp_path)
    rport = doc["router"]["port"]
    env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    common = ["--model-path", str(tiny_moe_dir), "--python", vllm_python, "--backoff", "1", "--grace", "3"]
    n0 = LaunchProc([str(path), "--node", "0", "--run-dir", str(tmp_path / "n0"), *common], env=env)
    n1 = LaunchProc([str(path), "--node", "1", "--run-dir", str(tmp_path / "n1"), *common], env=env)
    try:
        n0.wait_for(r"\[router\] ready", 300)
        outs = [completion(rport, str(tiny_moe_dir)) for _ in range(4)]
        assert all(o["usage"]["completion_tokens"] == 4 for o in outs)
        # kill replica 1's server: the router keeps answering from replica 0, the launcher restarts the dead group
        run1 = n1.run_id()
        (pid,) = api_server_pids(run1)
        os.kill(pid, signal.SIGKILL)
        n1.wait_for(r"attempt 0 failed", 60)
        # the router needs up to health_failure_threshold x health_check_interval_s to drop the dead server;
        # after that every request must be answered by the live replica
        results = []
        t_end = time.monotonic() + 20
        while time.monotonic() < t_end:
            try:
                results.append(completion(rport, str(tiny_moe_dir))["usage"]["completion_tokens"] == 4)
            except OSError:
                results.append(False)
            time.sleep(0.5)
        print(
            f"while replica 1 was down: {sum(results)}/{len(results)} answered; failures in order: "
            f"{[i for i, r in enumerate(results) if not r]}"
        )
        assert all(results[-10:]), f"router still failing requests after its health checks: {results}"
        n1.wait_for(r"ready: tiny-moe-cpu-2x", 300, count=2)
        # the router itself dies: the launcher restarts it (it holds no state the ranks need)
        rpids = api_router_pids(n0.run_id())
        assert len(rpids) == 1, debug_processes(n0.run_id()) + "\n" + n0.output()
        os.kill(rpids[0], signal.SIGKILL)
        n0.wait_for(r"\[router\] started \(start 2\)", 60)
        n0.wait_for(r"\[router\] ready", 60, count=2)
        assert completion(rport, str(tiny_moe_dir))["usage"]["completion_tokens"] == 4
        run0 = n0.run_id()
        (router_pid,) = api_router_pids(run0)
        assert n0.stop(signal.SIGTERM) == 0 and n1.stop(signal.SIGTERM) in (0, 1)
        assert wait_gone(run0, 60) == [] and wait_gone(run1, 60) == []
        assert (
            not os.path.exists(f"/proc/{router_pid}")
            or open(f"/proc/{router_pid}/stat").read().split(") ")[1][0] == "Z"
        )
    finally:
        n0.stop(signal.SIGKILL)
        n1.stop(signal.SIGKILL)


def api_router_pids(run_id: str) -> list[int]:
    """The vllm-router process of a run: the child of the guard whose command is vllm-router.

    (vllm-router rewrites its process title over the environment block, so /proc/<pid>/environ no longer
    shows WIDEP_RUN_ID for it; its guard still does.)
    """
    from launch_helpers import processes_of_run

    guards = []
    for pid in processes_of_run(run_id):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"widep.run.guard" in cmd and any(c.endswith(b"vllm-router") for c in cmd):
            guards.append(pid)
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = open(f"/proc/{name}/stat", "rb").read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2 :].split()[1]) in guards:
                out.append(int(name))
    return out


def debug_processes(run_id: str) -> str:
    from launch_helpers import processes_of_run

    return "\n".join(
        f"{p}: {open(f'/proc/{p}/cmdline', 'rb').read().split(bytes(1))[:4]}" for p in processes_of_run(run_id)
    )


def test_bench_endpoints_go_through_the_router_unless_bypassed():
    from widep.plan.api import endpoints_for_topology

    path = ROOT / "topologies/tiny-moe-cpu-2x.yaml"
    assert endpoints_for_topology(path)[:2] == (["http://127.0.0.1:8380"], 2)
    assert endpoints_for_topology(path, via_router=False)[:2] == (["http://127.0.0.1:8300", "http://127.0.0.2:8300"], 2)
    r = subprocess.run(
        [sys.executable, "-m", "widep", "bench", "run", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert "--bypass-router" in r.stdout


def test_missing_router_executable_refused_before_anything_starts(tmp_path, tiny_moe_dir, vllm_python):
    path, _ = two_replicas(tmp_path, command="no-such-router")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "widep",
            "launch",
            str(path),
            "--node",
            "0",
            "--model-path",
            str(tiny_moe_dir),
            "--python",
            vllm_python,
            "--run-dir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "router.command: 'no-such-router' is not on PATH" in r.stderr
    assert not (tmp_path / "run").exists()
