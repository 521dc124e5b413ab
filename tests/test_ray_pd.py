"""`widep launch topologies/tiny-moe-cpu-pd-dp2.yaml --backend ray --once` on a real local Ray cluster of one node
(ray.cluster_utils.Cluster: a head with ``widep_slot: 3``, the topology's one plan node of 3 CPU slots) running real
CPU vLLM: the prefill group and the DP2/EP2 decode group share that node's one node agent (each group's ranks start,
fail and stop apart), the driver starts vllm-router in P/D mode on the head, fronting the ranks at the addresses Ray
placed them at, and ``--once`` proves the hand-off to both decode ranks through it. Nothing is left afterwards.

Own module and cluster: tests/test_ray_backend.py's cluster has one slot per node. Cost: one deployment of three
engines and a router, 3-6 minutes on 2 shared cores.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import sys
import time

import pytest
import yaml
from launch_helpers import LaunchProc, pd_topology_copy, wait_gone

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

_IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def one_node_cluster():
    if importlib.util.find_spec("ray") is None:
        if _IN_CI:
            pytest.fail("ray is not installed; CI installs widep[ray]", pytrace=False)
        pytest.skip("ray is not installed")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"widep_slot": 3}})
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()


def test_pd_with_dp2_ep2_decode_through_ray_with_the_router_hands_kv_to_both_decode_ranks(
    one_node_cluster, tmp_path, tiny_moe_dir, vllm_python
):
    topo = pd_topology_copy("tiny-moe-cpu-pd-dp2.yaml", tmp_path)
    rport = yaml.safe_load(topo.read_text())["router"]["port"]
    args = [str(topo), "--once", "--backend", "ray", "--address", one_node_cluster.address, "--backoff", "1"]
    args += ["--model-path", str(tiny_moe_dir), "--python", vllm_python, "--run-dir", str(tmp_path / "run")]
    t0 = time.monotonic()
    drv = LaunchProc(args, env={"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")})
    try:
        rc = drv.proc.wait(timeout=1200)
        drv.t.join(10)
    finally:
        run_id = drv.run_id() if drv.lines else None
        drv.stop(signal.SIGKILL)
        print(f"--- widep launch --backend ray --once ({time.monotonic() - t0:.0f} s) ---\n" + drv.output())
    out = "\n".join(drv.lines)
    assert rc == 0, out[-5000:]
    assert "groups prefill, decode" in out and "1 bundle(s) of {'widep_slot': 3.0}" in out
    assert re.search(rf"\[router\] ready: http://[0-9.]+:{rport} fronts 3 API server\(s\)", out), out[-3000:]
    served = re.findall(
        r"request \d+ \(.*prefill prefill/0 \(computed (\d+)\) -> decode (decode/[01]) \(external KV (\d+) tokens",
        out,
    )
    assert {m[1] for m in served} == {"decode/0", "decode/1"}, out[-3000:]
    assert all(int(external) > 0 and int(computed) == int(external) for computed, _, external in served)
    assert "placement group removed" in out
    assert run_id and wait_gone(run_id, 60) == []
