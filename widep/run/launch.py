"""One launch as data: the request (every option, for every backend) and its processes, rendered once.

The CLI turns flags into a :class:`LaunchRequest`; the backend fills in what it owns
(:meth:`~widep.run.backend.Backend.resolve`); :func:`render_launch` renders every process of the plan once into a
:class:`Launch`, which whichever backend runs it receives whole. Backends never render again: per-node values
they learn late (Ray's addresses) are bound with :meth:`~widep.render.vllm.ProcessCommand.at`. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from widep.plan.api import model_path
from widep.plan.core import DeploymentPlan
from widep.render.vllm import ProcessCommand, RenderContext, render, render_router
from widep.run.state import RestartPolicy

if TYPE_CHECKING:
    from widep.run.slurm import SlurmOptions


@dataclass(frozen=True)
class LaunchRequest:
    """Everything `widep launch` was asked to do; every backend reads the options it honours from here."""

    plan: DeploymentPlan
    backend: str = "bare-metal"
    """Name in :data:`widep.run.backend.BACKENDS`."""
    node: int | None = None
    """This machine's plan node (bare metal); None: found by hostname / address."""
    run_dir: Path | None = None
    """Logs and state; None: the backend's default (``runs/<name>-<time>-<backend tag>``)."""
    once: bool = False
    """Exit once every group is healthy and one completion succeeded (the demo)."""
    prompt: str = "Wide expert parallelism is"
    """Prompt of the ``once`` completion."""
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    ready_timeout_s: float | None = None
    """Seconds a process may take to become healthy; None: the topology's vllm.ready_timeout_s."""
    unhealthy_grace_s: float = 30.0
    """Seconds a healthy process may stay unhealthy before its group fails."""
    stop_timeout_s: float = 30.0
    """SIGTERM-to-SIGKILL deadline."""
    probe_interval_s: float = 1.0
    follow: bool = False
    """Stream every process's log to the console, prefixed [role/rank]."""
    python: str | None = None
    """Interpreter with vLLM for the module entry point."""
    model_path: str | None = None
    """What vLLM loads, overriding the topology."""
    profile: bool = False
    """Turn vLLM's torch profiler on, traces under <run_dir>/profiles."""
    skip_preflight: bool = False
    address: str | None = None
    """Cluster address the backend connects to (Ray: the GCS address or 'auto')."""
    placement_timeout_s: float = 60.0
    """How long to wait for a cluster to place the deployment (Ray)."""
    leader_wait_s: float = 120.0
    """How long a follower waits for its group leader's control endpoint (bare metal)."""
    topology: Path | None = None
    """The topology file, for a backend that runs `widep launch` again elsewhere (Slurm --detach)."""
    slurm: SlurmOptions | None = None
    """Partition, account, time, container, ... of the job (Slurm); None: the cluster's defaults."""

    @property
    def ready_timeout(self) -> float:
        return self.ready_timeout_s or float(self.plan.spec.vllm.ready_timeout_s)


@dataclass(frozen=True)
class Group:
    """One DP group (a role's replica): what the supervisor starts, judges and restarts as a whole."""

    role: str
    replica: int
    label: str
    """'decode', or 'decode#1' when the role has several replicas."""
    nodes: tuple[int, ...]
    """Plan nodes of the group, the leader's first."""
    processes: tuple[ProcessCommand, ...]
    """Every process of the group, on every node."""
    control_port: int
    """Port of the leader's control endpoint (bare metal)."""

    @property
    def leader_node(self) -> int:
        return self.nodes[0]

    def on_node(self, node: int) -> tuple[ProcessCommand, ...]:
        return tuple(c for c in self.processes if c.node == node)


@dataclass(frozen=True)
class Launch:
    """A request with every process rendered (once) and its run identity."""

    request: LaunchRequest
    run_id: str
    run_dir: Path
    context: RenderContext
    """Host facts the processes were rendered with."""
    model: str
    """What vLLM loads."""
    processes: tuple[ProcessCommand, ...]
    """Every vLLM process of the plan, on every node."""
    router: ProcessCommand | None
    groups: tuple[Group, ...]

    @property
    def plan(self) -> DeploymentPlan:
        return self.request.plan

    def group(self, role: str, replica: int) -> Group:
        return next(g for g in self.groups if g.role == role and g.replica == replica)


def render_launch(request: LaunchRequest, context: RenderContext, run_id: str) -> Launch:
    """Render every process of ``request`` once (``request.run_dir`` must be resolved)."""
    if request.run_dir is None:
        raise ValueError("render_launch: the backend resolves request.run_dir first (Backend.resolve)")
    p = request.plan
    if request.profile:
        context = replace(context, profile_dir=str((request.run_dir / "profiles").resolve()))
    processes = tuple(render(p, context))
    groups = []
    for rp in p.roles:
        for g in range(rp.spec.replicas):
            groups.append(
                Group(
                    rp.name,
                    g,
                    rp.name + (f"#{g}" if rp.spec.replicas > 1 else ""),
                    rp.group_nodes[g],
                    tuple(c for c in processes if c.role == rp.name and c.replica == g),
                    rp.control_port,
                )
            )
    return Launch(
        request,
        run_id,
        request.run_dir,
        context,
        model_path(p, context.model_path),
        processes,
        render_router(p, context),
        tuple(groups),
    )
