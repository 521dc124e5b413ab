"""Bare-metal launcher: start this node's ranks, wait for the whole group, supervise, restart in step.

Run one launcher per node (like torchrun). For each DP group with ranks on this node, a
:class:`GroupRunner` drives the shared state machine (:mod:`widep.run.state`). The runner on the
group's leader node owns the attempt number and serves it on the group's control port; followers
follow it. Everything is polled from one loop: no threads besides the control server's.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from widep.errors import UserError
from widep.plan.core import DeploymentPlan, RolePlan
from widep.render.vllm import ProcessCommand, RenderContext, render_role
from widep.run.control import ControlServer, http_json, probe
from widep.run.procs import RankProcess, resolve_env, signal_name, start_rank, stop_ranks, tail
from widep.run.state import Failure, GroupState, GroupStatus, RestartPolicy, judge_health, note_health


@dataclass(frozen=True)
class LaunchOptions:
    node: int
    run_dir: Path
    ready_timeout_s: float
    unhealthy_grace_s: float = 30.0
    stop_timeout_s: float = 30.0
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    follow: bool = False
    probe_interval_s: float = 1.0
    leader_wait_s: float = 120.0
    """How long a follower waits for its group leader's control endpoint."""


def _node_host(plan: DeploymentPlan, ctx: RenderContext, node: int) -> str:
    if node in ctx.node_addresses:
        return ctx.node_addresses[node]
    n = plan.nodes[node]
    return n.address or n.name


class GroupRunner:
    """Supervises one DP group (a role's replica) from this node."""

    def __init__(self, plan: DeploymentPlan, rp: RolePlan, replica: int, ctx: RenderContext, opts: LaunchOptions,
                 console: Console, run_id: str, base_env: dict[str, str]) -> None:
        self.plan, self.rp, self.replica, self.ctx, self.opts = plan, rp, replica, ctx, opts
        self.console, self.run_id, self.base_env = console, run_id, base_env
        cmds = [c for c in render_role(plan, rp, ctx) if c.replica == replica]
        self.group_cmds: list[ProcessCommand] = cmds
        self.local_cmds = [c for c in cmds if c.node == opts.node]
        self.leader_node = rp.group_nodes[replica][0]
        self.is_leader = self.leader_node == opts.node
        self.leader_host = _node_host(plan, ctx, self.leader_node)
        self.label = f"{rp.name}" + (f"#{replica}" if rp.spec.replicas > 1 else "")
        self.tag = escape(f"[{self.label}]")
        self.status = GroupStatus()
        self.procs: list[RankProcess] = []
        self.attempt_started = 0.0
        self.unhealthy_since: dict[str, float] = {}
        self.next_probe = 0.0
        self.restart_at: float | None = None
        self.reported: set[int] = set()
        self.last_leader_ok = time.monotonic()
        self.control: ControlServer | None = None
        self.exit_code: int | None = None
        self.health: dict[str, str] = {}
        self.ready_printed = -1
        for c in self.local_cmds:  # resolve secrets now: a missing one is refused before anything starts
            resolve_env(c, base_env)

    # ---------------------------------------------------------------- lifecycle
    def endpoints(self) -> list[tuple[ProcessCommand, str, int]]:
        return [(c, _node_host(self.plan, self.ctx, c.node), c.health_port) for c in self.group_cmds if c.health_port]

    def begin(self) -> None:
        if self.is_leader:
            host = "0.0.0.0" if self.plan.spec.serving.host == "0.0.0.0" else self.leader_host
            self.control = ControlServer(host, self.rp.control_port, self.state_json)
            self.control.start()
            self._start_attempt()
        else:
            self.attempt_started = time.monotonic()

    def state_json(self) -> dict:
        return {"group": self.label, "leader": self.plan.nodes[self.leader_node].name} | self.status.as_dict()

    def _start_attempt(self) -> None:
        a = self.status.attempt
        self.procs = [start_rank(c, self.opts.run_dir, a, resolve_env(c, self.base_env), self.run_id, self.opts.stop_timeout_s)
                      for c in self.local_cmds]
        self.attempt_started = time.monotonic()
        self.unhealthy_since.clear()
        self.health.clear()
        if self.local_cmds:
            self.console.print(f"{self.tag} attempt {a}: started {', '.join(c.name for c in self.local_cmds)}; logs in "
                               f"{self.opts.run_dir / f'attempt-{a}' / self.rp.name}")

    def teardown(self) -> None:
        if self.procs:
            stop_ranks(self.procs, self.opts.stop_timeout_s)
            self.procs = []

    def close(self) -> None:
        self.teardown()
        if self.control:
            # let followers see the final state once more before the endpoint goes away
            time.sleep(min(2 * self.opts.probe_interval_s, 3.0))
            self.control.close()
            self.control = None

    # ---------------------------------------------------------------- failures
    def _local_exit(self) -> Failure | None:
        first: Failure | None = None
        for p in self.procs:
            code = p.poll()
            if code is not None:
                f = Failure(p.name, self.plan.nodes[p.cmd.node].name, signal_name(code), time.monotonic(), tail(p.log))
                if first is None or f.at < first.at:
                    first = f
        return first

    def _fail(self, f: Failure) -> None:
        if self.is_leader:
            self.status, d = self.status.on_failure(f, self.status.attempt, self.opts.policy)
            if d.action == "restart":
                self.console.print(f"[bold red]{self.tag} attempt {self.status.attempt} failed[/]: {f.describe()}")
                self.console.print(f"{self.tag} tearing the group down on every node; restart in {d.backoff_s:.0f} s "
                                   f"({self.opts.policy.max_restarts - self.status.restarts} restart(s) left)")
                self.teardown()
                self.restart_at = time.monotonic() + d.backoff_s
            elif d.action == "fail":
                self.console.print(f"[bold red]{self.tag} failed[/]: {f.describe()}")
                self.teardown()
                self.exit_code = 1
        elif self.status.attempt not in self.reported:
            self.reported.add(self.status.attempt)
            self.console.print(f"[bold red]{self.tag} {f.describe()}[/]; reporting to the group leader")
            try:
                http_json(self.leader_host, self.rp.control_port, "POST", "/fail",
                          {"attempt": self.status.attempt, "rank": f.rank, "node": f.node, "reason": f.reason, "log_tail": list(f.log_tail)})
            except (OSError, ValueError) as err:
                self.console.print(f"{self.tag} could not reach the leader ({err}); tearing down local ranks")
            self.teardown()

    # ---------------------------------------------------------------- the loop body
    def step(self, now: float) -> None:
        if self.exit_code is not None:
            return
        if self.is_leader:
            self._step_leader(now)
        else:
            self._step_follower(now)
        if self.opts.follow:
            for p in self.procs:
                for line in p.new_lines():
                    self.console.out(f"[{p.name}] {line}", highlight=False)

    def _probe_group(self, now: float) -> None:
        for c, host, port in self.endpoints():
            state, _ = probe(host, port, timeout=min(2.0, self.opts.probe_interval_s * 2))
            note_health(self.health, self.unhealthy_since, c.name, state, now)

    def _step_leader(self, now: float) -> None:
        assert self.control is not None
        while not self.control.reports.empty():
            r = self.control.reports.get()
            if r.attempt == self.status.attempt:
                self._fail(Failure(r.rank, r.node, r.reason, now, r.log_tail))
        st = self.status.state
        if st == GroupState.RESTARTING:
            if self.restart_at is not None and now >= self.restart_at:
                self.restart_at = None
                self.status = self.status.on_restart_begun()
                self._start_attempt()
            return
        if st == GroupState.FAILED:
            self.exit_code = 1
            return
        if st not in (GroupState.STARTING, GroupState.HEALTHY):
            return
        f = self._local_exit()
        if f:
            self._fail(f)
            return
        if now < self.next_probe:
            return
        self.next_probe = now + self.opts.probe_interval_s
        self._probe_group(now)
        v = judge_health(st, [c.name for c, _, _ in self.endpoints()], self.health, self.unhealthy_since,
                         self.attempt_started, now, self.opts.ready_timeout_s, self.opts.unhealthy_grace_s)
        if v.all_healthy:
            self.status = self.status.on_all_healthy()
        elif v.rank is not None:
            c0 = next(c for c in self.group_cmds if c.name == v.rank)
            self._fail(Failure(v.rank, self.plan.nodes[c0.node].name, v.reason, v.at, self._tail_of(c0)))

    def _tail_of(self, cmd: ProcessCommand) -> tuple[str, ...]:
        for p in self.procs:
            if p.cmd.name == cmd.name:
                return tail(p.log)
        return ()

    def _step_follower(self, now: float) -> None:
        if now >= self.next_probe:
            self.next_probe = now + self.opts.probe_interval_s
            try:
                s = http_json(self.leader_host, self.rp.control_port, "GET", "/state", timeout=2.0)
                self.last_leader_ok = now
            except (OSError, ValueError):
                s = None
            if s is None:
                limit = self.opts.leader_wait_s if self.status.state == GroupState.STARTING and not self.procs else self.opts.unhealthy_grace_s
                if now - self.last_leader_ok > limit:
                    self.console.print(f"[bold red]{self.tag} lost the group leader "
                                       f"{self.plan.nodes[self.leader_node].name} ({self.leader_host}:{self.rp.control_port}) "
                                       f"for {now - self.last_leader_ok:.0f} s[/]; stopping local ranks")
                    self.teardown()
                    self.exit_code = 1
                return
            state = GroupState(s["state"])
            attempt = int(s["attempt"])
            if state in (GroupState.FAILED, GroupState.STOPPED, GroupState.STOPPING):
                self.teardown()
                if state == GroupState.FAILED:
                    fl = s.get("failure") or {}
                    self.console.print(f"[bold red]{self.tag} the group failed[/]: {fl.get('rank')} on {fl.get('node')}: {fl.get('reason')}")
                self.exit_code = 1 if state == GroupState.FAILED else 0
                return
            if attempt != self.status.attempt or (not self.procs and state == GroupState.STARTING and attempt not in self.reported):
                if self.procs:
                    self.console.print(f"{self.tag} leader moved to attempt {attempt}: restarting local ranks in step")
                    self.teardown()
                if state in (GroupState.STARTING, GroupState.HEALTHY):
                    self.status = GroupStatus(attempt=attempt, state=state)
                    self._start_attempt()
                else:
                    self.status = GroupStatus(attempt=attempt, state=state)
                return
            self.status = GroupStatus(attempt=attempt, state=state)
        f = self._local_exit()
        if f:
            self._fail(f)


def ready_table(runners: list[GroupRunner]) -> Table:
    t = Table(title="endpoints", title_justify="left")
    for col in ("group", "ranks", "node", "url", "health"):
        t.add_column(col)
    for r in runners:
        for c, host, port in r.endpoints():
            ranks = ",".join(map(str, c.dp_ranks)) if len(c.dp_ranks) <= 4 else f"{c.dp_ranks[0]}-{c.dp_ranks[-1]}"
            t.add_row(r.label, ranks, c.node_name, f"http://{host}:{port}", r.health.get(c.name, "?"))
    return t


ROUTER_MAX_FAILED_STARTS = 5
"""Consecutive router starts that end before it is healthy, after which the launch fails."""


def router_executable(name: str) -> str:
    """The router command as a path: on PATH, else beside this interpreter (a venv's bin/, not activated)."""
    import shutil
    import sys

    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if not found:
        raise UserError(f"router.command: {name!r} is not on PATH nor beside {sys.executable}. "
                        "Install it (pip install 'widep[router]', i.e. vllm-router) or set router.command to its path. "
                        "Nothing was started.")
    return found


class RouterRunner:
    """The front door on its node: started once every API server of the plan is healthy, restarted when it
    dies (it holds no state the ranks need), stopped first on shutdown."""

    def __init__(self, plan: DeploymentPlan, ctx: RenderContext, opts: LaunchOptions, console: Console, run_id: str,
                 base_env: dict[str, str]) -> None:
        from widep.render.vllm import render, render_router

        self.plan, self.opts, self.console, self.run_id, self.base_env = plan, opts, console, run_id, base_env
        cmd = render_router(plan, ctx)
        assert cmd is not None
        self.cmd = replace(cmd, argv=(router_executable(cmd.argv[0]),) + cmd.argv[1:])
        resolve_env(cmd, base_env)
        self.fronted = [(c, _node_host(plan, ctx, c.node), c.port) for c in render(plan, ctx) if c.port is not None]
        self.proc: RankProcess | None = None
        self.starts = 0
        self.restart_at = 0.0
        self.next_probe = 0.0
        self.ranks_healthy = False
        self.host = _node_host(plan, ctx, cmd.node)
        self.healthy = False
        self.failures_in_a_row = 0
        self.exit_code: int | None = None

    def step(self, now: float) -> None:
        if self.proc is not None:
            code = self.proc.poll()
            if code is not None:
                self.failures_in_a_row = 0 if self.healthy else self.failures_in_a_row + 1
                last = "\n    ".join(tail(self.proc.log, 10))
                self.proc = None
                self.healthy = False
                if self.failures_in_a_row >= ROUTER_MAX_FAILED_STARTS:
                    self.console.print(f"[bold red]\\[router] failed {self.failures_in_a_row} starts in a row without becoming "
                                       f"healthy[/] ({signal_name(code)}):\n    {last}", highlight=False)
                    self.exit_code = 1
                    return
                self.console.print(f"[bold red]\\[router][/] {signal_name(code)}; restarting it in 2 s\n    {last}", highlight=False)
                self.restart_at = now + 2.0
            elif not self.healthy and now >= self.next_probe:
                self.next_probe = now + self.opts.probe_interval_s
                if probe(self.host, self.cmd.port or 0)[0] == "healthy":
                    self.healthy = True
                    self.failures_in_a_row = 0
                    self.console.print(f"\\[router] ready: http://{self.host}:{self.cmd.port} fronts {len(self.fronted)} API server(s) "
                                       f"({self.plan.spec.router.policy})", highlight=False)
            return
        if now < max(self.restart_at, self.next_probe):
            return
        self.next_probe = now + self.opts.probe_interval_s
        if not all(probe(h, p, timeout=2.0)[0] == "healthy" for _, h, p in self.fronted):
            return
        self.proc = start_rank(self.cmd, self.opts.run_dir, self.starts, resolve_env(self.cmd, self.base_env), self.run_id,
                               min(self.opts.stop_timeout_s, 10.0))
        self.starts += 1
        self.console.print(f"\\[router] started (start {self.starts}) on port {self.cmd.port}", highlight=False)

    def stop(self) -> None:
        if self.proc is not None:
            stop_ranks([self.proc], min(self.opts.stop_timeout_s, 10.0))
            self.proc = None


class Launcher:
    """Runs every group with ranks on this node until stopped, failed, or (``once``) ready."""

    def __init__(self, plan: DeploymentPlan, ctx: RenderContext, opts: LaunchOptions, console: Console | None = None,
                 base_env: dict[str, str] | None = None) -> None:
        self.plan, self.ctx, self.opts = plan, ctx, opts
        self.console = console or Console()
        self.run_id = uuid.uuid4().hex[:12]
        env = dict(os.environ if base_env is None else base_env)
        self.runners = [
            GroupRunner(plan, rp, g, ctx, opts, self.console, self.run_id, env)
            for rp in plan.roles
            for g in range(rp.spec.replicas)
            if opts.node in rp.group_nodes[g]
        ]
        self.router = (RouterRunner(plan, ctx, opts, self.console, self.run_id, env)
                       if plan.router is not None and plan.router.node == opts.node else None)
        if not self.runners and self.router is None:
            raise UserError(f"--node: node {opts.node} ({plan.nodes[opts.node].name}) runs no rank of {plan.name}.")
        self._stop_signal: int | None = None

    def _on_signal(self, signum: int, frame: object) -> None:  # noqa: ARG002
        self._stop_signal = signum

    def run(self, *, once: bool = False, on_ready=None) -> int:  # noqa: ANN001
        """Supervise until stopped (0), failed (1), or, with ``once``, until every group is healthy and
        ``on_ready`` returned (its return value)."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.opts.run_dir.mkdir(parents=True, exist_ok=True)
        self.console.print(f"run {self.run_id}: node {self.opts.node} ({self.plan.nodes[self.opts.node].name}), "
                           f"groups {', '.join(r.label for r in self.runners)}, logs under {self.opts.run_dir}")
        code = 0
        try:
            for r in self.runners:
                r.begin()
            last_report = 0.0
            announced: set[tuple[str, int]] = set()
            while True:
                now = time.monotonic()
                if self._stop_signal is not None:
                    self.console.print(f"received {signal.Signals(self._stop_signal).name}: stopping ranks")
                    code = 0
                    break
                for r in self.runners:
                    r.step(now)
                if self.router is not None:
                    self.router.step(now)
                done = [r for r in self.runners if r.exit_code is not None]
                if done:
                    code = max(r.exit_code or 0 for r in done)
                    break
                if self.router is not None and self.router.exit_code is not None:
                    code = self.router.exit_code
                    break
                healthy = all(r.status.state == GroupState.HEALTHY for r in self.runners) and (
                    self.router is None or self.router.healthy)
                key = tuple((r.label, r.status.attempt) for r in self.runners)
                if healthy and key not in announced:
                    announced.add(key)  # type: ignore[arg-type]
                    leaders = [r for r in self.runners if r.is_leader]
                    if leaders:
                        self.console.print(ready_table(leaders))
                        self.console.print(f"[bold green]ready[/]: {self.plan.name} (run {self.run_id}, logs under {self.opts.run_dir})")
                    if once:
                        code = on_ready() if on_ready else 0
                        break
                elif not healthy and now - last_report > 10:
                    last_report = now
                    for r in self.runners:
                        if r.is_leader and r.status.state == GroupState.STARTING:
                            waiting = [n for n, s in sorted(r.health.items()) if s != "healthy"] or [c.name for c in r.group_cmds]
                            self.console.print(f"{r.tag} attempt {r.status.attempt}: waiting {now - r.attempt_started:.0f} s "
                                               f"for {', '.join(waiting)} (timeout {self.opts.ready_timeout_s:.0f} s)")
                time.sleep(0.2)
        finally:
            if self.router is not None:
                self.router.stop()  # the front door goes first: no new requests reach ranks being stopped
            for r in self.runners:
                if r.is_leader:
                    r.status = r.status.on_stop() if r.exit_code is None else r.status
            for r in self.runners:
                r.teardown()
            for r in self.runners:
                if r.is_leader and r.exit_code is None:
                    r.status = r.status.on_stopped()
            for r in self.runners:
                r.close()
            for s, h in old.items():
                signal.signal(s, h)
        failed = [r for r in self.runners if r.exit_code]
        if failed:
            f = failed[0].status.failure
            if f:
                self.console.print(f"[bold red]failure[/]: {f.describe()}")
        return code
