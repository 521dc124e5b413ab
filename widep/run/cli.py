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
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.markup import escape
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

if TYPE_CHECKING:
    from widep.run.slurm import SlurmOptions

DEFAULT_TOPOLOGY = "tiny-moe-cpu-ep2.yaml"


def default_topology() -> Path:
    """topologies/tiny-moe-cpu-ep2.yaml (DP2/EP2): in the working directory, else beside the package's source tree."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = base / "topologies" / DEFAULT_TOPOLOGY
        if p.is_file():
            return p
    raise UserError(
        f"no topology given and the built-in default topologies/{DEFAULT_TOPOLOGY} was not found. Give a topology file."
    )


@click.command("launch")
@click.argument("topology", required=False, type=click.Path(dir_okay=False))
@click.option("--node", type=int, default=None, help="This machine's node index (default: found by hostname/IP).")
@click.option("--dry-run", is_flag=True, help="Print the plan and this node's commands; start nothing.")
@click.option(
    "--run-dir", type=click.Path(file_okay=False), default=None, help="Logs and state (default runs/<name>-<time>)."
)
@click.option("--follow", is_flag=True, help="Stream every rank's log to the console, prefixed [role/rank].")
@click.option(
    "--once", is_flag=True, help="Exit after the deployment is healthy and one completion succeeded (the demo)."
)
@click.option(
    "--prompt", default="Wide expert parallelism is", show_default=True, help="Prompt for the --once completion."
)
@click.option(
    "--restart",
    "restart",
    type=click.Choice(["on-failure", "never"]),
    default="on-failure",
    show_default=True,
    help="Restart the whole group when a rank fails, or exit non-zero.",
)
@click.option("--max-restarts", type=click.IntRange(min=0), default=3, show_default=True)
@click.option(
    "--backoff", type=click.FloatRange(min=0), default=5.0, show_default=True, help="First restart delay (s); doubles."
)
@click.option(
    "--ready-timeout",
    type=click.FloatRange(min=1),
    default=None,
    help="Seconds a rank may take to become healthy (default vllm.ready_timeout_s).",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds a healthy rank may stay unhealthy.",
)
@click.option(
    "--stop-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="SIGTERM-to-SIGKILL deadline (s).",
)
@click.option("--python", default=None, help="Interpreter with vLLM for the module entry point.")
@click.option("--model-path", default=None, help="What vLLM loads, overriding the topology.")
@click.option(
    "--backend",
    type=click.Choice(list(BACKENDS)),
    default="bare-metal",
    show_default=True,
    help="Where the processes run: this node (one launch per node), or a whole cluster from here.",
)
@click.option("--address", default=None, help="Ray cluster address (with --backend ray).")
@click.option("--skip-preflight", is_flag=True, help="Start without the port/GPU/entry-point/model checks.")
@click.option(
    "--router",
    "with_router",
    is_flag=True,
    help="Start vllm-router in front of every API server (router section of the topology).",
)
@click.option("--router-policy", default=None, help="vllm-router policy (cache_aware, power_of_two, round_robin, ...).")
@click.option(
    "--profile",
    is_flag=True,
    help="Turn vLLM's torch profiler on (traces under <run-dir>/profiles; capture with `widep profile`).",
)
@click.option("--partition", default=None, help="Slurm partition (with --backend slurm; default: the cluster's).")
@click.option("--account", default=None, help="Slurm account charged (with --backend slurm).")
@click.option("--qos", default=None, help="Slurm quality of service (with --backend slurm).")
@click.option("--time", "time_limit", default=None, help="Slurm time limit, e.g. 12:00:00 (with --backend slurm).")
@click.option("--reservation", default=None, help="Slurm reservation (with --backend slurm).")
@click.option("--constraint", default=None, help="Slurm node features, e.g. 'h200&ib' (with --backend slurm).")
@click.option("--job-name", default=None, help="Slurm job name (default widep-<topology name>).")
@click.option(
    "--sbatch", "sbatch_lines", multiple=True, help="Extra #SBATCH option, e.g. --sbatch=--mail-type=END (repeatable)."
)
@click.option(
    "--container-image", default=None, help="pyxis/enroot image every srun step runs in (with --backend slurm)."
)
@click.option(
    "--container-mounts", multiple=True, help="pyxis mount SRC:DST[:FLAGS] (repeatable; the run dir is always mounted)."
)
@click.option("--detach", is_flag=True, help="Slurm: submit and return; the supervisor runs inside the batch script.")
def launch_cmd(
    topology: str | None,
    node: int | None,
    dry_run: bool,
    run_dir: str | None,
    follow: bool,
    once: bool,
    prompt: str,
    restart: str,
    max_restarts: int,
    backoff: float,
    ready_timeout: float | None,
    grace: float,
    stop_timeout: float,
    python: str | None,
    model_path: str | None,
    backend: str,
    address: str | None,
    skip_preflight: bool,
    profile: bool,
    with_router: bool,
    router_policy: str | None,
    **slurm_flags: object,
) -> int:
    """Start and supervise this node's vLLM ranks of TOPOLOGY (default: the built-in tiny CPU MoE, DP2/EP2)."""
    path = Path(topology) if topology else default_topology()
    spec = load_topology(path)
    if with_router or router_policy:
        spec = with_router_enabled(spec, router_policy, str(path))
    slurm = slurm_request(backend, slurm_flags)
    request = LaunchRequest(
        make_plan(spec),
        backend=backend,
        node=node,
        run_dir=Path(run_dir) if run_dir else None,
        once=once,
        prompt=prompt,
        policy=RestartPolicy(restart, max_restarts, backoff),
        ready_timeout_s=ready_timeout,
        unhealthy_grace_s=grace,
        stop_timeout_s=stop_timeout,
        follow=follow,
        python=python,
        model_path=model_path,
        profile=profile,
        skip_preflight=skip_preflight,
        address=address,
        topology=path if topology else None,
        slurm=slurm,
    )
    console = Console(stderr=False)
    runner = load_backend(backend, console)
    launch = prepare_launch(runner.resolve(request))
    if dry_run:
        print_dry_run(launch, runner.dry_run(launch), console)
        return 0
    ensure_model(launch.plan, model_path)
    if slurm is not None and slurm.detach:
        from widep.run.slurm import submit_detached

        return submit_detached(launch, console)
    return Supervisor(runner, launch, console).run()


def slurm_request(backend: str, flags: dict[str, object]) -> SlurmOptions | None:
    """The Slurm options of the job (validated, each error naming its flag); refused with another backend."""
    if backend != "slurm":
        given = [
            {"time_limit": "--time", "sbatch_lines": "--sbatch"}.get(k, "--" + k.replace("_", "-"))
            for k, v in flags.items()
            if v not in (None, False, ())
        ]
        if given:
            raise UserError(f"{', '.join(given)}: only with --backend slurm. Given: --backend {backend}.")
        return None
    from widep.run.slurm import slurm_options

    return slurm_options(
        partition=flags["partition"],
        account=flags["account"],
        qos=flags["qos"],
        time=flags["time_limit"],
        reservation=flags["reservation"],
        constraint=flags["constraint"],
        job_name=flags["job_name"],
        sbatch_lines=tuple(flags["sbatch_lines"]),
        container_image=flags["container_image"],
        container_mounts=tuple(flags["container_mounts"]),
        detach=bool(flags["detach"]),
    )


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
    console.rule(escape(dry.heading))  # node names are the topology's text, not markup
    print_table(launch.plan, list(dry.processes))
    if dry.text:
        console.rule("what would be submitted")
        click.echo(dry.text, nl=False)


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
@click.option(
    "--slurm-job", default=None, help="The Slurm job running TOPOLOGY (--backend slurm): nodes are its hosts."
)
def status_cmd(topology: str, as_json: bool, timeout: float, slurm_job: str | None) -> int:
    """Which ranks of TOPOLOGY answer /health (and each group's attempt), from any machine."""
    p = make_plan(load_topology(topology))
    cmds = [c for c in render(p, RenderContext(model_path="(status)")) if c.health_port]
    names = {i: n.name for i, n in enumerate(p.nodes)}
    slurm_groups: Path | None = None
    if slurm_job:
        from widep.run.slurm import job_view

        hosts_of_job, addresses, run_dir = job_view(slurm_job)
        if len(hosts_of_job) != len(p.nodes):
            raise UserError(
                f"--slurm-job: job {slurm_job} has {len(hosts_of_job)} node(s), {p.name} has "
                f"{len(p.nodes)}: is it the job of this topology?"
            )
        cmds = [c.at(node_address=addresses[c.node]) for c in cmds]
        names = dict(enumerate(hosts_of_job))
        slurm_groups = run_dir / "groups" if run_dir else None
    hosts = [(c, c.node_address, c.health_port) for c in cmds]
    with ThreadPoolExecutor(max_workers=16) as ex:
        results = list(ex.map(lambda t: probe(t[1], t[2], timeout=timeout), hosts))
    groups = []
    for rp in p.roles:
        for g, nodes in enumerate(rp.group_nodes):
            n = p.nodes[nodes[0]]
            label = rp.name + (f"#{g}" if rp.spec.replicas > 1 else "")
            try:
                if slurm_groups is not None:  # the Slurm driver writes each group's state there
                    st = json.loads((slurm_groups / f"{label}.json").read_text())
                else:
                    st = http_json(n.host, rp.control_port, "GET", "/state", timeout=timeout)
            except (OSError, ValueError):
                st = None
            groups.append({"role": rp.name, "replica": g, "leader": names[nodes[0]], "control": st})
    rows = [
        {
            "role": c.role,
            "replica": c.replica,
            "ranks": list(c.dp_ranks),
            "node": names[c.node],
            "url": f"http://{h}:{port}",
            "health": s,
            "latency_ms": round(1000 * dt, 1),
        }
        for (c, h, port), (s, dt) in zip(hosts, results, strict=False)
    ]
    healthy = all(r["health"] == "healthy" for r in rows)
    door = None
    if p.router is not None:  # the front door, and what it answers (its /health; a 503 there means no workers)
        rt = p.router
        host = names[rt.node] if slurm_job else p.nodes[rt.node].host
        state, dt = probe(host, rt.port, timeout=timeout)
        door = {"url": f"http://{host}:{rt.port}", "health": state, "latency_ms": round(1000 * dt, 1)}
    if as_json:
        doc = {"name": p.name, "healthy": healthy, "endpoints": rows, "groups": groups, "front_door": door}
        click.echo(json.dumps(doc, indent=2))
    else:
        con = Console()
        healthy_count = sum(r["health"] == "healthy" for r in rows)
        t = Table(title=f"{p.name}: {healthy_count}/{len(rows)} endpoints healthy", title_justify="left")
        for col in ("role", "ranks", "node", "url", "health", "ms"):
            t.add_column(col)
        for r in rows:
            color = "green" if r["health"] == "healthy" else "red"
            t.add_row(
                r["role"],
                ",".join(map(str, r["ranks"])),
                r["node"],
                r["url"],
                f"[{color}]{r['health']}[/]",
                str(r["latency_ms"]),
            )
        con.print(t)
        for gr in groups:
            st = gr["control"]
            state = (
                f"attempt {st['attempt']}, {st['state']}, {st['restarts']} restart(s)"
                if st
                else "no launcher answering"
            )
            con.print(f"group {gr['role']}#{gr['replica']} (leader {gr['leader']}): {state}")
            last = (st or {}).get("last_failure")
            if last:
                con.print(
                    f"  last failure (attempt {last['attempt']}): {last['rank']} on {last['node']}: {last['reason']}",
                    markup=False,
                )
        if door is not None:
            color = "green" if door["health"] == "healthy" else "red"
            con.print(f"front door {door['url']}: [{color}]{door['health']}[/] ({door['latency_ms']} ms)")
    return 0 if healthy else 1
