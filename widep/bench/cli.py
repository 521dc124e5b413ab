"""``widep bench``: concurrency / rate sweeps against live endpoints, and plots of them.

    widep bench --endpoint http://10.0.0.5:8000 --endpoint http://10.0.0.5:8001 --gpus 16 \\
                --concurrency 1,8,32 --isl 1000 --osl 100 --out runs/r1-decode
    widep bench --topology topologies/deepseek-r1-decode-2x8-h200.yaml --concurrency 1,8,32 ...
    widep bench plot runs/r1-decode runs/r1-pd -o runs/compare

``widep bench ARGS`` is short for ``widep bench run ARGS``: a first argument that is not a
subcommand name runs a sweep.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from widep.errors import UserError


class _RunByDefault(click.Group):
    """A group whose default subcommand is ``run``: ``widep bench --endpoint ...`` runs a sweep."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_RunByDefault, no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
def bench_cmd() -> None:
    """Benchmark live OpenAI-compatible endpoints; write llm-d reports; plot them.

    `widep bench ARGS` is the same as `widep bench run ARGS`.
    """


def _int_list(text: str | None, field: str) -> list[int]:
    if not text:
        return []
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            v = int(part)
        except ValueError:
            raise UserError(
                f"{field} takes whole numbers separated by commas. Given: {text!r}. Valid: 1,8,32"
            ) from None
        if v < 1:
            raise UserError(f"{field} values must be >= 1. Given: {v}. Valid: 1,8,32")
        out.append(v)
    return out


def _float_list(text: str | None, field: str) -> list[float]:
    if not text:
        return []
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise UserError(f"{field} takes numbers separated by commas. Given: {text!r}. Valid: 0.5,1,2") from None
        if not v > 0 or math.isinf(v):
            raise UserError(f"{field} values must be finite and > 0. Given: {part}. Valid: 0.5,1,2")
        out.append(v)
    return out


def _has_tokenizer(path: str | None) -> bool:
    if not path:
        return False
    p = Path(path)
    return p.is_dir() and any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _checked_endpoint(url: str) -> str:
    """``url`` when it is an http(s) base URL with a host and a valid port; UserError before anything runs."""
    from urllib.parse import urlsplit

    from widep.render.quoting import control_problem

    why = control_problem(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        parts, port, why = None, None, why or str(err)
    if why is None and parts is not None:
        if parts.scheme not in ("http", "https"):
            why = f"the scheme must be http or https, not {parts.scheme or 'missing'!r}"
        elif not parts.hostname:
            why = "there is no host"
        elif port is not None and not 1 <= port <= 65535:
            why = f"port {port} is out of range"
        elif parts.query or parts.fragment:
            why = "a base URL has no query or fragment"
    if why:
        raise UserError(
            f"--endpoint: not an API server base URL ({why}). Given: {url!r}. Valid: e.g. http://10.0.0.5:8000"
        )
    return url


def _endpoints_from_topology(path: str, via_router: bool = True) -> tuple[list[str], int, str]:
    try:
        from widep.plan.api import endpoints_for_topology  # provided by the planner
    except ImportError as err:
        raise UserError(
            f"--topology needs widep.plan.api.endpoints_for_topology, which this installation does not have ({err}). "
            f"Given: --topology {path}. Valid: --endpoint URL (one per rank) with --gpus N"
        ) from None
    urls, gpus, model = endpoints_for_topology(path, via_router=via_router)
    return list(urls), int(gpus), str(model)


@bench_cmd.command("run", context_settings={"show_default": True})
@click.option(
    "--endpoint", "endpoints", multiple=True, metavar="URL", help="API server base URL; repeat once per rank."
)
@click.option(
    "--topology",
    type=click.Path(exists=True, dir_okay=False),
    help="Topology file: endpoints, GPU count and model from its plan (through its router, when it has one).",
)
@click.option(
    "--bypass-router",
    is_flag=True,
    help="With --topology: send load straight to every API server even when the topology has a router.",
)
@click.option("--gpus", type=int, help="GPUs serving the endpoints (for tokens/s/GPU). Required with --endpoint.")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Sweep directory (resumed if it exists)."
)
@click.option("--concurrency", help="Closed-loop concurrency levels, e.g. 1,8,32.")
@click.option("--rate", help="Open-loop Poisson request rates in requests/s, e.g. 1,2,4.")
@click.option("--isl", help="Input length: N, uniform:LO-HI, normal:MEAN,STD, lognormal:MEAN,STD.")
@click.option("--osl", help="Output length, same forms as --isl.")
@click.option("--shape", help="Named ISL/OSL preset: 10:1, 100:1, 1k:100, 2k:2k, 5k:250.")
@click.option("--model", help="Served model name (default: the first of /v1/models).")
@click.option(
    "--tokenizer",
    type=click.Path(),
    help="Local tokenizer dir for exact prompt lengths (default: the model dir when local).",
)
@click.option("--num-requests", type=int, help="Requests per level (default: 10 x concurrency; 60 s worth of a rate).")
@click.option("--duration", type=float, help="Seconds per level instead of a request count.")
@click.option("--warmup", type=int, help="Warm-up requests before the first level run  [default: one per endpoint]")
@click.option("--slo-ttft-ms", type=float, help="Goodput SLO on time to first token.")
@click.option("--slo-tpot-ms", type=float, help="Goodput SLO on time per output token.")
@click.option("--slo-e2e-ms", type=float, help="Goodput SLO on end-to-end latency.")
@click.option(
    "--generator", type=click.Choice(["builtin", "vllm", "inference-perf"]), default="builtin", help="Load generator."
)
@click.option(
    "--burstiness", type=float, default=1.0, help="Open loop: gamma shape of inter-arrival times (1 = Poisson)."
)
@click.option("--max-inflight", type=int, help="Open loop: cap on requests in flight.")
@click.option("--request-timeout", type=float, default=600.0, help="Seconds per request.")
@click.option("--level-timeout", type=float, help="Hard bound in seconds per level; unfinished requests are cancelled.")
@click.option(
    "--scrape-interval", type=float, default=1.0, help="Seconds between /metrics scrapes; 0 turns scraping off."
)
@click.option("--seed", type=int, default=0, help="Seed for lengths, prompts and arrivals.")
@click.option("--ignore-eos/--no-ignore-eos", default=True, help="Ask the server to ignore EOS so output lengths hold.")
@click.option("--extra-body", help="JSON object merged into every request body, e.g. '{\"temperature\": 0}'.")
@click.option("--accelerator", default="unknown", help="Accelerator model for the report, e.g. H200.")
@click.option("--tp", type=int, help="Tensor parallel size per rank (default: GPUs / endpoints).")
@click.option("--ep", type=int, help="Expert parallel size (default: all GPUs; 1 for dense models).")
@click.option(
    "--role", type=click.Choice(["replica", "prefill", "decode"]), default="replica", help="Role of the endpoints."
)
@click.option("--label", help="Name of this run in plots and the CSV (default: the --out directory name).")
@click.option("--description", help="Free text stored in every report.")
@click.option(
    "--vllm-python", type=click.Path(dir_okay=False), help="Python with vllm for --generator vllm (default: this one)."
)
@click.option("--no-uvloop", is_flag=True, help="Use asyncio's default event loop even if uvloop is installed.")
def run_cmd(**kw: Any) -> None:
    """Run (or resume) a sweep of concurrency and/or rate levels."""
    from widep.bench import sweep as sw
    from widep.bench.loadgen import Level, normalize_endpoint, run_sync
    from widep.bench.report import stack_from_endpoints
    from widep.bench.stats import Slo
    from widep.bench.workload import PRESETS, WorkloadSpec, parse_length, preset

    notes: list[str] = []
    endpoints = [_checked_endpoint(normalize_endpoint(e)) for e in kw["endpoints"]]
    gpus = kw["gpus"]
    model = kw["model"]
    topo_model: str | None = None
    if kw["topology"]:
        if endpoints:
            raise UserError(
                f"give either --topology or --endpoint, not both. Given: --topology {kw['topology']} and "
                f"--endpoint {' '.join(endpoints)}"
            )
        endpoints, topo_gpus, topo_model = _endpoints_from_topology(
            kw["topology"], via_router=not kw.get("bypass_router")
        )
        endpoints = [normalize_endpoint(e) for e in endpoints]
        if gpus is not None and gpus != topo_gpus:
            raise UserError(
                f"--gpus disagrees with the topology's plan. Given: --gpus {gpus}. Valid: {topo_gpus} (or leave it out)"
            )
        gpus = topo_gpus
    if not endpoints:
        raise UserError(
            "no endpoints to benchmark. Given: neither --endpoint nor --topology. Valid: --endpoint URL (repeat per "
            "rank) or --topology FILE"
        )
    if len(set(endpoints)) != len(endpoints):
        raise UserError(f"--endpoint lists a URL twice. Given: {', '.join(endpoints)}. Valid: each rank's URL once")
    if gpus is None:
        raise UserError(
            "--gpus is required with --endpoint (tokens/s/GPU needs it). Given: no --gpus. Valid: the number of GPUs "
            "serving these endpoints, e.g. --gpus 16"
        )
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1. Given: {gpus}")

    concs = _int_list(kw["concurrency"], "--concurrency")
    rates = _float_list(kw["rate"], "--rate")
    if not concs and not rates:
        raise UserError(
            "no levels to run. Given: neither --concurrency nor --rate. Valid: --concurrency 1,8,32 and/or --rate 1,2,4"
        )
    if kw["num_requests"] is not None and kw["duration"] is not None:
        raise UserError(
            f"give --num-requests or --duration, not both. Given: --num-requests {kw['num_requests']} --duration "
            f"{kw['duration']:g}"
        )
    if kw["num_requests"] is not None and kw["num_requests"] < 1:
        raise UserError(f"--num-requests must be >= 1. Given: {kw['num_requests']}")
    if kw["duration"] is not None and not kw["duration"] > 0:
        raise UserError(f"--duration must be > 0 seconds. Given: {kw['duration']}")
    if kw["burstiness"] <= 0:
        raise UserError(
            f"--burstiness must be > 0. Given: {kw['burstiness']}. Valid: 1 for Poisson, <1 burstier, >1 smoother"
        )

    # workload
    isl_text, osl_text = kw["isl"], kw["osl"]
    shape = kw["shape"]
    if shape:
        p = preset(shape)
        isl_text = isl_text or str(p.isl)
        osl_text = osl_text or str(p.osl)
    if not isl_text or not osl_text:
        raise UserError(
            f"input and output lengths are needed. Given: --isl {isl_text} --osl {osl_text}. "
            f"Valid: --isl 1000 --osl 100, or --shape one of {', '.join(PRESETS)}"
        )
    extra_body: dict[str, Any] = {}
    if kw["extra_body"]:
        try:
            extra_body = json.loads(kw["extra_body"])
        except json.JSONDecodeError as err:
            raise UserError(
                f"--extra-body is not JSON ({err}). Given: {kw['extra_body']!r}. Valid: '{{\"temperature\": 0}}'"
            ) from None
        if not isinstance(extra_body, dict):
            raise UserError(f"--extra-body must be a JSON object. Given: {kw['extra_body']!r}")

    served_root: str | None = None
    if model is None:
        model, served_root = run_sync(sw.fetch_served_model(endpoints[0]), use_uvloop=False)
        notes.append(f"model: {model} (from {endpoints[0]}/v1/models)")
    tokenizer = kw["tokenizer"]
    if tokenizer is None:
        for cand in (topo_model, served_root, model):
            if _has_tokenizer(cand):
                tokenizer = cand
                notes.append(f"tokenizer: {cand} (the model directory)")
                break
    workload = WorkloadSpec(
        isl=parse_length(isl_text, field="--isl"),
        osl=parse_length(osl_text, field="--osl"),
        ignore_eos=kw["ignore_eos"],
        seed=kw["seed"],
        tokenizer=tokenizer,
        shape=shape,
        extra_body=extra_body,
    )

    levels: list[Level] = []
    for c in concs:
        if kw["duration"] is not None:
            levels.append(Level("concurrency", c, duration_s=kw["duration"]))
        else:
            levels.append(Level("concurrency", c, num_requests=kw["num_requests"] or max(10 * c, 20)))
    for r in rates:
        common = {"burstiness": kw["burstiness"], "max_inflight": kw["max_inflight"]}
        if kw["duration"] is not None:
            levels.append(Level("rate", r, duration_s=kw["duration"], **common))
        else:
            levels.append(Level("rate", r, num_requests=kw["num_requests"] or max(20, math.ceil(60 * r)), **common))

    stack = stack_from_endpoints(
        endpoints,
        gpus=gpus,
        model=topo_model or model,
        accelerator=kw["accelerator"],
        tp=kw["tp"],
        ep=kw["ep"],
        role=kw["role"],
    )
    cfg = sw.SweepConfig(
        endpoints=tuple(endpoints),
        model=model,
        workload=workload,
        levels=tuple(levels),
        stack=stack,
        generator=kw["generator"],
        slo=Slo(kw["slo_ttft_ms"], kw["slo_tpot_ms"], kw["slo_e2e_ms"]),
        warmup_requests=kw["warmup"] if kw["warmup"] is not None else len(endpoints),
        request_timeout_s=kw["request_timeout"],
        level_timeout_s=kw["level_timeout"],
        scrape_interval_s=kw["scrape_interval"] or None,
        label=kw["label"],
        description=kw["description"],
        use_uvloop=not kw["no_uvloop"],
        vllm_python=kw["vllm_python"],
    )
    if cfg.generator == "vllm":
        from widep.bench import adapters

        if not adapters.vllm_python_ok(cfg.vllm_python):
            raise UserError(
                "--generator vllm needs vLLM importable. Given: --generator vllm"
                + (f" --vllm-python {cfg.vllm_python}" if cfg.vllm_python else "")
                + ". Valid: builtin, or a Python with vllm via --vllm-python"
            )
        if workload.tokenizer is None:
            raise UserError("--generator vllm needs --tokenizer DIR (it builds its own prompts). Given: no --tokenizer")
        for lv in levels:  # argument checks before anything runs
            adapters.vllm_bench_argv(cfg, endpoints[0], 1, 1, lv, Path("."), "x.json")
            if lv.kind == "concurrency" and lv.num_requests is None:
                raise UserError("--generator vllm needs --num-requests for concurrency levels. Given: --duration")
    if cfg.generator == "inference-perf":
        from widep.bench import adapters

        if adapters.inference_perf_command() is None:
            raise UserError(
                "--generator inference-perf needs the inference-perf command, which is not installed. "
                "Given: --generator inference-perf. Valid: builtin, vllm, or `pip install inference-perf` first"
            )

    outcomes = _run_with_progress(cfg, Path(kw["out_dir"]), notes)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise UserError(
            f"{len(failed)} of {len(outcomes)} levels failed ({', '.join(o.level.id for o in failed)}); see "
            f"level-<id>.failure.json in {kw['out_dir']}. Run the same command again to retry them.",
            exit_code=1,
        )


def _run_with_progress(cfg: Any, out: Path, notes: list[str]) -> list[Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from widep.bench import sweep as sw

    console = Console(stderr=True)
    for n in notes:
        console.print(f"[dim]{n}[/dim]")
    console.print(
        f"widep bench: {len(cfg.endpoints)} endpoint(s), {cfg.gpus} GPU(s), model {cfg.model}, "
        f"ISL {cfg.workload.isl.describe()} OSL {cfg.workload.osl.describe()}, generator {cfg.generator} → {out}"
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[errors]} errors"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:

        class _P:
            task: Any = None
            errors = 0

            def note(self, message: str) -> None:
                bar.console.print(f"[yellow]note:[/yellow] {message}")

            def level_start(self, level: Any, expected: int | None) -> None:
                self.errors = 0
                self.task = bar.add_task(f"level {level.id}", total=expected, errors=0)

            def request_done(self, rec: Any) -> None:
                if not rec.ok:
                    self.errors += 1
                bar.update(self.task, advance=1, errors=self.errors)

            def level_end(self, level: Any, outcome: Any) -> None:
                if outcome.status == "skipped":
                    bar.console.print(f"level {level.id}: done earlier, skipped")
                elif outcome.status == "failed":
                    bar.console.print(f"[red]level {level.id} failed:[/red] {outcome.error}")
                if self.task is not None:
                    t = bar.tasks[-1]
                    bar.update(self.task, total=t.completed or t.total)
                    self.task = None

        outcomes = sw.run_sweep(cfg, out, _P())

    table = Table(title=f"{out}", show_lines=False)
    for col in (
        "level",
        "status",
        "ok",
        "failed",
        "out tok/s",
        "tok/s/GPU",
        "tok/s/user",
        "TTFT p50 ms",
        "TPOT p50 ms",
    ):
        table.add_column(col, justify="right")

    def f(v: Any, nd: int = 1) -> str:
        return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

    for o in outcomes:
        s = o.summary or {}
        table.add_row(
            o.level.id,
            o.status,
            f(s.get("completed")),
            f(s.get("failed")),
            f(s.get("output_tps")),
            f(s.get("output_tps_per_gpu")),
            f(s.get("tps_per_user")),
            f((s.get("ttft_ms") or {}).get("p50")),
            f((s.get("tpot_ms") or {}).get("p50"), 2),
        )
    Console().print(table)
    return outcomes


@bench_cmd.command("plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "prefix", type=click.Path(), help="Output prefix [default: FIRST_DIR/plot].")
def plot_cmd(run_dirs: tuple[str, ...], prefix: str | None) -> None:
    """Pareto (tokens/s/user vs tokens/s/GPU), latency and distribution plots of sweeps; PNG and SVG."""
    from widep.bench.plot import plot_runs

    dirs = [Path(d) for d in run_dirs]
    files = plot_runs(dirs, Path(prefix) if prefix else dirs[0] / "plot")
    for p in files:
        click.echo(str(p))


@bench_cmd.command("chaos", context_settings={"show_default": True})
@click.argument("topology", type=click.Path(exists=True, dir_okay=False))
@click.option("--kill", "target", required=True, help="What to SIGKILL: ROLE/RANK[:api|:engine], e.g. serve/1:engine.")
@click.option("--at", "at_s", type=click.FloatRange(min=0), default=20.0, help="Seconds into the load to kill it.")
@click.option("--duration", type=click.FloatRange(min=1), default=60.0, help="Seconds of streaming load per run.")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, help="Concurrent streaming clients.")
@click.option("--repeat", type=click.IntRange(min=1), default=1, help="Runs (a fresh deployment each); medians.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, help="max_tokens of each request.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (medians, policy, every run).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="PNG of tokens/s over time per run.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Where launch logs go [default: a temp dir].")
@click.option("--model-path", help="Passed to widep launch (--model-path).")
@click.option("--python", "vllm_python", help="Passed to widep launch (--python).")
@click.option("--launch-arg", "launch_args", multiple=True, help="More `widep launch` arguments, repeatable.")
@click.option("--ready-timeout", type=float, default=900.0, help="Seconds to wait for the router to be ready.")
def chaos_cmd(
    topology: str,
    target: str,
    at_s: float,
    duration: float,
    concurrency: int,
    repeat: int,
    max_tokens: int,
    as_json: bool,
    plot_path: str | None,
    out_dir: str | None,
    model_path: str | None,
    vllm_python: str | None,
    launch_args: tuple[str, ...],
    ready_timeout: float,
) -> None:
    """Start TOPOLOGY behind its router, stream load, SIGKILL one rank's process, and report what it cost."""
    import tempfile

    from widep.bench.chaos import Target, medians, plot_runs
    from widep.plan import plan as make_plan
    from widep.run.chaos import run_once
    from widep.spec.topology import load_topology

    try:
        Target.parse(target)
    except ValueError as err:
        raise UserError(str(err)) from None
    if at_s >= duration:
        raise UserError(
            f"--at: {at_s:g} s is not inside the load (--duration {duration:g} s). Valid: 0 <= at < duration."
        )
    p = make_plan(load_topology(topology))
    if p.router is None:
        raise UserError(
            f"{topology}: router.enabled is false; the chaos benchmark measures the front door. Valid: a topology "
            "with a router section (router.enabled: true, router.port)."
        )
    args = list(launch_args)
    if model_path:
        args += ["--model-path", model_path]
    if vllm_python:
        args += ["--python", vllm_python]
    base = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="widep-chaos-"))
    runs = []
    for i in range(repeat):
        summary, records = run_once(
            Path(topology),
            p,
            target,
            at_s,
            duration,
            concurrency,
            base / f"run-{i + 1}",
            args,
            ready_timeout,
            max_tokens,
        )
        runs.append((summary, records))
        if not as_json:
            click.echo(json.dumps(summary))
    doc = {"target": runs[0][0]["target"], "policy": runs[0][0]["policy"], **medians([s for s, _ in runs])}
    doc["repeats"] = repeat
    doc["runs"] = [s for s, _ in runs]
    if plot_path:
        doc["plot"] = str(plot_runs(runs, Path(plot_path)))
    click.echo(json.dumps(doc, indent=None if as_json else 2))
