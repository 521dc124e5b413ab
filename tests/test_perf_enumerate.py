"""Enumeration of candidate topologies: completeness (counted by hand) and agreement with the planner."""

from __future__ import annotations

from collections import Counter

import pytest

from widep.perf.enumerate import Budget, Grid, check, enumerate_candidates, planner_reason
from widep.perf.model import role_input_from_plan
from widep.plan.core import plan

SMALL = Grid(
    modes=("mixed",),
    tp=(1, 2),
    backends=("deepep_low_latency", "allgather_reducescatter"),
    dbo=(False, True),
    eplb=("off", "redundant"),
    max_num_seqs=(128,),
)


def test_mixed_count_by_hand() -> None:
    """qwen3-30b-a3b (128 experts) on 8 or 16 H100s, 8 per node.

    Group shapes: 8 GPUs -> one 1-node group; 16 GPUs -> two 1-node replicas, or one 2-node group: 3.
    Per shape: TP 1 or 2 (2) x {LL, LL+DBO, allgather (no DBO)} (3) x {EPLB off, EPLB + the fewest
    redundant experts that divide by EP: 8 for EP8, 16 for EP16} (2) x one max_num_seqs = 12. Total 36.
    """
    cands = enumerate_candidates(Budget(model="qwen3-30b-a3b", gpu="H100", gpus=(8, 16), grid=SMALL))
    assert len(cands) == 36
    assert len({c.id for c in cands}) == 36
    assert Counter(c.gpus for c in cands) == {8: 12, 16: 24}
    assert Counter((c.roles[0].nodes, c.roles[0].replicas) for c in cands) == {(1, 1): 12, (1, 2): 12, (2, 1): 12}
    assert Counter(c.roles[0].redundant for c in cands) == {0: 18, 8: 12, 16: 6}
    assert not any(c.roles[0].dbo and c.roles[0].backend == "allgather_reducescatter" for c in cands)
    assert all(check(c).ok for c in cands)  # 128 divides by 8 and 16; a 30B model fits


def test_pd_count_by_hand() -> None:
    """P/D on 16 GPUs: 1 prefill node + 1 decode node. Prefill grid: TP1 x HT x DBO(2) x EPLB(off, +8) = 4;
    decode grid: TP 1,2 x LL x DBO(2) x EPLB(off, +8) x max_num_seqs 128,256 = 16. 4 x 16 = 64.
    On 24 GPUs: (1 prefill, 2 decode nodes) with a 1- or 2-node decode group, (2, 1) with a 1- or 2-node
    prefill group: 4 splits x 64 = 256."""
    b = Budget(model="qwen3-30b-a3b", gpu="H100", gpus=(16,), grid=Grid(modes=("pd",)))
    cands = enumerate_candidates(b)
    assert len(cands) == 64
    assert all(c.mode == "pd" and [r.kind for r in c.roles] == ["prefill", "decode"] for c in cands)
    cands24 = enumerate_candidates(Budget(model="qwen3-30b-a3b", gpu="H100", gpus=(24,), grid=Grid(modes=("pd",))))
    assert len(cands24) == 256
    shapes = Counter((c.roles[0].nodes, c.roles[0].replicas, c.roles[1].nodes, c.roles[1].replicas) for c in cands24)
    assert shapes == {(1, 1, 1, 2): 64, (1, 1, 2, 1): 64, (1, 2, 1, 1): 64, (2, 1, 1, 1): 64}
    assert len({c.id for c in cands24}) == 256


def test_partial_nodes_and_the_cpu() -> None:
    """Below one node a role uses part of it; counts that are not whole nodes above one are skipped. The CPU
    backend gets allgather only, no DBO, no EPLB: tiny-moe on 1, 2, 4 slots -> TP choices 1 / 1,2 / 1,2,4
    (6) x max_num_seqs 64,128 (2) = 12; 12 slots on 8-slot nodes is skipped."""
    b = Budget(
        model="tiny-moe",
        gpu="CPU",
        gpus=(1, 2, 4, 12),
        gpus_per_node=8,
        isl=64,
        osl=64,
        grid=Grid(modes=("mixed", "pd"), max_num_seqs=(64, 128)),
    )
    cands = enumerate_candidates(b)
    assert len(cands) == 12
    assert {c.roles[0].backend for c in cands} == {"allgather_reducescatter"}
    assert not any(c.roles[0].dbo or c.roles[0].eplb for c in cands)
    assert sorted({(c.gpus, c.roles[0].gpus_per_node) for c in cands}) == [(1, 1), (2, 2), (4, 4)]


def _agree(budget: Budget) -> Counter:
    """Every candidate: the fast verdict equals the planner's (ok / the field it names / the role inputs)."""
    cats: Counter = Counter()
    for c in enumerate_candidates(budget):
        v = check(c)
        try:
            p = plan(c.topology())
        except Exception as err:  # any planner error must be predicted
            assert not v.ok, f"{c.id}: fast path says feasible, planner says {err}"
            assert str(err).startswith(v.field + ":"), f"{c.id}: fast {v.field}, planner {err}"
            cats[v.category] += 1
            continue
        assert v.ok, f"{c.id}: fast path says {v.reason}, planner plans it"
        assert tuple(role_input_from_plan(rp, p.gpu) for rp in p.roles) == v.roles, c.id
        assert p.total_gpus == c.gpus
        cats["ok"] += 1
    return cats


def test_fast_feasibility_agrees_with_the_planner_r1_h100() -> None:
    """DeepSeek-R1 on 8..24 H100s: memory failures (one node cannot hold 671B) and divisibility (EP24)."""
    grid = Grid(tp=(1, 2), max_num_seqs=(64, 512), pd_decode_max_num_seqs=(256,))
    cats = _agree(Budget(model="deepseek-r1", gpu="H100", gpus=(8, 16, 24), isl=1000, osl=1000, grid=grid))
    assert cats["ok"] > 0 and cats["memory"] > 0 and cats["divisibility"] > 0, cats


def test_fast_feasibility_agrees_with_the_planner_long_context() -> None:
    """A max_model_len the KV cache cannot hold is flagged (kv_cache), as the planner does."""
    grid = Grid(modes=("mixed",), tp=(1, 8), max_num_seqs=(256,))
    cats = _agree(Budget(model="deepseek-r1", gpu="H100", gpus=(16, 24), isl=100_000, osl=20_000, grid=grid))
    assert cats["kv_cache"] > 0, cats


@pytest.mark.parametrize(
    ("model", "gpu", "gpus"),
    [
        ("qwen3-30b-a3b", "H200", (1, 2, 4, 8, 16)),
        ("deepseek-v2-lite", "H100", (2, 8, 24)),
        ("gpt-oss-120b", "H100", (1, 4, 8)),
        ("tiny-moe", "CPU", (1, 2)),
    ],
)
def test_fast_feasibility_agrees_with_the_planner_other_models(model: str, gpu: str, gpus: tuple[int, ...]) -> None:
    cats = _agree(
        Budget(
            model=model,
            gpu=gpu,
            gpus=gpus,
            isl=512,
            osl=512,
            spec_tokens=1 if gpu != "CPU" else 0,
            grid=Grid(tp=(1, 2), max_num_seqs=(64, 256), pd_decode_max_num_seqs=(128,)),
        )
    )
    assert cats["ok"] > 0, cats


def test_planner_reason_is_the_planners_message() -> None:
    cands = enumerate_candidates(
        Budget(model="deepseek-r1", gpu="H100", gpus=(8,), grid=Grid(modes=("mixed",), tp=(1,), max_num_seqs=(64,)))
    )
    bad = [c for c in cands if not check(c).ok]
    assert bad
    msg = planner_reason(bad[0])
    assert msg is not None and "does not fit in H100 memory" in msg and "Valid:" in msg
    good = enumerate_candidates(Budget(model="qwen3-30b-a3b", gpu="H100", gpus=(8,), grid=SMALL))[0]
    assert planner_reason(good) is None


def test_default_grid_is_thousands_for_r1_16_to_64() -> None:
    cands = enumerate_candidates(Budget(model="deepseek-r1", gpu="H200", gpus=tuple(range(16, 65))))
    assert 5_000 <= len(cands) <= 20_000
    assert {c.gpus for c in cands} == {16, 24, 32, 40, 48, 56, 64}
    assert len({c.id for c in cands}) == len(cands)
