"""A measured mini-sweep, end to end: two tiny CPU topologies launched for real (CPU vLLM, tiny MoE), DP1 and
DP2/EP2 behind vllm-router, benchmarked with the built-in generator, torn down; results land beside predicted ones,
resumable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from launch_helpers import ROOT, free_ports

pytestmark = pytest.mark.vllm


def tiny(tmp_path, name, replicas_file, router=False):
    doc = yaml.safe_load((ROOT / "topologies" / replicas_file).read_text())
    if router:
        doc["router"] = {"enabled": True, "node": 0, "host": "node", "policy": "round_robin"}
    port, rpc, control, rport, prom = free_ports(5)
    doc["name"] = name
    doc["serving"].update({"port": port, "rpc_port": rpc, "control_port": control})
    if "router" in doc:
        doc["router"].update({"port": rport, "prometheus_port": prom})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_measured_mini_sweep(tmp_path, tiny_moe_dir, vllm_python):
    a = tiny(tmp_path, "one-rank", "tiny-moe-cpu.yaml")
    b = tiny(tmp_path, "dp2-ep2-router", "tiny-moe-cpu-ep2.yaml", router=True)
    out = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "widep",
        "sweep",
        str(a),
        str(b),
        "--measure",
        "--out",
        str(out),
        "--concurrency",
        "1,2",
        "--isl",
        "32",
        "--osl",
        "8",
        "--requests-per-level",
        "4",
        "--model-path",
        str(tiny_moe_dir),
        "--python",
        vllm_python,
        "--json",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(r.stdout)
    rows = {c["id"]: c for c in doc["candidates"]}
    assert set(rows) == {"one-rank", "dp2-ep2-router"}
    for ident in rows:
        res = json.loads((out / ident / "result.json").read_text())
        assert res["status"] == "ok", res.get("reason")
        assert [lv["concurrency"] for lv in res["levels"]] == [1, 2]
        for lv in res["levels"]:
            assert lv["completed"] == 4 and lv["failed"] == 0 and lv["tps_gpu"] > 0 and lv["tps_user"] > 0
        assert list((out / ident / "bench").glob("level-c1.report.yaml"))
    # torn down: no launcher or rank of the sweep is left
    leftovers = [
        line
        for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
        if str(out) in line
    ]
    assert leftovers == []
    # resumable: a second run reuses both measured points without launching anything
    r2 = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and json.loads(r2.stdout)["seconds"] < 30
