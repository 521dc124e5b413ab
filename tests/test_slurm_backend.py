"""`widep launch --backend slurm` against a real Slurm cluster run by the test (tests/slurm_cluster.py).

One cluster per module: munged, slurmctld and two slurmd (nodes n0 and n1 on 127.0.0.1 and 127.0.0.2).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from launch_helpers import ROOT, LaunchProc, free_ports, topology_copy
from slurm_cluster import SlurmCluster, missing

pytestmark = pytest.mark.slurm
TINY = ROOT / "topologies" / "tiny-moe-cpu.yaml"


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    why = missing()
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{why} (CI=true: .ci/run installs Slurm, so this fails instead of skipping)", pytrace=False)
        pytest.skip(why)
    cluster = SlurmCluster(nodes=2).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_two_nodes_on_one_host_run_one_task_each(slurm: SlurmCluster) -> None:
    """Debian's 22.05 build runs several slurmd on one host: a 2-node step lands one task on each node."""
    out = slurm.run(
        "srun",
        "-N2",
        "--ntasks-per-node=1",
        "--label",
        "bash",
        "-c",
        'echo "$SLURMD_NODENAME $SLURM_NODEID"',
        timeout=60,
    ).stdout
    assert sorted(out.split("\n")[:2]) == ["0: n0 0", "1: n1 1"], out
    hosts = slurm.run("scontrol", "show", "hostnames", "n[0-1]").stdout.split()
    assert hosts == ["n0", "n1"]


def _slurm_env(slurm: SlurmCluster) -> dict[str, str]:
    return slurm.env | {"COLUMNS": "200"}


def _widep(slurm: SlurmCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "widep", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ) | _slurm_env(slurm),
        check=False,
    )


def processes_of_job(job: str) -> list[int]:
    """Live processes whose environment says they belong to Slurm job ``job`` (every rank, guard and agent)."""
    needle = f"SLURM_JOB_ID={job}".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/stat", "rb") as s:
                if s.read().split(b") ")[-1][:1] != b"Z":
                    out.append(int(name))
        except OSError:
            continue
    return out


def test_bad_partition_and_too_large_plan_are_refused_before_submitting(slurm: SlurmCluster, tmp_path: Path) -> None:
    r = _widep(
        slurm,
        "launch",
        str(TINY),
        "--backend",
        "slurm",
        "--partition",
        "gpu",
        "--model-path",
        "/m",
        "--run-dir",
        str(tmp_path / "run1"),
    )
    assert r.returncode == 2, r.stdout + r.stderr
    out = " ".join((r.stdout + r.stderr).split())
    assert "--partition: 'gpu' is not a partition of this cluster." in out
    assert "Valid: debug. sinfo: debug (default): 2 node(s), 2 usable" in out and "Nothing was submitted." in out
    doc = yaml.safe_load(TINY.read_text())
    doc["name"] = "tiny-3-nodes"
    doc["cluster"]["nodes"] = [{"name": f"pretend-{i}", "address": f"127.0.0.{i + 1}"} for i in range(3)]
    doc["roles"][0]["replicas"] = 3
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump(doc))
    r = _widep(
        slurm, "launch", str(big), "--backend", "slurm", "--model-path", "/m", "--run-dir", str(tmp_path / "run2")
    )
    assert r.returncode == 2, r.stdout + r.stderr
    out = " ".join((r.stdout + r.stderr).split())
    assert "tiny-3-nodes: the plan needs 3 node(s) (one job, --nodes=3) but partition 'debug' has 2 node(s)" in out
    assert "2 idle (n[0-1])" in out
    assert slurm.jobs() == [] and not (tmp_path / "run1").exists() and not (tmp_path / "run2").exists()


def test_dry_run_prints_the_batch_script_and_submits_nothing(slurm: SlurmCluster, tmp_path: Path) -> None:
    r = _widep(
        slurm,
        "launch",
        str(TINY),
        "--backend",
        "slurm",
        "--dry-run",
        "--partition",
        "debug",
        "--time",
        "10",
        "--model-path",
        "/m",
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert r.returncode == 0, r.stderr
    assert (
        "#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=1\n#SBATCH --exclusive\n#SBATCH --partition=debug\n"
        "#SBATCH --time=10\n" in r.stdout
    )
    assert (
        f"--kill-on-bad-exit=1 --job-name=widep-serve-a0 {sys.executable} -m widep.run.slurm node "
        f"{tmp_path}/run/attempt-0/serve/step.json" in r.stdout
    )
    assert slurm.jobs() == [] and not (tmp_path / "run").exists()


def test_tiny_serves_restarts_inside_the_allocation_and_scancel_leaves_nothing(
    slurm: SlurmCluster, tmp_path: Path, tiny_moe_dir: Path, vllm_python: str
) -> None:
    topo = topology_copy("tiny-moe-cpu.yaml", tmp_path)
    port = yaml.safe_load(topo.read_text())["serving"]["port"]
    lp = LaunchProc(
        [
            str(topo),
            "--backend",
            "slurm",
            "--partition",
            "debug",
            "--time",
            "15",
            "--model-path",
            str(tiny_moe_dir),
            "--python",
            vllm_python,
            "--backoff",
            "1",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        env=_slurm_env(slurm),
    )
    try:
        job = re.search(r"submitted job (\d+)", lp.wait_for(r"submitted job \d+", 60)).group(1)
        lp.wait_for(r"plan node 0 \(localhost\) -> n0 \(127\.0\.0\.1\)", 60)
        lp.wait_for(r"ready: tiny-moe-cpu", 240)
        body = json.dumps({"model": str(tiny_moe_dir), "prompt": "Hello", "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 8
        st = _widep(slurm, "status", str(topo), "--slurm-job", job, "--json")
        assert st.returncode == 0, st.stdout + st.stderr
        sd = json.loads(st.stdout)
        assert sd["endpoints"][0]["url"] == f"http://127.0.0.1:{port}" and sd["endpoints"][0]["node"] == "n0"
        assert sd["groups"][0]["control"]["state"] == "healthy" and sd["groups"][0]["control"]["attempt"] == 0
        # kill the rank's API server: the group restarts as a new step of the same job
        victims = [
            pid
            for pid in processes_of_job(job)
            if b"vllm.entrypoints.openai.api_server" in Path(f"/proc/{pid}/cmdline").read_bytes()
            and b"widep.run.guard" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        lp.wait_for(r"attempt 0 failed.*serve/0 on n0: killed by SIGKILL", 60)
        lp.wait_for(r"ready: tiny-moe-cpu", 240, count=2)
        assert slurm.jobs() == [job], "the restart stayed inside the same allocation"
        assert (tmp_path / "run" / "attempt-1" / "serve" / "rank-0" / "vllm.log").is_file()
        # scancel from outside: the driver ends and nothing of the job is left on the "node"
        slurm.run("scancel", job)
        assert lp.proc.wait(timeout=90) == 0, lp.output()
        assert "job " + job + " ended: CANCELLED" in lp.output()
        end = time.monotonic() + 30
        while processes_of_job(job) and time.monotonic() < end:
            time.sleep(0.5)
        assert processes_of_job(job) == []
        assert slurm.jobs() == []
    finally:
        lp.stop(signal.SIGKILL)


def test_restart_never_exits_non_zero_with_the_first_failure_and_its_log(
    slurm: SlurmCluster, tmp_path: Path, vllm_python: str
) -> None:
    topo = topology_copy("tiny-moe-cpu.yaml", tmp_path)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "widep",
            "launch",
            str(topo),
            "--backend",
            "slurm",
            "--restart",
            "never",
            "--model-path",
            str(tmp_path / "no-such-model"),
            "--python",
            vllm_python,
            "--run-dir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ) | _slurm_env(slurm),
        check=False,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert re.search(r"failure: serve/0 on n0: exited with code 1\n", out), out
    assert "no-such-model" in out.split("failure: serve/0 on n0")[-1], "the failure shows the rank's last log lines"
    assert slurm.jobs() == []


def test_two_nodes_and_the_router_answer_through_one_url_and_ctrl_c_leaves_nothing(
    slurm: SlurmCluster, tmp_path: Path, tiny_moe_dir: Path, vllm_python: str
) -> None:
    """tiny-moe-cpu-2x: two one-rank groups on Slurm nodes n0 and n1 (127.0.0.1, 127.0.0.2), vllm-router in front;
    a completion goes through the router; Ctrl-C (SIGINT) then stops every step and cancels the job."""
    topo = topology_copy("tiny-moe-cpu-2x.yaml", tmp_path)
    doc = yaml.safe_load(topo.read_text())
    doc["router"]["port"], doc["router"]["prometheus_port"] = free_ports(2)
    topo.write_text(yaml.safe_dump(doc, sort_keys=False))
    router = doc["router"]["port"]
    lp = LaunchProc(
        [
            str(topo),
            "--backend",
            "slurm",
            "--model-path",
            str(tiny_moe_dir),
            "--python",
            vllm_python,
            "--run-dir",
            str(tmp_path / "run"),
        ],
        env=_slurm_env(slurm),
    )
    try:
        job = re.search(r"submitted job (\d+)", lp.wait_for(r"submitted job \d+", 60)).group(1)
        lp.wait_for(r"plan node 0 \(pretend-0\) -> n0 \(127\.0\.0\.1\)", 60)
        lp.wait_for(r"plan node 1 \(pretend-1\) -> n1 \(127\.0\.0\.2\)", 5)
        lp.wait_for(rf"\[router\] ready: http://127\.0\.0\.1:{router} on n0", 300)
        lp.wait_for(r"ready: tiny-moe-cpu-2x", 30)
        body = json.dumps({"model": str(tiny_moe_dir), "prompt": "Hi", "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{router}/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 4
        assert lp.stop(signal.SIGINT) == 0, lp.output()
        assert f"job {job} cancelled" in lp.output()
        assert processes_of_job(job) == [] and slurm.jobs() == []
        logs = {p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("vllm.log")}
        assert logs == {
            "replica-0/attempt-0/serve/rank-0/vllm.log",
            "replica-1/attempt-0/serve/rank-0/vllm.log",
            "attempt-0/router/rank-0/vllm.log",
        }
    finally:
        lp.stop(signal.SIGKILL)


def test_detach_runs_the_supervisor_inside_the_job(
    slurm: SlurmCluster, tmp_path: Path, tiny_moe_dir: Path, vllm_python: str
) -> None:
    """--detach submits and returns; the batch script runs `widep launch --backend slurm` inside the allocation,
    `widep status --slurm-job` shows it healthy, scancel ends it with nothing left."""
    topo = topology_copy("tiny-moe-cpu.yaml", tmp_path)
    r = _widep(
        slurm,
        "launch",
        str(topo),
        "--backend",
        "slurm",
        "--detach",
        "--model-path",
        str(tiny_moe_dir),
        "--python",
        vllm_python,
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    job = re.search(r"submitted job (\d+)", r.stdout).group(1)
    try:
        end = time.monotonic() + 240
        st = None
        while time.monotonic() < end:
            st = _widep(slurm, "status", str(topo), "--slurm-job", job, "--json", timeout=60)
            if st.returncode == 0:
                break
            time.sleep(3)
        assert st is not None and st.returncode == 0, (st.stdout + st.stderr if st else "") + (
            tmp_path / "run" / f"slurm-{job}.out"
        ).read_text()
        out = (tmp_path / "run" / f"slurm-{job}.out").read_text()
        assert f"supervising inside job {job}" in out and "ready: tiny-moe-cpu" in out
    finally:
        slurm.run("scancel", job)
    end = time.monotonic() + 60
    while (processes_of_job(job) or slurm.jobs()) and time.monotonic() < end:
        time.sleep(0.5)
    assert processes_of_job(job) == [] and slurm.jobs() == []
