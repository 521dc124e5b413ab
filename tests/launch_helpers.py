"""Helpers for launcher tests: real `widep launch` processes, their output, and leftover-process checks."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from widep.run.chaos import api_server_pids, wait_gone
from widep.run.chaos import run_processes as processes_of_run

__all__ = ["ROOT", "LaunchProc", "api_server_pids", "free_ports", "processes_of_run", "topology_copy", "wait_gone"]

ROOT = Path(__file__).parents[1]


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int) -> list[int]:
    """``n`` ports free to listen on, below the kernel's ephemeral range and never handed out twice in a run.

    Not ports the kernel picks for ``bind(0)``: those come from the ephemeral range, which outgoing connections
    also draw from, so by the time a server listens on one, a long-lived connection of another process (vLLM's
    ZMQ and gloo sockets) may hold it as its local port ("Address already in use", seen in a CI rehearsal: the
    router's metrics port). Each port is checked by binding it on every interface; 64 ports above each one are
    left for servers that listen on port + rank.
    """
    import random

    hi = max(_ephemeral_low() - 64, 20_064)
    out: list[int] = []
    rng = random.SystemRandom()
    while len(out) < n:
        port = rng.randrange(20_000, hi)
        if port in _HANDED_OUT or port in out:
            continue
        s = socket.socket()
        try:
            s.bind(("", port))
        except OSError:
            continue
        finally:
            s.close()
        out.append(port)
    _HANDED_OUT.update(out)
    return out


def topology_copy(name: str, tmp: Path, **serving: int) -> Path:
    """A curated topology with fresh ports (tests must not collide with anything on the machine)."""
    doc = yaml.safe_load((ROOT / "topologies" / name).read_text())
    port, rpc, control = free_ports(3)
    doc["serving"].update({"port": port, "rpc_port": rpc, "control_port": control} | serving)
    path = tmp / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def pd_topology_copy(name: str, tmp: Path, **vllm: object) -> Path:
    """A curated P/D topology (prefill role first, decode second, with the router) with fresh ports for every role's
    HTTP, handshake and NIXL side channel, the control port and the router; ``vllm`` overrides keys of ``vllm``."""
    doc = yaml.safe_load((ROOT / "topologies" / name).read_text())
    p_http, d_http, p_rpc, d_rpc, control, p_side, d_side, rport, prom = free_ports(9)
    doc["roles"][0].update({"port": p_http, "rpc_port": p_rpc, "nixl_side_channel_port": p_side})
    doc["roles"][1].update({"port": d_http, "rpc_port": d_rpc, "nixl_side_channel_port": d_side})
    doc["serving"].update({"port": p_http, "rpc_port": p_rpc, "control_port": control})
    doc["router"].update({"port": rport, "prometheus_port": prom})
    doc["vllm"].update(vllm)
    path = tmp / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class LaunchProc:
    """A `widep launch` subprocess whose output is read line by line in a thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        e = dict(os.environ)
        e.update(env or {})
        e["COLUMNS"] = "200"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "widep", "launch", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=e,
            start_new_session=True,
        )
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> str:
        """Block until ``pattern`` has appeared ``count`` times in the output; return the last match line."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            hits = [line for line in self.lines if rx.search(line)]
            if len(hits) >= count:
                return hits[count - 1]
            if self.proc.poll() is not None and not self.t.is_alive():  # exited and its output fully read
                hits = [line for line in self.lines if rx.search(line)]
                if len(hits) >= count:
                    return hits[count - 1]
                raise AssertionError(f"launcher exited ({self.proc.returncode}) before {pattern!r}:\n" + self.output())
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} after {timeout} s:\n" + self.output())

    def output(self) -> str:
        return "\n".join(self.lines[-80:])

    def run_id(self) -> str:
        line = self.wait_for(r"run [0-9a-f]{12}", 5)
        return re.search(r"run ([0-9a-f]{12})", line).group(1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()
