"""launch/: the checked-in Slurm batch scripts and per-node commands are what widep generates now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from widep.render.cli import render_cmd
from widep.render.recipes import REGENERATE, expected_files, stale

ROOT = Path(__file__).parents[1]


def test_launch_dir_is_up_to_date() -> None:
    problems = stale(ROOT / "launch", expected_files(ROOT / "topologies"))
    assert problems == [], f"launch/ is stale; regenerate with `{REGENERATE}`:\n" + "\n".join(problems)


def test_check_flags_an_edited_and_an_extra_file(tmp_path: Path) -> None:
    out = tmp_path / "launch"
    subprocess.run([sys.executable, "-m", "widep.render.recipes", "--out", str(out)], check=True, capture_output=True)
    (out / "tiny-moe-cpu" / "node-0.sh").write_text("edited\n")
    (out / "tiny-moe-cpu" / "node-7.sh").write_text("stray\n")
    r = subprocess.run(
        [sys.executable, "-m", "widep.render.recipes", "--out", str(out), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1
    assert f"{out}/tiny-moe-cpu/node-0.sh: differs from what widep generates now" in r.stdout
    assert f"{out}/tiny-moe-cpu/node-7.sh: not generated from any topology (remove it)" in r.stdout


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "launch").iterdir() if p.is_dir()))
def test_node_files_are_widep_render_output(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each node-<i>.sh is the real `widep render ... --format shell --node i` output named in its second line.

    A recipe is for the topology's own nodes, so it is compared with `widep render` run on a node that has every core
    the topology names (on a smaller machine the CLI folds CPU core ids onto the cores it has).
    """
    monkeypatch.setattr(os, "cpu_count", lambda: 4096)
    for f in sorted((ROOT / "launch" / name).glob("node-*.sh")):
        lines = f.read_text().split("\n")
        cmd = lines[1].split("`")[1]
        assert cmd.startswith("widep render ")
        r = CliRunner().invoke(render_cmd, cmd.split()[2:], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert r.output.split("\n") == [lines[0], *lines[2:]], f"{f} differs from `{cmd}`"


def test_job_scripts_parse_and_run_the_slurm_backend_inside_the_job() -> None:
    for f in sorted((ROOT / "launch").glob("*/job.sbatch")):
        assert subprocess.run(["bash", "-n", str(f)], check=False).returncode == 0, f
        text = f.read_text()
        assert "export WIDEP_SLURM_INSIDE=1\nexec python3 -m widep launch topologies/" in text
        assert f"--backend slurm --run-dir runs/{f.parent.name}" in text
