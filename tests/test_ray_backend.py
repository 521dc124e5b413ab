"""`widep launch --backend ray` on a real local Ray cluster (ray.cluster_utils.Cluster: a head and three worker
nodes on one machine, each worker on its own loopback address, 127.0.0.2-4, with one ``widep_slot`` standing in for
a GPU) running real CPU vLLM ranks of the tiny MoE.

The DP2/EP2 group (CPU vLLM through widep's vLLM plugin) serves completions on both ranks and asserts placement,
readiness, restart in step and clean shutdown. One test drives one deployment through its whole life to keep vLLM
starts few: healthy and answering; a rank's process killed -> the group restarts; the Ray node of a rank lost during
the restart -> the group restarts on the spare node; SIGINT -> no process, actor or placement group left.
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
from pathlib import Path

import pytest
import yaml
from launch_helpers import ROOT, LaunchProc, api_server_pids, processes_of_run, topology_copy, wait_gone

from widep.run.chaos import alive

pytestmark = pytest.mark.ray

_IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
WORKER_IPS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def _ray():
    try:
        import ray
    except ImportError as err:
        if _IN_CI:
            pytest.fail(f"ray is not installed ({err}); CI installs widep[ray]", pytrace=False)
        pytest.skip(f"ray is not installed: {err}")
    return ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A head (no slots) and three worker nodes with one widep_slot each; yields (cluster, {ip: node})."""
    ray = _ray()
    from ray.cluster_utils import Cluster

    t = time.monotonic()
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": True,
            # notice a lost node within ~3 s (defaults: tens of seconds)
            "_system_config": {
                "health_check_period_ms": 1000,
                "health_check_failure_threshold": 3,
                "health_check_initial_delay_ms": 0,
            },
        },
    )
    nodes = {ip: c.add_node(num_cpus=0, resources={"widep_slot": 1}, node_ip_address=ip) for ip in WORKER_IPS}
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    print(f"\nRay cluster (head + {len(nodes)} nodes) started in {time.monotonic() - t:.1f} s")
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


def _argv(pid: int) -> list[str]:
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _ranks(run_id: str) -> dict[int, tuple[int, int, list[str]]]:
    """DP rank -> (API server pid, pid of the actor that started its guard, the API server's argv)."""
    out = {}
    for pid in api_server_pids(run_id):
        argv = _argv(pid)
        out[int(_flag(argv, "--data-parallel-rank"))] = (pid, _ppid(_ppid(pid)), argv)
    return out


def _descends(pid: int, ancestors: set[int]) -> bool:
    """Whether ``pid`` is a descendant of one of ``ancestors`` (True as well for a process gone meanwhile)."""
    try:
        while pid > 1:
            pid = _ppid(pid)
            if pid in ancestors:
                return True
    except (OSError, ValueError, IndexError):
        return True
    return False


def _alive_actors(run_id: str) -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if (a.name or "").startswith(f"widep-{run_id}")]


@pytest.mark.vllm
def test_dp2_group_on_ray_placement_restart_lost_node_and_sigint(ray_cluster, tmp_path, tiny_moe_dir, vllm_python):
    cluster, nodes = ray_cluster
    from ray.util.placement_group import placement_group_table
    from ray.util.state import list_actors

    from widep.plan import plan as make_plan
    from widep.render.vllm import RenderContext, render
    from widep.spec.topology import load_topology

    topo = topology_copy("tiny-moe-cpu-dp2.yaml", tmp_path)
    run = tmp_path / "run"
    t0 = time.monotonic()
    drv = LaunchProc(
        [
            str(topo),
            "--backend",
            "ray",
            "--address",
            cluster.address,
            "--model-path",
            str(tiny_moe_dir),
            "--python",
            vllm_python,
            "--run-dir",
            str(run),
            "--backoff",
            "1",
        ]
    )
    try:
        drv.wait_for(r"ready: tiny-moe-cpu-dp2", 300)
        print(f"\nDP2 group healthy via Ray {time.monotonic() - t0:.1f} s after `widep launch` started")
        run_id = drv.run_id()

        # ---- placement matches the plan: bundle i <-> plan node i, each on its own Ray node; rank r of plan node n
        # runs inside the agent actor of that bundle, bound to that node's address; the leader's address is
        # rank 0's node; the commands are what `widep render` gives for these addresses.
        placed = json.loads((run / "placement.json").read_text())
        bundles = {b["plan_node"]: b for b in placed["bundles"]}
        assert sorted(bundles) == [0, 1] and bundles[0]["node_id"] != bundles[1]["node_id"]
        assert {b["ip"] for b in bundles.values()} <= set(WORKER_IPS)
        actors = {
            a.pid: a
            for a in list_actors(filters=[("state", "=", "ALIVE")])
            if (a.name or "").startswith(f"widep-{run_id}")
        }
        ranks = _ranks(run_id)
        assert sorted(ranks) == [0, 1]
        for r, (_, agent_pid, argv) in ranks.items():
            b = bundles[r]  # tiny-moe-cpu-dp2: DP rank r on plan node r
            assert agent_pid == b["pid"], f"rank {r} is not a child of its bundle's agent"
            assert actors[agent_pid].node_id == b["node_id"], f"rank {r}'s agent is not on the Ray node of bundle {r}"
            assert _flag(argv, "--host") == b["ip"]
            assert _flag(argv, "--data-parallel-address") == bundles[0]["ip"]
        plan = make_plan(load_topology(topo))
        ctx = RenderContext(
            model_path=str(tiny_moe_dir),
            python=vllm_python,
            cpu_count=os.cpu_count(),
            node_addresses={n: b["ip"] for n, b in bundles.items()},
        )
        for c in render(plan, ctx):
            written = (run / "attempt-0" / c.role / f"rank-{c.dp_rank}" / "command.sh").read_text().strip()
            assert written == c.shell()
        assert "group" in drv.output() and f"http://{bundles[1]['ip']}:" in drv.output()  # the readiness table
        # ---- both ranks of the DP2/EP2 group answer a completion (the MoE dispatch/combine crosses Ray nodes)
        port = yaml.safe_load(topo.read_text())["serving"]["port"]
        for r in (0, 1):
            body = json.dumps({"model": str(tiny_moe_dir), "prompt": "Hello", "max_tokens": 4, "temperature": 0})
            req = urllib.request.Request(
                f"http://{bundles[r]['ip']}:{port}/v1/completions", body.encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=60) as resp:
                assert json.loads(resp.read())["usage"]["completion_tokens"] == 4

        # ---- a rank's process dies: the whole group goes (the agents and the driver's supervisor, the policy of
        # every backend) and restarts in step (attempt 1, both ranks new)
        attempt0 = [pid for pid in processes_of_run(run_id) if pid not in {a for _, a, _ in ranks.values()}]
        t_kill = time.monotonic()
        os.kill(ranks[1][0], signal.SIGKILL)
        while alive(attempt0) and time.monotonic() - t_kill < 30:
            time.sleep(0.02)
        teardown = time.monotonic() - t_kill
        print(f"attempt 0 torn down {teardown:.2f} s after the SIGKILL of serve/1 (Ray: the peer is on another agent)")
        assert not alive(attempt0) and teardown < 10
        drv.wait_for(r"attempt 0 failed.*serve/1.*killed by SIGKILL", 60)
        drv.wait_for(r"attempt 1: started serve/0", 60)
        assert (run / "attempt-1" / "serve" / "rank-0" / "command.sh").is_file()

        # ---- the Ray node of rank 1 is lost while attempt 1 starts: the group restarts, Ray moves the bundle
        # to the spare node, and rank 0 stays where it was
        cluster.remove_node(nodes[bundles[1]["ip"]], allow_graceful=False)
        drv.wait_for(rf"Ray node {re.escape(bundles[1]['ip'])}\s+lost", 60)
        spare = (set(WORKER_IPS) - {bundles[0]["ip"], bundles[1]["ip"]}).pop()
        drv.wait_for(
            rf"attempt 2: started serve/0 on pretend-0 @ {re.escape(bundles[0]['ip'])}, "
            rf"serve/1 on pretend-1 @ {re.escape(spare)}",
            90,
        )
        t2 = time.monotonic()
        drv.wait_for(r"ready: tiny-moe-cpu-dp2", 300, count=2)
        print(f"DP2 group healthy again {time.monotonic() - t2:.1f} s after the restart on the spare node")
        ranks = _ranks(run_id)
        assert _flag(ranks[1][2], "--host") == spare and _flag(ranks[0][2], "--host") == bundles[0]["ip"]
        assert _flag(ranks[1][2], "--data-parallel-address") == bundles[0]["ip"]
        # nothing of the lost node's attempt survived: every process of the run descends from a live agent
        live = {a.pid for a in _alive_actors(run_id)}
        assert len(live) == 2 and {a for _, a, _ in ranks.values()} == live
        orphans = [pid for pid in processes_of_run(run_id) if not _descends(pid, live)]
        assert orphans == [], [_argv(p)[:4] for p in orphans]

        # ---- Ctrl-C: exit 0, no rank process, no actor, no placement group left
        assert drv.stop(signal.SIGINT) == 0
        assert "placement group removed" in drv.output()
        assert wait_gone(run_id, 30) == []
        assert _alive_actors(run_id) == []
        pgs = [v for v in placement_group_table().values() if run_id in v["name"]]
        assert pgs and all(v["state"] == "REMOVED" for v in pgs)
    finally:
        drv.stop(signal.SIGKILL)


@pytest.mark.vllm
def test_driver_killed_leaves_nothing(ray_cluster, tmp_path, tiny_moe_dir, vllm_python):
    """SIGKILL on the driver while the ranks start: Ray kills the driver's actors and removes its placement group;
    the guards get SIGTERM and take their ranks down (Ray's default SIGKILL of a dying worker's children would
    leave the vLLM processes running: widep turns it off for its agents)."""
    cluster, _ = ray_cluster
    from ray.util.placement_group import placement_group_table

    topo = topology_copy("tiny-moe-cpu-dp2.yaml", tmp_path)
    drv = LaunchProc(
        [
            str(topo),
            "--backend",
            "ray",
            "--address",
            cluster.address,
            "--model-path",
            str(tiny_moe_dir),
            "--python",
            vllm_python,
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    try:
        drv.wait_for(r"attempt 0: started serve/0", 120)
        run_id = drv.run_id()
        time.sleep(2)
        assert len(api_server_pids(run_id)) == 2
        drv.stop(signal.SIGKILL)
        assert wait_gone(run_id, 30) == []
        end = time.monotonic() + 30
        while _alive_actors(run_id) and time.monotonic() < end:
            time.sleep(0.5)
        assert _alive_actors(run_id) == []
        assert all(v["state"] == "REMOVED" for v in placement_group_table().values() if run_id in v["name"])
    finally:
        drv.stop(signal.SIGKILL)


def test_unplaceable_deployment_refused_before_anything_starts(ray_cluster, tmp_path, tiny_moe_dir, vllm_python):
    """More plan nodes than Ray nodes with a widep_slot: a clear refusal, no placement group, no process."""
    cluster, _ = ray_cluster
    import ray
    from ray.util.placement_group import placement_group_table

    slots = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("widep_slot", 0) >= 1)
    doc = yaml.safe_load(topology_copy("tiny-moe-cpu-dp2.yaml", tmp_path).read_text())
    need = slots + 1
    doc["cluster"]["nodes"] = [{"name": f"pretend-{i}", "address": f"127.0.1.{i + 1}"} for i in range(need)]
    doc["roles"][0].update(nodes=1, replicas=need)  # independent DP1 groups: any count is a valid plan
    topo = tmp_path / "too-big.yaml"
    topo.write_text(yaml.safe_dump(doc, sort_keys=False))
    before = set(placement_group_table())
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "widep",
            "launch",
            str(topo),
            "--backend",
            "ray",
            "--address",
            cluster.address,
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
    assert r.returncode == 2, r.stdout + r.stderr
    assert (
        f"needs {need} Ray node(s) with {{widep_slot: 1}} each" in r.stderr and f"the cluster has {slots}" in r.stderr
    )
    assert "Nothing was started" in r.stderr and "Traceback" not in r.stderr
    assert set(placement_group_table()) == before
    assert not (tmp_path / "run").exists()


def test_without_ray_the_flag_says_how_to_install_it(tmp_path):
    """Ray IS installed here: ``sys.modules['ray'] = None`` makes ``import ray`` fail as on a machine without it
    (a stand-in for uninstalling it, which this shared environment cannot do)."""
    topo = topology_copy("tiny-moe-cpu-dp2.yaml", tmp_path)
    code = (
        "import sys; sys.modules['ray'] = None; from widep.cli import main; "
        f"sys.exit(main(['launch', {str(topo)!r}, '--backend', 'ray', '--model-path', {str(tmp_path)!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pip install 'widep[ray]'" in r.stderr and "--backend bare-metal" in r.stderr and "Traceback" not in r.stderr


def test_placement_of_a_gpu_topology_and_dry_run():
    """Bundles follow the plan (role order, leader node first), whole GPU nodes; plan GPU ids map onto the
    GPUs Ray gave a node's agent; --dry-run shows the placement and starts nothing (no Ray connection)."""
    from widep.plan import plan as make_plan
    from widep.run.ray_backend import bundle_nodes, bundle_resources, map_visible_devices, placement_problem
    from widep.spec.topology import load_topology

    p = make_plan(load_topology(ROOT / "topologies" / "deepseek-r1-pd-3x8-h200.yaml"))
    order = bundle_nodes(p)
    assert order == [n for rp in p.roles for g in rp.group_nodes for n in g] and len(order) == len(set(order))
    assert bundle_resources(p) == {"GPU": 8.0}
    assert map_visible_devices("0,1", ["4", "5", "6", "7", "0", "1", "2", "3"]) == "0,1"
    assert map_visible_devices("2,3", [10, 11, 12, 13]) == "12,13"
    assert map_visible_devices("1", []) == "1"
    with pytest.raises(ValueError):
        map_visible_devices("4", ["0", "1"])
    gpu_node = {"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"GPU": 8.0}}
    small = {"Alive": True, "NodeManagerAddress": "10.0.0.9", "Resources": {"GPU": 4.0}}
    assert placement_problem(p, [gpu_node] * len(order), len(order)) is None
    msg = placement_problem(p, [gpu_node] * (len(order) - 1) + [small, dict(gpu_node, Alive=False)], len(order))
    assert (
        msg
        and f"needs {len(order)} Ray node(s) with {{GPU: 8}}" in msg
        and f"has {len(order) - 1}" in msg
        and "10.0.0.9 (GPU: 4)" in msg
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "widep",
            "launch",
            str(ROOT / "topologies" / "deepseek-r1-pd-3x8-h200.yaml"),
            "--backend",
            "ray",
            "--dry-run",
            "--model-path",
            "/models/r1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert r.returncode == 0, r.stderr
    assert "STRICT_SPREAD" in r.stdout and '{"GPU": 8.0}' in r.stdout and "--data-parallel-address" in r.stdout


def test_health_rules_shared_by_both_backends():
    """judge_health / note_health (widep.run.state), which the one supervisor applies for every backend."""
    from widep.run.state import GroupState, judge_health, note_health

    h, since = {}, {}
    note_health(h, since, "serve/0", "healthy", 1.0)
    note_health(h, since, "serve/1", "refused", 1.0)
    names = ["serve/0", "serve/1"]
    assert judge_health(GroupState.STARTING, names, h, since, 0.0, 5.0, 10, 3).rank is None
    v = judge_health(GroupState.STARTING, names, h, since, 0.0, 11.0, 10, 3)
    assert v.rank == "serve/1" and "did not become healthy in 10 s (still waiting: serve/1)" in v.reason
    note_health(h, since, "serve/1", "healthy", 12.0)
    assert since == {} and judge_health(GroupState.STARTING, names, h, since, 0.0, 12.0, 10, 3).all_healthy
    note_health(h, since, "serve/0", "timeout", 20.0)
    note_health(h, since, "serve/0", "refused", 22.0)  # the first unhealthy moment is kept
    assert judge_health(GroupState.HEALTHY, names, h, since, 0.0, 22.5, 10, 3).rank is None
    v = judge_health(GroupState.HEALTHY, names, h, since, 0.0, 23.5, 10, 3)
    assert (v.rank, v.at) == ("serve/0", 20.0) and v.reason == "unhealthy (refused) for 4 s"
