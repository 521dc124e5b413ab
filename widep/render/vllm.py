"""Render the exact argv and environment of every vLLM process of a plan (pure).

One process per DP rank in the default external-LB mode; one per node in hybrid and multi-port
mode; one API server on the leader node plus headless workers in internal-LB mode. Version
differences come from :mod:`widep.spec.vllm_versions`, never from ad-hoc ifs on version strings.

Secrets are never rendered as values: an :class:`EnvRef` names the variable (bare metal) or Secret
(Kubernetes) that holds them, and is resolved only when a process is started.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from widep.errors import UserError
from widep.plan.core import DeploymentPlan, Rank, RolePlan
from widep.render.quoting import check_env_name, sh_assign, sh_ref, sh_word

MODULE_ENTRY = "vllm.entrypoints.openai.api_server"
#: NVSHMEM's symmetric heap for DeepEP low-latency buffers (llm-d wide-EP decode, v0.7+: "Prevent NVSHMEM OOM").
NVSHMEM_SYMMETRIC_SIZE = "16G"
#: VLLM_HTTP_TIMEOUT_KEEP_ALIVE behind a pooling proxy (llm-d: 120; vLLM's default is 5 s).
HTTP_KEEP_ALIVE_S = 120


@dataclass(frozen=True)
class EnvRef:
    """An environment value taken, at start time, from another variable or a Kubernetes Secret."""

    name: str
    """Environment variable holding the value where widep starts processes (bare metal, Ray)."""
    key: str = "token"
    """Key inside the Secret (Kubernetes only)."""
    secret: str | None = None
    """Kubernetes Secret holding the value (None: the topology names none; `widep lws` refuses it)."""
    source: str = field(default="", compare=False)
    """The topology field it comes from (for messages)."""

    def shell(self) -> str:
        """``${NAME}`` as shown in JSON and tables (scripts use :func:`widep.render.quoting.sh_ref`)."""
        return "${" + self.name + "}"

    def __str__(self) -> str:
        return self.shell()


def secret_ref(plan: DeploymentPlan, field_name: str, target: str, default_key: str) -> EnvRef | None:
    """The EnvRef of serving.<field_name> (a SecretRef), for the variable ``target`` widep sets."""
    ref = getattr(plan.spec.serving, field_name)
    if ref is None:
        return None
    return EnvRef(ref.env or target, ref.key or default_key, ref.secret, source=f"serving.{field_name}")


EnvValue = str | EnvRef


@dataclass(frozen=True)
class RenderContext:
    """Host facts the renderer needs; gathered by the caller (launcher, CLI), never by the renderer."""

    model_path: str | None = None
    """What vLLM loads, overriding the topology's (e.g. the locally built tiny MoE)."""
    cpu_count: int | None = None
    """Cores on the host, for CPU-backend thread binding (None: bind to slot indices as they are)."""
    python: str | None = None
    """Interpreter for the module entry point, overriding vllm.python."""
    entry_point: str | None = None
    """'serve' or 'module', overriding vllm.entry_point."""
    leader_addresses: dict[tuple[str, int], str] = field(default_factory=dict)
    """(role, replica) -> address of the group leader, overriding the topology (Ray placement, LWS)."""
    node_addresses: dict[int, str] = field(default_factory=dict)
    """node index -> address this node is reached by, overriding the topology."""
    profile_dir: str | None = None
    """Turn the torch profiler on with traces under this absolute directory (overrides profiler.dir)."""


@dataclass(frozen=True)
class RankCommand:
    """One process to start: its argv, environment and what it serves."""

    role: str
    replica: int
    dp_rank: int
    """First DP rank this process runs (the only one in external mode)."""
    dp_ranks: tuple[int, ...]
    """All DP ranks whose engines this process starts."""
    node: int
    node_name: str
    local_rank: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, EnvValue], ...]
    port: int | None
    """HTTP port it serves (None: headless)."""
    health_port: int | None = None
    """Port to probe for health (the supervisor port in multi-port mode)."""
    headless: bool = False

    @property
    def env_dict(self) -> dict[str, EnvValue]:
        return dict(self.env)

    @property
    def name(self) -> str:
        return f"{self.role}/{self.dp_rank}" if len(self.dp_ranks) == 1 else f"{self.role}/{self.dp_ranks[0]}-{self.dp_ranks[-1]}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "replica": self.replica,
            "dp_rank": self.dp_rank,
            "dp_ranks": list(self.dp_ranks),
            "node": self.node,
            "node_name": self.node_name,
            "local_rank": self.local_rank,
            "port": self.port,
            "health_port": self.health_port,
            "headless": self.headless,
            "argv": list(self.argv),
            "env": {k: (v.shell() if isinstance(v, EnvRef) else v) for k, v in self.env},
        }

    def shell(self) -> str:
        """A copy-pasteable command: ``VAR=value ... argv``, every word quoted once; secrets stay references."""
        parts = [f"{check_env_name(k)}={sh_ref(v.name)}" if isinstance(v, EnvRef) else sh_assign(k, v)
                 for k, v in self.env]
        return " ".join(parts + [sh_word(a) for a in self.argv])


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
    "--max-num-seqs": "roles[].max_num_seqs",
    "--max-num-batched-tokens": "roles[].max_num_batched_tokens",
    "--max-model-len": "roles[].max_model_len",
    "--gpu-memory-utilization": "roles[].gpu_memory_utilization",
    "--kv-cache-memory-bytes": "roles[].kv_cache_gib",
    "--kv-transfer-config": "the roles' kinds (P/D)",
    "--kv-cache-dtype": "model.kv_cache_dtype",
    "--enforce-eager": "roles[].enforce_eager",
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
    "VLLM_NIXL_SIDE_CHANNEL_PORT": "serving.nixl_side_channel_port",
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


def extras_problems(plan: DeploymentPlan) -> list[str]:
    """Every extra_args token that sets a flag widep owns (judged as vLLM's parser judges it: short aliases,
    prefix abbreviations, '_' for '-', dotted sub-keys) or that vLLM's parser refuses; every extra_env key
    widep sets."""
    from widep.render.vllm_options import dest_of, settings

    line = plan.vllm.line
    owned_dests = {d: (flag, why) for flag, why in OWNED_FLAGS.items() if (d := dest_of(flag, line))}
    problems: list[str] = []
    for rp in plan.roles:
        args = rp.spec.extra_args
        found, refused = settings(args, line)
        for i, why in refused:
            problems.append(
                f"roles[{rp.index}].extra_args[{i}]: {args[i]!r} is refused by vLLM {line}'s parser: {why}.")
        for st in found:
            if st.dest in owned_dests:
                flag, why = owned_dests[st.dest]
                how = "" if st.token.split("=", 1)[0] == flag else f" (vLLM's parser reads it as {flag})"
                problems.append(f"roles[{rp.index}].extra_args[{st.index}]: {st.token!r} is set by widep from "
                                f"{why}{how}. Remove it from extra_args and use that field.")
        for i, arg in enumerate(args):  # flags of other lines that the table does not know
            name = arg.split("=", 1)[0].replace("_", "-")
            if name in OWNED_FLAGS and not dest_of(name, line):
                problems.append(f"roles[{rp.index}].extra_args[{i}]: {arg!r} is set by widep from {OWNED_FLAGS[name]}. "
                                "Remove it from extra_args and use that field.")
        for key in rp.spec.extra_env:
            why = owned_env(key)
            if why:
                problems.append(
                    f"roles[{rp.index}].extra_env.{key}: set by widep from {why}. Remove it and use that field.")
    for i, arg in enumerate(plan.spec.router.extra_args):
        name = arg.split("=", 1)[0]
        if name in ROUTER_OWNED_FLAGS:
            problems.append(f"router.extra_args[{i}]: {arg!r} is set by widep from {ROUTER_OWNED_FLAGS[name]}. "
                            "Remove it from extra_args and use that field.")
    return problems


# vllm-router's parser (clap) takes exact long names only: no abbreviations to judge.
ROUTER_OWNED_FLAGS = {
    "--host": "router.host", "--port": "router.port", "--prometheus-port": "router.prometheus_port",
    "--prometheus-host": "router.host", "--worker-urls": "the roles' API servers", "--policy": "router.policy",
    "--vllm-pd-disaggregation": "router.pd", "--prefill": "the prefill roles", "--decode": "the decode roles",
    "--prefill-policy": "router.prefill_policy", "--decode-policy": "router.decode_policy",
    "--worker-startup-timeout-secs": "vllm.ready_timeout_s",
    "--health-check-interval-secs": "router.health_check_interval_s",
    "--health-failure-threshold": "router.health_failure_threshold", "--api-key": "serving.api_key_secret",
}


def check_extras(plan: DeploymentPlan) -> None:
    """UserError (one line per problem) when a role's extra_args / extra_env set something widep owns."""
    problems = extras_problems(plan)
    if problems:
        raise UserError(problems[0] if len(problems) == 1 else "\n  ".join(["extra_args / extra_env:"] + problems))


def model_path(plan: DeploymentPlan, ctx: RenderContext) -> str:
    if ctx.model_path:
        return ctx.model_path
    if plan.spec.model.path:
        return plan.spec.model.path
    if plan.arch.hf_id:
        return plan.arch.hf_id
    if plan.arch.builtin:
        raise UserError(
            f"model: {plan.arch.name!r} is built locally by widep; its path is known once built "
            "(`widep model build`), and `widep launch` builds it on first use. Give --model-path to render it."
        )
    raise UserError("model.path: no path for vLLM to load. Give model.path (a hub id or a local directory).")


def _node_addr(plan: DeploymentPlan, ctx: RenderContext, node: int) -> str:
    if node in ctx.node_addresses:
        return ctx.node_addresses[node]
    n = plan.nodes[node]
    return n.address or n.name


def _leader_addr(plan: DeploymentPlan, ctx: RenderContext, rp: RolePlan, replica: int) -> str:
    key = (rp.name, replica)
    if key in ctx.leader_addresses:
        return ctx.leader_addresses[key]
    return _node_addr(plan, ctx, rp.group_nodes[replica][0])


def _common_args(plan: DeploymentPlan, rp: RolePlan) -> list[str]:
    """Engine arguments that must be identical on every rank of the group."""
    vt = plan.vllm
    s = rp.spec
    args = ["--tensor-parallel-size", str(rp.tp_size), "--data-parallel-size", str(rp.dp_size)]
    if s.expert_parallel:
        args.append("--enable-expert-parallel")
        if vt.all2all_via == "flag":
            args += ["--all2all-backend", rp.all2all_backend]
    if s.eplb.enabled:
        args.append("--enable-eplb")
        if vt.eplb_style == "config":
            cfg = {
                "window_size": s.eplb.window_size,
                "step_interval": s.eplb.step_interval,
                "num_redundant_experts": s.eplb.redundant_experts,
                "log_balancedness": s.eplb.log_balancedness,
            }
            args += ["--eplb-config", json.dumps(cfg, separators=(",", ":"))]
        else:
            args += [
                "--num-redundant-experts", str(s.eplb.redundant_experts),
                "--eplb-window-size", str(s.eplb.window_size),
                "--eplb-step-interval", str(s.eplb.step_interval),
            ]
            if s.eplb.log_balancedness:
                args.append("--eplb-log-balancedness")
    if s.dbo.enabled:
        args += [
            "--enable-dbo",
            "--dbo-decode-token-threshold", str(s.dbo.decode_token_threshold),
            "--dbo-prefill-token-threshold", str(s.dbo.prefill_token_threshold),
        ]
    if s.deep_gemm and plan.device == "cuda" and plan.weight_dtype == "fp8" and vt.has_moe_backend_flag:
        args += ["--moe-backend", "deep_gemm"]
    args += [
        "--max-num-seqs", str(s.max_num_seqs),
        "--max-num-batched-tokens", str(rp.max_num_batched_tokens),
        "--max-model-len", str(rp.max_model_len),
    ]
    if plan.device == "cuda":
        args += ["--gpu-memory-utilization", str(s.gpu_memory_utilization)]
        if s.kv_cache_gib is not None:
            args += ["--kv-cache-memory-bytes", str(int(s.kv_cache_gib * 2**30))]
    if plan.kv_dtype == "fp8":
        args += ["--kv-cache-dtype", "fp8"]
    if s.enforce_eager:
        args.append("--enforce-eager")
    if plan.spec.model.trust_remote_code:
        args.append("--trust-remote-code")
    if plan.spec.disaggregated:
        args += ["--kv-transfer-config", json.dumps(kv_transfer_config(plan), separators=(",", ":"))]
    return args


def kv_transfer_config(plan: DeploymentPlan) -> dict[str, Any]:
    """vLLM's --kv-transfer-config for a P/D topology: NIXL on every role; a failed KV pull fails the request
    (llm-d's choice) where the version table says vLLM has kv_load_failure_policy."""
    kvt: dict[str, Any] = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    if plan.vllm.has_kv_load_failure_policy:
        kvt["kv_load_failure_policy"] = "fail"
    return kvt


def _env(plan: DeploymentPlan, ctx: RenderContext, rp: RolePlan, rank: Rank, gpus: tuple[int, ...]) -> list[tuple[str, EnvValue]]:
    vt = plan.vllm
    s = rp.spec
    net = plan.spec.cluster.network
    env: list[tuple[str, EnvValue]] = []
    if plan.device == "cuda":
        env.append(("CUDA_VISIBLE_DEVICES", ",".join(map(str, gpus))))
        if s.expert_parallel and vt.all2all_via == "env":
            env.append(("VLLM_ALL2ALL_BACKEND", rp.all2all_backend))
        env.append(("VLLM_USE_DEEP_GEMM", "1" if s.deep_gemm else "0"))
        if net.interface:
            for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                env.append((var, net.interface))
        if rp.all2all_backend.startswith("deepep"):
            if net.interface:
                env.append(("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", net.interface))
            if net.rdma and net.ibgda:
                env += [("NVSHMEM_REMOTE_TRANSPORT", "ibgda"), ("NVSHMEM_IB_ENABLE_IBGDA", "1")]
            if rp.all2all_backend == "deepep_low_latency" and "NVSHMEM_SYMMETRIC_SIZE" not in s.extra_env:
                env.append(("NVSHMEM_SYMMETRIC_SIZE", NVSHMEM_SYMMETRIC_SIZE))
        if s.expert_parallel and rp.dp_size > 1 and "VLLM_RANDOMIZE_DP_DUMMY_INPUTS" not in s.extra_env:
            # dummy batches of idle DP ranks route to random experts instead of all to the same ones. Every
            # supported line reads it (0.32 envs.py; llm-d sets it from v0.2, on vLLM 0.10): not a table field.
            env.append(("VLLM_RANDOMIZE_DP_DUMMY_INPUTS", "1"))
        if net.hcas:
            env.append(("NCCL_IB_HCA", ",".join(net.hcas)))
        if vt.line == "0.3x":
            env.append(("VLLM_ENGINE_READY_TIMEOUT_S", str(plan.spec.vllm.ready_timeout_s)))
    else:
        # CPU backend: a fixed KV cache per rank, and each rank's OpenMP threads on their own cores
        # (the CPU counterpart of giving each rank its own GPU).
        env.append(("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(rp.memory.kv_cache_gib)))))
        # One core group per DP rank of this process, separated by '|' as vLLM slices it per local rank.
        gpn = plan.spec.cluster.gpus_per_node
        cores = [rank.node * gpn + g for g in gpus]
        if ctx.cpu_count:
            cores = [c % ctx.cpu_count for c in cores]
        tp = rp.tp_size
        groups = [",".join(map(str, cores[i : i + tp])) for i in range(0, len(cores), tp)]
        env.append(("VLLM_CPU_OMP_THREADS_BIND", "|".join(groups)))
    if plan.spec.disaggregated:
        env.append(("VLLM_NIXL_SIDE_CHANNEL_HOST", _node_addr(plan, ctx, rank.node)))
        env.append(("VLLM_NIXL_SIDE_CHANNEL_PORT", str(plan.spec.serving.nixl_side_channel_port)))
    if plan.router is not None:
        env += [kv for kv in keep_alive_env() if kv[0] not in s.extra_env]
    for var, ref in (("VLLM_API_KEY", secret_ref(plan, "api_key_secret", "VLLM_API_KEY", "api-key")),
                     ("HF_TOKEN", secret_ref(plan, "hf_token_secret", "HF_TOKEN", "token"))):
        if ref is not None:
            env.append((var, ref))
    env += sorted(s.extra_env.items())
    seen = [k for k, _ in env]
    if len(set(seen)) != len(seen):  # check_extras refuses owned names, so this is widep's own mistake
        dup = sorted({k for k in seen if seen.count(k) > 1})
        raise UserError(f"widep would set {dup} twice for role {rp.name!r} (a widep bug, please report)", exit_code=1)
    return env


def keep_alive_env() -> list[tuple[str, EnvValue]]:
    """The API server's HTTP keep-alive when a pooling proxy (vllm-router, llm-d's routing sidecar) sits in
    front: longer than the proxy's idle-connection timeout, so vLLM never closes a connection the proxy is
    about to reuse (llm-d PR #1564: 5 s default vs the sidecar's 90 s idle timeout gave TCP resets). The variable
    feeds uvicorn's timeout_keep_alive in 0.32 (envs.py) and earlier lines; older lines ignore unknown variables, so
    it is not a version-table field."""
    return [("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(HTTP_KEEP_ALIVE_S))]


def profile_dir_of(plan: DeploymentPlan, ctx: RenderContext, role: str, dp_rank: int) -> str | None:
    """Where a process's torch traces go, or None when profiling is off."""
    if not (plan.spec.profiler.enabled or ctx.profile_dir):
        return None
    base = (ctx.profile_dir or plan.spec.profiler.dir).rstrip("/")
    return f"{base}/{role}/rank-{dp_rank}"


def _profiler(plan: DeploymentPlan, ctx: RenderContext, role: str, dp_rank: int) -> tuple[list[str], list[tuple[str, EnvValue]]]:
    d = profile_dir_of(plan, ctx, role, dp_rank)
    if d is None:
        return [], []
    pr = plan.spec.profiler
    if plan.vllm.profiler == "config":
        cfg = {
            "profiler": "torch",
            "torch_profiler_dir": d,
            "torch_profiler_with_stack": pr.with_stack,
            "torch_profiler_record_shapes": pr.record_shapes,
            "torch_profiler_with_memory": pr.with_memory,
        }
        return ["--profiler-config", json.dumps(cfg, separators=(",", ":"))], []
    env: list[tuple[str, EnvValue]] = [("VLLM_TORCH_PROFILER_DIR", d)]
    env += [("VLLM_TORCH_PROFILER_WITH_STACK", "1" if pr.with_stack else "0"),
            ("VLLM_TORCH_PROFILER_RECORD_SHAPES", "1" if pr.record_shapes else "0"),
            ("VLLM_TORCH_PROFILER_WITH_PROFILE_MEMORY", "1" if pr.with_memory else "0")]
    return [], env


def _entry(plan: DeploymentPlan, ctx: RenderContext, model: str) -> list[str]:
    entry = ctx.entry_point or plan.spec.vllm.entry_point
    if entry == "module":
        return [ctx.python or plan.spec.vllm.python, "-m", MODULE_ENTRY, "--model", model]
    return ["vllm", "serve", model]


def render_role(plan: DeploymentPlan, rp: RolePlan, ctx: RenderContext | None = None) -> list[RankCommand]:
    """Every process of one role (all replicas, all nodes)."""
    ctx = ctx or RenderContext()
    check_extras(plan)
    model = model_path(plan, ctx)
    mode = plan.spec.serving.dp_mode
    common = _common_args(plan, rp)
    tail: list[str] = []
    if plan.spec.model.served_model_name:
        tail += ["--served-model-name", plan.spec.model.served_model_name]
    tail += list(rp.spec.extra_args)
    out: list[RankCommand] = []
    def bind(node: int) -> str:
        host = plan.spec.serving.host
        return _node_addr(plan, ctx, node) if host == "node" else host

    for g in range(rp.spec.replicas):
        leader = _leader_addr(plan, ctx, rp, g)
        group = [r for r in rp.ranks if r.replica == g]
        dp_args = ["--data-parallel-address", leader, "--data-parallel-rpc-port", str(rp.rpc_port)]
        if mode == "external" or rp.dp_size == 1:
            for r in group:
                argv = _entry(plan, ctx, model) + ["--host", bind(r.node), "--port", str(r.port)] + common
                if rp.dp_size > 1:  # one engine: vLLM refuses DP rank/LB flags when DP size is 1
                    argv += ["--data-parallel-rank", str(r.dp_rank)] + dp_args
                if plan.vllm.api_server_count_default_is_dp:
                    argv += ["--api-server-count", "1"]
                pargs, penv = _profiler(plan, ctx, rp.name, r.dp_rank)
                out.append(
                    RankCommand(rp.name, g, r.dp_rank, (r.dp_rank,), r.node, r.node_name, r.local_rank,
                                tuple(argv + pargs + tail), tuple(_env(plan, ctx, rp, r, r.gpus) + penv), r.port, r.port)
                )
            continue
        # per-node processes
        nodes = sorted({r.node for r in group}, key=lambda n: next(r.group_node for r in group if r.node == n))
        for node in nodes:
            local = [r for r in group if r.node == node]
            first = local[0]
            gpus = tuple(gid for r in local for gid in r.gpus)
            ranks = tuple(r.dp_rank for r in local)
            base = ["--data-parallel-size-local", str(len(local)), "--data-parallel-start-rank", str(first.dp_rank)]
            headless = False
            port: int | None = first.port
            health = first.port
            if mode == "hybrid":
                argv = _entry(plan, ctx, model) + ["--host", bind(node), "--port", str(first.port)] + common + base + dp_args + [
                    "--data-parallel-hybrid-lb", "--api-server-count", str(len(local))]
            elif mode == "multiport":
                argv = _entry(plan, ctx, model) + ["--host", bind(node), "--port", str(first.port)] + common + base + dp_args + [
                    "--data-parallel-multi-port-external-lb", "--data-parallel-supervisor-port", str(plan.spec.serving.supervisor_port)]
                health = plan.spec.serving.supervisor_port
            else:  # internal
                if first.group_node == 0:
                    argv = _entry(plan, ctx, model) + ["--host", bind(node), "--port", str(first.port)] + common + [
                        "--data-parallel-size-local", str(len(local))] + dp_args + ["--api-server-count", str(len(local))]
                else:
                    argv = _entry(plan, ctx, model) + common + base + dp_args + ["--headless"]
                    headless, port, health = True, None, None
            pargs, penv = _profiler(plan, ctx, rp.name, first.dp_rank)
            out.append(
                RankCommand(rp.name, g, first.dp_rank, ranks, node, first.node_name, first.local_rank,
                            tuple(argv + pargs + tail), tuple(_env(plan, ctx, rp, first, gpus) + penv), port, health, headless)
            )
    return out


def render(plan: DeploymentPlan, ctx: RenderContext | None = None, *, node: int | None = None,
           role: str | None = None, rank: int | None = None) -> list[RankCommand]:
    """The processes of a plan, optionally only those on ``node`` / of ``role`` / running DP ``rank``."""
    ctx = ctx or RenderContext()
    if node is not None and not 0 <= node < len(plan.nodes):
        raise UserError(f"--node: {node} is not a node of {plan.name}. Valid: 0..{len(plan.nodes) - 1}.")
    roles = [plan.role(role)] if role else list(plan.roles)
    out: list[RankCommand] = []
    for rp in roles:
        out += render_role(plan, rp, ctx)
    if node is not None:
        out = [c for c in out if c.node == node]
    if rank is not None:
        out = [c for c in out if rank in c.dp_ranks]
        if not out:
            raise UserError(f"--rank: no process runs DP rank {rank} with these filters. Valid ranks: 0..{max(r.dp_size for r in roles) - 1}.")
    return out


def render_router(plan: DeploymentPlan, ctx: RenderContext | None = None) -> RankCommand | None:
    """The vllm-router process of the plan (None when the router is off).

    Regular mode lists every API server with --worker-urls; P/D mode (--vllm-pd-disaggregation) lists
    the prefill servers with --prefill and the decode servers with --decode, with per-side policies.
    """
    if plan.router is None:
        return None
    ctx = ctx or RenderContext()
    rs = plan.spec.router
    rt = plan.router
    host = _node_addr(plan, ctx, rt.node) if rs.host == "node" else rs.host

    def urls(kind: str | None) -> list[str]:
        out = []
        for rp in plan.roles:
            if kind is not None and rp.kind != kind:
                continue
            for _, h, port in plan.endpoints(rp.name):
                out.append(f"http://{h}:{port}")
        return out

    argv = [rs.command, "--host", host, "--port", str(rt.port), "--prometheus-port", str(rt.prometheus_port)]
    if rt.pd:
        argv += ["--vllm-pd-disaggregation"]
        for u in urls("prefill"):
            argv += ["--prefill", u]
        for u in urls("decode"):
            argv += ["--decode", u]
        argv += ["--prefill-policy", rs.prefill_policy or rs.policy, "--decode-policy", rs.decode_policy or rs.policy]
    else:
        argv += ["--worker-urls", *urls(None), "--policy", rs.policy]
    argv += ["--worker-startup-timeout-secs", str(plan.spec.vllm.ready_timeout_s),
             "--health-check-interval-secs", str(rs.health_check_interval_s),
             "--health-failure-threshold", str(rs.health_failure_threshold)]
    env: list[tuple[str, EnvValue]] = []
    ref = secret_ref(plan, "api_key_secret", "VLLM_API_KEY", "api-key")
    if ref is not None:
        env.append(("VLLM_API_KEY", ref))
    n = plan.nodes[rt.node]
    return RankCommand("router", 0, 0, (0,), rt.node, n.name, 0, tuple(argv + list(rs.extra_args)), tuple(env), rt.port, rt.port)
