"""`widep experts` on real CPU vLLM: routed-expert return from a DP2/EP2 deployment (widep's vLLM plugin wires vLLM's
own AuxOutput connector into the V1 CPU model runner, widep/vllm_cpu_ep.py gap 4).

* the balanced tiny MoE and the ``--router-skew 0.1`` one, each launched as the built-in default DP2/EP2 topology
  with ``serving.record_routed_experts: true``, recorded with ``widep experts record`` (vLLM's response field
  ``choices[].routed_experts``): the skewed record's balancedness is well below the balanced one's;
* ``widep experts advise`` recommends redundant experts on the skewed record and EPLB off on a uniform record;
* recording changes no served token: greedy token ids of every rank (recording on) equal those of a DP1 server of
  the same model without the flag (DP2/EP2 equals DP1 one request at a time: tests/test_wide_ep.py).

Cost: 3 server starts (1 DP1, 2 DP2/EP2 launches), about 5-7 minutes on 2 loaded cores.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from launch_helpers import ROOT, LaunchProc, free_ports
from vllm_helpers import start_vllm

pytestmark = pytest.mark.vllm

PROMPTS = ["Wide expert parallelism is", "The quick brown fox", "1 2 3 4 5", "Experts are routed to ranks by"]
MAX_TOKENS = 8
SKEW = 0.1


def post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def greedy(url: str, model: str, prompt: str) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    return post(url, body)["choices"][0]


def widep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "widep", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def topology(tmp: Path, name: str) -> tuple[Path, list[str]]:
    doc = yaml.safe_load((ROOT / "topologies" / "tiny-moe-cpu-ep2.yaml").read_text())
    port, rpc, control = free_ports(3)
    doc["name"] = name
    doc["model"]["served_model_name"] = "tiny"
    doc["serving"].update({"port": port, "rpc_port": rpc, "control_port": control, "record_routed_experts": True})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, [f"http://127.0.0.1:{port + i}" for i in range(2)]


def launch_and_record(tmp: Path, name: str, model_dir: Path, python: str) -> tuple[dict, dict]:
    """Launch DP2/EP2 with recording on; returns (the record file's JSON, greedy choices per (rank url, prompt))."""
    topo, urls = topology(tmp, name)
    lp = LaunchProc(
        [str(topo), "--model-path", str(model_dir), "--python", python, "--run-dir", str(tmp / f"run-{name}")]
    )
    try:
        lp.wait_for(rf"ready: {name}", 400)
        out = tmp / f"{name}.json"
        r = widep("experts", "record", str(topo), "--requests", "24", "--max-tokens", "8", "--out", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        choices = {(u, p): greedy(u, "tiny", p) for u in urls for p in PROMPTS}
        return json.loads(out.read_text()), choices
    finally:
        lp.stop(signal.SIGKILL)


def show(path: Path) -> dict:
    r = widep("experts", "show", str(path), "--topology", str(ROOT / "topologies" / "tiny-moe-cpu-ep2.yaml"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def advise(path: Path) -> dict:
    r = widep(
        "experts", "advise", str(path), "--topology", str(ROOT / "topologies" / "tiny-moe-cpu-ep2.yaml"), "--json"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_record_from_dp2_ep2_skewed_vs_balanced_and_tokens_unchanged(tiny_moe_dir, vllm_python, tmp_path):
    from widep.experts.record import decode_routed_experts
    from widep.tinymoe import ensure_tiny_moe

    skewed_dir = ensure_tiny_moe("qwen3_moe", tiny_moe_dir.parent, router_skew=SKEW)
    # the reference: DP1 of the balanced model, recording off
    argv = ["--model", str(tiny_moe_dir), "--served-model-name", "tiny", "--enforce-eager", "--max-model-len", "1024"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    with start_vllm(argv, env, python=vllm_python, timeout=300) as srv:
        ref = {p: greedy(srv.url, "tiny", p) for p in PROMPTS}
    assert all(c.get("routed_experts") is None for c in ref.values())  # off: vLLM returns no field

    bal, bal_choices = launch_and_record(tmp_path, "rec-bal", tiny_moe_dir, vllm_python)
    for (u, p), c in bal_choices.items():
        assert c["token_ids"] == ref[p]["token_ids"], f"{u}: recording on changed the tokens of {p!r}"
        routed = decode_routed_experts(c["routed_experts"])  # (prompt + generated - 1, layers, top_k)
        assert routed.shape == (len(c["prompt_token_ids"]) + MAX_TOKENS - 1, 2, 2), routed.shape
        assert routed.max() < 8
    skew, _ = launch_and_record(tmp_path, "rec-skew", skewed_dir, vllm_python)

    for rec in (bal, skew):
        assert rec["layers"] == 2 and rec["experts"] == 8 and rec["tokens"] > 24 * 8
        assert "widep experts record" in rec["source"]
        counts = np.asarray(rec["counts"])
        assert counts.sum() == rec["tokens"] * 2 * 2  # every token: top-2 in each of 2 MoE layers
    b_bal, b_skew = (show(tmp_path / f"rec-{k}.json")["balancedness"] for k in ("bal", "skew"))
    assert b_skew < 0.75 < b_bal, (b_skew, b_bal)

    a_skew = advise(tmp_path / "rec-skew.json")
    assert a_skew["recommendation"]["eplb_enabled"] and a_skew["recommendation"]["redundant_experts"] > 0, a_skew
    uniform = tmp_path / "uniform.json"
    uniform.write_text(
        json.dumps({**bal, "counts": [[1000] * 8, [1000] * 8], "tokens": 4000, "source": "hand-made uniform"})
    )
    a_uni = advise(uniform)
    assert not a_uni["recommendation"]["eplb_enabled"], a_uni
    print(
        f"\nDP2/EP2 recorded: balanced model balancedness {b_bal:.3f}, --router-skew {SKEW}: {b_skew:.3f}; advise "
        f"skewed -> {a_skew['recommendation']['redundant_experts']} redundant, uniform -> EPLB off; "
        f"{len(bal_choices)} greedy answers with recording on equal DP1 without it"
    )
