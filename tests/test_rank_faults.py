"""What a rank fault exposed (issue 25): the root cause is the rank that died by signal, the status keeps the last
failure, nothing of a rank outlives a dead launcher by more than 2 s, a dead rank's group goes at once, and the
doctor finds the CPU EP plugin the way vLLM does (its entry point) from any directory.

The processes here are real (widep's guard, plain Python programs that ignore SIGTERM the way a starting vLLM API
server and its engine core do); the real-vLLM faults are in test_chaos.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_helpers import ROOT, processes_of_run, wait_gone

from widep.doctor.gather import _PROBE
from widep.render.vllm import ProcessCommand
from widep.run.procs import (
    ENGINE_LOST,
    death_severity,
    kill_ranks,
    root_cause,
    signal_name,
    start_rank,
    tear_down_together,
)
from widep.run.state import Failure, GroupState, GroupStatus, RestartPolicy

# A parent that ignores SIGTERM with a child that ignores SIGTERM (an API server and its engine core).
STUBBORN = (
    "import os, signal, time, sys\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "if os.fork() == 0:\n"
    "    time.sleep(600)\n"
    "    sys.exit(0)\n"
    "time.sleep(float(sys.argv[1]))\n"
)


def cmd(name: str, seconds: float, rank: int = 0) -> ProcessCommand:
    return ProcessCommand(
        "serve", 0, rank, (rank,), 0, "node-0", 0, None, None, template=(sys.executable, "-c", STUBBORN, str(seconds))
    )


def test_the_rank_killed_by_a_signal_is_the_root_cause_not_the_first_clean_exit(tmp_path):
    assert death_severity(128 + signal.SIGKILL) == 0 and death_severity(-signal.SIGKILL) == 0
    assert death_severity(1) == 1 and death_severity(0) == 2
    run_id = f"faults-{os.getpid()}-cause"
    ranks = [start_rank(cmd("serve", 600, r), tmp_path, 0, dict(os.environ), run_id, 30.0) for r in (0, 1)]
    try:
        time.sleep(1.0)
        api = int(Path(f"/proc/{ranks[1].proc.pid}/task/{ranks[1].proc.pid}/children").read_text().split()[0])
        os.kill(api, signal.SIGKILL)  # serve/1's server is killed, then serve/0 exits cleanly ...
        ranks[1].proc.wait(timeout=20)
        survivor = start_rank(
            ProcessCommand("serve", 0, 0, (0,), 0, "node-0", 0, None, None, template=(sys.executable, "-c", "pass")),
            tmp_path,
            0,
            dict(os.environ),
            run_id,
            30.0,
        )
        survivor.proc.wait(timeout=20)
        survivor.poll()  # ... and is seen first
        time.sleep(0.05)
        cause = root_cause([survivor, ranks[1]])
        assert cause is ranks[1] and cause.exit_code == 128 + signal.SIGKILL
        assert root_cause([ranks[0]]) is None
    finally:
        kill_ranks(ranks)
    assert wait_gone(run_id, timeout=5) == []


def test_the_status_keeps_the_last_failure_after_the_restart():
    s = GroupStatus(state=GroupState.HEALTHY)
    s, d = s.on_failure(Failure("serve/1", "node-0", "killed by SIGKILL", 1.0), 0, RestartPolicy(backoff_s=0))
    assert d.action == "restart"
    s = s.on_restart_begun()
    assert s.failure is None and s.state == GroupState.STARTING
    doc = s.as_dict()
    assert doc["last_failure"] == {"attempt": 0, "rank": "serve/1", "node": "node-0", "reason": "killed by SIGKILL"}
    assert doc["failures"] == 1


def test_a_dead_ranks_group_is_gone_in_a_second(tmp_path):
    run_id = f"faults-{os.getpid()}-kill"
    ranks = [start_rank(cmd("serve", 600, r), tmp_path, 0, dict(os.environ), run_id, 30.0) for r in (0, 1)]
    time.sleep(1.5)
    os.kill(ranks[1].proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    kill_ranks(ranks)
    assert wait_gone(run_id, timeout=5) == []
    assert time.monotonic() - t0 < 1.0


SPIN = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end:\n    pass\n"


def test_a_rank_that_dies_takes_its_group_with_it_within_a_second_on_a_loaded_machine(tmp_path):
    """No supervisor runs here: the guards and :func:`tear_down_together` alone take the group down, from the
    SIGKILL of rank 1's API server to the last process of both ranks gone, with every core kept busy."""
    run_id = f"faults-{os.getpid()}-together"
    spin = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(2 * (os.cpu_count() or 1))]
    ranks = tear_down_together(
        [start_rank(cmd("serve", 600, r), tmp_path, 0, dict(os.environ), run_id, 30.0) for r in (0, 1)]
    )
    try:
        deadline = time.monotonic() + 20
        while len(processes_of_run(run_id)) < 6 and time.monotonic() < deadline:  # 2 x (guard, server, child)
            time.sleep(0.1)
        time.sleep(0.5)
        api = children(ranks[1].proc.pid)[0]
        t0 = time.monotonic()
        os.kill(api, signal.SIGKILL)
        assert wait_gone(run_id, timeout=5) == []
        took = time.monotonic() - t0
        assert took < 1.0, took
        assert root_cause(ranks) is ranks[1] and ranks[0].torn_down and not ranks[1].torn_down
        assert signal_name(ranks[1].exit_code or 0) == "killed by SIGKILL"
    finally:
        for p in spin:
            p.kill()
            p.wait()
        kill_ranks(ranks)


def test_an_exited_commands_orphans_go_at_once(tmp_path):
    run_id = f"faults-{os.getpid()}-orphan"
    r = start_rank(cmd("serve", 1.0), tmp_path, 0, dict(os.environ), run_id, 30.0)
    r.proc.wait(timeout=20)
    t0 = time.monotonic()
    assert wait_gone(run_id, timeout=5) == []
    assert time.monotonic() - t0 < 1.0


def test_a_launcher_killed_during_startup_leaves_nothing_after_two_seconds(tmp_path):
    run_id = f"faults-{os.getpid()}-launcher"
    launcher = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from widep.render.vllm import ProcessCommand\n"
        "from widep.run.procs import start_rank\n"
        "c = ProcessCommand('serve', 0, 0, (0,), 0, 'node-0', 0, None, None,\n"
        f"    template=(sys.executable, '-c', {STUBBORN!r}, '600'))\n"
        f"start_rank(c, Path({str(tmp_path)!r}), 0, dict(os.environ), {run_id!r}, 30.0)\n"
        "print('started', flush=True)\n"
        "import time; time.sleep(600)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, env=env)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == b"started"
        time.sleep(1.5)
        p.kill()
        p.wait()
        t0 = time.monotonic()
        left = wait_gone(run_id, timeout=10)
        assert left == [] and time.monotonic() - t0 < 2.0
    finally:
        p.kill()
        for pid in wait_gone(run_id, timeout=0):
            os.kill(pid, signal.SIGKILL)


def test_the_doctor_finds_the_cpu_ep_plugin_by_its_entry_point_from_any_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(["widep.vllm_cpu_ep"]), "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = next(x for x in r.stdout.splitlines() if x.startswith("WIDEP-DOCTOR-PROBE "))
    (m,) = json.loads(line.split(" ", 1)[1])["modules"]
    assert m["found"], m
    assert Path(str(m["origin"]).split()[0]).exists() or "vllm.general_plugins" in m["origin"]


ENGINE = (
    "import os, signal, time, sys\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "if os.fork() == 0:\n"
    "    import setproctitle\n"
    "    setproctitle.setproctitle('VLLM::EngineCore_DP1')\n"
    "    time.sleep(600)\n"
    "    sys.exit(0)\n"
    "time.sleep(600)\n"
)


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_an_engine_core_that_dies_under_a_live_api_server_kills_the_rank_at_once(tmp_path):
    pytest.importorskip("setproctitle")
    run_id = f"faults-{os.getpid()}-engine"
    c = ProcessCommand("serve", 0, 1, (1,), 0, "node-0", 0, None, None, template=(sys.executable, "-c", ENGINE))
    r = start_rank(c, tmp_path, 0, dict(os.environ), run_id, 30.0)
    try:
        deadline = time.monotonic() + 20
        engine = None
        while engine is None and time.monotonic() < deadline:
            for api in children(r.proc.pid):  # (setproctitle may overwrite the environment WIDEP_RUN_ID is in)
                for pid in children(api):
                    if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"VLLM::EngineCore"):
                        engine = pid
            time.sleep(0.1)
        assert engine is not None
        time.sleep(0.5)  # the guard has seen it
        os.kill(engine, signal.SIGKILL)
        t0 = time.monotonic()
        code = r.proc.wait(timeout=10)
        assert code == ENGINE_LOST and time.monotonic() - t0 < 1.0
        assert signal_name(code) == "its engine core died (the API server still ran)"
        assert death_severity(code) == 0
        assert not Path(f"/proc/{engine}").exists() or b") Z" in Path(f"/proc/{engine}/stat").read_bytes()
        assert wait_gone(run_id, timeout=2) == []
        assert "engine core" in r.log.read_text()
    finally:
        kill_ranks([r])


def _wait_ranks(run_id: str, n: int) -> None:
    deadline = time.monotonic() + 60
    while len(processes_of_run(run_id)) < 3 * n and time.monotonic() < deadline:  # n x (guard, server, child)
        time.sleep(0.1)
    time.sleep(0.5)


def _server_of(guard: int) -> int:
    (api,) = children(guard)
    return api


def _guard_of_rank(run_id: str, rank: int) -> int:
    for pid in processes_of_run(run_id):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        if b"widep.run.guard" in argv and argv[-1] == str(600 + rank).encode():
            return pid
    raise AssertionError(f"no guard of rank {rank}")


def test_the_slurm_node_agent_takes_its_hosts_ranks_down_with_a_dead_one(tmp_path):
    """The Slurm node agent (``python -m widep.run.slurm node STEP.json``, what srun runs on each node) with two
    ranks: the SIGKILL of rank 1's server takes both down within a second and rank 1 is the recorded failure."""
    run_id = f"faults-{os.getpid()}-slurm"
    procs = [
        {
            "host": "n0",
            "run_dir": str(tmp_path / "logs"),
            "role": "serve",
            "replica": 0,
            "dp_rank": r,
            "dp_ranks": [r],
            "node": 0,
            "node_name": "n0",
            "local_rank": r,
            "port": None,
            "health_port": None,
            "headless": False,
            "argv": [sys.executable, "-c", STUBBORN, str(600 + r)],
            "env": [],
        }
        for r in (0, 1)
    ]
    step = tmp_path / "step.json"
    step.write_text(json.dumps({"run_id": run_id, "attempt": 0, "group": "serve", "grace_s": 30, "processes": procs}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), SLURMD_NODENAME="n0")
    agent = subprocess.Popen([sys.executable, "-m", "widep.run.slurm", "node", str(step)], env=env)
    try:
        _wait_ranks(run_id, 2)
        api = _server_of(_guard_of_rank(run_id, 1))
        t0 = time.monotonic()
        os.kill(api, signal.SIGKILL)
        assert wait_gone(run_id, timeout=5) == []
        took = time.monotonic() - t0
        assert took < 1.0, took
        assert agent.wait(timeout=20) == 1
        fail = json.loads((tmp_path / "failure-n0.json").read_text())
        assert (fail["rank"], fail["reason"]) == ("serve/1", "killed by SIGKILL")
    finally:
        agent.kill()
        agent.wait()
        for pid in wait_gone(run_id, timeout=0):
            os.kill(pid, signal.SIGKILL)


RAY_AGENT = """
import json, os, signal, sys, time
from pathlib import Path
import ray
from widep.render.vllm import ProcessCommand
from widep.run.ray_backend import NodeAgent

run_id, run_dir, stub = sys.argv[1], sys.argv[2], sys.argv[3]
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
try:
    agent = ray.remote(NodeAgent).remote(run_id, run_dir, 30.0)
    argv = [(sys.executable, "-c", stub, str(600 + r)) for r in (0, 1)]
    cmds = [ProcessCommand("serve", 0, r, (r,), 0, "node-0", r, None, None, template=argv[r]) for r in (0, 1)]
    guards = ray.get(agent.start.remote(0, cmds, {}))
    print(json.dumps({"guards": guards}), flush=True)
    sys.stdin.readline()  # the test killed rank 1's server
    end = time.monotonic() + 10
    rows = ray.get(agent.poll.remote())
    while any(r["exit"] is None for r in rows) and time.monotonic() < end:
        time.sleep(0.1)
        rows = ray.get(agent.poll.remote())
    print(json.dumps([{k: r[k] for k in ("name", "exit", "torn_down")} for r in rows]), flush=True)
    ray.get(agent.stop.remote())
finally:
    ray.shutdown()
"""


@pytest.mark.ray
def test_the_ray_node_agent_takes_its_nodes_ranks_down_with_a_dead_one(tmp_path):
    """widep's Ray node agent as a real Ray actor (a local Ray instance) with two ranks: the SIGKILL of rank 1's
    server takes both down within a second, and the agent reports rank 1 killed, rank 0 torn down by widep."""
    pytest.importorskip("ray")
    run_id = f"faults-{os.getpid()}-ray"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    drv = subprocess.Popen(
        [sys.executable, "-c", RAY_AGENT, run_id, str(tmp_path), STUBBORN],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert drv.stdin is not None and drv.stdout is not None
        line = drv.stdout.readline()
        if not line:  # Ray did not start (its own timeout on a very loaded machine): say so
            drv.wait(timeout=60)
            pytest.fail(f"the Ray driver exited ({drv.returncode}) before starting the agent's ranks")
        guards = json.loads(line)["guards"]
        _wait_ranks(run_id, 2)
        api = _server_of(guards[1])
        t0 = time.monotonic()
        os.kill(api, signal.SIGKILL)
        assert wait_gone(run_id, timeout=5) == []
        took = time.monotonic() - t0
        assert took < 1.0, took
        drv.stdin.write("\n")
        drv.stdin.flush()
        rows = {r["name"]: r for r in json.loads(drv.stdout.readline())}
        assert signal_name(rows["serve/1"]["exit"]) == "killed by SIGKILL" and not rows["serve/1"]["torn_down"]
        assert rows["serve/0"]["torn_down"]
        assert drv.wait(timeout=60) == 0
    finally:
        drv.kill()
        drv.wait()
        for pid in wait_gone(run_id, timeout=0):
            os.kill(pid, signal.SIGKILL)
