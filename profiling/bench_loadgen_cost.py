"""What the load generator itself costs, beside `vllm bench serve`, on this machine.

Both clients stream from the same fast local OpenAI-compatible server (widep.bench.echo_server on
uvloop, a separate process, no model: it writes ``--osl`` token chunks as fast as it can). Each
client runs in its own process, and only the load phase is measured:

* CPU seconds per 1,000 streamed requests: ``time.process_time()`` of the client process around
  the load phase (widep: ``LoadGenerator.run_level``; vLLM: ``vllm.benchmarks.serve.benchmark``),
  closed loop at ``--closed-c`` concurrency, and at every open-loop rate.
* Timing error: the server stamps ``time.perf_counter()`` when it writes a request's first and last
  token chunk; the client records when it read them (start + TTFT, start + last-token latency).
  perf_counter is CLOCK_MONOTONIC, shared by the processes of one host, so the difference is how
  late the client saw the event (kernel loopback + client event-loop delay). Requests are matched
  by a hash of the prompt, which the server echoes as the first token.
* Send lag (widep only): actual send time minus the Poisson arrival time it was scheduled for.
* Variants: widep on uvloop (its default when installed), on asyncio's own loop, and with the
  1 ms arrival spin (``LoadOptions.arrival_spin_s``) turned on.
* A rate is *sustained* when every request succeeds, the achieved send rate is within 2 % of the
  schedule, and the p99 first-token timing error (and, for widep, p99 send lag) is under 1 ms;
  "p50 only" when that holds for the medians but not the p99s. Medians over ``--reps`` runs.

    .venv/bin/python profiling/bench_loadgen_cost.py            # full run (~6 min on 2 cores)
    .venv/bin/python profiling/bench_loadgen_cost.py --quick    # a smoke run

Results are printed as a table and written to profiling/results/bench_loadgen_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
GENERATORS = ("widep-uvloop", "widep-asyncio", "widep-spin", "vllm")


def _pct(vals: list[float], q: float) -> float | None:
    return float(np.percentile(vals, q)) if vals else None


def _words(isl: int) -> str:
    return " ".join(["tok"] * (isl - 1))


def _point_result(
    n: int,
    ok: int,
    cpu_s: float,
    first_send: float,
    last_send: float,
    client_first: dict[str, float],
    client_last: dict[str, float],
    stamps: dict[str, list[float]],
    lags_ms: list[float] | None,
    scheduled_rate: float | None = None,
) -> dict[str, Any]:
    err_first = [(client_first[k] - stamps[k][1]) * 1000 for k in client_first if k in stamps]
    err_last = [(client_last[k] - stamps[k][2]) * 1000 for k in client_last if k in stamps]
    span = last_send - first_send
    return {
        "n": n,
        "ok": ok,
        "matched": len(err_first),
        "cpu_s": cpu_s,
        "cpu_s_per_1000": cpu_s / n * 1000 if n else None,
        "achieved_rate": (n - 1) / span if span > 0 else None,
        "scheduled_rate": scheduled_rate,
        "first_err_ms_p50": _pct(err_first, 50),
        "first_err_ms_p99": _pct(err_first, 99),
        "first_err_ms_max": max(err_first) if err_first else None,
        "last_err_ms_p50": _pct(err_last, 50),
        "last_err_ms_p99": _pct(err_last, 99),
        "send_lag_ms_p50": _pct(lags_ms or [], 50),
        "send_lag_ms_p99": _pct(lags_ms or [], 99),
    }


async def _stamps(url: str, method: str = "GET") -> dict[str, list[float]]:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.request(method, f"{url}/stamps") as r:
            return await r.json() if method == "GET" else {}


# ------------------------------------------------------------------------------------ clients


def client_widep(
    url: str, points: list[dict[str, Any]], tag: str, use_uvloop: bool, spin: bool = False
) -> list[dict[str, Any]]:
    from widep.bench.echo_server import prompt_key
    from widep.bench.loadgen import Level, LoadGenerator, LoadOptions, run_sync
    from widep.bench.workload import Prompt, PromptPool

    async def go() -> list[dict[str, Any]]:
        out = []
        opts = LoadOptions(model="echo", ignore_eos=False, request_timeout_s=120, arrival_spin_s=0.001 if spin else 0.0)
        async with LoadGenerator([url], opts) as gen:
            for k, pt in enumerate(points):
                prefix = f"{tag}p{k}i"
                body = _words(pt["isl"])
                pool = PromptPool([Prompt(f"{prefix}{i} {body}", pt["isl"], pt["osl"]) for i in range(pt["n"])])
                if pt["kind"] == "rate":
                    level = Level("rate", pt["rate"], num_requests=pt["n"])
                else:
                    level = Level("concurrency", pt["c"], num_requests=pt["n"])
                await _stamps(url, "DELETE")
                gc.collect()
                c0 = time.process_time()
                run = await gen.run_level(level, pool)
                cpu = time.process_time() - c0
                stamps = await _stamps(url)
                recs = run.records
                t0 = run.t0_perf
                key = {i: prompt_key(pool.get(i).text) for i in range(pt["n"])}
                first = {key[r.index]: t0 + r.start_s + r.ttft_s for r in recs if r.ok}
                last = {key[r.index]: t0 + r.start_s + r.last_token_s for r in recs if r.ok}
                starts = sorted(r.start_s for r in recs)
                lags = [(r.start_s - r.scheduled_s) * 1000 for r in recs if r.scheduled_s is not None]
                sched = sorted(r.scheduled_s for r in recs if r.scheduled_s is not None)
                sched_rate = (len(sched) - 1) / (sched[-1] - sched[0]) if len(sched) > 1 else None
                res = _point_result(
                    len(recs),
                    sum(r.ok for r in recs),
                    cpu,
                    starts[0],
                    starts[-1],
                    first,
                    last,
                    stamps,
                    lags,
                    sched_rate,
                )
                res["errors"] = sorted({r.error for r in recs if r.error})[:3]
                out.append(res)
        return out

    return run_sync(go(), use_uvloop=use_uvloop)


def client_vllm(
    url: str, points: list[dict[str, Any]], tag: str, tokenizer: str, workdir: Path
) -> list[dict[str, Any]]:
    """vllm bench serve in this process (its random dataset, prompts built before the load phase)."""
    import vllm.benchmarks.serve as serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    measured: dict[str, float] = {}
    original = serve.benchmark

    async def timed(*a: Any, **kw: Any) -> Any:  # only the load phase is measured
        gc.collect()
        c0 = time.process_time()
        try:
            return await original(*a, **kw)
        finally:
            measured["cpu"] = time.process_time() - c0

    serve.benchmark = timed
    out = []
    for k, pt in enumerate(points):
        prefix = f"{tag}p{k}"
        argv = [
            "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", "echo",
            "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(pt["isl"]),
            "--random-output-len", str(pt["osl"]), "--num-prompts", str(pt["n"]),
            "--ready-check-timeout-sec", "0", "--num-warmups", "0", "--disable-tqdm", "--save-result",
            "--save-detailed", "--result-dir", str(workdir), "--result-filename", f"{prefix}.json",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--seed", str(k),
        ]  # fmt: skip
        if pt["kind"] == "rate":
            argv += ["--request-rate", str(pt["rate"])]
        else:
            argv += ["--request-rate", "inf", "--max-concurrency", str(pt["c"])]
        p = FlexibleArgumentParser()
        serve.add_cli_args(p)
        asyncio.run(_stamps(url, "DELETE"))
        serve.main(p.parse_args(argv))
        res_json = json.loads((workdir / f"{prefix}.json").read_text())
        stamps = asyncio.run(_stamps(url))
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        starts = res_json["start_times"]
        for st, ttft, lat, text, err in zip(
            starts,
            res_json["ttfts"],
            res_json["latencies"],
            res_json["generated_texts"],
            res_json["errors"],
            strict=False,
        ):
            if err or not text:
                continue
            key = text.split()[0]  # the echo server's first token is the request's key
            first[key] = st + ttft
            last[key] = st + lat
        ok = sum(1 for e, t in zip(res_json["errors"], res_json["generated_texts"], strict=False) if not e and t)
        srt = sorted(starts)
        res = _point_result(len(starts), ok, measured["cpu"], srt[0], srt[-1], first, last, stamps, None)
        res["errors"] = sorted({e.strip().splitlines()[-1] for e in res_json["errors"] if e})[:3]
        out.append(res)
    return out


# --------------------------------------------------------------------------------------- driver


def _pin(cpu: int | None) -> Any:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def start_server(cpu: int | None) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "widep.bench.echo_server", "--port", "0", "--uvloop"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_pin(cpu),
    )
    line = proc.stdout.readline().strip()  # type: ignore[union-attr]
    if not line.startswith("PORT="):
        raise RuntimeError(f"echo server did not start: {line}")
    return proc, f"http://127.0.0.1:{line[5:]}"


def tokenizer_dir() -> str:
    """A local HF tokenizer for vllm bench serve (it loads one even for custom prompts)."""
    from widep.tinymoe import default_cache_dir, ensure_tiny_moe

    cache = Path(os.environ.get("WIDEP_CACHE") or default_cache_dir())
    return str(ensure_tiny_moe("qwen3_moe", cache))


def run_client(
    gen: str, url: str, points: list[dict[str, Any]], tag: str, tok: str, timeout: float, cpu: int | None
) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as td:
        spec = Path(td) / "spec.json"
        spec.write_text(
            json.dumps({"gen": gen, "url": url, "points": points, "tag": tag, "tokenizer": tok, "workdir": td})
        )
        out = Path(td) / "out.json"
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", VLLM_LOGGING_LEVEL="WARNING")
        r = subprocess.run(
            [sys.executable, __file__, "--_client", str(spec), str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=_pin(cpu),
        )
        if r.returncode != 0:
            raise RuntimeError(f"{gen} client failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())


def median_of(runs: list[list[dict[str, Any]]], key: str, k: int) -> float | None:
    vals = [r[k][key] for r in runs if r[k].get(key) is not None]
    return statistics.median(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="25,50,100,200,400,800,1600", help="open-loop Poisson rates (requests/s)")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each rate point")
    ap.add_argument("--closed-c", type=int, default=32)
    ap.add_argument("--closed-n", type=int, default=2000)
    ap.add_argument("--isl", type=int, default=32, help="prompt words")
    ap.add_argument("--osl", type=int, default=32, help="streamed tokens per request")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--generators", default=",".join(GENERATORS))
    ap.add_argument("--quick", action="store_true", help="2 rates, 1 repetition, small counts")
    ap.add_argument("--pin", action="store_true", help="pin the server to CPU 0 and the clients to CPU 1")
    ap.add_argument("--json-out", default=str(HERE / "results" / "bench_loadgen_cost.json"))
    ap.add_argument("--_client", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._client:
        spec = json.loads(Path(args._client[0]).read_text())
        gen = spec["gen"]
        if gen == "vllm":
            res = client_vllm(spec["url"], spec["points"], spec["tag"], spec["tokenizer"], Path(spec["workdir"]))
        else:
            res = client_widep(
                spec["url"],
                spec["points"],
                spec["tag"],
                use_uvloop=(gen != "widep-asyncio"),
                spin=(gen == "widep-spin"),
            )
        Path(args._client[1]).write_text(json.dumps(res))
        return

    if args.quick:
        args.rates, args.reps, args.closed_n, args.seconds = "50,200", 1, 300, 2.0
    rates = [float(r) for r in args.rates.split(",")]
    gens = [g for g in args.generators.split(",") if g]
    points: list[dict[str, Any]] = [
        {"kind": "closed", "c": args.closed_c, "n": args.closed_n, "isl": args.isl, "osl": args.osl}
    ]
    points += [
        {"kind": "rate", "rate": r, "n": max(50, int(r * args.seconds)), "isl": args.isl, "osl": args.osl}
        for r in rates
    ]
    if "vllm" in gens:
        tok = tokenizer_dir()
    else:
        tok = ""
    pin = args.pin and (os.cpu_count() or 1) >= 2
    server_cpu, client_cpu = (0, 1) if pin else (None, None)
    proc, url = start_server(server_cpu)
    loads = [os.getloadavg()[0]]
    results: dict[str, list[list[dict[str, Any]]]] = {g: [] for g in gens}
    try:
        for rep in range(args.reps):
            for g in gens:  # interleaved, so drift on the machine hits every generator alike
                t = time.time()
                tag = f"{g.replace('-', '')}r{rep}"
                results[g].append(run_client(g, url, points, tag, tok, timeout=1800, cpu=client_cpu))
                loads.append(os.getloadavg()[0])
                print(
                    f"[rep {rep + 1}/{args.reps}] {g}: {time.time() - t:.0f} s, load average {loads[-1]:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)

    # ------------------------------------------------------------------ table (medians of reps)
    def fmt(v: float | None, nd: int = 2) -> str:
        return "-" if v is None else f"{v:.{nd}f}"

    summary: dict[str, Any] = {}
    print()
    print(
        f"Load generator cost on {os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}; "
        f"server: widep echo_server (uvloop, separate process{', CPU 0' if pin else ''}); "
        f"client{' on CPU 1' if pin else ''}; ISL {args.isl} words, OSL {args.osl} tokens; medians of {args.reps} "
        f"run(s); 1-min load average {min(loads):.2f}-{max(loads):.2f} during the runs"
    )
    print()
    hdr = (
        "generator",
        "load",
        "n",
        "ok",
        "CPU s/1000 req",
        "achieved req/s",
        "1st-tok err p50/p99 ms",
        "last-tok err p50/p99 ms",
        "send lag p50/p99 ms",
        "<1 ms",
    )
    rows = []
    for g in gens:
        runs = results[g]
        best = best50 = None
        summary[g] = {"points": []}
        for k, pt in enumerate(points):
            m = {key: median_of(runs, key, k) for key in runs[0][k] if key != "errors"}
            m["errors"] = sorted({e for r in runs for e in r[k].get("errors", [])})[:3]
            load = f"closed c={pt['c']}" if pt["kind"] == "closed" else f"rate {pt['rate']:g}/s"
            sustained = typical = None
            if pt["kind"] == "rate":
                # widep draws a Poisson schedule and is judged against it; vLLM rescales its draws so
                # that the schedule spans exactly n / rate, and is judged against the rate
                target = m.get("scheduled_rate") or pt["rate"]
                on_rate = m["achieved_rate"] is not None and abs(m["achieved_rate"] / target - 1) <= 0.02

                def lag_ok(q: str, m: dict = m) -> bool:
                    return m[f"send_lag_ms_{q}"] is None or m[f"send_lag_ms_{q}"] < 1.0

                base = m["ok"] == m["n"] and on_rate and m["first_err_ms_p99"] is not None
                sustained = bool(base and m["first_err_ms_p99"] < 1.0 and lag_ok("p99"))
                typical = bool(base and m["first_err_ms_p50"] < 1.0 and lag_ok("p50"))
                if sustained:
                    best = pt["rate"]
                if typical:
                    best50 = pt["rate"]
            summary[g]["points"].append({"load": load, **pt, **m, "sustained_p99": sustained, "sustained_p50": typical})
            rows.append(
                (
                    g,
                    load,
                    fmt(m["n"], 0),
                    fmt(m["ok"], 0),
                    fmt(m["cpu_s_per_1000"]),
                    fmt(m["achieved_rate"], 1),
                    f"{fmt(m['first_err_ms_p50'])}/{fmt(m['first_err_ms_p99'])}",
                    f"{fmt(m['last_err_ms_p50'])}/{fmt(m['last_err_ms_p99'])}",
                    f"{fmt(m['send_lag_ms_p50'])}/{fmt(m['send_lag_ms_p99'])}",
                    "" if sustained is None else ("yes" if sustained else ("p50 only" if typical else "no")),
                )
            )
        summary[g]["max_sustained_rate_p99"] = best
        summary[g]["max_sustained_rate_p50"] = best50
        summary[g]["cpu_s_per_1000_closed"] = summary[g]["points"][0]["cpu_s_per_1000"]
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *rows, strict=False)]
    line = "  ".join(h.ljust(w) for h, w in zip(hdr, widths, strict=False))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=False)))
    print()
    for g in gens:
        print(
            f"{g}: {fmt(summary[g]['cpu_s_per_1000_closed'])} CPU s per 1000 streamed requests "
            f"(closed loop c={args.closed_c}); highest rate held with timing error < 1 ms: "
            f"p99 {summary[g]['max_sustained_rate_p99'] or 'none tried'}, "
            f"p50 {summary[g]['max_sustained_rate_p50'] or 'none tried'} req/s"
        )
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "script": "profiling/bench_loadgen_cost.py",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "pinned": pin,
        "load_average_1min": loads,
        "summary": summary,
        "raw": results,
    }
    out.write_text(json.dumps(doc, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
