"""The chaos benchmark (issue 25): its arithmetic on hand-made records, the router's recovery flags as vllm-router
parses them, the recovery policy in the topology, and one real run on CPU vLLM behind the real router: SIGKILL of
rank 1's engine core under streaming load names rank 1, loses no request that had no first token (the router holds
it until the group is back) and leaves no process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from launch_helpers import ROOT, free_ports

from widep.bench.chaos import Target, longest_gap_after, medians, resumed_after, summarize_run, token_times
from widep.bench.records import RequestRecord
from widep.errors import UserError
from widep.plan import plan as make_plan
from widep.render.vllm import render_router
from widep.spec.topology import TopologySpec

ROUTER = shutil.which("vllm-router") or os.path.join(os.path.dirname(sys.executable), "vllm-router")


def rec(i: int, start: float, ttft: float | None, itls: list[float], ok: bool, chunks: int) -> RequestRecord:
    return RequestRecord(
        i, "http://x", start, ttft_s=ttft, itls_s=itls, ok=ok, chunks=chunks, e2e_s=1.0, error=None if ok else "boom"
    )


def test_the_summary_counts_failures_by_whether_a_token_came_and_finds_the_gap():
    records = [
        rec(0, 0.0, 0.5, [0.5, 0.5], True, 3),  # tokens at 0.5, 1.0, 1.5
        rec(1, 1.0, 0.2, [0.1], False, 2),  # 1.2, 1.3 then lost mid-stream
        rec(2, 1.4, None, [], False, 0),  # never got a token
        rec(3, 2.0, 3.0, [0.5], True, 2),  # 5.0, 5.5: service resumed
    ]
    assert token_times(records) == pytest.approx([0.5, 1.0, 1.2, 1.3, 1.5, 5.0, 5.5])
    s = summarize_run(records, 1.4, 6.0, 30.0, 0.4, 0, "group", "serve/1:api")
    assert (s["ok"], s["failed_before_first_token"], s["failed_mid_stream"]) == (2, 1, 1)
    assert s["interruption_s"] == pytest.approx(3.5)
    assert s["resumed_s"] == pytest.approx(3.6)  # the token at 5.0 ended the gap, 3.6 s after the kill
    assert longest_gap_after([0.5, 1.0], 1.2, 10.0) == pytest.approx(9.0)  # tokens never resumed
    assert resumed_after([0.5, 1.0], 1.2, 10.0) is None
    assert resumed_after([0.5, 1.0, 3.0], 1.2, 10.0) is None  # tokens came back, then stopped for longer
    m = medians([s, {**s, "interruption_s": 1.5}, {**s, "interruption_s": 9.0}])
    assert m["interruption_s"] == 3.5 and m["orphans"] == 0


def test_kill_targets_parse_strictly():
    assert str(Target.parse("serve/1")) == "serve/1:api"
    assert Target.parse("decode/3:engine") == Target("decode", 3, "engine")
    for bad in ("serve", "serve/x", "serve/1:gpu"):
        with pytest.raises(ValueError, match="ROLE/RANK"):
            Target.parse(bad)


def tiny(**role: object) -> dict:
    doc = yaml.safe_load((ROOT / "topologies" / "tiny-moe-cpu-ep2.yaml").read_text())
    doc["roles"][0].update(role)
    return doc


def test_surgical_recovery_is_refused_with_the_vllm_check_that_refuses_it():
    with pytest.raises(UserError, match=r"roles\[0\]\.recovery: 'surgical'.*vllm/config/parallel.py:963.*Valid: group"):
        make_plan(TopologySpec.model_validate(tiny(recovery="surgical")))
    with pytest.raises(ValueError, match="recovery"):
        TopologySpec.model_validate(tiny(recovery="sometimes"))
    assert make_plan(TopologySpec.model_validate(tiny())).roles[0].as_dict()["recovery"] == "group"


@pytest.mark.parametrize(
    "version,says",
    [
        ("0.33.0", r"vLLM 0\.33 accepts elastic EP behind per-rank API servers, but its scale-down is cooperative"),
        ("0.34.0", r"vLLM 0\.34's fault tolerance can drop faulted ranks \(instruction 'scale_down'.*/v1/fault_toler"),
    ],
)
def test_surgical_refusal_says_what_the_newer_vllm_lines_offer(version, says):
    doc = yaml.safe_load((ROOT / "topologies/deepseek-r1-decode-2x8-h200.yaml").read_text())
    doc.setdefault("vllm", {})["version"] = version
    doc["roles"][0]["recovery"] = "surgical"
    refusal = r"roles\[0\]\.recovery: 'surgical' with vLLM [0-9.]+: " + says + ".*Valid: group"
    with pytest.raises(UserError, match=refusal):
        make_plan(TopologySpec.model_validate(doc))


@pytest.mark.skipif(not os.path.exists(ROUTER), reason="vllm-router is not installed (scripts/dev installs it)")
def test_the_routers_recovery_flags_are_ones_vllm_router_takes():
    doc = tiny()
    doc["router"] = {"enabled": True, "retry_window_s": 60}
    one = render_router(make_plan(TopologySpec.model_validate(doc))).argv
    assert "--disable-circuit-breaker" in one  # one DP group: nothing else could take a request while it restarts
    assert int(one[one.index("--health-failure-threshold") + 1]) >= 100_000
    assert int(one[one.index("--retry-max-retries") + 1]) >= 30  # 60 s of 0.1 -> 2 s backoff
    two = yaml.safe_load((ROOT / "topologies" / "tiny-moe-cpu-2x.yaml").read_text())
    argv = render_router(make_plan(TopologySpec.model_validate(two))).argv
    for flag in ("--retry-max-retries", "--cb-timeout-duration-secs", "--health-success-threshold"):
        assert flag in argv
    argv = argv + one
    # every flag widep renders is one this vllm-router lists
    r = subprocess.run([ROUTER, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    listed = set(re.findall(r"--[a-z0-9-]+", r.stdout))
    assert {a for a in argv if a.startswith("--")} <= listed, {a for a in argv if a.startswith("--")} - listed


@pytest.mark.vllm
@pytest.mark.skipif(not os.path.exists(ROUTER), reason="vllm-router is not installed (scripts/dev installs it)")
def test_chaos_kill_of_an_engine_core_leaves_no_process(tmp_path, tiny_moe_dir, vllm_python):
    doc = tiny()
    port, rpc, control, rport, metrics = free_ports(5)
    doc["serving"].update({"port": port, "rpc_port": rpc, "control_port": control})
    doc["router"] = {"enabled": True, "port": rport, "prometheus_port": metrics}
    topo = tmp_path / "chaos.yaml"
    topo.write_text(yaml.safe_dump(doc, sort_keys=False))
    png = tmp_path / "chaos.png"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "widep",
            "bench",
            "chaos",
            str(topo),
            "--kill",
            "serve/1:engine",
            "--at",
            "5",
            "--duration",
            "15",
            "--concurrency",
            "4",
            "--json",
            "--plot",
            str(png),
            "--out",
            str(tmp_path / "out"),
            "--model-path",
            str(tiny_moe_dir),
            "--python",
            vllm_python,
            "--launch-arg=--backoff",
            "--launch-arg=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1500,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(doc, indent=1))
    (run,) = doc["runs"]
    assert run["killed_pid"] is not None and run["kill_s"] is not None
    assert doc["orphans"] == 0, doc
    assert doc["failed_before_first_token"] == 0, doc  # held by the router's retries until the group is back
    assert run["ok"] + run["failed_before_first_token"] + run["failed_mid_stream"] == run["requests"]
    assert "launch_log" in run and "serve/1 on" in Path(run["launch_log"]).read_text()
    assert doc["policy"] == "group" and doc["full_width_s"] is not None and doc["teardown_s"] is not None
    assert Path(doc["plot"]).stat().st_size > 0


def test_the_lws_header_says_what_a_pod_failure_costs_under_the_policy_emitted():
    from widep.k8s import lws as L

    crd = yaml.safe_load((ROOT.parent / "shared" / "schemas" / "lws-crd-v0.10.0.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    offered = schema["properties"]["spec"]["properties"]["leaderWorkerTemplate"]["properties"]["restartPolicy"]["enum"]
    assert set(offered) == {"Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"}
    two = make_plan(
        TopologySpec.model_validate(yaml.safe_load((ROOT / "topologies" / "tiny-moe-cpu-2x.yaml").read_text()))
    )
    docs = L.render_lws(two)
    (lws,) = [d for d in docs if d["kind"] == "LeaderWorkerSet"]
    policy = lws["spec"]["leaderWorkerTemplate"]["restartPolicy"]
    assert policy in offered
    cost, why_not = L.pod_failure_lines(docs)
    assert f"restartPolicy {policy}" in cost and "recreates all 1 pod(s)" in cost
    assert "start budget" in cost and "1/2 of the capacity" in cost
    assert "None (" in why_not and "RecreateGroupAfterStart (" in why_not and "parallel.py:964" in why_not
    assert cost in L.header_lines(two, "widep lws x", docs=docs, opts=L.LWSOptions())
