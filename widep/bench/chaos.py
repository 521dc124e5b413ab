"""The chaos benchmark's arithmetic: what a run of streaming load with one SIGKILL in it means (pure).

Inputs are the load generator's request records (times relative to the level start), the kill time and what the
orchestrator (:mod:`widep.run.chaos`) saw of the deployment. Outputs: one JSON-able dict per run, medians over
repeats, and a throughput-over-time picture.

- ``failed_before_first_token``: requests that failed without receiving a token (the front door should have
  retried them on a live rank, or held them until the group answered again);
- ``failed_mid_stream``: requests that had tokens and then failed (lost with their rank; counted, not retryable);
- ``interruption_s``: the longest gap with no token delivered to any client, over the gaps that end after the kill;
- ``full_width_s``: kill -> every rank of the group healthy again (the restarted group, under the group policy);
- ``teardown_s``: kill -> the last process of the killed attempt gone (group policy);
- ``cold_start_s`` / ``restart_cold_start_s``: the launcher's start -> healthy of the first and the restarted
  attempt (what ``full_width_s`` is compared with);
- ``resumed_s``: kill -> the token that ends ``interruption_s`` (service again; after ``full_width_s``, the rest is
  the front door re-admitting the group); None when tokens never resumed.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from widep.bench.records import RequestRecord


@dataclass(frozen=True)
class Target:
    """``ROLE/RANK[:api|:engine]``: the process of one DP rank to SIGKILL."""

    role: str
    rank: int
    part: str = "api"

    @classmethod
    def parse(cls, text: str) -> Target:
        spec, _, part = text.partition(":")
        role, _, rank = spec.partition("/")
        part = part or "api"
        if not role or not rank.isdigit() or part not in ("api", "engine"):
            raise ValueError(
                f"--kill: {text!r} is not ROLE/RANK[:api|:engine]. Valid e.g.: serve/1, serve/1:api, serve/1:engine."
            )
        return cls(role, int(rank), part)

    def __str__(self) -> str:
        return f"{self.role}/{self.rank}:{self.part}"


def token_times(records: Sequence[RequestRecord]) -> list[float]:
    """Every token-carrying chunk's arrival, seconds since the level start, sorted."""
    out: list[float] = []
    for r in records:
        if r.ttft_s is None:
            continue
        t = r.start_s + r.ttft_s
        out.append(t)
        for gap in r.itls_s:
            t += gap
            out.append(t)
    return sorted(out)


def longest_gap_after(times: Sequence[float], kill_s: float, end_s: float) -> float:
    """The longest stretch without a token that ends after ``kill_s``, the stretch from the last token to ``end_s``
    (the end of the run) included: tokens that never resume count as an interruption to the end."""
    before = [t for t in times if t <= kill_s]
    after = [t for t in times if t > kill_s]
    prev = before[-1] if before else kill_s
    best = 0.0
    for t in after:
        best = max(best, t - prev)
        prev = t
    return max(best, end_s - prev)


def resumed_after(times: Sequence[float], kill_s: float, end_s: float) -> float | None:
    """The token that ends the longest token gap after ``kill_s`` (:func:`longest_gap_after`); None when that gap
    is the one from the last token to ``end_s`` (tokens did not resume) or no token came after the kill."""
    before = [t for t in times if t <= kill_s]
    prev = before[-1] if before else kill_s
    best, at = -1.0, None
    for t in (t for t in times if t > kill_s):
        if t - prev > best:
            best, at = t - prev, t
        prev = t
    return None if at is None or end_s - prev > best else at


def summarize_run(
    records: Sequence[RequestRecord],
    kill_s: float | None,
    duration_s: float,
    full_width_s: float | None,
    teardown_s: float | None,
    orphans: int,
    policy: str,
    target: str,
) -> dict[str, Any]:
    failed = [r for r in records if not r.ok]
    times = token_times(records)
    end = max([duration_s, *(r.end_s for r in records if r.end_s is not None)])
    resumed = None if kill_s is None else resumed_after(times, kill_s, end)
    return {
        "target": target,
        "policy": policy,
        "requests": len(records),
        "ok": sum(r.ok for r in records),
        "failed_before_first_token": sum(1 for r in failed if r.chunks == 0),
        "failed_mid_stream": sum(1 for r in failed if r.chunks > 0),
        "errors": sorted({(r.error or "")[:160] for r in failed}),
        "kill_s": None if kill_s is None else round(kill_s, 3),
        "interruption_s": None if kill_s is None else round(longest_gap_after(times, kill_s, end), 3),
        "resumed_s": None if kill_s is None or resumed is None else round(resumed - kill_s, 3),
        "full_width_s": None if full_width_s is None else round(full_width_s, 3),
        "teardown_s": None if teardown_s is None else round(teardown_s, 3),
        "orphans": orphans,
        "tokens": len(times),
    }


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run keys' medians over repeats (numbers only; a key missing from a run is skipped there)."""
    keys = (
        "ok",
        "failed_before_first_token",
        "failed_mid_stream",
        "interruption_s",
        "full_width_s",
        "resumed_s",
        "teardown_s",
        "orphans",
        "cold_start_s",
        "restart_cold_start_s",
    )
    out: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        out[k] = statistics.median(vals) if vals else None
    return out


def throughput_series(
    records: Sequence[RequestRecord], bin_s: float = 1.0, end_s: float = 0.0
) -> tuple[list[float], list[float]]:
    """(bin start, tokens/s) over the run, zeros up to ``end_s`` (no token is a point of the picture too)."""
    times = token_times(records)
    if not times:
        return [], []
    n = max(int(times[-1] // bin_s), int(end_s // bin_s)) + 1
    counts = [0] * n
    for t in times:
        counts[int(t // bin_s)] += 1
    return [i * bin_s for i in range(n)], [c / bin_s for c in counts]


def plot_runs(runs: Sequence[tuple[dict[str, Any], Sequence[RequestRecord]]], path: Path) -> Path:
    """Tokens/s over time for each run, the kill and the group's return marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (summary, records) in enumerate(runs):
        k, fw = summary.get("kill_s"), summary.get("full_width_s")
        x, y = throughput_series(records, end_s=(k or 0.0) + (fw or 0.0) + 5.0)
        (line,) = ax.plot(x, y, label=f"run {i + 1}: {summary['target']}", linewidth=1.2)
        if k is not None:
            ax.axvline(k, color=line.get_color(), linestyle="--", linewidth=0.8)
            if fw is not None:
                ax.axvline(k + fw, color=line.get_color(), linestyle=":", linewidth=0.8)
    ax.set_xlabel("seconds since the load started (dashed: SIGKILL, dotted: every rank healthy again)")
    ax.set_ylabel("tokens/s delivered")
    ax.set_title(f"chaos: {runs[0][0]['target']}, policy {runs[0][0]['policy']}" if runs else "chaos")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
