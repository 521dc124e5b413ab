"""Plots of one or more sweeps, read only from disk (Benchmark Reports and per-request JSONL).

- Pareto: tokens/s/user (x) against output tokens/s/GPU (y), one line per run, points labelled by
  concurrency (or rate), with the frontier over all runs dashed. x = 1000 / mean TPOT in ms and
  y = output token rate / accelerator count of the report's stack: the definitions of llm-d's
  Pareto tooling, so any llm-d v0.2 report plots the same way.
- Latency against throughput: TTFT and TPOT (p50, p99) against output tokens/s/GPU.
- Distributions: TTFT and TPOT CDFs per level, from ``level-*.requests.jsonl``.

Each figure is written as PNG and SVG.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from widep.errors import UserError


@dataclass(frozen=True)
class Point:
    """One level of one run, as the plots need it."""

    run: str
    level: str
    concurrency: float | None
    rate: float | None
    tps_per_user: float | None
    tps_per_gpu: float
    output_tps: float
    gpus: int
    ttft_p50: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p99: float | None

    @property
    def tag(self) -> str:
        if self.concurrency is not None:
            return f"{self.concurrency:g}"
        if self.rate is not None:
            return f"{self.rate:g}/s"
        return self.level

    @property
    def order(self) -> float:
        return self.concurrency if self.concurrency is not None else (self.rate or 0.0)


def pareto_front(xy: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (both maximised), by x."""
    idx = sorted(range(len(xy)), key=lambda i: (-xy[i][0], -xy[i][1]))
    front: list[int] = []
    best_y = float("-inf")
    for i in idx:
        if xy[i][1] > best_y:
            front.append(i)
            best_y = xy[i][1]
    return sorted(front, key=lambda i: xy[i][0])


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if d is None:
            return None
        d = d.get(p) if isinstance(d, dict) else getattr(d, p, None)
    return d


def run_label(run_dir: Path) -> str:
    meta = run_dir / "sweep.json"
    if meta.exists():
        try:
            return str(json.loads(meta.read_text()).get("label") or run_dir.resolve().name)
        except (json.JSONDecodeError, OSError):
            pass
    return run_dir.resolve().name


def load_points(run_dir: Path) -> list[Point]:
    """Points of every level report in ``run_dir`` (validated with the llm-d models)."""
    from widep.bench.report import read_report

    label = run_label(run_dir)
    points = []
    for path in sorted(run_dir.glob("level-*.report.yaml")):
        br = read_report(path).dump()
        agg = _get(br, "results", "request_performance", "aggregate") or {}
        out_tps = _get(agg, "throughput", "output_token_rate", "mean")
        if out_tps is None:
            continue
        gpus = sum(_get(c, "standardized", "accelerator", "count") or 0 for c in _get(br, "scenario", "stack") or [])
        tpot_mean = _get(agg, "latency", "time_per_output_token", "mean")
        load = _get(br, "scenario", "load", "standardized") or {}
        conc = load.get("concurrency")
        points.append(
            Point(
                run=label,
                level=path.name[len("level-") : -len(".report.yaml")],
                concurrency=float(conc) if conc is not None else None,
                rate=load.get("rate_qps"),
                tps_per_user=(1000.0 / tpot_mean) if tpot_mean else None,
                tps_per_gpu=float(out_tps) / gpus if gpus else float(out_tps),
                output_tps=float(out_tps),
                gpus=gpus,
                ttft_p50=_get(agg, "latency", "time_to_first_token", "p50"),
                ttft_p99=_get(agg, "latency", "time_to_first_token", "p99"),
                tpot_p50=_get(agg, "latency", "time_per_output_token", "p50"),
                tpot_p99=_get(agg, "latency", "time_per_output_token", "p99"),
            )
        )
    return sorted(points, key=lambda p: (p.concurrency is None, p.order))


def _save(fig: Any, prefix: Path, name: str) -> list[Path]:
    out = []
    for ext in ("png", "svg"):
        p = prefix.parent / f"{prefix.name}-{name}.{ext}"
        fig.savefig(p, dpi=130, bbox_inches="tight")
        out.append(p)
    return out


def plot_runs(run_dirs: Sequence[Path], prefix: Path) -> list[Path]:
    """Write the Pareto, latency and distribution figures for ``run_dirs``; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: list[tuple[Path, list[Point]]] = []
    for d in run_dirs:
        d = Path(d)
        if not d.is_dir():
            raise UserError(
                f"bench plot needs sweep directories. Given: {d} (not a directory). Valid: a --out DIR of widep bench"
            )
        pts = load_points(d)
        if not pts:
            raise UserError(
                f"bench plot found no level reports in {d}. Given: {d}. "
                "Valid: a directory with level-*.report.yaml files (a widep bench --out DIR)"
            )
        runs.append((d, pts))
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written: list[Path] = []

    # --- Pareto -------------------------------------------------------------------------------
    fig, ax = plt.subplots(figsize=(8, 5.5))
    allxy: list[tuple[float, float]] = []
    for k, (_, pts) in enumerate(runs):
        good = [p for p in pts if p.tps_per_user is not None]
        if not good:
            continue
        col = colors[k % len(colors)]
        closed = [p for p in good if p.concurrency is not None]
        opened = [p for p in good if p.concurrency is None]
        if closed:
            ax.plot(
                [p.tps_per_user for p in closed], [p.tps_per_gpu for p in closed], "o-", color=col, label=good[0].run
            )
        if opened:
            ax.plot(
                [p.tps_per_user for p in opened],
                [p.tps_per_gpu for p in opened],
                "^:",
                color=col,
                label=f"{good[0].run} (request rate)",
            )
        for p in good:
            ax.annotate(
                p.tag, (p.tps_per_user, p.tps_per_gpu), textcoords="offset points", xytext=(4, 4), fontsize=8, color=col
            )
            allxy.append((float(p.tps_per_user), p.tps_per_gpu))  # type: ignore[arg-type]
    if len(runs) > 1 and allxy:
        front = pareto_front(allxy)
        ax.plot([allxy[i][0] for i in front], [allxy[i][1] for i in front], "--", color="grey", lw=1, label="frontier")
    ax.set_xlabel("tokens/s/user  (1000 / mean TPOT ms)")
    ax.set_ylabel("output tokens/s/GPU")
    ax.set_title("Throughput per GPU vs speed per user (labels: concurrency, or rate/s)")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend()
    written += _save(fig, prefix, "pareto")
    plt.close(fig)

    # --- latency vs throughput ----------------------------------------------------------------
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for k, (_, pts) in enumerate(runs):
        col = colors[k % len(colors)]
        xs = [p.tps_per_gpu for p in pts]
        for ax_, lo, hi, _name in ((a1, "ttft_p50", "ttft_p99", "TTFT"), (a2, "tpot_p50", "tpot_p99", "TPOT")):
            ys_lo = [getattr(p, lo) for p in pts]
            ys_hi = [getattr(p, hi) for p in pts]
            ax_.plot(xs, ys_lo, "o-", color=col, label=f"{pts[0].run} p50")
            ax_.plot(xs, ys_hi, "s--", color=col, alpha=0.6, label=f"{pts[0].run} p99")
            for p, y in zip(pts, ys_lo, strict=False):
                if y is not None:
                    ax_.annotate(
                        p.tag, (p.tps_per_gpu, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color=col
                    )
    a1.set_ylabel("TTFT (ms)")
    a2.set_ylabel("TPOT (ms/token)")
    for ax_ in (a1, a2):
        ax_.set_xlabel("output tokens/s/GPU")
        ax_.grid(True, alpha=0.3)
        ax_.legend(fontsize=7)
    fig.suptitle("Latency vs throughput")
    written += _save(fig, prefix, "latency")
    plt.close(fig)

    # --- distributions ------------------------------------------------------------------------
    from widep.bench.report import read_records

    fig, (b1, b2) = plt.subplots(1, 2, figsize=(11, 4.5))
    any_dist = False
    for k, (d, pts) in enumerate(runs):
        col = colors[k % len(colors)]
        n = len(pts)
        for j, p in enumerate(pts):
            path = d / f"level-{p.level}.requests.jsonl"
            if not path.exists():
                continue
            recs = [r for r in read_records(path) if r.ok]
            ttft = sorted(r.ttft_s * 1000 for r in recs if r.ttft_s is not None)
            tpot = sorted(t * 1000 for r in recs if (t := r.tpot_s) is not None)
            alpha = 0.35 + 0.65 * (j + 1) / n
            for ax_, vals in ((b1, ttft), (b2, tpot)):
                if vals:
                    any_dist = True
                    ys = [(i + 1) / len(vals) for i in range(len(vals))]
                    ax_.step(vals, ys, where="post", color=col, alpha=alpha, label=f"{p.run} {p.tag}")
    b1.set_xlabel("TTFT (ms)")
    b2.set_xlabel("TPOT (ms/token)")
    for ax_ in (b1, b2):
        ax_.set_ylabel("fraction of requests")
        ax_.grid(True, alpha=0.3)
        if any_dist:
            ax_.legend(fontsize=6, ncol=2)
    fig.suptitle("TTFT and TPOT distributions per level (CDF)")
    written += _save(fig, prefix, "dist")
    plt.close(fig)
    return written
