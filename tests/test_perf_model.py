"""The analytic step-time and serving model: limits, monotonicity, and agreement with the kernel tables."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from widep.errors import UserError
from widep.perf.calibration import published
from widep.perf.model import (
    ArchConst,
    RoleBatch,
    RoleInput,
    Workload,
    accepted_per_step,
    predict_plan,
    serve_decode_only,
    serve_mixed,
    serve_pd,
    spec_tokens_of,
    step_time,
)
from widep.plan.core import plan
from widep.spec.hardware import get_gpu
from widep.spec.models import load_preset
from widep.spec.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
CAL = published()
R1 = load_preset("deepseek-r1")
A_R1 = ArchConst.of(R1, "fp8", "bf16")


def role(
    gpu: str = "H200",
    *,
    kind: str = "decode",
    tp: int = 1,
    nodes: int = 2,
    gpn: int = 8,
    redundant: int = 0,
    eplb: bool = False,
    dbo: bool = False,
    backend: str = "deepep_low_latency",
    mns: int = 256,
    mnbt: int = 8192,
    kv_tokens: int = 1_000_000,
    replicas: int = 1,
    spec: int = 0,
    expert_parallel: bool = True,
    experts: int = 256,
    **gpu_changes: float,
) -> RoleInput:
    g = get_gpu(gpu)
    if gpu_changes:
        g = dataclasses.replace(g, **gpu_changes)
    ep = nodes * gpn
    return RoleInput(
        kind=kind,
        gpu=g,
        tp=tp,
        dp=ep // tp,
        ep=ep if expert_parallel else 1,
        replicas=replicas,
        nodes=nodes,
        expert_parallel=expert_parallel,
        physical_experts=experts + redundant,
        redundant=redundant,
        eplb=eplb,
        dbo=dbo,
        dbo_decode_threshold=32,
        dbo_prefill_threshold=512,
        backend=backend,
        cuda_graphs=True,
        max_num_batched_tokens=mnbt,
        max_num_seqs=mns,
        kv_tokens=kv_tokens,
        spec_tokens=spec,
    )


ROLE_VARIANTS = [
    dict(),
    dict(tp=2),
    dict(dbo=True),
    dict(nodes=1, backend="deepep_high_throughput", dbo=True),
    dict(nodes=4, redundant=32, eplb=True, dbo=True),
    dict(backend="allgather_reducescatter"),
    dict(nodes=1, gpn=8, tp=8, expert_parallel=False),
    dict(spec=1, dbo=True),
]
LOADS = [  # (decode seqs, query tokens, context, prefill tokens, prefill context)
    (1, 1, 100, 0, 0),
    (64, 1, 4000, 0, 0),
    (256, 2, 8000, 0, 0),
    (32, 1, 3000, 2048, 1024),
    (0, 1, 0, 16384, 2048),
]


@pytest.mark.parametrize("variant", ROLE_VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "base")
def test_step_time_is_never_below_the_hbm_roofline(variant: dict) -> None:
    rb = RoleBatch.build(A_R1, [role(**variant)], CAL)
    for d, q, ctx, p, ctxp in LOADS:
        st = step_time(rb, CAL, d, q, ctx, p, ctxp)
        assert st.total[0, 0] >= st.hbm_roofline[0, 0] > 0
        # and never below the FLOP roofline at the datasheet peak (FP8 is the fastest unit used)
        assert st.total[0, 0] >= st.flops[0, 0] / (rb.dense_peak[0, 0])


@pytest.mark.parametrize("variant", ROLE_VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "base")
def test_more_hbm_bandwidth_is_never_slower(variant: dict) -> None:
    base = get_gpu("H200").hbm_tbps
    bws = [base * f for f in (0.25, 0.5, 1.0, 2.0, 4.0, 16.0)]
    rb = RoleBatch.build(A_R1, [role(**variant, hbm_tbps=bw) for bw in bws], CAL)
    for d, q, ctx, p, ctxp in LOADS:
        t = step_time(rb, CAL, d, q, ctx, p, ctxp).total[:, 0]
        assert np.all(np.diff(t) <= 1e-12), t
    # and at the serving level: tokens/s/GPU and tokens/s/user never drop
    perf = serve_mixed(
        RoleBatch.build(A_R1, [role(**variant, kind="mixed", hbm_tbps=bw) for bw in bws], CAL),
        CAL,
        Workload(),
        np.asarray([[1, 64, 512, 4096]]),
    )
    assert np.all(np.diff(perf.tps_gpu, axis=0) >= -1e-9)
    assert np.all(np.diff(perf.tps_user, axis=0) >= -1e-9)


def test_more_flops_and_links_are_never_slower() -> None:
    g = get_gpu("H200")
    for field, vals in (
        ("fp8_tflops", [g.fp8_tflops * f for f in (0.5, 1, 2)]),
        ("nic_gbps", [25.0, 50.0, 100.0]),
        ("bf16_tflops", [g.bf16_tflops * f for f in (0.5, 1, 2)]),
    ):
        rb = RoleBatch.build(A_R1, [role(nodes=4, **{field: v}) for v in vals], CAL)
        for d, q, ctx, p, ctxp in LOADS:
            t = step_time(rb, CAL, d, q, ctx, p, ctxp).total[:, 0]
            assert np.all(np.diff(t) <= 1e-12), (field, t)


def test_more_ep_ranks_never_increase_per_rank_expert_bytes() -> None:
    eps = [(1, 8), (2, 8), (4, 8), (8, 8), (16, 8), (32, 8)]  # (nodes, gpus per node): EP 8..256
    rb = RoleBatch.build(A_R1, [role(nodes=n, gpn=g) for n, g in eps], CAL)
    for per_rank in (1, 4, 32, 256):  # same batch on every rank
        b = step_time(rb, CAL, per_rank, 1, 2000, 0, 0).expert_bytes[:, 0]
        assert np.all(np.diff(b) <= 1e-6), b
    ep = np.asarray([n * g for n, g in eps], float)[:, None]
    for total in (256, 4096):  # same global batch spread over more ranks
        b = step_time(rb, CAL, total / ep, 1, 2000, 0, 0).expert_bytes[:, 0]
        assert np.all(np.diff(b) <= 1e-6), b
    # the limit: one token per rank per step still cannot read more experts than top-k x DP... nor than it holds
    st = step_time(rb, CAL, 1, 1, 2000, 0, 0)
    held = (256 / ep) * A_R1.expert_params * A_R1.moe_layers * A_R1.expert_bytes_per_param
    assert np.all(st.expert_bytes <= held + 1e-6)


def test_expected_distinct_experts_under_top_k() -> None:
    """One token on a single GPU holding all experts activates exactly top-k of them."""
    rb = RoleBatch.build(A_R1, [role(nodes=1, gpn=1, backend="allgather_reducescatter")], CAL)
    st = step_time(rb, CAL, 1, 1, 10, 0, 0)
    assert st.active_experts[0, 0] == pytest.approx(8.0, rel=1e-9)
    st = step_time(rb, CAL, 4096, 1, 10, 0, 0)
    assert st.active_experts[0, 0] == pytest.approx(256.0, rel=1e-6)


def test_deepgemm_grouped_table_is_reproduced() -> None:
    """The soft roofline with the calibrated efficiencies reproduces DeepGEMM's grouped GEMM table (H800).

    Rows: perf-model-inputs.md §3.3 (groups, rows per group, N, K, published TFLOPS).
    """
    table = [
        (1, 1024, 4096, 7168, 1233),
        (1, 1024, 7168, 2048, 925),
        (2, 512, 4096, 7168, 1040),
        (2, 512, 7168, 2048, 916),
        (4, 256, 4096, 7168, 932),
        (4, 256, 7168, 2048, 815),
        (4, 8192, 4096, 7168, 1346),
        (4, 8192, 7168, 2048, 1214),
        (8, 4096, 4096, 7168, 1346),
        (8, 4096, 7168, 2048, 1214),
    ]
    h800 = get_gpu("H800")
    errs = []
    for g, m, n, k, tf in table:
        flops = 2.0 * g * m * n * k
        byts = g * n * k + g * m * k + g * m * n * 2
        tc = flops / (h800.fp8_tflops * 1e12 * CAL.gemm_fp8_efficiency)
        tm = byts / (h800.hbm_tbps * 1e12 * CAL.hbm_weights_efficiency)
        t = (tc**CAL.roofline_p + tm**CAL.roofline_p) ** (1 / CAL.roofline_p)
        errs.append(flops / t / 1e12 / tf - 1.0)
    assert max(abs(e) for e in errs) < 0.30, errs
    assert float(np.median(np.abs(errs))) < 0.10, errs


def test_all2all_reproduces_the_deepep_low_latency_table() -> None:
    """128 tokens per rank, no imbalance: one MoE layer's dispatch + combine equals the DeepEP LL table."""
    cal = dataclasses.replace(CAL, routing_stat_coef=0.0, routing_skew_no_eplb=0.0)
    table = {16: 118 + 195, 32: 155 + 273, 64: 173 + 314, 128: 192 + 369}
    h800 = dict(hbm_tbps=3.35, nvlink_gbps=200.0, nic_gbps=50.0)
    rb = RoleBatch.build(A_R1, [role("H800", nodes=ep // 8, **h800) for ep in table], cal)
    st = step_time(rb, cal, 128, 1, 1000, 0, 0)
    per_layer_us = st.all2all[:, 0] / A_R1.moe_layers * 1e6
    assert per_layer_us == pytest.approx(list(table.values()), rel=1e-6)
    # twice the tokens: latency once, bytes twice
    st2 = step_time(rb, cal, 256, 1, 1000, 0, 0)
    lat = 2 * cal.a2a_for("deepep_low_latency").latency_us
    assert st2.all2all[:, 0] / A_R1.moe_layers * 1e6 == pytest.approx([2 * v - lat for v in table.values()], rel=1e-6)


def test_dbo_hides_all2all_but_reads_weights_twice() -> None:
    rb = RoleBatch.build(A_R1, [role(nodes=4), role(nodes=4, dbo=True)], CAL)
    st = step_time(rb, CAL, 128, 1, 4000, 0, 0)
    assert st.micro_batches[:, 0].tolist() == [1.0, 2.0]
    assert st.all2all_exposed[1, 0] < st.all2all_exposed[0, 0]
    assert st.dense[1, 0] > st.dense[0, 0]
    # tiny batches are not split (dbo decode threshold 32)
    assert step_time(rb, CAL, 16, 1, 4000, 0, 0).micro_batches[1, 0] == 1.0


def test_dbo_helps_across_nodes_at_128_per_rank_and_not_inside_one_node() -> None:
    """vLLM's DBO: across nodes (RDMA: the wire time hides behind the other micro-batch) two micro-batches beat
    one where the hidden all-to-all outweighs the second read of every expert's weights (DeepGEMM's measured,
    SM-bound stream on H200): at 128 sequences per rank on EP32, at 256 on EP16 and EP32, the more the wider the
    EP; at 128 per rank on EP16 the two nearly cancel (within 5%); inside one node (NVLink: the copy is SM work)
    DBO costs more than it hides."""
    gain = {}
    for nodes in (1, 2, 4):
        rb = RoleBatch.build(A_R1, [role(nodes=nodes), role(nodes=nodes, dbo=True)], CAL)
        st = step_time(rb, CAL, 128, 1, 4000, 0, 0)
        gain[nodes] = st.total[0, 0] / st.total[1, 0]
        assert st.overlap_hidden[1, 0] > 0.0 and st.overlap_hidden[0, 0] == 0.0
    assert gain[1] < 1.0 < gain[4] and gain[1] < gain[2] < gain[4] and abs(gain[2] - 1.0) < 0.05
    big = {}
    for nodes in (2, 4):
        rb = RoleBatch.build(A_R1, [role(nodes=nodes), role(nodes=nodes, dbo=True)], CAL)
        st = step_time(rb, CAL, 256, 1, 4000, 0, 0)
        big[nodes] = st.total[0, 0] / st.total[1, 0]
    assert 1.0 < big[2] < big[4]


def test_accepted_tokens_per_step() -> None:
    assert accepted_per_step(np.asarray(0.0), 0.85) == pytest.approx(1.0)
    assert accepted_per_step(np.asarray(1.0), 0.85) == pytest.approx(1.85)
    assert accepted_per_step(np.asarray(3.0), 0.5) == pytest.approx(1.875)
    assert spec_tokens_of(["--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}']) == 2
    assert spec_tokens_of(['--speculative-config={"num_speculative_tokens": 1}']) == 1
    assert spec_tokens_of(["--enforce-eager"]) == 0
    with pytest.raises(UserError, match="speculative-config"):
        spec_tokens_of(["--speculative-config", "not json"])


def test_serving_curve_and_caps() -> None:
    """Per-user speed falls and per-GPU throughput rises with concurrency, until the batch cap; beyond it
    only the queue (TTFT) grows, and closed-loop Little's law holds."""
    r = role(kind="mixed", mns=64, kv_tokens=10_000_000)
    rb = RoleBatch.build(A_R1, [r], CAL)
    w = Workload(isl=1000, osl=1000, arrival="steady")
    C = np.asarray([[1, 4, 16, 64, 256, 1024, 4096, 16384]], float)
    perf = serve_mixed(rb, CAL, w, C)
    cap = float(perf.capacity[0, 0])
    assert cap == 64 * r.dp
    below = C[0] <= cap
    assert np.all(np.diff(perf.tps_user[0][below]) <= 1e-9)
    assert np.all(np.diff(perf.tps_gpu[0][below]) >= -1e-9)
    above = np.flatnonzero(~below)
    assert perf.tps_gpu[0, above[0]] == pytest.approx(perf.tps_gpu[0, above[-1]])
    assert perf.ttft[0, above[-1]] > perf.ttft[0, above[0]] > perf.ttft[0, 0]
    assert perf.ttft[0, below].max() == pytest.approx(perf.ttft[0, 0], rel=0.5)  # no queue below the cap
    assert [int(x) for x in perf.limit[0]] == [0] * int(below.sum()) + [1] * int((~below).sum())
    j = above[-1]
    e2e = perf.ttft[0, j] + (w.osl - 1) * perf.tpot[0, j]
    assert C[0, j] == pytest.approx(perf.requests_per_s[0, j] * e2e, rel=1e-6)
    # the KV cache caps the batch when it holds fewer sequences than max_num_seqs
    small = RoleBatch.build(A_R1, [role(kind="mixed", mns=256, kv_tokens=20 * 1536)], CAL)
    p2 = serve_mixed(small, CAL, w, np.asarray([[1e6]]))
    assert p2.batch[0, 0] == 20 and p2.limit[0, 0] == 2


def test_mixed_pays_for_prefill_and_pd_for_kv_transfer() -> None:
    w = Workload(isl=4000, osl=500)
    mixed = serve_mixed(RoleBatch.build(A_R1, [role(kind="mixed")], CAL), CAL, w, np.asarray([[512.0]]))
    dec = serve_decode_only(RoleBatch.build(A_R1, [role(kind="decode")], CAL), CAL, w, np.asarray([[512.0]]))
    assert mixed.tpot[0, 0] > dec.tpot[0, 0]  # prefill chunks steal step time
    assert dec.ttft[0, 0] > w.isl * A_R1.kv_bytes_mla / (50e9)  # at least the KV transfer over one NIC


def test_pd_is_limited_by_a_small_prefill_group() -> None:
    """With one slow prefill rank for a big decode group, decode runs at the prefill group's request rate."""
    w = Workload(isl=8000, osl=200, arrival="steady")
    rp = RoleBatch.build(A_R1, [role(kind="prefill", nodes=1, backend="deepep_high_throughput", mnbt=8192, mns=8)], CAL)
    rd = RoleBatch.build(A_R1, [role(kind="decode", nodes=4)], CAL)
    perf = serve_pd(rp, rd, CAL, w, np.asarray([[64.0, 4096.0]]))
    assert perf.limit[0, 1] == 4  # "prefill"
    # requests/s equal the prefill group's capacity (the fixed point converged)
    from widep.perf.model import _prefill_capacity

    xp, _, _ = _prefill_capacity(rp, CAL, w)
    xkv = rp.gpus * rp.nic * CAL.kv_transfer_nic_efficiency / (w.isl * rp.kv_bytes_tok)
    assert perf.requests_per_s[0, 1] == pytest.approx(float(np.minimum(xp, xkv)[0, 0]), rel=1e-3)
    assert perf.ttft[0, 1] > perf.ttft[0, 0]


CURATED = sorted(p for p in (ROOT / "topologies").glob("*.yaml"))


@pytest.mark.parametrize("path", CURATED, ids=lambda p: p.stem)
def test_predict_every_curated_topology(path: Path) -> None:
    pl = plan(load_topology(path))
    mode, levels = predict_plan(pl, Workload(isl=1000, osl=500), [1, 8, 64], CAL)
    assert mode in ("mixed", "pd", "decode-only", "prefill-only")
    assert levels and all(lv.tps_gpu > 0 and lv.step_ms > 0 for lv in levels)
    assert sum(lv.saturation for lv in levels) == 1
    if mode != "prefill-only":
        users = [lv.tps_user for lv in levels]
        assert all(u is not None and u > 0 for u in users)
        assert users == sorted(users, reverse=True)


def test_predict_rejects_bad_levels() -> None:
    pl = plan(load_topology(ROOT / "topologies" / "deepseek-r1-decode-2x8-h200.yaml"))
    with pytest.raises(UserError, match="--concurrency"):
        predict_plan(pl, Workload(), [0], CAL)
    with pytest.raises(UserError, match="isl"):
        Workload(isl=0)


def test_unknown_backend_has_no_figures() -> None:
    with pytest.raises(UserError, match="no all-to-all figures for 'nixl_ep'"):
        RoleBatch.build(A_R1, [role(backend="nixl_ep")], CAL)


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "gpt-oss-120b", "kimi-k2", "deepseek-v2-lite", "mixtral-8x7b"])
def test_other_architectures_score(model: str) -> None:
    arch = load_preset(model)
    a = ArchConst.of(arch, arch.default_weight_dtype, "bf16")
    rb = RoleBatch.build(
        a,
        [
            role(kind="mixed", nodes=1, experts=arch.routed_experts, backend=b)
            for b in ("deepep_low_latency", "allgather_reducescatter")
        ],
        CAL,
    )
    perf = serve_mixed(rb, CAL, Workload(isl=1000, osl=1000), np.asarray([[1.0, 64.0]]))
    assert np.all(perf.tps_gpu > 0) and np.all(np.isfinite(perf.ttft))
    for d, q, ctx, p, ctxp in LOADS:
        st = step_time(rb, CAL, d, q, ctx, p, ctxp)
        assert np.all(st.total >= st.hbm_roofline)


def test_vectorised_equals_one_by_one() -> None:
    """Scoring N roles at once gives the same numbers as scoring each alone (no cross-talk in the arrays)."""
    variants = [role(**v) for v in ROLE_VARIANTS]
    both = RoleBatch.build(A_R1, variants, CAL)
    C = np.asarray([[1.0, 100.0, 3000.0]])
    together = serve_mixed(both, CAL, Workload(), C)
    for i, r in enumerate(variants):
        alone = serve_mixed(RoleBatch.build(A_R1, [r], CAL), CAL, Workload(), C)
        for f in ("tps_gpu", "tps_user", "ttft", "tpot"):
            np.testing.assert_allclose(getattr(together, f)[i], getattr(alone, f)[0], rtol=1e-12)


def test_wave_mode_ttft_and_littles_law() -> None:
    """Fixed-length closed-loop waves: TTFT at full load is the wave's prefill (seconds, growing with the
    wave), and throughput = concurrency x OSL / (TTFT + OSL x TPOT) holds up to the batch cap."""
    r = role(kind="mixed", mns=256, kv_tokens=10_000_000)
    rb = RoleBatch.build(A_R1, [r], CAL)
    w = Workload(isl=2000, osl=1000)
    C = np.asarray([[16.0, 256.0, 1024.0]]) * r.dp
    perf = serve_mixed(rb, CAL, w, C)
    assert np.all(np.diff(perf.ttft[0]) > 0)
    assert perf.ttft[0, -1] > 1.0
    steady = serve_mixed(rb, CAL, Workload(isl=2000, osl=1000, arrival="steady"), C)
    assert perf.ttft[0, 1] > 3 * steady.ttft[0, 1]
    tps = perf.tps_gpu * rb.gpus[0, 0]
    little = C * w.osl / (perf.ttft + (w.osl - 1.0) * perf.tpot)
    assert tps[0] == pytest.approx(little[0], rel=0.02)


def test_overlap_schedule_hides_at_most_each_phase() -> None:
    """DBO hides each op behind one compute phase of the other micro-batch: never more than the all-to-all,
    never more than the DeepSeek 5-stage packing; no overlap without DBO; normal kernels cost SMs."""
    from dataclasses import replace as dc_replace

    base = role(kind="decode", nodes=4, dbo=True)
    rows = [base, dc_replace(base, engine="deepseek"), dc_replace(base, dbo=False)]
    same = dc_replace(CAL, dbo_vllm_efficiency=CAL.overlap_efficiency)  # the schedules at one efficiency
    rb = RoleBatch.build(A_R1, rows, same)
    st = step_time(rb, same, 128, 1, 2000, 0, 0)
    hid = st.overlap_hidden[:, 0]
    assert np.all(hid <= st.all2all[:, 0] + 1e-12)
    assert hid[0] <= hid[1] + 1e-12 and hid[2] == 0.0
    pf = RoleBatch.build(A_R1, [role(kind="prefill", nodes=4, backend="deepep_high_throughput", dbo=True)], CAL)
    sp = step_time(pf, CAL, 0, 1, 0, 8192, 2000)
    assert sp.contention[0, 0] > 0.0


def test_dp_imbalance_random_spreading_costs_more() -> None:
    """Random request spreading leaves the busiest DP rank fuller than a DP-aware balancer does."""
    from dataclasses import replace as dc_replace

    base = role(kind="decode", nodes=4)
    rb = RoleBatch.build(A_R1, [base, dc_replace(base, balancer="random")], CAL)
    perf = serve_decode_only(rb, CAL, Workload(isl=2000, osl=1000), np.asarray([[32.0 * base.dp]]))
    assert perf.tpot[1, 0] > perf.tpot[0, 0]


def test_router_policy_sets_the_dp_balancer() -> None:
    """A router that spreads requests blindly (random) leaves DP ranks less even than a load-aware one."""
    import yaml

    from widep.perf.model import balancer_of, predict_plan
    from widep.plan.core import plan
    from widep.spec.topology import parse_topology

    doc = yaml.safe_load((ROOT / "topologies" / "deepseek-r1-decode-4x8-h200-eplb.yaml").read_text())
    out = {}
    for policy in ("random", "power_of_two"):
        d = dict(doc) | {"router": {"enabled": True, "policy": policy}}
        p = plan(parse_topology(d, "t"))
        level = predict_plan(p, Workload(isl=1000, osl=1000), [512.0], CAL, saturation=False)[1][0]
        out[policy] = (balancer_of(p), level)
    assert out["random"][0] == "random" and out["power_of_two"][0] == "balanced"
    assert out["random"][1].tpot_ms > out["power_of_two"][1].tpot_ms


def test_lb_mode_orders_dp_imbalance_dp_aware_hybrid_round_robin() -> None:
    """The 16+16 H200 P/D deployment: DP-aware routing over per-rank servers (external) leaves the busiest
    decode rank nearest the mean, vLLM's internal balancer per node (hybrid) further, round robin (Poisson
    counts) furthest; the factor is what predict --json reports and the lockstep step pays for it."""
    import yaml

    from widep.perf.cli import predict_point_dict
    from widep.spec.topology import parse_topology

    doc = yaml.safe_load((ROOT / "topologies" / "deepseek-r1-pd-3x8-h200.yaml").read_text())
    variants = {
        "dp_aware": doc | {"router": {"enabled": True, "policy": "power_of_two"}},
        "hybrid": doc | {"serving": {"dp_mode": "hybrid"}},
        "round_robin": doc | {"router": {"enabled": True, "policy": "round_robin"}},
    }
    out = {}
    for name, d in variants.items():
        p = plan(parse_topology(d, "t"))
        out[name] = predict_point_dict(p, Workload(isl=2000, osl=2000), 512.0, CAL)
    f = {k: v["dp_imbalance"]["factor"] for k, v in out.items()}
    assert 1.0 < f["dp_aware"] < f["hybrid"] < f["round_robin"]
    assert out["hybrid"]["dp_imbalance"]["dp_mode"] == "hybrid"
    assert out["dp_aware"]["step_ms"]["dp_imbalance"] == f["dp_aware"]
    assert out["dp_aware"]["tpot_ms"] < out["hybrid"]["tpot_ms"] < out["round_robin"]["tpot_ms"]
    # 32 requests per rank over 16 ranks: 1 + 0.25 sqrt(2 ln 16 / 32) for DP-aware [derived]
    assert f["dp_aware"] == pytest.approx(1.0 + CAL.dp_imbalance_balanced * np.sqrt(2 * np.log(16) / 32), rel=1e-6)


def test_fabric_and_nics_per_node_feed_all2all_and_kv_transfer() -> None:
    """cluster.network: the same P/D deployment on RoCE (DeepEP's RDMA all-to-all at 0.65 of InfiniBand's,
    KV transfer at 0.9) or with 4 NICs per node (half the per-GPU bandwidth) is slower than on one InfiniBand
    NIC per GPU; an unknown fabric is rejected naming the field."""
    import yaml

    from widep.errors import UserError as _UE
    from widep.perf.cli import predict_point_dict
    from widep.spec.topology import parse_topology

    doc = yaml.safe_load((ROOT / "topologies" / "deepseek-r1-pd-3x8-h200.yaml").read_text())
    out = {}
    for name, net in {"ib": {}, "roce": {"fabric": "roce"}, "4nic": {"nics_per_node": 4}}.items():
        d = dict(doc)
        d["cluster"] = dict(doc["cluster"]) | {"network": dict(doc["cluster"]["network"]) | net}
        out[name] = predict_point_dict(plan(parse_topology(d, "t")), Workload(isl=2000, osl=2000), 2048.0, CAL)
    a2a = {k: v["step_ms"]["all2all_ms"] for k, v in out.items()}
    assert a2a["roce"] == pytest.approx(a2a["ib"] / CAL.roce_a2a_efficiency, rel=0.25)
    assert a2a["ib"] < a2a["roce"] < a2a["4nic"]
    assert out["ib"]["tpot_ms"] < out["roce"]["tpot_ms"] < out["4nic"]["tpot_ms"]
    bad = dict(doc)
    bad["cluster"] = dict(doc["cluster"]) | {"network": {"fabric": "ethernet"}}
    with pytest.raises(_UE, match="fabric"):
        parse_topology(bad, "t")


def test_long_prompts_unbalance_expert_loads_decode_tokens_do_not() -> None:
    """Tokens of one sequence pick correlated experts: at the same tokens per step, a few long prompts leave the
    busiest EP rank fuller than many short ones; decode (one token per sequence) is untouched by the term."""
    rb = RoleBatch.build(A_R1, [role(kind="prefill", nodes=4, backend="deepep_high_throughput")], CAL)
    on = dataclasses.replace(CAL, routing_seq_corr=0.5)
    off = dataclasses.replace(CAL, routing_seq_corr=0.0)
    long_ = step_time(rb, on, 0, 1, 0, 16384, 2000, prompt_len=4096)
    short = step_time(rb, on, 0, 1, 0, 16384, 2000, prompt_len=256)
    indep = step_time(rb, off, 0, 1, 0, 16384, 2000, prompt_len=4096)
    assert long_.imbalance[0, 0] > short.imbalance[0, 0] > indep.imbalance[0, 0]
    assert long_.total[0, 0] > short.total[0, 0] > indep.total[0, 0]
    dec = RoleBatch.build(A_R1, [role(kind="decode", nodes=4)], CAL)
    a, b = step_time(dec, on, 128, 1, 2000, 0, 0), step_time(dec, off, 128, 1, 2000, 0, 0)
    assert a.imbalance[0, 0] == pytest.approx(b.imbalance[0, 0]) and a.total[0, 0] == pytest.approx(b.total[0, 0])


def test_saturated_prefill_runs_full_steps_on_every_rank() -> None:
    """Below capacity the busiest DP rank sets the step and the others run less; with prompts waiting at every
    rank (four times what the ranks hold) every rank runs full steps, so throughput reaches the full-step rate."""
    from widep.perf.model import serve_prefill_only

    rp = RoleBatch.build(A_R1, [role(kind="prefill", nodes=4, backend="deepep_high_throughput", mnbt=16384)], CAL)
    w = Workload(isl=2000, osl=1)
    full = step_time(rp, CAL, 0, 1, 0, 16384, w.ctx_prefill, prompt_len=2000).total[0, 0]
    per_rank = 8.0  # 16000 tokens of 2000-token prompts: chunked prefill fills the 16,384-token budget
    ranks = float(rp.ranks[0, 0])
    perf = serve_prefill_only(rp, CAL, w, np.asarray([[per_rank * ranks, 4 * per_rank * ranks]]))
    at_cap, backlog = perf.tps_gpu[0]
    assert backlog == pytest.approx(16384 / full, rel=1e-6)
    assert at_cap < backlog


def test_h800_nvlink_prices_internode_prefill_and_h200_streams_experts_like_h100() -> None:
    """Per-GPU-variant interconnect: DeepEP's normal kernels across nodes forward every copy over the destination
    node's NVLink, so on an H800 (200 GB/s per direction) the NVLink leg, not RDMA, bounds a 2-node EP16 prefill's
    all-to-all and the prefill step is slower than the same step on an H100 (450 GB/s, RDMA-bound); inside one node
    both scale by NVLink. Kernel-true experts: DeepGEMM's masked decode GEMMs are capped per SM, so an H200 (4.8 TB/s)
    runs them barely faster than an H100 (3.35 TB/s) and the capped part shows as its own term."""
    out = {}
    for gpu in ("H100", "H800"):
        rb = RoleBatch.build(A_R1, [role(gpu=gpu, kind="prefill", nodes=2, backend="deepep_high_throughput")], CAL)
        out[gpu] = step_time(rb, CAL, 0, 1, 0, 16384, 2000)
    assert out["H800"].all2all[0, 0] > 1.2 * out["H100"].all2all[0, 0]
    assert out["H800"].total[0, 0] > out["H100"].total[0, 0]
    assert out["H800"].experts[0, 0] == pytest.approx(out["H100"].experts[0, 0])
    dec = {}
    for gpu in ("H100", "H200"):
        rb = RoleBatch.build(A_R1, [role(gpu=gpu, nodes=2)], CAL)
        dec[gpu] = step_time(rb, CAL, 64, 1, 2000, 0, 0)
    ratio = dec["H100"].experts[0, 0] / dec["H200"].experts[0, 0]
    assert 0.99 < ratio < 1.15 < get_gpu("H200").hbm_tbps / get_gpu("H100").hbm_tbps
    assert dec["H200"].expert_stream_cap[0, 0] > 0.0
    assert dec["H200"].row(0)["expert_stream_cap_ms"] > 0.0
