"""A rank's guardian: ``python -m widep.run.guard --grace S -- CMD ...``.

The launcher starts each rank through this small process, as the leader of a new session and process
group. It starts CMD in that group and makes sure nothing of the rank outlives it:

- if the launcher dies, even by SIGKILL, the kernel sends the guard SIGTERM (PR_SET_PDEATHSIG);
- on SIGTERM/SIGINT it sends SIGTERM to every process of its group (vLLM's API server and its engine
  core / worker processes), waits up to ``--grace`` seconds, then SIGKILLs what is left;
- when CMD exits by itself, or vLLM's engine core dies under it, the rest of the group is SIGKILLed at once and the
  guard exits at once (it waits on pidfds: a death wakes it, no poll interval), so the launcher learns it in the same
  instant and tears the rest of the DP group down in parallel (:func:`widep.run.procs.tear_down_together`);
- when the launcher died, the grace is at most 1 s (starting API servers ignore SIGTERM).

Its exit status is CMD's: the code it exited with, or 128 + the signal that killed it; 86 when vLLM's engine core
(``VLLM::EngineCore*``) died while CMD still ran (the rank is SIGKILLed at once).
The signal handler only sets a flag.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
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
    # the guard itself (after CMD was forked: CMD keeps the normal priority) first in line for the CPU: it sleeps but
    # for a short scan a second, and when the rank dies its teardown must not queue behind busy processes
    try:
        os.setpriority(os.PRIO_PROCESS, os.getpid(), -20)
    except OSError:
        pass
    code = _watch(child, pgid)
    if code is None:  # stopped: SIGTERM, the grace, SIGKILL
        stop_group(pgid, min(grace, ORPHANED_GRACE_S) if os.getppid() != parent else grace)
        code = child.poll()
        return 128 + signal.SIGKILL if code is None else (128 - code if code < 0 else code)
    return code


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:  # gone already (or no pidfd here: then the scan below sees it)
        return None


def _watch(child: subprocess.Popen, pgid: int) -> int | None:
    """Wait on CMD and its engine cores (pidfds: a death wakes this at once, not at the next poll); on a death the
    rest of the group is SIGKILLed at once and the exit status returned; None when asked to stop."""
    fds: dict[int, int] = {}
    child_fd = _pidfd(child.pid)
    next_scan = 0.0
    try:
        while not _stop:
            now = time.monotonic()
            if now >= next_scan:  # vLLM starts its engine core seconds after the API server: look for new ones
                for pid in engine_cores(pgid) - set(fds):
                    fd = _pidfd(pid)
                    if fd is not None:
                        fds[pid] = fd
                next_scan = now + (1.0 if fds else 0.2)
            wait_on = [fd for fd in (child_fd, *fds.values()) if fd is not None]
            try:
                ready = set(select.select(wait_on, [], [], 0.2)[0])
            except InterruptedError:
                continue
            if _stop:
                return None
            code = child.poll()
            if code is not None:
                # CMD is gone: what is left of its group (vLLM's engine core and workers) is orphaned and serves
                # nothing (and the engine core ignores SIGTERM), so it is SIGKILLed at once.
                died = time.monotonic()
                kill_group(pgid)
                print(f"{DEATH_MARK}{died:.3f}", file=sys.stderr, flush=True)
                return 128 - code if code < 0 else code
            lost = sorted(pid for pid, fd in fds.items() if fd in ready)
            if lost:
                # the engine core died under a live API server: the rank is dead (vLLM's API server takes seconds
                # to notice and may exit 0); stop it at once and say so
                died = time.monotonic()
                kill_group(pgid)
                print(
                    f"widep guard: the engine core (pid {', '.join(map(str, lost))}) of this rank died "
                    "while its API server ran; killing the rank",
                    file=sys.stderr,
                    flush=True,
                )
                print(f"{DEATH_MARK}{died:.3f}", file=sys.stderr, flush=True)
                return ENGINE_LOST
        return None
    finally:
        for fd in (child_fd, *fds.values()):
            if fd is not None:
                os.close(fd)


def boost(pid: int, which: int = os.PRIO_PROCESS) -> None:
    """Give a process (every thread of it; or every thread of a process group) about to be SIGKILLed the highest
    CPU priority: each thread of a killed process runs its own exit (the last one frees GiBs of memory and closes
    the ports) and on a loaded machine would wait behind every busy process for that; nothing is changed where
    widep may not raise priorities. (Linux keeps a nice value per thread: PRIO_PROCESS sets one thread.)"""
    try:
        if which == os.PRIO_PGRP:
            os.setpriority(which, pid, -20)
            return
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), -20)
    except OSError:
        pass


def kill_group(pgid: int) -> None:
    """SIGKILL every other member of the group now, without waiting for them to go (whoever started the guard
    waits for the group: :func:`widep.run.procs.kill_ranks`); the guard's exit then tells it at once."""
    members = group_members(pgid)
    for pid in members:
        boost(pid)
    for pid in members:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
