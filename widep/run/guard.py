"""A rank's guardian: ``python -m widep.run.guard --grace S -- CMD ...``.

The launcher starts each rank through this small process, as the leader of a new session and process
group. It starts CMD in that group and makes sure nothing of the rank outlives it:

- if the launcher dies, even by SIGKILL, the kernel sends the guard SIGTERM (PR_SET_PDEATHSIG);
- on SIGTERM/SIGINT it sends SIGTERM to every process of its group (vLLM's API server and its engine
  core / worker processes), waits up to ``--grace`` seconds, then SIGKILLs what is left;
- when CMD exits by itself, the rest of the group (orphaned engine processes) is SIGKILLed at once;
- when the launcher died, the grace is at most 1 s (starting API servers ignore SIGTERM).

Its exit status is CMD's: the code it exited with, or 128 + the signal that killed it; 86 when vLLM's engine core
(``VLLM::EngineCore*``) died while CMD still ran (the rank is SIGKILLed at once).
The signal handler only sets a flag.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
ORPHAN_GRACE_S = 0.0
"""CMD exited: what is left of its group is SIGKILLed at once (vLLM's engine core ignores SIGTERM)."""
ORPHANED_GRACE_S = 1.0
"""The launcher died (even by SIGKILL): the rank gets this long, not the full grace (starting API servers
ignore SIGTERM), so nothing of it holds a port 2 s later."""
_stop = False


def _on_signal(signum: int, frame: object) -> None:
    global _stop
    _stop = True


def group_members(pgid: int) -> list[int]:
    """PIDs of the processes in process group ``pgid`` (from /proc), excluding this process."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            # fields after the ')' of comm: state ppid pgrp ...
            rest = stat[stat.rindex(")") + 2 :].split()
            if int(rest[2]) == pgid and rest[0] != "Z":
                out.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    return out


def stop_group(pgid: int, grace: float) -> None:
    """SIGTERM every member of the group, wait up to ``grace`` s, SIGKILL the rest."""
    for pid in group_members(pgid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap()
        if not group_members(pgid):
            return
        time.sleep(0.1)
    for pid in group_members(pgid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + 5
    while group_members(pgid) and time.monotonic() < end:
        _reap()
        time.sleep(0.05)


ENGINE_TITLE = b"VLLM::EngineCore"
"""vLLM names its engine core processes so (setproctitle): ``VLLM::EngineCore_DP1``."""
DEATH_MARK = "widep guard: the rank ended at monotonic "
"""Last log line of a rank that ended by itself: when, on the host's monotonic clock (ranks of one host compare)."""
ENGINE_LOST = 86
"""The guard's exit status when the rank's engine core died while its API server still ran."""


def engine_cores(pgid: int) -> set[int]:
    """PIDs of the group's vLLM engine core processes (by process title)."""
    out = set()
    for pid in group_members(pgid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(ENGINE_TITLE):
                    out.add(pid)
        except OSError:
            continue
    return out


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str]) -> int:
    grace = 30.0
    if "--" not in argv:
        print("usage: python -m widep.run.guard [--grace S] -- CMD ...", file=sys.stderr)
        return 2
    sep = argv.index("--")
    opts, cmd = argv[:sep], argv[sep + 1 :]
    if "--grace" in opts:
        grace = float(opts[opts.index("--grace") + 1])
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    if os.getppid() != parent:  # the launcher died before prctl took effect
        return 143
    pgid = os.getpgid(0)
    try:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    except OSError as err:
        print(f"widep guard: cannot start {cmd[0]!r}: {err}", file=sys.stderr)
        return 127
    code: int | None = None
    engines: set[int] = set()
    while code is None:
        if not _stop:
            # the engine core died under a live API server: the rank is dead (vLLM's API server takes seconds to
            # notice and may exit 0); stop it at once and say so
            now = engine_cores(pgid)
            lost = engines - now
            engines |= now
            if lost and not _stop:
                print(
                    f"widep guard: the engine core (pid {', '.join(map(str, sorted(lost)))}) of this rank died "
                    "while its API server ran; killing the rank",
                    file=sys.stderr,
                    flush=True,
                )
                died = time.monotonic()
                stop_group(pgid, 0.0)
                print(f"{DEATH_MARK}{died:.3f}", file=sys.stderr, flush=True)
                return ENGINE_LOST
        if _stop:
            stop_group(pgid, min(grace, ORPHANED_GRACE_S) if os.getppid() != parent else grace)
            code = child.poll()
            if code is None:
                code = -signal.SIGKILL
            break
        try:
            code = child.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            continue
    # CMD is gone: what is left of its group (vLLM's engine core and workers) is orphaned and serves
    # nothing (and the engine core ignores SIGTERM), so it is SIGKILLed at once.
    died = time.monotonic()
    stop_group(pgid, min(grace, ORPHAN_GRACE_S))
    if not _stop:
        print(f"{DEATH_MARK}{died:.3f}", file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
