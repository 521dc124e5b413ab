"""The sweep loop: results on disk, resume, recorded failures, Pareto frontier, plots (with a measured overlay)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from widep.bench.plot import pareto_front
from widep.perf.calibration import published
from widep.perf.enumerate import Budget, Grid, enumerate_candidates
from widep.perf.model import Workload, predict_plan
from widep.perf.sweep import (
    ItemResult,
    PredictExecutor,
    SweepItem,
    frontier,
    items_from_candidates,
    items_from_topologies,
    load_results,
    plot_sweep,
    run_sweep,
)
from widep.plan.core import plan
from widep.spec.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
CAL = published()
GRID = Grid(tp=(1, 2), max_num_seqs=(64, 256), pd_decode_max_num_seqs=(128,))


def small_items() -> list[SweepItem]:
    return items_from_candidates(
        enumerate_candidates(Budget(model="deepseek-r1", gpu="H100", gpus=(8, 16, 24), isl=1000, osl=1000, grid=GRID))
    )


class Counting:
    """Wraps the real PredictExecutor and counts the items it is asked to run (to observe resume)."""

    def __init__(self, inner: PredictExecutor) -> None:
        self.inner = inner
        self.name = inner.name
        self.seen: list[str] = []

    def key(self) -> dict:
        return self.inner.key()

    def run(self, items: Sequence[SweepItem]) -> Iterator[ItemResult]:
        self.seen += [it.id for it in items]
        yield from self.inner.run(items)


def test_sweep_writes_one_directory_per_candidate_and_resumes(tmp_path: Path) -> None:
    items = small_items()
    out = tmp_path / "sw"
    ex = Counting(PredictExecutor(CAL, Workload(isl=1000, osl=1000), [1, 16, 256]))
    res = run_sweep(items, ex, out)
    assert len(res) == len(items) == len(ex.seen)
    ok = [r for r in res if r.status == "ok"]
    bad = [r for r in res if r.status == "infeasible"]
    assert ok and bad
    for r in res:
        d = out / r.id
        stored = json.loads((d / "result.json").read_text())
        assert stored["status"] == r.status and stored["candidate"]["id"] == r.id
        assert (d / "topology.yaml").exists() == (r.status == "ok")
    # the stored topology of a feasible candidate plans, and predicting it alone gives the same numbers
    r0 = ok[0]
    pl = plan(load_topology(out / r0.id / "topology.yaml"))
    _, levels = predict_plan(pl, Workload(isl=1000, osl=1000), [1, 16, 256], CAL)
    # stored levels are rounded to 4 decimals: compare within that, not by rounding twice
    assert [lv.tps_gpu for lv in levels] == pytest.approx([x["tps_gpu"] for x in r0.levels], abs=1e-3)
    # infeasible ones carry the planner's own message
    assert any("does not fit in H100 memory" in r.reason for r in bad)
    # summary.csv: one row per candidate
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == len(items) and {r["status"] for r in rows} == {"ok", "infeasible"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frontier"] and all(f["id"] in {r.id for r in ok} for f in summary["frontier"])
    # resume: nothing is recomputed
    ex2 = Counting(PredictExecutor(CAL, Workload(isl=1000, osl=1000), [1, 16, 256]))
    res2 = run_sweep(items, ex2, out)
    assert ex2.seen == []
    assert [r.as_dict() for r in res2] == [
        {k: v for k, v in json.loads((out / r.id / "result.json").read_text()).items() if k != "candidate"} for r in res
    ]
    # a different workload invalidates stored results; a deleted point is recomputed alone
    (out / r0.id / "result.json").unlink()
    ex3 = Counting(PredictExecutor(CAL, Workload(isl=1000, osl=1000), [1, 16, 256]))
    run_sweep(items, ex3, out)
    assert ex3.seen == [r0.id]
    ex4 = Counting(PredictExecutor(CAL, Workload(isl=2000, osl=1000), [1, 16, 256]))
    run_sweep(items, ex4, out)
    assert len(ex4.seen) == len(items)
    assert len(load_results(out)) == len(items)


class Failing:
    """Stand-in for a measuring executor (launch + bench + teardown), which is not part of this build:
    it yields a ``failed`` result for the first item and delegates the rest to the model."""

    name = "measure-standin"

    def __init__(self) -> None:
        self.inner = PredictExecutor(CAL, Workload(), [1, 8])

    def key(self) -> dict:
        return {"executor": self.name}

    def run(self, items: Sequence[SweepItem]) -> Iterator[ItemResult]:
        first, rest = items[0], items[1:]
        yield ItemResult(
            id=first.id, status="failed", executor=self.name, key=self.key(), reason="rank 3 exited with code 1"
        )
        for r in self.inner.run(rest):
            r.key = self.key()
            r.executor = self.name
            yield r


def test_large_sweeps_write_topology_files_on_request(tmp_path: Path) -> None:
    from widep.perf.sweep import write_topologies

    items = small_items()
    res = run_sweep(items, PredictExecutor(CAL, Workload(), [1, 8]), tmp_path, topology_files_max=0)
    assert not list(tmp_path.glob("*/topology.yaml"))
    best = [it for it, r in zip(items, res, strict=False) if r.status == "ok"][:2]
    written = write_topologies(best, tmp_path)
    assert [p.parent.name for p in written] == [it.id for it in best]
    assert plan(load_topology(written[0])).total_gpus == best[0].gpus


def test_failures_are_recorded_and_retried(tmp_path: Path) -> None:
    items = [it for it in small_items() if it.feasible][:3]
    res = run_sweep(items, Failing(), tmp_path)
    assert res[0].status == "failed" and "rank 3" in res[0].reason
    stored = json.loads((tmp_path / items[0].id / "result.json").read_text())
    assert stored["status"] == "failed"
    again = Counting(Failing())  # type: ignore[arg-type]
    run_sweep(items, again, tmp_path)
    assert again.seen == [items[0].id]  # failed points are retried, finished ones are not


def test_frontier_matches_the_bench_definition() -> None:
    items = small_items()
    res = list(PredictExecutor(CAL, Workload(isl=1000, osl=1000)).run(items))
    pts = [(r, lv) for r in res if r.status == "ok" for lv in r.levels if lv["tps_user"]]
    expect = [pts[i] for i in pareto_front([(lv["tps_user"], lv["tps_gpu"]) for _, lv in pts])]
    got = frontier(res)
    assert [(r.id, lv["concurrency"]) for r, lv in got] == [(r.id, lv["concurrency"]) for r, lv in expect]
    # nothing beats a frontier point on both axes
    for _, f in got:
        assert not any(lv["tps_user"] > f["tps_user"] and lv["tps_gpu"] > f["tps_gpu"] for _, lv in pts)
    tight = frontier(res, max_ttft_ms=500)
    assert all(lv["ttft_ms"] <= 500 for _, lv in tight)
    # results read back from disk (plain dict levels) give the same frontiers as the executor's arrays
    plain = [ItemResult.from_dict(json.loads(json.dumps(r.as_dict()))) for r in res]
    assert [(r.id, lv) for r, lv in frontier(plain)] == [(r.id, lv) for r, lv in got]
    assert [(r.id, lv) for r, lv in frontier(plain, max_ttft_ms=500)] == [(r.id, lv) for r, lv in tight]


def test_levels_are_sorted_with_one_saturation_point() -> None:
    res = list(PredictExecutor(CAL, Workload(), [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]).run(small_items()))
    for r in res:
        if r.status != "ok":
            continue
        conc = [lv["concurrency"] for lv in r.levels]
        assert conc == sorted(conc) and len(set(conc)) == len(conc)
        assert sum(lv["saturation"] for lv in r.levels) == 1
        assert r.saturation is not None and r.saturation["saturation"]
        best = r.best(min_tps_user=1e9)
        assert best is None


def test_topology_items_keep_planner_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    doc = (ROOT / "topologies" / "deepseek-r1-prefill-1x8-h200.yaml").read_text().replace("gpu: H200", "gpu: H100")
    bad.write_text(doc)
    items = items_from_topologies([ROOT / "topologies" / "deepseek-r1-decode-2x8-h200.yaml", bad])
    assert items[0].feasible and not items[1].feasible
    assert items[1].category == "memory" and "does not fit in H100 memory" in items[1].reason


@pytest.fixture
def echo_run(tmp_path: Path) -> Iterator[Path]:
    """A real ``widep bench`` sweep against the real local echo server (widep.bench.echo_server)."""
    from widep.bench.loadgen import Level
    from widep.bench.report import stack_from_endpoints
    from widep.bench.sweep import SweepConfig
    from widep.bench.sweep import run_sweep as bench_sweep
    from widep.bench.workload import WorkloadSpec, parse_length

    proc = subprocess.Popen(
        [sys.executable, "-m", "widep.bench.echo_server", "--port", "0", "--ttft-ms", "2", "--itl-ms", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert line.startswith("PORT="), line
        url = f"http://127.0.0.1:{line[5:]}"
        cfg = SweepConfig(
            endpoints=(url,),
            model="echo",
            workload=WorkloadSpec(isl=parse_length("16"), osl=parse_length("8")),
            levels=(Level("concurrency", 1, num_requests=4), Level("concurrency", 4, num_requests=8)),
            stack=stack_from_endpoints([url], gpus=2, model="echo"),
            warmup_requests=0,
            scrape_interval_s=0.2,
            request_timeout_s=30,
        )
        out = tmp_path / "measured"
        bench_sweep(cfg, out)
        yield out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_plots_overlay_predicted_and_measured(tmp_path: Path, echo_run: Path) -> None:
    items = items_from_topologies(sorted((ROOT / "topologies").glob("deepseek-r1-*.yaml")))
    res = list(PredictExecutor(CAL, Workload(), [1, 8, 64, 512]).run(items))
    files = plot_sweep(res, tmp_path / "p" / "sweep", measured=[echo_run])
    names = sorted(f.name for f in files)
    assert names == ["sweep-latency.png", "sweep-latency.svg", "sweep-pareto.png", "sweep-pareto.svg"]
    svg = (tmp_path / "p" / "sweep-pareto.svg").read_text()
    assert "(measured)" in svg and "(predicted)" in svg
    # many candidates: scatter + frontier instead of lines
    many = list(PredictExecutor(CAL, Workload(isl=1000, osl=1000)).run(small_items()))
    files = plot_sweep(many, tmp_path / "q" / "sweep")
    assert (tmp_path / "q" / "sweep-pareto.png").stat().st_size > 10_000
    assert "frontier (predicted)" in (tmp_path / "q" / "sweep-pareto.svg").read_text()


def test_predicted_sweep_is_one_columnar_file_resumable_by_chunk(tmp_path: Path) -> None:
    """The predict executor stores results.jsonl (one line per chunk), reused on resume; a chunk cut short
    (a killed run) is recomputed alone; another workload starts the file afresh; results round-trip."""
    items = small_items()
    out = tmp_path / "sw"

    class Columnar(Counting):
        columnar = True

    ex = Columnar(PredictExecutor(CAL, Workload(isl=1000, osl=1000), [1, 16, 256]))
    res = run_sweep(items, ex, out, chunk=7)
    assert not [d for d in out.iterdir() if d.is_dir() and (d / "result.json").exists()]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == -(-len(items) // 7)
    back = {r.id: r for r in load_results(out)}
    assert [back[r.id].as_dict() for r in res] == [r.as_dict() for r in res]
    assert [back[r.id].saturation for r in res] == [r.saturation for r in res]
    ex2 = Columnar(PredictExecutor(CAL, Workload(isl=1000, osl=1000), [1, 16, 256]))
    run_sweep(items, ex2, out, chunk=7)
    assert ex2.seen == []
    # a run killed while writing its last chunk: that chunk's items (only) are recomputed
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    ex3 = Columnar(PredictExecutor(CAL, Workload(isl=1000, osl=1000), [1, 16, 256]))
    run_sweep(items, ex3, out, chunk=7)
    lost = set(json.loads(lines[-1])["items"]["id"])
    assert sorted(ex3.seen) == sorted(lost)
    ex4 = Columnar(PredictExecutor(CAL, Workload(isl=2000, osl=1000), [1, 16, 256]))
    run_sweep(items, ex4, out, chunk=7)
    assert len(ex4.seen) == len(items)
    assert len((out / "results.jsonl").read_text().splitlines()) == len(lines)
