"""The planner: rank layout (exhaustively), expert placement, ports, memory, and refusals."""

import glob
import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from widep.errors import UserError
from widep.plan import expert_slots, plan
from widep.spec.topology import load_topology, parse_topology

ROOT = Path(__file__).parents[1]
GIB = 2**30


def topo(roles, *, gpu="H200", gpn=8, nodes=2, model="deepseek-r1", mode="external", version="0.32.0", **extra):
    d = {
        "name": "t",
        "model": {"preset": model},
        "cluster": {"gpu": gpu, "gpus_per_node": gpn, "nodes": nodes},
        "roles": roles,
        "serving": {"dp_mode": mode},
        "vllm": {"version": version},
    }
    d.update(extra)
    return parse_topology(d)


# ---------------------------------------------------------------- layout, exhaustively


@pytest.mark.parametrize(
    "nodes,gpn,tp,mode",
    [
        c
        for c in itertools.product([1, 2, 4], [1, 2, 4, 8], [1, 2, 4, 8], ["external", "hybrid", "internal"])
        if c[2] <= c[1]
    ],
)
def test_layout_exhaustive(nodes, gpn, tp, mode):
    # Qwen3-30B: 128 experts divide by every power-of-two EP up to 128.
    p = plan(
        topo(
            [{"name": "r", "nodes": nodes, "tp": tp, "max_model_len": 4096}],
            gpu="H200",
            gpn=gpn,
            nodes=nodes,
            model="qwen3-30b-a3b",
            mode=mode,
        )
    )
    (rp,) = p.roles
    assert rp.dp_size == nodes * gpn // tp
    assert rp.ep_size == rp.dp_size * tp
    assert [r.dp_rank for r in rp.ranks] == list(range(rp.dp_size))
    # every GPU of every node used exactly once
    used = [(r.node, g) for r in rp.ranks for g in r.gpus]
    assert sorted(used) == sorted(itertools.product(range(nodes), range(gpn)))
    for r in rp.ranks:
        assert r.node == r.dp_rank // (gpn // tp)
        assert r.local_rank == r.dp_rank % (gpn // tp)
        assert r.gpus == tuple(range(r.local_rank * tp, (r.local_rank + 1) * tp))
        if mode == "external":
            assert r.port == 8000 + r.local_rank
        elif mode == "hybrid":
            assert r.port == 8000
        else:
            assert r.port == (8000 if r.node == 0 else None)
    # experts: each rank holds a contiguous slice, all experts covered exactly once
    allx = [e for r in rp.ranks for e in r.experts]
    assert sorted(allx) == list(range(128))
    assert all(len(r.experts) == 128 // rp.dp_size for r in rp.ranks)


def test_multiport_ports_and_supervisor():
    p = plan(topo([{"name": "d", "nodes": 2, "max_num_batched_tokens": 256, "max_model_len": 8192}], mode="multiport"))
    rp = p.roles[0]
    assert [r.port for r in rp.ranks] == [8000 + i for i in range(8)] * 2


def test_multiport_needs_new_vllm():
    with pytest.raises(UserError, match="serving.dp_mode: 'multiport' needs vLLM >= 0.20"):
        plan(topo([{"name": "d", "nodes": 2}], mode="multiport", version="0.10.2"))


def test_redundant_experts_placement_matches_vllm_initial_map():
    p = plan(
        parse_topology(
            __import__("yaml").safe_load((ROOT / "topologies/deepseek-r1-decode-4x8-h200-eplb.yaml").read_text())
        )
    )
    rp = p.roles[0]
    assert rp.physical_experts == 288 and rp.experts_per_gpu == 9
    assert rp.ranks[0].experts == tuple(range(9))
    slots = expert_slots(256, 32)
    assert slots[256:] == list(range(32))
    assert rp.ranks[-1].experts == tuple(slots[279:288]) == tuple(range(23, 32))
    # every logical expert lives somewhere; hot-expert replicas exist for experts 0..31
    held = [e for r in rp.ranks for e in r.experts]
    assert set(held) == set(range(256)) and len(held) == 288


def test_pd_roles_take_disjoint_nodes_and_side_channels():
    p = plan(load_topology(ROOT / "topologies/deepseek-r1-pd-3x8-h200.yaml"))
    pre, dec = p.roles
    assert pre.group_nodes == ((0,),) and dec.group_nodes == ((1, 2),)
    assert [r.side_channel_port for r in dec.ranks] == [5600 + i for i in range(16)]
    assert p.endpoints("decode")[0] == ("decode", "10.0.0.11", 8200)
    assert len(p.endpoints()) == 24


def test_replicas_are_independent_groups():
    p = plan(load_topology(ROOT / "topologies/tiny-moe-cpu-2x.yaml"))
    rp = p.roles[0]
    assert rp.group_nodes == ((0,), (1,))
    assert [(r.replica, r.dp_rank, r.node) for r in rp.ranks] == [(0, 0, 0), (1, 0, 1)]


def test_roles_sharing_a_node_by_gpu_range():
    p = plan(
        topo(
            [
                {"name": "a", "nodes": [0], "gpus_per_node": 4, "max_model_len": 4096},
                {
                    "name": "b",
                    "nodes": [0],
                    "first_gpu": 4,
                    "gpus_per_node": 4,
                    "port": 8100,
                    "rpc_port": 29600,
                    "max_model_len": 4096,
                },
            ],
            gpn=8,
            nodes=1,
            model="qwen3-30b-a3b",
        )
    )
    assert [r.gpus for r in p.roles[1].ranks] == [(4,), (5,), (6,), (7,)]


# ---------------------------------------------------------------- refusals


def test_gpu_overlap_refused():
    with pytest.raises(UserError, match="GPU 0 of node node-0 is given to both"):
        plan(
            topo(
                [
                    {"name": "a", "nodes": [0], "max_model_len": 4096},
                    {"name": "b", "nodes": [0], "port": 9000, "rpc_port": 29600, "max_model_len": 4096},
                ],
                nodes=1,
                model="qwen3-30b-a3b",
            )
        )


def test_port_collision_refused():
    with pytest.raises(UserError, match="port 8000 on node node-0 is used twice"):
        plan(
            topo(
                [
                    {"name": "a", "nodes": [0], "gpus_per_node": 4, "max_model_len": 4096},
                    {
                        "name": "b",
                        "nodes": [0],
                        "first_gpu": 4,
                        "gpus_per_node": 4,
                        "rpc_port": 29600,
                        "max_model_len": 4096,
                    },
                ],
                nodes=1,
                model="qwen3-30b-a3b",
            )
        )


def test_too_many_nodes():
    with pytest.raises(UserError, match=r"roles\[0\].nodes: role 'd' needs 3 node\(s\).*only 2"):
        plan(topo([{"name": "d", "nodes": 3}]))


def test_tp_must_divide():
    with pytest.raises(
        UserError, match=r"roles\[0\].tp: tp=3 does not divide the 8 GPUs per node.*Valid: \[1, 2, 4, 8\]"
    ):
        plan(topo([{"name": "d", "nodes": 1, "tp": 3}]))


def test_experts_must_divide():
    with pytest.raises(UserError) as e:
        plan(topo([{"name": "d", "nodes": 4, "eplb": {"enabled": True, "redundant_experts": 16}}], nodes=4))
    msg = str(e.value)
    assert msg.startswith(
        "roles[0].eplb.redundant_experts: 256 routed + 16 redundant experts = 272 do not divide over EP=32"
    )
    assert "redundant_experts in [0, 32, 64, 96]" in msg


def test_experts_must_divide_plain():
    with pytest.raises(UserError, match=r"Valid: an EP size .* divides 128 experts"):
        plan(topo([{"name": "d", "nodes": 1}], gpn=3, nodes=1, model="qwen3-30b-a3b", gpu="H100"))


def test_redundant_without_eplb_and_eplb_rules():
    with pytest.raises(UserError, match="redundant experts without EPLB"):
        plan(topo([{"name": "d", "nodes": 2, "eplb": {"redundant_experts": 32}}]))
    with pytest.raises(UserError, match="EPLB needs expert parallel"):
        plan(topo([{"name": "d", "nodes": 2, "expert_parallel": False, "eplb": {"enabled": True}}]))
    with pytest.raises(UserError, match="refuses it on the CPU"):
        plan(topo([{"name": "d", "nodes": 1, "eplb": {"enabled": True}}], gpu="CPU", gpn=2, nodes=1, model="tiny-moe"))


def test_backend_version_rules():
    with pytest.raises(UserError, match="'pplx' with vLLM 0.32.0: removed"):
        plan(topo([{"name": "d", "nodes": 2, "all2all_backend": "pplx"}]))
    p = plan(topo([{"name": "d", "nodes": 2, "all2all_backend": "pplx", "max_model_len": 8192}], version="0.10.2"))
    assert p.roles[0].all2all_backend == "pplx"
    with pytest.raises(UserError, match="only allgather_reducescatter"):
        plan(
            topo(
                [{"name": "d", "nodes": 1, "all2all_backend": "deepep_low_latency"}],
                gpu="CPU",
                gpn=2,
                nodes=1,
                model="tiny-moe",
            )
        )


def test_dbo_rules():
    with pytest.raises(UserError, match="DBO on CUDA needs all2all backend"):
        plan(topo([{"name": "d", "nodes": 2, "all2all_backend": "allgather_reducescatter", "dbo": {"enabled": True}}]))
    with pytest.raises(UserError, match="DBO needs vLLM >= 0.11"):
        plan(topo([{"name": "d", "nodes": 2, "dbo": {"enabled": True}}], version="0.10.1"))


def test_memory_does_not_fit():
    with pytest.raises(UserError) as e:
        plan(topo([{"name": "d", "nodes": 1, "gpus_per_node": 2}], gpu="H100", gpn=8, nodes=1))
    msg = str(e.value)
    assert "does not fit in H100 memory" in msg and "roles[0].gpu_memory_utilization" in msg and "Valid:" in msg


def test_max_model_len_over_kv_capacity():
    with pytest.raises(UserError, match="max_model_len=2048 but each rank's KV cache holds only"):
        plan(
            topo(
                [{"name": "d", "nodes": 1, "max_model_len": 2048, "kv_cache_gib": 0.0005}],
                gpu="CPU",
                gpn=1,
                nodes=1,
                model="tiny-moe",
            )
        )


def test_batched_tokens_at_least_seqs():
    with pytest.raises(UserError, match="max_num_batched_tokens: 64 is below max_num_seqs=256"):
        plan(topo([{"name": "d", "nodes": 2, "max_num_batched_tokens": 64}]))


# ---------------------------------------------------------------- warnings


def test_mla_tp_warning():
    p = plan(topo([{"name": "d", "nodes": 2, "tp": 2, "max_num_batched_tokens": 256, "max_model_len": 4096}]))
    assert any("duplicated 2x" in w for w in p.roles[0].warnings)


# ---------------------------------------------------------------- memory against hand-computed figures


def test_memory_deepseek_r1_decode_by_hand():
    p = plan(load_topology(ROOT / "topologies/deepseek-r1-decode-2x8-h200.yaml"))
    m = p.roles[0].memory
    fp8 = 1 + 4 / 16384  # FP8 weight + one fp32 scale per 128x128 block
    attn = 61 * (7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256 + 128 * 128 * 7168)
    dense = 3 * 3 * 7168 * 18432
    shared = 58 * 3 * 7168 * 2048
    embed = 2 * 129280 * 7168
    small = 58 * (7168 * 256 + 256) + 2 * 7168 * 61 + 7168  # router + norms, bf16
    non_expert = (attn + dense + shared) * fp8 + embed * 2 + small * 2
    experts = 16 * 58 * 3 * 7168 * 2048 * fp8  # 256 experts / EP16 = 16 per GPU
    assert m.non_expert_weights_gib == pytest.approx(non_expert / GIB, rel=1e-6)
    assert m.expert_weights_gib == pytest.approx(experts / GIB, rel=1e-6)
    assert m.non_expert_weights_gib == pytest.approx(17.77, abs=0.01)
    assert m.expert_weights_gib == pytest.approx(38.07, abs=0.01)
    # DeepEP low-latency buffer: 2 x (256 + 1) x 256 tokens x (2 x 7168 + 16) B
    assert m.all2all_buffer_gib == pytest.approx(2 * 257 * 256 * (2 * 7168 + 16) / GIB, rel=1e-9)
    budget = 0.9 * 139.8
    left = budget - (non_expert + experts) / GIB - m.all2all_buffer_gib - m.activation_gib - 1.0 - 1.5
    assert m.kv_cache_gib == pytest.approx(left, rel=1e-9)
    assert m.kv_tokens == int(left * GIB // 70272) // 64 * 64
    assert m.max_seqs_at_context == m.kv_tokens // 4096


def test_memory_qwen3_30b_by_hand():
    p = plan(load_topology(ROOT / "topologies/qwen3-30b-a3b-1x2-h100.yaml"))
    m = p.roles[0].memory
    experts = 64 * 48 * 3 * 2048 * 768 * 2
    assert m.expert_weights_gib == pytest.approx(experts / GIB, rel=1e-9)
    attn = 48 * (2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048 + 2 * 128)
    non_expert = attn * 2 + 2 * 151936 * 2048 * 2 + (48 * 2048 * 128 + 2 * 2048 * 48 + 2048) * 2
    assert m.non_expert_weights_gib == pytest.approx(non_expert / GIB, rel=1e-9)
    assert m.kv_bytes_per_token == 98304


# ---------------------------------------------------------------- properties


@st.composite
def clusters(draw):
    model = draw(
        st.sampled_from(
            [
                "deepseek-r1",
                "qwen3-30b-a3b",
                "qwen3-235b-a22b",
                "kimi-k2",
                "deepseek-v2-lite",
                "gpt-oss-120b",
                "mixtral-8x7b",
            ]
        )
    )
    gpu = draw(st.sampled_from(["H100", "H200", "B200"]))
    gpn = draw(st.sampled_from([1, 2, 4, 8]))
    nodes = draw(st.integers(1, 6))
    tp = draw(st.sampled_from([t for t in (1, 2, 4, 8) if t <= gpn]))
    role_nodes = draw(st.integers(1, nodes))
    redundant = draw(st.sampled_from([0, 0, 8, 16, 32]))
    mode = draw(st.sampled_from(["external", "hybrid", "internal", "multiport"]))
    return dict(
        model=model, gpu=gpu, gpn=gpn, nodes=nodes, tp=tp, role_nodes=role_nodes, redundant=redundant, mode=mode
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_planner_never_crashes_and_covers_everything(c):
    role = {"name": "r", "nodes": c["role_nodes"], "tp": c["tp"], "max_model_len": 2048}
    if c["redundant"]:
        role["eplb"] = {"enabled": True, "redundant_experts": c["redundant"]}
    try:
        spec = topo([role], gpu=c["gpu"], gpn=c["gpn"], nodes=c["nodes"], model=c["model"], mode=c["mode"])
        p = plan(spec)
    except UserError as err:
        assert str(err)  # a clear refusal is fine; any other exception fails the test
        return
    (rp,) = p.roles
    used = [(r.node, g) for r in rp.ranks for g in r.gpus]
    assert len(used) == len(set(used)) == c["role_nodes"] * c["gpn"]
    held = {e for r in rp.ranks for e in r.experts}
    assert held == set(range(p.arch.routed_experts))
    assert rp.memory.kv_cache_gib > 0 and rp.memory.kv_tokens >= 2048


def test_every_curated_topology_plans():
    files = sorted(glob.glob(str(ROOT / "topologies/*.yaml")))
    assert len(files) >= 8
    for f in files:
        p = plan(load_topology(f))
        assert p.roles
