"""Local rank processes: start through the guard, logs on disk, stop with SIGTERM -> deadline -> SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from widep.errors import UserError
from widep.render.vllm import EnvRef, ProcessCommand

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


def tail(path: Path, n: int = 20) -> tuple[str, ...]:
    try:
        with open(path, errors="replace") as f:
            return tuple(line.rstrip("\n") for line in deque(f, maxlen=n))
    except OSError:
        return ()


@dataclass
class RankProcess:
    """One started rank (its guard process and what it runs)."""

    cmd: ProcessCommand
    log: Path
    proc: subprocess.Popen
    started: float
    pos: int = 0
    exit_code: int | None = field(default=None)

    @property
    def name(self) -> str:
        return self.cmd.name

    def poll(self) -> int | None:
        if self.exit_code is None:
            self.exit_code = self.proc.poll()
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


def stop_ranks(ranks: list[RankProcess], grace_s: float) -> None:
    """SIGTERM every rank's guard (which stops its whole group), wait on one shared deadline, then SIGKILL."""
    for r in ranks:
        if r.poll() is None:
            try:
                os.kill(r.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s + 5
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
