"""`widep profile` against a real CPU vLLM rank launched with --profile: traces are written and gathered."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from launch_helpers import ROOT, LaunchProc, topology_copy

from widep.plan import plan
from widep.render.vllm import RenderContext, render
from widep.spec.topology import load_topology, parse_topology


def test_profiler_config_rendered_per_version():
    p = plan(load_topology(ROOT / "topologies/deepseek-r1-decode-2x8-h200.yaml"))
    c = render(p, RenderContext(model_path="/m", profile_dir="/runs/x/profiles"))[3]
    a = list(c.argv)
    cfg = json.loads(a[a.index("--profiler-config") + 1])
    assert cfg["profiler"] == "torch" and cfg["torch_profiler_dir"] == "/runs/x/profiles/decode/rank-3"
    old = load_topology(ROOT / "topologies/deepseek-r1-prefill-1x8-h200.yaml")
    old = old.model_copy(
        update={
            "vllm": old.vllm.model_copy(update={"version": "0.11.0"}),
            "profiler": old.profiler.model_copy(update={"enabled": True}),
        }
    )
    c = render(plan(old), RenderContext(model_path="/m"))[0]
    assert (
        "--profiler-config" not in c.argv
        and c.env_dict["VLLM_TORCH_PROFILER_DIR"] == "/tmp/widep-profiles/prefill/rank-0"
    )
    assert "--profiler-config" not in render(p, RenderContext(model_path="/m"))[0].argv  # off by default


def test_relative_profiler_dir_refused():
    from widep.errors import UserError

    with pytest.raises(UserError, match="profiler.dir: the profiler directory must be absolute"):
        parse_topology(
            {"name": "t", "model": {"preset": "deepseek-r1"}, "roles": [{"name": "d"}], "profiler": {"dir": "rel"}}
        )


@pytest.mark.vllm
def test_profile_a_running_rank(tmp_path, tiny_moe_dir, vllm_python):
    topo = topology_copy("tiny-moe-cpu.yaml", tmp_path)
    run = tmp_path / "run"
    lp = LaunchProc(
        [str(topo), "--profile", "--model-path", str(tiny_moe_dir), "--python", vllm_python, "--run-dir", str(run)]
    )
    try:
        lp.wait_for(r"ready: ", 240)
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "widep",
                "profile",
                str(topo),
                "--run-dir",
                str(run),
                "--requests",
                "4",
                "--concurrency",
                "2",
                "--isl",
                "16",
                "--osl",
                "4",
                "--out",
                str(tmp_path / "traces"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        meta = json.loads((tmp_path / "traces" / "traces.json").read_text())
        assert meta["ranks"] == ["serve/0"] and meta["files"]
        assert all((tmp_path / "traces" / "serve" / "rank-0").iterdir())
        assert "4/4 requests ok" in r.stdout
    finally:
        lp.stop(signal.SIGTERM)
