"""``widep launch`` and ``widep status``."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import click

from widep.errors import UserError
from widep.plan import plan as make_plan
from widep.plan.core import DeploymentPlan
from widep.render.vllm import RenderContext, render
from widep.render.vllm import model_path as rendered_model_path  # the CLI's --model-path parameter shadows the bare name
from widep.run.state import RestartPolicy
from widep.spec.topology import load_topology

DEFAULT_TOPOLOGY = "tiny-moe-cpu.yaml"


def default_topology() -> Path:
    """topologies/tiny-moe-cpu.yaml: in the working directory, else beside the package's source tree."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = base / "topologies" / DEFAULT_TOPOLOGY
        if p.is_file():
            return p
    raise UserError(f"no topology given and the built-in default topologies/{DEFAULT_TOPOLOGY} was not found. Give a topology file.")


def launch_context(p: DeploymentPlan, python: str | None, model: str | None, build: bool) -> RenderContext:
    """Host facts for rendering on this machine (the only place they are gathered)."""
    from widep.render.cli import resolve_model_path

    py = python
    if py is None and p.spec.vllm.entry_point == "module" and p.spec.vllm.python == "python" and importlib.util.find_spec("vllm"):
        py = sys.executable  # the interpreter running widep has vLLM: use it, whatever `python` is on PATH
    return RenderContext(
        model_path=resolve_model_path(p, model, build=build),
        cpu_count=os.cpu_count() if p.device == "cpu" else None,
        python=py,
    )


def smoke_completion(p: DeploymentPlan, ctx: RenderContext, prompt: str, max_tokens: int) -> int:
    """Send one completion to the first endpoint and print it (the demo's last step)."""
    from widep.run.control import http_json

    role, host, port = p.endpoints()[0]
    if p.router is not None:
        from widep.render.vllm import render_router

        rc = render_router(p, ctx)
        role, host, port = "router", (p.nodes[p.router.node].address or p.nodes[p.router.node].name), rc.port
    model = p.spec.model.served_model_name or rendered_model_path(p, ctx)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    t = time.perf_counter()
    try:
        r = http_json(host, port, "POST", "/v1/completions", body, timeout=120)
    except (OSError, ValueError) as err:
        click.echo(f"completion from http://{host}:{port} failed: {err}", err=True)
        return 1
    dt = time.perf_counter() - t
    text = r["choices"][0]["text"]
    usage = r.get("usage", {})
    click.echo(f"\ncompletion from {role} at http://{host}:{port}/v1/completions ({dt:.2f} s, "
               f"{usage.get('prompt_tokens')} prompt + {usage.get('completion_tokens')} completion tokens):")
    click.echo(f"  prompt: {prompt!r}")
    click.echo(f"  text:   {text!r}")
    if p.arch.builtin:
        click.echo("  (the tiny MoE has random weights: the text is noise, the serving path is real)")
    return 0


@click.command("launch")
@click.argument("topology", required=False, type=click.Path(dir_okay=False))
@click.option("--node", type=int, default=None, help="This machine's node index (default: found by hostname/IP).")
@click.option("--dry-run", is_flag=True, help="Print the plan and this node's commands; start nothing.")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None, help="Logs and state (default runs/<name>-<time>).")
@click.option("--follow", is_flag=True, help="Stream every rank's log to the console, prefixed [role/rank].")
@click.option("--once", is_flag=True, help="Exit after the deployment is healthy and one completion succeeded (the demo).")
@click.option("--prompt", default="Wide expert parallelism is", show_default=True, help="Prompt for the --once completion.")
@click.option("--restart", "restart", type=click.Choice(["on-failure", "never"]), default="on-failure", show_default=True,
              help="Restart the whole group when a rank fails, or exit non-zero.")
@click.option("--max-restarts", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--backoff", type=click.FloatRange(min=0), default=5.0, show_default=True, help="First restart delay (s); doubles.")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=None, help="Seconds a rank may take to become healthy (default vllm.ready_timeout_s).")
@click.option("--grace", type=click.FloatRange(min=0), default=30.0, show_default=True, help="Seconds a healthy rank may stay unhealthy.")
@click.option("--stop-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True, help="SIGTERM-to-SIGKILL deadline (s).")
@click.option("--python", default=None, help="Interpreter with vLLM for the module entry point.")
@click.option("--model-path", default=None, help="What vLLM loads, overriding the topology.")
@click.option("--backend", type=click.Choice(["bare-metal", "ray"]), default="bare-metal", show_default=True)
@click.option("--address", default=None, help="Ray cluster address (with --backend ray).")
@click.option("--skip-preflight", is_flag=True, help="Start without the port/GPU/entry-point/model checks.")
@click.option("--router", "with_router", is_flag=True, help="Start vllm-router in front of every API server (router section of the topology).")
@click.option("--router-policy", default=None, help="vllm-router policy (cache_aware, power_of_two, round_robin, ...).")
@click.option("--profile", is_flag=True, help="Turn vLLM's torch profiler on (traces under <run-dir>/profiles; capture with `widep profile`).")
def launch_cmd(topology: str | None, node: int | None, dry_run: bool, run_dir: str | None, follow: bool, once: bool, prompt: str,
               restart: str, max_restarts: int, backoff: float, ready_timeout: float | None, grace: float, stop_timeout: float,
               python: str | None, model_path: str | None, backend: str, address: str | None, skip_preflight: bool,
               profile: bool, with_router: bool, router_policy: str | None) -> int:
    """Start and supervise this node's vLLM ranks of TOPOLOGY (default: the built-in tiny CPU MoE)."""
    from rich.console import Console

    from widep.run.preflight import preflight, resolve_node

    path = Path(topology) if topology else default_topology()
    spec = load_topology(path)
    if with_router or router_policy:
        spec = with_router_enabled(spec, router_policy, str(path))
    p = make_plan(spec)
    console = Console(stderr=False)
    if backend == "ray":
        from widep.run.ray_backend import launch_on_ray

        return launch_on_ray(p, address=address, dry_run=dry_run, console=console, once=once, prompt=prompt,
                             policy=RestartPolicy(restart, max_restarts, backoff), ready_timeout=ready_timeout,
                             python=python, model=model_path, run_dir=run_dir, follow=follow, grace=grace,
                             stop_timeout=stop_timeout, skip_preflight=skip_preflight)
    me = resolve_node(p, node)
    rd = Path(run_dir) if run_dir else Path("runs") / f"{p.name}-{time.strftime('%Y%m%d-%H%M%S')}-n{me}"
    ctx = launch_context(p, python, model_path, build=not dry_run)
    if profile:
        from dataclasses import replace

        ctx = replace(ctx, profile_dir=str((rd / "profiles").resolve()))
    cmds = render(p, ctx, node=me)
    if dry_run:
        from widep.plan.cli import print_plan
        from widep.render.cli import print_table

        print_plan(p, console)
        from rich.markup import escape

        console.rule(f"node {me} ({escape(p.nodes[me].name)}): {len(cmds)} process(es) would start")
        print_table(p, cmds)
        return 0
    if not skip_preflight:
        preflight(p, cmds, me, rendered_model_path(p, ctx))
    from widep.run.launcher import LaunchOptions, Launcher

    opts = LaunchOptions(
        node=me,
        run_dir=rd,
        ready_timeout_s=ready_timeout or float(p.spec.vllm.ready_timeout_s),
        unhealthy_grace_s=grace,
        stop_timeout_s=stop_timeout,
        policy=RestartPolicy(restart, max_restarts, backoff),
        follow=follow,
    )
    console.print(f"widep launch {p.name}: node {me} ({p.nodes[me].name}), {len(cmds)} process(es), run dir {rd}",
                  markup=False)
    launcher = Launcher(p, ctx, opts, console)
    return launcher.run(once=once, on_ready=lambda: smoke_completion(p, ctx, prompt, 16))


def with_router_enabled(spec, policy: str | None, source: str):  # noqa: ANN001, ANN201
    """The spec with router.enabled (and the policy), validated like a file (bad policy -> field error)."""
    from widep.spec.topology import parse_topology

    d = spec.model_dump(mode="json")
    d["router"]["enabled"] = True
    if policy:
        d["router"]["policy"] = policy
    return parse_topology(d, source)


@click.command("status")
@click.argument("topology", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("--timeout", type=float, default=2.0, show_default=True, help="Per-probe timeout (s).")
def status_cmd(topology: str, as_json: bool, timeout: float) -> int:
    """Which ranks of TOPOLOGY answer /health (and each group's attempt), from any machine."""
    from concurrent.futures import ThreadPoolExecutor

    from rich.console import Console
    from rich.table import Table

    from widep.run.control import http_json, probe

    p = make_plan(load_topology(topology))
    ctx = RenderContext(model_path="(status)")
    cmds = [c for c in render(p, ctx) if c.health_port]
    hosts = [(c, p.nodes[c.node].address or p.nodes[c.node].name, c.health_port) for c in cmds]
    with ThreadPoolExecutor(max_workers=16) as ex:
        results = list(ex.map(lambda t: probe(t[1], t[2], timeout=timeout), hosts))
    groups = []
    for rp in p.roles:
        for g, nodes in enumerate(rp.group_nodes):
            n = p.nodes[nodes[0]]
            try:
                st = http_json(n.address or n.name, rp.control_port, "GET", "/state", timeout=timeout)
            except (OSError, ValueError):
                st = None
            groups.append({"role": rp.name, "replica": g, "leader": n.name, "control": st})
    rows = [{"role": c.role, "replica": c.replica, "ranks": list(c.dp_ranks), "node": c.node_name,
             "url": f"http://{h}:{port}", "health": s, "latency_ms": round(1000 * dt, 1)}
            for (c, h, port), (s, dt) in zip(hosts, results)]
    healthy = all(r["health"] == "healthy" for r in rows)
    if as_json:
        click.echo(json.dumps({"name": p.name, "healthy": healthy, "endpoints": rows, "groups": groups}, indent=2))
    else:
        con = Console()
        t = Table(title=f"{p.name}: {sum(r['health'] == 'healthy' for r in rows)}/{len(rows)} endpoints healthy", title_justify="left")
        for col in ("role", "ranks", "node", "url", "health", "ms"):
            t.add_column(col)
        for r in rows:
            color = "green" if r["health"] == "healthy" else "red"
            t.add_row(r["role"], ",".join(map(str, r["ranks"])), r["node"], r["url"], f"[{color}]{r['health']}[/]", str(r["latency_ms"]))
        con.print(t)
        for gr in groups:
            st = gr["control"]
            con.print(f"group {gr['role']}#{gr['replica']} (leader {gr['leader']}): "
                      + (f"attempt {st['attempt']}, {st['state']}, {st['restarts']} restart(s)" if st else "no launcher answering"))
    return 0 if healthy else 1
