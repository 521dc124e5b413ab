"""Facts of the machine `widep launch` runs on, and the launch's own small side effects.

Gathered here, explicitly, and nowhere else: the interpreter that has vLLM, the core count (CPU thread binding),
what vLLM loads (and building the tiny MoE when that is it, a separate step the dry run skips), the run's id and
default directory, and the smoke completion of ``--once``.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import re
import subprocess
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


def imports_gate(python: str | None) -> bool:
    """True when ``python`` (vLLM's interpreter; None: ``vllm serve``, whose interpreter is unknown) imports widep's
    first-token gate: this interpreter is asked directly, another one by running it (a few hundred ms)."""
    if python is None:
        return False
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return importlib.util.find_spec("widep.vllm_gate") is not None
    try:
        r = subprocess.run([python, "-c", "import widep.vllm_gate"], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def render_context(p: DeploymentPlan, python: str | None, model: str | None) -> RenderContext:
    """Host facts for rendering on this machine; the tiny MoE is named by its path in the local cache. Behind the
    router, API servers load the first-token gate where vLLM's interpreter has widep (:mod:`widep.vllm_gate`)."""
    py = interpreter(p, python)
    module_python = (py or p.spec.vllm.python) if p.spec.vllm.entry_point == "module" else None
    return RenderContext(
        model_path=model_path(p, model, builtin_dir=tinymoe.default_cache_dir()),
        cpu_count=os.cpu_count() if p.device == "cpu" else None,
        python=py,
        first_token_gate=p.spec.router.enabled and imports_gate(module_python),
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


def smoke_completion(
    launch: Launch, doors: Sequence[Endpoint], max_tokens: int = 16, ranks: Sequence[Endpoint] = ()
) -> int:
    """Send one completion to each of ``doors`` and print them (the demo's last step); 0 when every one answered.

    The supervisor passes the front door and, unless the topology is P/D, every rank's API server: with DP >= 2 every
    rank answering shows the whole group (MoE dispatch/combine across ranks) carries tokens.
    """
    p = launch.plan
    if p.spec.disaggregated and ranks and doors:
        return pd_handoff_smoke(launch, doors[0], ranks, max_tokens)
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


PD_SMOKE_MAX_REQUESTS = 16
"""Completions ``--once`` sends through a P/D front door at most before it gives up on every decode rank serving."""
PD_SMOKE_MAX_FAILURES = 3
"""Failed completions (HTTP errors) after which the P/D ``--once`` gives up."""


def rank_counters(host: str, port: int, timeout: float = 10.0) -> dict[str, float]:
    """A rank's P/D hand-off counters from vLLM's /metrics: prompt tokens by source, NIXL transfers and bytes."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out: dict[str, float] = {}
    for m in re.finditer(r"^vllm:([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", text, re.MULTILINE):
        name, labels = m.group(1), m.group(2) or ""
        src = re.search(r'source="([a-z_]+)"', labels)
        if name == "prompt_tokens_by_source_total" and src:
            key = src.group(1)
        elif name in ("nixl_xfer_time_seconds_count", "nixl_bytes_transferred_sum", "generation_tokens_total"):
            key = name
        else:
            continue
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def pd_smoke_prompt(i: int, prompt: str) -> str:
    """The ``i``-th P/D ``--once`` prompt: a distinct first word, so no prompt shares a prefix-cache block."""
    return f"Request {i}: {prompt} " + "and the KV moves from prefill to decode. " * (1 + i % 4)


def pd_smoke_body(model: str, prompt: str, max_tokens: int) -> dict:
    """A greedy completion that returns its token ids (comparable with a mixed server's)."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }


def pd_handoff_smoke(launch: Launch, door: Endpoint, ranks: Sequence[Endpoint], max_tokens: int = 16) -> int:
    """P/D ``--once``: completions through the front door, one at a time, until every decode rank has decoded a
    request whose prompt KV it received from a prefill rank; per request, which prefill and decode rank served it
    and the evidence, read from vLLM's own counters of every rank before and after (0 when every decode rank did).

    A prefill rank shows the prompt as ``local_compute`` prompt tokens; the decode rank shows it as
    ``external_kv_transfer`` prompt tokens and NIXL transfers (it computes at most the last prompt token itself).
    """
    p = launch.plan
    kinds = {r.name: r.spec.kind for r in p.roles}
    named = [(f"{e.process.role}/{e.process.dp_rank}", kinds.get(e.process.role, "mixed"), e) for e in ranks]
    decodes = [n for n, k, _ in named if k == "decode"]
    served: dict[str, int] = dict.fromkeys(decodes, 0)
    model = p.spec.model.served_model_name or launch.model
    failed = 0
    click.echo(f"\nP/D hand-off through the router at http://{door.host}:{door.port} (decode ranks: {decodes}):")
    for i in range(PD_SMOKE_MAX_REQUESTS):
        prompt = pd_smoke_prompt(i, launch.request.prompt)
        try:
            before = {n: rank_counters(e.host, e.port) for n, _, e in named}
            t = time.perf_counter()
            r = http_json(
                door.host,
                door.port,
                "POST",
                "/v1/completions",
                pd_smoke_body(model, prompt, max_tokens),
                timeout=120,
            )
            dt = time.perf_counter() - t
            after = {n: rank_counters(e.host, e.port) for n, _, e in named}
        except (OSError, ValueError) as err:
            # kv_load_failure_policy fail: a failed KV pull ends the request with an error and the client retries
            # (vLLM 0.32's NIXL handshake waits 5 s for the prefill's side channel, which a loaded CPU can miss)
            failed += 1
            click.echo(f"  request {i} through the router failed ({failed} so far, a client retries): {err}", err=True)
            if failed >= PD_SMOKE_MAX_FAILURES:
                return 1
            continue

        def d(n: str, key: str, after: dict = after, before: dict = before) -> float:
            return after[n].get(key, 0.0) - before[n].get(key, 0.0)

        pre = [n for n, k, _ in named if k == "prefill" and d(n, "local_compute") > 0]
        dec = [n for n in decodes if d(n, "external_kv_transfer") > 0]
        usage = r.get("usage", {})
        line = f"  request {i} ({dt:.2f} s, {usage.get('prompt_tokens')} prompt tokens): prefill {','.join(pre) or '-'}"
        for n in pre:
            line += f" (computed {d(n, 'local_compute'):.0f})"
        line += f" -> decode {','.join(dec) or '-'}"
        for n in dec:
            line += (
                f" (external KV {d(n, 'external_kv_transfer'):.0f} tokens, computed {d(n, 'local_compute'):.0f}, "
                f"NIXL transfers {d(n, 'nixl_xfer_time_seconds_count'):.0f}, "
                f"{d(n, 'nixl_bytes_transferred_sum'):.0f} bytes)"
            )
            served[n] += 1
        click.echo(line)
        click.echo(f"    token ids: {r['choices'][0].get('token_ids')}")
        if all(served.values()):
            break
    missing = [n for n, c in served.items() if not c]
    click.echo("  requests with external KV per decode rank: " + ", ".join(f"{n} {c}" for n, c in served.items()))
    if missing:
        click.echo(
            f"decode rank(s) {missing} decoded no request with KV from prefill in {PD_SMOKE_MAX_REQUESTS} requests "
            f"(router policy {p.router.policy if p.router else '-'})",
            err=True,
        )
        return 1
    if p.arch.builtin:
        click.echo("  (the tiny MoE has random weights: the text is noise, the serving path is real)")
    return 0
