"""Calibration of the analytic performance model: every efficiency and kernel figure, as data.

Two sources:

* ``widep/perf/data/calibration-published.yaml`` (format ``widep-perf-calibration/1``): published
  kernel tables (DeepEP, pplx-kernels, DeepGEMM, FlashMLA) and datasheet fractions; the default.
* GPU measurements, ``profiling/results/calibration-<card>x<N>.json`` (format ``widep-calibration/1``,
  written by ``profiling/gpu/make_calibration.py``, documented at its top). Loading one starts from the
  published calibration and replaces what the microbenchmarks measured: HBM streaming and paged-KV read
  efficiency, dense FP8/BF16 GEMM efficiency, the grouped-GEMM curve (rows per expert -> fraction of
  peak) and, when DeepEP itself ran, its intranode all-to-all. Measured fractions are relative to the
  datasheet of the card they were measured on and are applied to other GPUs as fractions.

:func:`load_calibration` takes ``"published"``, a path to either format, or ``"auto:<GPU>"`` (the
newest measured file for that GPU kind under ``profiling/results``, else the published one).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from widep.errors import UserError
from widep.perf.kernels import ExpertGemm, MoePhases, parse_expert_gemm, parse_moe_phases

FORMAT = "widep-perf-calibration/1"
MEASURED_FORMAT = "widep-calibration/1"
BytesModel = Literal["expert_copy", "rank_copy", "node_copy", "gather"]
HARDWARE_FIELDS = ("hbm_tbps", "bf16_tflops", "fp8_tflops", "fp4_tflops", "nvlink_gbps", "nic_gbps")


@dataclass(frozen=True)
class A2ATable:
    """All-to-all figures of one backend: time = latency + bytes / bandwidth (per layer, per micro-batch)."""

    backend: str
    bytes_model: BytesModel
    """How many bytes a GPU sends per token: see the calibration file's a2a comment."""
    latency_us: float
    intranode_dispatch_gbps: float
    """Bandwidth when the EP group fits in one node (NVLink), at the reference GPU's NVLink."""
    intranode_combine_gbps: float
    internode_ep: tuple[int, ...]
    """EP sizes of the internode table (interpolated in log2 EP, held flat beyond the ends)."""
    internode_dispatch_gbps: tuple[float, ...]
    internode_combine_gbps: tuple[float, ...]
    source: str = ""

    def internode_gbps(self, ep: Any, which: str) -> Any:
        """Internode bandwidth at EP size(s) ``ep`` (numpy-friendly)."""
        import numpy as np

        ys = self.internode_dispatch_gbps if which == "dispatch" else self.internode_combine_gbps
        return np.interp(
            np.log2(np.maximum(ep, 1)), np.log2(np.asarray(self.internode_ep, float)), np.asarray(ys, float)
        )


@dataclass(frozen=True)
class Calibration:
    """Every number the step-time model multiplies by (see the published YAML for sources)."""

    name: str
    description: str
    source: str
    """File it was read from ('builtin' for the packaged one)."""
    ref_gpu: str
    ref_nvlink_gbps: float
    ref_nic_gbps: float
    hbm_weights_efficiency: float
    hbm_kv_read_efficiency: float
    activation_bytes_per_hidden: float
    gemm_fp8_efficiency: float
    gemm_bf16_efficiency: float
    gemm_block_m: int
    roofline_p: float
    grouped_curve: tuple[tuple[float, float], ...]
    """Measured (rows per expert, fraction of dense peak) of grouped expert GEMMs; empty: not measured."""
    grouped_curve_dtype: str
    attention_decode_efficiency: float
    attention_prefill_efficiency: float
    kernels_per_layer: int
    kernel_gap_full_graph_us: float
    kernel_gap_piecewise_us: float
    kernel_gap_eager_us: float
    host_step_us: float
    host_per_seq_us: float
    graph_max_tokens: int
    tp_allreduce_per_layer: int
    tp_allreduce_latency_us: float
    tp_allreduce_nvlink_efficiency: float
    routing_stat_coef: float
    routing_skew_no_eplb: float
    routing_skew_eplb: float
    routing_redundant_relief: float
    spec_acceptance: float
    kv_transfer_nic_efficiency: float
    kv_transfer_latency_us: float
    a2a: tuple[A2ATable, ...]
    overlap_efficiency: float = 0.9
    dbo_vllm_efficiency: float = 0.9
    roce_a2a_efficiency: float = 1.0
    """Internode expert all-to-all bandwidth on RoCE over the InfiniBand figures of the a2a tables."""
    roce_kv_efficiency: float = 1.0
    """KV-transfer bandwidth on RoCE over InfiniBand."""
    """Share of the hideable all-to-all wire time that vLLM's DBO (thread per micro-batch, yield at the
    receive hook) hides behind the other micro-batch's phase; other schedules use overlap_efficiency."""
    """Fraction of the all-to-all wire time a compute phase of the other micro-batch can hide."""
    a2a_sm_fraction_nvlink: float = 0.75
    """Share of an intranode (NVLink) all-to-all that is SM copy work, never hidden by overlap."""
    a2a_sm_fraction_rdma: float = 0.15
    """Share of an internode (RDMA) all-to-all that is SM work (send/receive kernels)."""
    comm_sms_normal: float = 24.0
    """SMs DeepEP's normal (high-throughput) kernels hold while they run (DeepEP default Buffer.num_sms)."""
    dp_imbalance_random: float = 1.0
    """Busiest DP rank over the mean: 1 + coef * sqrt(2 ln(ranks) / requests per rank), random spreading."""
    dp_imbalance_balanced: float = 0.3
    """Same coefficient when a DP-aware balancer spreads requests (a load-aware router over per-rank servers)."""
    dp_imbalance_internal: float = 0.8
    """Same coefficient for vLLM's internal DP load balancer (hybrid / internal dp_mode): least-loaded on queue
    counts its coordinator publishes at intervals, so placements between two publishes see stale counts."""
    routing_seq_corr: float = 0.0
    """Correlation of the expert choices of two tokens of one sequence: the expert-load statistics of a batch count
    sequences, not tokens, as independent draws (variance x (1 - rho + rho x tokens per sequence))."""
    spec_draft_us: float = 400.0
    """Host and launch time of one MTP draft pass (a separate forward of the draft layer) per step."""
    request_overhead_us: float = 0.0
    """API-server time per request before its first step, serialised per server (widep calibrate fits it)."""
    expert_gemm: ExpertGemm | None = None
    """Kernel-true DeepGEMM expert GEMM terms (widep/perf/kernels.py); None: the roofline of ``gemm``."""
    moe_phases: MoePhases | None = None
    """Non-GEMM MoE phases (route, permute, act, reduce); None: only the lumped activation traffic."""
    hardware: dict[str, dict[str, float]] = field(default_factory=dict, hash=False)
    """Measured figures that replace a hardware kind's datasheet ones: {kind: {hbm_tbps, bf16_tflops, ...}}."""
    measured: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """What a GPU calibration file replaced, and on which card (empty for the published one)."""

    def gpu_for(self, gpu: Any) -> Any:
        """``gpu`` with this calibration's measured figures for its kind (unchanged when it has none)."""
        over = self.hardware.get(gpu.name)
        if not over:
            return gpu
        return replace(gpu, **{k: float(v) for k, v in over.items() if k in HARDWARE_FIELDS})

    def a2a_for(self, backend: str) -> A2ATable:
        for t in self.a2a:
            if t.backend == backend:
                return t
        raise UserError(
            f"all2all_backend: the calibration {self.name!r} has no all-to-all figures for {backend!r}, so its "
            f"performance cannot be predicted. Valid: {', '.join(self.backends)}."
        )

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(t.backend for t in self.a2a)

    def fingerprint(self) -> str:
        """A short hash of every figure: a sweep result is reused only under the same calibration."""
        d = asdict(self)
        d.pop("source", None)
        d.pop("measured", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "fingerprint": self.fingerprint(), "measured": self.measured}


# ---------------------------------------------------------------------------------------------------------
# Loading


def _need(doc: dict[str, Any], path: str, src: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UserError(
                f"calibration {src}: missing {path!r}. Valid: a {FORMAT} document like "
                "widep/perf/data/calibration-published.yaml."
            )
        node = node[part]
    return node


def _num(doc: dict[str, Any], path: str, src: str, lo: float = 0.0, hi: float = math.inf) -> float:
    v = _need(doc, path, src)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= float(v) <= hi):
        raise UserError(f"calibration {src}: {path} must be a number in [{lo}, {hi}]. Given: {v!r}.")
    return float(v)


def _a2a_table(name: str, d: dict[str, Any], src: str) -> A2ATable:
    where = f"a2a.{name}"
    if not isinstance(d, dict):
        raise UserError(f"calibration {src}: {where} must be a mapping. Given: {d!r}.")
    model = d.get("bytes_model")
    if model not in ("expert_copy", "rank_copy", "node_copy", "gather"):
        raise UserError(
            f"calibration {src}: {where}.bytes_model {model!r} is not valid. Valid: expert_copy, rank_copy, node_copy, "
            "gather."
        )
    lat = _num(d, "latency_us", f"{src} {where}")
    ref_tokens = d.get("ref_tokens")
    top_k = d.get("top_k", 8)
    per_copy = {"dispatch": 7392.0, "combine": 14336.0}  # DeepSeek-V3 hidden 7168: FP8 + scales / BF16

    def to_gbps(section: dict[str, Any], which: str, ep: Any = None) -> Any:
        key_us, key_bw = f"{which}_us", f"{which}_gbps"
        if key_bw in section:
            return section[key_bw]
        if key_us not in section:
            raise UserError(f"calibration {src}: {where} needs {key_bw} or {key_us}. Given keys: {sorted(section)}.")
        if not ref_tokens or model != "expert_copy":
            raise UserError(
                f"calibration {src}: {where}: times ({key_us}) need ref_tokens and bytes_model expert_copy."
            )
        us = section[key_us]
        byts = float(ref_tokens) * float(top_k) * per_copy[which]

        def one(t: float) -> float:
            if t <= lat:
                raise UserError(f"calibration {src}: {where}.{key_us} {t} must exceed latency_us {lat}.")
            return byts / ((t - lat) * 1e-6) / 1e9

        return [one(float(t)) for t in us] if isinstance(us, list) else one(float(us))

    intra = d.get("intranode") or {}
    inter = d.get("internode") or {}
    eps = inter.get("ep") or []
    disp = to_gbps(inter, "dispatch") if eps else []
    comb = to_gbps(inter, "combine") if eps else []
    if not (len(eps) == len(disp) == len(comb)) or not eps:
        raise UserError(
            f"calibration {src}: {where}.internode needs equal-length ep and dispatch/combine lists. Given: {inter!r}."
        )
    return A2ATable(
        backend=name,
        bytes_model=model,
        latency_us=lat,
        intranode_dispatch_gbps=float(to_gbps(intra, "dispatch")),
        intranode_combine_gbps=float(to_gbps(intra, "combine")),
        internode_ep=tuple(int(e) for e in eps),
        internode_dispatch_gbps=tuple(float(x) for x in disp),
        internode_combine_gbps=tuple(float(x) for x in comb),
        source=str(d.get("source", "")),
    )


def parse_calibration(doc: Any, source: str) -> Calibration:
    """A :class:`Calibration` from a ``widep-perf-calibration/1`` document; UserError naming the bad field."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise UserError(
            f"calibration {source}: format {got!r} is not {FORMAT!r}. Valid: {FORMAT} (YAML/JSON) or {MEASURED_FORMAT} "
            "(GPU measurements)."
        )
    s = source
    gaps = _need(doc, "overheads.kernel_gap_us", s)
    curve = doc.get("gemm", {}).get("grouped_curve") or {}
    a2a = _need(doc, "a2a", s)
    if not isinstance(a2a, dict) or not a2a:
        raise UserError(f"calibration {s}: a2a must map backend names to tables. Given: {a2a!r}.")
    return Calibration(
        name=str(doc.get("name", Path(source).stem)),
        description=str(doc.get("description", "")),
        source=source,
        ref_gpu=str(_need(doc, "ref_link.gpu", s)),
        ref_nvlink_gbps=_num(doc, "ref_link.nvlink_gbps", s, 1e-3),
        ref_nic_gbps=_num(doc, "ref_link.nic_gbps", s, 1e-3),
        hbm_weights_efficiency=_num(doc, "hbm.weights_efficiency", s, 1e-3, 1.0),
        hbm_kv_read_efficiency=_num(doc, "hbm.kv_read_efficiency", s, 1e-3, 1.0),
        activation_bytes_per_hidden=_num(doc, "hbm.activation_bytes_per_hidden", s),
        gemm_fp8_efficiency=_num(doc, "gemm.fp8_efficiency", s, 1e-3, 1.0),
        gemm_bf16_efficiency=_num(doc, "gemm.bf16_efficiency", s, 1e-3, 1.0),
        gemm_block_m=int(_num(doc, "gemm.block_m", s, 1)),
        roofline_p=_num(doc, "gemm.roofline_p", s, 1.0, 64.0),
        grouped_curve=tuple(sorted((float(k), float(v)) for k, v in curve.items())),
        grouped_curve_dtype=str(doc.get("gemm", {}).get("grouped_curve_dtype", "fp8")),
        attention_decode_efficiency=_num(doc, "attention.decode_efficiency", s, 1e-3, 1.0),
        attention_prefill_efficiency=_num(doc, "attention.prefill_efficiency", s, 1e-3, 1.0),
        kernels_per_layer=int(_num(doc, "overheads.kernels_per_layer", s)),
        kernel_gap_full_graph_us=_num(gaps, "full_graph", s),
        kernel_gap_piecewise_us=_num(gaps, "piecewise", s),
        kernel_gap_eager_us=_num(gaps, "eager", s),
        host_step_us=_num(doc, "overheads.host_step_us", s),
        host_per_seq_us=_num(doc, "overheads.host_per_seq_us", s),
        graph_max_tokens=int(_num(doc, "overheads.graph_max_tokens", s, 1)),
        tp_allreduce_per_layer=int(_num(doc, "tp_allreduce.per_layer", s)),
        tp_allreduce_latency_us=_num(doc, "tp_allreduce.latency_us", s),
        tp_allreduce_nvlink_efficiency=_num(doc, "tp_allreduce.nvlink_efficiency", s, 1e-3, 1.0),
        routing_stat_coef=_num(doc, "routing.stat_coef", s),
        routing_skew_no_eplb=_num(doc, "routing.skew_no_eplb", s),
        routing_skew_eplb=_num(doc, "routing.skew_eplb", s),
        routing_redundant_relief=_num(doc, "routing.redundant_relief", s),
        spec_acceptance=_num(doc, "speculative.acceptance", s, 0.0, 1.0),
        kv_transfer_nic_efficiency=_num(doc, "kv_transfer.nic_efficiency", s, 1e-3, 1.0),
        kv_transfer_latency_us=_num(doc, "kv_transfer.latency_us", s),
        a2a=tuple(_a2a_table(k, v, s) for k, v in a2a.items()),
        overlap_efficiency=_opt(doc, "dbo.efficiency", s, 0.9, 0.0, 1.0),
        dbo_vllm_efficiency=_opt(doc, "dbo.vllm_efficiency", s, 0.9, 0.0, 1.0),
        roce_a2a_efficiency=_opt(doc, "fabric.roce_a2a_efficiency", s, 1.0, 0.01, 1.0),
        roce_kv_efficiency=_opt(doc, "fabric.roce_kv_efficiency", s, 1.0, 0.01, 1.0),
        a2a_sm_fraction_nvlink=_opt(doc, "dbo.a2a_sm_fraction_nvlink", s, 0.75, 0.0, 1.0),
        a2a_sm_fraction_rdma=_opt(doc, "dbo.a2a_sm_fraction_rdma", s, 0.15, 0.0, 1.0),
        comm_sms_normal=_opt(doc, "dbo.comm_sms_normal", s, 24.0, 0.0, 200.0),
        dp_imbalance_random=_opt(doc, "routing.dp_imbalance_random", s, 1.0),
        dp_imbalance_balanced=_opt(doc, "routing.dp_imbalance_balanced", s, 0.3),
        dp_imbalance_internal=_opt(doc, "routing.dp_imbalance_internal", s, 0.8),
        routing_seq_corr=_opt(doc, "routing.seq_corr", s, 0.0, 0.0, 1.0),
        spec_draft_us=_opt(doc, "speculative.draft_pass_us", s, 400.0),
        request_overhead_us=_opt(doc, "overheads.request_us", s, 0.0),
        expert_gemm=parse_expert_gemm(doc.get("expert_gemm"), f"{s}: expert_gemm"),
        moe_phases=parse_moe_phases(doc.get("moe_phases"), f"{s}: moe_phases"),
        hardware=_hardware(doc.get("hardware"), s),
    )


def _hardware(d: Any, src: str) -> dict[str, dict[str, float]]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise UserError(f"calibration {src}: hardware must map hardware kinds to figures. Given: {d!r}.")
    out: dict[str, dict[str, float]] = {}
    for kind, figs in d.items():
        if not isinstance(figs, dict):
            raise UserError(f"calibration {src}: hardware.{kind} must be a mapping. Given: {figs!r}.")
        out[str(kind)] = {}
        for k, v in figs.items():
            if k not in HARDWARE_FIELDS:
                continue  # notes such as threads or fp32_tflops ride along
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise UserError(f"calibration {src}: hardware.{kind}.{k} must be a positive number. Given: {v!r}.")
            out[str(kind)][k] = float(v)
    return out


def _opt(doc: dict[str, Any], path: str, src: str, default: float, lo: float = 0.0, hi: float = math.inf) -> float:
    """An optional number (older calibration files lack the newer terms)."""
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return _num(doc, path, src, lo, hi)


@lru_cache(maxsize=1)
def published() -> Calibration:
    """The packaged calibration from published kernel tables."""
    text = (resources.files("widep.perf") / "data" / "calibration-published.yaml").read_text()
    return parse_calibration(yaml.safe_load(text), "builtin:calibration-published.yaml")


def from_measured(doc: dict[str, Any], source: str, base: Calibration | None = None) -> Calibration:
    """Overlay a ``widep-calibration/1`` GPU measurement on ``base`` (default: the published calibration)."""
    from widep.spec.hardware import get_gpu

    base = base or published()
    card = str(doc.get("card", ""))
    try:
        gpu = get_gpu(card)
    except UserError:
        raise UserError(
            f"calibration {source}: card {card!r} is not a GPU kind widep knows, so its measurements cannot be turned "
            "into fractions of a datasheet. Valid: the card names of widep/spec/presets/gpus.yaml (h100, h200, ...)."
        ) from None
    changes: dict[str, Any] = {}
    measured: dict[str, Any] = {
        "card": gpu.name,
        "gpus": doc.get("gpus"),
        "device_name": doc.get("device_name"),
        "replaced": {},
    }
    hbm_peak = gpu.hbm_tbps * 1000.0

    def put(key: str, value: float, why: str) -> None:
        changes[key] = value
        measured["replaced"][key] = {"value": round(value, 4), "from": why}

    if isinstance(doc.get("hbm_gbps_effective"), (int, float)) and doc["hbm_gbps_effective"] > 0:
        put(
            "hbm_weights_efficiency",
            min(1.0, doc["hbm_gbps_effective"] / hbm_peak),
            f"hbm_gbps_effective {doc['hbm_gbps_effective']:.0f} GB/s",
        )
    paged = (doc.get("hbm") or {}).get("paged_kv_read_gbps") or {}
    best = []
    for row in ("bf16_576", "fp8_656"):
        for _, tab in (paged.get(row) or {}).items():
            best += [g for g in tab.get("gbps", []) if isinstance(g, (int, float))]
    if best:
        put("hbm_kv_read_efficiency", min(1.0, max(best) / hbm_peak), f"paged KV read {max(best):.0f} GB/s")
    peak = doc.get("matmul_peak_tflops") or {}
    if isinstance(peak.get("fp8"), (int, float)) and peak["fp8"] > 0:
        put("gemm_fp8_efficiency", min(1.0, peak["fp8"] / gpu.fp8_tflops), f"dense FP8 {peak['fp8']:.0f} TFLOPS")
    if isinstance(peak.get("bf16"), (int, float)) and peak["bf16"] > 0:
        put("gemm_bf16_efficiency", min(1.0, peak["bf16"] / gpu.bf16_tflops), f"dense BF16 {peak['bf16']:.0f} TFLOPS")
    gemm = doc.get("gemm") or {}
    for dtype, peak_tf in (("fp8", gpu.fp8_tflops), ("bf16", gpu.bf16_tflops)):
        sec = gemm.get(dtype) or {}
        at = sec.get("tflops_at_tokens") or {}
        pts = sorted((float(m), float(tf) / peak_tf) for m, tf in at.items() if float(tf) > 0)
        if pts:
            changes["grouped_curve"] = tuple(pts)
            changes["grouped_curve_dtype"] = dtype
            measured["replaced"]["grouped_curve"] = {
                "from": f"{sec.get('impl')} ({dtype}) at {len(pts)} rows-per-expert points"
            }
            if base.expert_gemm is not None:
                measured["grouped_curve_note"] = (
                    f"kept for reference: {sec.get('impl')} is not the serving kernel; the kernel-true DeepGEMM "
                    "terms (expert_gemm) price the experts"
                )
            break
    deep_ep = (doc.get("a2a") or {}).get("deep_ep") or {}
    measured["deep_ep_measured"] = bool(deep_ep.get("importable"))
    if not deep_ep.get("importable"):
        measured["a2a_note"] = (
            "DeepEP did not run on the measuring machine; all-to-all figures stay the published DeepEP/pplx tables "
            "(the NCCL all-to-all measurement is kept for reference only)."
        )
    if isinstance(doc.get("model_check"), list):
        measured["model_check_points"] = len(doc["model_check"])
    cal = replace(base, **changes)
    return replace(
        cal,
        name=f"measured-{gpu.name.lower()}x{doc.get('gpus', '?')}",
        description=f"published calibration with {gpu.name} measurements ({doc.get('device_name') or card})",
        source=source,
        measured=measured,
    )


def load_calibration(spec: str | Path | None = None, *, results_dir: str | Path = "profiling/results") -> Calibration:
    """``None``/``"published"``: packaged; a path: YAML/JSON of either format; ``"auto:<GPU>"``: newest measurement."""
    if spec is None or str(spec) == "published":
        return published()
    s = str(spec)
    if s.startswith("auto:"):
        kind = s[len("auto:") :].lower()
        found = sorted(Path(results_dir).glob(f"calibration-{kind}x*.json"), key=lambda p: p.stat().st_mtime)
        return load_calibration(found[-1]) if found else published()
    p = Path(s)
    if not p.is_file():
        raise UserError(
            f"--calibration: no such file {s!r}. Valid: 'published', 'auto:<GPU>', or a calibration YAML/JSON file."
        )
    try:
        text = p.read_text()
        doc = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise UserError(f"--calibration: cannot read {s!r}: {err}") from None
    if isinstance(doc, dict) and doc.get("format") == MEASURED_FORMAT:
        return from_measured(doc, str(p))
    return parse_calibration(doc, str(p))
