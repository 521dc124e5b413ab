"""What ``extra_args`` / ``extra_env`` may not set: the flags and environment variables widep owns, and the check
that refuses them (judged as vLLM's own parser judges a token: :mod:`widep.spec.vllm_options`).

Below both the planner and the renderer: ``plan()`` refuses what ``render``, ``lws`` and ``launch`` refuse, and the
renderer checks again before it renders a role.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from widep.errors import UserError
from widep.spec.vllm_options import dest_of, settings, table_version, unknown_options

if TYPE_CHECKING:
    from widep.plan.core import DeploymentPlan


# Flags widep owns (spelled with dashes); extra_args may not set them.
OWNED_FLAGS = {
    "--model": "model.path",
    "--host": "serving.host",
    "--port": "serving.port / roles[].port",
    "--tensor-parallel-size": "roles[].tp",
    "--data-parallel-size": "roles[].nodes and gpus_per_node",
    "--data-parallel-size-local": "roles[].gpus_per_node / tp",
    "--data-parallel-rank": "the planner (rank layout)",
    "--data-parallel-start-rank": "the planner (rank layout)",
    "--data-parallel-address": "cluster.nodes[].address",
    "--data-parallel-rpc-port": "serving.rpc_port / roles[].rpc_port",
    "--data-parallel-hybrid-lb": "serving.dp_mode",
    "--data-parallel-external-lb": "serving.dp_mode",
    "--data-parallel-multi-port-external-lb": "serving.dp_mode",
    "--data-parallel-supervisor-port": "serving.supervisor_port",
    "--headless": "serving.dp_mode",
    "--api-server-count": "serving.dp_mode",
    "--enable-expert-parallel": "roles[].expert_parallel",
    "--all2all-backend": "roles[].all2all_backend",
    "--enable-eplb": "roles[].eplb.enabled",
    "--eplb-config": "roles[].eplb",
    "--num-redundant-experts": "roles[].eplb.redundant_experts",
    "--enable-dbo": "roles[].dbo.enabled",
    "--dbo-decode-token-threshold": "roles[].dbo.decode_token_threshold",
    "--dbo-prefill-token-threshold": "roles[].dbo.prefill_token_threshold",
    "--enable-fault-tolerance": "roles[].fault_tolerance.enabled",
    "--fault-tolerance-config": "roles[].fault_tolerance",
    "--enable-elastic-ep": "roles[].elastic_ep.enabled",
    "--elastic-ep-max-dp-size": "roles[].elastic_ep.max_dp_size",
    "--max-num-seqs": "roles[].max_num_seqs",
    "--max-num-batched-tokens": "roles[].max_num_batched_tokens",
    "--max-model-len": "roles[].max_model_len",
    "--gpu-memory-utilization": "roles[].gpu_memory_utilization",
    "--kv-cache-memory-bytes": "roles[].kv_cache_gib",
    "--kv-transfer-config": "the roles' kinds (P/D) and serving.kv_load_failure_policy",
    "--kv-cache-dtype": "model.kv_cache_dtype / roles[].kv_cache_dtype",
    "--block-size": "roles[].block_size",
    "--enforce-eager": "roles[].enforce_eager",
    "--enable-return-routed-experts": "serving.record_routed_experts",
    "--served-model-name": "model.served_model_name",
    "--api-key": "serving.api_key_secret",
    "--moe-backend": "roles[].deep_gemm",
    "--profiler-config": "profiler",
    "--config": "the topology (a vLLM config file could set any of the flags above unseen; "
    "put its settings in extra_args)",
}

OWNED_ENV = {
    "CUDA_VISIBLE_DEVICES": "the planner (GPU ids)",
    "VLLM_ALL2ALL_BACKEND": "roles[].all2all_backend",
    "VLLM_USE_DEEP_GEMM": "roles[].deep_gemm",
    "VLLM_MOE_USE_DEEP_GEMM": "roles[].deep_gemm",
    "VLLM_NIXL_SIDE_CHANNEL_HOST": "cluster.nodes[].address",
    "VLLM_NIXL_SIDE_CHANNEL_PORT": "serving.nixl_side_channel_port / roles[].nixl_side_channel_port",
    "VLLM_CPU_KVCACHE_SPACE": "roles[].kv_cache_gib",
    "VLLM_CPU_OMP_THREADS_BIND": "the planner (CPU slots)",
    "GLOO_SOCKET_IFNAME": "cluster.network.interface",
    "NCCL_SOCKET_IFNAME": "cluster.network.interface",
    "VLLM_API_KEY": "serving.api_key_secret",
    "HF_TOKEN": "serving.hf_token_secret",
    "VLLM_TORCH_PROFILER_DIR": "profiler.dir",
    "VLLM_TORCH_PROFILER_WITH_STACK": "profiler.with_stack",
    "VLLM_TORCH_PROFILER_RECORD_SHAPES": "profiler.record_shapes",
    "VLLM_TORCH_PROFILER_WITH_PROFILE_MEMORY": "profiler.with_memory",
    "VLLM_ENGINE_READY_TIMEOUT_S": "vllm.ready_timeout_s",
    "NCCL_IB_HCA": "cluster.network.hcas",
    "POD_IP": "widep lws (the pod's IP)",
    "WIDEP_SHM_DIR": "widep lws (/dev/shm)",
    "WIDEP_RUN_ID": "widep launch",
    "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "cluster.network.interface",
    "NVSHMEM_REMOTE_TRANSPORT": "cluster.network.rdma / ibgda",
    "NVSHMEM_IB_ENABLE_IBGDA": "cluster.network.rdma / ibgda",
}
# Defaults widep sets only when extra_env does not (NVSHMEM_SYMMETRIC_SIZE, VLLM_RANDOMIZE_DP_DUMMY_INPUTS,
# VLLM_HTTP_TIMEOUT_KEEP_ALIVE) are tunable, so they are not in OWNED_ENV.

OWNED_ENV_PREFIXES = {
    "LWS_": "the LeaderWorkerSet controller",
}


def owned_env(key: str) -> str | None:
    """The field widep sets ``key`` from, or None when extra_env may set it."""
    if key in OWNED_ENV:
        return OWNED_ENV[key]
    for prefix, why in OWNED_ENV_PREFIXES.items():
        if key.startswith(prefix):
            return why
    return None


MAX_ARG_STRLEN = 131072
"""Linux: the longest single argument or NAME=value environment string exec accepts, NUL included (32 pages)."""
EXTRAS_EXEC_BUDGET = 1 << 20
"""Bytes of argv + environment (strings, NULs and pointers) a role's extra_args + extra_env may take: half of the
2 MiB ARG_MAX of Linux's default 8 MiB stack (a quarter of it), leaving the rest for widep's own arguments and the
environment the process inherits (launch, srun and kubelet add theirs)."""


def exec_size_problems(where: str, args: list[str] | tuple[str, ...], env: dict[str, str]) -> list[str]:
    """What exec would refuse with 'Argument list too long' (E2BIG), found at plan time."""
    problems = []
    total = 0
    for i, arg in enumerate(args):
        n = len(arg.encode("utf-8", "surrogatepass")) + 1
        total += n + 8
        if n > MAX_ARG_STRLEN:
            problems.append(
                f"{where}.extra_args[{i}]: {n - 1} bytes. Valid: at most {MAX_ARG_STRLEN - 1} bytes per argument "
                "(Linux's MAX_ARG_STRLEN; exec refuses longer ones with 'Argument list too long')"
            )
    for key, value in env.items():
        n = len(key.encode()) + len(value.encode("utf-8", "surrogatepass")) + 2
        total += n + 8
        if n > MAX_ARG_STRLEN:
            problems.append(
                f"{where}.extra_env.{key[:80]}: {n - 1} bytes as NAME=value. Valid: at most {MAX_ARG_STRLEN - 1} "
                "bytes (Linux's MAX_ARG_STRLEN)"
            )
    if total > EXTRAS_EXEC_BUDGET:
        problems.append(
            f"{where}: extra_args and extra_env take {total} bytes of the command line and environment. Valid: at "
            f"most {EXTRAS_EXEC_BUDGET} (half of Linux's usual 2 MiB ARG_MAX; exec refuses more with 'Argument "
            "list too long')"
        )
    return problems


def extras_problems(plan: DeploymentPlan) -> list[str]:
    """Every extra_args token that sets a flag widep owns (judged as vLLM's parser judges it: short aliases,
    prefix abbreviations, '_' for '-', dotted sub-keys) or that vLLM's parser refuses; every extra_env key
    widep sets."""
    line = plan.vllm.line
    version = plan.spec.vllm.version.lstrip("v")
    exact = table_version(line)
    judged = exact is not None and ".".join(version.split(".")[:2]).split("+")[0] == exact
    owned_dests = {d: (flag, why) for flag, why in OWNED_FLAGS.items() if (d := dest_of(flag, line))}
    problems: list[str] = []
    for rp in plan.roles:
        args = rp.spec.extra_args
        found, refused = settings(args, line)
        for i, why in refused:
            problems.append(
                f"roles[{rp.index}].extra_args[{i}]: {args[i]!r} is refused by vLLM {line}'s parser: {why}."
            )
        for st in found:
            if st.dest in owned_dests:
                flag, why = owned_dests[st.dest]
                how = "" if st.token.split("=", 1)[0] == flag else f" (vLLM's parser reads it as {flag})"
                problems.append(
                    f"roles[{rp.index}].extra_args[{st.index}]: {st.token!r} is set by widep from "
                    f"{why}{how}. Remove it from extra_args and use that field."
                )
        if judged:
            for i, token in unknown_options(args, line):
                problems.append(
                    f"roles[{rp.index}].extra_args[{i}]: {token.split('=', 1)[0][:80]!r} is not an option of vLLM "
                    f"{version} (its parser would exit with 'unrecognized arguments'). Valid: an option of "
                    f"`vllm serve --help` for vLLM {version}, or a value after its option."
                )
        for i, arg in enumerate(args):  # flags of other lines that the table does not know
            name = arg.split("=", 1)[0].replace("_", "-")
            if name in OWNED_FLAGS and not dest_of(name, line):
                problems.append(
                    f"roles[{rp.index}].extra_args[{i}]: {arg!r} is set by widep from {OWNED_FLAGS[name]}. "
                    "Remove it from extra_args and use that field."
                )
        problems += exec_size_problems(f"roles[{rp.index}]", args, rp.spec.extra_env)
        for key in rp.spec.extra_env:
            owner = owned_env(key)
            if owner:
                problems.append(
                    f"roles[{rp.index}].extra_env.{key}: set by widep from {owner}. Remove it and use that field."
                )
    problems += exec_size_problems("router", plan.spec.router.extra_args, {})
    for i, arg in enumerate(plan.spec.router.extra_args):
        name = arg.split("=", 1)[0]
        if name in ROUTER_OWNED_FLAGS:
            problems.append(
                f"router.extra_args[{i}]: {arg!r} is set by widep from {ROUTER_OWNED_FLAGS[name]}. "
                "Remove it from extra_args and use that field."
            )
    return problems


# vllm-router's parser (clap) takes exact long names only: no abbreviations to judge.
ROUTER_OWNED_FLAGS = {
    "--host": "router.host",
    "--port": "router.port",
    "--prometheus-port": "router.prometheus_port",
    "--prometheus-host": "router.host",
    "--worker-urls": "the roles' API servers",
    "--policy": "router.policy",
    "--vllm-pd-disaggregation": "router.pd",
    "--prefill": "the prefill roles",
    "--decode": "the decode roles",
    "--prefill-policy": "router.prefill_policy",
    "--decode-policy": "router.decode_policy",
    "--worker-startup-timeout-secs": "vllm.ready_timeout_s",
    "--health-check-interval-secs": "router.health_check_interval_s",
    "--health-failure-threshold": "router.health_failure_threshold",
    **{
        f: "roles[].recovery and router.retry_window_s"
        for f in (
            "--retry-max-retries",
            "--retry-initial-backoff-ms",
            "--retry-max-backoff-ms",
            "--retry-backoff-multiplier",
            "--disable-retries",
            "--cb-failure-threshold",
            "--cb-success-threshold",
            "--cb-timeout-duration-secs",
            "--cb-window-duration-secs",
            "--disable-circuit-breaker",
            "--health-success-threshold",
            "--health-check-timeout-secs",
        )
    },
    "--api-key": "serving.api_key_secret",
}


def check_extras(plan: DeploymentPlan) -> None:
    """UserError (one line per problem) when a role's extra_args / extra_env set something widep owns."""
    problems = extras_problems(plan)
    if problems:
        raise UserError(problems[0] if len(problems) == 1 else "\n  ".join(["extra_args / extra_env:"] + problems))
