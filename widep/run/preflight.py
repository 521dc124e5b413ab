"""Checks made before anything starts: node identity, ports, GPUs, the vLLM entry point, the model.

Each failure is one clear UserError; the launcher starts nothing until every check passes.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from widep.errors import UserError
from widep.plan.core import DeploymentPlan
from widep.render.vllm import RankCommand


def local_identities() -> set[str]:
    """Host names and IP addresses of this machine."""
    names = {socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1"}
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            names.add(str(info[4][0]))
    except OSError:
        pass
    return names


def resolve_node(plan: DeploymentPlan, node: int | None) -> int:
    """--node, or the node whose name/address is this machine; UserError if none or several match."""
    n = len(plan.nodes)
    if node is not None:
        if not 0 <= node < n:
            raise UserError(f"--node: {node} is not a node of {plan.name}. Valid: 0..{n - 1} ({', '.join(x.name for x in plan.nodes)}).")
        return node
    if n == 1:
        return 0
    me = local_identities()
    matches = [i for i, x in enumerate(plan.nodes) if x.name in me or (x.address and x.address in me)]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(f"{i}={x.name}({x.address or '-'})" for i, x in enumerate(plan.nodes))
    if not matches:
        raise UserError(f"cannot tell which node of {plan.name} this machine ({socket.gethostname()}) is. "
                        f"Nodes: {listed}. Give --node N.")
    raise UserError(f"this machine matches several nodes of {plan.name} ({[plan.nodes[i].name for i in matches]}). Give --node N.")


def port_free(host: str, port: int) -> str | None:
    """None if ``port`` can be bound on ``host``, else the reason."""
    bind_host = "" if host in ("0.0.0.0", "") else host
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind_host, port))
        except OSError as err:
            return err.strerror or str(err)
    return None


def required_ports(plan: DeploymentPlan, cmds: list[RankCommand], node: int) -> list[tuple[str, int, str]]:
    """(bind host, port, what) that must be free on this node before its ranks start."""
    out: list[tuple[str, int, str]] = []
    for c in cmds:
        host = _bind_host(c)
        if c.port is not None:
            out.append((host, c.port, f"{c.name} HTTP"))
        if c.health_port and c.health_port != c.port:
            out.append((host, c.health_port, f"{c.name} supervisor"))
    for rp in plan.roles:
        for g, group in enumerate(rp.group_nodes):
            if group[0] == node:
                host = _bind_host(cmds[0]) if cmds else "0.0.0.0"
                out.append((host, rp.rpc_port, f"{rp.name} DP handshake (rpc_port)"))
                out.append((host, rp.control_port, f"{rp.name} widep group control"))
    return out


def _bind_host(c: RankCommand) -> str:
    a = list(c.argv)
    return a[a.index("--host") + 1] if "--host" in a else "0.0.0.0"


def check_ports(plan: DeploymentPlan, cmds: list[RankCommand], node: int) -> None:
    problems = []
    for host, port, what in required_ports(plan, cmds, node):
        why = port_free(host, port)
        if why:
            problems.append(f"port {port} on {host} ({what}) is not free: {why}")
    if problems:
        raise UserError("refusing to start, nothing was started:\n  " + "\n  ".join(problems)
                        + "\n  Stop what holds the port(s), or change serving.port / roles[].port / rpc_port in the topology.")


def visible_gpus() -> int | None:
    """Number of NVIDIA GPUs nvidia-smi lists, or None when nvidia-smi is absent."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def check_devices(plan: DeploymentPlan, cmds: list[RankCommand]) -> None:
    if plan.device == "cpu":
        need = sum(len(c.dp_ranks) for c in cmds)
        have = os.cpu_count() or 1
        if need > have:
            raise UserError(f"this node needs {need} CPU slot(s) for its ranks but has {have} core(s). Nothing was started.")
        return
    need = 1 + max((int(g) for c in cmds for k, v in c.env if k == "CUDA_VISIBLE_DEVICES" for g in str(v).split(",")), default=-1)
    have = visible_gpus()
    if have is None:
        raise UserError(f"nvidia-smi not found: this node shows no NVIDIA GPUs, and its ranks need GPUs 0..{need - 1}. "
                        "Nothing was started. (Run `widep doctor` for a full preflight.)")
    if have < need:
        raise UserError(f"this node's ranks need GPUs 0..{need - 1} but nvidia-smi lists {have}. Nothing was started.")


def check_entry_point(cmds: list[RankCommand]) -> None:
    if not cmds:
        return
    argv = cmds[0].argv
    if argv[0] == "vllm":
        if not shutil.which("vllm"):
            raise UserError("the `vllm` command is not on PATH (vllm.entry_point: serve). Install vLLM, or set "
                            "vllm.entry_point: module and vllm.python to an interpreter that has it. Nothing was started.")
        return
    py = argv[0]
    exe = shutil.which(py) or (py if os.path.exists(py) else None)
    if not exe:
        raise UserError(f"vllm.python: interpreter {py!r} not found. Nothing was started.")
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    r = subprocess.run([exe, "-c", probe], capture_output=True, timeout=60)
    if r.returncode != 0:
        raise UserError(f"vllm.python: {exe} cannot import vllm (the entry point `{' '.join(argv[:3])}`). "
                        "Install vLLM there or point vllm.python / --python at one that has it. Nothing was started.")


def check_model(model: str) -> None:
    looks_local = model.startswith(("/", "./", "../", "~")) or os.path.exists(model)
    if not looks_local:
        return  # a hub id: vLLM downloads it (or finds it in the HF cache)
    p = Path(model).expanduser()
    if not (p / "config.json").is_file():
        raise UserError(f"model: {model!r} is not a model directory (no config.json there). Nothing was started.")


def preflight(plan: DeploymentPlan, cmds: list[RankCommand], node: int, model: str) -> None:
    check_model(model)
    check_devices(plan, cmds)
    check_entry_point(cmds)
    check_ports(plan, cmds, node)
