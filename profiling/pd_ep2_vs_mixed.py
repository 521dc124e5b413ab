"""P/D with a wide-EP decode group (topologies/tiny-moe-cpu-pd-dp2.yaml: 1 prefill rank + DP2/EP2 decode, NIXL KV
hand-off, vllm-router in P/D mode) against mixed DP2/EP2 (topologies/tiny-moe-cpu-ep2.yaml behind the same router,
round_robin), tiny MoE on CPU vLLM: cold start, TTFT and output tok/s at concurrency 1, 2, 4 with `widep bench`,
medians of --runs, and greedy token ids of full completions against mixed DP1.

    .venv/bin/python profiling/pd_ep2_vs_mixed.py --runs 3 --out profiling/results/pd-ep2-vs-mixed-cpu.json

Each run launches both deployments afresh (`widep launch`, in turn: P/D+EP2 then mixed), takes the cold start (the
launcher's start to the router's "ready" line: every engine healthy and the router answering), benches every level
once against it and stops it; figures are medians over runs of each level's p50 TTFT / TPOT and output tokens/s.
The core budget per engine is read from the rendered commands (VLLM_CPU_OMP_THREADS_BIND, cluster.cpu_cores).

Greedy (--greedy N, first run only): the N prompts of `widep launch --once`, --greedy-tokens tokens each, one at a
time, with the two best logprobs per step, through P/D+EP2's router and to each rank of mixed DP2/EP2, plus a mixed
DP1 server (the reference) and the single-decode P/D topology (tiny-moe-cpu-pd.yaml, DP1 decode): where a path
leaves DP1's ids, the step and DP1's gap between its two best tokens there are printed, which separates the
P/D hand-off (DP1 decode) from EP2 (mixed DP2/EP2) as the source.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "profiling"))

from launch_helpers import LaunchProc, free_ports, wait_gone
from vllm_helpers import start_vllm

from widep.run.host import pd_smoke_body, pd_smoke_prompt

METRICS = ("ttft_ms", "tpot_ms", "output_tps")
SMOKE_PROMPT = "Wide expert parallelism is"  # widep launch --prompt's default


def topologies(tmp: Path) -> dict[str, Path]:
    """P/D+EP2, mixed DP2/EP2 behind a router and single-decode P/D, each with fresh ports."""
    out = {}
    for key, name in (("pd", "tiny-moe-cpu-pd-dp2.yaml"), ("pd1", "tiny-moe-cpu-pd.yaml")):
        doc = yaml.safe_load((ROOT / "topologies" / name).read_text())
        ports = free_ports(9)
        for r, http, rpc, side in zip(doc["roles"], ports[0:2], ports[2:4], ports[4:6], strict=True):
            r.update({"port": http, "rpc_port": rpc, "nixl_side_channel_port": side})
        doc["serving"].update({"port": ports[0], "rpc_port": ports[2], "control_port": ports[6]})
        doc["router"].update({"port": ports[7], "prometheus_port": ports[8]})
        out[key] = doc
    mixed = yaml.safe_load((ROOT / "topologies/tiny-moe-cpu-ep2.yaml").read_text())
    port, rpc, control, rport, prom = free_ports(5)
    mixed["serving"].update({"port": port, "rpc_port": rpc, "control_port": control})
    mixed["router"] = {"enabled": True, "node": 0, "host": "node", "port": rport, "prometheus_port": prom}
    mixed["router"]["policy"] = "round_robin"
    out["mixed"] = mixed
    paths = {}
    for key, d in out.items():
        paths[key] = tmp / f"{key}.yaml"
        paths[key].write_text(yaml.safe_dump(d, sort_keys=False))
    return paths


def core_budget(topo: Path, model: str) -> list[str]:
    """Per engine: role/rank, the cores it binds (VLLM_CPU_OMP_THREADS_BIND) and its KV cache (GiB)."""
    from widep.plan import plan
    from widep.render.vllm import RenderContext, render
    from widep.spec.topology import load_topology

    p = plan(load_topology(topo))
    out = []
    for c in render(p, RenderContext(model_path=model)):
        env = {k: v for k, v in c.env_template if isinstance(v, str)}
        ranks = ",".join(map(str, c.dp_ranks))
        out.append(
            f"{c.role}/{ranks}: cores {env.get('VLLM_CPU_OMP_THREADS_BIND', '-')}, "
            f"KV {env.get('VLLM_CPU_KVCACHE_SPACE', '-')} GiB"
        )
    return out


def bench(topo: Path, out: Path, levels: str, isl: int, osl: int, n: int, model: str) -> dict[int, dict]:
    from widep.cli import main

    argv = ["bench", "--topology", str(topo), "--concurrency", levels, "--isl", str(isl), "--osl", str(osl)]
    argv += ["--num-requests", str(n), "--warmup", "1", "--out", str(out), "--scrape-interval", "0"]
    argv += ["--accelerator", "cpu", "--model", model, "--tokenizer", model]
    if main(argv) != 0:
        raise SystemExit(f"bench failed for {topo}")
    res = {}
    for c in map(int, levels.split(",")):
        s = json.loads((out / f"level-c{c}.summary.json").read_text())["summary"]
        res[c] = {
            "ttft_ms": s["ttft_ms"]["p50"],
            "tpot_ms": s["tpot_ms"]["p50"],
            "output_tps": s["output_tps"],
            "failed": s["failed"],
        }
    return res


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def greedy(url: str, model: str, n: int, tokens: int) -> list[dict]:
    """The --once prompts one at a time: ids and the two best tokens' logprobs per step."""
    out = []
    for i in range(n):
        body = pd_smoke_body(model, pd_smoke_prompt(i, SMOKE_PROMPT), tokens)
        body.update({"logprobs": 2, "return_tokens_as_token_ids": True})
        ch = post(url, body)["choices"][0]
        out.append({"ids": list(ch["token_ids"]), "top": list(ch["logprobs"]["top_logprobs"])})
    return out


def compare(ref: list[dict], got: list[dict]) -> list[dict]:
    """Per prompt: equal, or the first step apart, DP1's gap between its two best tokens there and the logprobs the
    path gave DP1's token and its own at that step."""
    rows = []
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        k = next((k for k in range(len(r["ids"])) if r["ids"][k] != g["ids"][k]), None)
        if k is None:
            rows.append({"prompt": i, "equal": True})
            continue
        a, b = f"token_id:{r['ids'][k]}", f"token_id:{g['ids'][k]}"
        rows.append(
            {
                "prompt": i,
                "equal": False,
                "first_diff": k,
                "dp1_gap": None if b not in r["top"][k] else round(r["top"][k][a] - r["top"][k][b], 5),
                "dp1_logprobs": {a: r["top"][k].get(a), b: r["top"][k].get(b)},
                "path_logprobs": {a: g["top"][k].get(a), b: g["top"][k].get(b)},
            }
        )
    return rows


def launch(topo: Path, run_dir: Path, model: str) -> LaunchProc:
    args = [str(topo), "--node", "0", "--run-dir", str(run_dir), "--model-path", model, "--python", sys.executable]
    return LaunchProc(args, env={"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")})


def stop(proc: LaunchProc) -> None:
    run_id = proc.run_id()
    proc.stop(signal.SIGTERM)
    wait_gone(run_id, 60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--levels", default="1,2,4")
    ap.add_argument("--isl", type=int, default=64)
    ap.add_argument("--osl", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--greedy", type=int, default=6, help="--once prompts compared with DP1 (0: skip)")
    ap.add_argument("--greedy-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "profiling/results/pd-ep2-vs-mixed-cpu.json")
    args = ap.parse_args()
    from widep.tinymoe import ensure_tiny_moe

    model = str(ensure_tiny_moe())
    tmp = Path(tempfile.mkdtemp(prefix="widep-pd-ep2-prof-"))
    topos = topologies(tmp)
    docs = {k: yaml.safe_load(p.read_text()) for k, p in topos.items()}
    budget = {k: core_budget(topos[k], model) for k in ("pd", "mixed")}
    levels = [int(c) for c in args.levels.split(",")]
    runs: dict[str, list[dict[int, dict]]] = {"pd": [], "mixed": []}
    cold: dict[str, list[float]] = {"pd": [], "mixed": []}
    paths: dict[str, list[dict]] = {}
    for i in range(args.runs):
        for key in ("pd", "mixed"):
            t0 = time.monotonic()
            proc = launch(topos[key], tmp / f"run-{key}-{i}", model)
            try:
                proc.wait_for(r"\[router\] ready", 900)
                cold[key].append(round(time.monotonic() - t0, 1))
                print(f"run {i} {key}: ready {cold[key][-1]} s after the launch", flush=True)
                if i == 0 and args.greedy:
                    if key == "pd":
                        paths["pd_ep2"] = greedy(
                            f"http://127.0.0.1:{docs['pd']['router']['port']}", model, args.greedy, args.greedy_tokens
                        )
                    else:
                        for r in range(2):
                            url = f"http://127.0.0.1:{docs['mixed']['serving']['port'] + r}"
                            paths[f"mixed_ep2_rank{r}"] = greedy(url, model, args.greedy, args.greedy_tokens)
                runs[key].append(
                    bench(topos[key], tmp / f"bench-{key}-{i}", args.levels, args.isl, args.osl, args.requests, model)
                )
            finally:
                stop(proc)
    if args.greedy:
        proc = launch(topos["pd1"], tmp / "run-pd1", model)
        try:
            proc.wait_for(r"\[router\] ready", 900)
            paths["pd_dp1_decode"] = greedy(
                f"http://127.0.0.1:{docs['pd1']['router']['port']}", model, args.greedy, args.greedy_tokens
            )
        finally:
            stop(proc)
        argv = [
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--max-num-seqs",
            "16",
            "--max-num-batched-tokens",
            "2048",
            "--max-model-len",
            "1024",
            "--enforce-eager",
        ]
        with start_vllm(argv, {"VLLM_CPU_OMP_THREADS_BIND": "0"}, timeout=600, python=sys.executable) as srv:
            ref = greedy(srv.url, model, args.greedy, args.greedy_tokens)
    table = {
        key: {
            c: {m: statistics.median(r[c][m] for r in rs) for m in METRICS}
            | {"failed": sum(r[c]["failed"] for r in rs)}
            for c in levels
        }
        for key, rs in runs.items()
    }
    result = {
        "machine": f"{os.cpu_count()} cores (shared), CPU vLLM, tiny MoE",
        "runs": args.runs,
        "isl": args.isl,
        "osl": args.osl,
        "requests_per_level": args.requests,
        "core_budget": budget,
        "cold_start_s": {k: {"runs": v, "median": statistics.median(v)} for k, v in cold.items()},
        "median_of_runs": table,
        "raw": runs,
    }
    if args.greedy:
        result["greedy_vs_dp1"] = {k: compare(ref, g) for k, g in paths.items()}
        result["greedy_ids"] = {"dp1": [g["ids"] for g in ref]} | {k: [g["ids"] for g in v] for k, v in paths.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for key, name in (("pd", "P/D+EP2"), ("mixed", "mixed DP2/EP2")):
        print(f"{name}: core budget " + "; ".join(budget[key]))
        print(f"  cold start {cold[key]} s, median {statistics.median(cold[key])} s")
    print(f"medians of {args.runs} runs (isl {args.isl}, osl {args.osl}, {args.requests} requests per level)")
    print(f"{'c':>3} {'P/D TTFT ms':>11} {'mixed':>7} {'P/D TPOT ms':>11} {'mixed':>7} {'P/D tok/s':>9} {'mixed':>7}")
    for c in levels:
        p, m = table["pd"][c], table["mixed"][c]
        print(
            f"{c:>3} {p['ttft_ms']:>11.1f} {m['ttft_ms']:>7.1f} {p['tpot_ms']:>11.1f} {m['tpot_ms']:>7.1f} "
            f"{p['output_tps']:>9.1f} {m['output_tps']:>7.1f}   failed {p['failed']}/{m['failed']}"
        )
    if args.greedy:
        print(f"greedy ids of {args.greedy} --once prompts, {args.greedy_tokens} tokens, against mixed DP1:")
        for k, rows in result["greedy_vs_dp1"].items():
            same = sum(r["equal"] for r in rows)
            diffs = [(r["prompt"], r["first_diff"], r["dp1_gap"]) for r in rows if not r["equal"]]
            print(f"  {k}: {same}/{len(rows)} equal; (prompt, first step apart, DP1 top-2 gap): {diffs}")


if __name__ == "__main__":
    main()
