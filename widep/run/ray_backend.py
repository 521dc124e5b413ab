"""Ray backend: ``widep launch TOPOLOGY --backend ray --address auto`` places, starts, supervises and tears down a
whole multi-node deployment from one command on the Ray head node.

Placement: one placement group for the deployment, ``STRICT_SPREAD``, with one bundle per plan node that runs ranks
(in plan order: role, replica, leader node first). A bundle is a whole node: ``{"GPU": gpus_per_node}``, or for CPU
topologies ``{"widep_slot": gpus_per_node}`` (a custom resource standing in for GPUs: start CPU nodes with
``ray start --resources '{"widep_slot": N}'``). Plan node n's ranks run in bundle n, so rank <-> node <-> GPU is the
plan's; only the addresses come from Ray: where Ray placed each bundle gives the node's IP, which the renderer
receives as ``RenderContext.node_addresses`` / ``leader_addresses`` (``--host``, ``--data-parallel-address``, NIXL
side channels). On a lost node Ray moves that bundle to another node with the resources, if there is one.

Processes: one :class:`NodeAgent` actor per bundle starts its node's rendered vLLM commands through the guard
(:func:`widep.run.procs.start_rank`), so when the actor dies, however it dies, the guard takes the rank's whole
process tree down (PR_SET_PDEATHSIG); logs go to ``<run>/attempt-<k>/<role>/rank-<n>/vllm.log`` on that node, as on
bare metal. The agent reports exits, log tails and /health of its ranks.

Supervision: the driver runs one :class:`RayGroup` per DP group with the shared state machine
(:mod:`widep.run.state`: fate-sharing group restart, bounded retries, backoff; :func:`judge_health` readiness rules)
and prints the bare-metal launcher's readiness table. Ctrl-C / SIGTERM stops every rank, kills every actor and
removes the placement group; if the driver itself is killed, Ray kills its actors and the guards clean up.

Ray is optional (``pip install 'widep[ray]'``); this module imports it only inside functions.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from widep.errors import UserError
from widep.plan.core import DeploymentPlan, RolePlan
from widep.render.vllm import EnvRef, ProcessCommand, RenderContext, render, render_role
from widep.run.state import Failure, GroupState, GroupStatus, RestartPolicy, judge_health, note_health

SLOT_RESOURCE = "widep_slot"
"""Ray custom resource that stands in for GPUs on CPU topologies (one per CPU slot of a node)."""

INSTALL_HINT = "pip install 'widep[ray]'"


# --------------------------------------------------------------------------------------------- pure helpers
def import_ray() -> Any:
    """The ``ray`` module, or a UserError that says how to install it."""
    try:
        import ray
    except ImportError as err:
        raise UserError(
            f"--backend: 'ray' needs Ray, which is not installed for {sys.executable} ({err}). "
            f"Install it with `{INSTALL_HINT}` (Ray >= 2.40) on the head node and every node, start the cluster "
            "(`ray start --head` there, `ray start --address HEAD:6379` on each node), then run again. "
            "Valid without Ray: --backend bare-metal (one `widep launch` per node)."
        ) from None
    return ray


def bundle_nodes(plan: DeploymentPlan) -> list[int]:
    """Plan node indices that run ranks, in plan order (role, replica, leader node first): bundle i <-> node [i]."""
    out: list[int] = []
    for rp in plan.roles:
        for group in rp.group_nodes:
            out += [n for n in group if n not in out]
    return out


def bundle_resources(plan: DeploymentPlan) -> dict[str, float]:
    """One bundle = one whole node of the plan: its GPUs, or its CPU slots as the custom resource."""
    n = float(plan.spec.cluster.gpus_per_node)
    return {"GPU": n} if plan.device == "cuda" else {SLOT_RESOURCE: n}


def readdressed(plan: DeploymentPlan, addresses: dict[int, str]) -> DeploymentPlan:
    """The plan with node ``i``'s address replaced by ``addresses[i]`` (where Ray placed it); for the doctor's
    port checks and the smoke completion, which read addresses from the plan."""
    nodes = tuple(n.model_copy(update={"address": addresses[i]}) if i in addresses else n for i, n in enumerate(plan.nodes))
    return replace(plan, nodes=nodes)


def map_visible_devices(value: str, ray_gpu_ids: list[Any]) -> str:
    """Plan GPU ids index a node's GPUs; Ray gave the node's agent ``ray_gpu_ids`` (the whole node, as Ray
    numbers them): plan id j -> the j-th of them. Unchanged when Ray assigned none."""
    if not ray_gpu_ids or not value:
        return value
    ids = sorted((str(i) for i in ray_gpu_ids), key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    out = []
    for tok in value.split(","):
        j = int(tok)
        if j >= len(ids):
            raise ValueError(f"plan GPU {j} but Ray gave this node's agent only {len(ids)} GPU(s): {ids}")
        out.append(ids[j])
    return ",".join(out)


def secrets_for(cmds: list[ProcessCommand], env: dict[str, str]) -> dict[str, str]:
    """Values of the variables the commands take by reference (EnvRef), from the driver's environment."""
    out: dict[str, str] = {}
    for c in cmds:
        for k, v in c.env:
            if isinstance(v, EnvRef):
                if v.name not in env:
                    raise UserError(f"{k}: the topology passes it by reference from ${v.name}, which is not set where "
                                    "`widep launch --backend ray` runs (the driver passes it to the nodes). Set it and run again.")
                out[v.name] = env[v.name]
    return out


def placement_problem(plan: DeploymentPlan, nodes: list[dict[str, Any]], needed: int) -> str | None:
    """Why ``needed`` whole-node bundles cannot be placed on the alive Ray ``nodes`` (ray.nodes() rows), or None."""
    want = bundle_resources(plan)
    fits = [n for n in nodes if n.get("Alive") and all(n.get("Resources", {}).get(k, 0) >= v for k, v in want.items())]
    if len(fits) >= needed:
        return None
    res = ", ".join(f"{k}: {v:g}" for k, v in want.items())
    alive = [n for n in nodes if n.get("Alive")]
    def res_of(n: dict[str, Any]) -> str:
        r = n.get("Resources", {})
        return ", ".join(f"{k}: {r.get(k, 0):g}" for k in want)

    have = "; ".join(f"{n.get('NodeManagerAddress')} ({res_of(n)})" for n in alive) or "none"
    hint = (f"start CPU nodes with `ray start --resources '{{\"{SLOT_RESOURCE}\": {int(want[SLOT_RESOURCE])}}}'`"
            if SLOT_RESOURCE in want else "add GPU nodes (`ray start --address HEAD:6379 --num-gpus N`)")
    return (f"{plan.name} needs {needed} Ray node(s) with {{{res}}} each, one per plan node (STRICT_SPREAD), but the "
            f"cluster has {len(fits)}. Alive nodes: {have}. Valid: at least {needed} such node(s); {hint}.")


# --------------------------------------------------------------------------------------------- the node agent
RAY_RUNTIME_ENV = ("OMP_NUM_THREADS", "PYTHONBREAKPOINT", "CUDA_VISIBLE_DEVICES")
"""Variables a Ray worker sets on itself at run time (OMP_NUM_THREADS=1, Ray's debugger hook, the actor's
GPUs); a rank gets the node's value, as on bare metal, or the rendered one."""


def start_env() -> dict[str, str]:
    """The environment a rank starts from: the node's (what this Ray worker was started with, without Ray's
    own RAY_* variables and what Ray sets in the worker at run time), like a bare-metal launcher's."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
        env = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
    except OSError:
        env = {k: v for k, v in os.environ.items() if k not in RAY_RUNTIME_ENV}
    return {k: v for k, v in env.items() if not k.startswith("RAY_")}


class NodeAgent:
    """Runs on one Ray node (one placement-group bundle): starts, watches and stops that node's ranks.

    A plain class; the driver wraps it with ``ray.remote``. Its methods run on the worker's main thread
    (default actor concurrency), which is the guard's parent: when this worker dies, the guards get SIGTERM.
    """

    def __init__(self, run_id: str, run_dir: str, stop_timeout_s: float) -> None:
        self.run_id, self.run_dir, self.stop_timeout_s = run_id, Path(run_dir), stop_timeout_s
        self.procs: list[Any] = []
        self.probes: dict[str, tuple[str, int]] = {}

    def info(self) -> dict[str, Any]:
        import ray

        try:
            gpu_ids = [str(i) for i in ray.get_gpu_ids()]
        except Exception:  # noqa: BLE001 - no accelerator manager on this node
            gpu_ids = []
        return {"ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "hostname": socket.gethostname(), "pid": os.getpid(), "gpu_ids": gpu_ids}

    def preflight(self, plan: DeploymentPlan, node: int, model: str, cmds: list[ProcessCommand]) -> list[str]:
        """The bare-metal preflight on this node (model, entry point, the doctor's checks); problems as text."""
        from widep.run.preflight import preflight

        try:
            preflight(plan, cmds, node, model)
        except UserError as err:
            return [str(err)]
        return []

    def start(self, attempt: int, cmds: list[ProcessCommand], secrets: dict[str, str]) -> list[int]:
        """Start ``cmds`` through the guard; returns the guards' pids."""
        import ray

        from widep.run.procs import resolve_env, start_rank

        self.stop()
        base = start_env() | secrets
        gpu_ids = [str(i) for i in ray.get_gpu_ids()] if any(k == "CUDA_VISIBLE_DEVICES" for c in cmds for k, _ in c.env) else []
        for c in cmds:
            if gpu_ids:
                c = replace(c, env=tuple((k, map_visible_devices(v, gpu_ids) if k == "CUDA_VISIBLE_DEVICES" and isinstance(v, str) else v)
                                         for k, v in c.env))
            self.procs.append(start_rank(c, self.run_dir, attempt, resolve_env(c, base), self.run_id, self.stop_timeout_s))
            if c.health_port:
                self.probes[c.name] = (c.argv[c.argv.index("--host") + 1] if "--host" in c.argv else "127.0.0.1", c.health_port)
        return [p.proc.pid for p in self.procs]

    def poll(self, follow: bool = False) -> list[dict[str, Any]]:
        """Per rank: exit status (None while running), log tail once exited, /health, new log lines (follow)."""
        from widep.run.control import probe
        from widep.run.procs import tail

        out = []
        for p in self.procs:
            code = p.poll()
            row: dict[str, Any] = {"name": p.name, "exit": code, "tail": list(tail(p.log)) if code is not None else [],
                                   "health": None, "lines": p.new_lines() if follow else []}
            if code is None and p.name in self.probes:
                host, port = self.probes[p.name]
                row["health"] = probe("127.0.0.1" if host == "0.0.0.0" else host, port, timeout=2.0)[0]
            out.append(row)
        return out

    def stop(self) -> list[int | None]:
        """Stop every rank (guard: SIGTERM, deadline, SIGKILL); their exit codes."""
        from widep.run.procs import stop_ranks

        procs, self.procs, self.probes = self.procs, [], {}
        if procs:
            stop_ranks(procs, self.stop_timeout_s)
        return [p.exit_code for p in procs]


# --------------------------------------------------------------------------------------------- the driver
@dataclass(frozen=True)
class RayOptions:
    run_dir: Path
    ready_timeout_s: float
    policy: RestartPolicy
    unhealthy_grace_s: float = 30.0
    stop_timeout_s: float = 30.0
    placement_timeout_s: float = 60.0
    probe_interval_s: float = 1.0
    follow: bool = False
    skip_preflight: bool = False


class RayGroup:
    """One DP group (a role's replica) supervised from the driver: same state machine and readiness rules as
    the bare-metal :class:`widep.run.launcher.GroupRunner`, with the group's processes in Ray actors."""

    def __init__(self, dep: RayDeployment, rp: RolePlan, replica: int) -> None:
        self.dep, self.rp, self.replica = dep, rp, replica
        self.nodes: tuple[int, ...] = rp.group_nodes[replica]
        self.label = f"{rp.name}" + (f"#{replica}" if rp.spec.replicas > 1 else "")
        self.tag = escape(f"[{self.label}]")
        self.status = GroupStatus()
        self.cmds: list[ProcessCommand] = []
        self.ips: dict[int, str] = {}
        self.health: dict[str, str] = {}
        self.unhealthy_since: dict[str, float] = {}
        self.attempt_started = 0.0
        self.last_answer: dict[int, float] = {}
        self.restart_at: float | None = None
        self.exit_code: int | None = None

    # what launcher.ready_table reads: label, endpoints(), health
    def endpoints(self) -> list[tuple[ProcessCommand, str, int]]:
        return [(c, self.ips.get(c.node, "?"), c.health_port) for c in self.cmds if c.health_port]

    def node_label(self, node: int) -> str:
        return f"{self.dep.plan.nodes[node].name} @ {self.ips.get(node, '?')}"

    # ------------------------------------------------------------------ attempts
    def start_attempt(self) -> None:
        """Place (wait for the bundles), make sure each node has a live agent, render with Ray's addresses, start."""
        a = self.status.attempt
        dep = self.dep
        problem = dep.wait_placed(self.nodes)
        if problem:
            self._fail(Failure(self.label, "-", problem, time.monotonic()))
            return
        try:
            new = dep.ensure_agents(self.nodes)
        except dep.ray_errors as err:  # an agent died while being created (node lost meanwhile)
            self._fail(Failure(self.label, "-", f"node agent lost while starting: {_short(err)}", time.monotonic()))
            return
        self.ips = {n: dep.agent_info[n]["ip"] for n in self.nodes}
        ctx = replace(dep.ctx, node_addresses={**dep.ctx.node_addresses, **self.ips},
                      leader_addresses={**dep.ctx.leader_addresses, (self.rp.name, self.replica): self.ips[self.nodes[0]]})
        self.cmds = [c for c in render_role(dep.plan, self.rp, ctx) if c.replica == self.replica]
        if new and not dep.opts.skip_preflight:
            problems = dep.preflight(new, self.cmds)
            if problems:
                self._fail(Failure(self.label, "-", "preflight refused: " + " | ".join(problems), time.monotonic()))
                return
        refs = {dep.agents[n].start.remote(a, [c for c in self.cmds if c.node == n], dep.secrets): n for n in self.nodes}
        ray = dep.ray
        try:
            ray.get(list(refs), timeout=60)
        except dep.ray_errors as err:
            self._fail(Failure(self.label, "-", f"could not start ranks: {_short(err)}", time.monotonic()))
            return
        self.attempt_started = time.monotonic()
        self.last_answer = {n: self.attempt_started for n in self.nodes}
        self.health.clear()
        self.unhealthy_since.clear()
        placed = ", ".join(f"{c.name} on {self.node_label(c.node)}" for c in self.cmds)
        dep.console.print(f"{self.tag} attempt {a}: started {placed}; logs in {dep.opts.run_dir / f'attempt-{a}' / self.rp.name} on each node")
        dep.write_placement()

    def teardown(self) -> None:
        self.dep.stop_agents(self.nodes)
        self.health.clear()

    def _fail(self, f: Failure) -> None:
        self.status, d = self.status.on_failure(f, self.status.attempt, self.dep.opts.policy)
        con = self.dep.console
        if d.action == "restart":
            con.print(f"[bold red]{self.tag} attempt {self.status.attempt} failed[/]: {escape(f.describe())}")
            con.print(f"{self.tag} tearing the group down on every node; restart in {d.backoff_s:.0f} s "
                      f"({self.dep.opts.policy.max_restarts - self.status.restarts} restart(s) left)")
            self.teardown()
            self.restart_at = time.monotonic() + d.backoff_s
        elif d.action == "fail":
            con.print(f"[bold red]{self.tag} failed[/]: {escape(f.describe())}")
            self.teardown()
            self.exit_code = 1

    # ------------------------------------------------------------------ the loop body
    def due(self, now: float) -> bool:
        """Whether to poll this group's agents now (restarts are begun here)."""
        if self.exit_code is not None:
            return False
        st = self.status.state
        if st == GroupState.RESTARTING and self.restart_at is not None and now >= self.restart_at:
            self.restart_at = None
            self.status = self.status.on_restart_begun()
            self.start_attempt()
            return False
        if st == GroupState.FAILED:
            self.exit_code = 1
        return self.exit_code is None and self.status.state in (GroupState.STARTING, GroupState.HEALTHY)

    def on_poll(self, now: float, results: dict[int, list[dict[str, Any]] | BaseException | None]) -> None:
        """Agents' answers (node -> rows, the error of a dead agent, or None: no answer yet)."""
        first: Failure | None = None
        for node, res in results.items():
            if isinstance(res, BaseException):
                lost = self.dep.node_lost(node)
                reason = (f"Ray node {self.ips.get(node, '?')} lost ({lost})" if lost else f"node agent died: {_short(res)}")
                names = ", ".join(c.name for c in self.cmds if c.node == node)
                f = Failure(names or self.label, self.node_label(node), reason, now)
                first = first or f
                continue
            if res is None:
                silent = now - self.last_answer.get(node, now)
                if silent > self.dep.opts.unhealthy_grace_s:
                    first = first or Failure(self.label, self.node_label(node), f"node agent did not answer for {silent:.0f} s", now)
                continue
            self.last_answer[node] = now
            for row in res:
                if self.dep.opts.follow:
                    for line in row["lines"]:
                        self.dep.console.out(f"[{row['name']}] {line}", highlight=False)
                if row["exit"] is not None:
                    from widep.run.procs import signal_name

                    c = next(c for c in self.cmds if c.name == row["name"])
                    f = Failure(row["name"], self.node_label(c.node), signal_name(row["exit"]), now, tuple(row["tail"]))
                    first = first or f
                elif row["health"] is not None:
                    note_health(self.health, self.unhealthy_since, row["name"], row["health"], now)
        if first:
            self._fail(first)
            return
        if any(r is None for r in results.values()):
            return
        v = judge_health(self.status.state, [c.name for c, _, _ in self.endpoints()], self.health, self.unhealthy_since,
                         self.attempt_started, now, self.dep.opts.ready_timeout_s, self.dep.opts.unhealthy_grace_s)
        if v.all_healthy:
            self.status = self.status.on_all_healthy()
        elif v.rank is not None:
            c0 = next(c for c in self.cmds if c.name == v.rank)
            self._fail(Failure(v.rank, self.node_label(c0.node), v.reason, v.at))


def _short(err: BaseException) -> str:
    s = str(err).strip().splitlines()
    return f"{type(err).__name__}: {s[0] if s else ''}"[:300]


class RayDeployment:
    """The placement group, the node agents and the groups of one run."""

    def __init__(self, ray: Any, plan: DeploymentPlan, ctx: RenderContext, opts: RayOptions, console: Console,
                 secrets: dict[str, str]) -> None:
        from ray.exceptions import GetTimeoutError, RayActorError, RayError

        self.ray, self.plan, self.ctx, self.opts, self.console, self.secrets = ray, plan, ctx, opts, console, secrets
        self.ray_errors = (RayActorError, RayError, GetTimeoutError)
        self.run_id = uuid.uuid4().hex[:12]
        self.bundles = bundle_nodes(plan)
        self.bundle_of = {n: i for i, n in enumerate(self.bundles)}
        self.pg: Any = None
        self.agents: dict[int, Any] = {}
        self.agent_info: dict[int, dict[str, Any]] = {}
        self.groups = [RayGroup(self, rp, g) for rp in plan.roles for g in range(rp.spec.replicas)]
        self.agent_cls = ray.remote(NodeAgent)
        self.stop_signal: int | None = None

    # ------------------------------------------------------------------ placement
    def create_placement_group(self) -> None:
        from ray.util.placement_group import placement_group

        problem = placement_problem(self.plan, self.ray.nodes(), len(self.bundles))
        if problem:
            raise UserError(f"--backend ray: cannot place {problem} Nothing was started.")
        self.pg = placement_group([bundle_resources(self.plan)] * len(self.bundles), strategy="STRICT_SPREAD",
                                  name=f"widep-{self.plan.name}-{self.run_id}")

    def _bundle_node_ids(self) -> tuple[str, dict[int, str]]:
        from ray.util.placement_group import placement_group_table

        t = placement_group_table(self.pg)
        return t.get("state", ""), {int(k): v for k, v in t.get("bundles_to_node_id", {}).items()}

    def wait_placed(self, nodes: tuple[int, ...]) -> str | None:
        """Wait until the bundles of ``nodes`` sit on alive Ray nodes (Ray moves a lost node's bundle to another
        node with the resources); the reason as text after ``placement_timeout_s`` or when no node could take it."""
        t0 = time.monotonic()
        announced = False
        while True:
            state, where = self._bundle_node_ids()
            nodes_now = self.ray.nodes()
            alive = {n["NodeID"] for n in nodes_now if n.get("Alive")}
            if state == "CREATED" and all(where.get(self.bundle_of[n]) in alive for n in nodes):
                return None
            waited = time.monotonic() - t0
            problem = placement_problem(self.plan, nodes_now, len(self.bundles))
            if problem and waited > 5:  # a few seconds for Ray to notice nodes that just (re)joined
                return f"cannot place the deployment again: {problem}"
            if waited > self.opts.placement_timeout_s or self.stop_signal is not None:
                return (f"placement group not placed in {waited:.0f} s (state {state}): {len(self.bundles)} bundle(s) of "
                        f"{bundle_resources(self.plan)} on distinct nodes; the cluster's free resources do not fit them")
            if not announced and waited > 2:
                announced = True
                self.console.print(f"waiting for Ray to place {len(self.bundles)} bundle(s) of {bundle_resources(self.plan)} (state {state})")
            time.sleep(0.2)

    def node_lost(self, node: int, wait_s: float = 5.0) -> str | None:
        """'node <id> is dead' if the Ray node that ran plan node ``node``'s agent is gone, else None; waits up to
        ``wait_s`` for Ray's health checks to tell a lost node from an agent that died alone."""
        info = self.agent_info.get(node)
        if not info:
            return None
        end = time.monotonic() + wait_s
        while True:
            row = next((n for n in self.ray.nodes() if n["NodeID"] == info["node_id"]), None)
            if row is None:
                return f"node {info['node_id'][:8]} left the cluster"
            if not row.get("Alive"):
                return f"node {info['node_id'][:8]} is dead"
            if time.monotonic() >= end:
                return None
            time.sleep(0.5)

    # ------------------------------------------------------------------ agents
    def ensure_agents(self, nodes: tuple[int, ...]) -> list[int]:
        """A live agent in the bundle of each of ``nodes``; returns the nodes whose agent is new."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        new = []
        for n in nodes:
            if n in self.agents:
                try:
                    self.ray.get(self.agents[n].info.remote(), timeout=10)
                    continue
                except self.ray_errors:
                    self._kill(n)
            res = bundle_resources(self.plan)
            opts: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "max_task_retries": 0,
                                    "name": f"widep-{self.run_id}-{self.bundle_of[n]}",
                                    # Ray SIGKILLs a dying worker's children by default: the guard would die
                                    # without stopping its rank. Off, the guard gets SIGTERM (PDEATHSIG) instead.
                                    "runtime_env": {"env_vars": {"RAY_kill_child_processes_on_worker_exit": "false"}},
                                    "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.bundle_of[n])}
            if "GPU" in res:
                opts["num_gpus"] = res["GPU"]
            else:
                opts["resources"] = res
            self.agents[n] = self.agent_cls.options(**opts).remote(self.run_id, str(self.opts.run_dir), self.opts.stop_timeout_s)
            new.append(n)
        infos = self.ray.get([self.agents[n].info.remote() for n in new], timeout=self.opts.placement_timeout_s)
        for n, info in zip(new, infos):
            self.agent_info[n] = info
        return new

    def preflight(self, nodes: list[int], cmds: list[ProcessCommand]) -> list[str]:
        from widep.render.vllm import model_path

        addrs = {n: self.agent_info[n]["ip"] for n in self.agent_info}
        plan = readdressed(self.plan, addrs)
        model = model_path(self.plan, self.ctx)
        refs = [self.agents[n].preflight.remote(plan, n, model, [c for c in cmds if c.node == n]) for n in nodes]
        out = []
        for n, problems in zip(nodes, self.ray.get(refs, timeout=120)):
            out += [f"{self.plan.nodes[n].name} @ {addrs[n]}: {p}" for p in problems]
        return out

    def stop_agents(self, nodes: tuple[int, ...] | list[int]) -> None:
        """Stop the ranks of ``nodes`` (all at once, one deadline); kill agents that do not answer."""
        refs = {}
        for n in nodes:
            if n in self.agents:
                refs[self.agents[n].stop.remote()] = n
        if not refs:
            return
        ready, not_ready = self.ray.wait(list(refs), num_returns=len(refs), timeout=self.opts.stop_timeout_s + 15)
        for r in ready:
            try:
                self.ray.get(r)
            except self.ray_errors:
                self._kill(refs[r])
        for r in not_ready:
            self._kill(refs[r])

    def _kill(self, node: int) -> None:
        a = self.agents.pop(node, None)
        self.agent_info.pop(node, None)
        if a is not None:
            try:
                self.ray.kill(a, no_restart=True)
            except self.ray_errors + (ValueError,):
                pass

    def poll_all(self, groups: list[RayGroup]) -> None:
        now = time.monotonic()
        refs: dict[Any, tuple[RayGroup, int]] = {}
        for g in groups:
            for n in g.nodes:
                if n in self.agents:
                    refs[self.agents[n].poll.remote(self.opts.follow)] = (g, n)
        if not refs:
            return
        ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=10)
        results: dict[RayGroup, dict[int, Any]] = {g: {n: None for n in g.nodes} for g in groups}
        for r in ready:
            g, n = refs[r]
            try:
                results[g][n] = self.ray.get(r)
            except self.ray_errors as err:
                results[g][n] = err
        for g in groups:
            if g.status.state in (GroupState.STARTING, GroupState.HEALTHY):
                g.on_poll(now, results[g])

    def write_placement(self) -> None:
        doc = {"run_id": self.run_id, "plan": self.plan.name, "bundles": [
            {"bundle": i, "plan_node": n, "plan_node_name": self.plan.nodes[n].name, "resources": bundle_resources(self.plan),
             **({k: self.agent_info[n][k] for k in ("ip", "node_id", "hostname", "pid", "gpu_ids")} if n in self.agent_info else {})}
            for i, n in enumerate(self.bundles)],
            "groups": [{"group": g.label, "attempt": g.status.attempt, "state": g.status.state.value,
                        "ranks": [{"name": c.name, "node": c.node, "ip": g.ips.get(c.node), "port": c.port} for c in g.cmds]}
                       for g in self.groups]}
        self.opts.run_dir.mkdir(parents=True, exist_ok=True)
        (self.opts.run_dir / "placement.json").write_text(json.dumps(doc, indent=2) + "\n")

    # ------------------------------------------------------------------ run
    def _on_signal(self, signum: int, frame: object) -> None:  # noqa: ARG002
        self.stop_signal = signum

    def run(self, *, once: bool = False, on_ready: Any = None) -> int:
        from widep.run.launcher import ready_table

        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            t0 = time.monotonic()
            self.create_placement_group()
            self.opts.run_dir.mkdir(parents=True, exist_ok=True)
            self.console.print(f"run {self.run_id}: {self.plan.name} on Ray, {len(self.bundles)} bundle(s) of "
                               f"{bundle_resources(self.plan)} (STRICT_SPREAD), groups {', '.join(g.label for g in self.groups)}, "
                               f"logs under {self.opts.run_dir} on each node")
            problem = self.wait_placed(tuple(self.bundles))
            if problem:
                raise UserError(f"--backend ray: {problem}. Nothing was started.", exit_code=1)
            try:
                self.ensure_agents(tuple(self.bundles))
            except self.ray_errors as err:
                raise UserError(f"--backend ray: the node agents did not start ({_short(err)}). Every Ray node needs widep "
                                f"installed for the Python that runs `ray start` ({INSTALL_HINT}). Nothing was started.", exit_code=1) from None
            self.console.print(placement_table(self))
            self.console.print(f"placed in {time.monotonic() - t0:.1f} s")
            cmds = [c for c in render(self.plan, replace(self.ctx, node_addresses={n: i['ip'] for n, i in self.agent_info.items()}))]
            problems = [] if self.opts.skip_preflight else self.preflight(list(self.bundles), cmds)
            if problems:
                raise UserError("refusing to start, nothing was started (preflight on the Ray nodes, see `widep doctor`):\n  "
                                + "\n  ".join(problems))
            for g in self.groups:
                g.start_attempt()
            announced: set[tuple] = set()
            last_report = time.monotonic()
            while True:
                if self.stop_signal is not None:
                    self.console.print(f"received {signal.Signals(self.stop_signal).name}: stopping ranks, actors and the placement group")
                    break
                now = time.monotonic()
                due = [g for g in self.groups if g.due(now)]
                done = [g for g in self.groups if g.exit_code is not None]
                if done:
                    code = max(g.exit_code or 0 for g in done)
                    break
                if due:
                    self.poll_all(due)
                healthy = all(g.status.state == GroupState.HEALTHY for g in self.groups)
                key = tuple((g.label, g.status.attempt) for g in self.groups)
                if healthy and key not in announced:
                    announced.add(key)
                    self.write_placement()
                    self.console.print(ready_table(self.groups))  # type: ignore[arg-type]
                    self.console.print(f"[bold green]ready[/]: {self.plan.name} (run {self.run_id}, "
                                       f"healthy {time.monotonic() - max(g.attempt_started for g in self.groups):.1f} s after the last start, "
                                       f"logs under {self.opts.run_dir})")
                    if once:
                        code = on_ready(self) if on_ready else 0
                        break
                elif not healthy and now - last_report > 10:
                    last_report = now
                    for g in self.groups:
                        if g.status.state == GroupState.STARTING:
                            waiting = [c.name for c, _, _ in g.endpoints() if g.health.get(c.name) != "healthy"]
                            self.console.print(f"{g.tag} attempt {g.status.attempt}: waiting {now - g.attempt_started:.0f} s "
                                               f"for {', '.join(waiting)} (timeout {self.opts.ready_timeout_s:.0f} s)")
                time.sleep(self.opts.probe_interval_s)
        finally:
            for g in self.groups:
                if g.exit_code is None:
                    g.status = g.status.on_stop()
            self.shutdown()
            for g in self.groups:
                if g.exit_code is None:
                    g.status = g.status.on_stopped()
            for s, h in old.items():
                signal.signal(s, h)
        failed = [g for g in self.groups if g.exit_code]
        if failed and failed[0].status.failure:
            self.console.print(f"[bold red]failure[/]: {escape(failed[0].status.failure.describe())}")
        return code

    def shutdown(self) -> None:
        """Stop every rank, kill every agent, remove the placement group."""
        from ray.util.placement_group import remove_placement_group

        self.stop_agents(list(self.agents))
        for n in list(self.agents):
            self._kill(n)
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except self.ray_errors:
                pass
            self.pg = None
        self.console.print(f"run {self.run_id}: ranks stopped, actors killed, placement group removed")


def placement_table(dep: RayDeployment) -> Table:
    t = Table(title="placement (plan node -> Ray node)", title_justify="left")
    for col in ("bundle", "plan node", "group", "ranks", "Ray node", "ip", "gpus"):
        t.add_column(col)
    for i, n in enumerate(dep.bundles):
        info = dep.agent_info.get(n, {})
        grp = next((g for g in dep.groups if n in g.nodes), None)
        ranks = [r for rp in dep.plan.roles for r in rp.ranks if r.node == n]
        t.add_row(str(i), dep.plan.nodes[n].name, grp.label if grp else "-",
                  ",".join(f"{r.role}/{r.dp_rank}" for r in ranks), f"{info.get('hostname', '?')} ({str(info.get('node_id', '?'))[:8]})",
                  info.get("ip", "?"), ",".join(info.get("gpu_ids", [])) or "-")
    return t


# --------------------------------------------------------------------------------------------- entry point
def launch_on_ray(p: DeploymentPlan, *, address: str | None, dry_run: bool, console: Console, once: bool, prompt: str,
                  policy: RestartPolicy, ready_timeout: float | None, python: str | None, model: str | None,
                  run_dir: str | None, follow: bool = False, grace: float = 30.0, stop_timeout: float = 30.0,
                  placement_timeout: float = 60.0, skip_preflight: bool = False) -> int:
    """``widep launch --backend ray``: the exit code (0 stopped / healthy with --once, 1 failed, 2 refused)."""
    from widep.run.cli import launch_context, smoke_completion

    if getattr(p, "router", None) is not None:
        raise UserError(f"router: the Ray backend does not start the router of {p.name} yet. Given: router enabled. "
                        "Valid with --backend ray: router disabled (start the router with `widep launch --node N` on its node).")
    if dry_run:
        return _dry_run(p, console, python, model)
    ray = import_ray()
    ctx = launch_context(p, python, model, build=True)
    secrets = secrets_for(render(p, ctx), dict(os.environ))
    rd = (Path(run_dir) if run_dir else Path("runs") / f"{p.name}-{time.strftime('%Y%m%d-%H%M%S')}-ray").resolve()
    opts = RayOptions(run_dir=rd, ready_timeout_s=ready_timeout or float(p.spec.vllm.ready_timeout_s), policy=policy,
                      unhealthy_grace_s=grace, stop_timeout_s=stop_timeout, placement_timeout_s=placement_timeout, follow=follow,
                      skip_preflight=skip_preflight)
    addr = address or os.environ.get("RAY_ADDRESS") or "auto"
    t = time.monotonic()
    import logging

    try:
        info = ray.init(address=addr, log_to_driver=False, logging_level=logging.WARNING, namespace="widep")
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(f"--address: cannot connect to a Ray cluster at {addr!r} ({_short(err)}). Start one (`ray start --head` "
                        "on the head node, `ray start --address HEAD:6379` on the others) and give --address auto or HOST:PORT.") from None
    try:
        console.print(f"widep launch {p.name} on Ray {ray.__version__} at {getattr(info, 'address_info', {}).get('gcs_address', addr)} "
                      f"(connected in {time.monotonic() - t:.1f} s), run dir {rd}")
        dep = RayDeployment(ray, p, ctx, opts, console, secrets)

        def ready(d: RayDeployment) -> int:
            return smoke_completion(readdressed(p, {n: i["ip"] for n, i in d.agent_info.items()}), ctx, prompt, 16)

        return dep.run(once=once, on_ready=ready)
    finally:
        ray.shutdown()


def _dry_run(p: DeploymentPlan, console: Console, python: str | None, model: str | None) -> int:
    from widep.plan.cli import print_plan
    from widep.render.cli import print_table
    from widep.run.cli import launch_context

    ctx = launch_context(p, python, model, build=False)
    print_plan(p, console)
    t = Table(title="Ray placement: one placement group, STRICT_SPREAD, one whole-node bundle per plan node", title_justify="left")
    for col in ("bundle", "resources", "plan node", "ranks"):
        t.add_column(col)
    for i, n in enumerate(bundle_nodes(p)):
        ranks = [r for rp in p.roles for r in rp.ranks if r.node == n]
        t.add_row(str(i), json.dumps(bundle_resources(p)), p.nodes[n].name, ", ".join(f"{r.role}/{r.dp_rank} (gpus {','.join(map(str, r.gpus))})" for r in ranks))
    console.print(t)
    console.rule("commands (addresses shown are the topology's; Ray's placement replaces them at launch)")
    print_table(p, render(p, ctx))
    return 0
