"""``widep render``: the exact argv and environment of every vLLM process (a dry run)."""

from __future__ import annotations

import json
import os

import click

from widep import tinymoe
from widep.errors import UserError
from widep.plan import api as plan_api
from widep.plan.core import DeploymentPlan
from widep.render.quoting import check_env_name, control_problem, sh_assign, sh_comment, sh_ref, sh_word
from widep.render.vllm import EnvRef, ProcessCommand, RenderContext, render


def shell_script(p: DeploymentPlan, cmds: list[ProcessCommand]) -> str:
    """A copy-pasteable bash script starting the given processes and waiting for them.

    Every word is quoted once by :mod:`widep.render.quoting` (flags included), comments are one line, and
    secrets are expanded from variables that the script first checks are set.
    """
    lines = [
        "#!/usr/bin/env bash",
        sh_comment(
            f"widep render: {p.name} (vLLM {p.spec.vllm.version}); one process per line, started in the background."
        ),
        "set -euo pipefail",
    ]
    refs = sorted({v.name for c in cmds for _, v in c.env if isinstance(v, EnvRef)})
    for name in refs:
        lines.append(f': "${{{check_env_name(name)}:?set {name} (a secret widep passes by reference)}}"')
    lines.append("pids=()")
    for c in cmds:
        where = " headless" if c.headless else f", port {c.port}"
        lines.append(sh_comment(f"{c.name} on {c.node_name} (node {c.node}){where}"))
        env = " ".join(
            f"{check_env_name(k)}={sh_ref(v.name)}" if isinstance(v, EnvRef) else sh_assign(k, v) for k, v in c.env
        )
        argv = " \\\n    ".join(_pairs(c.argv))
        lines.append(f"env {env} \\\n    {argv} &")
        lines.append("pids+=($!)")
    lines.append("trap 'kill -TERM \"${pids[@]}\" 2>/dev/null' INT TERM")
    lines.append('wait "${pids[@]}"')
    return "\n".join(lines) + "\n"


def _pairs(argv: tuple[str, ...]) -> list[str]:
    """Quoted words, '--flag value' grouped so each pair shows on its own line."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(f"{sh_word(a)} {sh_word(argv[i + 1])}")
            i += 2
        else:
            out.append(sh_word(a))
            i += 1
    return out


def print_table(p: DeploymentPlan, cmds: list[ProcessCommand]) -> None:
    from rich.console import Console
    from rich.markup import escape

    con = Console()
    for c in cmds:
        con.rule(
            f"[bold]{escape(c.name)}[/] on {escape(c.node_name)} (node {c.node})"
            + ("  headless" if c.headless else f"  :{c.port}")
        )
        for k, v in c.env:
            shown = v.shell() if isinstance(v, EnvRef) else v
            if control_problem(shown):
                shown = sh_word(shown).encode("unicode_escape").decode()
            con.print(f"  [cyan]{k}[/]={escape(shown)}", highlight=False, soft_wrap=True)
        line = " ".join(_pairs(c.argv))
        con.print(
            "  " + (line.encode("unicode_escape").decode() if control_problem(line, allow="\n") else line),
            highlight=False,
            soft_wrap=True,
            markup=False,
        )


@click.command("render")
@click.argument("topology", type=click.Path(dir_okay=False))
@click.option("--node", type=int, default=None, help="Only the processes on this node (index in cluster.nodes).")
@click.option("--role", default=None, help="Only this role.")
@click.option("--rank", type=int, default=None, help="Only the process running this DP rank.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "shell"]), default="table", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--vllm-version", default=None, help="Render for another vLLM version (e.g. 0.10.2, 0.11.0, 0.32.0).")
@click.option("--entry-point", type=click.Choice(["serve", "module"]), default=None, help="Override vllm.entry_point.")
@click.option("--model-path", default=None, help="What vLLM loads, overriding the topology.")
@click.option(
    "--check",
    is_flag=True,
    help="Also judge every argv with vLLM's own parser (0.33/0.34: that version's judge environment).",
)
@click.option(
    "--python", "python", default=None, help="Interpreter that has vLLM (for --check and the module entry point)."
)
def render_cmd(
    topology: str,
    node: int | None,
    role: str | None,
    rank: int | None,
    fmt: str,
    as_json: bool,
    vllm_version: str | None,
    entry_point: str | None,
    model_path: str | None,
    check: bool,
    python: str | None,
) -> int:
    """Print the argv and environment of every vLLM process of TOPOLOGY."""
    from widep.plan import plan as make_plan
    from widep.spec.topology import load_topology

    flags = (("--model-path", model_path), ("--python", python), ("--vllm-version", vllm_version), ("--role", role))
    for flag, value in flags:
        if value is not None and (why := control_problem(value)):
            raise UserError(f"{flag}: {why}. Given: {value!r}.")
    spec = load_topology(topology)
    if vllm_version:
        spec = spec.model_copy(update={"vllm": spec.vllm.model_copy(update={"version": vllm_version})})
    p = make_plan(spec)
    ctx = RenderContext(
        model_path=plan_api.model_path(p, model_path, builtin_dir=tinymoe.default_cache_dir()),
        cpu_count=os.cpu_count() if p.device == "cpu" else None,
        python=python,
        entry_point=entry_point,
    )
    from widep.render.vllm import render_router

    rc = render_router(p, ctx)
    if role == "router":
        if rc is None:
            raise UserError(
                "--role router: this topology has no router (router.enabled: false; `widep launch --router` turns it "
                "on)."
            )
        cmds = [rc]
    else:
        cmds = render(p, ctx, node=node, role=role, rank=rank)
        if rc is not None and role is None and rank is None and (node is None or node == rc.node):
            cmds.append(rc)
    fmt = "json" if as_json else fmt
    if fmt == "json":
        click.echo(
            json.dumps(
                {"name": p.name, "vllm_version": p.spec.vllm.version, "ranks": [c.as_dict() for c in cmds]}, indent=2
            )
        )
    elif fmt == "shell":
        click.echo(shell_script(p, cmds), nl=False)
    else:
        print_table(p, cmds)
    if check:
        return judge_commands(p, [c for c in cmds if c.role != "router"], python)
    return 0


def judge_commands(
    p: DeploymentPlan, cmds: list[ProcessCommand], python: str | None, model_override: str | None = None
) -> int:
    """Feed every argv to vLLM's own parser; print one verdict per process; 1 if any is refused.

    vLLM's config creation reads the model's config.json, so a model that is not on this machine
    (DeepSeek-R1 on a laptop) is replaced by a local stand-in of the same attention family: the
    tiny MoE with MLA for DeepSeek-style models, the tiny Qwen3-MoE otherwise.
    """
    import sys
    from pathlib import Path

    from widep.render.judge import ParserVerdict, judge, parallel_mismatches

    if model_override is None:
        first = strip_entry(cmds[0].argv)[1] if cmds else ""
        if not (Path(first) / "config.json").is_file():
            from widep import tinymoe

            model_override = str(tinymoe.ensure_tiny_moe("deepseek_v3" if p.arch.mla else "qwen3_moe"))
            click.echo(f"(judging with the local stand-in model {model_override}: {first} is not on this machine)")
    argvs = [strip_entry(c.argv) for c in cmds]
    envs = [{k: (v if isinstance(v, str) else "x") for k, v in c.env} for c in cmds]
    extra_env = None
    if python is None and (jv := judge_version_for(p.spec.vllm.version)) is not None:
        from widep.render.judge_env import judge_env

        extra_env = judge_env(jv)
    j = judge(argvs, python or sys.executable, envs=envs, model_override=model_override, extra_env=extra_env)
    bad = 0
    click.echo(f"judged by vLLM {j.vllm_version} on {j.platform}:")
    if extra_env is not None and j.vllm_version != jv:
        click.echo(f"  the judge environment of vLLM {jv} imported vLLM {j.vllm_version}")
        bad += 1
    for c, v in zip(cmds, j.verdicts, strict=False):
        bad += not v.ok
        note = f" (refused on this platform only: {v.refused_on_platform})" if v.refused_on_platform else ""
        click.echo(
            f"  {c.name}: {'ok' if v.ok else 'REFUSED: ' + str(v.error)}; checks: {', '.join(v.checks_ran)}{note}"
        )
    groups: dict[tuple[str, int], list[ParserVerdict]] = {}
    for c, v in zip(cmds, j.verdicts, strict=False):
        groups.setdefault((c.role, c.replica), []).append(v)
    for (r, g), vs in groups.items():
        mism = parallel_mismatches(vs)
        if mism:
            bad += 1
            click.echo(
                f"  {r} replica {g}: parallel settings differ between ranks (vLLM rejects this at handshake): {mism}"
            )
    return 1 if bad else 0


def judge_version_for(version: str) -> str | None:
    """The judge-environment version whose parser judges ``version``'s line, or None (the installed vLLM)."""
    from widep.render.judge_env import JUDGE_VERSIONS
    from widep.spec.vllm_versions import table_for

    line = table_for(version).line
    return next((v for v in JUDGE_VERSIONS if table_for(v).line == line), None)


def strip_entry(argv: tuple[str, ...]) -> list[str]:
    """The vLLM arguments of an argv, with '--model MODEL' first, whatever the entry point."""
    a = list(argv)
    if len(a) >= 3 and a[0] == "vllm" and a[1] == "serve":
        return ["--model", a[2]] + a[3:]
    if "-m" in a:
        i = a.index("-m")
        return a[i + 2 :]
    raise UserError(f"cannot find vLLM's arguments in {a[:3]}...")
