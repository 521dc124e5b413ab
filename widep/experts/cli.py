"""``widep experts``: show a recorded expert load, advise on EPLB, record one from a live deployment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _plan_role(topology: str | None, role: str | None) -> tuple[Any, Any]:
    if topology is None:
        return None, None
    from widep.experts.advise import pick_role
    from widep.plan.core import plan
    from widep.spec.topology import load_topology

    p = plan(load_topology(topology))
    return p, pick_role(p, role)


@click.group("experts")
def experts_cmd() -> None:
    """Expert load per layer and EP rank; EPLB advice; recording from a live deployment."""


@experts_cmd.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--topology", type=click.Path(dir_okay=False), help="Map experts to EP ranks with this plan.")
@click.option("--role", default=None, help="Role whose placement to use (default: the first EP decode/mixed role).")
@click.option("--png", "png", type=click.Path(dir_okay=False), help="Write heatmaps (layer x expert, layer x rank).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show_cmd(file: str, topology: str | None, role: str | None, png: str | None, as_json: bool) -> None:
    """Per layer: balancedness of the EP ranks (mean / max tokens per rank), hottest experts, heatmaps."""
    from widep.experts.analysis import placement_from_plan, summarize
    from widep.experts.load import check_against_arch, read_expert_load

    load = read_expert_load(file)
    p, rp = _plan_role(topology, role)
    p2l = ep = None
    if p is not None:
        check_against_arch(load, p.arch, file)
        if rp.spec.expert_parallel and rp.ep_size > 1:
            p2l, ep = placement_from_plan(rp), rp.ep_size
    d = summarize(load, p2l, ep)
    if png:
        from widep.experts.plot import heatmaps

        d["png"] = str(heatmaps(load, p2l, ep, Path(png)))
    if as_json:
        click.echo(json.dumps(d, indent=1))
        return
    click.echo(f"{file}: {load.model or '?'} {load.layers} layers x {load.experts} experts, source {load.source!r}")
    click.echo(
        f"  routed tokens {d['routed_tokens']:.0f}; hottest expert over the mean (mean over layers) "
        f"{d['expert_max_over_mean']:.2f}x"
    )
    if ep:
        click.echo(
            f"  EP ranks {ep}: balancedness (mean/max tokens per rank, per layer; mean over layers) "
            f"{d['balancedness']:.3f}, worst layer {d['worst_layer']} at {d['worst_layer_balancedness']:.3f}"
        )
        for li, b in enumerate(d["per_layer"]):
            click.echo(f"    layer {li:3d}  {b:.3f}")
    click.echo("  hottest experts:")
    for h in d["hottest"]:
        click.echo(
            f"    layer {h['layer']:3d} expert {h['expert']:4d}  {h['share_of_layer'] * 100:5.1f}% of the layer "
            f"({h['times_mean']:.2f}x the mean)"
        )
    if png:
        click.echo(f"  heatmaps: {d['png']}")


@experts_cmd.command("advise")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--topology", required=True, type=click.Path(dir_okay=False))
@click.option("--role", default=None, help="Role to advise (default: the first EP decode/mixed role).")
@click.option("--calibration", default="published", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def advise_cmd(file: str, topology: str, role: str | None, calibration: str, as_json: bool) -> None:
    """Replay the load through vLLM's EPLB for 0.. redundant experts; price each; recommend one."""
    from widep.experts.advise import advise
    from widep.experts.load import read_expert_load

    load = read_expert_load(file)
    p, _ = _plan_role(topology, role)
    d = advise(load, p, role=role, calibration=calibration)
    if as_json:
        click.echo(json.dumps(d, indent=1))
        return
    click.echo(
        f"{d['topology']} role {d['role']}: EP {d['ep_size']}, {d['all2all_backend']}; placement by {d['algorithm']}"
    )
    click.echo(
        f"  {'eplb':>5} {'redund':>6} {'balanced':>8} {'worst':>6} {'+GiB/GPU':>8} {'KV lost':>9} "
        f"{'buf tok':>7} {'tok/s/GPU':>9}"
    )
    for c in d["candidates"]:
        tps = "-" if c["predicted_tps_per_gpu"] is None else f"{c['predicted_tps_per_gpu']:.1f}"
        click.echo(
            f"  {'on' if c['eplb_enabled'] else 'off':>5} {c['redundant_experts']:>6} {c['balancedness']:>8.3f} "
            f"{c['worst_layer_balancedness']:>6.3f} {c['extra_memory_gib_per_gpu']:>8.2f} "
            f"{c['kv_tokens_lost']:>9} {c['buffer_tokens_per_rank']:>7} {tps:>9}"
        )
    click.echo(f"  candidates stop: {d['candidates_stop']}")
    r = d["recommendation"]
    verdict = f"EPLB on, {r['redundant_experts']} redundant experts" if r["eplb_enabled"] else "EPLB off"
    click.echo(f"recommendation: {verdict} - {r['why']}")
    e = d["eplb"]
    click.echo(
        f"topology roles[{d['role']}].eplb: {{enabled: {str(e['enabled']).lower()}, redundant_experts: "
        f"{e['redundant_experts']}, window_size: {e['window_size']}, step_interval: {e['step_interval']}, "
        f"log_balancedness: {str(e['log_balancedness']).lower()}}}"
    )
    if d["cpu_note"]:
        click.echo(f"note: {d['cpu_note']}")


@experts_cmd.command("record")
@click.argument("topology", type=click.Path(dir_okay=False))
@click.option("--requests", "n_requests", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--role", default=None, help="Send to this role's API servers only (default: the front door / all).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="The expert-load JSON to write.")
def record_cmd(topology: str, n_requests: int, max_tokens: int, concurrency: int, role: str | None, out: str) -> None:
    """Send greedy completions to a running deployment and aggregate vLLM's routed-expert return into FILE."""
    from widep.experts.load import write_expert_load
    from widep.experts.record import Aggregator, record
    from widep.plan.api import endpoints_for_topology
    from widep.plan.core import plan
    from widep.spec.topology import load_topology

    p = plan(load_topology(topology))
    urls, _, name = endpoints_for_topology(topology, role)
    agg = Aggregator(layers=p.arch.num_moe_layers, experts=p.arch.routed_experts)
    record(urls, name, agg, requests=n_requests, max_tokens=max_tokens, concurrency=concurrency)
    src = f"widep experts record {p.spec.name}: {agg.requests} requests, max_tokens {max_tokens}, {', '.join(urls)}"
    write_expert_load(agg.result(p.arch.name, src), out)
    click.echo(
        f"{out}: {agg.tokens} tokens of {agg.requests} requests, {p.arch.num_moe_layers} MoE layers x "
        f"{p.arch.routed_experts} experts"
    )
