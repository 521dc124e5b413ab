"""Results on disk: llm-d Benchmark Report v0.2.x documents, per-request JSONL, summary CSV.

One Benchmark Report per level (``level-<id>.report.yaml``), built and validated with the
``llmd-benchmark-report`` package's own pydantic models, so llm-d tooling (llm-d-prism, the
llm-d-benchmark analysis) reads them as they are. Tokens/s/GPU and tokens/s/user are not fields of
that schema; they follow from it (output token rate / accelerator count, 1000 / mean TPOT in ms),
and are written to ``level-<id>.summary.json`` and ``summary.csv`` as well.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from llmd_benchmark_report import BenchmarkReportV02, load_benchmark_report

from widep.bench.loadgen import Level
from widep.bench.metrics import Sample, summarize_samples
from widep.bench.records import RequestRecord
from widep.bench.stats import LevelSummary
from widep.bench.workload import LengthSpec, WorkloadSpec

BR_VERSION = "0.2.1"


@dataclass(frozen=True)
class EngineComponent:
    """One group of inference servers in the stack (a role of a deployment)."""

    label: str
    model: str
    gpus: int
    replicas: int = 1
    """API servers of this role (one per DP rank with external LB)."""
    role: Literal["replica", "prefill", "decode"] = "replica"
    accelerator: str = "unknown"
    tp: int = 1
    dp: int = 1
    ep: int = 1
    tool: str = "vllm"
    tool_version: str = "unknown"
    endpoints: tuple[str, ...] = ()
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StackInfo:
    """What served the benchmark."""

    components: tuple[EngineComponent, ...]

    @property
    def gpus(self) -> int:
        return sum(c.gpus for c in self.components)


def stack_from_endpoints(
    endpoints: Sequence[str],
    *,
    gpus: int,
    model: str,
    accelerator: str = "unknown",
    tp: int | None = None,
    ep: int | None = None,
    role: Literal["replica", "prefill", "decode"] = "replica",
    engine_version: str = "unknown",
) -> StackInfo:
    """A one-component stack for endpoints given by hand: DP = endpoints, TP = GPUs / endpoints.

    EP defaults to DP × TP (a wide-EP deployment uses every GPU for experts); pass ``ep=1`` for a
    dense model.
    """
    n = len(endpoints)
    tp_v = tp if tp is not None else max(gpus // n, 1)
    return StackInfo(
        (
            EngineComponent(
                label=f"vllm-{role}",
                model=model,
                gpus=gpus,
                replicas=n,
                role=role,
                accelerator=accelerator,
                tp=tp_v,
                dp=n,
                ep=ep if ep is not None else n * tp_v,
                tool_version=engine_version,
                endpoints=tuple(endpoints),
            ),
        )
    )


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, tz=_dt.UTC).isoformat()


def _iso_duration(seconds: float) -> str:
    return f"PT{seconds:.3f}S"


def _seq_len(spec: LengthSpec) -> dict[str, Any]:
    dist = {"fixed": "fixed", "uniform": "uniform", "normal": "gaussian", "lognormal": "other"}[spec.distribution]
    out: dict[str, Any] = {"distribution": dist, "value": spec.mean}
    if spec.distribution != "fixed":
        if spec.std:
            out["std_dev"] = float(spec.std)
        out["min"] = spec.min
        if spec.max is not None:
            out["max"] = spec.max
    return out


def _stat(units: str, d: dict[str, float] | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {"units": units, **d}


def _rate(units: str, value: float) -> dict[str, Any]:
    return {"units": units, "mean": float(value)}


def config_id(obj: Any) -> str:
    """A short stable hash of a JSON-able configuration."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, list):
        return [_drop_none(v) for v in d]
    return d


def _observability(stack: StackInfo, samples: Sequence[Sample]) -> dict[str, Any] | None:
    if not samples:
        return None
    per_ep = summarize_samples(samples)
    label_of = {ep: c.label for c in stack.components for ep in c.endpoints}
    default_label = stack.components[0].label
    comps = []
    for ep, summ in per_ep.items():
        agg = {
            "kv_cache_usage": _stat("fraction", summ.get("kv_cache_usage")),
            "running_requests": _stat("count", summ.get("running")),
            "waiting_requests": _stat("count", summ.get("waiting")),
        }
        mine = [s for s in samples if s.endpoint == ep]

        def series(attr: str, units: str, mine: list = mine) -> dict[str, Any] | None:
            pts = [{"ts": _iso(s.wall), "value": getattr(s, attr)} for s in mine if getattr(s, attr) is not None]
            return {"units": units, "series": pts} if pts else None

        ts = {
            "kv_cache_usage": series("kv_cache_usage", "fraction"),
            "num_requests_running": series("running", "count"),
            "num_requests_waiting": series("waiting", "count"),
        }
        comps.append(
            {
                "component_label": label_of.get(ep, default_label),
                "replica_id": ep,
                "aggregate": _drop_none(agg) or None,
                "time_series": _drop_none(ts) or None,
            }
        )
    return {"components": comps}


def build_level_report(
    *,
    summary: LevelSummary,
    level: Level,
    level_index: int,
    workload: WorkloadSpec,
    stack: StackInfo,
    tool: str,
    tool_version: str,
    wall_start: float,
    wall_end: float,
    sweep_id: str,
    native_args: dict[str, Any],
    samples: Sequence[Sample] = (),
    description: str | None = None,
) -> BenchmarkReportV02:
    """One level as an llm-d Benchmark Report, validated by the package's models."""
    if summary.completed == 0:
        raise ValueError("a level with no successful request has no latency to report")
    stack_doc = []
    for c in stack.components:
        stack_doc.append(
            {
                "metadata": {
                    "label": c.label,
                    "cfg_id": config_id([c.model, c.gpus, c.tp, c.dp, c.ep, c.role, c.args]),
                    "description": f"{c.replicas} API server(s): " + ", ".join(c.endpoints) if c.endpoints else None,
                },
                "standardized": {
                    "kind": "inference_engine",
                    "tool": c.tool,
                    "tool_version": c.tool_version,
                    "role": c.role,
                    "replicas": c.replicas,
                    "model": {"name": c.model},
                    "accelerator": {
                        "model": c.accelerator,
                        "count": c.gpus,
                        "parallelism": {"tp": c.tp, "dp": c.dp, "dp_local": 1, "workers": 1, "ep": c.ep, "pp": 1},
                    },
                },
                "native": {"args": c.args or None},
            }
        )
    load_std: dict[str, Any] = {
        "tool": tool,
        "tool_version": tool_version,
        "parallelism": 1,
        "source": "random",
        "stage": level_index,
        "input_seq_len": _seq_len(workload.isl),
        "output_seq_len": _seq_len(workload.osl),
    }
    if level.kind == "concurrency":
        load_std["concurrency"] = int(level.value)
    else:
        load_std["rate_qps"] = float(level.value)
    s = summary
    doc = {
        "version": BR_VERSION,
        "run": {
            "uid": str(uuid.uuid4()),
            "eid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"widep-bench:{sweep_id}")),
            "time": {
                "start": _iso(wall_start),
                "end": _iso(wall_end),
                "duration": _iso_duration(max(wall_end - wall_start, 0.0)),
            },
            "description": description,
            "keywords": ["widep", f"level:{level.id}"],
        },
        "scenario": {
            "stack": stack_doc,
            "load": {
                "metadata": {
                    "cfg_id": config_id(native_args),
                    "description": f"{level.kind} {level.value:g}, ISL {workload.isl.describe()}, "
                    f"OSL {workload.osl.describe()}",
                    "treatment": level.id,
                },
                "standardized": load_std,
                "native": {"args": native_args},
            },
        },
        "results": {
            "request_performance": {
                "aggregate": {
                    "requests": {
                        "total": s.total,
                        "failures": s.failed,
                        "incomplete": s.incomplete,
                        "input_length": _stat("count", s.input_len),
                        "output_length": _stat("count", s.output_len),
                    },
                    "latency": {
                        "time_to_first_token": _stat("ms", s.ttft_ms),
                        "normalized_time_per_output_token": _stat("ms/token", s.ntpot_ms),
                        "time_per_output_token": _stat("ms/token", s.tpot_ms),
                        "inter_token_latency": _stat("ms/token", s.itl_ms),
                        "request_latency": _stat("ms", s.e2e_ms),
                    },
                    "throughput": {
                        "input_token_rate": _rate("tokens/s", s.input_tps),
                        "output_token_rate": _rate("tokens/s", s.output_tps),
                        "total_token_rate": _rate("tokens/s", s.total_tps),
                        "request_rate": _rate("queries/s", s.request_rate),
                    },
                }
            },
            "observability": _observability(stack, samples),
        },
    }
    return BenchmarkReportV02.model_validate(_drop_none(doc))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(path: Path, report: BenchmarkReportV02) -> None:
    atomic_write(path, yaml.safe_dump(report.dump(), sort_keys=False))


def read_report(path: Path) -> BenchmarkReportV02:
    """Load and validate a Benchmark Report YAML/JSON file with the package's models."""
    data = yaml.safe_load(Path(path).read_text())
    br = load_benchmark_report(data)
    if not isinstance(br, BenchmarkReportV02):
        raise ValueError(f"{path}: expected a v0.2 Benchmark Report, found version {data.get('version')!r}")
    return br


def write_records(path: Path, records: Iterable[RequestRecord]) -> None:
    lines = [json.dumps(r.to_json(), separators=(",", ":")) for r in records]
    atomic_write(path, "\n".join(lines) + ("\n" if lines else ""))


def read_records(path: Path) -> list[RequestRecord]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(RequestRecord.from_json(json.loads(line)))
    return out


CSV_COLUMNS = (
    "run", "level", "kind", "concurrency", "rate_qps", "generator", "total", "completed", "failed",
    "incomplete", "duration_s", "request_rate", "input_tps", "output_tps", "total_tps", "gpus",
    "output_tps_per_gpu", "total_tps_per_gpu", "tps_per_user", "tps_per_user_req_mean",
    "mean_inflight", "ttft_ms_mean", "ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99",
    "tpot_ms_mean", "tpot_ms_p50", "tpot_ms_p90", "tpot_ms_p99", "itl_ms_p50", "itl_ms_p99",
    "e2e_ms_p50", "e2e_ms_p99", "input_len_mean", "output_len_mean", "send_lag_ms_p50",
    "send_lag_ms_p99", "goodput_request_rate", "goodput_fraction", "goodput_output_tps_per_gpu",
    "kv_cache_usage_max", "running_mean", "waiting_max",
)  # fmt: skip


def csv_row(run: str, level_meta: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    """One summary.csv row from a level's saved summary JSON."""

    def g(name: str, key: str) -> Any:
        d = s.get(name)
        return None if d is None else d.get(key)

    gp = s.get("goodput") or {}
    obs = level_meta.get("metrics") or {}
    kv_max = [v["kv_cache_usage"]["max"] for v in obs.values() if v.get("kv_cache_usage")]
    run_mean = [v["running"]["mean"] for v in obs.values() if v.get("running")]
    wait_max = [v["waiting"]["max"] for v in obs.values() if v.get("waiting")]
    row = {
        "run": run,
        "level": level_meta["id"],
        "kind": level_meta["kind"],
        "concurrency": level_meta["value"] if level_meta["kind"] == "concurrency" else None,
        "rate_qps": level_meta["value"] if level_meta["kind"] == "rate" else None,
        "generator": level_meta.get("generator"),
        **{k: s.get(k) for k in (
            "total", "completed", "failed", "incomplete", "duration_s", "request_rate", "input_tps",
            "output_tps", "total_tps", "gpus", "output_tps_per_gpu", "total_tps_per_gpu",
            "tps_per_user", "tps_per_user_req_mean", "mean_inflight")},
        "ttft_ms_mean": g("ttft_ms", "mean"),
        "ttft_ms_p50": g("ttft_ms", "p50"),
        "ttft_ms_p90": g("ttft_ms", "p90"),
        "ttft_ms_p99": g("ttft_ms", "p99"),
        "tpot_ms_mean": g("tpot_ms", "mean"),
        "tpot_ms_p50": g("tpot_ms", "p50"),
        "tpot_ms_p90": g("tpot_ms", "p90"),
        "tpot_ms_p99": g("tpot_ms", "p99"),
        "itl_ms_p50": g("itl_ms", "p50"),
        "itl_ms_p99": g("itl_ms", "p99"),
        "e2e_ms_p50": g("e2e_ms", "p50"),
        "e2e_ms_p99": g("e2e_ms", "p99"),
        "input_len_mean": g("input_len", "mean"),
        "output_len_mean": g("output_len", "mean"),
        "send_lag_ms_p50": g("send_lag_ms", "p50"),
        "send_lag_ms_p99": g("send_lag_ms", "p99"),
        "goodput_request_rate": gp.get("request_rate"),
        "goodput_fraction": gp.get("fraction"),
        "goodput_output_tps_per_gpu": gp.get("output_tps_per_gpu"),
        "kv_cache_usage_max": max(kv_max) if kv_max else None,
        "running_mean": sum(run_mean) if run_mean else None,
        "waiting_max": max(wait_max) if wait_max else None,
    }  # fmt: skip
    return row


def write_summary_csv(out_dir: Path, run: str) -> Path:
    """(Re)write ``summary.csv`` from every completed level's summary JSON in ``out_dir``."""
    rows = []
    for p in sorted(out_dir.glob("level-*.summary.json")):
        doc = json.loads(p.read_text())
        rows.append(csv_row(run, doc["level"], doc["summary"]))
    rows.sort(key=lambda r: (r["kind"], float(r["concurrency"] or r["rate_qps"] or 0)))
    path = out_dir / "summary.csv"
    tmp = path.with_name(".summary.csv.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_COLUMNS})
    os.replace(tmp, path)
    return path
