"""Per-level statistics from request records. Pure functions, no I/O.

Definitions (the same as llm-d's Pareto tooling and ``vllm bench serve`` where they overlap):

- TTFT: send to first token-carrying chunk.
- TPOT per request: (last token - first token) / (output tokens - 1), output tokens from usage.
- ITL: gaps between consecutive token-carrying chunks, pooled over all requests of the level.
- NTPOT (normalized TPOT): end-to-end latency / output tokens.
- E2E: send to end of stream.
- Duration of a level: first send to last finish (any outcome).
- Output tokens/s = successful requests' output tokens / duration; total adds input tokens.
- Tokens/s/GPU = output tokens/s / GPUs serving the endpoints.
- Tokens/s/user = 1000 / mean TPOT in ms (llm-d ``Thpt_per_User``); the mean over requests of
  1/TPOT is reported beside it as ``tps_per_user_req_mean``.
- Goodput: successful requests meeting every given SLO, per second (and their output tokens/s).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from widep.bench.records import RequestRecord

# llm-d Benchmark Report percentile keys and the percentile each one stands for.
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p0p1", 0.1),
    ("p1", 1.0),
    ("p5", 5.0),
    ("p10", 10.0),
    ("p25", 25.0),
    ("p50", 50.0),
    ("p75", 75.0),
    ("p90", 90.0),
    ("p95", 95.0),
    ("p99", 99.0),
    ("p99p9", 99.9),
)


def describe(values: Iterable[float], scale: float = 1.0) -> dict[str, float] | None:
    """mean, stddev, min, max and the report's percentiles of ``values`` (times ``scale``).

    Percentiles use linear interpolation between closest ranks (numpy's default), the same as
    ``vllm bench serve``. Returns None for no values.
    """
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return None
    arr = arr * scale
    out: dict[str, float] = {
        "mean": float(arr.mean()),
        "stddev": float(arr.std()),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }
    qs = np.percentile(arr, [p for _, p in PERCENTILES])
    for (key, _), q in zip(PERCENTILES, qs, strict=False):
        out[key] = float(q)
    return out


@dataclass(frozen=True)
class Slo:
    """Per-request service-level objectives; a request is "good" when it meets every one given."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def met_by(self, rec: RequestRecord) -> bool:
        """True when ``rec`` succeeded and meets every SLO that is set."""
        if not rec.ok:
            return False
        if self.ttft_ms is not None and (rec.ttft_s is None or rec.ttft_s * 1000.0 > self.ttft_ms):
            return False
        if self.tpot_ms is not None:
            tpot = rec.tpot_s
            # a one-token answer has no TPOT; it cannot violate a TPOT objective
            if tpot is not None and tpot * 1000.0 > self.tpot_ms:
                return False
        if self.e2e_ms is not None and (rec.e2e_s is None or rec.e2e_s * 1000.0 > self.e2e_ms):
            return False
        return True


@dataclass(frozen=True)
class LevelSummary:
    """Everything the report, the CSV and the plots need about one level."""

    total: int
    completed: int
    failed: int
    incomplete: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    request_rate: float
    input_tps: float
    output_tps: float
    total_tps: float
    gpus: int
    output_tps_per_gpu: float
    total_tps_per_gpu: float
    tps_per_user: float | None
    tps_per_user_req_mean: float | None
    mean_inflight: float
    usage_missing: int
    short_outputs: int
    ttft_ms: dict[str, float] | None
    tpot_ms: dict[str, float] | None
    itl_ms: dict[str, float] | None
    ntpot_ms: dict[str, float] | None
    e2e_ms: dict[str, float] | None
    input_len: dict[str, float] | None
    output_len: dict[str, float] | None
    send_lag_ms: dict[str, float] | None
    goodput: dict[str, Any] | None
    errors: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def error_kinds(records: Sequence[RequestRecord], limit: int = 10) -> dict[str, int]:
    """The most common error messages (first line, trimmed) and how often each occurred."""
    counts: dict[str, int] = {}
    for r in records:
        if r.error:
            key = r.error.splitlines()[0][:200]
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:limit])


def summarize(
    records: Sequence[RequestRecord],
    *,
    gpus: int,
    slo: Slo | None = None,
    duration_s: float | None = None,
) -> LevelSummary:
    """Summarise one level's records. ``duration_s`` overrides first-send-to-last-finish."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    ok = [r for r in records if r.ok]
    incomplete = sum(1 for r in records if r.incomplete)
    failed = len(records) - len(ok) - incomplete
    if duration_s is None:
        starts = [r.start_s for r in records]
        ends = [r.end_s for r in records if r.end_s is not None]
        duration_s = (max(ends) - min(starts)) if starts and ends else 0.0
    dur = duration_s if duration_s > 0 else math.nan

    in_tok = sum(r.input_tokens for r in ok)
    out_tok = sum(r.output_tokens for r in ok)

    def rate(x: float) -> float:
        return 0.0 if math.isnan(dur) else x / dur

    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    tpot_stats = describe(tpots, 1000.0)
    tps_user = (1000.0 / tpot_stats["mean"]) if tpot_stats and tpot_stats["mean"] > 0 else None
    per_req = [1.0 / t for t in tpots if t > 0]
    itls = [x for r in ok for x in r.itls_s]
    ntpots = [r.e2e_s / r.output_tokens for r in ok if r.e2e_s is not None and r.output_tokens > 0]
    lags = [r.start_s - r.scheduled_s for r in records if r.scheduled_s is not None]
    busy = sum(r.e2e_s for r in records if r.e2e_s is not None)

    goodput = None
    if slo is not None and slo.any():
        good = [r for r in ok if slo.met_by(r)]
        goodput = {
            "slo": {k: v for k, v in asdict(slo).items() if v is not None},
            "requests": len(good),
            "fraction": (len(good) / len(records)) if records else 0.0,
            "request_rate": rate(len(good)),
            "output_tps": rate(sum(r.output_tokens for r in good)),
        }
        goodput["output_tps_per_gpu"] = goodput["output_tps"] / gpus

    output_tps = rate(out_tok)
    total_tps = rate(in_tok + out_tok)
    return LevelSummary(
        total=len(records),
        completed=len(ok),
        failed=failed,
        incomplete=incomplete,
        duration_s=float(duration_s),
        input_tokens=in_tok,
        output_tokens=out_tok,
        request_rate=rate(len(ok)),
        input_tps=rate(in_tok),
        output_tps=output_tps,
        total_tps=total_tps,
        gpus=gpus,
        output_tps_per_gpu=output_tps / gpus,
        total_tps_per_gpu=total_tps / gpus,
        tps_per_user=tps_user,
        tps_per_user_req_mean=(float(np.mean(per_req)) if per_req else None),
        mean_inflight=rate(busy),
        usage_missing=sum(1 for r in ok if r.completion_tokens is None),
        short_outputs=sum(
            1 for r in ok if r.expected_output_tokens is not None and r.output_tokens < r.expected_output_tokens
        ),
        ttft_ms=describe([r.ttft_s for r in ok if r.ttft_s is not None], 1000.0),
        tpot_ms=tpot_stats,
        itl_ms=describe(itls, 1000.0),
        ntpot_ms=describe(ntpots, 1000.0),
        e2e_ms=describe([r.e2e_s for r in ok if r.e2e_s is not None], 1000.0),
        input_len=describe([r.input_tokens for r in ok]),
        output_len=describe([r.output_tokens for r in ok]),
        send_lag_ms=describe(lags, 1000.0),
        goodput=goodput,
        errors=error_kinds(records),
    )
