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
from widep.render.vllm import ProcessCommand


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
            raise UserError(
                f"--node: {node} is not a node of {plan.name}. Valid: 0..{n - 1} "
                f"({', '.join(x.name for x in plan.nodes)})."
            )
        return node
    if n == 1:
        return 0
    me = local_identities()
    matches = [i for i, x in enumerate(plan.nodes) if x.name in me or (x.address and x.address in me)]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(f"{i}={x.name}({x.address or '-'})" for i, x in enumerate(plan.nodes))
    if not matches:
        raise UserError(
            f"cannot tell which node of {plan.name} this machine ({socket.gethostname()}) is. "
            f"Nodes: {listed}. Give --node N."
        )
    raise UserError(
        f"this machine matches several nodes of {plan.name} ({[plan.nodes[i].name for i in matches]}). Give --node N."
    )


def doctor_checks(plan: DeploymentPlan, node: int, model: str, python: str | None) -> None:
    """The doctor's checks for this node (GPUs, ports, vLLM, modules, RDMA, memlock, /dev/shm, disk);
    any failing one refuses the launch, listing each failure with what to do."""
    from dataclasses import replace

    from widep.doctor import check_host, requirements_from_plan, summarize

    req = requirements_from_plan(plan, node)
    if os.path.isdir(model):
        req = replace(req, model_path=model, model_bytes=None)
    results, _ = check_host(req, python=python)
    if summarize(results):
        bad = [r for r in results if r.status == "fail"]
        lines = [f"{r.name}: {r.detail}" + (f" -> {r.fix}" if r.fix else "") for r in bad]
        raise UserError(
            "refusing to start, nothing was started (preflight, see `widep doctor`):\n  " + "\n  ".join(lines)
        )


def check_entry_point(cmds: list[ProcessCommand]) -> None:
    if not cmds:
        return
    argv = cmds[0].argv
    if argv[0] == "vllm":
        if not shutil.which("vllm"):
            raise UserError(
                "the `vllm` command is not on PATH (vllm.entry_point: serve). Install vLLM, or set "
                "vllm.entry_point: module and vllm.python to an interpreter that has it. Nothing was started."
            )
        return
    py = argv[0]
    exe = shutil.which(py) or (py if os.path.exists(py) else None)
    if not exe:
        raise UserError(f"vllm.python: interpreter {py!r} not found. Nothing was started.")
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    r = subprocess.run([exe, "-c", probe], capture_output=True, timeout=60)
    if r.returncode != 0:
        raise UserError(
            f"vllm.python: {exe} cannot import vllm (the entry point `{' '.join(argv[:3])}`). "
            "Install vLLM there or point vllm.python / --python at one that has it. Nothing was started."
        )


def check_model(model: str) -> None:
    looks_local = model.startswith(("/", "./", "../", "~")) or os.path.exists(model)
    if not looks_local:
        return  # a hub id: vLLM downloads it (or finds it in the HF cache)
    p = Path(model).expanduser()
    if not (p / "config.json").is_file():
        raise UserError(f"model: {model!r} is not a model directory (no config.json there). Nothing was started.")


def check_before_start(plan: DeploymentPlan, cmds: list[ProcessCommand], node: int, model: str) -> None:
    """Model present, entry point runnable, then the doctor's node checks; UserError on the first failing kind."""
    check_model(model)
    check_entry_point(cmds)
    py = cmds[0].argv[0] if cmds and cmds[0].argv[0] != "vllm" else None
    doctor_checks(plan, node, model, shutil.which(py) if py else None)
