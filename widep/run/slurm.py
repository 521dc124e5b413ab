"""Slurm backend: ``widep launch TOPOLOGY --backend slurm --partition P --time T`` runs a whole deployment in one
Slurm job allocation, supervised by the same loop as bare metal and Ray (:mod:`widep.run.supervisor`).

Allocation: one ``sbatch`` job for the whole plan (``--nodes`` = plan nodes, ``--ntasks-per-node=1``,
``--gpus-per-node``, ``--exclusive``) whose batch script only holds the allocation (:func:`sbatch_script`, printed by
``--dry-run``, checked in under ``launch/``). Plan node *i* runs on the *i*-th host of the allocation
(``scontrol show hostnames "$SLURM_JOB_NODELIST"``), reached at that node's ``NodeAddr``: rank, node and GPU are
``widep render``'s; only the addresses come from Slurm (bound with ``ProcessCommand.at``).

Attempts: each attempt of each DP group is one ``srun`` step inside the allocation (:func:`srun_argv`), one task on
each of the group's nodes. The task is widep's node agent (``python -m widep.run.slurm node STEP.json``): it starts
that node's processes through the guard (:func:`widep.run.procs.start_rank`: process group, PR_SET_PDEATHSIG,
SIGTERM -> deadline -> SIGKILL), logs to ``<run>/attempt-<k>/<role>/rank-<n>/vllm.log`` like bare metal, and when one
of them exits it records the failure with its last log lines, stops the rest and exits non-zero, so
``--kill-on-bad-exit`` ends the step on every node. The driver (the supervisor on the submitting host, or inside the
batch script with ``--detach``) probes every endpoint, and a fate-sharing restart is a new step in the same
allocation. Ctrl-C / SIGTERM stops every step (SIGTERM to the tasks, then ``scancel``) and cancels the job;
``scancel`` of the job ends every step, which ends the run.

The run directory must be on a file system every node sees (the usual ``$HOME`` or scratch of a Slurm site): the
step files, logs and the batch output live there. Every value that reaches a shell is quoted by :func:`sh_quote`;
values on ``#SBATCH`` lines are validated to a character set that needs no quoting.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError, field_validator
from rich.console import Console

from widep.errors import UserError
from widep.plan.core import DeploymentPlan
from widep.render.quoting import sh_comment
from widep.render.quoting import sh_word as sh_quote
from widep.render.vllm import EnvRef, ProcessCommand
from widep.run.backend import (
    BackendBase,
    DryRun,
    DryRunTable,
    Endpoint,
    Poll,
    StartFailed,
)
from widep.run.state import Failure, GroupStatus
from widep.spec.topology import Strict

if TYPE_CHECKING:
    from widep.run.launch import Group, Launch, LaunchRequest


# --------------------------------------------------------------------------------------------- options
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*$")
_TIME = re.compile(
    r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
    r"|UNLIMITED|INFINITE)$"
)
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.+\-&|\[\]*:()!,]+$")
_DIRECTIVE_BAD = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""What an ``#SBATCH`` line cannot carry: sbatch splits it at whitespace and a newline ends the directive."""
_SHELL_REF = re.compile(r"(\$\{(?:host_\d+|SLURM_JOB_ID)\})")
"""The only expansions a printed srun line leaves to the shell: the allocation's hosts and job id."""
_MOUNT = re.compile(r"^/[^:,\s]*:/[^:,\s]*(:[A-Za-z+]+)?$")
OWNED_SBATCH = {
    "--nodes": "the plan's node count",
    "-N": "the plan's node count",
    "--ntasks-per-node": "one agent per node",
    "--ntasks": "one agent per node",
    "-n": "one agent per node",
    "--gpus-per-node": "cluster.gpus_per_node",
    "--gres": "cluster.gpus_per_node",
    "--exclusive": "whole nodes",
    "--partition": "--partition",
    "-p": "--partition",
    "--account": "--account",
    "-A": "--account",
    "--qos": "--qos",
    "-q": "--qos",
    "--time": "--time",
    "-t": "--time",
    "--reservation": "--reservation",
    "--constraint": "--constraint",
    "-C": "--constraint",
    "--job-name": "--job-name",
    "-J": "--job-name",
    "--output": "the run directory",
    "-o": "the run directory",
    "--error": "the run directory",
    "-e": "the run directory",
}
"""sbatch options widep sets itself -> where their value comes from (an extra line may not set them)."""


class SlurmOptions(Strict):
    """What a Slurm user says about the job; every field is a ``widep launch --backend slurm`` flag."""

    partition: str | None = None
    """Partition (sbatch --partition); None: the cluster's default partition."""
    account: str | None = None
    """Account charged for the job (sbatch --account)."""
    qos: str | None = None
    """Quality of service (sbatch --qos)."""
    time: str | None = None
    """Time limit (sbatch --time): minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED."""
    reservation: str | None = None
    """Reservation to run in (sbatch --reservation)."""
    constraint: str | None = None
    """Node features required (sbatch --constraint), e.g. 'h200&ib'."""
    job_name: str | None = None
    """Job name; None: widep-<topology name>."""
    sbatch_lines: tuple[str, ...] = ()
    """Extra '#SBATCH' options, one per entry (e.g. '--mail-type=END'); options widep sets are refused."""
    container_image: str | None = None
    """pyxis/enroot image every step runs in (srun --container-image); it must have widep and vLLM."""
    container_mounts: tuple[str, ...] = ()
    """pyxis mounts SRC:DST[:FLAGS] (srun --container-mounts); the run directory is always mounted."""
    detach: bool = False
    """Submit and return: the supervisor runs inside the batch script (`widep launch ... --backend slurm` there)."""

    @field_validator("partition", "account", "qos", "reservation", "job_name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError(f"{v!r} is not a Slurm name. Valid: letters, digits and _.+- (comma-separated list)")
        return v

    @field_validator("time")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None and not _TIME.match(v):
            raise ValueError(
                f"{v!r} is not a Slurm time limit. Valid: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                "D-HH:MM:SS, UNLIMITED (e.g. 12:00:00)"
            )
        return v

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, v: str | None) -> str | None:
        if v is not None and not _CONSTRAINT.match(v):
            raise ValueError(
                f"{v!r} is not a Slurm constraint. Valid: features joined by & | , with [] () * ! "
                "and no spaces (e.g. 'h200&ib')"
            )
        return v

    @field_validator("sbatch_lines")
    @classmethod
    def _lines(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for line in v:
            opt = line.split("=", 1)[0].split(" ", 1)[0]
            name, sep, value = line.partition(" ")  # '--opt value' (one space) or '--opt=value'
            parts = (name, value) if sep and "=" not in name else (line,)
            if not line.startswith("-") or any(_DIRECTIVE_BAD.search(p) for p in parts):
                raise ValueError(
                    f"{line!r} is not one sbatch option. Valid: one option per entry, e.g. "
                    "'--mail-type=END' (without '#SBATCH'), its value without spaces, tabs, newlines or control "
                    "characters (an #SBATCH line cannot quote them)"
                )
            if opt in OWNED_SBATCH:
                raise ValueError(
                    f"{line!r} sets {opt}, which widep sets from {OWNED_SBATCH[opt]}. Valid: any other sbatch option"
                )
        return v

    @field_validator("container_image")
    @classmethod
    def _image(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c.isspace() for c in v) or "," in v):
            raise ValueError(
                f"{v!r} is not an image reference. Valid: e.g. nvcr.io#nvidia/pytorch:25.01-py3 or "
                "/shared/images/widep.sqsh"
            )
        return v

    @field_validator("container_mounts")
    @classmethod
    def _mounts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for m in v:
            if not _MOUNT.match(m):
                raise ValueError(
                    f"{m!r} is not a mount. Valid: SRC:DST[:FLAGS] with absolute paths, no commas "
                    "or spaces (e.g. /lustre/models:/models:ro)"
                )
        return v


def slurm_options(**values: object) -> SlurmOptions:
    """SlurmOptions from CLI values; a bad one is a UserError naming its flag ("--time: ... Given: ... Valid: ...")."""
    try:
        return SlurmOptions(**values)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            field = str(e["loc"][0]) if e["loc"] else "?"
            flag = {"sbatch_lines": "--sbatch", "container_mounts": "--container-mounts"}.get(
                field, "--" + field.replace("_", "-")
            )
            msg = str(e.get("ctx", {}).get("error", e["msg"]))
            lines.append(f"{flag}: {msg}. Given: {e['input']!r}" if "Given" not in msg else f"{flag}: {msg}")
        raise UserError("\n".join(lines)) from None


# --------------------------------------------------------------------------------------------- pure rendering
def plan_nodes(plan: DeploymentPlan) -> int:
    """Nodes the allocation has: every node of the plan (plan node i <-> i-th host of the allocation)."""
    return len(plan.nodes)


def job_name(plan: DeploymentPlan, opts: SlurmOptions) -> str:
    """--job-name, else widep-<topology name> with anything outside Slurm's name characters as '-'."""
    return opts.job_name or "widep-" + re.sub(r"[^A-Za-z0-9_.+-]", "-", plan.name)


def sbatch_script(
    plan: DeploymentPlan, opts: SlurmOptions, run_dir: str, body: tuple[str, ...] | None = None, made_by: str = ""
) -> str:
    """The batch script of the deployment's one allocation. ``body``: the supervisor command (``--detach``);
    None: the script only holds the allocation while the driver on the submitting host starts steps in it."""
    n = plan_nodes(plan)
    lines = [
        "#!/bin/bash",
        sh_comment(f"widep: one Slurm allocation for {plan.name} ({n} node(s))."),
        *([sh_comment(made_by)] if made_by else []),
        '# Plan node i runs on the i-th host of the allocation (scontrol show hostnames "$SLURM_JOB_NODELIST"):',
    ]
    for i, node in enumerate(plan.nodes):
        roles = sorted(
            {
                f"{rp.name}#{g}" if rp.spec.replicas > 1 else rp.name
                for rp in plan.roles
                for g, ns in enumerate(rp.group_nodes)
                if i in ns
            }
        )
        lines.append(sh_comment(f"  host {i}: plan node {i} ({node.name}): {', '.join(roles) or 'no ranks'}"))
    sb = [f"--job-name={job_name(plan, opts)}", f"--nodes={n}", "--ntasks-per-node=1", "--exclusive"]
    if plan.device == "cuda":
        sb.append(f"--gpus-per-node={plan.spec.cluster.gpus_per_node}")
    for flag, v in (
        ("partition", opts.partition),
        ("account", opts.account),
        ("qos", opts.qos),
        ("time", opts.time),
        ("reservation", opts.reservation),
        ("constraint", opts.constraint),
    ):
        if v is not None:
            sb.append(f"--{flag}={v}")
    if _DIRECTIVE_BAD.search(run_dir) or "%" in run_dir:
        raise UserError(
            f"--run-dir: {run_dir[:200]!r} cannot go on an #SBATCH --output line. Valid: a directory path without "
            "spaces, tabs, newlines, control characters or '%' (sbatch splits the line at whitespace and reads % "
            "as a pattern)"
        )
    sb.append(f"--output={run_dir}/slurm-%j.out")
    sb += list(opts.sbatch_lines)
    lines += [f"#SBATCH {s}" for s in sb]
    lines += [
        "set -euo pipefail",
        'echo "widep: job $SLURM_JOB_ID holds $(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd,)"',
    ]
    if body is None:
        lines += [
            "# the driver (`widep launch --backend slurm` on the submitting host) starts one srun step per",
            "# DP group and attempt in this allocation, and cancels the job when it stops",
            "exec sleep infinity",
        ]
    else:
        lines += [
            "# the supervisor runs here (--detach): it starts one srun step per DP group and attempt in this",
            "# allocation, and the job ends when it stops (scancel, or the group failed for good)",
            f"export {INSIDE_ENV}=1",
            "exec " + " ".join(sh_quote(a) for a in body),
        ]
    return "\n".join(lines) + "\n"


def srun_argv(
    plan: DeploymentPlan,
    opts: SlurmOptions,
    job: str,
    hosts: list[str],
    label: str,
    attempt: int,
    step_file: str,
    python: str,
    run_dir: str,
) -> tuple[str, ...]:
    """The srun step of one attempt of one DP group: one node agent per host of the group."""
    argv = [
        "srun",
        f"--jobid={job}",
        "--overlap",
        f"--nodes={len(hosts)}",
        f"--ntasks={len(hosts)}",
        "--ntasks-per-node=1",
        f"--nodelist={','.join(hosts)}",
        "--kill-on-bad-exit=1",
        f"--job-name={step_name(label, attempt)}",
    ]
    if plan.device == "cuda":
        argv.append(f"--gpus-per-node={plan.spec.cluster.gpus_per_node}")
    if opts.container_image:
        argv += [
            f"--container-image={opts.container_image}",
            f"--container-mounts={','.join([*opts.container_mounts, f'{run_dir}:{run_dir}'])}",
        ]
    return (*argv, python, "-m", "widep.run.slurm", "node", step_file)


def step_name(label: str, attempt: int) -> str:
    return f"widep-{label.replace('#', '-')}-a{attempt}"


def dry_run_text(launch: Launch, opts: SlurmOptions, python: str) -> str:
    """The script and the srun step of each group's first attempt, hosts as ${host_<i>} (known once allocated)."""
    rd = str(launch.run_dir)
    text = [
        f"# {rd}/widep.sbatch (submitted with: sbatch --parsable {rd}/widep.sbatch)",
        sbatch_script(launch.plan, opts, rd, detach_command(launch, opts, python) if opts.detach else None),
    ]
    for g in launch.groups:
        hosts = [f"${{host_{n}}}" for n in g.nodes]
        step = f"{rd}/attempt-0/{g.label}/step.json"
        argv = srun_argv(launch.plan, opts, "${SLURM_JOB_ID}", hosts, g.label, 0, step, python, rd)
        text.append(
            f"# group {g.label}, attempt 0 (a restart is the same step with attempt-<k>):\n"
            + " ".join(_sh_with_refs(a) for a in argv)
            + "\n"
        )
    return "\n".join(text)


def _sh_with_refs(arg: str) -> str:
    """One shell word for ``arg``: everything quoted except the ${host_<i>} / ${SLURM_JOB_ID} references, which
    are double-quoted expansions (so a pasted line expands those and nothing else: no $(...) of an image name)."""
    parts = [p for p in _SHELL_REF.split(arg) if p]
    return "".join(f'"{p}"' if _SHELL_REF.fullmatch(p) else sh_quote(p) for p in parts) or sh_quote(arg)


def detach_command(launch: Launch, opts: SlurmOptions, python: str) -> tuple[str, ...]:
    """`widep launch` as the batch script runs it with --detach (same request, inside the allocation)."""
    r = launch.request
    topo = str(r.topology.resolve()) if r.topology else "TOPOLOGY"
    argv = [
        python,
        "-m",
        "widep",
        "launch",
        topo,
        "--backend",
        "slurm",
        "--run-dir",
        str(launch.run_dir),
        "--restart",
        r.policy.mode,
        "--max-restarts",
        str(r.policy.max_restarts),
        "--backoff",
        str(r.policy.backoff_s),
        "--grace",
        str(r.unhealthy_grace_s),
        "--stop-timeout",
        str(r.stop_timeout_s),
        "--ready-timeout",
        str(r.ready_timeout),
    ]
    if r.python:
        argv += ["--python", r.python]
    argv += ["--model-path", launch.model]
    if r.skip_preflight:
        argv.append("--skip-preflight")
    if opts.container_image:
        argv += ["--container-image", opts.container_image]
    for m in opts.container_mounts:
        argv += ["--container-mounts", m]
    return tuple(argv)


# --------------------------------------------------------------------------------------------- cluster facts
@dataclass(frozen=True)
class PartitionFacts:
    """One partition as sinfo reports it (nodes summed over its state lines)."""

    name: str
    default: bool
    available: str
    nodes: int
    usable: int
    """Nodes not down, drained, failing or in maintenance."""
    cpus: int
    """CPUs per node (the smallest node's)."""
    gpus: int
    """GPUs per node from GRES (the smallest node's; 0: none)."""
    states: str
    """e.g. '1 idle (n0), 1 alloc (n1)'."""


SINFO_FORMAT = "%P|%a|%D|%c|%G|%T|%N"
_UNUSABLE = ("down", "drain", "fail", "maint", "unknown", "future", "inval", "reboot")


def _gres_gpus(gres: str) -> int:
    n = 0
    for part in gres.split(","):
        bits = part.split("(")[0].split(":")
        if bits[0] == "gpu":
            try:
                n += int(bits[-1])
            except ValueError:
                n += 1
    return n


def parse_sinfo(text: str) -> list[PartitionFacts]:
    """Partitions from ``sinfo -h -o SINFO_FORMAT`` output."""
    acc: dict[str, dict] = {}
    for line in text.splitlines():
        f = line.strip().split("|")
        if len(f) != 7:
            continue
        name, avail, count, cpus, gres, state, nodelist = f
        default = name.endswith("*")
        name = name.rstrip("*")
        d = acc.setdefault(
            name,
            {"default": default, "available": avail, "nodes": 0, "usable": 0, "cpus": [], "gpus": [], "states": []},
        )
        k = int(count)
        d["nodes"] += k
        if not any(state.lower().startswith(u) for u in _UNUSABLE) and avail == "up":
            d["usable"] += k
        d["cpus"].append(int(cpus.rstrip("+")) if cpus.rstrip("+").isdigit() else 0)
        d["gpus"].append(_gres_gpus(gres))
        d["states"].append(f"{k} {state} ({nodelist})")
    return [
        PartitionFacts(
            n,
            d["default"],
            d["available"],
            d["nodes"],
            d["usable"],
            min(d["cpus"]),
            min(d["gpus"]),
            ", ".join(d["states"]),
        )
        for n, d in acc.items()
    ]


def check_fit(plan: DeploymentPlan, opts: SlurmOptions, partitions: list[PartitionFacts]) -> PartitionFacts:
    """The partition the job goes to, or a UserError with the sinfo facts (nothing is submitted)."""
    facts = "; ".join(
        f"{p.name}{' (default)' if p.default else ''}: {p.nodes} node(s), {p.usable} usable, "
        f"{p.cpus} CPUs and {p.gpus} GPUs per node, {p.available}, {p.states}"
        for p in partitions
    )
    names = [p.name for p in partitions]
    if opts.partition is not None:
        wanted = opts.partition.split(",")[0]
        part = next((p for p in partitions if p.name == wanted), None)
        if part is None:
            from widep.errors import did_you_mean

            raise UserError(
                f"--partition: {wanted!r} is not a partition of this cluster.{did_you_mean(wanted, names)} "
                f"Given: {opts.partition}. Valid: {', '.join(names) or '(none)'}. sinfo: {facts}. "
                "Nothing was submitted."
            )
    else:
        part = next((p for p in partitions if p.default), None)
        if part is None:
            raise UserError(
                f"--partition: this cluster has no default partition; give one. Valid: "
                f"{', '.join(names) or '(none)'}. sinfo: {facts}. Nothing was submitted."
            )
    need, gpn = plan_nodes(plan), plan.spec.cluster.gpus_per_node
    where = f"partition {part.name!r} has {part.nodes} node(s), {part.usable} usable ({part.states})"
    if part.available != "up":
        raise UserError(f"--partition: {part.name!r} is {part.available}. sinfo: {facts}. Nothing was submitted.")
    if need > part.usable:
        raise UserError(
            f"{plan.name}: the plan needs {need} node(s) (one job, --nodes={need}) but {where}. "
            f"Valid: a topology of at most {part.usable} node(s), or a larger partition. sinfo: {facts}. "
            "Nothing was submitted."
        )
    if plan.device == "cuda" and part.gpus < gpn:
        raise UserError(
            f"cluster.gpus_per_node: the plan needs {gpn} GPUs per node but the nodes of partition "
            f"{part.name!r} have {part.gpus} (GRES). sinfo: {facts}. Nothing was submitted."
        )
    if plan.device == "cpu" and part.cpus < gpn:
        raise UserError(
            f"cluster.gpus_per_node: the plan needs {gpn} CPU slot(s) per node but the nodes of partition "
            f"{part.name!r} have {part.cpus} CPUs. sinfo: {facts}. Nothing was submitted."
        )
    return part


# --------------------------------------------------------------------------------------------- the Slurm client
class Slurm:
    """Slurm's commands (sinfo, sbatch, squeue, scontrol, scancel); the only place the backend runs them."""

    def _run(self, *argv: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
        if shutil.which(argv[0]) is None:
            raise UserError(
                f"--backend: 'slurm' needs `{argv[0]}`, which is not on PATH. Run on a Slurm login node "
                "(slurm-client installed and configured), or choose --backend bare-metal / ray."
            )
        try:
            p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise UserError(
                f"`{' '.join(argv)}` did not answer in {timeout:.0f} s (is slurmctld up?)", exit_code=1
            ) from None
        if check and p.returncode != 0:
            raise UserError(f"`{' '.join(argv)}` failed ({p.returncode}): {p.stderr.strip()}", exit_code=1)
        return p

    def partitions(self) -> list[PartitionFacts]:
        return parse_sinfo(self._run("sinfo", "-h", "-o", SINFO_FORMAT).stdout)

    def submit(self, script: Path) -> str:
        return self._run("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]

    def job(self, job: str) -> dict[str, str]:
        """``scontrol show job`` fields ({} once the controller has forgotten the job)."""
        p = self._run("scontrol", "show", "job", "-o", job, check=False)
        if p.returncode != 0:
            return {}
        return dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv)

    def hostnames(self, nodelist: str) -> list[str]:
        return self._run("scontrol", "show", "hostnames", nodelist).stdout.split()

    def node_address(self, host: str) -> str:
        out = self._run("scontrol", "show", "node", "-o", host).stdout
        m = re.search(r"\bNodeAddr=(\S+)", out)
        return m.group(1) if m else host

    def step_id(self, job: str, name: str) -> str | None:
        out = self._run("squeue", "-h", "-s", "-j", job, "-o", "%i|%j", check=False).stdout
        return next((line.split("|")[0] for line in out.splitlines() if line.endswith(f"|{name}")), None)

    def cancel(self, target: str, sig: str | None = None) -> None:
        self._run("scancel", *([f"--signal={sig}"] if sig else []), target, check=False)


# --------------------------------------------------------------------------------------------- the backend
@dataclass
class _Step:
    proc: subprocess.Popen
    attempt: int
    name: str
    log: Path
    failures_dir: Path
    started: float


class SlurmBackend(BackendBase):
    """Runs a launch in one Slurm allocation, one srun step per attempt of each DP group."""

    name = "slurm"

    def __init__(self, console: Console, options: SlurmOptions | None = None, slurm: Slurm | None = None) -> None:
        self.console = console
        self.options = options or SlurmOptions()
        self.slurm = slurm or Slurm()
        self.job: str | None = None
        self.submitted = False
        self.hosts: dict[int, str] = {}
        self.addresses: dict[int, str] = {}
        self.steps: dict[str, _Step] = {}
        self.log_pos: dict[Path, int] = {}
        self.next_check = 0.0
        self.router: Group | None = None
        """The vllm-router as a one-process group of its own srun step (started once every API server is healthy)."""
        self.router_starts = 0
        self.router_healthy = False
        self.router_failed_starts = 0
        self.router_next = 0.0

    # ------------------------------------------------------------------ pure
    def resolve(self, request: LaunchRequest) -> LaunchRequest:
        self.options = request.slurm or self.options
        if self.options.detach and request.topology is None:
            raise UserError(
                "--detach: the batch script runs `widep launch TOPOLOGY` again inside the job, so the "
                "topology must be a file. Given: the built-in default. Valid: a topology file path."
            )
        from widep.run.host import default_run_dir

        # absolute: the nodes read their step files and write their logs there (a file system they all see)
        return replace(request, run_dir=(request.run_dir or default_run_dir(request.plan, "slurm")).resolve())

    def python(self, launch: Launch) -> str:
        return launch.request.python or sys.executable

    def dry_run(self, launch: Launch) -> DryRun:
        rows = tuple((str(i), n.name, f"${{host_{i}}}") for i, n in enumerate(launch.plan.nodes))
        return DryRun(
            heading=f"one Slurm job of {plan_nodes(launch.plan)} node(s): nothing submitted",
            processes=launch.processes,
            tables=(DryRunTable("plan node -> allocation host", ("node", "plan name", "host"), rows),),
            text=dry_run_text(launch, self.options, self.python(launch)),
        )

    # ------------------------------------------------------------------ prepare: submit, wait, bind
    def prepare(self, launch: Launch) -> list[Group]:
        self.launch = launch
        plan = launch.plan
        if launch.router is not None:
            from widep.run.bare_metal import router_executable

            router_executable(launch.router.argv[0])  # a missing router is refused before anything is submitted
        inside = os.environ.get("SLURM_JOB_ID") if os.environ.get(INSIDE_ENV) == "1" else None
        run_dir = launch.run_dir
        part = None if inside else check_fit(plan, self.options, self.slurm.partitions())  # refused: nothing written
        run_dir.mkdir(parents=True, exist_ok=True)
        if inside or part is None:
            self.job = inside
            self.console.print(f"\\[slurm] supervising inside job {inside}")
        else:
            script = run_dir / "widep.sbatch"
            script.write_text(sbatch_script(plan, self.options, str(run_dir)))
            self.job = self.slurm.submit(script)
            self.submitted = True
            self.console.print(
                f"\\[slurm] submitted job {self.job} ({plan_nodes(plan)} node(s), partition "
                f"{part.name}); batch script {script}, output {run_dir}/slurm-{self.job}.out"
            )
        info = self._wait_running()
        hosts = self.slurm.hostnames(info["NodeList"])
        if len(hosts) != plan_nodes(plan):
            raise UserError(
                f"job {self.job} got {len(hosts)} node(s) ({info['NodeList']}) but {plan.name} has "
                f"{plan_nodes(plan)}; run it in an allocation of exactly that many nodes.",
                exit_code=1,
            )
        self.hosts = dict(enumerate(hosts))
        self.addresses = {i: self.slurm.node_address(h) for i, h in self.hosts.items()}
        (run_dir / "slurm.json").write_text(
            json.dumps(
                {"job": self.job, "hosts": hosts, "addresses": [self.addresses[i] for i in range(len(hosts))]}, indent=2
            )
        )
        for i, n in enumerate(plan.nodes):
            self.console.print(
                f"\\[slurm] plan node {i} ({n.name}) -> {self.hosts[i]} ({self.addresses[i]})", highlight=False
            )
        self.launch = bind_addresses(launch, self.addresses)
        if launch.router is not None:
            from widep.run.bare_metal import router_executable
            from widep.run.launch import Group, render_launch

            # the router's worker URLs are rendered from the plan's node addresses (they are no slots ProcessCommand.at
            # could bind), so its command is rendered with the allocation's addresses standing in the plan
            routed = render_launch(
                replace(launch.request, plan=plan_at(plan, self.addresses)), launch.context, launch.run_id
            )
            assert routed.router is not None
            cmd = routed.router.with_executable(router_executable(routed.router.argv[0]))
            self.router = Group("router", 0, "router", (cmd.node,), (cmd,), 0)
        return list(self.launch.groups)

    def _wait_running(self) -> dict[str, str]:
        assert self.job is not None
        last = ""
        while True:
            info = self.slurm.job(self.job)
            state = info.get("JobState", "GONE")
            if state == "RUNNING":
                return info
            if state not in ("PENDING", "CONFIGURING", "REQUEUED", "RESIZING"):
                raise UserError(
                    f"job {self.job} ended before it ran: {state} ({info.get('Reason', '?')}); see "
                    f"{self.launch.run_dir}/slurm-{self.job}.out",
                    exit_code=1,
                )
            if self.stop_requested():
                raise UserError(f"stopped while job {self.job} was {state.lower()}; it is cancelled", exit_code=1)
            now = f"{state} ({info.get('Reason', '?')})"
            if now != last:
                self.console.print(f"\\[slurm] job {self.job} {now}")
                last = now
            time.sleep(1.0)

    # ------------------------------------------------------------------ attempts
    def start(self, group: Group, attempt: int) -> str:
        assert self.job is not None
        launch = self.launch
        d = launch.run_dir / f"attempt-{attempt}" / group.label
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("failure-*.json"):
            old.unlink()
        step_file = d / "step.json"
        step_file.write_text(json.dumps(step_spec(launch, group, attempt, self.hosts), indent=1))
        hosts = [self.hosts[n] for n in group.nodes]
        argv = srun_argv(
            launch.plan,
            self.options,
            self.job,
            hosts,
            group.label,
            attempt,
            str(step_file),
            self.python(launch),
            str(launch.run_dir),
        )
        log = d / "srun.log"
        (d / "srun.sh").write_text(" ".join(sh_quote(a) for a in argv) + "\n")
        try:
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
        except OSError as err:
            raise StartFailed(f"srun: {err}") from None
        self.steps[group.label] = _Step(proc, attempt, step_name(group.label, attempt), log, d, time.monotonic())
        names = ", ".join(f"{c.name} on {self.hosts[c.node]}" for c in group.processes)
        return f"{names} (srun step of job {self.job}); logs in {launch.run_dir / f'attempt-{attempt}'}"

    def poll(self, group: Group, now: float) -> Poll:
        from widep.run.control import probe

        step = self.steps.get(group.label)
        if step is None:
            return Poll(complete=False)
        failures = list(self._failures(step, now))
        code = step.proc.poll()
        if code is not None and not failures:
            failures.append(
                Failure(
                    group.label,
                    ",".join(self.hosts[n] for n in group.nodes),
                    f"srun step {step.name} {_exit_words(code)}",
                    now,
                    _tail(step.log),
                )
            )
        health = (
            {
                e.process.name: probe(e.host, e.port, timeout=min(2.0, 2 * self.launch.request.probe_interval_s))[0]
                for e in self.endpoints(group)
            }
            if not failures
            else {}
        )
        lines: list[tuple[str, str]] = []
        if self.launch.request.follow:
            for c in group.processes:
                lines += [(c.name, line) for line in self._new_lines(self._log(c, step.attempt))]
        return Poll(failures=tuple(failures), health=health, lines=tuple(lines))

    def _failures(self, step: _Step, now: float) -> list[Failure]:
        out = []
        for f in sorted(step.failures_dir.glob("failure-*.json")):
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                continue  # being written
            at = now - max(0.0, time.time() - float(d["wall"]))
            out.append(Failure(d["rank"], d["node"], d["reason"], at, tuple(d["log_tail"])))
        return out

    def _log(self, c: ProcessCommand, attempt: int) -> Path:
        return log_root(self.launch, c) / f"attempt-{attempt}" / c.role / f"rank-{c.dp_rank}" / "vllm.log"

    def _new_lines(self, path: Path) -> list[str]:
        try:
            with open(path, "rb") as f:
                f.seek(self.log_pos.get(path, 0))
                data = f.read()
        except OSError:
            return []
        cut = data.rfind(b"\n")
        if cut < 0:
            return []
        self.log_pos[path] = self.log_pos.get(path, 0) + cut + 1
        return data[: cut + 1].decode(errors="replace").replace("\r", "").splitlines()

    def endpoints(self, group: Group) -> list[Endpoint]:
        return [
            Endpoint(c, self.addresses.get(c.node, c.node_address), c.health_port)
            for c in group.processes
            if c.health_port
        ]

    def log_tail(self, group: Group, process: str) -> tuple[str, ...]:
        step = self.steps.get(group.label)
        c = next((c for c in group.processes if c.name == process), None)
        return _tail(self._log(c, step.attempt)) if step and c else ()

    def stop(self, group: Group) -> None:
        step = self.steps.pop(group.label, None)
        if step is None or step.proc.poll() is not None:
            return
        grace = self.launch.request.stop_timeout_s
        sid = self.slurm.step_id(self.job or "", step.name) if self.job else None
        if sid:  # SIGTERM to the agents (srun itself would SIGKILL them): they stop their ranks within the grace
            self.slurm.cancel(sid, "TERM")
        else:
            step.proc.send_signal(signal.SIGTERM)
        try:
            step.proc.wait(timeout=grace + 10)
        except subprocess.TimeoutExpired:
            if sid:
                self.slurm.cancel(sid)
            try:
                step.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(step.proc.pid, signal.SIGKILL)
                step.proc.wait()

    def tick(self, now: float) -> int | None:
        if self.router is not None:
            code = self._router_tick(now)
            if code is not None:
                return code
        if self.job is None or now < self.next_check:
            return None
        self.next_check = now + 2.0
        state = self.slurm.job(self.job).get("JobState", "GONE")
        if state in ("RUNNING", "COMPLETING"):
            return None
        self.console.print(
            f"[bold red]\\[slurm] job {self.job} ended: {state}[/]"
            + (" (time limit: --time)" if state == "TIMEOUT" else "")
        )
        return 0 if state == "CANCELLED" else 1

    def _router_tick(self, now: float) -> int | None:
        """Start the router once every API server answers, restart it when its step ends, fail after 5 starts in a
        row that never became healthy (the bare-metal router's rules)."""
        from widep.run.bare_metal import ROUTER_MAX_FAILED_STARTS
        from widep.run.control import probe

        assert self.router is not None
        if now < self.router_next:
            return None
        self.router_next = now + self.launch.request.probe_interval_s
        step = self.steps.get("router")
        (door,) = self.endpoints(self.router)
        if step is not None:
            code = step.proc.poll()
            if code is None:
                if not self.router_healthy and probe(door.host, door.port)[0] == "healthy":
                    self.router_healthy, self.router_failed_starts = True, 0
                    self.console.print(
                        f"\\[router] ready: http://{door.host}:{door.port} on {self.hosts[door.process.node]}",
                        highlight=False,
                    )
                return None
            self.router_failed_starts = 0 if self.router_healthy else self.router_failed_starts + 1
            self.router_healthy = False
            last = "\n    ".join(_tail(self._log(door.process, step.attempt), 10))
            self.steps.pop("router")
            if self.router_failed_starts >= ROUTER_MAX_FAILED_STARTS:
                self.console.print(
                    f"[bold red]\\[router] failed {self.router_failed_starts} starts in a row[/]:\n    {last}",
                    highlight=False,
                )
                return 1
            self.console.print(
                f"\\[router] step ended ({_exit_words(code)}); restarting it\n    {last}", highlight=False
            )
            return None
        fronted = [e for g in self.launch.groups for e in self.endpoints(g) if e.process.port]
        if all(probe(e.host, e.port, timeout=2.0)[0] == "healthy" for e in fronted):
            self.start(self.router, self.router_starts)
            self.router_starts += 1
            self.console.print(
                f"\\[router] started on {self.hosts[door.process.node]} port {door.port}", highlight=False
            )
        return None

    def ready(self) -> bool:
        return self.router is None or self.router_healthy

    def drain(self) -> None:
        if self.router is not None:
            self.stop(self.router)
            self.router_healthy = False

    def front_door(self) -> Endpoint:
        if self.router is not None:
            return self.endpoints(self.router)[0]
        return super().front_door()

    def publish(self, group: Group, status: GroupStatus) -> None:
        d = self.launch.run_dir / "groups"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{group.label}.json").write_text(json.dumps({"group": group.label, "job": self.job} | status.as_dict()))

    def shutdown(self) -> None:
        for label in list(self.steps):
            g = next((g for g in (*self.launch.groups, self.router) if g is not None and g.label == label), None)
            if g is not None:
                self.stop(g)
        if self.job and self.submitted:
            self.slurm.cancel(self.job)
            end = time.monotonic() + 60
            while (
                self.slurm.job(self.job).get("JobState", "GONE") in ("RUNNING", "PENDING", "COMPLETING", "CONFIGURING")
                and time.monotonic() < end
            ):
                time.sleep(0.5)
            self.console.print(f"\\[slurm] job {self.job} cancelled")
            self.submitted = False


INSIDE_ENV = "WIDEP_SLURM_INSIDE"
"""Set by the --detach batch script: the supervisor runs in this allocation and submits nothing."""


def bind_addresses(launch: Launch, addresses: dict[int, str]) -> Launch:
    """The launch with every process reached at its allocation host's address (rank/node/GPU unchanged)."""

    def at(c: ProcessCommand, leader: int) -> ProcessCommand:
        return c.at(node_address=addresses[c.node], leader_address=addresses[leader])

    groups = tuple(replace(g, processes=tuple(at(c, g.leader_node) for c in g.processes)) for g in launch.groups)
    procs = tuple(c for g in groups for c in g.processes)
    return replace(launch, processes=procs, groups=groups)


def plan_at(plan: DeploymentPlan, addresses: dict[int, str]) -> DeploymentPlan:
    """The plan with node i reached at ``addresses[i]`` (what the router's worker URLs are rendered from)."""
    return replace(plan, nodes=tuple(n.model_copy(update={"address": addresses[i]}) for i, n in enumerate(plan.nodes)))


def log_root(launch: Launch, c: ProcessCommand) -> Path:
    """Where a process's ``attempt-<k>/<role>/rank-<n>/`` lives: the run directory, or ``replica-<g>/`` in it when
    its role has several replicas (each numbers its DP ranks from 0, and every node writes to the same folder)."""
    rp = next((r for r in launch.plan.roles if r.name == c.role), None)
    return launch.run_dir / f"replica-{c.replica}" if rp is not None and rp.spec.replicas > 1 else launch.run_dir


def step_spec(launch: Launch, group: Group, attempt: int, hosts: dict[int, str]) -> dict:
    """What the node agents of one step read: each host's processes, argv and environment (secrets by name)."""
    return {
        "run_id": launch.run_id,
        "run_dir": str(launch.run_dir),
        "attempt": attempt,
        "group": group.label,
        "grace_s": launch.request.stop_timeout_s,
        "processes": [
            {
                "host": hosts[c.node],
                "run_dir": str(log_root(launch, c)),
                "role": c.role,
                "replica": c.replica,
                "dp_rank": c.dp_rank,
                "dp_ranks": list(c.dp_ranks),
                "node": c.node,
                "node_name": c.node_name,
                "local_rank": c.local_rank,
                "port": c.port,
                "health_port": c.health_port,
                "headless": c.headless,
                "argv": list(c.argv),
                "env": [[k, {"ref": v.name, "what": v.what} if isinstance(v, EnvRef) else v] for k, v in c.env],
            }
            for c in group.processes
        ],
    }


def _tail(path: Path, n: int = 20) -> tuple[str, ...]:
    from widep.run.procs import tail

    return tail(path, n)


def _exit_words(code: int) -> str:
    from widep.run.procs import signal_name

    return signal_name(code)


def submit_detached(launch: Launch, console: Console, slurm: Slurm | None = None) -> int:
    """``--detach``: submit a batch script that runs the supervisor inside the allocation; return at once."""
    s = slurm or Slurm()
    opts = launch.request.slurm or SlurmOptions()
    part = check_fit(launch.plan, opts, s.partitions())
    launch.run_dir.mkdir(parents=True, exist_ok=True)
    script = launch.run_dir / "widep.sbatch"
    python = launch.request.python or sys.executable
    script.write_text(sbatch_script(launch.plan, opts, str(launch.run_dir), detach_command(launch, opts, python)))
    job = s.submit(script)
    console.print(
        f"\\[slurm] submitted job {job} ({plan_nodes(launch.plan)} node(s), partition {part.name}); the "
        f"supervisor runs inside it. Output: {launch.run_dir}/slurm-{job}.out",
        highlight=False,
    )
    console.print(
        f"  readiness: widep status {launch.request.topology} --slurm-job {job}    stop: scancel {job}", highlight=False
    )
    return 0


def job_view(job: str, slurm: Slurm | None = None) -> tuple[list[str], dict[int, str], Path | None]:
    """A running job's hosts (allocation order), their addresses, and the run directory (its output's folder)."""
    s = slurm or Slurm()
    info = s.job(job)
    if not info:
        raise UserError(f"--slurm-job: Slurm does not know job {job} (finished a while ago, or a typo). Given: {job}.")
    if info.get("JobState") != "RUNNING":
        raise UserError(
            f"--slurm-job: job {job} is {info.get('JobState', '?')}, not running; its hosts are not known.", exit_code=1
        )
    hosts = s.hostnames(info["NodeList"])
    out = info.get("StdOut")
    return hosts, {i: s.node_address(h) for i, h in enumerate(hosts)}, Path(out).parent if out else None


def create_backend(console: Console, options: SlurmOptions | None = None) -> SlurmBackend:
    return SlurmBackend(console, options)


# --------------------------------------------------------------------------------------------- node agent
_stop = False


def _on_signal(signum: int, frame: object) -> None:
    global _stop
    _stop = True


def node_agent(step_file: str, host: str | None = None) -> int:
    """One task of a step: start this host's processes through the guard; when one exits, record the failure with
    its last log lines, stop the others and exit 1; on SIGTERM stop them all and exit 0."""
    from widep.run.procs import (
        kill_ranks,
        resolve_env,
        root_cause,
        signal_name,
        start_rank,
        stop_ranks,
        tail,
        tear_down_together,
    )

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    spec = json.loads(Path(step_file).read_text())
    host = host or os.environ.get("SLURMD_NODENAME") or ""
    attempt, grace = int(spec["attempt"]), float(spec["grace_s"])
    cmds, roots = [], []
    for p in spec["processes"]:
        if p["host"] != host:
            continue
        env = tuple((k, EnvRef(v["ref"], v["what"]) if isinstance(v, dict) else v) for k, v in p["env"])
        cmds.append(
            ProcessCommand(
                p["role"],
                p["replica"],
                p["dp_rank"],
                tuple(p["dp_ranks"]),
                p["node"],
                p["node_name"],
                p["local_rank"],
                p["port"],
                p["health_port"],
                p["headless"],
                template=tuple(p["argv"]),
                env_template=env,
            )
        )
        roots.append(Path(p["run_dir"]))
    if not cmds:
        print(f"widep node agent: no process of {spec['group']} runs on {host!r}", file=sys.stderr)
        return 2
    try:
        envs = [resolve_env(c, dict(os.environ)) for c in cmds]
    except UserError as err:
        print(f"widep node agent on {host}: {err}", file=sys.stderr)
        return 2
    procs = tear_down_together(
        [start_rank(c, root, attempt, e, spec["run_id"], grace) for c, root, e in zip(cmds, roots, envs, strict=True)]
    )
    print(f"[{host}] attempt {attempt}: started {', '.join(c.name for c in cmds)}", flush=True)
    code = 0
    while not _stop:
        p = root_cause(procs)
        if p is not None:
            fail = {
                "rank": p.name,
                "node": host,
                "reason": signal_name(p.poll() or 0),
                "wall": time.time(),
                "log_tail": list(tail(p.log)),
            }
            out = Path(step_file).parent / f"failure-{host}.json"
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(fail))
            tmp.rename(out)
            print(f"[{host}] {p.name} {fail['reason']}; stopping the other ranks here", flush=True)
            code = 1
            break
        time.sleep(0.2)
    if code:  # a rank died: its group restarts anyway, and the engine core ignores SIGTERM
        kill_ranks(procs)
    else:
        stop_ranks(procs, grace)
    return code


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "node":
        sys.exit(node_agent(sys.argv[2]))
    print("usage: python -m widep.run.slurm node STEP.json (run by srun in a widep Slurm job)", file=sys.stderr)
    sys.exit(2)
