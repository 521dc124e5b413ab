"""Render the exact argv and environment of every vLLM process of a plan (pure).

One process per DP rank in the default external-LB mode; one per node in hybrid and multi-port
mode; one API server on the leader node plus headless workers in internal-LB mode. Version
differences come from :mod:`widep.spec.vllm_versions`, never from ad-hoc ifs on version strings.

Secrets are never rendered as values: an :class:`EnvRef` names the variable (bare metal) or Secret
(Kubernetes) that holds them, and is resolved only when a process is started.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from widep.errors import UserError
from widep.plan.api import model_path as loaded_model_path
from widep.plan.core import DeploymentPlan, Rank, RolePlan
from widep.plan.extras import check_extras
from widep.render.quoting import check_env_name, sh_assign, sh_ref, sh_word
from widep.vllm_gate import MIDDLEWARE as GATE_MIDDLEWARE

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
    """(role, replica) -> address of the group leader, overriding the topology, when it is known at render time
    (an executor that learns it later binds it with :meth:`ProcessCommand.at`)."""
    node_addresses: dict[int, str] = field(default_factory=dict)
    """node index -> address this node is reached by, overriding the topology (known at render time)."""
    profile_dir: str | None = None
    """Turn the torch profiler on with traces under this absolute directory (overrides profiler.dir)."""
    first_token_gate: bool = False
    """vLLM's interpreter imports widep: every API server loads the first-token gate (``--middleware``,
    :mod:`widep.vllm_gate`), so a stream that fails before its first token answers 503 and the front door retries it
    instead of losing it behind an already-sent 200."""


@dataclass(frozen=True)
class Slot:
    """A per-process value left open in a command template (torchx's macros): filled from the process's
    structured fields for ``argv``, or by an executor that knows it later or spells it differently (a pod's
    ``${LWS_LEADER_ADDRESS}``, the address Ray placed a node at)."""

    name: str

    def __str__(self) -> str:
        return "${" + self.name + "}"


HOST = Slot("host")
"""``--host``: the node's address when serving.host is 'node', else that bind address."""
PORT = Slot("port")
"""``--port``: the HTTP port of the process."""
DP_RANK = Slot("dp_rank")
"""``--data-parallel-rank`` (one DP rank per process)."""
START_RANK = Slot("start_rank")
"""``--data-parallel-start-rank`` (the first of the node's DP ranks)."""
LEADER_ADDRESS = Slot("leader_address")
"""``--data-parallel-address``: the group leader's address."""
NODE_ADDRESS = Slot("node_address")
"""The address the process's node is reached by (NIXL side channel)."""
DEVICES = Slot("devices")
"""``CUDA_VISIBLE_DEVICES``: the process's GPUs as the executor numbers them."""

Word = str | Slot
EnvTemplate = str | EnvRef | Slot


@dataclass(frozen=True)
class ProcessCommand:
    """One process to start: structured fields, and the argv / environment derived from them.

    A process, not a rank: in external-LB mode it runs one DP rank, in hybrid / multi-port / internal mode all the
    DP ranks of its node, and the router is one too. ``template`` and ``env_template`` hold :class:`Slot` where a
    value depends on where the process runs; ``argv`` and ``env`` fill them from the fields below, and
    :meth:`at` re-binds the addresses and devices an executor learns late (nobody parses argv back).
    """

    role: str
    replica: int
    dp_rank: int
    """First DP rank this process runs (the only one in external mode; the start rank otherwise)."""
    dp_ranks: tuple[int, ...]
    """All DP ranks whose engines this process starts."""
    node: int
    node_name: str
    local_rank: int
    port: int | None
    """HTTP port it serves (None: headless)."""
    health_port: int | None = None
    """Port to probe for health (the supervisor port in multi-port mode)."""
    headless: bool = False
    template: tuple[Word, ...] = ()
    """The argv with its per-process values as slots."""
    env_template: tuple[tuple[str, EnvTemplate], ...] = ()
    """The environment, secrets as :class:`EnvRef`, per-process values as slots."""
    node_address: str = ""
    """The address this process's node is reached by."""
    bind: str | None = None
    """serving.host: 'node' (bind to ``node_address``) or a bind address such as 0.0.0.0; None: no --host."""
    leader_address: str | None = None
    """The group leader's address (``--data-parallel-address``); None when the process has no DP peers."""
    gpus: tuple[int, ...] = ()
    """Plan GPU ids of the node this process uses."""
    devices: tuple[str, ...] | None = None
    """GPU ids as the executor numbers them (Ray's); None: ``gpus``."""

    @property
    def host(self) -> str | None:
        """What ``--host`` is: the node's address when binding to the node, else the bind address."""
        return self.node_address if self.bind == "node" else self.bind

    def value(self, slot: Slot) -> str:
        """The value of ``slot`` for this process."""
        if slot == HOST:
            v = self.host
        elif slot == PORT:
            v = None if self.port is None else str(self.port)
        elif slot in (DP_RANK, START_RANK):
            v = str(self.dp_rank)
        elif slot == LEADER_ADDRESS:
            v = self.leader_address
        elif slot == NODE_ADDRESS:
            v = self.node_address
        elif slot == DEVICES:
            v = ",".join(self.devices if self.devices is not None else map(str, self.gpus))
        else:
            v = None
        if v is None:
            raise ValueError(
                f"{self.name}: no value for {slot} (a widep bug: the renderer used a slot it did not fill)"
            )
        return v

    @cached_property
    def argv(self) -> tuple[str, ...]:
        return tuple(self.value(w) if isinstance(w, Slot) else w for w in self.template)

    @cached_property
    def env(self) -> tuple[tuple[str, EnvValue], ...]:
        return tuple((k, self.value(v) if isinstance(v, Slot) else v) for k, v in self.env_template)

    def at(
        self, node_address: str | None = None, leader_address: str | None = None, devices: tuple[str, ...] | None = None
    ) -> ProcessCommand:
        """This process with the values an executor learned late: where its node and its group leader are
        reached, the GPU ids it was given."""
        return replace(
            self,
            node_address=self.node_address if node_address is None else node_address,
            leader_address=self.leader_address
            if leader_address is None or self.leader_address is None
            else leader_address,
            devices=self.devices if devices is None else devices,
        )

    def with_executable(self, path: str) -> ProcessCommand:
        """This process with its program (argv[0]) given as ``path``."""
        return replace(self, template=(path,) + self.template[1:])

    @property
    def env_dict(self) -> dict[str, EnvValue]:
        return dict(self.env)

    @property
    def name(self) -> str:
        return (
            f"{self.role}/{self.dp_rank}"
            if len(self.dp_ranks) == 1
            else f"{self.role}/{self.dp_ranks[0]}-{self.dp_ranks[-1]}"
        )

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
        parts = [
            f"{check_env_name(k)}={sh_ref(v.name)}" if isinstance(v, EnvRef) else sh_assign(k, v) for k, v in self.env
        ]
        return " ".join(parts + [sh_word(a) for a in self.argv])


def model_path(plan: DeploymentPlan, ctx: RenderContext) -> str:
    """What the processes load: the context's override, else the topology's (:func:`widep.plan.api.model_path`)."""
    return loaded_model_path(plan, ctx.model_path)


def _node_addr(plan: DeploymentPlan, ctx: RenderContext, node: int) -> str:
    if node in ctx.node_addresses:
        return ctx.node_addresses[node]
    return plan.nodes[node].host


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
            cfg: dict[str, Any] = {"window_size": s.eplb.window_size, "step_interval": s.eplb.step_interval}
            if s.eplb.redundant_experts != "auto":  # 'auto' (0.34+): left unset, vLLM computes the least even count
                cfg["num_redundant_experts"] = rp.redundant_experts
            cfg["log_balancedness"] = s.eplb.log_balancedness
            args += ["--eplb-config", json.dumps(cfg, separators=(",", ":"))]
        else:
            args += [
                "--num-redundant-experts",
                str(rp.redundant_experts),
                "--eplb-window-size",
                str(s.eplb.window_size),
                "--eplb-step-interval",
                str(s.eplb.step_interval),
            ]
            if s.eplb.log_balancedness:
                args.append("--eplb-log-balancedness")
    if s.dbo.enabled:
        args += [
            "--enable-dbo",
            "--dbo-decode-token-threshold",
            str(s.dbo.decode_token_threshold),
            "--dbo-prefill-token-threshold",
            str(s.dbo.prefill_token_threshold),
        ]
    if s.fault_tolerance.enabled:
        ft = {"engine_recovery_timeout_sec": s.fault_tolerance.engine_recovery_timeout_s}
        args += ["--enable-fault-tolerance", "--fault-tolerance-config", json.dumps(ft, separators=(",", ":"))]
    if s.elastic_ep.enabled:
        args.append("--enable-elastic-ep")
        if s.elastic_ep.max_dp_size is not None:
            args += ["--elastic-ep-max-dp-size", str(s.elastic_ep.max_dp_size)]
    if s.deep_gemm and plan.device == "cuda" and plan.weight_dtype == "fp8" and vt.has_moe_backend_flag:
        args += ["--moe-backend", "deep_gemm"]
    args += [
        "--max-num-seqs",
        str(s.max_num_seqs),
        "--max-num-batched-tokens",
        str(rp.max_num_batched_tokens),
        "--max-model-len",
        str(rp.max_model_len),
    ]
    if plan.device == "cuda":
        args += ["--gpu-memory-utilization", str(s.gpu_memory_utilization)]
        if s.kv_cache_gib is not None:
            args += ["--kv-cache-memory-bytes", str(int(s.kv_cache_gib * 2**30))]
    if rp.kv_dtype == "fp8":
        args += ["--kv-cache-dtype", "fp8"]
    if s.block_size is not None:
        args += ["--block-size", str(s.block_size)]
    if s.enforce_eager:
        args.append("--enforce-eager")
    if plan.spec.serving.record_routed_experts:
        args.append("--enable-return-routed-experts")
    if plan.spec.model.trust_remote_code:
        args.append("--trust-remote-code")
    if plan.spec.disaggregated:
        args += ["--kv-transfer-config", json.dumps(kv_transfer_config(plan), separators=(",", ":"))]
    return args


def kv_transfer_config(plan: DeploymentPlan) -> dict[str, Any]:
    """vLLM's --kv-transfer-config for a P/D topology: NIXL on every role.

    On the CPU backend the KV cache lives in host memory, so NIXL registers it as DRAM
    (``kv_buffer_device: cpu``, the only buffer vLLM 0.32 accepts there) and moves it with UCX's
    shared-memory/TCP transports; on GPUs the cache is registered in place (VRAM, RDMA).
    """
    kvt: dict[str, Any] = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    if plan.device == "cpu":
        kvt["kv_buffer_device"] = "cpu"
    if plan.vllm.has_kv_load_failure_policy:
        kvt["kv_load_failure_policy"] = plan.spec.serving.kv_load_failure_policy
    return kvt


def _env(
    plan: DeploymentPlan, ctx: RenderContext, rp: RolePlan, rank: Rank, gpus: tuple[int, ...]
) -> list[tuple[str, EnvTemplate]]:
    vt = plan.vllm
    s = rp.spec
    net = plan.spec.cluster.network
    env: list[tuple[str, EnvTemplate]] = []
    if plan.device == "cuda":
        env.append(("CUDA_VISIBLE_DEVICES", DEVICES))
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
        if vt.engine_ready_timeout_env:
            env.append(("VLLM_ENGINE_READY_TIMEOUT_S", str(plan.spec.vllm.ready_timeout_s)))
        if s.dbo.enabled and vt.dbo_needs_env and vt.dbo_needs_env[0] not in s.extra_env:
            env.append(vt.dbo_needs_env)
    else:
        # CPU backend: a fixed KV cache per rank, and each rank's OpenMP threads on their own cores
        # (the CPU counterpart of giving each rank its own GPU).
        env.append(("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(rp.memory.kv_cache_gib)))))
        # One entry per worker of this process (its slot's core), separated by '|': vLLM 0.32 takes TP x PP entries
        # per local DP rank, in [DP, PP, TP] order (vllm/utils/ompmultiprocessing.py), so TP=2 is "0|1", not "0,1".
        # cluster.cpu_cores < slots: slots wrap onto that many cores, so engines share them (3 engines on 2 cores).
        gpn = plan.spec.cluster.gpus_per_node
        budget = plan.spec.cluster.cpu_cores
        cores = [g % budget for g in gpus] if budget else [rank.node * gpn + g for g in gpus]
        if ctx.cpu_count:
            cores = [c % ctx.cpu_count for c in cores]
        env.append(("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, cores))))
    if plan.spec.disaggregated:
        env.append(("VLLM_NIXL_SIDE_CHANNEL_HOST", NODE_ADDRESS))
        env.append(("VLLM_NIXL_SIDE_CHANNEL_PORT", str(rp.nixl_side_channel_port)))
    if plan.router is not None:
        env += [kv for kv in keep_alive_env() if kv[0] not in s.extra_env]
    for var, ref in (
        ("VLLM_API_KEY", secret_ref(plan, "api_key_secret", "VLLM_API_KEY", "api-key")),
        ("HF_TOKEN", secret_ref(plan, "hf_token_secret", "HF_TOKEN", "token")),
    ):
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


def _profiler(
    plan: DeploymentPlan, ctx: RenderContext, role: str, dp_rank: int
) -> tuple[list[str], list[tuple[str, EnvValue]]]:
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
    env += [
        ("VLLM_TORCH_PROFILER_WITH_STACK", "1" if pr.with_stack else "0"),
        ("VLLM_TORCH_PROFILER_RECORD_SHAPES", "1" if pr.record_shapes else "0"),
        ("VLLM_TORCH_PROFILER_WITH_PROFILE_MEMORY", "1" if pr.with_memory else "0"),
    ]
    return [], env


def _entry(plan: DeploymentPlan, ctx: RenderContext, model: str) -> list[str]:
    entry = ctx.entry_point or plan.spec.vllm.entry_point
    if entry == "module":
        return [ctx.python or plan.spec.vllm.python, "-m", MODULE_ENTRY, "--model", model]
    return ["vllm", "serve", model]


def render_role(plan: DeploymentPlan, rp: RolePlan, ctx: RenderContext | None = None) -> list[ProcessCommand]:
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
    bind = plan.spec.serving.host
    serve: list[Word] = ["--host", HOST, "--port", PORT]
    if ctx.first_token_gate:
        serve += ["--middleware", GATE_MIDDLEWARE]
    out: list[ProcessCommand] = []
    for g in range(rp.spec.replicas):
        leader = _leader_addr(plan, ctx, rp, g) if rp.dp_size > 1 else None
        group = [r for r in rp.ranks if r.replica == g]
        dp_args: list[Word] = ["--data-parallel-address", LEADER_ADDRESS, "--data-parallel-rpc-port", str(rp.rpc_port)]
        if mode == "external" or rp.dp_size == 1:
            for r in group:
                argv: list[Word] = [*_entry(plan, ctx, model), *serve, *common]
                if rp.dp_size > 1:  # one engine: vLLM refuses DP rank/LB flags when DP size is 1
                    argv += ["--data-parallel-rank", DP_RANK, *dp_args]
                if plan.vllm.api_server_count_default_is_dp:
                    argv += ["--api-server-count", "1"]
                pargs, penv = _profiler(plan, ctx, rp.name, r.dp_rank)
                out.append(
                    ProcessCommand(
                        rp.name,
                        g,
                        r.dp_rank,
                        (r.dp_rank,),
                        r.node,
                        r.node_name,
                        r.local_rank,
                        r.port,
                        r.port,
                        template=(*argv, *pargs, *tail),
                        env_template=(*_env(plan, ctx, rp, r, r.gpus), *penv),
                        node_address=_node_addr(plan, ctx, r.node),
                        bind=bind,
                        leader_address=leader,
                        gpus=r.gpus,
                    )
                )
            continue
        # per-node processes
        nodes = sorted({r.node for r in group}, key=lambda n: next(r.group_node for r in group if r.node == n))
        for node in nodes:
            local = [r for r in group if r.node == node]
            first = local[0]
            gpus = tuple(gid for r in local for gid in r.gpus)
            ranks = tuple(r.dp_rank for r in local)
            base: list[Word] = ["--data-parallel-size-local", str(len(local)), "--data-parallel-start-rank", START_RANK]
            headless = False
            port: int | None = first.port
            health = first.port
            proc_bind: str | None = bind
            if mode == "hybrid":
                argv = [
                    *_entry(plan, ctx, model),
                    *serve,
                    *common,
                    *base,
                    *dp_args,
                    "--data-parallel-hybrid-lb",
                    "--api-server-count",
                    str(len(local)),
                ]
            elif mode == "multiport":
                argv = [
                    *_entry(plan, ctx, model),
                    *serve,
                    *common,
                    *base,
                    *dp_args,
                    "--data-parallel-multi-port-external-lb",
                    "--data-parallel-supervisor-port",
                    str(plan.spec.serving.supervisor_port),
                ]
                health = plan.spec.serving.supervisor_port
            elif first.group_node == 0:  # internal: one API server on the leader node
                argv = [
                    *_entry(plan, ctx, model),
                    *serve,
                    *common,
                    "--data-parallel-size-local",
                    str(len(local)),
                    *dp_args,
                    "--api-server-count",
                    str(len(local)),
                ]
            else:  # internal: headless engines on the other nodes
                argv = [*_entry(plan, ctx, model), *common, *base, *dp_args, "--headless"]
                headless, port, health, proc_bind = True, None, None, None
            pargs, penv = _profiler(plan, ctx, rp.name, first.dp_rank)
            out.append(
                ProcessCommand(
                    rp.name,
                    g,
                    first.dp_rank,
                    ranks,
                    node,
                    first.node_name,
                    first.local_rank,
                    port,
                    health,
                    headless,
                    template=(*argv, *pargs, *tail),
                    env_template=(*_env(plan, ctx, rp, first, gpus), *penv),
                    node_address=_node_addr(plan, ctx, node),
                    bind=proc_bind,
                    leader_address=leader,
                    gpus=gpus,
                )
            )
    return out


def render(
    plan: DeploymentPlan,
    ctx: RenderContext | None = None,
    *,
    node: int | None = None,
    role: str | None = None,
    rank: int | None = None,
) -> list[ProcessCommand]:
    """The processes of a plan, optionally only those on ``node`` / of ``role`` / running DP ``rank``."""
    ctx = ctx or RenderContext()
    if node is not None and not 0 <= node < len(plan.nodes):
        raise UserError(f"--node: {node} is not a node of {plan.name}. Valid: 0..{len(plan.nodes) - 1}.")
    roles = [plan.role(role)] if role else list(plan.roles)
    out: list[ProcessCommand] = []
    for rp in roles:
        out += render_role(plan, rp, ctx)
    if node is not None:
        out = [c for c in out if c.node == node]
    if rank is not None:
        out = [c for c in out if rank in c.dp_ranks]
        if not out:
            raise UserError(
                f"--rank: no process runs DP rank {rank} with these filters. Valid ranks: "
                f"0..{max(r.dp_size for r in roles) - 1}."
            )
    return out


ROUTER_RETRY_BACKOFF_MS = (100, 2000)
"""First and largest backoff between two router retries of one request (doubling)."""


ROUTER_HOLD_THRESHOLD = 1_000_000
"""--health-failure-threshold for a deployment of one DP group: its workers are never taken out of rotation."""


def router_health_failure_threshold(plan: DeploymentPlan) -> int:
    """``router.health_failure_threshold``, except with one DP group: there is no other group to send a request to,
    and a worker the health checks removed makes vllm-router 0.1.17 answer "503 No available workers" at once
    instead of retrying; kept in rotation, a request to the restarting group is refused and retried (with backoff,
    for ``router.retry_window_s``) until the group answers again."""
    if sum(rp.spec.replicas for rp in plan.roles) == 1:
        return ROUTER_HOLD_THRESHOLD
    return plan.spec.router.health_failure_threshold


def router_recovery_args(plan: DeploymentPlan) -> list[str]:
    """The front door's failure handling, rendered from the roles' recovery policy (``group``; vllm-router 0.1.17).

    vllm-router's defaults keep a recovered group out for about a minute (circuit breakers open after a few errors
    and stay open ~60 s; a worker is healthy again only after 2 checks) and give up on a request after 3 tries, so a
    group restart answered ``503 No available workers`` long after it was healthy. Here: a dead rank's circuit opens
    at its first failure and half-opens after 1 s (one success closes it), a worker is re-admitted at its first
    passing health check, and a request that got no first token (refused, 5xx, no worker) is retried with backoff
    0.1 -> 2 s for ``router.retry_window_s`` - long enough for a group to come back from a cold start.
    """
    rs = plan.spec.router
    first, top = ROUTER_RETRY_BACKOFF_MS
    if rs.retry_window_s == 0:
        retry = ["--disable-retries"]
    else:
        waited, tries, b = 0.0, 0, first
        while waited < rs.retry_window_s * 1000:
            waited += b
            b = min(top, b * 2)
            tries += 1
        retry = [
            "--retry-max-retries",
            str(tries + 1),
            "--retry-initial-backoff-ms",
            str(first),
            "--retry-max-backoff-ms",
            str(top),
            "--retry-backoff-multiplier",
            "2",
        ]
    if sum(rp.spec.replicas for rp in plan.roles) == 1:
        # one DP group: while it restarts no worker can take a request, and vllm-router answers 503 "No available
        # workers (all circuits open or unhealthy)" at once instead of retrying; without circuit breakers a
        # request is retried against the restarting ranks (connection refused) until they answer
        return retry + [
            "--disable-circuit-breaker",
            "--health-success-threshold",
            "1",
            "--health-check-timeout-secs",
            "2",
        ]
    return retry + [
        "--cb-failure-threshold",
        "1",
        "--cb-success-threshold",
        "1",
        "--cb-timeout-duration-secs",
        "1",
        "--cb-window-duration-secs",
        "10",
        "--health-success-threshold",
        "1",
        "--health-check-timeout-secs",
        "2",
    ]


def render_router(plan: DeploymentPlan, ctx: RenderContext | None = None) -> ProcessCommand | None:
    """The vllm-router process of the plan (None when the router is off).

    Regular mode lists every API server with --worker-urls; P/D mode (--vllm-pd-disaggregation) lists
    the prefill servers with --prefill and the decode servers with --decode, with per-side policies.
    """
    if plan.router is None:
        return None
    ctx = ctx or RenderContext()
    rs = plan.spec.router
    rt = plan.router

    def urls(kind: str | None) -> list[str]:
        out = []
        for rp in plan.roles:
            if kind is not None and rp.kind != kind:
                continue
            for _, h, port in plan.endpoints(rp.name):
                out.append(f"http://{h}:{port}")
        return out

    argv: list[Word] = [rs.command, "--host", HOST, "--port", PORT, "--prometheus-port", str(rt.prometheus_port)]
    if rt.pd:
        argv += ["--vllm-pd-disaggregation"]
        for u in urls("prefill"):
            argv += ["--prefill", u]
        for u in urls("decode"):
            argv += ["--decode", u]
        argv += ["--prefill-policy", rs.prefill_policy or rs.policy, "--decode-policy", rs.decode_policy or rs.policy]
    else:
        argv += ["--worker-urls", *urls(None), "--policy", rs.policy]
    argv += [
        "--worker-startup-timeout-secs",
        str(plan.spec.vllm.ready_timeout_s),
        "--health-check-interval-secs",
        str(rs.health_check_interval_s),
        "--health-failure-threshold",
        str(router_health_failure_threshold(plan)),
        *router_recovery_args(plan),
    ]
    env: list[tuple[str, EnvTemplate]] = []
    ref = secret_ref(plan, "api_key_secret", "VLLM_API_KEY", "api-key")
    if ref is not None:
        env.append(("VLLM_API_KEY", ref))
    n = plan.nodes[rt.node]
    return ProcessCommand(
        "router",
        0,
        0,
        (0,),
        rt.node,
        n.name,
        0,
        rt.port,
        rt.port,
        template=tuple(argv + list(rs.extra_args)),
        env_template=tuple(env),
        node_address=_node_addr(plan, ctx, rt.node),
        bind=rs.host,
    )
