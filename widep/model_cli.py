"""``widep model``: build the tiny random-weight MoE (:mod:`widep.tinymoe`) used by the CPU demo and the tests."""

from __future__ import annotations

from pathlib import Path

import click

from widep.tinymoe import ARCHS, ensure_tiny_moe


@click.group("model")
def model_cmd() -> None:
    """Build the tiny random-weight MoE used by the CPU demo and the tests."""


@model_cmd.command("build")
@click.option(
    "--arch",
    type=click.Choice(ARCHS),
    default="qwen3_moe",
    show_default=True,
    help="Model architecture of the tiny MoE.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder that holds the built models (default $WIDEP_CACHE/models or ~/.cache/widep/models).",
)
@click.option(
    "--router-skew",
    type=click.FloatRange(0.0, 100.0),
    default=0.0,
    show_default=True,
    help="Skew the router: expert e's router logit gets +S x (E-1-e)/(E-1) on every token (0: the balanced "
    "random router). 0.1 sends most tokens to the first experts; widep experts show tells how much.",
)
def build_cmd(arch: str, cache_dir: Path | None, router_skew: float) -> None:
    """Build (or reuse) the tiny MoE and print its directory."""
    click.echo(str(ensure_tiny_moe(arch, cache_dir, router_skew)))
