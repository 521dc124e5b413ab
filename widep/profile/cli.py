"""``widep profile``: start vLLM's torch profiler on chosen ranks, drive load, stop it, gather the traces.

The ranks must have been started with the profiler configured (``widep launch --profile`` or
``profiler.enabled: true`` in the topology): vLLM registers ``/start_profile`` and ``/stop_profile``
only then. Traces are written by each rank into its profile directory on its own node; those on this
machine are copied into ``--out``, the others are listed with their node and path.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click

from widep.errors import UserError


def _targets(p, ranks: tuple[str, ...]):
    from widep.render.vllm import RenderContext, render

    cmds = [c for c in render(p, RenderContext(model_path="(profile)")) if c.port is not None]
    if not ranks:
        return cmds
    out = []
    for spec in ranks:
        role, _, num = spec.partition("/")
        hit = [c for c in cmds if c.role == role and (not num or int(num) in c.dp_ranks)]
        if not hit:
            valid = ", ".join(sorted({f"{c.role}/{r}" for c in cmds for r in c.dp_ranks}))
            raise UserError(f"--rank: {spec!r} matches no API server of {p.name}. Valid: {valid}.")
        out += [c for c in hit if c not in out]
    return out


def _post(host: str, port: int, path: str, timeout: float) -> str | None:
    from widep.run.control import http_json

    try:
        http_json(host, port, "POST", path, {}, timeout=timeout)
        return None
    except (OSError, ValueError) as err:
        return str(err)


@click.command("profile")
@click.argument("topology", type=click.Path(dir_okay=False))
@click.option("--rank", "ranks", multiple=True, help="role/N (repeatable); default every API server.")
@click.option(
    "--run-dir", type=click.Path(file_okay=False), required=True, help="The run directory of `widep launch --profile`."
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0.1),
    default=None,
    help="Profile for this long (your own load runs meanwhile).",
)
@click.option(
    "--requests",
    type=click.IntRange(min=1),
    default=None,
    help="Send this many requests while profiling (built-in load).",
)
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--isl", type=int, default=128, show_default=True, help="Input tokens per request (built-in load).")
@click.option("--osl", type=int, default=32, show_default=True, help="Output tokens per request (built-in load).")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Where traces are gathered (default <run-dir>/traces-<time>).",
)
@click.option(
    "--timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds to wait for /stop_profile (traces are written then).",
)
def profile_cmd(
    topology: str,
    ranks: tuple[str, ...],
    run_dir: str,
    seconds: float | None,
    requests: int | None,
    concurrency: int,
    isl: int,
    osl: int,
    out: str | None,
    timeout: float,
) -> int:
    """Capture vLLM's torch profiler on ranks of a running TOPOLOGY deployment."""
    from widep.plan import plan as make_plan
    from widep.render.vllm import RenderContext, profile_dir_of
    from widep.spec.topology import load_topology

    if (seconds is None) == (requests is None):
        raise UserError(
            "give exactly one of --seconds (profile while your own load runs) or --requests (built-in load)."
        )
    p = make_plan(load_topology(topology))
    targets = _targets(p, ranks)
    base = str((Path(run_dir) / "profiles").resolve())
    ctx = RenderContext(profile_dir=base)
    started = time.time()
    hosts = [(c, c.node_address) for c in targets]
    for c, h in hosts:
        err = _post(h, c.port, "/start_profile", 30)
        if err:
            hint = " (was it launched with --profile? vLLM serves /start_profile only then)" if "404" in err else ""
            raise UserError(f"{c.name} at {h}:{c.port}: /start_profile failed: {err}{hint}", exit_code=1)
    click.echo(f"profiling {', '.join(c.name for c in targets)}")
    try:
        if requests is not None:
            _drive_load([f"http://{h}:{c.port}" for c, h in hosts], requests, concurrency, isl, osl)
        else:
            time.sleep(seconds)  # type: ignore[arg-type]
    finally:
        errors = [f"{c.name}: {e}" for c, h in hosts if (e := _post(h, c.port, "/stop_profile", timeout))]
    if errors:
        raise UserError("/stop_profile failed on: " + "; ".join(errors), exit_code=1)
    dest = Path(out) if out else Path(run_dir) / f"traces-{time.strftime('%Y%m%d-%H%M%S')}"
    gathered, remote = [], []
    for c, _host in hosts:
        src = Path(profile_dir_of(p, ctx, c.role, c.dp_rank) or "")
        files = _wait_for_traces(src, started, 60.0)
        if not files:
            remote.append(f"{c.name}: no trace under {src} on this machine (on node {c.node_name}? copy it from there)")
            continue
        d = dest / c.role / f"rank-{c.dp_rank}"
        d.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, d / f.name)
            gathered.append(d / f.name)
    (dest.mkdir(parents=True, exist_ok=True))
    (dest / "traces.json").write_text(
        json.dumps(
            {"ranks": [c.name for c in targets], "files": [str(g) for g in gathered], "not_here": remote}, indent=2
        )
    )
    for g in gathered:
        click.echo(f"  {g} ({g.stat().st_size / 1024:.0f} KiB)")
    for r in remote:
        click.echo(f"  {r}")
    click.echo(f"{len(gathered)} trace file(s) in {dest}")
    return 0 if gathered else 1


def _wait_for_traces(src: Path, since: float, timeout: float) -> list[Path]:
    """Trace files written under ``src`` after ``since``, once their sizes stop changing."""
    end = time.time() + timeout
    last: dict[Path, int] = {}
    while time.time() < end:
        files = [f for f in src.rglob("*") if f.is_file() and f.stat().st_mtime >= since - 1] if src.is_dir() else []
        sizes = {f: f.stat().st_size for f in files}
        if files and sizes == last:
            return sorted(files)
        last = sizes
        time.sleep(1.0)
    return sorted(last)


def _drive_load(urls: list[str], n: int, concurrency: int, isl: int, osl: int) -> None:
    """``n`` requests at ``concurrency`` over ``urls``, for the model the servers say they serve."""
    from widep.bench.loadgen import Level, LoadGenerator, LoadOptions, run_sync
    from widep.bench.sweep import fetch_served_model
    from widep.bench.workload import LengthSpec, PromptBuilder, PromptPool, WorkloadSpec, build_prompts

    wl = WorkloadSpec(isl=LengthSpec(mean=isl), osl=LengthSpec(mean=osl))
    pool = PromptPool(build_prompts(wl, n, level_seed=1, builder=PromptBuilder(None)))

    async def go() -> None:
        model, _ = await fetch_served_model(urls[0])
        async with LoadGenerator(urls, LoadOptions(model=model)) as gen:
            run = await gen.run_level(Level("concurrency", concurrency, num_requests=n), pool)
            bad = [r for r in run.records if r.error]
            click.echo(
                f"load: {len(run.records) - len(bad)}/{len(run.records)} requests ok in {run.duration_s:.1f} s"
                + (f" (first error: {bad[0].error})" if bad else "")
            )

    run_sync(go())
