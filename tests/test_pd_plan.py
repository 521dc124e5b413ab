"""P/D planning and rendering (pure): the CPU NIXL hand-off, side-channel ports, and P/D topologies whose roles
disagree on model, block size or KV dtype, or whose side channels collide, refused by plan, render, lws and launch
alike before anything starts (exit 2, the fields named)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from widep.errors import UserError
from widep.plan import plan
from widep.render.vllm import RenderContext, render, render_router
from widep.spec.topology import load_topology, parse_topology

ROOT = Path(__file__).parents[1]
CPU_PD = ROOT / "topologies" / "tiny-moe-cpu-pd.yaml"
CTX = RenderContext(model_path="/models/tiny", cpu_count=2)


def cpu_pd_doc() -> dict:
    return yaml.safe_load(CPU_PD.read_text())


def flag(argv, name):
    a = list(argv)
    return a[a.index(name) + 1] if name in a else None


def test_cpu_pd_renders_nixl_on_dram_per_role_side_channels_and_pd_router():
    p = plan(load_topology(CPU_PD))
    pre, dec = render(p, CTX)
    for c in (pre, dec):
        assert json.loads(flag(c.argv, "--kv-transfer-config")) == {
            "kv_connector": "NixlConnector",
            "kv_role": "kv_both",
            "kv_buffer_device": "cpu",
            "kv_load_failure_policy": "fail",
        }
        assert c.env_dict["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
    side = "VLLM_NIXL_SIDE_CHANNEL_PORT"
    assert (pre.env_dict[side], dec.env_dict[side]) == ("5700", "5710")
    assert (pre.env_dict["VLLM_CPU_OMP_THREADS_BIND"], dec.env_dict["VLLM_CPU_OMP_THREADS_BIND"]) == ("0", "1")
    assert [r.side_channel_port for rp in p.roles for r in rp.ranks] == [5700, 5710]
    a = list(render_router(p, CTX).argv)
    assert "--vllm-pd-disaggregation" in a
    assert flag(a, "--prefill") == "http://127.0.0.1:8400" and flag(a, "--decode") == "http://127.0.0.1:8410"


def test_gpu_pd_keeps_kv_in_vram_and_side_channel_is_per_engine():
    d = load_topology(ROOT / "topologies/deepseek-r1-pd-3x8-h200.yaml").model_dump(mode="json")
    d["roles"][1]["tp"] = 2
    p = plan(parse_topology(d))
    dec = p.role("decode")
    # one side channel per engine (all its TP workers): base + DP rank, as vLLM 0.32's NIXL scheduler listens
    assert [r.side_channel_port for r in dec.ranks] == [5600 + i for i in range(8)]
    kvt = json.loads(flag(render(p, CTX, role="decode")[0].argv, "--kv-transfer-config"))
    assert "kv_buffer_device" not in kvt and kvt["kv_load_failure_policy"] == "fail"


def test_kv_load_failure_policy_recompute_rendered_and_refused_where_unknown():
    d = cpu_pd_doc()
    d["serving"]["kv_load_failure_policy"] = "recompute"
    p = plan(parse_topology(d))
    assert json.loads(flag(render(p, CTX)[1].argv, "--kv-transfer-config"))["kv_load_failure_policy"] == "recompute"
    d["vllm"]["version"] = "0.10.2"
    with pytest.raises(UserError, match=r"serving.kv_load_failure_policy: 'recompute' with vLLM 0.10.2.*Valid: fail"):
        plan(parse_topology(d))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["roles"][1].update(block_size=32),
            (
                r"roles\[1\].block_size: decode role 'decode' has block_size 32 but prefill role 'prefill' \(roles\[0\]"
                r".block_size\) has \(vLLM default\).*Valid: the same block_size"
            ),
        ),
        (
            lambda d: d["roles"][0].update(kv_cache_dtype="fp8"),
            (
                r"roles\[1\].kv_cache_dtype: decode role 'decode' stores KV as bf16 but prefill role 'prefill' "
                r"\(roles\[0\].kv_cache_dtype, default model.kv_cache_dtype\) as fp8"
            ),
        ),
        (
            lambda d: d["roles"][1].update(extra_args=["--revision", "v2"]),
            (
                r"roles\[1\].extra_args: decode role 'decode' loads the model with --revision v2 but prefill role "
                r"'prefill' "
                r"\(roles\[0\].extra_args\) with --revision \(vLLM default\)"
            ),
        ),
        (
            lambda d: d["roles"][0].update(extra_args=["--dtype=float16"]),
            (
                r"roles\[1\].extra_args: decode role 'decode' loads the model with --dtype \(vLLM default\) but "
                r"prefill role "
                r"'prefill' \(roles\[0\].extra_args\) with --dtype float16"
            ),
        ),
        (
            lambda d: d["roles"][1].update(nixl_side_channel_port=5700),
            (
                r"roles\[1\].nixl_side_channel_port: port 5700 on node localhost is used twice: by prefill NIXL side "
                r"channel "
                r"rank 0 \(roles\[0\].nixl_side_channel_port\) and by decode NIXL side channel rank 0 "
                r"\(roles\[1\].nixl_side_channel_port\)"
            ),
        ),
        (
            lambda d: [r.pop("nixl_side_channel_port") for r in d["roles"]],
            (
                r"serving.nixl_side_channel_port: port 5600 on node localhost is used twice: by prefill NIXL side "
                r"channel "
                r"rank 0 \(serving.nixl_side_channel_port\) and by decode"
            ),
        ),
        (
            lambda d: d["roles"][0].update(nixl_side_channel_port=8410),
            r"roles\[1\].port: port 8410 on node localhost is used twice: by prefill NIXL side channel rank 0",
        ),
    ],
    ids=[
        "block-size",
        "kv-dtype",
        "model-revision",
        "model-dtype",
        "side-channel-override",
        "side-channel-default",
        "side-channel-vs-http",
    ],
)
def test_disagreeing_pd_roles_refused_naming_fields(change, message):
    d = cpu_pd_doc()
    change(d)
    with pytest.raises(UserError, match=message):
        plan(parse_topology(d))


def test_equal_settings_on_both_roles_accepted():
    d = cpu_pd_doc()
    for r in d["roles"]:
        r.update(block_size=32, kv_cache_dtype="bf16", extra_args=["--revision=main"])
    p = plan(parse_topology(d))
    assert all(flag(c.argv, "--block-size") == "32" for c in render(p, CTX))


def test_block_size_in_extra_args_refused_as_owned():
    d = cpu_pd_doc()
    d["roles"][1]["extra_args"] = ["--block-size", "32"]
    with pytest.raises(
        UserError,
        match=r"roles\[1\].extra_args\[0\]: '--block-size' is set by widep from roles\[\]"
        r".block_size",
    ):
        render(plan(parse_topology(d)), CTX)


@pytest.mark.parametrize(
    "cmd", [["plan"], ["render", "--model-path", "/m"], ["lws"], ["launch", "--node", "0", "--model-path", "/m"]]
)
def test_every_command_refuses_disagreeing_roles_before_starting(tmp_path, cmd):
    d = cpu_pd_doc()
    d["roles"][1]["block_size"] = 64
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    extra = ["--run-dir", str(tmp_path / "run")] if cmd[0] == "launch" else []
    r = subprocess.run(
        [sys.executable, "-m", "widep", cmd[0], str(path), *cmd[1:], *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "roles[1].block_size: decode role 'decode' has block_size 64" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_cpu_pd_with_dp2_ep2_decode_group():
    p = plan(load_topology(ROOT / "topologies" / "tiny-moe-cpu-pd-dp2.yaml"))
    dec = p.role("decode")
    assert (dec.dp_size, dec.ep_size, dec.experts_per_gpu) == (2, 2, 4)
    assert [r.side_channel_port for r in dec.ranks] == [5710, 5711] and [r.port for r in dec.ranks] == [8410, 8411]
    cmds = render(p, CTX, role="decode")
    assert {c.env_dict["VLLM_NIXL_SIDE_CHANNEL_PORT"] for c in cmds} == {"5710"}  # vLLM adds the DP rank
    assert [c.env_dict["VLLM_CPU_OMP_THREADS_BIND"] for c in cmds] == ["1", "0"]  # slot 2 wraps onto core 0
    a = list(render_router(p, CTX).argv)
    assert [a[i + 1] for i, x in enumerate(a) if x == "--decode"] == ["http://127.0.0.1:8410", "http://127.0.0.1:8411"]


def test_cpu_cores_budget_wraps_slots_without_the_render_host_and_is_what_preflight_asks_for():
    from widep.doctor import requirements_from_plan

    doc = yaml.safe_load((ROOT / "topologies" / "tiny-moe-cpu-pd-dp2.yaml").read_text())
    p = plan(parse_topology(doc))
    binds = [c.env_dict["VLLM_CPU_OMP_THREADS_BIND"] for c in render(p, RenderContext(model_path="/m"))]
    assert binds == ["0", "1", "0"]  # 3 engines on cluster.cpu_cores = 2, whatever core count renders
    assert requirements_from_plan(p, 0).cpu_ranks == 2  # 2 cores needed, not one per engine
    doc["cluster"]["cpu_cores"] = 4
    with pytest.raises(UserError, match=r"cluster.cpu_cores: 4 cores for 3 rank slots per node.*Valid: 1..3"):
        plan(parse_topology(doc))
    doc["cluster"].update(cpu_cores=2, gpu="H100")
    with pytest.raises(UserError, match=r"cluster.cpu_cores: 2 on GPU kind 'H100'.*Valid: CPU"):
        plan(parse_topology(doc))
