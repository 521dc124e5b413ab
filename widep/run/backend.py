"""What a launch backend is: a small protocol the one supervisor drives, and the registry of backends.

The supervisor (:mod:`widep.run.supervisor`) owns everything the backends share: signal handling, the restart
policy (the group state machine of :mod:`widep.run.state`, backoff, bounded retries, earliest failure wins), the
readiness rules (:func:`~widep.run.state.judge_health`), the "ready" announcement once per attempt, the periodic
waiting lines, the ordered teardown and the first-failure summary. A backend only knows how to run processes
somewhere. Its life, driven by the supervisor (torch elastic's agent template, torchx's dry-run / schedule split)::

    request  = backend.resolve(request)          # pure: fill the defaults this backend owns (node, run dir)
    launch   = render_launch(request, ...)       # every process rendered once (widep.run.launch)
    backend.dry_run(launch)                      # pure: what would run where (printed by the CLI), or:
    groups   = backend.prepare(launch)           # connect, place, preflight; UserError -> nothing started
    loop:  backend.start(group, attempt)         # start the group's processes (raise StartFailed to fail it)
           backend.poll(group, now)              # -> Poll: exits, probe results, log lines
           backend.endpoints(group)              # what is probed and shown in the readiness table
           backend.stop(group)                   # tear the group's processes down (idempotent)
    backend.shutdown()                           # release everything (always called, also after errors)

The optional hooks (:class:`BackendBase` gives defaults) let a backend publish a group's status (bare metal serves
it to followers), follow groups another supervisor owns, add backend-wide work to each round (the router), and
name the front door the smoke completion goes to.

Registry: ``BACKENDS`` maps a ``--backend`` name to a module, imported only when chosen (Ray stays optional).
Each module exposes ``create_backend(console) -> Backend``. A new backend is one new module and one line here.
Nothing here or in a backend imports a CLI module; the CLI turns flags into a :class:`LaunchRequest`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from widep.errors import UserError
from widep.run.state import Failure, GroupStatus

if TYPE_CHECKING:
    from rich.console import Console

    from widep.render.vllm import ProcessCommand
    from widep.run.launch import Group, Launch, LaunchRequest

BACKENDS: dict[str, str] = {
    "bare-metal": "widep.run.bare_metal",
    "ray": "widep.run.ray_backend",
    "slurm": "widep.run.slurm",
}
"""``--backend`` name -> module exposing ``create_backend(console)``; imported on first use."""


def load_backend(name: str, console: Console) -> Backend:
    """The backend called ``name``; UserError naming the valid ones."""
    if name not in BACKENDS:
        raise UserError(f"--backend: {name!r} is not a backend. Valid: {', '.join(BACKENDS)}.")
    return importlib.import_module(BACKENDS[name]).create_backend(console)


class Endpoint(NamedTuple):
    """An HTTP endpoint of a launch: the process serving it and where it is reached (after placement)."""

    process: ProcessCommand
    host: str
    port: int


@dataclass(frozen=True)
class Poll:
    """One round of news about a group from its backend."""

    failures: tuple[Failure, ...] = ()
    """Processes that exited, nodes or agents lost, follower reports (the supervisor acts on the earliest)."""
    health: Mapping[str, str] = field(default_factory=dict)
    """Process name -> probe result of its endpoint ('healthy', 'unhealthy', 'refused', 'timeout', 'error')."""
    complete: bool = True
    """False when part of the group did not answer this round: readiness is not judged on it."""
    lines: tuple[tuple[str, str], ...] = ()
    """(process name, log line) written since the last poll, when the request asked to follow logs."""


class StartFailed(Exception):
    """Raised by :meth:`Backend.start`: the attempt could not start (the restart policy decides what next)."""

    def __init__(self, reason: str, node: str = "-") -> None:
        super().__init__(reason)
        self.reason, self.node = reason, node


@dataclass(frozen=True)
class DryRunTable:
    """A table a backend adds to the dry run (the CLI prints it between the plan and the commands)."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class DryRun:
    """What a backend would do with a launch, as data (no side effects)."""

    heading: str
    """One line above the commands, e.g. 'node 0 (node-0): 2 process(es) would start'."""
    processes: tuple[ProcessCommand, ...]
    """The commands that would start, as they would (before any late-bound address is known)."""
    tables: tuple[DryRunTable, ...] = ()
    text: str = ""
    """Verbatim text the backend would submit (Slurm's batch script and srun steps), printed as is."""


class GroupDriver(Protocol):
    """What the supervisor loop steps each round: a group it supervises, or one it follows for a backend."""

    label: str
    status: GroupStatus
    exit_code: int | None
    health: dict[str, str]
    attempt_started: float
    owner: bool
    """True when this supervisor runs the group's restart policy (False: it mirrors another supervisor's)."""

    def step(self, now: float) -> None: ...
    def endpoints(self) -> list[Endpoint]: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


class Backend(Protocol):
    """Runs the processes of a launch somewhere (this node, a Ray cluster, a Slurm allocation, ...)."""

    name: str
    stop_requested: Callable[[], bool]
    """Set by the supervisor before ``prepare``: True once a stop was asked for (long waits give up early)."""

    def resolve(self, request: LaunchRequest) -> LaunchRequest:
        """The request with the defaults this backend owns filled in (``node``, ``run_dir``); no side effects
        beyond reading host facts (e.g. which node this machine is)."""
        ...

    def dry_run(self, launch: Launch) -> DryRun:
        """What would run where; pure."""
        ...

    def prepare(self, launch: Launch) -> list[Group]:
        """Everything before the first attempt (connect, place, preflight, print the banner); the groups this
        supervisor owns. Raises UserError (nothing started) when it cannot launch."""
        ...

    def start(self, group: Group, attempt: int) -> str:
        """Start ``attempt`` of ``group`` (this backend's share of its processes); returns what started, for the
        console ('serve/0 on node-0; logs in ...'), or '' when nothing did here. Raises StartFailed."""
        ...

    def poll(self, group: Group, now: float) -> Poll:
        """Exits, probe results and new log lines of the group's running attempt."""
        ...

    def endpoints(self, group: Group) -> list[Endpoint]:
        """The group's HTTP endpoints as reached now (probed for readiness, shown in the readiness table)."""
        ...

    def stop(self, group: Group) -> None:
        """Stop the group's processes (SIGTERM, one deadline, SIGKILL); safe to call again."""
        ...

    def shutdown(self) -> None:
        """Release everything the backend holds (placement, agents, control endpoints); always called."""
        ...

    # ------------------------------------------------------------------ optional (BackendBase has defaults)
    def publish(self, group: Group, status: GroupStatus) -> None:
        """The group's status changed (bare metal serves it to the followers on other nodes)."""
        ...

    def log_tail(self, group: Group, process: str) -> tuple[str, ...]:
        """The last lines of a process's log, for a failure the supervisor found (a health timeout)."""
        ...

    def followers(self) -> list[GroupDriver]:
        """Groups another supervisor owns that this one follows (bare metal: groups led from another node)."""
        ...

    def tick(self, now: float) -> int | None:
        """Backend-wide work each round (the router); an exit code ends the run."""
        ...

    def ready(self) -> bool:
        """Backend-wide readiness beyond the groups' (the router is healthy)."""
        ...

    def drain(self) -> None:
        """Before the groups are torn down: stop what sends them requests (the router)."""
        ...

    def front_door(self) -> Endpoint:
        """Where a client's first request goes (the router, else the first API server), as reached now."""
        ...


class BackendBase:
    """Defaults for the optional hooks of :class:`Backend`; a subclass sets ``self.launch`` in ``prepare``."""

    name = "base"
    launch: Launch

    @staticmethod
    def stop_requested() -> bool:
        return False

    def publish(self, group: Group, status: GroupStatus) -> None:
        return None

    def log_tail(self, group: Group, process: str) -> tuple[str, ...]:
        return ()

    def followers(self) -> list[GroupDriver]:
        return []

    def tick(self, now: float) -> int | None:
        return None

    def ready(self) -> bool:
        return True

    def drain(self) -> None:
        return None

    def front_door(self) -> Endpoint:
        for group in self.launch.groups:
            for endpoint in self.endpoints(group):
                return endpoint
        raise UserError(f"{self.launch.plan.name}: no process serves HTTP, so there is nothing to send a request to.")
