"""P/D (prefill rank + decode rank, NIXL KV hand-off, vllm-router in P/D mode) against mixed serving on the same
cores (two mixed ranks behind vllm-router in regular mode), tiny MoE on CPU vLLM, through `widep bench --topology`.

    .venv/bin/python profiling/pd_vs_mixed.py --runs 3 --out profiling/results/pd-vs-mixed-cpu.json

Each deployment is launched once with `widep launch` (topologies/tiny-moe-cpu-pd.yaml, and the same file with both
roles turned into mixed ones); each concurrency level is benched --runs times against it; the figures are medians
over runs of each level's median TTFT / ITL and output tokens/s, with the P/D-to-mixed ratio. On this 2-core machine
the two ranks share the cores with the router and the load generator: the ratio says how widep's P/D path behaves
here, not what P/D gains on GPUs (where prefill and decode interfere through batch shape, not through core sharing).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from launch_helpers import LaunchProc, free_ports, wait_gone


def topologies(tmp: Path) -> dict[str, Path]:
    doc = yaml.safe_load((ROOT / "topologies/tiny-moe-cpu-pd.yaml").read_text())
    ports = free_ports(9)
    for r, http, rpc, side in zip(doc["roles"], ports[0:2], ports[2:4], ports[4:6], strict=True):
        r.update({"port": http, "rpc_port": rpc, "nixl_side_channel_port": side})
    doc["serving"].update({"port": ports[0], "control_port": ports[6]})
    doc["router"].update({"port": ports[7], "prometheus_port": ports[8]})
    mixed = yaml.safe_load(yaml.safe_dump(doc))
    mixed["name"] = "tiny-moe-cpu-mixed2"
    for r, name in zip(mixed["roles"], ("serve-a", "serve-b"), strict=True):
        r.update({"name": name, "kind": "mixed"})
        r.pop("nixl_side_channel_port")
    out = {}
    for key, d in (("pd", doc), ("mixed", mixed)):
        out[key] = tmp / f"{key}.yaml"
        out[key].write_text(yaml.safe_dump(d, sort_keys=False))
    return out


def bench(topo: Path, out: Path, levels: str, isl: int, osl: int, n: int, model: str) -> dict[int, dict]:
    from widep.cli import main

    rc = main(
        [
            "bench",
            "--topology",
            str(topo),
            "--concurrency",
            levels,
            "--isl",
            str(isl),
            "--osl",
            str(osl),
            "--num-requests",
            str(n),
            "--warmup",
            "2",
            "--out",
            str(out),
            "--scrape-interval",
            "0",
            "--accelerator",
            "cpu",
            "--model",
            model,
            "--tokenizer",
            model,
        ]
    )
    if rc != 0:
        raise SystemExit(f"bench failed ({rc}) for {topo}")
    res = {}
    for c in map(int, levels.split(",")):
        s = json.loads((out / f"level-c{c}.summary.json").read_text())["summary"]
        res[c] = {
            "ttft_ms": s["ttft_ms"]["p50"],
            "itl_ms": s["itl_ms"]["p50"],
            "output_tps": s["output_tps"],
            "failed": s["failed"],
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--isl", type=int, default=256)
    ap.add_argument("--osl", type=int, default=32)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "profiling/results/pd-vs-mixed-cpu.json")
    args = ap.parse_args()
    from widep.tinymoe import ensure_tiny_moe

    model = str(ensure_tiny_moe())
    tmp = Path(tempfile.mkdtemp(prefix="widep-pd-prof-"))
    runs: dict[str, list[dict[int, dict]]] = {"pd": [], "mixed": []}
    for key, topo in topologies(tmp).items():
        launch = LaunchProc(
            [
                str(topo),
                "--node",
                "0",
                "--run-dir",
                str(tmp / f"run-{key}"),
                "--model-path",
                model,
                "--python",
                sys.executable,
            ],
            env={"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")},
        )
        try:
            launch.wait_for(r"\[router\] ready", 900)
            for i in range(args.runs):
                runs[key].append(
                    bench(topo, tmp / f"bench-{key}-{i}", args.levels, args.isl, args.osl, args.requests, model)
                )
        finally:
            run_id = launch.run_id()
            launch.stop(signal.SIGTERM)
            wait_gone(run_id, 60)
    levels = [int(c) for c in args.levels.split(",")]
    table = {}
    for key, rs in runs.items():
        table[key] = {
            c: {m: statistics.median(r[c][m] for r in rs) for m in ("ttft_ms", "itl_ms", "output_tps")}
            | {"failed": sum(r[c]["failed"] for r in rs)}
            for c in levels
        }
    ratio = {
        c: {m: table["pd"][c][m] / table["mixed"][c][m] for m in ("ttft_ms", "itl_ms", "output_tps")} for c in levels
    }
    result = {
        "machine": f"{os.cpu_count()} cores, CPU vLLM, tiny MoE",
        "runs": args.runs,
        "isl": args.isl,
        "osl": args.osl,
        "requests_per_level": args.requests,
        "median_of_runs": table,
        "pd_over_mixed": ratio,
        "raw": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'c':>3} {'P/D TTFT':>9} {'mixed':>7} {'P/D ITL':>8} {'mixed':>7} {'P/D tok/s':>9} {'mixed':>7}   ratios")
    for c in levels:
        p, m, r = table["pd"][c], table["mixed"][c], ratio[c]
        print(
            f"{c:>3} {p['ttft_ms']:>9.1f} {m['ttft_ms']:>7.1f} {p['itl_ms']:>8.1f} {m['itl_ms']:>7.1f} "
            f"{p['output_tps']:>9.1f} {m['output_tps']:>7.1f}   TTFT x{r['ttft_ms']:.2f} ITL x{r['itl_ms']:.2f} "
            f"tok/s x{r['output_tps']:.2f}"
        )


if __name__ == "__main__":
    main()
