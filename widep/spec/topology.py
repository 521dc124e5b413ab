"""The topology file: one YAML document that drives plan, render, launch, lws, sweep and bench.

Strict pydantic models: unknown keys are rejected, choices are Literals, numbers have bounds, every
field is documented. Cross-field rules that need the model architecture or the GPU catalog live in
the planner (``widep.plan``), which reports them with the field path, the value given and the valid
values. Nothing here reads the environment, probes the host or touches the network.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from widep.errors import UserError, did_you_mean
from widep.render.quoting import POSIX_NAME, control_problem
from widep.spec.hardware import get_gpu
from widep.spec.vllm_versions import ALL2ALL_ALL, DEFAULT_VLLM_VERSION, default_version

All2AllBackend = Literal[ALL2ALL_ALL]
DPMode = Literal["external", "hybrid", "internal", "multiport"]
RoleKind = Literal["prefill", "decode", "mixed"]
RecoveryPolicy = Literal["group", "surgical"]
WeightDType = Literal["bf16", "fp16", "fp8", "mxfp4", "int4"]
KVDType = Literal["auto", "bf16", "fp16", "fp8"]


class Strict(BaseModel):
    """Base: unknown fields rejected, values immutable, docstrings used as descriptions, no inf/NaN, and no
    coercion (strict mode): ``tp: true`` or ``port: "80"`` or ``tp: 2.0`` is an error, not 1 / 80 / 2
    (YAML booleans are not integers; an int is still accepted where a float is asked for)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,
        allow_inf_nan=False,
        strict=True,
    )


def _one_line(v: str) -> str:
    problem = control_problem(v)
    if problem:
        raise ValueError(problem)
    return v


def _not_a_flag(v: str) -> str:
    """Names, paths and addresses are rendered as option values (--served-model-name X, vllm serve X, --host X):
    one that starts with '-' would be read by vLLM (or the shell tool) as an option instead."""
    if v.startswith("-"):
        raise ValueError(
            f"starts with '-', so vLLM would read it as an option, not a value. Given: {v[:80]!r}. Valid: a value "
            "that does not start with '-' (write a relative path as ./-name)"
        )
    return v


def _no_nul(v: str) -> str:
    if "\x00" in v:
        raise ValueError("contains a NUL byte, which no command line or environment can carry")
    return v


def _free_text(v: str) -> str:
    problem = control_problem(v, allow="\n\t")
    if problem:
        raise ValueError(problem)
    return v


def _env_name(v: str) -> str:
    if not POSIX_NAME.match(v):
        raise ValueError(
            f"not an environment variable name. Given: {v!r}. Valid: [A-Za-z_][A-Za-z0-9_]*, e.g. NCCL_DEBUG"
        )
    return v


Name = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_one_line), AfterValidator(_not_a_flag)]
"""A name, path, address or flag value: one line of printable text, not starting with '-'."""
Arg = Annotated[str, Field(max_length=65536), AfterValidator(_no_nul)]
"""An argument passed verbatim (quoted once for the shell, escaped for Kubernetes)."""
EnvName = Annotated[str, AfterValidator(_env_name)]

MAX_NODES = 4096
"""Largest node count widep plans (the biggest published GPU clusters are ~100k GPUs = ~12k 8-GPU nodes,
but one deployment's DP/EP groups are bounded by the experts they shard: 4096 nodes x 72 GPUs is far past that)."""

_K8S_SECRET = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_K8S_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+\Z")
_KEY_PREFIXES = ("sk-", "sk_", "hf_", "ghp_", "gho_", "github_pat_", "xoxb-", "xoxp-", "AKIA", "eyJ", "glpat-")


def looks_like_key(value: str) -> bool:
    """True for what looks like a pasted credential rather than a name: a known token prefix followed by a
    long tail (sk-..., hf_..., ghp_...), or a long run of letters and digits without the separators names
    have (24+ with digits, or 16+ mixing upper case, lower case and digits: hex, base64 and API keys)."""
    if any(value.startswith(p) and len(value) >= len(p) + 16 for p in _KEY_PREFIXES):
        return True
    for run in re.findall(r"[A-Za-z0-9+/=]+", value):
        digit, upper, lower = (any(f(c) for c in run) for f in (str.isdigit, str.isupper, str.islower))
        if (len(run) >= 24 and digit and (upper or lower)) or (len(run) >= 16 and digit and upper and lower):
            return True
    return False


_SHELL_SYNTAX = re.compile(r"[$`;|&<>()\s'\"\\]")


def _not_a_key(v: str) -> str:
    """Refuse a pasted credential. Text with shell syntax in it is no key: it is left to the name checks,
    which call it what it is (neither a variable nor a Secret name) instead of 'looks like a key'."""
    if not _SHELL_SYNTAX.search(v) and looks_like_key(v):
        raise ValueError(
            "this looks like a key or token, not the name of one. Given: (not shown). Valid: the name of an "
            "environment variable or Kubernetes Secret that holds it; never put the value in a topology file, "
            "and rotate the key if this file was shared"
        )
    return v


_VERSION = re.compile(
    r"v?\d{1,4}\.\d{1,4}(\.\d{1,6}((a|b|rc)\d{1,6})?(\.post\d{1,6})?(\.dev\d{1,6})?(\+[A-Za-z0-9.]{1,64})?)?\Z",
    re.ASCII,  # digits 0-9 only: '٠.٣٢' or full-width '０.３２' are no version pip or vLLM knows
)


def _version(v: str) -> str:
    if not _VERSION.match(v):
        raise ValueError(
            f"not a vLLM version. Given: {v[:80]!r}. Valid: MAJOR.MINOR or MAJOR.MINOR.PATCH with an optional "
            "PEP 440 suffix (rcN, .postN, .devN, +local), e.g. 0.32.0, 0.32, 0.32.0rc1"
        )
    return v


_SECRET_FLAG = re.compile(
    r"--?[A-Za-z0-9_.-]*(api[-_]?key|token|secret|password|passwd|credential)[A-Za-z0-9_-]*\Z", re.I
)
"""Options whose value is a credential (--api-key, --hf-token, --token, --password, ...)."""
_SECRET_ENV = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)", re.I
)
"""Environment variable names whose value is a credential (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, OPENAI_API_KEY...)."""
SECRET_HOW = (
    "pass it by reference, a SecretRef: serving.api_key_secret / serving.hf_token_secret ({env: VARIABLE} set "
    "where widep runs, {secret: NAME, key: KEY} for Kubernetes); never put the value in a topology file, and "
    "rotate it if this file was shared"
)


def secret_args_problem(args: list[str]) -> str | None:
    """Why ``args`` carry a credential (never the credential itself), or None."""
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if eq and _SECRET_FLAG.match(name) and value:
            return f"item {i}: {name[:80]!r} carries a credential ({mask(value)}); {SECRET_HOW}"
        if not eq and _SECRET_FLAG.match(arg) and i + 1 < len(args):
            return f"item {i + 1}: the value of {arg[:80]!r} is a credential ({mask(args[i + 1])}); {SECRET_HOW}"
        if looks_like_key(arg):
            return f"item {i}: {mask(arg)} looks like a key or token; {SECRET_HOW}"
    return None


def secret_env_problem(env: dict[str, str]) -> str | None:
    for key, value in env.items():
        if value and _SECRET_ENV.search(key):
            return f"{key[:80]} holds a credential ({mask(value)}); {SECRET_HOW}"
        if looks_like_key(value):
            return f"the value of {key[:80]} ({mask(value)}) looks like a key or token; {SECRET_HOW}"
    return None


STARTUP_ENV = {
    # bash: read at startup of every (non-interactive too) shell, or turn tracing on with PS4 expanded
    "BASH_ENV": "bash sources the file it names before running any script (command substitution runs in it)",
    "ENV": "sh/dash (and bash in POSIX mode) source the file it names at startup",
    "SHELLOPTS": "bash turns on the options it lists at startup (xtrace with PS4 runs code)",
    "BASHOPTS": "bash turns on the shopt options it lists at startup",
    "PS4": "bash expands it (command substitution included) before every traced command",
    "PS0": "an interactive bash expands it before every command",
    "PS1": "an interactive bash expands it at every prompt",
    "PS2": "an interactive bash expands it at every continuation prompt",
    "PS3": "bash expands it for select",
    "PROMPT_COMMAND": "an interactive bash runs it before every prompt",
    "BASH_XTRACEFD": "bash redirects trace output to this file descriptor",
    "BASH_LOADABLES_PATH": "bash loads builtins (shared objects) from it",
    "BASH_COMPAT": "bash changes its parsing to an older version's",
    "IFS": "changes how every shell splits words (bash and dash reset it, older shells import it)",
    "CDPATH": "makes cd in scripts go elsewhere",
    "GLOBIGNORE": "changes what globs in scripts match",
    "EXECIGNORE": "changes which executables bash finds",
    "TMOUT": "a bash reading input exits after it",
    "HISTFILE": "an interactive bash writes its history there",
    "INPUTRC": "readline reads key bindings (that can run commands) from it",
    # glibc: what ld.so clears for setuid programs (glibc's sysdeps/generic/unsecvars.h), less LD_* (a prefix below)
    # and TMPDIR (only where temporary files go): files libc loads as code or parses as trusted data
    "GCONV_PATH": "glibc's iconv loads shared objects from it",
    "GETCONF_DIR": "glibc's getconf runs programs from it",
    "GLIBC_TUNABLES": "ld.so parses it in every program (CVE-2023-4911 turned it into code execution)",
    "HOSTALIASES": "glibc's resolver reads host aliases from the file it names",
    "LOCALDOMAIN": "glibc's resolver searches the domains it lists",
    "LOCPATH": "glibc loads locale data (parsed as trusted binary files) from it",
    "MALLOC_TRACE": "glibc's malloc writes a trace to the file it names",
    "NIS_PATH": "glibc's NIS+ lookups follow it",
    "NLSPATH": "glibc loads message catalogs (format strings) from it",
    "RESOLV_HOST_CONF": "glibc's resolver reads its host configuration from the file it names",
    "RES_OPTIONS": "glibc's resolver changes its options",
    "TZDIR": "glibc loads time zone files (parsed as trusted binary data) from it",
    # Python: interactive / startup behaviour of every python the scripts start
    "PYTHONSTARTUP": "python runs the file it names in interactive mode",
    "PYTHONINSPECT": "python enters interactive mode after the script instead of exiting",
    "PYTHONHOME": "python loads its standard library (and so all its code) from there",
}
"""Environment variables that make a shell, the dynamic loader or the interpreter run other code (or behave
differently) before widep's quoted command line matters. PYTHONPATH stays allowed: it is how vLLM plugins are
found, and it only changes what the already-trusted Python process imports, not any shell."""
STARTUP_ENV_PREFIXES = {
    "LD_": "the dynamic loader (ld.so) reads LD_* (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, ...) and loads code "
    "from it into every program; set library paths in the image or on the node instead",
    "BASH_FUNC_": "bash imports exported functions from such variables (Shellshock's vector)",
    "DYLD_": "the macOS loader's counterpart of LD_*",
}


def startup_env_problem(name: str) -> str | None:
    why = STARTUP_ENV.get(name) or next((w for p, w in STARTUP_ENV_PREFIXES.items() if name.startswith(p)), None)
    if why is None:
        return None
    return (
        f"{name[:80]!r} is refused: {why}, so it could run code in every rank's shell, pod and probe. Valid: "
        "any other variable name (for library paths use the image; for plugins PYTHONPATH)"
    )


class ModelSpec(Strict):
    """Which MoE model to serve."""

    preset: Name | None = None
    """A built-in model preset (deepseek-r1, deepseek-v3, kimi-k2, qwen3-235b-a22b, qwen3-30b-a3b,
    deepseek-v2-lite, gpt-oss-120b, mixtral-8x7b, tiny-moe)."""
    config: Name | None = None
    """Path to a local Hugging Face config.json (or a model directory) of any MoE model; relative paths
    are resolved against the topology file's directory."""
    path: Name | None = None
    """What vLLM loads: a hub id or a local directory. Default: the preset's hub id, or for tiny-moe the
    model widep builds into its cache on first use."""
    served_model_name: Name | None = None
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

    name: Annotated[str, Field(min_length=1, max_length=253), AfterValidator(_one_line), AfterValidator(_not_a_flag)]
    """Host name (what `hostname` prints there); used to find 'this node' at launch."""
    address: Name | None = None
    """IP address or DNS name other nodes reach it by. Needed to launch on several nodes."""

    @property
    def host(self) -> str:
        """What other machines connect to: the address, else the name (the one home of that rule)."""
        return self.address or self.name


class NetworkSpec(Strict):
    """How ranks on different nodes talk."""

    interface: Name | None = None
    """Socket interface for GLOO/NCCL bootstrap and NVSHMEM (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, ...)."""
    rdma: bool = True
    """InfiniBand/RoCE with GPUDirect RDMA between nodes (DeepEP internode kernels need it)."""
    hcas: list[Name] = Field(default_factory=list, max_length=64)
    """RDMA devices to use (NCCL_IB_HCA), e.g. [mlx5_0, mlx5_1]. Empty: the libraries choose."""
    ibgda: bool = True
    """Use NVSHMEM's IBGDA transport (GPU-initiated RDMA; DeepEP low-latency kernels want it)."""
    fabric: Literal["infiniband", "roce"] = "infiniband"
    """RDMA fabric between nodes; the performance model prices RoCE's expert all-to-all and KV transfer below
    InfiniBand's (widep/perf/data/calibration-published.yaml, fabric)."""
    nics_per_node: int | None = Field(default=None, ge=1, le=64)
    """RDMA NICs per node (each at the GPU catalog's per-NIC rate); None: one per GPU."""
    rdma_resource: str | None = None
    """Extended resource of the cluster's RDMA device plugin (e.g. rdma/ib, rdma/roce_gdr) that `widep lws`
    requests once per pod under a provider profile without RDMA wiring of its own (generic; coreweave and gke use
    theirs); 'none': pods reach the HCAs without a device plugin resource. Unset, `widep lws --provider generic`
    refuses a role whose DeepEP spans pods (it would start pods that cannot talk RDMA)."""


class ClusterSpec(Strict):
    """The machines a deployment may use."""

    gpu: Name = "H200"
    """GPU kind: H100, H800, H200, B200, GB200, or CPU for the vLLM CPU backend."""
    gpus_per_node: int = Field(default=8, ge=1, le=72)
    """GPUs (for CPU: rank slots, one pinned core group each) per node."""
    cpu_cores: int | None = Field(default=None, ge=1, le=4096)
    """CPU only: cores per node the rank slots share; slot s binds core s mod cpu_cores (default: a core per slot)."""
    nodes: (
        Annotated[int, Field(ge=1, le=MAX_NODES)] | Annotated[list[NodeSpec], Field(min_length=1, max_length=MAX_NODES)]
    ) = 1
    """Node count, or the nodes themselves (name and address), in rank order (1..4096)."""
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


class EPLBSpec(Strict):
    """Expert-parallel load balancing (vLLM --enable-eplb / --eplb-config)."""

    enabled: bool = False
    """Turn on EPLB (CUDA only; needs expert parallel with EP > 1)."""
    redundant_experts: Annotated[int, Field(ge=0, le=1023)] | Literal["auto"] = 0
    """Extra physical expert replicas; (routed + redundant) must divide by EP. 'auto' (vLLM >= 0.34): vLLM picks the
    minimum that makes the split even (EPLBConfig.num_redundant_experts left unset); the plan shows that number."""
    window_size: int = Field(default=1000, gt=0, le=1_000_000_000)
    """Steps of expert load statistics EPLB looks back over."""
    step_interval: int = Field(default=3000, gt=0, le=1_000_000_000)
    """Steps between rebalances."""
    log_balancedness: bool = False
    """Log the balancedness metric."""


class DBOSpec(Strict):
    """Dual batch overlap: two micro-batches so all-to-all overlaps compute."""

    enabled: bool = False
    """--enable-dbo (needs a DeepEP or nixl_ep all2all backend on CUDA)."""
    decode_token_threshold: int = Field(default=32, ge=2, le=16_777_216)
    """Decode-only batches above this many tokens are split (--dbo-decode-token-threshold)."""
    prefill_token_threshold: int = Field(default=512, ge=2, le=16_777_216)
    """Batches with a prefill above this many tokens are split (--dbo-prefill-token-threshold)."""


class FaultToleranceSpec(Strict):
    """vLLM's engine fault tolerance (--enable-fault-tolerance): a faulted engine waits for an instruction instead of
    taking its DP group down. Needs per-rank API servers (serving.dp_mode: external)."""

    enabled: bool = False
    """--enable-fault-tolerance (vLLM 0.20-0.39; read in the 0.32, 0.33 and 0.34 wheels)."""
    engine_recovery_timeout_s: int = Field(default=120, ge=1, le=86400)
    """How long a faulted engine waits for the instruction before it raises the original error
    (--fault-tolerance-config engine_recovery_timeout_sec)."""
    on_fault: Literal["retry", "scale_down"] = "retry"
    """The instruction the orchestrator sends to the recovery API: 'retry' re-forms the DP group at the same size;
    'scale_down' drops the faulted ranks (vLLM >= 0.34). The plan names the API path of the version."""


class ElasticEPSpec(Strict):
    """vLLM's elastic EP: the DP/EP width of a running group changes (POST /scale_elastic_ep)."""

    enabled: bool = False
    """--enable-elastic-ep (needs eplb.enabled; not with serving.dp_mode hybrid; behind per-rank API servers, i.e.
    dp_mode external or multiport, only from vLLM 0.33)."""
    max_dp_size: int | None = Field(default=None, ge=1, le=65536)
    """The widest the group may grow (--elastic-ep-max-dp-size), at least its DP size. Default: vLLM's (the DP size)."""


class RoleSpec(Strict):
    """One DP group kind: prefill, decode, or mixed (both). Each role is its own DP/EP group."""

    name: str = Field(pattern=r"^[a-z]([-a-z0-9]{0,30}[a-z0-9])?$")
    """Role name (lower-case DNS label): used in logs, ports table and manifest names."""
    kind: RoleKind = "mixed"
    """prefill, decode, or mixed (serves whole requests)."""
    nodes: (
        Annotated[int, Field(ge=1, le=MAX_NODES)]
        | Annotated[
            list[Annotated[str, AfterValidator(_one_line), AfterValidator(_not_a_flag)] | Annotated[int, Field(ge=0)]],
            Field(min_length=1, max_length=MAX_NODES),
        ]
    ) = 1
    """Nodes per DP group: a count (taken in order from the nodes no earlier role uses), or node names/indices."""
    gpus_per_node: int | None = Field(default=None, ge=1, le=72)
    """GPUs this role uses on each of its nodes. Default: all of cluster.gpus_per_node."""
    first_gpu: int = Field(default=0, ge=0, le=71)
    """Index of the first GPU this role uses on each node (to share a node between roles)."""
    replicas: int = Field(default=1, ge=1, le=MAX_NODES)
    """Independent copies of this DP group (each on its own nodes)."""
    recovery: RecoveryPolicy = "group"
    """What the death of one rank (API server, engine core or node) costs. group: the whole DP group is SIGKILLed
    at once and restarted in step, and the router retries requests that got no first token until a group answers
    again; surgical: the survivors keep serving at reduced width while a replacement rank joins (vLLM's elastic
    EP) - refused with vLLM 0.32 behind per-rank API servers (`widep plan` says why)."""
    tp: int = Field(default=1, ge=1, le=72)
    """Tensor-parallel size inside each DP rank (attention); EP = DP x TP."""
    expert_parallel: bool = True
    """Shard experts over the EP group (--enable-expert-parallel). Off: experts are TP-sharded like dense layers."""
    all2all_backend: All2AllBackend | None = None
    """MoE all-to-all: deepep_low_latency (decode), deepep_high_throughput (prefill), allgather_reducescatter,
    deepep_v2, nixl_ep, moonep, mori (vLLM >= 0.34), mori_high_throughput / mori_low_latency (deprecated in 0.34),
    flashinfer_nvlink_one_sided / _two_sided, pplx and naive (vLLM <= 0.19); `widep plan` says which the version
    runs. Default: deepep_low_latency for decode, deepep_high_throughput for prefill and mixed on GPUs;
    allgather_reducescatter on CPU."""
    eplb: EPLBSpec = Field(default_factory=EPLBSpec)
    """Expert load balancing and redundant experts."""
    dbo: DBOSpec = Field(default_factory=DBOSpec)
    """Dual batch overlap."""
    fault_tolerance: FaultToleranceSpec = Field(default_factory=FaultToleranceSpec)
    """vLLM's engine fault tolerance (off by default)."""
    elastic_ep: ElasticEPSpec = Field(default_factory=ElasticEPSpec)
    """vLLM's elastic EP (off by default)."""
    deep_gemm: bool = True
    """Use DeepGEMM FP8 kernels (VLLM_USE_DEEP_GEMM; --moe-backend deep_gemm where available)."""
    max_num_seqs: int = Field(default=256, ge=1, le=1_048_576)
    """Max concurrent sequences per DP rank."""
    max_num_batched_tokens: int | None = Field(default=None, ge=1, le=16_777_216)
    """Max tokens per step per DP rank. Default: vLLM's (8192 for prefill-capable roles here)."""
    max_model_len: int | None = Field(default=None, ge=16, le=16_777_216)
    """Max context length. Default: the model's max_position_embeddings capped at 32768."""
    context_len: int | None = Field(default=None, ge=1, le=16_777_216)
    """Context length used for the 'concurrent sequences' capacity figure. Default: max_model_len."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=0.99)
    """Fraction of each GPU's memory vLLM may use (--gpu-memory-utilization)."""
    kv_cache_gib: float | None = Field(default=None, gt=0.0, le=65536.0)
    """Fixed KV cache per rank in GiB (--kv-cache-memory-bytes; VLLM_CPU_KVCACHE_SPACE on CPU). Default on
    GPUs: what is left under gpu_memory_utilization; on CPU: 1 GiB."""
    enforce_eager: bool = False
    """Disable CUDA graphs (--enforce-eager)."""
    block_size: int | None = Field(default=None, ge=1, le=4096)
    """KV cache block size in tokens (--block-size). Default: vLLM's for the backend. P/D: prefill and decode
    roles must agree (NIXL moves whole blocks)."""
    kv_cache_dtype: KVDType | None = None
    """KV cache precision of this role, overriding model.kv_cache_dtype. P/D: prefill and decode must agree."""
    nixl_side_channel_port: int | None = Field(default=None, ge=1, le=65535)
    """P/D: base NIXL side-channel port of this role on each node (VLLM_NIXL_SIDE_CHANNEL_PORT; DP rank r
    listens on base + r). Default: serving.nixl_side_channel_port. Roles sharing a node need disjoint ranges."""
    port: int | None = Field(default=None, ge=1, le=65535)
    """First HTTP port of this role on each node. Default: serving.port."""
    rpc_port: int | None = Field(default=None, ge=1, le=65535)
    """DP handshake port on this group's leader (--data-parallel-rpc-port). Default: serving.rpc_port."""
    extra_args: list[Arg] = Field(default_factory=list, max_length=1024)
    """More vLLM arguments, appended verbatim (flags widep owns are refused)."""
    extra_env: dict[EnvName, Arg] = Field(default_factory=dict, max_length=1024)
    """More environment variables for every rank (variables widep owns are refused)."""

    @field_validator("extra_args")
    @classmethod
    def _args_no_secret(cls, v: list[str]) -> list[str]:
        problem = secret_args_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("extra_env")
    @classmethod
    def _env_no_secret(cls, v: dict[str, str]) -> dict[str, str]:
        problem = next((p for k in v if (p := startup_env_problem(k))), None) or secret_env_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class SecretRef(Strict):
    """Where a secret comes from, per target: an environment variable on bare metal / Ray, a key of a
    Kubernetes Secret in manifests. Never the secret itself."""

    env: Annotated[str, AfterValidator(_not_a_key), AfterValidator(_env_name)] | None = None
    """Environment variable holding it where `widep launch` (and `render --format shell`) run. Default: the
    variable widep sets (VLLM_API_KEY, HF_TOKEN), passed through."""
    secret: Annotated[str, AfterValidator(_not_a_key)] | None = None
    """Kubernetes Secret holding it (a DNS-1123 subdomain: lower-case letters, digits, '-', '.');
    `widep lws` needs it."""
    key: Annotated[str, AfterValidator(_not_a_key)] | None = None
    """Key inside the Secret's data ([-._a-zA-Z0-9]+). Default: api-key for the API key, token for the HF token."""

    @field_validator("secret")
    @classmethod
    def _secret_name(cls, v: str | None) -> str | None:
        if v is not None and (len(v) > 253 or not _K8S_SECRET.match(v)):
            raise ValueError(
                f"not a Kubernetes Secret name. Given: {v!r}. Valid: a DNS-1123 subdomain (lower-case letters, digits, "
                "'-' and '.', at most 253), e.g. vllm-api-key"
            )
        return v

    @field_validator("key")
    @classmethod
    def _secret_key(cls, v: str | None) -> str | None:
        if v is not None and (len(v) > 253 or not _K8S_SECRET_KEY.match(v)):
            raise ValueError(f"not a Secret data key. Given: {v!r}. Valid: [-._a-zA-Z0-9]+ (at most 253), e.g. api-key")
        return v

    @model_validator(mode="before")
    @classmethod
    def _plain_string(cls, data: Any) -> Any:
        """The old form: one name. A valid variable name is the variable (and, when it is also a valid Secret
        name, the Secret too); a valid Secret name that no shell can expand is the Secret; anything else fails."""
        if not isinstance(data, str):
            return data
        _not_a_key(data)
        is_env = POSIX_NAME.match(data) is not None
        is_secret = len(data) <= 253 and _K8S_SECRET.match(data) is not None
        if is_env:
            return {"env": data, "secret": data if is_secret else None}
        if is_secret:
            return {"secret": data}
        raise ValueError(
            f"{data!r} is neither an environment variable name ([A-Za-z_][A-Za-z0-9_]*) nor a Kubernetes Secret name "
            "(DNS-1123 subdomain). Valid: a mapping naming each, e.g. "
            "{env: MY_VLLM_KEY, secret: vllm-api-key, key: api-key}"
        )

    @model_validator(mode="after")
    def _some_source(self) -> SecretRef:
        if self.env is None and self.secret is None and self.key is None:
            raise ValueError("give env (a variable name), secret (a Kubernetes Secret name), or both.")
        return self


class ServingSpec(Strict):
    """How ranks are exposed."""

    dp_mode: DPMode = "external"
    """external: one API server per DP rank (default); hybrid: one per node; internal: one for the group
    (headless workers); multiport: vLLM's DP supervisor per node starts one API server per local rank."""
    host: Name = "0.0.0.0"
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
    """P/D: base of NIXL side-channel ports (VLLM_NIXL_SIDE_CHANNEL_PORT); DP rank r listens on base + r."""
    record_routed_experts: bool = False
    """Start every rank with vLLM's --enable-return-routed-experts: completion responses carry the expert ids each
    token was routed to, which `widep experts record` aggregates into an expert-load file (vLLM 0.3x)."""
    kv_load_failure_policy: Literal["fail", "recompute"] = "fail"
    """P/D: what a decode rank does when pulling a request's KV from prefill fails (kv_transfer_config):
    'fail' ends that request with an error (llm-d's choice; the client or router retries the whole request),
    'recompute' prefills the missing blocks on the decode rank itself."""
    api_key_secret: SecretRef | None = None
    """Where the API key is: {env: VARIABLE} on bare metal, {secret: NAME, key: KEY} for Kubernetes (or both);
    a plain name is read as the variable and/or Secret it can be. Passed by reference, never printed."""
    hf_token_secret: SecretRef | None = None
    """Where the Hugging Face token is ({env, secret, key} as for api_key_secret); passed by reference."""


class VLLMSpec(Strict):
    """Which vLLM runs the ranks and how it is started."""

    version: Annotated[Name, AfterValidator(_version)] = DEFAULT_VLLM_VERSION
    """vLLM version the commands are rendered for (0.10.x, 0.11-0.19, 0.20-0.32, 0.33, 0.34-0.39): MAJOR.MINOR or
    MAJOR.MINOR.PATCH, the latter optionally with a PEP 440 pre/post/dev release and a local label
    (0.32.0rc1, 0.32.1.post1, 0.32.0+cpu). Anything else (0.32.banana, 0.32.0.1) is refused. Default: the newest
    stable line (0.34.0) on GPUs, the installed CPU build's line (0.32.0) when cluster.gpu is CPU."""
    entry_point: Literal["serve", "module"] = "serve"
    """'serve': `vllm serve MODEL ...`; 'module': `python -m vllm.entrypoints.openai.api_server --model MODEL`."""
    python: Name = "python"
    """Interpreter for the module entry point."""
    image: Name = f"vllm/vllm-openai:v{DEFAULT_VLLM_VERSION}"
    """Container image for Kubernetes manifests. Default: vllm/vllm-openai at the version given or defaulted
    (v0.34.0 on GPUs; v0.32.0 for CPU topologies), for MAJOR.MINOR.PATCH versions; else v0.34.0."""
    ready_timeout_s: int = Field(default=1800, ge=10, le=604800)
    """How long a rank may take to answer /health before it counts as failed."""


class ProfilerSpec(Strict):
    """vLLM's torch profiler, rendered into every rank's command (captured with `widep profile`)."""

    enabled: bool = False
    """Render the profiler config (--profiler-config on vLLM >= 0.20, VLLM_TORCH_PROFILER_DIR before)."""
    dir: Name = "/tmp/widep-profiles"
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


RouterPolicy = Literal[
    "random", "round_robin", "cache_aware", "kv_aware", "power_of_two", "consistent_hash", "sticky_least_loaded"
]


class RouterSpec(Strict):
    """One front door for the whole deployment: vllm-router in front of every API server."""

    enabled: bool = False
    """Start vllm-router on `node` once the ranks it fronts are healthy (also `widep launch --router`)."""
    node: Annotated[int, Field(ge=0)] | Name = 0
    """Node that hosts the router (index or name in cluster.nodes)."""
    host: Name = "0.0.0.0"
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
    "P/D hand-off in the router (--vllm-pd-disaggregation): auto = on when the topology has prefill and decode roles."
    health_check_interval_s: int = Field(default=5, ge=1, le=86400)
    """Seconds between the router's health checks of each server (--health-check-interval-secs)."""
    health_failure_threshold: int = Field(default=2, ge=1, le=1000)
    """Failed checks before the router stops sending to a server (--health-failure-threshold). With one DP group
    widep keeps its servers in rotation (requests to the restarting group are retried, not answered 503)."""
    retry_window_s: int = Field(default=180, ge=0, le=3600)
    """How long the router keeps retrying a request that got no first token (dead rank, group restarting), with
    backoff 0.1 -> 2 s (--retry-max-retries); 0: no retries. Cover a group's cold start so nothing is lost."""
    command: Name = "vllm-router"
    """The router executable."""
    extra_args: list[Arg] = Field(default_factory=list, max_length=1024)
    """More vllm-router arguments, appended verbatim."""

    @field_validator("extra_args")
    @classmethod
    def _args_no_secret(cls, v: list[str]) -> list[str]:
        problem = secret_args_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class TopologySpec(Strict):
    """A whole deployment: a model on a cluster, split into roles."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
    """Deployment name (DNS-1123 label): used in run directories and manifest names."""
    description: Annotated[str, Field(max_length=4096), AfterValidator(_free_text)] = ""
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

    @model_validator(mode="before")
    @classmethod
    def _default_vllm_version(cls, data: Any) -> Any:
        """vllm.version (and vllm.image) left out: the newest stable line on GPUs, the CPU build's line on CPU."""
        if not isinstance(data, dict):
            return data
        vllm = data.get("vllm", {})
        cluster = data.get("cluster", {})
        if not isinstance(vllm, dict) or not isinstance(cluster, dict) or ("version" in vllm and "image" in vllm):
            return data
        gpu = cluster.get("gpu", "H200")
        device = "cuda"
        if isinstance(gpu, str):
            try:
                device = get_gpu(gpu).device
            except UserError:
                pass  # an unknown kind: cluster.gpu's own check names it (the planner)
        vllm = dict(vllm)
        vllm.setdefault("version", default_version(device))
        version = vllm["version"]
        if "image" not in vllm and isinstance(version, str) and re.fullmatch(r"\d+\.\d+\.\d+", version):
            repo = "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo" if device == "cpu" else "vllm/vllm-openai"
            vllm["image"] = f"{repo}:v{version}"
        return {**data, "vllm": vllm}

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


def _is_tag(part: Any) -> bool:
    """A pydantic union-member tag ('constrained-int', 'list[NodeSpec]', 'function-after[...]'), not a field."""
    return (
        isinstance(part, str)
        and part != "[key]"
        and ("[" in part or "-" in part or part in ("int", "str", "bool", "float", "list", "dict", "none"))
    )


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def _loc(loc: tuple[Any, ...], data: Any) -> str:
    """'roles[0].all2all_backend' from a pydantic location, without pydantic's union-member tags."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":  # pydantic's marker: the error is about the mapping key itself (said in the message)
            continue
        else:
            if _is_tag(part) and not (isinstance(node, dict) and part in node):
                continue
            if not _PLAIN_KEY.match(str(part)):
                out += f"[{str(part)!r}]"  # a key of extra_env etc. that is not a plain name: shown escaped
            else:
                out += f".{part}" if out else str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return out or "(top level)"


def _branch_fits(tag: str, value: Any) -> bool:
    """Whether a union member (by its tag) is the one meant for ``value``'s YAML type."""
    if isinstance(value, bool):
        return tag == "bool"
    if isinstance(value, list):
        return tag.startswith("list")
    if isinstance(value, dict):
        return not (tag.startswith(("list", "constrained-int", "int", "str", "function-after")))
    if isinstance(value, int):
        return tag in ("int", "constrained-int")
    if isinstance(value, str):
        return tag == "str" or tag.startswith(("function-after", "constrained-str", "literal["))
    return False


def _value_at(data: Any, loc: tuple[Any, ...]) -> Any:
    node = data
    for part in loc:
        if _is_tag(part) and not (isinstance(node, dict) and part in node):
            continue
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _union_errors(errors: list[Any], data: Any) -> list[Any]:
    """One error per problem: of the errors a union produced, those of the member meant for the value's type;
    when no member is meant for it, one 'wrong type' error at the union's own location."""
    out: list[Any] = []
    wrong: set[tuple[Any, ...]] = set()
    for e in errors:
        loc = e["loc"]
        keep = True
        for i, part in enumerate(loc):
            value = _value_at(data, loc[:i])
            if not _is_tag(part) or (isinstance(value, dict) and part in value):
                continue
            siblings = {str(x["loc"][i]) for x in errors if len(x["loc"]) > i and x["loc"][:i] == loc[:i]}
            if any(_branch_fits(t, value) for t in siblings):
                if not _branch_fits(str(part), value):
                    keep = False
                    break
            else:
                keep = False
                if loc[:i] not in wrong:
                    wrong.add(loc[:i])
                    out.append(
                        {
                            "loc": loc[:i],
                            "type": "union_type",
                            "input": value,
                            "msg": f"has the wrong type ({type(value).__name__})",
                        }
                    )
                break
        if keep:
            out.append(e)
    return out


LIMITS = {
    "nodes": "widep plans at most 4096 nodes per deployment (a DP/EP group cannot usefully span more: EP is bounded "
    "by the model's experts)",
    "gpus_per_node": "the largest GPU node / NVLink domain (GB200 NVL72) has 72 GPUs",
    "first_gpu": "a node has at most 72 GPUs",
    "tp": "tensor parallelism stays inside one node (at most 72 GPUs)",
    "replicas": "each replica needs its own nodes (at most 4096)",
    "kv_cache_gib": "no accelerator has more than 64 TiB of memory",
    "redundant_experts": "vLLM's EPLB bounds redundant experts",
}


def _range_message(e: Any, field: str) -> str | None:
    ctx = e.get("ctx") or {}
    bound = {
        "greater_than_equal": ("ge", ">="),
        "greater_than": ("gt", ">"),
        "less_than_equal": ("le", "<="),
        "less_than": ("lt", "<"),
    }.get(e["type"])
    if bound is None:
        return None
    limit = ctx.get(bound[0])
    why = f" ({LIMITS[field]})" if field in LIMITS and bound[1].startswith("<") else ""
    return f"{e.get('input')!r} is out of range. Valid: {bound[1]} {limit}{why}."


_TYPE_WANTED = {
    "int_type": 'an integer written as digits (YAML true/false, 2.0 and "2" are not integers)',
    "float_type": "a number (YAML true/false and quoted strings are not numbers)",
    "string_type": 'a string (quote it in YAML if it looks like a number, date or boolean, e.g. "0.32")',
    "bool_type": "true or false",
}


def _yaml_type(value: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null (empty)"}
    return kinds.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    """A value for a message: repr, masked when it looks like a credential, shortened when long."""
    if isinstance(value, str) and looks_like_key(value):
        return mask(value)
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "...(" + str(len(text)) + " characters)"


def mask(value: str) -> str:
    """What a message may show of a credential: its first 3 characters (the token kind, e.g. hf_ / sk-)."""
    return f"'{value[:3]}***' (masked)"


def _mask_keys(msg: str, given: Any) -> str:
    """``msg`` with any credential-looking value (the given one, or a quoted word in it) masked."""
    if isinstance(given, str) and given and looks_like_key(given):
        msg = msg.replace(repr(given), mask(given)).replace(given, mask(given))
    for word in re.findall(r"'([^'\s]{16,})'", msg):
        if looks_like_key(word):
            msg = msg.replace(f"'{word}'", mask(word))
    return msg


def _format_validation_error(err: ValidationError, data: Any, source: str) -> str:
    lines = []
    seen = set()
    for e in _union_errors(err.errors(), data):
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
        elif _range_message(e, str(path.rsplit(".", 1)[-1]).split("[")[0]):
            msg = str(_range_message(e, str(path.rsplit(".", 1)[-1]).split("[")[0]))
        elif e["type"] in _TYPE_WANTED and not isinstance(given, (dict, list)):
            msg = f"{_shown(given)} is a {_yaml_type(given)}. Valid: {_TYPE_WANTED[e['type']]}."
        else:
            m = e["msg"]
            m = m[len("Value error, ") :] if m.startswith("Value error, ") else m
            msg = f"{m}" + (f" Given: {given!r}." if not isinstance(given, (dict, list)) and "Given" not in m else "")
        if e["loc"] and e["loc"][-1] == "[key]":
            msg = "the key (not its value) is wrong: " + msg
        lines.append(f"{path}: {_mask_keys(msg, given)}")
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
            return model if _is_tag(part) else None  # a union member's tag: same model
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


#: A credential with a known prefix anywhere inside a text (a description, a model path): the prefix, then a long tail.
_TOKEN_IN_TEXT = re.compile(
    r"(?<![A-Za-z0-9])((?:sk-|sk_|hf_|ghp_|gho_|ghs_|github_pat_|xox[abprs]-|glpat-|AKIA)[A-Za-z0-9_-]{16,}"
    r"|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})"
)


def _token_anywhere(data: Any, path: str = "") -> tuple[str, str] | None:
    """(field path, token) of the first credential with a known prefix in any string (key or value) of the
    document: the per-field checks cover env, args and Secret names; this covers every other field (issue 32)."""
    items: Any = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        here = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        for text in (key, value):
            if isinstance(text, str) and (m := _TOKEN_IN_TEXT.search(text)):
                return here, m.group(1)
        if isinstance(value, dict | list) and (found := _token_anywhere(value, here)):
            return found
    return None


def parse_topology(data: Any, source: str = "") -> TopologySpec:
    """Validate a topology document (already parsed YAML); UserError listing every problem."""
    if not isinstance(data, dict):
        raise UserError(f"invalid topology {source}: the document must be a mapping, got {type(data).__name__}.")
    try:
        spec = TopologySpec.model_validate(data)
        found = _token_anywhere(data)
        if found:
            raise UserError(
                f"invalid topology {source}: {found[0]}: contains a credential ({mask(found[1])}); no field of a "
                f"topology may carry one, and widep writes most of them into scripts, manifests and logs: "
                f"{SECRET_HOW}"
            )
        return spec
    except ValidationError as err:
        raise UserError(_format_validation_error(err, data, source)) from None
    except RecursionError:
        raise UserError(f"invalid topology {source}: nested too deeply.") from None


def load_topology(path: str | Path) -> TopologySpec:
    """Read and validate a topology YAML file. Relative model.config paths resolve against its folder."""
    from widep.spec.safeyaml import MAX_TOPOLOGY_BYTES, load_yaml, read_text

    p = Path(path)
    data = load_yaml(read_text(p, "topology", max_bytes=MAX_TOPOLOGY_BYTES), f"topology {str(p)[:200]!r}")
    spec = parse_topology(data, str(p))
    if spec.model.config and not Path(spec.model.config).is_absolute():
        resolved = str((p.parent / spec.model.config).resolve())
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"config": resolved})})
    return spec
