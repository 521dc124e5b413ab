"""Time of `widep plan`, `widep render` and `widep lws` on the P/D topology: what a user waits for.

    .venv/bin/python profiling/cli_speed.py --runs 7

Two figures per command, each a median over ``--runs`` runs taken in alternation:
(a) a fresh process (`python -m widep CMD TOPO`, output discarded), as a ratio to a fresh interpreter that only
imports ``widep.cli`` in the same run (the baseline soaks up machine load);
(b) the command in this process once warm (imports done), through click's test runner: planning and rendering
alone, as a ratio to ``widep plan`` in-process. ``widep lws`` validates against the CRDs in ../shared/schemas/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = ROOT / "topologies" / "deepseek-r1-pd-3x8-h200.yaml"
COMMANDS = {
    "plan": ["plan", str(TOPOLOGY)],
    "render": ["render", str(TOPOLOGY), "--format", "json"],
    "lws": ["lws", str(TOPOLOGY)],
}


def fresh(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def warm(runner: CliRunner, cli: click.Group, args: list[str]) -> float:
    t = time.perf_counter()
    r = runner.invoke(cli, args)
    dt = time.perf_counter() - t
    if r.exit_code != 0:
        raise RuntimeError(f"widep {' '.join(args)} exited {r.exit_code}: {r.output[-500:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = ap.parse_args()
    from widep.cli import cli

    runner = CliRunner()
    for a in COMMANDS.values():
        warm(runner, cli, a)  # imports and caches once
    base: list[float] = []
    cold: dict[str, list[float]] = {k: [] for k in COMMANDS}
    hot: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for i in range(args.runs):
        base.append(fresh(["-c", "import widep.cli"]))
        for k, a in COMMANDS.items():
            cold[k].append(fresh(["-m", "widep", *a]))
            hot[k].append(warm(runner, cli, a))
        print(f"run {i + 1}: baseline {base[-1]:.3f} s; " + ", ".join(f"{k} {cold[k][-1]:.3f} / {hot[k][-1] * 1000:.0f} ms"
                                                                       for k in COMMANDS), flush=True)
    med = statistics.median
    out = {
        "runs": args.runs,
        "topology": TOPOLOGY.name,
        "baseline_import_s": med(base),
        "fresh_process_s": {k: med(v) for k, v in cold.items()},
        "fresh_over_baseline": {k: med(c / b for c, b in zip(v, base)) for k, v in cold.items()},
        "in_process_ms": {k: 1000 * med(v) for k, v in hot.items()},
        "in_process_over_plan": {k: med(h / p for h, p in zip(v, hot["plan"])) for k, v in hot.items()},
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
