"""Bare-metal backend: this node's processes, started through the guard; one `widep launch` per node (like torchrun).

For each DP group with processes on this node, the supervisor on the group's leader node runs the restart policy
(:class:`~widep.run.supervisor.SupervisedGroup`) and serves the group's status on its control port; the launchers
on the other nodes follow it (:class:`FollowerGroup`): they start and stop their share of the group in step with
the leader's attempt number and report their failures to it. The router, when this node runs it, starts once every
API server of the plan is healthy, restarts when it dies, and stops first.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from widep.errors import UserError
from widep.render.vllm import ProcessCommand
from widep.run.backend import BackendBase, DryRun, Endpoint, GroupDriver, Poll, StartFailed
from widep.run.control import ControlServer, http_json, probe
from widep.run.host import default_run_dir
from widep.run.launch import Group, Launch, LaunchRequest
from widep.run.preflight import check_before_start, resolve_node
from widep.run.procs import (
    RankProcess,
    kill_ranks,
    resolve_env,
    root_cause,
    signal_name,
    start_rank,
    stop_ranks,
    tail,
    tear_down_together,
)
from widep.run.state import Failure, GroupState, GroupStatus

GroupKey = tuple[str, int]
STARTING_GRACE_S = 1.0
"""SIGTERM -> SIGKILL for a group stopped before it was healthy (starting API servers ignore SIGTERM)."""


def key_of(group: Group) -> GroupKey:
    return (group.role, group.replica)


def node_of(request: LaunchRequest) -> int:
    """This machine's plan node, which :meth:`BareMetal.resolve` put in the request."""
    if request.node is None:
        raise ValueError("bare metal: the request's node is set by BareMetal.resolve before anything else")
    return request.node


def create_backend(console: Console) -> BareMetal:
    return BareMetal(console)


class BareMetal(BackendBase):
    """This node's share of every group, as local processes."""

    name = "bare-metal"

    def __init__(self, console: Console) -> None:
        self.console = console
        self.base_env: dict[str, str] = dict(os.environ)
        self.procs: dict[GroupKey, list[RankProcess]] = {}
        self.attempt: dict[GroupKey, int] = {}
        self.next_probe: dict[GroupKey, float] = {}
        self.statuses: dict[GroupKey, GroupStatus] = {}
        self.controls: dict[GroupKey, ControlServer] = {}
        self.following: list[FollowerGroup] = []
        self.router: RouterRunner | None = None
        self.served: set[GroupKey] = set()
        """Groups whose current attempt became healthy (stopping them gives requests the full grace)."""

    @property
    def node(self) -> int:
        return node_of(self.launch.request)

    # ------------------------------------------------------------------ before anything starts
    def resolve(self, request: LaunchRequest) -> LaunchRequest:
        me = resolve_node(request.plan, request.node)
        return replace(request, node=me, run_dir=request.run_dir or default_run_dir(request.plan, f"n{me}"))

    def dry_run(self, launch: Launch) -> DryRun:
        me = node_of(launch.request)
        procs = tuple(c for c in launch.processes if c.node == me)
        return DryRun(f"node {me} ({launch.plan.nodes[me].name}): {len(procs)} process(es) would start", procs)

    def prepare(self, launch: Launch) -> list[Group]:
        self.launch = launch
        p, req, me = launch.plan, launch.request, self.node
        local = [c for c in launch.processes if c.node == me]
        if not req.skip_preflight:
            check_before_start(p, local, me, launch.model)
        for c in local:  # secrets now: a missing one is refused before anything starts
            resolve_env(c, self.base_env)
        mine = [g for g in launch.groups if me in g.nodes]
        if launch.router is not None and launch.router.node == me:
            self.router = RouterRunner(self, launch.router)
        if not mine and self.router is None:
            raise UserError(f"--node: node {me} ({p.nodes[me].name}) runs no rank of {p.name}.")
        self.console.print(
            f"widep launch {p.name}: node {me} ({p.nodes[me].name}), {len(local)} process(es), "
            f"run dir {launch.run_dir}",
            markup=False,
        )
        launch.run_dir.mkdir(parents=True, exist_ok=True)
        self.console.print(
            f"run {launch.run_id}: node {me} ({p.nodes[me].name}), groups "
            f"{', '.join(g.label for g in mine)}, logs under {launch.run_dir}",
            markup=False,
        )
        owned = [g for g in mine if g.leader_node == me]
        self.following = [FollowerGroup(self, g) for g in mine if g.leader_node != me]
        for g in owned:
            leader = g.on_node(me)[0]
            host = "0.0.0.0" if p.spec.serving.host == "0.0.0.0" else leader.node_address
            self.controls[key_of(g)] = ControlServer(host, g.control_port, self._state_fn(g))
            self.controls[key_of(g)].start()
        return owned

    def _state_fn(self, group: Group) -> Callable[[], dict]:
        def state() -> dict:
            status = self.statuses.get(key_of(group), GroupStatus())
            return {"group": group.label, "leader": self.launch.plan.nodes[group.leader_node].name} | status.as_dict()

        return state

    # ------------------------------------------------------------------ attempts
    def start(self, group: Group, attempt: int) -> str:
        k = key_of(group)
        self.stop(group)
        req = self.launch.request
        local = group.on_node(self.node)
        self.attempt[k] = attempt
        self.served.discard(k)
        run_dir, run_id = self.launch.run_dir, self.launch.run_id
        self.procs[k] = tear_down_together(
            [start_rank(c, run_dir, attempt, resolve_env(c, self.base_env), run_id, req.stop_timeout_s) for c in local]
        )
        self.next_probe[k] = 0.0
        if not local:
            return ""
        return f"{', '.join(c.name for c in local)}; logs in {self.launch.run_dir / f'attempt-{attempt}' / group.role}"

    def local_failure(self, group: Group) -> Failure | None:
        """The root cause among this node's exited processes of the group (:func:`~widep.run.procs.root_cause`)."""
        p = root_cause(self.procs.get(key_of(group), []))
        if p is None:
            return None
        return Failure(p.name, p.cmd.node_name, signal_name(p.exit_code or 0), p.exit_seen or 0.0, tail(p.log))

    def new_lines(self, group: Group) -> tuple[tuple[str, str], ...]:
        if not self.launch.request.follow:
            return ()
        return tuple((p.name, line) for p in self.procs.get(key_of(group), []) for line in p.new_lines())

    def poll(self, group: Group, now: float) -> Poll:
        k = key_of(group)
        lines = self.new_lines(group)
        failures: list[Failure] = []
        control = self.controls.get(k)
        current = self.statuses.get(k, GroupStatus()).attempt
        while control is not None and not control.reports.empty():
            r = control.reports.get()
            if r.attempt == current:
                failures.append(Failure(r.rank, r.node, r.reason, now, r.log_tail))
        f = self.local_failure(group)
        if f is not None:
            failures.append(f)
        if failures:
            return Poll(failures=tuple(failures), lines=lines)
        if now < self.next_probe.get(k, 0.0):
            return Poll(complete=False, lines=lines)
        interval = self.launch.request.probe_interval_s
        self.next_probe[k] = now + interval
        health = {}
        for c, host, port in self.endpoints(group):
            # a death seen between two probes is acted on now, not after the next probe's timeout
            f = self.local_failure(group)
            if f is not None:
                return Poll(failures=(f,), lines=lines)
            health[c.name] = probe(host, port, timeout=min(1.0, interval * 2))[0]
        return Poll(health=health, lines=lines)

    def endpoints(self, group: Group) -> list[Endpoint]:
        return [Endpoint(c, c.node_address, c.health_port) for c in group.processes if c.health_port]

    def log_tail(self, group: Group, process: str) -> tuple[str, ...]:
        return next((tail(p.log) for p in self.procs.get(key_of(group), []) if p.name == process), ())

    def running(self, group: Group) -> bool:
        return bool(self.procs.get(key_of(group)))

    def stop(self, group: Group) -> None:
        """A group whose rank died is SIGKILLed at once (it restarts anyway; the engine core ignores SIGTERM);
        one stopped before it was ever healthy gets 1 s (starting API servers ignore SIGTERM); a serving one the
        full grace to finish its requests."""
        k = key_of(group)
        procs = self.procs.pop(k, [])
        if not procs:
            return
        st = self.statuses.get(k)
        if any(p.poll() is not None for p in procs) or (st and st.state in (GroupState.RESTARTING, GroupState.FAILED)):
            kill_ranks(procs)
        elif k not in self.served:
            stop_ranks(procs, STARTING_GRACE_S, slack_s=0.0)
        else:
            stop_ranks(procs, self.launch.request.stop_timeout_s)

    def publish(self, group: Group, status: GroupStatus) -> None:
        k = key_of(group)
        self.statuses[k] = status
        if status.state == GroupState.HEALTHY:
            self.served.add(k)

    # ------------------------------------------------------------------ the rest of the node
    def followers(self) -> list[GroupDriver]:
        return list(self.following)

    def tick(self, now: float) -> int | None:
        if self.router is None:
            return None
        self.router.step(now)
        return self.router.exit_code

    def ready(self) -> bool:
        return self.router is None or self.router.healthy

    def drain(self) -> None:
        if self.router is not None:
            self.router.stop()

    def front_door(self) -> Endpoint:
        if self.launch.router is not None:
            r = self.launch.router
            return Endpoint(r, r.node_address, r.port or 0)
        return super().front_door()

    def shutdown(self) -> None:
        for k in list(self.procs):
            stop_ranks(self.procs.pop(k), self.launch.request.stop_timeout_s)
        if self.controls:
            # let followers see the final state once more before the endpoints go away
            time.sleep(min(2 * self.launch.request.probe_interval_s, 3.0))
            for c in self.controls.values():
                c.close()
            self.controls.clear()


class FollowerGroup:
    """This node's share of a group led from another node: starts and stops in step with the leader's attempt,
    reports its failures to the leader, and stops when the leader stops or fails (a
    :class:`~widep.run.backend.GroupDriver`)."""

    owner = False

    def __init__(self, backend: BareMetal, group: Group) -> None:
        self.backend, self.group = backend, group
        self.console = backend.console
        self.request = backend.launch.request
        self.label = group.label
        self.tag = escape(f"[{group.label}]")
        self.status = GroupStatus()
        self.exit_code: int | None = None
        self.health: dict[str, str] = {}
        self.attempt_started = time.monotonic()
        self.next_probe = 0.0
        self.last_leader_ok = time.monotonic()
        self.reported: set[int] = set()
        leader = group.on_node(group.leader_node)[0]
        self.leader_host, self.leader_name = leader.node_address, leader.node_name

    def endpoints(self) -> list[Endpoint]:
        return self.backend.endpoints(self.group)

    def _start(self, attempt: int) -> None:
        self.attempt_started = time.monotonic()
        started = ""
        try:
            started = self.backend.start(self.group, attempt)
        except StartFailed as err:
            self._fail(Failure(self.label, err.node, err.reason, time.monotonic()))
        if started:
            self.console.print(f"{self.tag} attempt {attempt}: started {escape(started)}", highlight=False)

    def _fail(self, f: Failure) -> None:
        if self.status.attempt in self.reported:
            return
        self.reported.add(self.status.attempt)
        self.console.print(
            f"[bold red]{self.tag} {escape(f.describe())}[/]; reporting to the group leader", highlight=False
        )
        try:
            http_json(
                self.leader_host,
                self.group.control_port,
                "POST",
                "/fail",
                {
                    "attempt": self.status.attempt,
                    "rank": f.rank,
                    "node": f.node,
                    "reason": f.reason,
                    "log_tail": list(f.log_tail),
                },
            )
        except (OSError, ValueError) as err:
            self.console.print(f"{self.tag} could not reach the leader ({escape(str(err))}); tearing down local ranks")
        self.stop()

    def step(self, now: float) -> None:
        if self.exit_code is not None:
            return
        for name, line in self.backend.new_lines(self.group):
            self.console.out(f"[{name}] {line}", highlight=False)
        if now >= self.next_probe:
            self.next_probe = now + self.request.probe_interval_s
            if not self._follow(now):
                return
        f = self.backend.local_failure(self.group)
        if f:
            self._fail(f)

    def _follow(self, now: float) -> bool:
        """Mirror the leader's state once; False when this group is done or waits for the leader."""
        try:
            s = http_json(self.leader_host, self.group.control_port, "GET", "/state", timeout=2.0)
            self.last_leader_ok = now
        except (OSError, ValueError):
            s = None
        running = self.backend.running(self.group)
        if s is None:
            limit = (
                self.request.leader_wait_s
                if self.status.state == GroupState.STARTING and not running
                else self.request.unhealthy_grace_s
            )
            if now - self.last_leader_ok > limit:
                self.console.print(
                    f"[bold red]{self.tag} lost the group leader {self.leader_name} "
                    f"({self.leader_host}:{self.group.control_port}) for {now - self.last_leader_ok:.0f} s[/]; "
                    "stopping local ranks"
                )
                self.stop()
                self.exit_code = 1
            return False
        state, attempt = GroupState(s["state"]), int(s["attempt"])
        if state in (GroupState.FAILED, GroupState.STOPPED, GroupState.STOPPING):
            self.stop()
            if state == GroupState.FAILED:
                fl = s.get("failure") or {}
                self.console.print(
                    f"[bold red]{self.tag} the group failed[/]: {fl.get('rank')} on {fl.get('node')}: "
                    f"{escape(str(fl.get('reason')))}"
                )
            self.exit_code = 1 if state == GroupState.FAILED else 0
            return False
        if attempt != self.status.attempt or (
            not running and state == GroupState.STARTING and attempt not in self.reported
        ):
            if running:
                self.console.print(f"{self.tag} leader moved to attempt {attempt}: restarting local ranks in step")
                self.stop()
            self.status = GroupStatus(attempt=attempt, state=state)
            if state in (GroupState.STARTING, GroupState.HEALTHY):
                self._start(attempt)
            return False
        self.status = GroupStatus(attempt=attempt, state=state)
        return True

    def stop(self) -> None:
        self.backend.stop(self.group)

    def close(self) -> None:
        return None


ROUTER_MAX_FAILED_STARTS = 5
"""Consecutive router starts that end before it is healthy, after which the launch fails."""


def router_executable(name: str) -> str:
    """The router command as a path: on PATH, else beside this interpreter (a venv's bin/, not activated)."""
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if not found:
        raise UserError(
            f"router.command: {name!r} is not on PATH nor beside {sys.executable}. "
            "Install it (pip install 'widep[router]', i.e. vllm-router) or set router.command to its path. "
            "Nothing was started."
        )
    return found


class RouterRunner:
    """The front door on its node: started once every API server of the plan is healthy, restarted when it
    dies (it holds no state the ranks need), stopped first on shutdown."""

    def __init__(
        self, backend: BackendBase, cmd: ProcessCommand, fronted: list[tuple[ProcessCommand, str, int]] | None = None
    ) -> None:
        """``backend``: bare metal's, or the Ray driver's (``console``, ``launch``, ``base_env``); ``fronted``: the
        API servers it fronts as (process, host, port), by default every rendered one at its topology address."""
        self.backend, self.console = backend, backend.console
        self.launch = backend.launch
        self.cmd = cmd.with_executable(router_executable(cmd.argv[0]))
        resolve_env(cmd, backend.base_env)
        if fronted is None:
            fronted = [(c, c.node_address, c.port) for c in self.launch.processes if c.port is not None]
        self.fronted = fronted
        self.host = cmd.node_address
        self.proc: RankProcess | None = None
        self.starts = 0
        self.restart_at = 0.0
        self.next_probe = 0.0
        self.healthy = False
        self.failures_in_a_row = 0
        self.exit_code: int | None = None

    @property
    def grace_s(self) -> float:
        return min(self.launch.request.stop_timeout_s, 10.0)

    def step(self, now: float) -> None:
        interval = self.launch.request.probe_interval_s
        if self.proc is not None:
            code = self.proc.poll()
            if code is not None:
                self.failures_in_a_row = 0 if self.healthy else self.failures_in_a_row + 1
                last = "\n    ".join(tail(self.proc.log, 10))
                self.proc = None
                self.healthy = False
                if self.failures_in_a_row >= ROUTER_MAX_FAILED_STARTS:
                    self.console.print(
                        f"[bold red]\\[router] failed {self.failures_in_a_row} starts in a row without becoming "
                        f"healthy[/] ({signal_name(code)}):\n    {escape(last)}",
                        highlight=False,
                    )
                    self.exit_code = 1
                    return
                self.console.print(
                    f"[bold red]\\[router][/] {signal_name(code)}; restarting it in 2 s\n    {escape(last)}",
                    highlight=False,
                )
                self.restart_at = now + 2.0
            elif not self.healthy and now >= self.next_probe:
                self.next_probe = now + interval
                if probe(self.host, self.cmd.port or 0)[0] == "healthy":
                    self.healthy = True
                    self.failures_in_a_row = 0
                    self.console.print(
                        f"\\[router] ready: http://{self.host}:{self.cmd.port} fronts {len(self.fronted)} "
                        f"API server(s) ({self.launch.plan.spec.router.policy})",
                        highlight=False,
                    )
            return
        if now < max(self.restart_at, self.next_probe):
            return
        self.next_probe = now + interval
        if not all(probe(h, p, timeout=2.0)[0] == "healthy" for _, h, p in self.fronted):
            return
        self.proc = start_rank(
            self.cmd,
            Path(self.launch.run_dir),
            self.starts,
            resolve_env(self.cmd, self.backend.base_env),
            self.launch.run_id,
            self.grace_s,
        )
        self.starts += 1
        self.console.print(f"\\[router] started (start {self.starts}) on port {self.cmd.port}", highlight=False)

    def stop(self) -> None:
        if self.proc is not None:
            stop_ranks([self.proc], self.grace_s)
            self.proc = None
