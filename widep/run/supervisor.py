"""The one supervision loop every backend shares, and the restart policy of a DP group.

:class:`Supervisor` runs a launch on a backend (:mod:`widep.run.backend`): signal handling (the handler only sets
a flag), the round loop, "ready" once per attempt with the readiness table, waiting lines every 10 s, the ordered
teardown (front door first, then every group, then the backend) and the earliest failure printed last.
:class:`SupervisedGroup` is the restart policy of one DP group, the same for every backend: it feeds the backend's
:class:`~widep.run.backend.Poll` into the group state machine (:mod:`widep.run.state`) and acts on its decisions:
tear the group down everywhere and start the next attempt after the backoff, or fail.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from widep.run.backend import Backend, Endpoint, GroupDriver, StartFailed
from widep.run.host import smoke_completion
from widep.run.launch import Group, Launch, LaunchRequest
from widep.run.state import Failure, GroupState, GroupStatus, judge_health, note_health

REPORT_EVERY_S = 10.0
"""How often a starting group's waiting line is printed."""
ROUND_S = 0.2
"""Pause between two rounds of the loop (backends poll at their own pace within it)."""


def node_label(endpoint: Endpoint) -> str:
    """'node-0', or 'node-0 @ 10.0.0.1' when the node is reached by an address other than its name."""
    name = endpoint.process.node_name
    return name if endpoint.host in (name, "?") else f"{name} @ {endpoint.host}"


class SupervisedGroup:
    """One DP group whose restart policy this supervisor runs (a :class:`~widep.run.backend.GroupDriver`)."""

    owner = True

    def __init__(self, backend: Backend, group: Group, request: LaunchRequest, console: Console) -> None:
        self.backend, self.group, self.request, self.console = backend, group, request, console
        self.label = group.label
        self.tag = escape(f"[{group.label}]")
        self.status = GroupStatus()
        self.health: dict[str, str] = {}
        self.unhealthy_since: dict[str, float] = {}
        self.attempt_started = 0.0
        self.restart_at: float | None = None
        self.exit_code: int | None = None

    def endpoints(self) -> list[Endpoint]:
        return self.backend.endpoints(self.group)

    def set_status(self, status: GroupStatus) -> None:
        if status != self.status:
            self.status = status
            self.backend.publish(self.group, status)

    def begin(self) -> None:
        self.backend.publish(self.group, self.status)
        self._start()

    def _start(self) -> None:
        a = self.status.attempt
        self.health.clear()
        self.unhealthy_since.clear()
        try:
            started = self.backend.start(self.group, a)
        except StartFailed as err:
            self._fail(Failure(self.label, err.node, err.reason, time.monotonic()))
            return
        self.attempt_started = time.monotonic()
        if started:
            self.console.print(f"{self.tag} attempt {a}: started {escape(started)}", highlight=False)

    def _fail(self, f: Failure) -> None:
        status, d = self.status.on_failure(f, self.status.attempt, self.request.policy)
        self.set_status(status)
        if d.action == "restart":
            self.console.print(
                f"[bold red]{self.tag} attempt {self.status.attempt} failed[/]: {escape(f.describe())}", highlight=False
            )
            self.console.print(
                f"{self.tag} tearing the group down on every node; restart in {d.backoff_s:.0f} s "
                f"({self.request.policy.max_restarts - self.status.restarts} restart(s) left)"
            )
            self.stop()
            self.restart_at = time.monotonic() + d.backoff_s
        elif d.action == "fail":
            self.console.print(f"[bold red]{self.tag} failed[/]: {escape(f.describe())}", highlight=False)
            self.stop()
            self.exit_code = 1

    def step(self, now: float) -> None:
        if self.exit_code is not None:
            return
        st = self.status.state
        if st == GroupState.RESTARTING:
            if self.restart_at is not None and now >= self.restart_at:
                self.restart_at = None
                self.set_status(self.status.on_restart_begun())
                self._start()
            return
        if st == GroupState.FAILED:
            self.exit_code = 1
            return
        if st not in (GroupState.STARTING, GroupState.HEALTHY):
            return
        poll = self.backend.poll(self.group, now)
        for name, line in poll.lines:
            self.console.out(f"[{name}] {line}", highlight=False)
        for name, state in poll.health.items():
            note_health(self.health, self.unhealthy_since, name, state, now)
        if poll.failures:
            self._fail(min(poll.failures, key=lambda f: f.at))
            return
        if not poll.complete:
            return
        endpoints = self.endpoints()
        v = judge_health(
            st,
            [e.process.name for e in endpoints],
            self.health,
            self.unhealthy_since,
            self.attempt_started,
            now,
            self.request.ready_timeout,
            self.request.unhealthy_grace_s,
        )
        if v.all_healthy:
            self.set_status(self.status.on_all_healthy())
        elif v.rank is not None:
            e = next(e for e in endpoints if e.process.name == v.rank)
            self._fail(Failure(v.rank, node_label(e), v.reason, v.at, self.backend.log_tail(self.group, v.rank)))

    def waiting(self) -> list[str]:
        """Endpoints of the attempt that are not healthy yet."""
        return [e.process.name for e in self.endpoints() if self.health.get(e.process.name) != "healthy"]

    def stop(self) -> None:
        self.backend.stop(self.group)

    def close(self) -> None:
        return None


def ready_table(groups: list[GroupDriver]) -> Table:
    t = Table(title="endpoints", title_justify="left")
    for col in ("group", "ranks", "node", "url", "health"):
        t.add_column(col)
    for g in groups:
        for c, host, port in g.endpoints():
            ranks = ",".join(map(str, c.dp_ranks)) if len(c.dp_ranks) <= 4 else f"{c.dp_ranks[0]}-{c.dp_ranks[-1]}"
            t.add_row(g.label, ranks, c.node_name, f"http://{host}:{port}", g.health.get(c.name, "?"))
    return t


class Supervisor:
    """Runs one launch on one backend until stopped (0), failed (1), or, with ``once``, ready and answered."""

    def __init__(self, backend: Backend, launch: Launch, console: Console) -> None:
        self.backend, self.launch, self.console = backend, launch, console
        self.stop_signal: int | None = None
        self.owned: list[SupervisedGroup] = []
        self.drivers: list[GroupDriver] = []

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_signal = signum

    def stopping(self) -> bool:
        """Whether a stop was asked for (backends that wait, e.g. for placement, give up early)."""
        return self.stop_signal is not None

    def run(self, on_ready: Callable[[], int] | None = None) -> int:
        """Supervise; ``on_ready`` (default: the smoke completion) ends a ``once`` launch with its exit code."""
        req = self.launch.request
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        self.backend.stop_requested = self.stopping
        try:
            groups = self.backend.prepare(self.launch)
            self.owned = [SupervisedGroup(self.backend, g, req, self.console) for g in groups]
            self.drivers = [*self.owned, *self.backend.followers()]
            for g in self.owned:
                g.begin()
            code = self._loop(on_ready)
        finally:
            self._teardown()
            for s, h in old.items():
                signal.signal(s, h)
        first = next((g.status.failure for g in self.owned if g.exit_code and g.status.failure), None)
        if first is not None:
            self.console.print(f"[bold red]failure[/]: {escape(first.describe())}", highlight=False)
        return code

    def _loop(self, on_ready: Callable[[], int] | None) -> int:
        req = self.launch.request
        announced: set[tuple[tuple[str, int], ...]] = set()
        last_report = time.monotonic()
        while True:
            now = time.monotonic()
            if self.stop_signal is not None:
                self.console.print(f"received {signal.Signals(self.stop_signal).name}: stopping ranks")
                return 0
            for d in self.drivers:
                d.step(now)
            code = self.backend.tick(now)
            if code is not None:
                return code
            done = [d.exit_code for d in self.drivers if d.exit_code is not None]
            if done:
                return max(done)
            healthy = all(d.status.state == GroupState.HEALTHY for d in self.drivers) and self.backend.ready()
            key = tuple((d.label, d.status.attempt) for d in self.drivers)
            if healthy and key not in announced:
                announced.add(key)
                if self.owned:
                    since = now - max(g.attempt_started for g in self.owned)
                    self.console.print(ready_table(list(self.owned)))
                    self.console.print(
                        f"[bold green]ready[/]: {self.launch.plan.name} (run {self.launch.run_id}, "
                        f"healthy {since:.1f} s after the last start, logs under {self.launch.run_dir})"
                    )
                if req.once:
                    if on_ready:
                        return on_ready()
                    return smoke_completion(self.launch, self.smoke_doors(), ranks=self.rank_doors())
            elif not healthy and now - last_report > REPORT_EVERY_S:
                last_report = now
                for g in self.owned:
                    if g.status.state == GroupState.STARTING:
                        self.console.print(
                            f"{g.tag} attempt {g.status.attempt}: waiting {now - g.attempt_started:.0f} s "
                            f"for {', '.join(g.waiting())} (timeout {req.ready_timeout:.0f} s)"
                        )
            time.sleep(ROUND_S)

    def rank_doors(self) -> list[Endpoint]:
        """Every API server of the launch (``--once`` on a P/D topology reads their counters)."""
        return [e for group in self.launch.groups for e in self.backend.endpoints(group)]

    def smoke_doors(self) -> list[Endpoint]:
        """Where ``--once`` sends its completion: the front door, and every API server unless the topology is P/D."""
        doors = [self.backend.front_door()]
        if not self.launch.plan.spec.disaggregated:
            for group in self.launch.groups:
                doors += [e for e in self.backend.endpoints(group) if e not in doors]
        return doors

    def _teardown(self) -> None:
        """Front door first (no new requests reach ranks being stopped), then every group, then the backend."""
        try:
            self.backend.drain()
            for g in self.owned:
                if g.exit_code is None:
                    g.set_status(g.status.on_stop())
            for d in self.drivers:
                d.stop()
            for g in self.owned:
                if g.exit_code is None:
                    g.set_status(g.status.on_stopped())
            for d in self.drivers:
                d.close()
        finally:
            self.backend.shutdown()
