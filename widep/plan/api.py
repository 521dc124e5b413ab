"""Small entry points other subsystems (bench, sweep, router) use to read a topology's plan."""

from __future__ import annotations

from pathlib import Path

from widep.plan.core import DeploymentPlan, plan
from widep.spec.topology import load_topology


def model_name(p: DeploymentPlan) -> str:
    """The name clients send in requests: served_model_name, else the path vLLM loads (as vLLM does)."""
    if p.spec.model.served_model_name:
        return p.spec.model.served_model_name
    if p.spec.model.path:
        return p.spec.model.path
    if p.arch.hf_id:
        return p.arch.hf_id
    from widep import tinymoe

    return str(tinymoe.default_cache_dir() / tinymoe.model_dir_name(p.arch.builtin or "qwen3_moe"))


def endpoints_for_topology(path: str | Path, role: str | None = None) -> tuple[list[str], int, str]:
    """(HTTP base URLs of every API server, GPUs they use, model name) of a topology file.

    With P/D, clients talk to the decode role's servers only when a P/D-aware front door is absent;
    here every API server of the chosen role (all roles by default) is listed in rank order.
    """
    p = plan(load_topology(path))
    urls = [f"http://{host}:{port}" for _, host, port in p.endpoints(role)]
    gpus = sum(rp.gpus for rp in p.roles if role is None or rp.name == role)
    return urls, gpus, model_name(p)
