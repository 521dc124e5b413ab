"""A real Slurm cluster on this one host, for tests: munged, slurmctld and one slurmd per node.

Debian's Slurm 22.05 (``slurmctld``, ``slurmd``, ``slurm-client``, ``munge``; ``.ci/run`` installs them) runs
several node daemons on one host: each ``slurmd -N nK`` serves node ``nK`` on its own port, and every node has
its own loopback address (``NodeAddr=127.0.0.K+1``), so a multi-node plan gets one address per node as on a real
cluster. Everything listens on, and talks to, loopback only. The daemons run in the foreground (``-D``/``-F``) as
children of the test process, with their config, keys, state and logs in one temporary directory; ``stop()``
cancels every job, then stops slurmd, slurmctld and munged in that order.

Needs root (slurmd starts jobs as their user; the tests submit as root).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from launch_helpers import free_ports

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
PARTITION = "debug"


def missing() -> str | None:
    """Why a local cluster cannot run here (None when it can)."""
    absent = [b for b in BINARIES if not shutil.which(b) and not Path(f"/usr/sbin/{b}").exists()]
    if absent:
        return (
            f"Slurm/munge binaries missing: {', '.join(absent)} (apt-get install slurmctld slurmd slurm-client munge)"
        )
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd runs jobs as their owner)"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class SlurmCluster:
    """``nodes`` node daemons on this host in partition ``debug``; ``env`` points clients at it."""

    nodes: int = 2
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    root: Path = field(init=False)
    env: dict[str, str] = field(init=False)
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list, init=False)

    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(self.nodes)]

    def node_address(self, i: int) -> str:
        return f"127.0.0.{i + 1}"

    def _conf(self, ctld_port: int, node_ports: list[int]) -> str:
        r = self.root
        host = socket.gethostname()
        lines = [
            "ClusterName=widep-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={node_ports[0]}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/socket",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            f"PlugStackConfig={r}/plugstack.conf",
            "ProctrackType=proctrack/linuxproc",  # no cgroups in a container; linuxproc follows the process tree
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "ReturnToService=2",
            "KillWait=5",  # scancel: SIGTERM, then SIGKILL after 5 s (default 30)
            "InactiveLimit=0",
            "MinJobAge=300",
        ]
        for i, (name, port) in enumerate(zip(self.node_names(), node_ports, strict=True)):
            lines.append(
                f"NodeName={name} NodeHostname={host} NodeAddr={self.node_address(i)} Port={port} "
                f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN"
            )
        lines.append(f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        why = missing()
        if why:
            raise RuntimeError(why)
        # munged wants every directory on its socket's path searchable by all (pytest's tmp dirs are 0700)
        self.root = Path(tempfile.mkdtemp(prefix="widep-slurm-", dir="/tmp"))
        self.root.chmod(0o755)
        (self.root / "munge").mkdir(mode=0o755)
        (self.root / "state").mkdir()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (self.root / "plugstack.conf").write_text("")
        ctld_port, *node_ports = free_ports(1 + self.nodes)
        conf = self.root / "slurm.conf"
        conf.write_text(self._conf(ctld_port, node_ports))
        self.env = {"SLURM_CONF": str(conf)}
        env = dict(os.environ) | self.env
        m = self.root / "munge"
        self._spawn(
            "munged",
            [
                _exe("munged"),
                "-F",
                f"--key-file={key}",
                f"--socket={m}/socket",
                f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log",
                f"--seed-file={m}/seed",
            ],
            env,
        )
        self._wait(lambda: (m / "socket").exists(), timeout, "munged socket")
        self._spawn("slurmctld", [_exe("slurmctld"), "-D", "-f", str(conf)], env)
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout, "slurmctld ping")
        for name in self.node_names():
            self._spawn(f"slurmd {name}", [_exe("slurmd"), "-D", "-N", name, "-f", str(conf)], env)
        self._wait(self._all_idle, timeout, f"{self.nodes} idle node(s) in sinfo")
        return self

    def _all_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
        states = [line.split()[1] for line in out if line.strip()]
        return len(states) == self.nodes and all(s == "idle" for s in states)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with open(self.root / f"{name.replace(' ', '-')}.out", "wb") as log:  # the child keeps its own descriptor
            self.procs.append(
                (
                    name,
                    subprocess.Popen(
                        argv,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    ),
                )
            )

    def _wait(self, ok: Callable[[], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}) while waiting for {what}:\n{self.logs()}")
            if ok():
                return
            time.sleep(0.3)
        raise RuntimeError(f"no {what} after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            lines = f.read_text(errors="replace").splitlines()[-15:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        p = subprocess.run(
            list(argv), check=False, capture_output=True, text=True, env=dict(os.environ) | self.env, timeout=timeout
        )
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} -> {p.returncode}: {p.stderr}")
        return p

    def jobs(self) -> list[str]:
        return [j for j in self.run("squeue", "-h", "-o", "%i", check=False).stdout.split() if j]

    def stop(self) -> None:
        if self.procs and self.jobs():
            self.run("scancel", "--full", *self.jobs(), check=False)
            end = time.monotonic() + 30
            while self.jobs() and time.monotonic() < end:
                time.sleep(0.5)
        for _name, p in reversed(self.procs):  # node daemons, then the controller, then munged
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
