"""Ray backend: ``widep launch TOPOLOGY --backend ray --address auto`` places, starts, supervises and tears down a
whole multi-node deployment from one command on the Ray head node.

Placement: one placement group for the deployment, ``STRICT_SPREAD``, with one bundle per plan node that runs ranks
(in plan order: role, replica, leader node first). A bundle is a whole node: ``{"GPU": gpus_per_node}``, or for CPU
topologies ``{"widep_slot": gpus_per_node}`` (a custom resource standing in for GPUs: start CPU nodes with
``ray start --resources '{"widep_slot": N}'``). Plan node n's ranks run in bundle n, so rank <-> node <-> GPU is the
plan's; only the addresses come from Ray: where Ray placed each bundle gives the node's IP, which the renderer
binds into the rendered commands (``--host``, ``--data-parallel-address``, NIXL side channels). On a lost node Ray
moves that bundle to another node with the resources, if there is one.

Processes: one :class:`NodeAgent` actor per bundle starts its node's rendered vLLM commands through the guard
(:func:`widep.run.procs.start_rank`), so when the actor dies, however it dies, the guard takes the rank's whole
process tree down (PR_SET_PDEATHSIG); logs go to ``<run>/attempt-<k>/<role>/rank-<n>/vllm.log`` on that node, as on
bare metal. The agent reports exits, log tails and /health of its ranks.

Supervision: the driver is the one supervisor (:mod:`widep.run.supervisor`, the same restart policy, readiness rules
and readiness table as bare metal) over this backend (:class:`RayBackend`). Ctrl-C / SIGTERM stops every rank, kills
every actor and removes the placement group; if the driver itself is killed, Ray kills its actors and the guards
clean up. Commands are rendered once per launch; each attempt binds the addresses Ray placed its nodes at
(:meth:`~widep.render.vllm.ProcessCommand.at`).

Ray is optional (``pip install 'widep[ray]'``); this module imports it only inside functions.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from widep.errors import UserError
from widep.plan.core import DeploymentPlan
from widep.render.vllm import DEVICES, EnvRef, ProcessCommand
from widep.run.backend import BackendBase, DryRun, DryRunTable, Endpoint, Poll, StartFailed
from widep.run.bare_metal import RouterRunner
from widep.run.control import probe
from widep.run.host import default_run_dir
from widep.run.launch import Group, Launch, LaunchRequest
from widep.run.preflight import check_before_start
from widep.run.procs import (
    death_severity,
    kill_ranks,
    resolve_env,
    signal_name,
    start_rank,
    stop_ranks,
    tail,
    tear_down_together,
)
from widep.run.state import Failure, GroupState, GroupStatus

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
    nodes = tuple(
        n.model_copy(update={"address": addresses[i]}) if i in addresses else n for i, n in enumerate(plan.nodes)
    )
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
                    raise UserError(
                        f"{k}: the topology passes it by reference from ${v.name}, which is not set where "
                        "`widep launch --backend ray` runs (the driver passes it to the nodes). Set it and run again."
                    )
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
    hint = (
        f"start CPU nodes with `ray start --resources '{{\"{SLOT_RESOURCE}\": {int(want[SLOT_RESOURCE])}}}'`"
        if SLOT_RESOURCE in want
        else "add GPU nodes (`ray start --address HEAD:6379 --num-gpus N`)"
    )
    return (
        f"{plan.name} needs {needed} Ray node(s) with {{{res}}} each, one per plan node (STRICT_SPREAD), but the "
        f"cluster has {len(fits)}. Alive nodes: {have}. Valid: at least {needed} such node(s); {hint}."
    )


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
        self.procs: dict[str, list[Any]] = {}
        """This node's ranks per group label: a node may run ranks of several groups (P/D: prefill and decode),
        which start, fail and stop apart."""
        self.probes: dict[str, tuple[str, int]] = {}

    def info(self) -> dict[str, Any]:
        import ray

        try:
            gpu_ids = [str(i) for i in ray.get_gpu_ids()]
        except Exception:  # no accelerator manager on this node
            gpu_ids = []
        return {
            "ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_ids": gpu_ids,
        }

    def problems_before_start(
        self, plan: DeploymentPlan, node: int, model: str, cmds: list[ProcessCommand]
    ) -> list[str]:
        """The bare-metal checks on this node (model, entry point, the doctor's checks); problems as text."""
        try:
            check_before_start(plan, cmds, node, model)
        except UserError as err:
            return [str(err)]
        return []

    def start(self, attempt: int, cmds: list[ProcessCommand], secrets: dict[str, str], group: str = "") -> list[int]:
        """Start ``cmds`` (``group``'s ranks on this node) through the guard; returns the guards' pids."""
        import ray

        self.stop(group)
        procs = self.procs.setdefault(group, [])
        base = start_env() | secrets
        uses_devices = any(v == DEVICES for c in cmds for _, v in c.env_template)
        gpu_ids = [str(i) for i in ray.get_gpu_ids()] if uses_devices else []
        for c in cmds:
            if gpu_ids:
                c = c.at(devices=tuple(map_visible_devices(",".join(map(str, c.gpus)), gpu_ids).split(",")))
            procs.append(start_rank(c, self.run_dir, attempt, resolve_env(c, base), self.run_id, self.stop_timeout_s))
            if c.health_port:
                self.probes[c.name] = (c.host or "127.0.0.1", c.health_port)
        tear_down_together(procs)  # a rank that dies takes its peers of this group on this node with it at once
        return [p.proc.pid for p in procs]

    def poll(self, follow: bool = False, group: str | None = None) -> list[dict[str, Any]]:
        """Per rank (of ``group``, else every group): exit status (None while running), log tail once exited,
        /health, new log lines (follow)."""
        out = []
        for p in [p for g, procs in self.procs.items() if group is None or g == group for p in procs]:
            code = p.poll()
            row: dict[str, Any] = {
                "name": p.name,
                "exit": code,
                "tail": list(tail(p.log)) if code is not None else [],
                "health": None,
                "lines": p.new_lines() if follow else [],
                "torn_down": p.torn_down,
            }
            if code is None and p.name in self.probes:
                host, port = self.probes[p.name]
                row["health"] = probe("127.0.0.1" if host == "0.0.0.0" else host, port, timeout=2.0)[0]
            out.append(row)
        return out

    def stop(self, group: str | None = None) -> list[int | None]:
        """Stop the ranks of ``group``, else every rank (guard: SIGTERM, deadline, SIGKILL); their exit codes."""
        procs = [p for g in list(self.procs) if group is None or g == group for p in self.procs.pop(g)]
        for p in procs:
            self.probes.pop(p.name, None)
        if any(p.poll() is not None for p in procs):  # a rank died: the group restarts; engine core ignores SIGTERM
            kill_ranks(procs)
        elif procs:
            stop_ranks(procs, self.stop_timeout_s)
        return [p.exit_code for p in procs]


# --------------------------------------------------------------------------------------------- the backend
GroupKey = tuple[str, int]


def key_of(group: Group) -> GroupKey:
    return (group.role, group.replica)


def _short(err: BaseException) -> str:
    s = str(err).strip().splitlines()
    return f"{type(err).__name__}: {s[0] if s else ''}"[:300]


def create_backend(console: Console) -> RayBackend:
    return RayBackend(console)


class RayBackend(BackendBase):
    """The placement group, the node agents and the groups' processes of one launch, from the driver."""

    name = "ray"

    def __init__(self, console: Console) -> None:
        self.console = console
        self.ray: Any = None
        self.ray_errors: tuple[type[BaseException], ...] = ()
        self.pg: Any = None
        self.agent_cls: Any = None
        self.agents: dict[int, Any] = {}
        self.agent_info: dict[int, dict[str, Any]] = {}
        self.bundles: list[int] = []
        self.bundle_of: dict[int, int] = {}
        self.secrets: dict[str, str] = {}
        self.cmds: dict[GroupKey, tuple[ProcessCommand, ...]] = {}
        """Each group's commands bound to the addresses of its current attempt."""
        self.statuses: dict[GroupKey, GroupStatus] = {}
        self.last_answer: dict[GroupKey, dict[int, float]] = {}
        self.next_poll: dict[GroupKey, float] = {}
        self.base_env: dict[str, str] = dict(os.environ)
        """The router's environment (it runs beside the driver, as bare metal's runs beside its launcher)."""
        self.router: RouterRunner | None = None

    # ------------------------------------------------------------------ before anything starts
    def resolve(self, request: LaunchRequest) -> LaunchRequest:
        p = request.plan
        return replace(request, run_dir=(request.run_dir or default_run_dir(p, "ray")).resolve())

    def dry_run(self, launch: Launch) -> DryRun:
        p = launch.plan
        rows = []
        for i, n in enumerate(bundle_nodes(p)):
            ranks = [r for rp in p.roles for r in rp.ranks if r.node == n]
            rows.append(
                (
                    str(i),
                    json.dumps(bundle_resources(p)),
                    p.nodes[n].name,
                    ", ".join(f"{r.role}/{r.dp_rank} (gpus {','.join(map(str, r.gpus))})" for r in ranks),
                )
            )
        table = DryRunTable(
            "Ray placement: one placement group, STRICT_SPREAD, one whole-node bundle per plan node",
            ("bundle", "resources", "plan node", "ranks"),
            tuple(rows),
        )
        return DryRun(
            "commands (addresses shown are the topology's; Ray's placement replaces them at launch)",
            launch.processes,
            (table,),
        )

    def prepare(self, launch: Launch) -> list[Group]:
        self.launch = launch
        p, req = launch.plan, launch.request
        ray = import_ray()
        self.secrets = secrets_for(list(launch.processes), dict(os.environ))
        addr = req.address or os.environ.get("RAY_ADDRESS") or "auto"
        t = time.monotonic()
        try:
            info = ray.init(address=addr, log_to_driver=False, logging_level=logging.WARNING, namespace="widep")
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(
                f"--address: cannot connect to a Ray cluster at {addr!r} ({_short(err)}). Start one "
                "(`ray start --head` on the head node, `ray start --address HEAD:6379` on the others) and give "
                "--address auto or HOST:PORT."
            ) from None
        from ray.exceptions import GetTimeoutError, RayActorError, RayError

        self.ray, self.ray_errors = ray, (RayActorError, RayError, GetTimeoutError)
        gcs = getattr(info, "address_info", {}).get("gcs_address", addr)
        self.console.print(
            f"widep launch {p.name} on Ray {ray.__version__} at {gcs} "
            f"(connected in {time.monotonic() - t:.1f} s), run dir {launch.run_dir}"
        )
        self.bundles = bundle_nodes(p)
        self.bundle_of = {n: i for i, n in enumerate(self.bundles)}
        self.agent_cls = ray.remote(NodeAgent)
        t0 = time.monotonic()
        self.create_placement_group()
        launch.run_dir.mkdir(parents=True, exist_ok=True)
        self.console.print(
            f"run {launch.run_id}: {p.name} on Ray, {len(self.bundles)} bundle(s) of {bundle_resources(p)} "
            f"(STRICT_SPREAD), groups {', '.join(g.label for g in launch.groups)}, "
            f"logs under {launch.run_dir} on each node"
        )
        problem = self.wait_placed(tuple(self.bundles))
        if problem:
            raise UserError(f"--backend ray: {problem}. Nothing was started.", exit_code=1)
        try:
            self.ensure_agents(tuple(self.bundles))
        except self.ray_errors as err:
            raise UserError(
                f"--backend ray: the node agents did not start ({_short(err)}). Every Ray node needs widep "
                f"installed for the Python that runs `ray start` ({INSTALL_HINT}). Nothing was started.",
                exit_code=1,
            ) from None
        self.console.print(placement_table(self))
        self.console.print(f"placed in {time.monotonic() - t0:.1f} s")
        placed = [c.at(node_address=self.agent_info[c.node]["ip"]) for c in launch.processes]
        problems = [] if req.skip_preflight else self.check_nodes(list(self.bundles), placed)
        if problems:
            raise UserError(
                "refusing to start, nothing was started (preflight on the Ray nodes, see `widep doctor`):\n  "
                + "\n  ".join(problems)
            )
        return list(launch.groups)

    # ------------------------------------------------------------------ placement
    def create_placement_group(self) -> None:
        from ray.util.placement_group import placement_group

        p = self.launch.plan
        problem = placement_problem(p, self.ray.nodes(), len(self.bundles))
        if problem:
            raise UserError(f"--backend ray: cannot place {problem} Nothing was started.")
        self.pg = placement_group(
            [bundle_resources(p)] * len(self.bundles),
            strategy="STRICT_SPREAD",
            name=f"widep-{p.name}-{self.launch.run_id}",
        )

    def _bundle_node_ids(self) -> tuple[str, dict[int, str]]:
        from ray.util.placement_group import placement_group_table

        t = placement_group_table(self.pg)
        return t.get("state", ""), {int(k): v for k, v in t.get("bundles_to_node_id", {}).items()}

    def wait_placed(self, nodes: tuple[int, ...]) -> str | None:
        """Wait until the bundles of ``nodes`` sit on alive Ray nodes (Ray moves a lost node's bundle to another
        node with the resources); the reason as text after ``placement_timeout_s`` or when no node could take it."""
        p = self.launch.plan
        t0 = time.monotonic()
        announced = False
        while True:
            state, where = self._bundle_node_ids()
            nodes_now = self.ray.nodes()
            alive = {n["NodeID"] for n in nodes_now if n.get("Alive")}
            if state == "CREATED" and all(where.get(self.bundle_of[n]) in alive for n in nodes):
                return None
            waited = time.monotonic() - t0
            problem = placement_problem(p, nodes_now, len(self.bundles))
            if problem and waited > 5:  # a few seconds for Ray to notice nodes that just (re)joined
                return f"cannot place the deployment again: {problem}"
            if waited > self.launch.request.placement_timeout_s or self.stop_requested():
                return (
                    f"placement group not placed in {waited:.0f} s (state {state}): {len(self.bundles)} bundle(s) of "
                    f"{bundle_resources(p)} on distinct nodes; the cluster's free resources do not fit them"
                )
            if not announced and waited > 2:
                announced = True
                self.console.print(
                    f"waiting for Ray to place {len(self.bundles)} bundle(s) of {bundle_resources(p)} (state {state})"
                )
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

        req = self.launch.request
        new = []
        for n in nodes:
            if n in self.agents:
                try:
                    self.ray.get(self.agents[n].info.remote(), timeout=10)
                    continue
                except self.ray_errors:
                    self._kill(n)
            res = bundle_resources(self.launch.plan)
            opts: dict[str, Any] = {
                "num_cpus": 0,
                "max_restarts": 0,
                "max_task_retries": 0,
                "name": f"widep-{self.launch.run_id}-{self.bundle_of[n]}",
                # Ray SIGKILLs a dying worker's children by default: the guard would die
                # without stopping its rank. Off, the guard gets SIGTERM (PDEATHSIG) instead.
                "runtime_env": {"env_vars": {"RAY_kill_child_processes_on_worker_exit": "false"}},
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=self.bundle_of[n]
                ),
            }
            if "GPU" in res:
                opts["num_gpus"] = res["GPU"]
            else:
                opts["resources"] = res
            self.agents[n] = self.agent_cls.options(**opts).remote(
                self.launch.run_id, str(self.launch.run_dir), req.stop_timeout_s
            )
            new.append(n)
        infos = self.ray.get([self.agents[n].info.remote() for n in new], timeout=req.placement_timeout_s)
        for n, info in zip(new, infos, strict=True):
            self.agent_info[n] = info
        return new

    def check_nodes(self, nodes: list[int], cmds: list[ProcessCommand]) -> list[str]:
        """Every node agent of ``nodes`` runs the checks on its node; the problems, named by node."""
        addrs = {n: self.agent_info[n]["ip"] for n in self.agent_info}
        plan = readdressed(self.launch.plan, addrs)
        refs = [
            self.agents[n].problems_before_start.remote(plan, n, self.launch.model, [c for c in cmds if c.node == n])
            for n in nodes
        ]
        out = []
        for n, problems in zip(nodes, self.ray.get(refs, timeout=120), strict=True):
            out += [f"{self.launch.plan.nodes[n].name} @ {addrs[n]}: {p}" for p in problems]
        return out

    def stop_agents(self, nodes: tuple[int, ...] | list[int], group: str | None = None) -> None:
        """Stop the ranks (of ``group``, else all) on ``nodes`` (all at once, one deadline); kill agents that do
        not answer."""
        refs = {}
        for n in nodes:
            if n in self.agents:
                refs[self.agents[n].stop.remote(group)] = n
        if not refs:
            return
        ready, not_ready = self.ray.wait(
            list(refs), num_returns=len(refs), timeout=self.launch.request.stop_timeout_s + 15
        )
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
            except (*self.ray_errors, ValueError):
                pass

    # ------------------------------------------------------------------ attempts
    def ip(self, group: Group, node: int) -> str:
        """Where the group's current attempt placed plan node ``node``."""
        return next((c.node_address for c in self.cmds.get(key_of(group), ()) if c.node == node), "?")

    def node_label(self, group: Group, node: int) -> str:
        return f"{self.launch.plan.nodes[node].name} @ {self.ip(group, node)}"

    def start(self, group: Group, attempt: int) -> str:
        """Place (wait for the bundles), make sure each node has a live agent, bind Ray's addresses, start."""
        k = key_of(group)
        problem = self.wait_placed(group.nodes)
        if problem:
            raise StartFailed(problem)
        try:
            new = self.ensure_agents(group.nodes)
        except self.ray_errors as err:  # an agent died while being created (node lost meanwhile)
            raise StartFailed(f"node agent lost while starting: {_short(err)}") from None
        ips = {n: self.agent_info[n]["ip"] for n in group.nodes}
        cmds = tuple(c.at(node_address=ips[c.node], leader_address=ips[group.leader_node]) for c in group.processes)
        self.cmds[k] = cmds
        if new and not self.launch.request.skip_preflight:
            problems = self.check_nodes(new, list(cmds))
            if problems:
                raise StartFailed("preflight refused: " + " | ".join(problems))
        refs = [
            self.agents[n].start.remote(attempt, [c for c in cmds if c.node == n], self.secrets, group.label)
            for n in group.nodes
        ]
        try:
            self.ray.get(refs, timeout=60)
        except self.ray_errors as err:
            raise StartFailed(f"could not start ranks: {_short(err)}") from None
        now = time.monotonic()
        self.last_answer[k] = {n: now for n in group.nodes}
        self.next_poll[k] = 0.0
        self.write_placement()
        placed = ", ".join(f"{c.name} on {self.node_label(group, c.node)}" for c in cmds)
        return f"{placed}; logs in {self.launch.run_dir / f'attempt-{attempt}' / group.role} on each node"

    def poll(self, group: Group, now: float) -> Poll:
        """Every agent of the group at once: exits, log tails, /health, new log lines; dead or silent agents."""
        k = key_of(group)
        req = self.launch.request
        if now < self.next_poll.get(k, 0.0):
            return Poll(complete=False)
        self.next_poll[k] = now + req.probe_interval_s
        results: dict[int, Any] = {n: None for n in group.nodes}
        refs = {self.agents[n].poll.remote(req.follow, group.label): n for n in group.nodes if n in self.agents}
        if refs:
            ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=10)
            for r in ready:
                try:
                    results[refs[r]] = self.ray.get(r)
                except self.ray_errors as err:
                    results[refs[r]] = err
        cmds = self.cmds.get(k, ())
        failures: list[Failure] = []
        exited: list[tuple[tuple[bool, int], Failure]] = []
        health: dict[str, str] = {}
        lines: list[tuple[str, str]] = []
        for node, res in results.items():
            if isinstance(res, BaseException):
                lost = self.node_lost(node)
                reason = f"Ray node {self.ip(group, node)} lost ({lost})" if lost else f"node agent died: {_short(res)}"
                names = ", ".join(c.name for c in cmds if c.node == node)
                failures.append(Failure(names or group.label, self.node_label(group, node), reason, now))
                continue
            if res is None:
                silent = now - self.last_answer.get(k, {}).get(node, now)
                if silent > req.unhealthy_grace_s:
                    failures.append(
                        Failure(
                            group.label,
                            self.node_label(group, node),
                            f"node agent did not answer for {silent:.0f} s",
                            now,
                        )
                    )
                continue
            self.last_answer.setdefault(k, {})[node] = now
            for row in res:
                lines += [(row["name"], line) for line in row["lines"]]
                if row["exit"] is not None:
                    f = Failure(
                        row["name"], self.node_label(group, node), signal_name(row["exit"]), now, tuple(row["tail"])
                    )
                    exited.append(((row.get("torn_down", False), death_severity(row["exit"])), f))
                elif row["health"] is not None:
                    health[row["name"]] = row["health"]
        # the root cause first, as on bare metal (procs.root_cause): a death by signal before a clean exit, a rank
        # that an agent tore down because its peer died last (the supervisor takes the first of equal times; the
        # agents' clocks are not compared: they may be other hosts)
        failures = [f for _, f in sorted(exited, key=lambda e: e[0])] + failures
        return Poll(
            failures=tuple(failures),
            health=health,
            complete=all(r is not None for r in results.values()),
            lines=tuple(lines),
        )

    def endpoints(self, group: Group) -> list[Endpoint]:
        return [Endpoint(c, c.node_address, c.health_port) for c in self.cmds.get(key_of(group), ()) if c.health_port]

    def stop(self, group: Group) -> None:
        self.stop_agents(group.nodes, group.label)

    # ------------------------------------------------------------------ the router
    def tick(self, now: float) -> int | None:
        """The router, on the driver's machine (the head), once every group has placed its ranks: rendered with the
        addresses Ray placed them at, started once they are all healthy, restarted when it dies (RouterRunner, as
        bare metal's)."""
        if self.launch.router is None:
            return None
        if self.router is None:
            if any(key_of(g) not in self.cmds for g in self.launch.groups):
                return None
            self.router = self.router_runner()
        self.router.step(now)
        return self.router.exit_code

    def router_runner(self) -> RouterRunner:
        placed = [c for g in self.launch.groups for c in self.cmds[key_of(g)]]
        nodes = self.launch.plan.nodes
        # the launch's router (rendered once, with the topology's addresses) pointed at where Ray placed each rank
        moved = {f"http://{nodes[c.node].host}:{c.port}": f"http://{c.node_address}:{c.port}" for c in placed if c.port}
        cmd = self.launch.router
        assert cmd is not None
        cmd = replace(cmd, template=tuple(moved.get(w, w) if isinstance(w, str) else w for w in cmd.template))
        head = self.ray.util.get_node_ip_address()
        runner = RouterRunner(self, cmd.at(node_address=head), [(c, c.node_address, c.port) for c in placed if c.port])
        self.console.print(f"\\[router] on the driver's node {head}, fronting the ranks where Ray placed them")
        return runner

    def ready(self) -> bool:
        return self.launch.router is None or (self.router is not None and self.router.healthy)

    def drain(self) -> None:
        if self.router is not None:
            self.router.stop()

    def front_door(self) -> Endpoint:
        if self.router is not None:
            return Endpoint(self.router.cmd, self.router.host, self.router.cmd.port or 0)
        return super().front_door()

    def publish(self, group: Group, status: GroupStatus) -> None:
        self.statuses[key_of(group)] = status
        if status.state == GroupState.HEALTHY:
            self.write_placement()

    def write_placement(self) -> None:
        p = self.launch.plan
        doc = {
            "run_id": self.launch.run_id,
            "plan": p.name,
            "bundles": [
                {
                    "bundle": i,
                    "plan_node": n,
                    "plan_node_name": p.nodes[n].name,
                    "resources": bundle_resources(p),
                    **(
                        {k: self.agent_info[n][k] for k in ("ip", "node_id", "hostname", "pid", "gpu_ids")}
                        if n in self.agent_info
                        else {}
                    ),
                }
                for i, n in enumerate(self.bundles)
            ],
            "groups": [
                {
                    "group": g.label,
                    "attempt": self.statuses.get(key_of(g), GroupStatus()).attempt,
                    "state": self.statuses.get(key_of(g), GroupStatus()).state.value,
                    "ranks": [
                        {"name": c.name, "node": c.node, "ip": c.node_address, "port": c.port}
                        for c in self.cmds.get(key_of(g), ())
                    ],
                }
                for g in self.launch.groups
            ],
        }
        self.launch.run_dir.mkdir(parents=True, exist_ok=True)
        (self.launch.run_dir / "placement.json").write_text(json.dumps(doc, indent=2) + "\n")

    def shutdown(self) -> None:
        """Stop every rank, kill every agent, remove the placement group, disconnect."""
        if self.ray is None:
            return
        from ray.util.placement_group import remove_placement_group

        try:
            self.drain()
            self.stop_agents(list(self.agents))
            for n in list(self.agents):
                self._kill(n)
            if self.pg is not None:
                try:
                    remove_placement_group(self.pg)
                except self.ray_errors:
                    pass
                self.pg = None
            self.console.print(f"run {self.launch.run_id}: ranks stopped, actors killed, placement group removed")
        finally:
            self.ray.shutdown()
            self.ray = None


def placement_table(backend: RayBackend) -> Table:
    p = backend.launch.plan
    t = Table(title="placement (plan node -> Ray node)", title_justify="left")
    for col in ("bundle", "plan node", "group", "ranks", "Ray node", "ip", "gpus"):
        t.add_column(col)
    for i, n in enumerate(backend.bundles):
        info = backend.agent_info.get(n, {})
        grp = next((g for g in backend.launch.groups if n in g.nodes), None)
        ranks = [r for rp in p.roles for r in rp.ranks if r.node == n]
        t.add_row(
            str(i),
            p.nodes[n].name,
            grp.label if grp else "-",
            ",".join(f"{r.role}/{r.dp_rank}" for r in ranks),
            f"{info.get('hostname', '?')} ({str(info.get('node_id', '?'))[:8]})",
            info.get("ip", "?"),
            ",".join(info.get("gpu_ids", [])) or "-",
        )
    return t
