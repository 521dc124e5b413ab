"""``widep sweep``: enumerate topologies for a GPU budget (or take topology files), predict, Pareto frontier.

widep sweep --model deepseek-r1 --gpu H200 --gpus 16..64 --isl 2000 --osl 2000 --out sweeps/r1
widep sweep --topologies 'topologies/deepseek-r1-*.yaml' --concurrency 1..512 --predict
"""

from __future__ import annotations

import glob
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

from widep.errors import UserError

MAX_COUNT = 4096 * 72
"""Largest GPU count a topology can have (cluster.nodes <= 4096, gpus_per_node <= 72)."""
MAX_RANGE = 4096
"""Most counts one A..B range may list (each one is enumerated and planned)."""


def parse_int_set(text: str, what: str) -> list[int]:
    """'16..64' (every integer), '16,32,64' or '32'."""
    t = text.strip()
    try:
        if ".." in t:
            lo_s, hi_s = t.split("..", 1)
            lo, hi = int(lo_s), int(hi_s)
            if lo < 1 or hi < lo:
                raise ValueError
            vals = list(range(lo, min(hi, MAX_COUNT + 1) + 1)) if hi - lo < MAX_RANGE else [MAX_COUNT + 1]
            if hi - lo >= MAX_RANGE:
                raise UserError(
                    f"{what}: {text!r} spans {hi - lo + 1} counts. Valid: a range of at most {MAX_RANGE} "
                    f"counts (each is planned), values 1..{MAX_COUNT}."
                )
        else:
            vals = [int(x) for x in t.split(",") if x.strip()]
        if not vals or min(vals) < 1:
            raise ValueError
        if max(vals) > MAX_COUNT:
            raise UserError(
                f"{what}: {max(vals)} is more than widep plans. Valid: 1..{MAX_COUNT} "
                "(4096 nodes x 72 GPUs, the topology's limits)."
            )
        return sorted(set(vals))
    except ValueError:
        raise UserError(
            f"{what}: {text!r} is not a count list. Valid: A..B (e.g. 16..64), a comma list (16,32,64) or one number "
            ">= 1."
        ) from None


def parse_levels(text: str) -> list[float]:
    """'1..512' (1, 2, 4, ... 512: doubling from the low end, the high end included), '1,8,64' or '64'."""
    t = text.strip()
    try:
        if ".." in t:
            lo_s, hi_s = t.split("..", 1)
            lo, hi = float(lo_s), float(hi_s)
            if lo < 1 or hi < lo:
                raise ValueError
            out, x = [], lo
            while x <= hi:
                out.append(x)
                x *= 2
            if out[-1] != hi:
                out.append(hi)
            return out
        vals = [float(x) for x in t.split(",") if x.strip()]
        if not vals or min(vals) < 1:
            raise ValueError
        return sorted(set(vals))
    except ValueError:
        raise UserError(
            f"--concurrency: {text!r} is not valid. Valid: A..B (1..512: powers of two), a comma list (1,8,64) or one "
            "number >= 1."
        ) from None


def _csv(text: str | None, what: str, cast: Any = str, valid: list[str] | None = None) -> tuple[Any, ...] | None:
    if text is None:
        return None
    vals = [x.strip() for x in text.split(",") if x.strip()]
    if valid is not None:
        bad = [v for v in vals if v not in valid]
        if bad:
            raise UserError(f"{what}: {', '.join(bad)} not valid. Given: {text!r}. Valid: {', '.join(valid)}.")
    try:
        return tuple(cast(v) for v in vals)
    except ValueError:
        raise UserError(f"{what}: {text!r} must be a comma list of {cast.__name__}s.") from None


def _expand(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if any(ch in pat for ch in "*?[") else [pat]
        if not hits:
            raise UserError(
                f"--topologies: no file matches {pat!r}. Valid: topology YAML files or a glob such as "
                "'topologies/*.yaml'."
            )
        for h in hits:
            if not Path(h).is_file():
                raise UserError(f"--topologies: {h!r} is not a file. Valid: topology YAML files.")
        files += [h for h in hits if h not in files]
    return files


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


@click.command("sweep")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option(
    "--topologies",
    "topologies",
    default=None,
    help="Topology files to predict: a file or a quoted glob; more files may follow as arguments.",
)
@click.option("--model", default=None, help="Enumerate topologies of this model preset (e.g. deepseek-r1).")
@click.option("--gpu", default="H200", show_default=True, help="GPU kind of the budget.")
@click.option(
    "--gpus", "gpus_text", default=None, help="GPU counts of the budget: 16..64, 16,32,64 or 32 (whole nodes are used)."
)
@click.option("--gpus-per-node", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--isl", default=2000, show_default=True, type=click.IntRange(min=1), help="Input tokens per request.")
@click.option("--osl", default=2000, show_default=True, type=click.IntRange(min=1), help="Output tokens per request.")
@click.option(
    "--prefix-hit",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0.0, 0.99),
    help="Fraction of prompt tokens served from the prefix cache.",
)
@click.option(
    "--spec-tokens",
    default=None,
    type=click.IntRange(min=0),
    help="Speculative (MTP) draft tokens per step. Default: 0, or what each topology sets.",
)
@click.option(
    "--concurrency",
    "conc_text",
    default=None,
    help="Concurrency levels: 1..512 (powers of two), 1,8,64. Default: powers of two up to each sweep's capacity.",
)
@click.option("--predict", is_flag=True, help="Score with the analytic model (the default executor).")
@click.option(
    "--measure",
    is_flag=True,
    help="Launch each topology for real, benchmark it, tear it down (needs topology files and --out).",
)
@click.option(
    "--launch",
    "launch_backend",
    type=click.Choice(["bare-metal", "ray"]),
    default="bare-metal",
    show_default=True,
    help="With --measure: how points are launched.",
)
@click.option(
    "--requests-per-level",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --measure: requests per concurrency level.",
)
@click.option("--model-path", default=None, help="With --measure: what vLLM loads, overriding the topologies.")
@click.option(
    "--python", "vllm_python", default=None, help="With --measure: interpreter with vLLM for module entry points."
)
@click.option("--address", "ray_address", default=None, help="With --measure --launch ray: the Ray cluster address.")
@click.option(
    "--calibration",
    default="published",
    show_default=True,
    help="'published', 'auto:<GPU>' (newest profiling/results file) or a calibration file.",
)
@click.option("--modes", default="mixed,pd", show_default=True, help="Deployment shapes to enumerate: mixed, pd.")
@click.option("--tp", "tp_text", default=None, help="TP sizes to enumerate (default 1,2,4,8; P/D decode 1,2).")
@click.option(
    "--backends",
    default=None,
    help=(
        "all2all backends for mixed roles (default deepep_low_latency,deepep_high_throughput,allgather_reducescatter)."
    ),
)
@click.option(
    "--max-num-seqs", "mns_text", default=None, help="max_num_seqs values for mixed roles (default 64,128,256,512)."
)
@click.option(
    "--max-redundant",
    default=64,
    show_default=True,
    type=click.IntRange(min=0),
    help="Most redundant experts tried per role.",
)
@click.option("--vllm-version", default=None, help="vLLM version the candidates are for (default widep's).")
@click.option("--kv-cache-dtype", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp8"]))
@click.option(
    "--min-tps-user", type=float, default=None, help="SLO: rank candidates by tokens/s/GPU at >= this tokens/s/user."
)
@click.option("--max-ttft-ms", type=float, default=None, help="SLO: and TTFT <= this many ms.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write results here: results.jsonl (predicted, columnar, resumable by chunk) or one directory per "
    "measured point; summary.csv/json, plots, and topology.yaml of the frontier and the ranking's head.",
)
@click.option("--no-resume", is_flag=True, help="Recompute points already stored in --out.")
@click.option(
    "--measured",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="widep bench --out directories to overlay on the Pareto plot.",
)
@click.option("--top", default=15, show_default=True, type=click.IntRange(min=0), help="Rows per table (0: all).")
@click.option("--show-infeasible", is_flag=True, help="List infeasible candidates with the planner's reason.")
@click.option(
    "--arrival",
    type=click.Choice(["wave", "steady"]),
    default="wave",
    show_default=True,
    help="As for widep predict: wave (every user starts together) or steady (arrivals spread out).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
def sweep_cmd(
    files: tuple[str, ...],
    topologies: str | None,
    model: str | None,
    gpu: str,
    gpus_text: str | None,
    gpus_per_node: int,
    isl: int,
    osl: int,
    prefix_hit: float,
    spec_tokens: int | None,
    conc_text: str | None,
    predict: bool,
    calibration: str,
    modes: str,
    tp_text: str | None,
    backends: str | None,
    mns_text: str | None,
    max_redundant: int,
    vllm_version: str | None,
    kv_cache_dtype: str,
    min_tps_user: float | None,
    max_ttft_ms: float | None,
    out: Path | None,
    no_resume: bool,
    measured: tuple[Path, ...],
    top: int,
    show_infeasible: bool,
    as_json: bool,
    arrival: str = "wave",
    measure: bool = False,
    launch_backend: str = "bare-metal",
    requests_per_level: int = 16,
    model_path: str | None = None,
    vllm_python: str | None = None,
    ray_address: str | None = None,
) -> None:
    """Enumerate the topologies of a GPU budget (--model/--gpu/--gpus), or take topology files, and predict
    tokens/s/GPU, tokens/s/user, TTFT and TPOT at each concurrency; print the Pareto frontier."""
    from widep.perf.calibration import load_calibration
    from widep.perf.enumerate import Budget, Grid, enumerate_candidates
    from widep.perf.model import Workload
    from widep.perf.sweep import (
        PredictExecutor,
        frontier,
        items_from_candidates,
        items_from_topologies,
        plot_sweep,
        run_sweep,
        write_topologies,
    )
    from widep.spec.hardware import get_gpu
    from widep.spec.vllm_versions import ALL2ALL_ALL, default_version

    paths = ([topologies] if topologies else []) + list(files)
    if measure:
        if predict:
            raise UserError(
                "give --predict or --measure, not both (measure the short list a --predict sweep wrote: its "
                "topology.yaml files)."
            )
        if not paths or out is None:
            raise UserError(
                "--measure launches topology files for real: give --topologies FILES and --out DIR. "
                f"Given: files {paths or 'none'}, --out {out}."
            )
    if measured and out is None:
        raise UserError(
            f"--measured overlays bench runs on the plots that --out writes. Given: --measured {measured[0]} without "
            "--out. Valid: add --out DIR."
        )
    cal = load_calibration(calibration)
    levels = parse_levels(conc_text) if conc_text else None
    t0 = time.perf_counter()
    meta: dict[str, Any] = {"calibration": cal.summary()}
    if paths:
        if model or gpus_text:
            raise UserError(
                "give either topology files (--topologies) or a budget (--model, --gpus), not both. "
                f"Given: files {paths} and --model {model!r} --gpus {gpus_text!r}."
            )
        workload = Workload(isl=isl, osl=osl, prefix_hit=prefix_hit, spec_tokens=spec_tokens, arrival=arrival)
        items = items_from_topologies(_expand(paths))
        meta["topologies"] = [it.source for it in items]
        title = f"{len(items)} topology file(s)"
    else:
        if not model or not gpus_text:
            raise UserError(
                "widep sweep needs a budget (--model and --gpus, e.g. --model deepseek-r1 --gpu H200 --gpus 16..64) "
                "or topology files (--topologies 'topologies/*.yaml')."
            )
        mode_list = _csv(modes, "--modes", str, ["mixed", "pd"]) or ()
        grid_changes: dict[str, Any] = {"modes": mode_list, "max_redundant": max_redundant}
        tps = _csv(tp_text, "--tp", int)
        if tps:
            grid_changes["tp"] = tps
            grid_changes["pd_decode_tp"] = tps
        bks = _csv(backends, "--backends", str, list(ALL2ALL_ALL))
        if bks:
            grid_changes["backends"] = bks
        mns = _csv(mns_text, "--max-num-seqs", int)
        if mns:
            grid_changes["max_num_seqs"] = mns
        budget = Budget(
            model=model,
            gpu=gpu,
            gpus=tuple(parse_int_set(gpus_text, "--gpus")),
            gpus_per_node=gpus_per_node,
            isl=isl,
            osl=osl,
            vllm_version=vllm_version or default_version(get_gpu(gpu).device),
            kv_cache_dtype=kv_cache_dtype,
            spec_tokens=spec_tokens or 0,
            grid=Grid(**grid_changes),
        )
        cands = enumerate_candidates(budget)
        if not cands:
            raise UserError(
                f"--gpus: no candidate topology for {gpus_text!r} GPUs with {gpus_per_node} GPUs per node. "
                f"Valid: counts below one node, or multiples of {gpus_per_node} (whole nodes)."
            )
        workload = Workload(isl=isl, osl=osl, prefix_hit=prefix_hit, spec_tokens=None, arrival=arrival)
        items = items_from_candidates(cands)
        meta["budget"] = {
            "model": model,
            "gpu": gpu,
            "gpus": gpus_text,
            "gpus_per_node": gpus_per_node,
            "grid": budget.grid.__dict__,
        }
        title = f"{len(items)} candidates for {model} on {gpus_text} x {gpu}"
    meta["workload"] = workload.as_dict()
    if measure:
        from widep.perf.measure import MeasureExecutor, MeasureOptions

        assert out is not None
        executor: Any = MeasureExecutor(
            MeasureOptions(
                out=out,
                launch=launch_backend,
                concurrency=tuple(int(c) for c in (levels or [1, 4])),
                isl=isl,
                osl=osl,
                requests_per_level=requests_per_level,
                model_path=model_path,
                python=vllm_python,
                ray_address=ray_address,
            )
        )
    else:
        executor = PredictExecutor(cal, workload, levels)
    results = run_sweep(items, executor, out, resume=not no_resume, meta=meta)
    elapsed = time.perf_counter() - t0
    plots: list[Path] = []
    if out is not None and any(r.status == "ok" and any(lv.get("tps_user") for lv in r.levels) for r in results):
        plots = plot_sweep(results, out / "sweep", measured=measured)
    ok = [r for r in results if r.status == "ok"]
    bad = [r for r in results if r.status != "ok"]
    front = frontier(results, max_ttft_ms)
    by_id = {it.id: it for it in items}

    def ranked() -> list[tuple[Any, dict[str, Any]]]:
        rows = []
        for r in ok:
            lv = r.best(min_tps_user, max_ttft_ms) if (min_tps_user or max_ttft_ms) else r.saturation
            if lv is not None:
                rows.append((r, lv))
        return sorted(rows, key=lambda x: -x[1]["tps_gpu"])

    if out is not None:  # the topology files worth launching: the frontier and the ranking's head
        keep = {r.id for r, _ in front} | {r.id for r, _ in ranked()[: max(top, 15)]}
        write_topologies([by_id[i] for i in keep if i in by_id], out)

    if as_json:
        from widep.perf.sweep import summary_rows

        rows = summary_rows(results)
        if paths:
            for row, r in zip(rows, results, strict=False):
                row["levels"] = list(r.levels)
        for row in rows:
            if row["status"] != "ok" and by_id[row["id"]].planner_message is not None and not out:
                row["reason"] = by_id[row["id"]].planner_message() or row["reason"]
        doc = {
            "calibration": cal.summary(),
            "workload": workload.as_dict(),
            "levels": levels,
            "counts": {
                "candidates": len(results),
                "feasible": len(ok),
                "infeasible": dict(Counter(r.category or r.status for r in bad)),
            },
            "seconds": round(elapsed, 3),
            "candidates": rows,
            "ranked": [{"id": r.id, **lv} for r, lv in ranked()],
            "frontier": [{"id": r.id, **lv} for r, lv in front],
            "out": str(out) if out else None,
            "plots": [str(p) for p in plots],
        }
        click.echo(json.dumps(doc, indent=1, default=str))
        return

    from rich.console import Console
    from rich.table import Table

    con = Console()
    if not con.is_terminal:
        con = Console(width=170)
    cats = Counter(r.category or r.status for r in bad)
    con.print(
        f"[bold]{title}[/bold]: {len(ok)} feasible, {len(bad)} infeasible"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(cats.items()))})" if bad else "")
        + f"; {'measured' if measure else 'predicted'} in {elapsed:.2f} s"
    )
    con.print(
        f"workload ISL {isl} / OSL {osl}"
        + (f", prefix hit {prefix_hit:.0%}" if prefix_hit else "")
        + f"; calibration {cal.name} ({cal.fingerprint()})"
    )
    lim = top or None

    def level_table(title_: str, rows: list[tuple[Any, dict[str, Any]]], with_desc: bool) -> Table:
        t = Table(title=title_, title_justify="left", box=None, header_style="bold", pad_edge=False)
        t.add_column("candidate")
        t.add_column("GPUs", justify="right")
        if with_desc:
            t.add_column("layout")
        for col in ("conc", "batch/rank", "tok/s/GPU", "tok/s/user", "TTFT ms", "TPOT ms", "bound", "limit"):
            t.add_column(col, justify="right" if col not in ("bound", "limit") else "left")
        for r, lv in rows:
            cells = [r.id, str(r.gpus)] + ([r.description] if with_desc else [])
            cells += [
                f"{lv['concurrency']:g}" + ("*" if lv.get("saturation") else ""),
                _fmt(lv["batch_per_rank"]),
                _fmt(lv["tps_gpu"]),
                _fmt(lv.get("tps_user")),
                _fmt(lv.get("ttft_ms"), 0),
                _fmt(lv.get("tpot_ms")),
                lv["bound"],
                lv["limit"],
            ]
            t.add_row(*cells)
        return t

    if paths:
        for r in ok:
            con.print()
            con.print(f"[bold cyan]{r.id}[/] ({r.mode}, {r.gpus} GPUs): {r.description}")
            t = Table(box=None, header_style="bold", pad_edge=False)
            for col in (
                "concurrency",
                "batch/rank",
                "tok/s/GPU",
                "tok/s/user",
                "TTFT ms",
                "TPOT ms",
                "step ms",
                "input tok/s/GPU",
                "bound",
                "limit",
            ):
                t.add_column(col, justify="right" if col not in ("bound", "limit") else "left")
            for lv in r.levels:
                t.add_row(
                    f"{lv['concurrency']:g}" + ("*" if lv.get("saturation") else ""),
                    _fmt(lv["batch_per_rank"]),
                    _fmt(lv["tps_gpu"]),
                    _fmt(lv.get("tps_user")),
                    _fmt(lv.get("ttft_ms"), 0),
                    _fmt(lv.get("tpot_ms")),
                    _fmt(lv["step_ms"]),
                    _fmt(lv["input_tps_gpu"]),
                    lv["bound"],
                    lv["limit"],
                )
            con.print(t)
        con.print("[dim]* saturation: every rank at its largest batch (max_num_seqs, KV cache or token budget)[/dim]")
    else:
        slo = (
            " meeting "
            + ", ".join(
                x
                for x in (
                    f">= {min_tps_user:g} tok/s/user" if min_tps_user else "",
                    f"TTFT <= {max_ttft_ms:g} ms" if max_ttft_ms else "",
                )
                if x
            )
            if (min_tps_user or max_ttft_ms)
            else " at saturation"
        )
        rk = ranked()
        con.print()
        con.print(
            level_table(f"best tokens/s/GPU{slo} (top {min(len(rk), lim or len(rk))} of {len(rk)})", rk[:lim], False)
        )
        for r, _ in rk[:3]:
            con.print(f"  [dim]{r.id}: {r.description}[/dim]")
    if front:
        shown = front
        if lim and len(front) > lim:
            step = len(front) / lim
            shown = [front[int(i * step)] for i in range(lim)]
        con.print()
        title = (
            "Pareto frontier: tokens/s/user vs tokens/s/GPU"
            + (f", TTFT <= {max_ttft_ms:g} ms" if max_ttft_ms else "")
            + f" ({len(front)} points"
            + (f", {len(shown)} shown" if len(shown) < len(front) else "")
            + ")"
        )
        con.print(level_table(title, shown, False))
    if show_infeasible and bad:
        con.print()
        t = Table(title=f"infeasible ({len(bad)})", title_justify="left", box=None, header_style="bold", pad_edge=False)
        t.add_column("candidate")
        t.add_column("why")
        t.add_column("planner says", overflow="fold")
        for r in bad[:lim]:
            msg = r.reason
            it = by_id.get(r.id)
            if out is None and it is not None and it.planner_message is not None:
                msg = it.planner_message() or msg
            t.add_row(r.id, r.category, msg)
        con.print(t)
        if lim and len(bad) > lim:
            con.print(
                f"[dim]... and {len(bad) - lim} more (--top 0 shows all; --json and --out record every reason)[/dim]"
            )
    elif bad:
        con.print(
            f"[dim]{len(bad)} infeasible candidate(s): --show-infeasible lists them with the planner's reason.[/dim]"
        )
    if out is not None:
        store = f"{out}/<point>/result.json" if measure else f"{out}/results.jsonl"
        pngs = ", ".join(str(p) for p in plots if p.suffix == ".png") if plots else ""
        con.print(
            f"results: {store}, {out}/summary.csv, {out}/summary.json; "
            f"topologies: {out}/<candidate>/topology.yaml" + (f"; plots: {pngs}" if plots else "")
        )


def _dp_lb(plan_obj: Any, factor: float | None) -> dict[str, Any]:
    """How requests reach the DP ranks and what it costs: the busiest rank's load over the mean (lockstep)."""
    from widep.perf.model import balancer_of, dp_mode_of

    return {"factor": factor, "dp_mode": dp_mode_of(plan_obj), "front_door": balancer_of(plan_obj)}


def _band() -> dict[str, Any]:
    """Leave-one-out residuals of the public operating points (written by profiling/fidelity.py --write)."""
    from importlib import resources

    try:
        doc = json.loads((resources.files("widep.perf") / "data" / "fit-residuals.json").read_text())
    except FileNotFoundError:
        return {"rms_log": None, "points": 0}
    return doc


def predict_point_dict(
    plan_obj: Any,
    workload: Any,
    concurrency: float,
    cal: Any,
    engine: str = "vllm",
    role_overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One deployment at one concurrency: the JSON contract of ``widep predict`` (also what sweep rows hold)."""
    from widep.perf.model import SCHEDULE_NAMES, predict_plan

    mode, levels = predict_plan(
        plan_obj, workload, [concurrency], cal, saturation=False, engine=engine, role_overrides=role_overrides
    )
    lv = levels[0]
    gpus = sum(rp.spec.replicas * rp.dp_size * rp.tp_size for rp in plan_obj.roles)
    dec_gpus = sum(
        rp.spec.replicas * rp.dp_size * rp.tp_size for rp in plan_obj.roles if rp.kind in ("decode", "mixed")
    )
    bd = dict(lv.breakdown)
    mb = round(bd.get("micro_batches", 1.0))
    code = int(round(bd.pop("schedule", -1.0)))
    sched = SCHEDULE_NAMES[code] if mb > 1 and code >= 0 else "none (one micro-batch)"
    band = _band()
    rms = band.get("rms_log")

    def rng(x: float | None) -> list[float] | None:
        if x is None or rms is None:
            return None
        return [round(x * math.exp(-rms), 3), round(x * math.exp(rms), 3)]

    per_decode = lv.tps_gpu * gpus / dec_gpus if dec_gpus else None
    return {
        "topology": plan_obj.spec.name if hasattr(plan_obj, "spec") else None,
        "mode": mode,
        "engine": engine,
        "workload": workload.as_dict(),
        "concurrency": concurrency,
        "gpus": gpus,
        "decode_gpus": dec_gpus,
        "batch_per_rank": round(lv.batch_per_rank, 3),
        "tps_per_gpu": round(lv.tps_gpu, 3),
        "tps_per_decode_gpu": None if per_decode is None else round(per_decode, 3),
        "tps_per_user": None if lv.tps_user is None else round(lv.tps_user, 3),
        "ttft_ms": None if lv.ttft_ms is None else round(lv.ttft_ms, 3),
        "tpot_ms": None if lv.tpot_ms is None else round(lv.tpot_ms, 3),
        "requests_per_s": round(lv.requests_per_s, 4),
        "bound": lv.bound,
        "limit": lv.limit,
        "step_ms": bd,
        "dp_imbalance": _dp_lb(plan_obj, bd.get("dp_imbalance")),
        "overlap": {
            "schedule": sched,
            "micro_batches": mb,
            "hidden_ms": bd.get("overlap_hidden_ms"),
            "exposed_all2all_ms": bd.get("all2all_exposed_ms"),
            "sm_contention_ms": bd.get("sm_contention_ms"),
        },
        "uncertainty": {
            "method": "leave-one-out residuals of the public operating points (log RMS)",
            "rms_log": rms,
            "points": band.get("points", 0),
            "tps_per_gpu": rng(lv.tps_gpu),
            "tps_per_user": rng(lv.tps_user),
            "tpot_ms": rng(lv.tpot_ms),
            "ttft_ms": rng(lv.ttft_ms),
        },
        "calibration": cal.summary(),
    }


@click.command("predict")
@click.argument("topology", type=click.Path(dir_okay=False))
@click.option("--concurrency", required=True, type=click.FloatRange(min=1.0), help="Concurrent users (closed loop).")
@click.option("--isl", default=2000, show_default=True, type=click.IntRange(min=1), help="Input tokens per request.")
@click.option("--osl", default=2000, show_default=True, type=click.IntRange(min=1), help="Output tokens per request.")
@click.option(
    "--decode-context",
    type=click.FloatRange(min=1.0),
    default=None,
    help="Mean KV length of decoding sequences (default isl + osl/2).",
)
@click.option(
    "--mtp-acceptance",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Chance each further MTP draft token is accepted (default: the calibration's).",
)
@click.option(
    "--spec-tokens", default=None, type=click.IntRange(min=0), help="Draft tokens per step (default: the topology's)."
)
@click.option("--prefix-hit", default=0.0, show_default=True, type=click.FloatRange(0.0, 0.99))
@click.option(
    "--arrival",
    type=click.Choice(["wave", "steady"]),
    default="wave",
    show_default=True,
    help="wave: fixed-length closed loop, every user starts together (vllm bench, widep bench); steady: spread out.",
)
@click.option(
    "--engine",
    type=click.Choice(["vllm", "sglang", "deepseek"]),
    default="vllm",
    show_default=True,
    help="Whose overlap schedule to model.",
)
@click.option(
    "--calibration", default="published", show_default=True, help="'published', 'auto:<GPU>' or a calibration file."
)
@click.option(
    "--expert-load",
    type=click.Path(dir_okay=False),
    default=None,
    help="A recorded expert-load file (widep experts): its imbalance over the EP ranks replaces the calibration's "
    "routing skew.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def predict_cmd(
    topology: str,
    concurrency: float,
    isl: int,
    osl: int,
    decode_context: float | None,
    mtp_acceptance: float | None,
    spec_tokens: int | None,
    prefix_hit: float,
    arrival: str,
    engine: str,
    calibration: str,
    expert_load: str | None,
    as_json: bool,
) -> None:
    """Predict one deployment at one concurrency: tokens/s per GPU and per decode GPU, tokens/s/user, TTFT,
    TPOT, the step-time breakdown, the overlap schedule and an uncertainty band."""
    from widep.perf.calibration import load_calibration
    from widep.perf.model import Workload
    from widep.plan.core import plan
    from widep.spec.topology import load_topology

    cal = load_calibration(calibration)
    w = Workload(
        isl=isl,
        osl=osl,
        prefix_hit=prefix_hit,
        spec_tokens=spec_tokens,
        decode_context=decode_context,
        arrival=arrival,
        spec_acceptance=mtp_acceptance,
    )
    p = plan(load_topology(topology))
    overrides = None
    if expert_load:
        from widep.experts.advise import measured_skews

        overrides, skews = measured_skews(expert_load, p)
    d = predict_point_dict(p, w, concurrency, cal, engine, role_overrides=overrides)
    if expert_load:
        d["expert_load"] = {"file": expert_load, "roles": skews}
    if as_json:
        click.echo(json.dumps(d, indent=1))
        return
    u = d["uncertainty"]

    def band(key: str) -> str:
        r = u.get(key)
        return f"  [{_fmt(r[0])} .. {_fmt(r[1])}]" if r else ""

    click.echo(
        f"{d['topology']}: {d['mode']}, {d['gpus']} GPUs ({d['decode_gpus']} decode), engine {engine}, "
        f"concurrency {_fmt(concurrency, 0)}, isl {isl} osl {osl}, arrival {arrival}"
    )
    click.echo(f"  tokens/s per GPU        {_fmt(d['tps_per_gpu'])}{band('tps_per_gpu')}")
    click.echo(f"  tokens/s per decode GPU {_fmt(d['tps_per_decode_gpu'])}")
    click.echo(f"  tokens/s per user       {_fmt(d['tps_per_user'])}{band('tps_per_user')}")
    click.echo(f"  TTFT ms                 {_fmt(d['ttft_ms'])}{band('ttft_ms')}")
    click.echo(f"  TPOT ms                 {_fmt(d['tpot_ms'], 2)}{band('tpot_ms')}")
    click.echo(f"  batch per rank {_fmt(d['batch_per_rank'])}, bound by {d['bound']}, limited by {d['limit']}")
    ov = d["overlap"]
    click.echo(
        f"  overlap: {ov['schedule']}; hidden {_fmt(ov['hidden_ms'], 2)} ms, exposed all-to-all "
        f"{_fmt(ov['exposed_all2all_ms'], 2)} ms, SM contention {_fmt(ov['sm_contention_ms'], 2)} ms"
    )
    click.echo("  step (ms): " + ", ".join(f"{k[:-3]} {v:.2f}" for k, v in d["step_ms"].items() if k.endswith("_ms")))
    for name, sk in (d.get("expert_load") or {}).get("roles", {}).items():
        click.echo(
            f"  expert load {expert_load}: role {name} balancedness {sk['balancedness']:.3f} -> skew "
            f"{sk['skew']:.3f} (placement {sk['placement']})"
        )
    if u["rms_log"] is not None:
        click.echo(f"  band: leave-one-out log RMS {u['rms_log']:.3f} over {u['points']} public points")


def _fit_kernels(
    cal: Any, kernel_files: tuple[str, ...], moe_layer_files: tuple[str, ...], out: Path | None, as_json: bool
) -> Any:
    """``cal`` with expert_gemm / moe_phases fitted to the files; prints the per-shape table (or JSON)."""
    from dataclasses import replace as dc_replace

    import yaml

    from widep.perf import kernels as K
    from widep.perf.calibrate import calibration_document

    report: dict[str, Any] = {}
    if kernel_files:
        graph = [r for f in kernel_files for r in _deepgemm_rows(f, None)]
        graph_only = [r for r in graph if r.timing == "graph"]
        disp = K.measured_dispatch_us(graph_only)
        rows = graph_only + [r for f in kernel_files for r in _deepgemm_rows(f, disp) if r.timing != "graph"]
        cards = sorted({r.card for r in rows})
        eg = dc_replace(
            K.fit_expert_gemm(rows, disp),
            card="+".join(cards),
            source=", ".join(str(Path(f).name) for f in kernel_files),
        )
        cal = dc_replace(cal, expert_gemm=eg)
        report["expert_gemm"] = K.expert_gemm_doc(eg)
        report["gemm"] = K.gemm_fidelity(eg, rows)
    if moe_layer_files:
        prow = [r for f in moe_layer_files for r in K.read_moe_layer(f)]
        mp = K.fit_moe_phases(prow, cal.moe_phases)
        cal = dc_replace(cal, moe_phases=mp)
        report["moe_phases"] = K.moe_phases_doc(mp)
        report["phases"] = K.phase_fidelity(mp, prow)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(calibration_document(cal), sort_keys=False))
        report["calibration"] = str(out)
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return cal
    for r in report.get("gemm", []):
        click.echo(
            f"{r['card']:5s} {r['layout']:10s} {r['gemm']:7s} G={r['groups']:<3d} "
            f"rows/expert {r['rows_per_expert']:7.0f} measured {r['measured_us']:8.1f} us  "
            f"model {r['predicted_us']:8.1f} us  {r['error_pct']:+6.1f}%"
        )
    for r in report.get("phases", []):
        click.echo(
            f"{r['card']:5s} EP{r['ep']:<3d} {r['tokens']:6d} tokens {r['phase']:8s} "
            f"measured {r['measured_us']:8.1f} us model {r['predicted_us']:8.1f} us  {r['error_pct']:+6.1f}%"
        )
    if "expert_gemm" in report:
        click.echo(f"expert_gemm: {report['expert_gemm']}")
    if "moe_phases" in report:
        click.echo(f"moe_phases: {report['moe_phases']}")
    if out is not None:
        click.echo(f"calibration: {out} (widep sweep --calibration {out})")
    return cal


def _deepgemm_rows(path: str, dispatch_us: float | None) -> list[Any]:
    """Graph rows of a deepgemm_bench file; eager rows of a deep_kernels_bench file once the dispatch is known."""
    from widep.perf import kernels as K

    doc = json.loads(Path(path).read_text())
    if doc.get("format") in K.DEEPGEMM_FORMATS:
        return K.read_deepgemm(path) if dispatch_us is None else []
    return [] if dispatch_us is None else K.read_deepgemm(path, dispatch_us)


@click.command("calibrate")
@click.argument("run_dirs", nargs=-1, required=False, type=click.Path(file_okay=False))
@click.option(
    "--topology",
    "topologies",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="The topology each run measured: once for all runs, or once per run in order.",
)
@click.option(
    "--kernels",
    "kernel_files",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True),
    help="DeepGEMM measurements (profiling/gpu/deepgemm_bench.py JSON; deep_kernels_bench.py JSON as eager rows): "
    "fit the kernel-true expert GEMM terms to them.",
)
@click.option(
    "--moe-layer",
    "moe_layer_files",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True),
    help="MoE-layer runs (profiling/gpu/moe_layer_bench.py JSON): fit the non-GEMM phase terms to them.",
)
@click.option("--calibration", default="published", show_default=True, help="Starting calibration.")
@click.option(
    "--terms",
    default="host_step_us,kernel_gap_eager_us,a2a_latency_us,overlap_efficiency,request_overhead_us",
    show_default=True,
    help="Free terms to fit (those that move no prediction are left alone).",
)
@click.option(
    "--measure-host",
    "measure_host_threads",
    type=click.IntRange(min=1),
    default=None,
    help="Measure this machine's memory bandwidth and FLOP rate with N threads and record them as the "
    "topology's hardware kind (CPU runs).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the fitted calibration here (YAML); widep sweep/predict --calibration FILE use it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print fitted terms and residuals as JSON.")
def calibrate_cmd(
    run_dirs: tuple[str, ...],
    topologies: tuple[str, ...],
    kernel_files: tuple[str, ...],
    moe_layer_files: tuple[str, ...],
    calibration: str,
    terms: str,
    measure_host_threads: int | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """Fit the model's free terms (host time per step, kernel gap, all-to-all per-op latency, overlap
    efficiency) to measured `widep bench` runs of a deployment; print the residuals per point. With --kernels /
    --moe-layer, first fit the kernel-true expert GEMM and non-GEMM MoE phase terms to GPU measurements."""
    from dataclasses import replace as dc_replace

    import yaml

    from widep.perf.calibrate import (
        TERMS,
        calibration_document,
        fit_runs,
        measure_host,
        read_run,
        residual_rows,
    )
    from widep.perf.calibration import load_calibration
    from widep.plan.core import plan
    from widep.spec.topology import load_topology

    cal = load_calibration(calibration)
    if kernel_files or moe_layer_files:
        cal = _fit_kernels(cal, kernel_files, moe_layer_files, out if not run_dirs else None, as_json)
        if not run_dirs:
            return
    if not run_dirs:
        raise UserError("calibrate: give measured run directories (with --topology), or --kernels / --moe-layer files.")
    if not topologies:
        raise UserError("--topology: required with run directories (the topology each run measured).")
    if len(topologies) not in (1, len(run_dirs)):
        raise UserError(
            f"--topology: give one for all runs or one per run. Given: {len(topologies)} for {len(run_dirs)} runs."
        )
    plans = [plan(load_topology(t)) for t in topologies]
    if len(plans) == 1:
        plans = plans * len(run_dirs)
    host: dict[str, float] | None = None
    if measure_host_threads:
        host = measure_host(measure_host_threads)
        kinds = {p.gpu.name for p in plans}
        figs = {f: host[f] for f in ("hbm_tbps", "bf16_tflops", "fp8_tflops")}
        cal = dc_replace(cal, hardware={**cal.hardware, **{k: dict(figs) for k in kinds}})
    runs = [(p, read_run(d)) for p, d in zip(plans, run_dirs, strict=True)]
    wanted = tuple(t.strip() for t in terms.split(",") if t.strip())
    bad = [t for t in wanted if t not in TERMS]
    if bad:
        raise UserError(f"--terms: {', '.join(bad)} not a free term. Valid: {', '.join(TERMS)}.")
    fitted, live = fit_runs(runs, cal, wanted)
    rows = residual_rows(runs, cal, fitted)
    terms_out = {t: round(float(getattr(fitted, t)), 4) for t in live if t != "a2a_latency_us"}
    if "a2a_latency_us" in live:
        terms_out["a2a_latency_us"] = {t.backend: t.latency_us for t in fitted.a2a}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(calibration_document(fitted), sort_keys=False))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "fitted": terms_out,
                    "hardware": fitted.hardware,
                    "host_measured": host,
                    "points": rows,
                    "calibration": str(out) if out else None,
                },
                indent=1,
            )
        )
        return
    click.echo(
        f"fitted {', '.join(live) or 'nothing (no term moves these predictions)'} to "
        f"{len(rows)} measured levels of {len(run_dirs)} run(s): {terms_out}"
    )
    if host:
        click.echo(
            f"host: memory {host['hbm_tbps'] * 1e3:.1f} GB/s, matmul {host['bf16_tflops'] * 1e3:.1f} GFLOP/s "
            f"({int(host['threads'])} thread(s))"
        )
    click.echo(
        f"{'run':24s} {'level':6s} {'conc':>5s} {'tok/s/GPU meas':>14s} {'pred':>9s} {'err':>7s} "
        f"{'(before)':>9s} "
        f"{'TPOT ms meas':>12s} {'pred':>8s} {'err':>7s} {'(before)':>9s}"
    )
    for r in rows:

        def pc(x: Any) -> str:
            return "-" if x is None else f"{x:+.0f}%"

        click.echo(
            f"{r['run'][:24]:24s} {r['level']:6s} {r['concurrency']:5.0f} {r['measured_tps_gpu']:14.2f} "
            f"{r['predicted_tps_gpu']:9.2f} {pc(r['error_tps_pct']):>7s} {pc(r['error_tps_pct_before']):>9s} "
            f"{_fmt(r['measured_tpot_ms'], 2):>12s} {_fmt(r['predicted_tpot_ms'], 2):>8s} "
            f"{pc(r['error_tpot_pct']):>7s} {pc(r['error_tpot_pct_before']):>9s}"
        )
    if out is not None:
        click.echo(f"calibration: {out} (widep sweep --calibration {out})")
