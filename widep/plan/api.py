"""Small entry points other subsystems (bench, sweep, router) use to read a topology's plan."""

from __future__ import annotations

from pathlib import Path

from widep import tinymoe
from widep.errors import UserError
from widep.plan.core import DeploymentPlan, plan
from widep.spec.topology import load_topology


def model_path(p: DeploymentPlan, override: str | None = None, *, builtin_dir: str | Path | None = None) -> str:
    """What vLLM loads (the one home of that fact): ``override`` (--model-path), else model.path, else the hub id,
    else the tiny MoE widep builds, as ``builtin_dir/<its directory>`` (the local cache, a pod's cache mount).
    Pure: the tiny MoE is not built here (``widep model build``, or the launch, builds it)."""
    if override:
        return override
    if p.spec.model.path:
        return p.spec.model.path
    if p.arch.hf_id:
        return p.arch.hf_id
    if p.arch.builtin and builtin_dir is not None:
        return f"{str(builtin_dir).rstrip('/')}/{tinymoe.model_dir_name(p.arch.builtin)}"
    if p.arch.builtin:
        raise UserError(
            f"model: {p.arch.name!r} is built locally by widep; its path is known once built "
            "(`widep model build`), and `widep launch` builds it on first use. Give --model-path to render it."
        )
    raise UserError("model.path: no path for vLLM to load. Give model.path (a hub id or a local directory).")


def model_name(p: DeploymentPlan) -> str:
    """The name clients send in requests: served_model_name, else the path vLLM loads (as vLLM does)."""
    return p.spec.model.served_model_name or model_path(p, builtin_dir=tinymoe.default_cache_dir())


def router_url(p: DeploymentPlan) -> str | None:
    """The front door's URL when the topology has a router."""
    if p.router is None:
        return None
    return f"http://{p.nodes[p.router.node].host}:{p.router.port}"


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
