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


def router_url(p: DeploymentPlan) -> str | None:
    """The front door's URL when the topology has a router."""
    if p.router is None:
        return None
    n = p.nodes[p.router.node]
    host = n.address or n.name
    return f"http://{host}:{p.router.port}"


def endpoints_for_topology(path: str | Path, role: str | None = None, *, via_router: bool = True) -> tuple[list[str], int, str]:
    """(HTTP base URLs clients should use, GPUs behind them, model name) of a topology file.

    With a router (and ``via_router``), the one URL is the router's: what clients really get. Otherwise
    every API server of the chosen role (all roles by default) is listed in rank order.
    """
    p = plan(load_topology(path))
    front = router_url(p) if via_router and role is None else None
    urls = [front] if front else [f"http://{host}:{port}" for _, host, port in p.endpoints(role)]
    gpus = sum(rp.gpus for rp in p.roles if role is None or rp.name == role)
    return urls, gpus, model_name(p)
