"""``widep plan``: show the rank layout, expert placement and memory budget of a topology."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from widep.errors import UserError
from widep.plan.core import DeploymentPlan, plan
from widep.spec.topology import TopologySpec, load_topology, parse_topology

if TYPE_CHECKING:
    from rich.console import Console


def spec_from_flags(
    model: str, gpu: str, nodes: int, gpus_per_node: int, role: str, tp: int, vllm_version: str | None
) -> TopologySpec:
    """A topology from command-line flags alone (no file)."""
    kind = role if role in ("prefill", "decode") else "mixed"
    doc = {
        "name": f"{model}-{role}-{nodes}x{gpus_per_node}-{gpu}".lower().replace("_", "-"),
        "model": {"preset": model},
        "cluster": {"gpu": gpu, "gpus_per_node": gpus_per_node, "nodes": nodes},
        "roles": [{"name": role, "kind": kind, "nodes": nodes, "tp": tp}],
    }
    if vllm_version:
        doc["vllm"] = {"version": vllm_version}
    return parse_topology(doc, "(from flags)")


def load_plan(topology: str | None, **flags: object) -> DeploymentPlan:
    """The plan of a topology file, or of one built from flags when no file is given."""
    if topology:
        return plan(load_topology(topology))
    if not flags.get("model"):
        raise UserError("give a topology file, or --model (and --gpu, --nodes, --role) to plan without one.")
    return plan(spec_from_flags(**flags))  # type: ignore[arg-type]


def _experts_str(experts: tuple[int, ...]) -> str:
    if not experts:
        return "-"
    if list(experts) == list(range(experts[0], experts[0] + len(experts))):
        return f"{experts[0]}-{experts[-1]}" if len(experts) > 1 else str(experts[0])
    if len(experts) <= 6:
        return ",".join(map(str, experts))
    return f"{','.join(map(str, experts[:4]))},… ({len(experts)})"


def print_plan(p: DeploymentPlan, console: Console | None = None) -> None:
    from rich import console as rich_console
    from rich.markup import escape
    from rich.table import Table

    con = console or rich_console.Console()
    a = p.arch
    s = a.summary()
    con.print(f"[bold]{p.name}[/bold]  {escape(p.spec.description)}")
    con.print(
        f"model {s['name']}: {s['total_params_b']}B total / {s['active_params_b']}B active, {s['routed_experts']} "
        "routed"
        f" + {s['shared_experts']} shared experts, top-{s['top_k']}, {s['attention']}; weights {p.weight_dtype}, KV "
        f"{p.kv_dtype}"
    )
    con.print(
        f"cluster {len(p.nodes)} x {p.spec.cluster.gpus_per_node} {p.gpu.name}; vLLM {escape(p.spec.vllm.version)}; DP "
        f"mode {p.spec.serving.dp_mode}"
    )
    for rp in p.roles:
        con.print()
        con.print(
            f"[bold cyan]role {rp.name}[/] ({rp.kind}): DP {rp.dp_size} x TP {rp.tp_size} -> EP {rp.ep_size}, "
            f"{rp.nodes_per_group} node(s) per group, {rp.spec.replicas} replica(s), {rp.all2all_backend}"
            + (", DBO" if rp.spec.dbo.enabled else "")
            + (
                f", EPLB +{rp.redundant_experts} redundant"
                + (" (auto)" if rp.spec.eplb.redundant_experts == "auto" else "")
                if rp.spec.eplb.enabled
                else ""
            )
            + f"; {rp.physical_experts} physical experts, {rp.experts_per_gpu} per GPU"
        )
        con.print(
            f"recovery {rp.spec.recovery}: a rank's death SIGKILLs its DP group at once and restarts it in step"
            + (
                f"; the router retries requests without a first token for {p.spec.router.retry_window_s} s"
                if p.router is not None
                else ""
            )
            + "; surgical (survivors keep serving) is unavailable: vLLM 0.32 refuses elastic EP behind per-rank "
            "API servers (vllm/config/parallel.py:963)",
            highlight=False,
        )
        ft = rp.fault_tolerance
        if ft is not None:
            con.print(
                f"fault tolerance (vLLM {p.spec.vllm.version}): a faulted engine waits "
                f"{rp.spec.fault_tolerance.engine_recovery_timeout_s} s for '{rp.spec.fault_tolerance.on_fault}' on "
                f"POST {ft.apply_path} (status: GET {ft.status_path}"
                + ("; the caller names the round's request_id" if ft.request_id_required else "")
                + ")",
                highlight=False,
            )
        if rp.spec.elastic_ep.enabled:
            phases = p.vllm.elastic_ep_phases
            con.print(
                f"elastic EP: DP {rp.dp_size}, at most {rp.spec.elastic_ep.max_dp_size or rp.dp_size} "
                "(POST /scale_elastic_ep"
                + (f"; POST /is_scaling_elastic_ep reports the phase: {', '.join(phases)}" if phases else "")
                + ")",
                highlight=False,
            )
        t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        for col in ("replica", "dp rank", "node", "local", "gpus", "port", "experts"):
            t.add_column(col, justify="right" if col not in ("node", "experts") else "left")
        if any(r.side_channel_port for r in rp.ranks):
            t.add_column("nixl", justify="right")
        for r in rp.ranks:
            row = [
                str(r.replica),
                str(r.dp_rank),
                escape(r.node_name),
                str(r.local_rank),
                ",".join(map(str, r.gpus)),
                str(r.port) if r.port is not None else "headless",
                _experts_str(r.experts),
            ]
            if r.side_channel_port:
                row.append(str(r.side_channel_port))
            t.add_row(*row)
        con.print(t)
        m = rp.memory
        mt = Table(title=f"memory per GPU (GiB), {p.gpu.name}", box=None, show_header=False, title_justify="left")
        mt.add_column("what")
        mt.add_column("GiB", justify="right")
        mt.add_row("device memory", f"{m.total_gib:.1f}")
        mt.add_row(f"budget (gpu_memory_utilization {rp.spec.gpu_memory_utilization})", f"{m.budget_gib:.1f}")
        mt.add_row("  non-expert weights (replicated)", f"{m.non_expert_weights_gib:.2f}")
        mt.add_row(f"  routed experts ({rp.experts_per_gpu} local)", f"{m.expert_weights_gib:.2f}")
        mt.add_row(f"  all2all buffers ({rp.all2all_backend})", f"{m.all2all_buffer_gib:.2f}")
        mt.add_row(f"  activations ({rp.max_num_batched_tokens} tokens/step)", f"{m.activation_gib:.2f}")
        mt.add_row("  CUDA graphs", f"{m.cuda_graph_gib:.2f}")
        mt.add_row("  runtime (context, NCCL)", f"{m.overhead_gib:.2f}")
        mt.add_row("  [bold]KV cache[/bold]" + (" (fixed)" if m.fixed_kv else ""), f"[bold]{m.kv_cache_gib:.2f}[/bold]")
        con.print(mt)
        con.print(
            f"KV: {m.kv_bytes_per_token / 1024:.1f} KiB/token -> {m.kv_tokens:,} tokens per rank; "
            f"{m.max_seqs_at_context} concurrent sequences of {m.context_len} tokens per rank "
            f"({m.max_seqs_at_context * rp.dp_size * rp.spec.replicas} across the role)"
        )
        for w in rp.warnings:
            con.print(f"[yellow]warning[/yellow] ({rp.name}): {w}")
    if p.spec.disaggregated:
        from widep.render.vllm import kv_transfer_config

        kvt = kv_transfer_config(p)
        con.print()
        con.print(
            f"[bold cyan]KV hand-off[/] prefill -> decode: {kvt['kv_connector']}"
            + (" (KV in host memory: NIXL DRAM over UCX)" if kvt.get("kv_buffer_device") == "cpu" else "")
            + f"; on a failed KV load: {kvt.get('kv_load_failure_policy', 'vLLM default')}; side channels "
            + ", ".join(f"{rp.name} {rp.nixl_side_channel_port}+rank" for rp in p.roles),
            highlight=False,
        )
    if p.router is not None:
        from widep.render.vllm import RenderContext, render_router

        rc = render_router(p, RenderContext())
        assert rc is not None  # render_router renders whenever the plan has a router
        con.print()
        con.print(
            f"[bold cyan]router[/] on {escape(p.nodes[p.router.node].name)}: port {p.router.port}, policy "
            f"{p.spec.router.policy}{', P/D hand-off' if p.router.pd else ''}, fronting {len(p.endpoints())} API "
            "server(s)"
        )
        con.print("  " + " ".join(rc.argv), highlight=False, soft_wrap=True, markup=False)
    for w in p.warnings:
        con.print(f"[yellow]warning[/yellow]: {w}")


@click.command("plan")
@click.argument("topology", required=False, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
@click.option("--model", help="Without a file: model preset (e.g. deepseek-r1).")
@click.option("--gpu", default="H200", show_default=True, help="Without a file: GPU kind.")
@click.option(
    "--nodes", default=1, show_default=True, type=click.IntRange(min=1), help="Without a file: nodes in the group."
)
@click.option(
    "--gpus-per-node", default=8, show_default=True, type=click.IntRange(min=1), help="Without a file: GPUs per node."
)
@click.option(
    "--role",
    default="mixed",
    show_default=True,
    type=click.Choice(["mixed", "prefill", "decode"]),
    help="Without a file: role kind.",
)
@click.option(
    "--tp", default=1, show_default=True, type=click.IntRange(min=1), help="Without a file: tensor-parallel size."
)
@click.option("--vllm-version", default=None, help="Without a file: vLLM version.")
def plan_cmd(
    topology: str | None,
    as_json: bool,
    model: str | None,
    gpu: str,
    nodes: int,
    gpus_per_node: int,
    role: str,
    tp: int,
    vllm_version: str | None,
) -> None:
    """Show the rank layout, expert placement and per-GPU memory of TOPOLOGY (or of flags)."""
    if topology and not Path(topology).exists():
        raise UserError(f"topology file {topology!r} not found.")
    p = load_plan(
        topology,
        model=model,
        gpu=gpu,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        role=role,
        tp=tp,
        vllm_version=vllm_version,
    )
    if as_json:
        click.echo(json.dumps(p.as_dict(), indent=2))
    else:
        print_plan(p)
