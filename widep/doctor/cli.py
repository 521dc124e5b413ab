"""``widep doctor``: node preflight table (or ``--json``) before a long start."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import asdict, replace
from pathlib import Path

import click

from widep.doctor.checks import counts, run_checks, summarize
from widep.doctor.facts import CheckResult, DoctorRequirements, HostFacts, InterfaceFacts, parse_port_spec, parse_size
from widep.doctor.gather import gather_host_facts, gather_interfaces
from widep.errors import UserError

_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def pick_node(nodes: list[tuple[str, str | None]], hostname: str, addresses: set[str]) -> int:
    """Index of the node this host is: the only node, else the first whose name is the host name
    (short or full) or whose address is one of this host's addresses. Pure."""
    if len(nodes) == 1:
        return 0
    short = hostname.split(".")[0]
    for i, (name, address) in enumerate(nodes):
        if name in (hostname, short) or (address is not None and address in addresses):
            return i
    listed = ", ".join(f"{i} ({name}{', ' + address if address else ''})" for i, (name, address) in enumerate(nodes))
    raise UserError(
        f"--node: cannot tell which node this host is: host name {hostname!r}, addresses "
        f"{', '.join(sorted(addresses)) or 'none'} match no node. Valid: --node {listed}."
    )


def interpreter_of_script(script: str | None) -> str | None:
    """The interpreter in a console script's ``#!`` line (where ``vllm serve`` runs), or None."""
    if not script:
        return None
    try:
        with open(script, "rb") as f:
            first = f.readline(512).decode(errors="replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    parts = first[2:].split()
    if not parts:
        return None
    if os.path.basename(parts[0]) == "env" and len(parts) > 1:
        return shutil.which(parts[1])
    return parts[0]


def requirements_for_topology(
    path: str, node: int | None, interfaces: InterfaceFacts
) -> tuple[DoctorRequirements, str | None]:
    """(requirements of this node, the interpreter its ranks run) for a topology file."""
    from widep.doctor import requirements_from_plan
    from widep.plan import plan as make_plan
    from widep.spec.topology import load_topology

    spec = load_topology(path)
    deployment = make_plan(spec)
    if node is None:
        addresses = {a for i in interfaces.interfaces for a in i.addresses}
        node = pick_node([(n.name, n.address) for n in deployment.nodes], socket.gethostname(), addresses)
    req = requirements_from_plan(deployment, node)
    if spec.vllm.entry_point == "module":
        python = spec.vllm.python
    else:
        python = interpreter_of_script(shutil.which("vllm"))
    return req, python


def requirements_from_options(
    base: DoctorRequirements | None,
    *,
    device: str | None,
    gpus: int | None,
    gpu_kind: str | None,
    vllm_version: str | None,
    ports: tuple[str, ...],
    ifaces: tuple[str, ...],
    modules: tuple[str, ...],
    model: str | None,
    model_bytes: str | None,
    shm_min: str | None,
    rdma: bool | None,
    nvshmem: bool | None,
    memlock_unlimited: bool | None,
    cpu_ranks: int | None,
) -> DoctorRequirements:
    """Explicit options on top of the topology's requirements (or of generic node defaults).

    Without a topology and without ``--gpus``, a CUDA node is expected to have at least one GPU.
    Lists (ports, interfaces, modules) are added to the topology's; scalars replace its values.
    """
    req = base or DoctorRequirements(source="options (no topology)")
    changes: dict[str, object] = {}
    if device is not None:
        changes["device"] = device
    if gpus is not None:
        changes["gpus_needed"] = gpus
    elif base is None and (device or "cuda") == "cuda":
        changes["gpus_needed"] = 1
    if gpu_kind is not None:
        changes["gpu_kind"] = gpu_kind
    if vllm_version is not None:
        changes["vllm_version"] = vllm_version
    if ports:
        changes["ports"] = req.ports + tuple(parse_port_spec(p) for p in ports)
    if ifaces:
        changes["interfaces"] = req.interfaces + tuple(ifaces)
    if modules:
        changes["needed_modules"] = req.needed_modules + tuple(modules)
    if model is not None:
        changes["model_path"] = model
    if model_bytes is not None:
        changes["model_bytes"] = parse_size(model_bytes, field_name="--model-bytes")
    if shm_min is not None:
        changes["shm_bytes_min"] = parse_size(shm_min, field_name="--shm-min")
    if rdma is not None:
        changes["rdma"] = rdma
    if nvshmem is not None:
        changes["nvshmem"] = nvshmem
    if memlock_unlimited is not None:
        changes["memlock_unlimited_needed"] = memlock_unlimited
    if cpu_ranks is not None:
        changes["cpu_ranks"] = cpu_ranks
    return replace(req, **changes) if changes else req


def render_table(results: list[CheckResult], facts: HostFacts, req: DoctorRequirements, elapsed_s: float) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    probe = Console()
    # A terminal keeps its width; a pipe or log file gets wide rows instead of rich's 80 columns.
    console = Console(highlight=False, width=None if probe.is_terminal else 160)
    table = Table(
        title=f"widep doctor: {facts.hostname} ({req.source})", title_justify="left", show_lines=False, expand=False
    )
    table.add_column("status", no_wrap=True)
    table.add_column("check", overflow="fold", max_width=28)
    table.add_column("what it saw", overflow="fold")
    table.add_column("fix", overflow="fold")
    for r in results:
        table.add_row(Text(r.status.upper(), style=_STYLE[r.status]), Text(r.name), Text(r.detail), Text(r.fix))
    console.print(table)
    c = counts(results)
    verdict = "FAIL: fix the failed checks before starting" if c["fail"] else "OK: nothing blocks a start"
    console.print(
        Text(
            f"{verdict}. {c['pass']} pass, {c['warn']} warn, {c['fail']} fail, {c['skip']} skip; "
            f"facts gathered in {facts.gather_seconds:.2f} s, total {elapsed_s:.2f} s.",
            style=_STYLE["fail" if c["fail"] else "pass"],
        )
    )


def report_dict(results: list[CheckResult], facts: HostFacts, req: DoctorRequirements, elapsed_s: float) -> dict:
    """The ``--json`` document: summary, one entry per check, the requirements and the raw facts."""
    return {
        "host": facts.hostname,
        "summary": {
            "exit_code": summarize(results),
            **counts(results),
            "gather_seconds": facts.gather_seconds,
            "total_seconds": round(elapsed_s, 3),
        },
        "results": [r.to_dict() for r in results],
        "requirements": asdict(req),
        "facts": asdict(facts),
    }


@click.command("doctor")
@click.argument("topology", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--node",
    type=click.IntRange(min=0),
    default=None,
    help="Which node of the topology this host is (default: the node whose name or address is this host's).",
)
@click.option(
    "--python",
    "python_",
    metavar="PATH",
    help="Interpreter of the vLLM environment (default: the topology's: vllm.python for the module "
    "entry point, the `vllm` script's for serve; else this one).",
)
@click.option(
    "--import",
    "import_modules",
    is_flag=True,
    help="Import vLLM and the kernel modules for real (slow: seconds) instead of only locating them.",
)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="Accelerator of the ranks.")
@click.option(
    "--gpus",
    type=click.IntRange(min=0),
    default=None,
    help="GPUs this node must have (default without topology: at least 1 on cuda).",
)
@click.option("--gpu-kind", default=None, help="GPU model expected, e.g. H200.")
@click.option("--vllm-version", default=None, help="vLLM version the ranks expect, e.g. 0.32.0.")
@click.option("--port", "ports", multiple=True, metavar="HOST:PORT", help="Port that must be free (repeatable).")
@click.option("--iface", "ifaces", multiple=True, metavar="NAME", help="Interface that must exist (repeatable).")
@click.option(
    "--module",
    "modules",
    multiple=True,
    metavar="NAME",
    help="Python module the backends need, e.g. deep_ep; a|b accepts either (repeatable).",
)
@click.option("--model", default=None, metavar="PATH|REPO", help="Model directory or Hugging Face repo id.")
@click.option("--model-bytes", default=None, metavar="SIZE", help="Model size on disk, e.g. 690G.")
@click.option("--shm-min", default=None, metavar="SIZE", help="Free /dev/shm needed (default 1GiB).")
@click.option("--rdma/--no-rdma", default=None, help="Whether RDMA devices are required.")
@click.option("--nvshmem/--no-nvshmem", default=None, help="Whether an NVSHMEM backend (DeepEP) is used.")
@click.option(
    "--memlock-unlimited/--no-memlock-unlimited", default=None, help="Whether the memlock limit must be unlimited."
)
@click.option("--cpu-ranks", type=click.IntRange(min=0), default=None, help="CPU runs: ranks on this node.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds nvidia-smi and the Python probe may take.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of the table.")
@click.pass_context
def doctor_cmd(
    ctx: click.Context,
    topology: str | None,
    node: int | None,
    python_: str | None,
    import_modules: bool,
    device: str | None,
    gpus: int | None,
    gpu_kind: str | None,
    vllm_version: str | None,
    ports: tuple[str, ...],
    ifaces: tuple[str, ...],
    modules: tuple[str, ...],
    model: str | None,
    model_bytes: str | None,
    shm_min: str | None,
    rdma: bool | None,
    nvshmem: bool | None,
    memlock_unlimited: bool | None,
    cpu_ranks: int | None,
    timeout_s: float,
    as_json: bool,
) -> None:
    """Check this node before a long start: GPUs, driver, vLLM and EP kernels, NVSHMEM, RDMA,
    memlock, /dev/shm, huge pages, ports, interfaces, disk for the model, CPUs.

    With TOPOLOGY, the requirements come from its plan for this node (--node); options add to
    them. Without one, the checks are generic and the options state what the node must provide.
    Exit code 1 when any check fails, else 0.
    """
    t0 = time.perf_counter()
    base = None
    python = python_
    if topology is not None:
        base, topo_python = requirements_for_topology(topology, node, gather_interfaces(Path("/sys"), Path("/proc")))
        python = python or topo_python
    elif node is not None:
        raise UserError(f"--node: Given: {node} without a topology. Valid: --node with a TOPOLOGY file.")
    req = requirements_from_options(
        base,
        device=device,
        gpus=gpus,
        gpu_kind=gpu_kind,
        vllm_version=vllm_version,
        ports=ports,
        ifaces=ifaces,
        modules=modules,
        model=model,
        model_bytes=model_bytes,
        shm_min=shm_min,
        rdma=rdma,
        nvshmem=nvshmem,
        memlock_unlimited=memlock_unlimited,
        cpu_ranks=cpu_ranks,
    )
    facts = gather_host_facts(req, python=python, import_modules=import_modules, timeout_s=timeout_s)
    results = run_checks(req, facts)
    elapsed = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps(report_dict(results, facts, req, elapsed), indent=2))
    else:
        render_table(results, facts, req, elapsed)
    ctx.exit(summarize(results))


__all__ = ["doctor_cmd", "requirements_from_options", "report_dict", "render_table"]
