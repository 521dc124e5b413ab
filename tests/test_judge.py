"""vLLM's own parser as judge: the installed CPU vLLM parses and checks real argvs.

All argvs go through ONE judge run (one subprocess, one vLLM import) to keep this fast.
"""

from __future__ import annotations

import pytest

from widep.errors import UserError
from widep.render.judge import Judgement, judge, parallel_mismatches

pytestmark = pytest.mark.vllm

R1 = "deepseek-ai/DeepSeek-R1"
EP = ["--enable-expert-parallel", "--data-parallel-size", "2"]

CASES: dict[str, tuple[list[str], dict[str, str] | None]] = {
    "rank0": (
        ["--model", R1, *EP, "--data-parallel-rank", "0", "--all2all-backend", "deepep_low_latency", "--enforce-eager"],
        None,
    ),
    "rank1": (
        ["--model", R1, *EP, "--data-parallel-rank", "1", "--all2all-backend", "deepep_low_latency", "--enforce-eager"],
        None,
    ),
    "rank1_other_backend": (
        [
            "--model",
            R1,
            *EP,
            "--data-parallel-rank",
            "1",
            "--all2all-backend",
            "deepep_high_throughput",
            "--enforce-eager",
        ],
        None,
    ),
    "bad_backend": (["--model", R1, "--all2all-backend", "deepep_ll"], None),
    "unknown_flag": (["--model", R1, "--expert-parallel"], None),
    "eplb": (
        [
            "--model",
            R1,
            *EP,
            "--data-parallel-rank",
            "0",
            "--enable-eplb",
            "--eplb-config",
            '{"num_redundant_experts": 8}',
            "--max-model-len",
            "16384",
        ],
        None,
    ),
    "dbo": (["--model", R1, *EP, "--enable-dbo"], None),
    "rank_out_of_range": (["--model", R1, *EP, "--data-parallel-rank", "5"], None),
    "serve_positional": ([R1, "--enforce-eager"], None),
    "bad_env": (["--model", R1], {"VLLM_CPU_KVCACHE_SPACE": "lots"}),
    "kv_fail_policy": (
        [
            "--model",
            R1,
            "--kv-transfer-config",
            '{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_load_failure_policy":"fail"}',
        ],
        None,
    ),
    "kv_bad_policy": (
        [
            "--model",
            R1,
            "--kv-transfer-config",
            '{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_load_failure_policy":"retry"}',
        ],
        None,
    ),
    "after_bad_env": (["--model", R1], None),
}


@pytest.fixture(scope="module")
def judged(vllm_python: str, tiny_moe_dir) -> tuple[Judgement, dict]:
    names = list(CASES)
    j = judge([CASES[n][0] for n in names], vllm_python, envs=[CASES[n][1] for n in names], model_override=tiny_moe_dir)
    return j, dict(zip(names, j.verdicts, strict=False))


def test_reports_the_vllm_it_used(judged) -> None:
    j, _ = judged
    assert j.vllm_version and j.platform == "cpu"
    assert j.modules["make_arg_parser"].startswith("vllm.entrypoints")
    assert j.modules["AsyncEngineArgs"].startswith("vllm")


def test_valid_argv_passes_every_check(judged) -> None:
    _, v = judged
    r0 = v["rank0"]
    assert r0.ok and r0.error is None and r0.refused_on_platform is None
    assert r0.checks_ran == ["parse", "serve_args", "engine_args", "engine_config"]
    assert r0.parallel["enable_expert_parallel"] is True
    assert r0.parallel["all2all_backend"] == "deepep_low_latency"
    assert r0.parallel["data_parallel_size"] == 2
    assert "data_parallel_rank" not in r0.parallel  # per-rank: vLLM does not compare it
    assert r0.parallel_hash
    assert v["serve_positional"].ok  # `vllm serve MODEL …` form


def test_bad_all2all_backend_is_rejected_with_vllms_message(judged) -> None:
    _, v = judged
    bad = v["bad_backend"]
    assert not bad.ok and bad.checks_ran == []
    assert "argument --all2all-backend: invalid choice: 'deepep_ll'" in bad.error
    assert "deepep_low_latency" in bad.error  # vLLM lists the valid choices


def test_unknown_flag_is_rejected(judged) -> None:
    _, v = judged
    assert not v["unknown_flag"].ok
    assert "unrecognized arguments: --expert-parallel" in v["unknown_flag"].error


def test_ranks_of_one_group_compare_equal_and_a_mismatch_is_found(judged) -> None:
    _, v = judged
    r0, r1, other = v["rank0"], v["rank1"], v["rank1_other_backend"]
    assert parallel_mismatches([r0, r1]) == {}
    assert r0.parallel_hash == r1.parallel_hash  # vLLM's own DP handshake value agrees
    assert parallel_mismatches([r0, other]) == {"all2all_backend": ["deepep_low_latency", "deepep_high_throughput"]}
    assert r0.parallel_hash != other.parallel_hash


def test_cross_field_error_of_create_engine_config(judged) -> None:
    _, v = judged
    bad = v["rank_out_of_range"]
    assert not bad.ok and "data_parallel_rank (5)" in bad.error
    assert bad.checks_ran == ["parse", "serve_args", "engine_args"]


def test_gpu_only_feature_is_a_platform_refusal_not_an_error(judged) -> None:
    _, v = judged
    eplb = v["eplb"]
    assert eplb.ok and eplb.error is None
    assert "only supported on CUDA" in eplb.refused_on_platform
    assert eplb.checks_ran[-1] == "engine_config:without enable_eplb"
    assert eplb.parallel["enable_eplb"] is True  # what the argv asked for
    assert eplb.parallel["eplb_config"]["num_redundant_experts"] == 8
    assert eplb.rewritten == {}  # what the judge switched off is not reported as vLLM's doing
    # the CPU platform silently turns DBO off: reported, not hidden
    assert v["dbo"].ok and v["dbo"].rewritten == {"enable_dbo": [True, False]}


def test_rank_environment_is_applied_and_then_restored(judged) -> None:
    _, v = judged
    assert not v["bad_env"].ok and "lots" in v["bad_env"].error
    assert v["after_bad_env"].ok


def test_bad_inputs_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="one environment per argv"):
        judge([["--model", "x"]], "python3", envs=[{}, {}])
    with pytest.raises(UserError, match="does not exist"):
        judge([["--model", "x"]], str(tmp_path / "no-python"))


def test_kv_load_failure_policy_is_checked_by_vllm(judged) -> None:
    """widep renders ``"kv_load_failure_policy":"fail"`` for vLLM lines whose table says the field exists:
    vLLM 0.32 accepts it and refuses a value it does not know."""
    from widep.spec.vllm_versions import table_for

    _, v = judged
    assert table_for("0.32.0").has_kv_load_failure_policy
    assert v["kv_fail_policy"].ok, v["kv_fail_policy"].error
    bad = v["kv_bad_policy"]
    assert not bad.ok and "kv_load_failure_policy" in bad.error


def test_rendered_serving_variables_are_known_to_vllm(vllm_python: str) -> None:
    """The vLLM variables widep adds for real deployments are ones the installed vLLM reads (vLLM >= 0.2x warns
    about unknown VLLM_* variables); the NVSHMEM/NVIDIA ones are read by NVSHMEM and the container runtime."""
    import json
    import subprocess

    from widep.render.vllm import keep_alive_env

    names = ["VLLM_RANDOMIZE_DP_DUMMY_INPUTS", "VLLM_ENGINE_READY_TIMEOUT_S"] + [k for k, _ in keep_alive_env()]
    code = (
        "import json, sys, vllm.envs as e; "
        "print(json.dumps([n for n in sys.argv[1:] if n not in e.environment_variables]))"
    )
    out = subprocess.run([vllm_python, "-c", code, *names], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
