"""Local rank processes: start through the guard, logs on disk, stop with SIGTERM -> deadline -> SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from widep.errors import UserError
from widep.render.vllm import EnvRef, ProcessCommand
from widep.run.guard import DEATH_MARK, ENGINE_LOST, boost, group_members

RUN_ID_ENV = "WIDEP_RUN_ID"
"""Every process widep starts carries this variable, so tests (and `ps e`) can find them."""


def resolve_env(cmd: ProcessCommand, base: dict[str, str]) -> dict[str, str]:
    """The rank's full environment: the launcher's, plus the rank's; secrets resolved from the launcher's."""
    env = dict(base)
    for k, v in cmd.env:
        if isinstance(v, EnvRef):
            if v.name not in base:
                raise UserError(
                    f"{k}: the topology passes it by reference from ${v.name}, which is not set here.", exit_code=2
                )
            env[k] = base[v.name]
        else:
            env[k] = v
    return env


def signal_name(code: int) -> str:
    if code == ENGINE_LOST:
        return "its engine core died (the API server still ran)"
    if code > 128:
        try:
            return f"killed by {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with code {code}"


def death_severity(code: int) -> int:
    """0 for a death by signal or of the engine core (the root cause of a group's fall), 1 for a failing exit,
    2 for a clean exit (a survivor whose engine returned after its peer died)."""
    if code < 0 or code > 128 or code == ENGINE_LOST:
        return 0
    return 1 if code else 2


def died_at(r: RankProcess) -> float:
    """When the rank ended, on this host's monotonic clock: the guard's own record, else when it was seen."""
    for line in reversed(tail(r.log, 5, marks=True)):
        if line.startswith(DEATH_MARK):
            try:
                return float(line[len(DEATH_MARK) :])
            except ValueError:
                break
    return r.exit_seen or 0.0


def root_cause(ranks: list[RankProcess]) -> RankProcess | None:
    """Of the ranks that exited, the one that brought the group down: a death by signal (or of its engine core)
    before a failing exit before a clean one (a survivor's engine returns cleanly when its DP peer was killed, and
    may be seen first), the earliest to die within a kind (by the guards' clock); a rank widep itself tore down
    because a peer died (:func:`tear_down_together`) last."""
    dead = [r for r in ranks if r.poll() is not None]
    return min(dead, key=lambda r: (r.torn_down, death_severity(r.exit_code or 0), died_at(r)), default=None)


def tail(path: Path, n: int = 20, *, marks: bool = False) -> tuple[str, ...]:
    """The last ``n`` lines of a rank's log; the guard's own death mark (``DEATH_MARK``, for :func:`died_at`) is
    left out unless ``marks``: people are shown what the rank printed."""
    try:
        with open(path, errors="replace") as f:
            kept = deque((line for line in f if marks or not line.startswith(DEATH_MARK)), maxlen=n)
    except OSError:
        return ()
    return tuple(line.rstrip("\n") for line in kept)


@dataclass
class RankProcess:
    """One started rank (its guard process and what it runs)."""

    cmd: ProcessCommand
    log: Path
    proc: subprocess.Popen
    started: float
    pos: int = 0
    exit_code: int | None = field(default=None)
    exit_seen: float | None = field(default=None)
    """Monotonic time the exit was first seen."""
    torn_down: bool = False
    """SIGKILLed by widep because another rank of its group died (not a root cause)."""

    teardown: Teardown | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.cmd.name

    def disarm(self) -> None:
        """This rank's group ends on purpose now: no :class:`Teardown` of its peers when it exits."""
        if self.teardown is not None:
            self.teardown.disarm()

    def poll(self) -> int | None:
        if self.exit_code is None:
            self.exit_code = self.proc.poll()
            if self.exit_code is not None:
                self.exit_seen = time.monotonic()
        return self.exit_code

    def new_lines(self) -> list[str]:
        """Log lines written since the last call (for --follow)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return []
        cut = data.rfind(b"\n")
        if cut < 0:
            return []
        self.pos += cut + 1
        return [line.replace("\r", "") for line in data[: cut + 1].decode(errors="replace").splitlines()]


def start_rank(
    cmd: ProcessCommand, run_dir: Path, attempt: int, env: dict[str, str], run_id: str, grace_s: float
) -> RankProcess:
    """Start one rank through the guard, in its own session; logs under <run>/attempt-<k>/<role>/rank-<n>/."""
    d = run_dir / f"attempt-{attempt}" / cmd.role / f"rank-{cmd.dp_rank}"
    d.mkdir(parents=True, exist_ok=True)
    log = d / "vllm.log"
    (d / "command.sh").write_text(cmd.shell() + "\n")
    full_env = dict(env)
    full_env[RUN_ID_ENV] = run_id
    full_env["PYTHONUNBUFFERED"] = "1"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "widep.run.guard", "--grace", str(grace_s), "--", *cmd.argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    return RankProcess(cmd=cmd, log=log, proc=proc, started=time.monotonic())


def _dead(pid: int) -> bool:
    """The process is gone or a zombie (it has exited; only its parent's wait is left)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b") ", 1)[-1][:1] == b"Z"
    except OSError:
        return True


def kill_ranks(ranks: list[RankProcess], wait_s: float = 5.0) -> None:
    """SIGKILL every rank's whole process group (guard, API server, engine core, workers) at once, reap the
    guards and wait (up to ``wait_s``) until no process of those groups is left: after a rank died its group
    restarts anyway, and vLLM's engine core ignores SIGTERM."""
    for r in ranks:
        r.disarm()
        boost(r.proc.pid, os.PRIO_PGRP)
        try:
            os.killpg(r.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for r in ranks:
        r.proc.wait()
        r.poll()
    end = time.monotonic() + wait_s
    while any(group_members(r.proc.pid) for r in ranks) and time.monotonic() < end:
        time.sleep(0.02)


class Teardown:
    """The group policy on one host, as it happens: a thread per rank waits on its guard (which exits the moment
    its API server or engine core dies, :mod:`widep.run.guard`), and the first rank to end SIGKILLs every other
    rank of the group on this host at once, without waiting for the supervisor's next poll. Bare metal, the Ray
    node agents and the Slurm node agents start their ranks with it: one policy for every backend. ``disarm``
    before a graceful stop (the ranks then end on purpose)."""

    def __init__(self, ranks: list[RankProcess]) -> None:
        self.ranks = ranks
        self.lock = threading.Lock()
        self.fired: RankProcess | None = None
        self.fired_at: float | None = None
        self.armed = True
        for r in ranks:
            r.teardown = self
            threading.Thread(target=self._wait, args=(r,), daemon=True, name=f"widep-teardown-{r.name}").start()

    def disarm(self) -> None:
        with self.lock:
            self.armed = False

    def _wait(self, rank: RankProcess) -> None:
        try:  # this thread only (it sleeps until the rank dies, then must act before anything else)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -20)
        except OSError:
            pass
        rank.proc.wait()
        with self.lock:
            if not self.armed:
                return
            self.armed = False
            self.fired, self.fired_at = rank, time.monotonic()
            for r in self.ranks:
                if r is not rank and not _dead(r.proc.pid):
                    r.torn_down = True
                    boost(r.proc.pid, os.PRIO_PGRP)
                    try:
                        os.killpg(r.proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass


def tear_down_together(ranks: list[RankProcess]) -> list[RankProcess]:
    """Arm :class:`Teardown` over ``ranks`` (one DP group's ranks on this host); returns them."""
    Teardown(ranks)
    return ranks


def stop_ranks(ranks: list[RankProcess], grace_s: float, slack_s: float = 5.0) -> None:
    """SIGTERM every rank's guard (which stops its whole group), wait on one shared deadline (``grace_s`` +
    ``slack_s``), then SIGKILL."""
    for r in ranks:
        r.disarm()
    for r in ranks:
        if r.poll() is None:
            try:
                os.kill(r.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s + slack_s
    for r in ranks:
        left = deadline - time.monotonic()
        try:
            r.proc.wait(timeout=max(0.0, left))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(r.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            r.proc.wait()
        r.poll()
