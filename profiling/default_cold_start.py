"""Cold start of the built-in default (`widep launch --once`, no file: DP2/EP2 of the tiny MoE) against the
single-rank DP1 topology (tiny-moe-cpu.yaml) in the same run: the README's figure.

    .venv/bin/python profiling/default_cold_start.py --runs 3 --json profiling/results/default-cold-start-cpu.json

Each run alternates DP1 and the default, each a fresh `widep launch --once` process with fresh ports (the model
already built), timed from spawning the launcher to its exit: healthy on every rank, then one completion from every
rank (the default) or from the one rank (DP1), then teardown. Also the time to "ready" (every rank healthy).
Prints medians, spread and the default/DP1 ratio. CPU vLLM on this machine (2 cores: the two ranks share them).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from launch_helpers import topology_copy


def once(topo: Path, model: str, run_dir: Path) -> tuple[float, float, int]:
    """(seconds to exit, seconds to 'ready', completions printed) of one `widep launch TOPO --once`."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "widep",
            "launch",
            str(topo),
            "--once",
            "--model-path",
            model,
            "--python",
            sys.executable,
            "--run-dir",
            str(run_dir),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ready = float("nan")
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if math.isnan(ready) and line.startswith("ready: "):
            ready = time.perf_counter() - t
    code = proc.wait()
    total = time.perf_counter() - t
    if code != 0:
        raise RuntimeError(f"widep launch --once exited {code}:\n" + "".join(lines[-40:]))
    return total, ready, sum(bool(re.match(r"completion from \S+ at http", x)) for x in lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = ap.parse_args()
    from widep.run.cli import DEFAULT_TOPOLOGY
    from widep.tinymoe import ensure_tiny_moe

    model = str(ensure_tiny_moe("qwen3_moe"))
    med = statistics.median
    rows: dict[str, list[tuple[float, float, int]]] = {"dp1": [], "default": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for i in range(args.runs):
            for key, name in (("dp1", "tiny-moe-cpu.yaml"), ("default", DEFAULT_TOPOLOGY)):
                topo = topology_copy(name, tmp)
                rows[key].append(once(topo, model, tmp / f"{key}-{i}"))
                total, ready, n = rows[key][-1]
                print(
                    f"run {i + 1} {key:8s}: --once {total:.1f} s (ready {ready:.1f} s, {n} completion(s))", flush=True
                )
    out: dict = {"runs": args.runs, "default_topology": DEFAULT_TOPOLOGY}
    for key, rs in rows.items():
        out[key] = {
            "once_s": {"median": med(r[0] for r in rs), "min": min(r[0] for r in rs), "max": max(r[0] for r in rs)},
            "ready_s": {"median": med(r[1] for r in rs)},
            "completions": sorted({r[2] for r in rs}),
        }
    ratios = [a[0] / b[0] for a, b in zip(rows["default"], rows["dp1"], strict=False)]
    out["ratio_default_over_dp1"] = {"median": med(ratios), "per_run": ratios}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
