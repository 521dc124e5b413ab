"""The topology file: one YAML document that drives plan, render, launch, lws, sweep and bench.

Strict pydantic models: unknown keys are rejected, choices are Literals, numbers have bounds, every
field is documented. Cross-field rules that need the model architecture or the GPU catalog live in
the planner (``widep.plan``), which reports them with the field path, the value given and the valid
values. Nothing here reads the environment, probes the host or touches the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from widep.errors import UserError, did_you_mean
from widep.spec.vllm_versions import ALL2ALL_ALL, DEFAULT_VLLM_VERSION

All2AllBackend = Literal[ALL2ALL_ALL]  # type: ignore[valid-type]
DPMode = Literal["external", "hybrid", "internal", "multiport"]
RoleKind = Literal["prefill", "decode", "mixed"]
WeightDType = Literal["bf16", "fp16", "fp8", "mxfp4", "int4"]
KVDType = Literal["auto", "bf16", "fp16", "fp8"]


class Strict(BaseModel):
    """Base: unknown fields rejected, values immutable, docstrings used as descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True)


class ModelSpec(Strict):
    """Which MoE model to serve."""

    preset: str | None = None
    """A built-in model preset (deepseek-r1, deepseek-v3, kimi-k2, qwen3-235b-a22b, qwen3-30b-a3b,
    deepseek-v2-lite, gpt-oss-120b, mixtral-8x7b, tiny-moe)."""
    config: str | None = None
    """Path to a local Hugging Face config.json (or a model directory) of any MoE model; relative paths
    are resolved against the topology file's directory."""
    path: str | None = None
    """What vLLM loads: a hub id or a local directory. Default: the preset's hub id, or for tiny-moe the
    model widep builds into its cache on first use."""
    served_model_name: str | None = None
    """Name clients use in requests (--served-model-name). Default: vLLM's (the path)."""
    weight_dtype: WeightDType | None = None
    """Weight precision of linear layers. Default: the checkpoint's (FP8 block-quantised for R1/V3)."""
    kv_cache_dtype: KVDType = "auto"
    """KV cache precision; 'auto' follows the activations (bf16). 'fp8' uses vLLM's fp8 KV (fp8_ds_mla for MLA)."""
    trust_remote_code: bool = False
    """Pass --trust-remote-code to vLLM."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.preset is None) == (self.config is None):
            raise ValueError(
                "give exactly one of model.preset or model.config. "
                f"Given: preset={self.preset!r}, config={self.config!r}."
            )
        return self


class NodeSpec(Strict):
    """One machine of the cluster."""

    name: str = Field(min_length=1, max_length=253)
    """Host name (what `hostname` prints there); used to find 'this node' at launch."""
    address: str | None = None
    """IP address or DNS name other nodes reach it by. Needed to launch on several nodes."""


class NetworkSpec(Strict):
    """How ranks on different nodes talk."""

    interface: str | None = None
    """Socket interface for GLOO/NCCL bootstrap and NVSHMEM (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, ...)."""
    rdma: bool = True
    """InfiniBand/RoCE with GPUDirect RDMA between nodes (DeepEP internode kernels need it)."""
    hcas: list[str] = Field(default_factory=list)
    """RDMA devices to use (NCCL_IB_HCA), e.g. [mlx5_0, mlx5_1]. Empty: the libraries choose."""
    ibgda: bool = True
    """Use NVSHMEM's IBGDA transport (GPU-initiated RDMA; DeepEP low-latency kernels want it)."""
    rdma_resource: str | None = None
    """Extended resource of the cluster's RDMA device plugin (e.g. rdma/ib, rdma/roce_gdr) that `widep lws`
    requests once per pod; None: the provider profile decides (generic requests none)."""


class ClusterSpec(Strict):
    """The machines a deployment may use."""

    gpu: str = "H200"
    """GPU kind: H100, H800, H200, B200, GB200, or CPU for the vLLM CPU backend."""
    gpus_per_node: int = Field(default=8, ge=1, le=72)
    """GPUs (for CPU: rank slots, one pinned core group each) per node."""
    nodes: int | list[NodeSpec] = 1
    """Node count, or the nodes themselves (name and address), in rank order."""
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    """Inter-node networking."""

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, v: int | list[NodeSpec]) -> int | list[NodeSpec]:
        if isinstance(v, int):
            if v < 1:
                raise ValueError(f"need at least 1 node. Given: {v}.")
        else:
            if not v:
                raise ValueError("the node list is empty. Give at least one node or a count.")
            names = [n.name for n in v]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"node names must be unique. Given twice: {', '.join(dup)}.")
        return v

    @property
    def node_list(self) -> list[NodeSpec]:
        """The nodes, named node-0.. when only a count was given."""
        if isinstance(self.nodes, int):
            return [NodeSpec(name=f"node-{i}") for i in range(self.nodes)]
        return list(self.nodes)

    @property
    def node_count(self) -> int:
        return self.nodes if isinstance(self.nodes, int) else len(self.nodes)


class EPLBSpec(Strict):
    """Expert-parallel load balancing (vLLM --enable-eplb / --eplb-config)."""

    enabled: bool = False
    """Turn on EPLB (CUDA only; needs expert parallel with EP > 1)."""
    redundant_experts: int = Field(default=0, ge=0, le=1023)
    """Extra physical expert replicas; (routed + redundant) must divide by EP."""
    window_size: int = Field(default=1000, gt=0)
    """Steps of expert load statistics EPLB looks back over."""
    step_interval: int = Field(default=3000, gt=0)
    """Steps between rebalances."""
    log_balancedness: bool = False
    """Log the balancedness metric."""


class DBOSpec(Strict):
    """Dual batch overlap: two micro-batches so all-to-all overlaps compute."""

    enabled: bool = False
    """--enable-dbo (needs a DeepEP or nixl_ep all2all backend on CUDA)."""
    decode_token_threshold: int = Field(default=32, ge=2)
    """Decode-only batches above this many tokens are split (--dbo-decode-token-threshold)."""
    prefill_token_threshold: int = Field(default=512, ge=2)
    """Batches with a prefill above this many tokens are split (--dbo-prefill-token-threshold)."""


class RoleSpec(Strict):
    """One DP group kind: prefill, decode, or mixed (both). Each role is its own DP/EP group."""

    name: str = Field(pattern=r"^[a-z]([-a-z0-9]{0,30}[a-z0-9])?$")
    """Role name (lower-case DNS label): used in logs, ports table and manifest names."""
    kind: RoleKind = "mixed"
    """prefill, decode, or mixed (serves whole requests)."""
    nodes: int | list[str | int] = 1
    """Nodes per DP group: a count (taken in order from the nodes no earlier role uses), or node names/indices."""
    gpus_per_node: int | None = Field(default=None, ge=1)
    """GPUs this role uses on each of its nodes. Default: all of cluster.gpus_per_node."""
    first_gpu: int = Field(default=0, ge=0)
    """Index of the first GPU this role uses on each node (to share a node between roles)."""
    replicas: int = Field(default=1, ge=1)
    """Independent copies of this DP group (each on its own nodes)."""
    tp: int = Field(default=1, ge=1)
    """Tensor-parallel size inside each DP rank (attention); EP = DP x TP."""
    expert_parallel: bool = True
    """Shard experts over the EP group (--enable-expert-parallel). Off: experts are TP-sharded like dense layers."""
    all2all_backend: All2AllBackend | None = None
    """MoE all-to-all: deepep_low_latency (decode), deepep_high_throughput (prefill), allgather_reducescatter,
    pplx (vLLM <= 0.19), ... Default: deepep_low_latency for decode, deepep_high_throughput for prefill and
    mixed on GPUs; allgather_reducescatter on CPU."""
    eplb: EPLBSpec = Field(default_factory=EPLBSpec)
    """Expert load balancing and redundant experts."""
    dbo: DBOSpec = Field(default_factory=DBOSpec)
    """Dual batch overlap."""
    deep_gemm: bool = True
    """Use DeepGEMM FP8 kernels (VLLM_USE_DEEP_GEMM; --moe-backend deep_gemm where available)."""
    max_num_seqs: int = Field(default=256, ge=1)
    """Max concurrent sequences per DP rank."""
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    """Max tokens per step per DP rank. Default: vLLM's (8192 for prefill-capable roles here)."""
    max_model_len: int | None = Field(default=None, ge=16)
    """Max context length. Default: the model's max_position_embeddings capped at 32768."""
    context_len: int | None = Field(default=None, ge=1)
    """Context length used for the 'concurrent sequences' capacity figure. Default: max_model_len."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=0.99)
    """Fraction of each GPU's memory vLLM may use (--gpu-memory-utilization)."""
    kv_cache_gib: float | None = Field(default=None, gt=0.0)
    """Fixed KV cache per rank in GiB (--kv-cache-memory-bytes; VLLM_CPU_KVCACHE_SPACE on CPU). Default on
    GPUs: what is left under gpu_memory_utilization; on CPU: 1 GiB."""
    enforce_eager: bool = False
    """Disable CUDA graphs (--enforce-eager)."""
    port: int | None = Field(default=None, ge=1, le=65535)
    """First HTTP port of this role on each node. Default: serving.port."""
    rpc_port: int | None = Field(default=None, ge=1, le=65535)
    """DP handshake port on this group's leader (--data-parallel-rpc-port). Default: serving.rpc_port."""
    extra_args: list[str] = Field(default_factory=list)
    """More vLLM arguments, appended verbatim (flags widep owns are refused)."""
    extra_env: dict[str, str] = Field(default_factory=dict)
    """More environment variables for every rank (variables widep owns are refused)."""

    @property
    def uses_expert_parallel(self) -> bool:
        return self.expert_parallel


class ServingSpec(Strict):
    """How ranks are exposed."""

    dp_mode: DPMode = "external"
    """external: one API server per DP rank (default); hybrid: one per node; internal: one for the group
    (headless workers); multiport: vLLM's DP supervisor per node starts one API server per local rank."""
    host: str = "0.0.0.0"
    """Address API servers bind: an IP, or "node" for each node's own address (cluster.nodes[].address),
    which lets pretend nodes share one machine on distinct loopback addresses."""
    port: int = Field(default=8000, ge=1, le=65535)
    """First HTTP port on each node (rank r on a node serves port + local rank in external/multiport mode)."""
    rpc_port: int = Field(default=29550, ge=1, le=65535)
    """DP handshake port on each group leader (--data-parallel-rpc-port)."""
    control_port: int = Field(default=29590, ge=1, le=65535)
    """widep's own group-control port on each group leader (attempt number, failure reports);
    role i uses control_port + i."""
    supervisor_port: int = Field(default=9256, ge=1, le=65535)
    """multiport mode: the DP supervisor's aggregated health port."""
    nixl_side_channel_port: int = Field(default=5600, ge=1, le=65535)
    """P/D: base of NIXL side-channel ports (VLLM_NIXL_SIDE_CHANNEL_PORT); one per rank."""
    api_key_secret: str | None = None
    """Name of an environment variable (bare metal) or Kubernetes Secret (LWS) holding the API key;
    passed by reference, never printed."""
    hf_token_secret: str | None = None
    """Name of the variable / Secret holding the Hugging Face token; passed by reference."""


class VLLMSpec(Strict):
    """Which vLLM runs the ranks and how it is started."""

    version: str = DEFAULT_VLLM_VERSION
    """vLLM version the commands are rendered for (0.10.x, 0.11-0.19, 0.20-0.39)."""
    entry_point: Literal["serve", "module"] = "serve"
    """'serve': `vllm serve MODEL ...`; 'module': `python -m vllm.entrypoints.openai.api_server --model MODEL`."""
    python: str = "python"
    """Interpreter for the module entry point."""
    image: str = "vllm/vllm-openai:v0.32.0"
    """Container image for Kubernetes manifests."""
    ready_timeout_s: int = Field(default=1800, ge=10)
    """How long a rank may take to answer /health before it counts as failed."""


class ProfilerSpec(Strict):
    """vLLM's torch profiler, rendered into every rank's command (captured with `widep profile`)."""

    enabled: bool = False
    """Render the profiler config (--profiler-config on vLLM >= 0.20, VLLM_TORCH_PROFILER_DIR before)."""
    dir: str = "/tmp/widep-profiles"
    """Absolute directory for traces on each node; rank traces go to <dir>/<role>/rank-<n>/.
    `widep launch` puts them under its run directory instead."""
    with_stack: bool = True
    """Record Python stacks (torch_profiler_with_stack)."""
    record_shapes: bool = False
    """Record operator input shapes (torch_profiler_record_shapes)."""
    with_memory: bool = False
    """Record memory allocations (torch_profiler_with_memory)."""

    @field_validator("dir")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"the profiler directory must be absolute (vLLM requires it). Given: {v!r}.")
        return v


RouterPolicy = Literal["random", "round_robin", "cache_aware", "kv_aware", "power_of_two", "consistent_hash", "sticky_least_loaded"]


class RouterSpec(Strict):
    """One front door for the whole deployment: vllm-router in front of every API server."""

    enabled: bool = False
    """Start vllm-router on `node` once the ranks it fronts are healthy (also `widep launch --router`)."""
    node: int | str = 0
    """Node that hosts the router (index or name in cluster.nodes)."""
    host: str = "0.0.0.0"
    """Address the router binds ("node": the node's own address)."""
    port: int = Field(default=30000, ge=1, le=65535)
    """Client-facing port of the router."""
    prometheus_port: int = Field(default=29000, ge=1, le=65535)
    """The router's Prometheus metrics port."""
    policy: RouterPolicy = "cache_aware"
    """Load-balancing policy: cache_aware (prefix-cache aware, load-balanced), power_of_two (load-aware),
    round_robin, random, kv_aware, consistent_hash, sticky_least_loaded."""
    prefill_policy: RouterPolicy | None = None
    """P/D: policy for prefill servers (default: policy)."""
    decode_policy: RouterPolicy | None = None
    """P/D: policy for decode servers (default: policy)."""
    pd: Literal["auto", "on", "off"] = "auto"
    """P/D hand-off in the router (--vllm-pd-disaggregation): auto = on when the topology has prefill and decode roles."""
    health_check_interval_s: int = Field(default=5, ge=1)
    """Seconds between the router's health checks of each server (--health-check-interval-secs)."""
    health_failure_threshold: int = Field(default=2, ge=1)
    """Failed checks before the router stops sending to a server (--health-failure-threshold)."""
    command: str = "vllm-router"
    """The router executable."""
    extra_args: list[str] = Field(default_factory=list)
    """More vllm-router arguments, appended verbatim."""


class TopologySpec(Strict):
    """A whole deployment: a model on a cluster, split into roles."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
    """Deployment name (DNS-1123 label): used in run directories and manifest names."""
    description: str = ""
    """Free text shown by `widep plan`."""
    model: ModelSpec
    """The MoE model."""
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    """The machines."""
    roles: list[RoleSpec] = Field(min_length=1)
    """DP groups: one mixed role, or a prefill and a decode role for P/D disaggregation."""
    serving: ServingSpec = Field(default_factory=ServingSpec)
    """Ports and DP mode."""
    vllm: VLLMSpec = Field(default_factory=VLLMSpec)
    """vLLM version and entry point."""
    profiler: ProfilerSpec = Field(default_factory=ProfilerSpec)
    """vLLM's torch profiler (off by default)."""
    router: RouterSpec = Field(default_factory=RouterSpec)
    """vllm-router as one front door (off by default)."""

    @model_validator(mode="after")
    def _roles(self) -> TopologySpec:
        names = [r.name for r in self.roles]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"role names must be unique. Given twice: {', '.join(dup)}.")
        kinds = {r.kind for r in self.roles}
        if "mixed" in kinds and len(self.roles) > 1 and kinds & {"prefill", "decode"}:
            raise ValueError(
                "a mixed role cannot sit beside prefill/decode roles in one deployment. "
                f"Given kinds: {[r.kind for r in self.roles]}. Valid: one or more mixed roles, or prefill + decode."
            )
        return self

    @property
    def disaggregated(self) -> bool:
        return any(r.kind in ("prefill", "decode") for r in self.roles)


# ---------------------------------------------------------------------------------------------
# Loading, with errors for people


def _loc(loc: tuple[Any, ...], data: Any) -> str:
    """'roles[0].all2all_backend' from a pydantic location, using role names where known."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # pydantic adds union-member tags like 'int' / 'list[...]' / 'function-after[...]'
            if isinstance(node, dict) and part not in node and ("[" in part or part in ("int", "str", "bool", "float")):
                continue
            out += f".{part}" if out else str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return out or "(top level)"


def _format_validation_error(err: ValidationError, data: Any, source: str) -> str:
    lines = []
    seen = set()
    for e in err.errors():
        path = _loc(e["loc"], data)
        key = (path, e["type"])
        if key in seen:
            continue
        seen.add(key)
        given = e.get("input")
        if e["type"] == "extra_forbidden":
            parent = _parent_model(e["loc"])
            valid = sorted(parent.model_fields) if parent else []
            name = str(e["loc"][-1])
            msg = f"unknown field {name!r}.{did_you_mean(name, valid)}"
            if valid:
                msg += f" Valid: {', '.join(valid)}."
        elif e["type"] == "literal_error":
            choices = e.get("ctx", {}).get("expected", "")
            opts = [c.strip().strip("'") for c in choices.replace(" or ", ", ").split(",")]
            msg = f"{given!r} is not valid.{did_you_mean(str(given), opts)} Valid: {choices}."
        elif e["type"] == "missing":
            msg = "required field is missing."
        else:
            m = e["msg"]
            m = m[len("Value error, "):] if m.startswith("Value error, ") else m
            msg = f"{m}" + (f" Given: {given!r}." if not isinstance(given, (dict, list)) and "Given" not in m else "")
        lines.append(f"{path}: {msg}")
    head = f"invalid topology {source}:" if source else "invalid topology:"
    return head + "\n  " + "\n  ".join(lines)


_MODELS_BY_FIELD: dict[str, type[BaseModel]] = {}


def _parent_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for listing valid keys)."""
    model: type[BaseModel] = TopologySpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return model if part in ("int", "str") else None
        ann = field.annotation
        inner = _first_model(ann)
        if inner is None:
            return None
        model = inner
    return model


def _first_model(ann: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def parse_topology(data: Any, source: str = "") -> TopologySpec:
    """Validate a topology document (already parsed YAML); UserError listing every problem."""
    if not isinstance(data, dict):
        raise UserError(f"invalid topology {source}: the document must be a mapping, got {type(data).__name__}.")
    try:
        return TopologySpec.model_validate(data)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, data, source)) from None


def load_topology(path: str | Path) -> TopologySpec:
    """Read and validate a topology YAML file. Relative model.config paths resolve against its folder."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"topology file {str(p)!r} not found.")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"topology {str(p)!r} is not valid YAML: {err}") from None
    spec = parse_topology(data, str(p))
    if spec.model.config and not Path(spec.model.config).is_absolute():
        resolved = str((p.parent / spec.model.config).resolve())
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"config": resolved})})
    return spec
