"""``widep launch`` and ``widep status``: flags into a :class:`~widep.run.launch.LaunchRequest`, dry runs printed.

``run/`` is what ``widep launch`` uses: :mod:`~widep.run.launch` (the request, the processes rendered once),
:mod:`~widep.run.backend` (the backend protocol and registry), :mod:`~widep.run.supervisor` (the one loop),
:mod:`~widep.run.bare_metal` and :mod:`~widep.run.ray_backend` (the backends), :mod:`~widep.run.host` (this
machine's facts), and the mechanics under them (procs, guard, control, state, preflight).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from widep.errors import UserError
from widep.plan import plan as make_plan
from widep.plan.cli import print_plan
from widep.render.cli import print_table
from widep.render.vllm import RenderContext, render
from widep.run.backend import BACKENDS, DryRun, load_backend
from widep.run.control import http_json, probe
from widep.run.host import ensure_model, prepare_launch
from widep.run.launch import Launch, LaunchRequest
from widep.run.state import RestartPolicy
from widep.run.supervisor import Supervisor
from widep.spec.topology import TopologySpec, load_topology, parse_topology

DEFAULT_TOPOLOGY = "tiny-moe-cpu.yaml"


def default_topology() -> Path:
    """topologies/tiny-moe-cpu.yaml: in the working directory, else beside the package's source tree."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = base / "topologies" / DEFAULT_TOPOLOGY
        if p.is_file():
            return p
    raise UserError(f"no topology given and the built-in default topologies/{DEFAULT_TOPOLOGY} was not found. Give a topology file.")


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
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="bare-metal", show_default=True,
              help="Where the processes run: this node (one launch per node), or a whole cluster from here.")
@click.option("--address", default=None, help="Ray cluster address (with --backend ray).")
@click.option("--skip-preflight", is_flag=True, help="Start without the port/GPU/entry-point/model checks.")
@click.option("--router", "with_router", is_flag=True, help="Start vllm-router in front of every API server (router section of the topology).")
@click.option("--router-policy", default=None, help="vllm-router policy (cache_aware, power_of_two, round_robin, ...).")
@click.option("--profile", is_flag=True, help="Turn vLLM's torch profiler on (traces under <run-dir>/profiles; capture with `widep profile`).")
def launch_cmd(topology: str | None, node: int | None, dry_run: bool, run_dir: str | None, follow: bool, once: bool,
               prompt: str, restart: str, max_restarts: int, backoff: float, ready_timeout: float | None, grace: float,
               stop_timeout: float, python: str | None, model_path: str | None, backend: str, address: str | None,
               skip_preflight: bool, profile: bool, with_router: bool, router_policy: str | None) -> int:
    """Start and supervise this node's vLLM ranks of TOPOLOGY (default: the built-in tiny CPU MoE)."""
    path = Path(topology) if topology else default_topology()
    spec = load_topology(path)
    if with_router or router_policy:
        spec = with_router_enabled(spec, router_policy, str(path))
    request = LaunchRequest(
        make_plan(spec), backend=backend, node=node, run_dir=Path(run_dir) if run_dir else None, once=once,
        prompt=prompt, policy=RestartPolicy(restart, max_restarts, backoff), ready_timeout_s=ready_timeout,
        unhealthy_grace_s=grace, stop_timeout_s=stop_timeout, follow=follow, python=python, model_path=model_path,
        profile=profile, skip_preflight=skip_preflight, address=address,
    )
    console = Console(stderr=False)
    runner = load_backend(backend, console)
    launch = prepare_launch(runner.resolve(request))
    if dry_run:
        print_dry_run(launch, runner.dry_run(launch), console)
        return 0
    ensure_model(launch.plan, model_path)
    return Supervisor(runner, launch, console).run()


def print_dry_run(launch: Launch, dry: DryRun, console: Console) -> None:
    """The plan, the backend's tables, and the commands that would start."""
    print_plan(launch.plan, console)
    for t in dry.tables:
        table = Table(title=t.title, title_justify="left")
        for col in t.columns:
            table.add_column(col)
        for row in t.rows:
            table.add_row(*row)
        console.print(table)
    console.rule(dry.heading)
    print_table(launch.plan, list(dry.processes))


def with_router_enabled(spec: TopologySpec, policy: str | None, source: str) -> TopologySpec:
    """The spec with router.enabled (and the policy), validated like a file (bad policy -> field error)."""
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
    p = make_plan(load_topology(topology))
    cmds = [c for c in render(p, RenderContext(model_path="(status)")) if c.health_port]
    hosts = [(c, c.node_address, c.health_port) for c in cmds]
    with ThreadPoolExecutor(max_workers=16) as ex:
        results = list(ex.map(lambda t: probe(t[1], t[2], timeout=timeout), hosts))
    groups = []
    for rp in p.roles:
        for g, nodes in enumerate(rp.group_nodes):
            n = p.nodes[nodes[0]]
            try:
                st = http_json(n.host, rp.control_port, "GET", "/state", timeout=timeout)
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
        healthy_count = sum(r["health"] == "healthy" for r in rows)
        t = Table(title=f"{p.name}: {healthy_count}/{len(rows)} endpoints healthy", title_justify="left")
        for col in ("role", "ranks", "node", "url", "health", "ms"):
            t.add_column(col)
        for r in rows:
            color = "green" if r["health"] == "healthy" else "red"
            t.add_row(r["role"], ",".join(map(str, r["ranks"])), r["node"], r["url"], f"[{color}]{r['health']}[/]",
                      str(r["latency_ms"]))
        con.print(t)
        for gr in groups:
            st = gr["control"]
            state = f"attempt {st['attempt']}, {st['state']}, {st['restarts']} restart(s)" if st else "no launcher answering"
            con.print(f"group {gr['role']}#{gr['replica']} (leader {gr['leader']}): {state}")
    return 0 if healthy else 1
