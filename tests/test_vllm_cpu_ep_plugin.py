"""The vLLM CPU EP plugin (widep/vllm_cpu_ep.py) on its own, with the installed vLLM and real torch.distributed.

* collectives: two real processes in a gloo group; the filled ``all_gatherv``/``reduce_scatterv`` of vLLM's own
  ``CpuCommunicator`` (a bare instance over the real group) against torch.distributed references, uneven sizes.
* experts: vLLM's own ``CPUUnquantizedExperts.apply`` (the real ``cpu_fused_moe`` kernel) with the expert map of
  each EP rank, summed over ranks as the EP combine does, against a MoE computed in plain torch, including tokens
  whose experts are all on the other rank.
* detection: the installed vLLM 0.32 lacks both behaviours (the plugin fills them); a vLLM that has them is left
  alone; the switch and VLLM_PLUGINS turn the plugin off; nothing is patched off the CPU platform.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from launch_helpers import ROOT, free_ports

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

# one script, run in two processes: ranks exchange uneven row counts through the patched CpuCommunicator
_COLLECTIVES = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from widep import vllm_cpu_ep
    from vllm.distributed.device_communicators import cpu_communicator as cc
    rank, port = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    missing = {n: vllm_cpu_ep._collective_missing(cc.CpuCommunicator, n) for n in ("all_gatherv", "reduce_scatterv")}
    vllm_cpu_ep._patch_comm(cc)
    comm = object.__new__(cc.CpuCommunicator)  # vLLM's class; only its group, rank and size are set
    comm.cpu_group, comm.world_size, comm.rank_in_group = dist.group.WORLD, 2, rank
    res = {"missing": missing, "filled": vllm_cpu_ep._done.get("collectives"), "cases": []}
    for sizes in ([3, 5], [0, 4], [2, 2], None, [7, 1]):
        n = sizes[rank] if sizes else 3
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(n, 4, generator=g).to(torch.bfloat16)
        ids = torch.randint(0, 8, (n, 2), generator=g, dtype=torch.int32)
        hs, i2 = comm.all_gatherv([x, ids], dim=0, sizes=sizes)
        one = comm.all_gatherv(x, dim=0, sizes=sizes)
        # reference: torch.distributed.all_gather_object of the exact tensors, concatenated in rank order
        parts = [None, None]
        dist.all_gather_object(parts, (x, ids))
        ok_gather = torch.equal(hs, torch.cat([p[0] for p in parts]))
        ok_gather = ok_gather and torch.equal(i2, torch.cat([p[1] for p in parts]))
        # reduce-scatter: every rank holds the full (sum(sizes), 4) rows; rank r gets its slice of the sum
        total = sum(sizes) if sizes else 6
        full = torch.randn(total, 4, generator=g).to(torch.float32)
        ref = full.clone()
        dist.all_reduce(ref)  # reference: the all-reduced whole, sliced
        start = sum(sizes[:rank]) if sizes else 3 * rank
        mine = comm.reduce_scatterv(full, dim=0, sizes=sizes)
        into = torch.empty_like(mine)
        comm.reduce_scatterv_into_output(full, into, dim=0, sizes=sizes)
        want = ref[start : start + n]
        res["cases"].append({"sizes": sizes, "gather": ok_gather and torch.equal(one, hs),
                             "gather_rows": hs.shape[0], "scatter": torch.equal(mine, want) and torch.equal(into, want),
                             "scatter_rows": mine.shape[0]})
    # dim != 0 reduce-scatter (vLLM's base signature defaults to dim=-1): columns split 3 + 1
    cols = torch.arange(8.0).reshape(2, 4) * (rank + 1)
    got = comm.reduce_scatterv(cols, dim=-1, sizes=[3, 1])
    want = (torch.arange(8.0).reshape(2, 4) * 3)[:, :3] if rank == 0 else (torch.arange(8.0).reshape(2, 4) * 3)[:, 3:]
    res["dim_last"] = torch.equal(got, want)
    print("RESULT" + json.dumps(res), flush=True)
    dist.destroy_process_group()
""")


def test_collectives_with_uneven_sizes_match_torch_distributed(tmp_path):
    script = tmp_path / "coll.py"
    script.write_text(_COLLECTIVES)
    (port,) = free_ports(1)
    env = dict(os.environ, WIDEP_CPU_EP_PLUGIN="1", PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    results = []
    for p, out in zip(procs, outs, strict=False):
        assert p.returncode == 0, out[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[6:]))
    for rank, res in enumerate(results):
        assert res["missing"] == {"all_gatherv": True, "reduce_scatterv": True}, "vLLM 0.32 lacks both (the gap)"
        assert res["filled"] == "filled"
        for case in res["cases"]:
            sizes = case["sizes"]
            assert case["gather"], f"rank {rank} all_gatherv sizes={sizes}"
            assert case["scatter"], f"rank {rank} reduce_scatterv sizes={sizes}"
            assert case["gather_rows"] == (sum(sizes) if sizes else 6)
            assert case["scatter_rows"] == (sizes[rank] if sizes else 3)
        assert res["dim_last"]


# ----------------------------------------------------------------------------------------------- experts


def _reference_moe(x, w13, w2, ids, weights):
    """Plain-torch MoE: for every token, sum_k weight_k * W2_e(silu(gate_e(x)) * up_e(x)) over global experts."""
    n = w2.shape[2]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = w13[e].float() @ x[t].float()
            out[t] += float(weights[t, k]) * (w2[e].float() @ (torch.nn.functional.silu(h[:n]) * h[n:]))
    return out


def _experts():
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
        CPUUnquantizedExperts,
    )

    e = object.__new__(CPUUnquantizedExperts)  # vLLM's class; the kernel inputs are what its layer would pass
    e.quant_config, e._use_zentorch, e.isa = FUSED_MOE_UNQUANTIZED_CONFIG, False, "vec"
    return e


def _run_rank(apply, x, w13, w2, ids, weights, local_experts, n_global):
    """One EP rank: its local weights (in slot order) and its expert_map (global -> slot, -1 elsewhere)."""
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    emap = torch.full((n_global,), -1, dtype=torch.int32)
    for slot, g in enumerate(local_experts):
        emap[g] = slot
    lw13 = cpu_prepack_moe_weight(w13[list(local_experts)].contiguous(), "vec")
    lw2 = cpu_prepack_moe_weight(w2[list(local_experts)].contiguous(), "vec")
    out = torch.zeros(x.shape, dtype=x.dtype)
    apply(
        _experts(),
        output=out,
        hidden_states=x,
        w1=lw13,
        w2=lw2,
        topk_weights=weights,
        topk_ids=ids,
        activation=MoEActivation.SILU,
        global_num_experts=n_global,
        expert_map=emap,
        a1q_scale=None,
        a2_scale=None,
        workspace13=torch.empty(0),
        workspace2=torch.empty(0),
        expert_tokens_meta=None,
        apply_router_weight_on_input=False,
    )
    return out


@pytest.mark.parametrize("placement", ["linear", "round-robin", "uneven"])
def test_expert_map_ep2_sums_to_the_reference_moe(placement):
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
        CPUUnquantizedExperts,
    )

    from widep import vllm_cpu_ep

    apply = vllm_cpu_ep._wrap_apply(getattr(CPUUnquantizedExperts.apply, "widep_original", CPUUnquantizedExperts.apply))
    n_global, n, k = 8, 32, 64
    g = torch.Generator().manual_seed(7)
    w13 = torch.randn(n_global, 2 * n, k, generator=g) / 8
    w2 = torch.randn(n_global, k, n, generator=g) / 8
    x = torch.randn(6, k, generator=g)
    # tokens 0-1 only on rank 0's experts, 2-3 only on rank 1's (all remote for the other rank), 4-5 mixed
    ranks = {
        "linear": ([0, 1, 2, 3], [4, 5, 6, 7]),
        "round-robin": ([0, 2, 4, 6], [1, 3, 5, 7]),
        "uneven": ([0, 1, 2, 3, 4, 5], [6, 7]),
    }[placement]
    r0, r1 = ranks
    ids = torch.tensor(
        [
            [r0[0], r0[1]],
            [r0[-1], r0[0]],
            [r1[0], r1[1]],
            [r1[1], r1[0]],
            [r0[1], r1[0]],
            [r1[-1], r0[2]],
        ],
        dtype=torch.int32,
    )
    weights = torch.rand(6, 2, generator=g)
    ref = _reference_moe(x, w13, w2, ids, weights)
    parts = [_run_rank(apply, x, w13, w2, ids, weights, r, n_global) for r in ranks]
    assert torch.allclose(parts[0] + parts[1], ref, atol=1e-4, rtol=1e-4)
    # a token whose experts are all remote contributes exactly zero on that rank
    assert torch.count_nonzero(parts[1][:2]) == 0 and torch.count_nonzero(parts[0][2:4]) == 0
    assert torch.count_nonzero(parts[0][:2]) > 0 and torch.count_nonzero(parts[1][2:4]) > 0
    # without expert_map the wrapped method is the original kernel call (one rank holding every expert)
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    out = torch.zeros(x.shape)
    apply(
        _experts(),
        out,
        x,
        cpu_prepack_moe_weight(w13, "vec"),
        cpu_prepack_moe_weight(w2, "vec"),
        weights,
        ids,
        MoEActivation.SILU,
        n_global,
        None,
        None,
        None,
        torch.empty(0),
        torch.empty(0),
        None,
        False,
    )
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_localize_maps_ids_and_zeroes_remote_weights():
    from widep.vllm_cpu_ep import localize

    emap = torch.tensor([-1, 0, -1, 1], dtype=torch.int32)
    ids = torch.tensor([[0, 1], [3, 2], [2, 0]], dtype=torch.int64)
    w = torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.6, 0.4]])
    local, weights, remote = localize(ids, w, emap)
    assert local.tolist() == [[0, 0], [1, 0], [0, 0]] and local.dtype == ids.dtype
    assert weights.tolist() == [[0.0, 0.75], [0.5, 0.0], [0.0, 0.0]]
    assert remote.tolist() == [[True, False], [False, True], [True, True]]


# ----------------------------------------------------------------------------------------------- detection


def _python(code: str, **env: str) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "WIDEP_CPU_EP_PLUGIN")} | env
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        env=e,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


_STATE = """
    import json
    from vllm.plugins import load_general_plugins
    load_general_plugins()  # what every vLLM process does: entry points, filtered by VLLM_PLUGINS
    from widep import vllm_cpu_ep
    before = dict(vllm_cpu_ep._done)
    import torch
    torch.set_default_dtype(torch.bfloat16)  # as while vLLM loads a model, when it imports the kernels
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe  # the model process imports this later
    from vllm.distributed.device_communicators import cpu_communicator as cc
    from vllm.distributed.device_communicators.base_device_communicator import DeviceCommunicatorBase as B
    from vllm.v1.worker import cpu_model_runner as cmr  # imported by the engine's worker, later
    from vllm.config.vllm import VllmConfig
    print(json.dumps({"before": before, "after": vllm_cpu_ep._done, "registered": vllm_cpu_ep._registered,
                      "apply_wrapped": hasattr(cpu_moe.CPUUnquantizedExperts.apply, "widep_original"),
                      "runner_wrapped": hasattr(cmr.CPUModelRunner.execute_model, "widep_original"),
                      "check_wrapped": hasattr(VllmConfig._verify_aux_output_compatibility, "widep_original"),
                      "gatherv_filled": cc.CpuCommunicator.all_gatherv is not B.all_gatherv}))
"""


def test_entry_point_fills_the_gaps_and_experts_only_when_imported():
    s = _python(_STATE)
    assert s["registered"], s
    # the kernels and the model runner are not imported eagerly (the config check is filled when vLLM's config
    # module is imported, which may be before or after the plugins load)
    assert s["before"]["collectives"] == "filled" and not {"experts", "routed_experts_runner"} & set(s["before"])
    assert s["after"] == {
        "collectives": "filled",
        "routed_experts_config": "filled",
        "experts": "filled",
        "routed_experts_runner": "filled",
    }
    assert s["apply_wrapped"] and s["gatherv_filled"] and s["runner_wrapped"] and s["check_wrapped"]


@pytest.mark.parametrize("env", [{"WIDEP_CPU_EP_PLUGIN": "0"}, {"VLLM_PLUGINS": "lora_filesystem_resolver"}])
def test_switched_off(env):
    s = _python(_STATE, **env)
    assert s["after"] == {} and not s["apply_wrapped"] and not s["gatherv_filled"]
    assert not s["runner_wrapped"] and not s["check_wrapped"]


def test_a_vllm_that_already_behaves_is_left_alone():
    """The gaps are filled in-process first (as a later vLLM would ship them); a second pass must then see them
    as implemented and change nothing, logging 'left alone'."""
    s = _python("""
        import json, logging
        logging.basicConfig(level=logging.INFO)
        from widep import vllm_cpu_ep
        from vllm.distributed.device_communicators import cpu_communicator as cc
        from vllm.model_executor.layers.fused_moe.experts import cpu_moe
        vllm_cpu_ep._patch_comm(cc); vllm_cpu_ep._patch_experts(cpu_moe)
        fixed_apply, fixed_gather = cpu_moe.CPUUnquantizedExperts.apply, cc.CpuCommunicator.all_gatherv
        # a vLLM with its own implementations: the methods behave, but are not widep's wrapper
        cpu_moe.CPUUnquantizedExperts.apply = lambda *a, **k: fixed_apply(*a, **k)
        vllm_cpu_ep._done.clear()
        vllm_cpu_ep._patch_comm(cc); vllm_cpu_ep._patch_experts(cpu_moe)
        print(json.dumps({"done": vllm_cpu_ep._done,
                          "same": cc.CpuCommunicator.all_gatherv is fixed_gather,
                          "wrapped": hasattr(cpu_moe.CPUUnquantizedExperts.apply, "widep_original")}))
    """)
    assert s["done"] == {"collectives": "left alone", "experts": "left alone"}
    assert s["same"] and not s["wrapped"]


def test_routed_expert_return_gap_is_detected_by_behaviour():
    """vLLM 0.32's AuxOutput check refuses the V1 runner (probed with the least config it reads); the filled check
    still runs vLLM's other checks; a check or a runner that already allows it is left alone."""
    s = _python("""
        import json
        from widep import vllm_cpu_ep as p
        import vllm.config.vllm as m
        from vllm.v1.worker import cpu_model_runner as cmr
        orig = m.VllmConfig._verify_aux_output_compatibility
        out = {"refused": p.aux_output_refused(orig), "lacks": p.runner_lacks_aux_output(cmr.CPUModelRunner)}
        p._patch_aux_config(m)
        filled = m.VllmConfig._verify_aux_output_compatibility
        out["filled_ok"] = not p.aux_output_refused(filled)  # the V1 runner passes on CPU
        probe = p._aux_probe(use_v2=False)
        probe.cache_config.enable_prefix_caching = False
        try:
            filled(probe)
            out["other_checks"] = None
        except ValueError as err:
            out["other_checks"] = str(err)
        from vllm.platforms import current_platform
        out["platform_restored"] = current_platform.is_out_of_tree() is False
        # a vLLM whose check accepts the V1 runner, and a runner that wires the connector itself: left alone
        p._done.clear()
        m.VllmConfig._verify_aux_output_compatibility = lambda self: None
        p._patch_aux_config(m)
        class Runner(cmr.CPUModelRunner):
            def execute_model(self, scheduler_output, *a):
                return self.aux_output_connector
        class Mod:
            CPUModelRunner = Runner
        p._patch_runner(Mod)
        out["done"] = p._done
        print(json.dumps(out))
    """)
    assert s["refused"] and s["lacks"] and s["filled_ok"] and s["platform_restored"]
    assert s["other_checks"] == "AuxOutput Connector requires prefix caching."
    assert s["done"] == {"routed_experts_config": "left alone", "routed_experts_runner": "left alone"}


def test_step_batch_and_attach_follow_model_runner_v2():
    """The V1 step as model runner V2's input batch: batch order, row offsets, tokens computed before the step; the
    sampled counts handed to vLLM's connector come from the ModelRunnerOutput (0 for a prompt chunk)."""
    from types import SimpleNamespace as NS

    from widep.vllm_cpu_ep import StepBatch, attach_aux_output

    so = NS(
        scheduled_new_reqs=[NS(req_id="a", num_computed_tokens=0)],
        scheduled_cached_reqs=NS(req_ids=["b", "c"], num_computed_tokens=[17, 40]),
        num_scheduled_tokens={"a": 5, "b": 1, "c": 1},
    )
    b = StepBatch(["c", "a", "b"], so)
    assert b.req_ids == ["c", "a", "b"]
    assert b.query_start_loc_np.tolist() == [0, 1, 6, 7] and b.num_computed_tokens_np.tolist() == [40, 0, 17]
    with pytest.raises(RuntimeError, match="3 scheduled requests but 2 in the batch"):
        StepBatch(["a", "b"], so)

    class Pending:
        request_ids = ["c", "a", "b"]

        def enqueue_cpu_copy(self, num_sampled, num_rejected):
            self.sampled, self.rejected = num_sampled.tolist(), num_rejected.tolist()

        def process_output(self):
            return {"c": "rows"}

    out = NS(
        req_id_to_index={"c": 0, "a": 1, "b": 2}, sampled_token_ids=[[7], [], [9]], aux_output_connector_output=None
    )
    pend = Pending()
    attach_aux_output(pend, out)
    assert pend.sampled == [1, 0, 1] and pend.rejected == [0, 0, 0]
    assert out.aux_output_connector_output == {"c": "rows"}


def test_nothing_happens_off_the_cpu_platform():
    """A GPU cannot be had here: vLLM's UnspecifiedPlatform (what it picks with no usable device) stands in for
    one; the plugin must import neither module nor change anything."""
    s = _python("""
        import json, sys
        import vllm.platforms as P
        from vllm.platforms.interface import UnspecifiedPlatform
        P._current_platform = UnspecifiedPlatform()
        from widep import vllm_cpu_ep
        vllm_cpu_ep.register()
        print(json.dumps({"done": vllm_cpu_ep._done,
                          "comm": "vllm.distributed.device_communicators.cpu_communicator" in sys.modules,
                          "hooks": [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "_AfterImport"]}))
    """)
    assert s == {"done": {}, "comm": False, "hooks": []}


_NIXL = """
    import importlib, json, time, uuid
    from widep import vllm_cpu_ep
    vllm_cpu_ep.register()  # on the CPU platform: hooks on NIXL's _api modules, none imported yet
    mod = None
    for name in vllm_cpu_ep.NIXL_MODULES:
        try:
            mod = importlib.import_module(name)
            break
        except ImportError:
            continue
    bind = mod.nixlBind
    agent = mod.nixl_agent(str(uuid.uuid4()), mod.nixl_agent_config(num_threads=4))
    t0 = time.process_time()
    time.sleep(1.5)
    idle = time.process_time() - t0
    print(json.dumps({"module": mod.__name__, "done": vllm_cpu_ep._done, "idle_cpu_s": idle,
                      "wrapped": type(bind).__name__, "metadata": len(agent.get_agent_metadata())}))
"""


def test_nixl_agents_do_not_busy_poll(tmp_path):
    """NIXL's Python API hard-codes a progress-thread delay of 0: an idle agent's UCX progress thread takes a whole
    core (2.9 CPU-s in 3 s measured here), which on a CPU host starves the model. The plugin hooks whichever NIXL
    build gets imported and gives new agents a delay; the real binding still makes working agents."""
    pytest.importorskip("nixl")
    s = _python(_NIXL)
    assert s["done"].get("nixl_progress_delay") == "filled" and s["wrapped"] == "_DelayedAgents", s
    assert s["metadata"] > 0
    assert s["idle_cpu_s"] < 0.5, s  # busy polling would be about 1.5
    off = _python(_NIXL, WIDEP_NIXL_PROGRESS_DELAY_US="0")
    assert off["done"].get("nixl_progress_delay") == "left alone" and off["wrapped"] != "_DelayedAgents", off


def test_nixl_delay_setting() -> None:
    from widep.vllm_cpu_ep import nixl_delay_us

    assert nixl_delay_us({}) == 100
    assert nixl_delay_us({"WIDEP_NIXL_PROGRESS_DELAY_US": "250"}) == 250
    assert nixl_delay_us({"WIDEP_NIXL_PROGRESS_DELAY_US": "0"}) == 0
    assert nixl_delay_us({"WIDEP_NIXL_PROGRESS_DELAY_US": "-3"}) == 100
    assert nixl_delay_us({"WIDEP_NIXL_PROGRESS_DELAY_US": "soon"}) == 100
