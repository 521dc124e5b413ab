"""``widep model``: build the tiny random-weight MoE (:mod:`widep.tinymoe`) used by the CPU demo and the tests."""

from __future__ import annotations

from pathlib import Path

import click

from widep.tinymoe import ARCHS, ensure_tiny_moe


@click.group("model")
def model_cmd() -> None:
    """Build the tiny random-weight MoE used by the CPU demo and the tests."""


@model_cmd.command("build")
@click.option("--arch", type=click.Choice(ARCHS), default="qwen3_moe", show_default=True,
              help="Model architecture of the tiny MoE.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder that holds the built models (default $WIDEP_CACHE/models or "
                   "~/.cache/widep/models).")
def build_cmd(arch: str, cache_dir: Path | None) -> None:
    """Build (or reuse) the tiny MoE and print its directory."""
    click.echo(str(ensure_tiny_moe(arch, cache_dir)))
