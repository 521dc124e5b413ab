"""Facts of the machine `widep launch` runs on, and the launch's own small side effects.

Gathered here, explicitly, and nowhere else: the interpreter that has vLLM, the core count (CPU thread binding),
what vLLM loads (and building the tiny MoE when that is it, a separate step the dry run skips), the run's id and
default directory, and the smoke completion of ``--once``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import click

from widep import tinymoe
from widep.plan.api import model_path
from widep.plan.core import DeploymentPlan
from widep.render.vllm import RenderContext
from widep.run.backend import Endpoint
from widep.run.control import http_json
from widep.run.launch import Launch, LaunchRequest, render_launch


def interpreter(p: DeploymentPlan, python: str | None) -> str | None:
    """The interpreter for the module entry point: ``python``, else this one when it has vLLM and the topology
    asks for the default ``python`` (whatever `python` is on PATH), else None (the topology's)."""
    if python is not None:
        return python
    if p.spec.vllm.entry_point == "module" and p.spec.vllm.python == "python" and importlib.util.find_spec("vllm"):
        return sys.executable
    return None


def render_context(p: DeploymentPlan, python: str | None, model: str | None) -> RenderContext:
    """Host facts for rendering on this machine; the tiny MoE is named by its path in the local cache."""
    return RenderContext(
        model_path=model_path(p, model, builtin_dir=tinymoe.default_cache_dir()),
        cpu_count=os.cpu_count() if p.device == "cpu" else None,
        python=interpreter(p, python),
    )


def ensure_model(p: DeploymentPlan, model: str | None) -> None:
    """Build the tiny MoE when it is what vLLM loads and it is not built yet (the launch's one build step)."""
    if not model and p.arch.builtin and not (p.spec.model.path or p.arch.hf_id):
        tinymoe.ensure_tiny_moe(p.arch.builtin)


def default_run_dir(p: DeploymentPlan, tag: str) -> Path:
    """``runs/<name>-<time>-<tag>`` under the working directory."""
    return Path("runs") / f"{p.name}-{time.strftime('%Y%m%d-%H%M%S')}-{tag}"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def prepare_launch(request: LaunchRequest) -> Launch:
    """Gather this machine's facts and render every process of ``request`` once."""
    return render_launch(request, render_context(request.plan, request.python, request.model_path), new_run_id())


def smoke_completion(launch: Launch, doors: Sequence[Endpoint], max_tokens: int = 16) -> int:
    """Send one completion to each of ``doors`` and print them (the demo's last step); 0 when every one answered.

    The supervisor passes the front door and, unless the topology is P/D, every rank's API server: with DP >= 2 every
    rank answering shows the whole group (MoE dispatch/combine across ranks) carries tokens.
    """
    p = launch.plan
    body = {
        "model": p.spec.model.served_model_name or launch.model,
        "prompt": launch.request.prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    code = 0
    for door in doors:
        name = door.process.role if door.process.role == "router" else f"{door.process.role}/{door.process.dp_rank}"
        host, port = door.host, door.port
        t = time.perf_counter()
        try:
            r = http_json(host, port, "POST", "/v1/completions", body, timeout=120)
        except (OSError, ValueError) as err:
            click.echo(f"completion from {name} at http://{host}:{port} failed: {err}", err=True)
            code = 1
            continue
        dt = time.perf_counter() - t
        usage = r.get("usage", {})
        click.echo(
            f"\ncompletion from {name} at http://{host}:{port}/v1/completions ({dt:.2f} s, "
            f"{usage.get('prompt_tokens')} prompt + {usage.get('completion_tokens')} completion tokens):"
        )
        click.echo(f"  prompt: {launch.request.prompt!r}")
        click.echo(f"  text:   {r['choices'][0]['text']!r}")
    if p.arch.builtin:
        click.echo("  (the tiny MoE has random weights: the text is noise, the serving path is real)")
    return code
