"""Wide EP carrying tokens: DP2/EP2 of the tiny MoE on real CPU vLLM (with widep's vLLM plugin), one launcher.

* equivalence, both tiny architectures (Qwen3-MoE and DeepSeek-V3/MLA): greedy token ids from every rank of DP2/EP2,
  asked one at a time, equal those of DP1 without EP; asked all at once (uneven batches across ranks) they equal them
  or leave them only at a near tie of DP1's two best tokens;
* the Qwen3-MoE deployment (``widep launch`` of the built-in default topology, with vllm-router in front) is then
  shared, in file order, by: uneven load (one rank only, the other idles on dummy batches), concurrent load through
  the router with ``widep bench --topology`` (token counts equal to vLLM's counters), per-rank tok/s with
  ``--bypass-router``, SIGKILL of one rank's engine mid-stream (errors recorded, no hang, group restarts in step, the
  next level passes) and SIGTERM (no process left);
* TP=2 + EP on one rank equals DP1.

Cost: 5 deployments (DP1 + DP2/EP2 per architecture, TP2+EP; 8 vLLM processes), about 8-10 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from launch_helpers import ROOT, LaunchProc, free_ports, processes_of_run, wait_gone
from vllm_helpers import start_vllm

pytestmark = pytest.mark.vllm

PROMPTS = [
    "Wide expert parallelism is",
    "The quick brown fox",
    "1 2 3 4 5",
    "Hello",
    "Experts are routed to ranks by",
    "a a a a a a a a a a a a a a a a a a a a a a a a a a a a",
]
MAX_TOKENS = 12


def ep2_topology(tmp: Path, name: str, router: bool, dtype: str | None = None) -> tuple[Path, dict]:
    """The built-in default (topologies/tiny-moe-cpu-ep2.yaml) with fresh ports (and a router, a dtype when asked)."""
    doc = yaml.safe_load((ROOT / "topologies" / "tiny-moe-cpu-ep2.yaml").read_text())
    if dtype:
        doc["roles"][0]["extra_args"] = ["--dtype", dtype]
    port, rpc, control, rport, prom = free_ports(5)
    doc["name"] = name
    doc["serving"].update({"port": port, "rpc_port": rpc, "control_port": control})
    if router:
        doc["router"] = {
            "enabled": True,
            "node": 0,
            "host": "node",
            "port": rport,
            "prometheus_port": prom,
            "policy": "round_robin",
        }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, doc


def rank_urls(doc: dict) -> list[str]:
    return [f"http://127.0.0.1:{doc['serving']['port'] + i}" for i in range(2)]


def post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


NEAR_TIE = 0.01
"""Largest gap (in logprob) between DP1's two best tokens at which a batched EP2 run may pick the other one."""


def greedy(url: str, model: str, prompt: str) -> tuple[list[int], list[dict[str, float]]]:
    """Greedy token ids and, per step, the two best tokens (``token_id:N``) with their logprobs."""
    out = post(
        url,
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "return_token_ids": True,
            "ignore_eos": True,
            "logprobs": 2,
            "return_tokens_as_token_ids": True,
        },
    )
    choice = out["choices"][0]
    return list(choice["token_ids"]), list(choice["logprobs"]["top_logprobs"])


def greedy_ids(url: str, model: str, prompt: str) -> list[int]:
    return greedy(url, model, prompt)[0]


def near_tie(ref: tuple[list[int], list[dict[str, float]]], got: list[int]) -> bool:
    """``got`` equals the reference ids, or first leaves them where DP1's two best tokens were within NEAR_TIE and
    ``got`` took the other one (a rounding-level difference, after which the continuations legitimately differ)."""
    ids, tops = ref
    if got == ids:
        return True
    i = next(k for k in range(min(len(ids), len(got))) if ids[k] != got[k])
    top = tops[i]
    a, b = f"token_id:{ids[i]}", f"token_id:{got[i]}"
    return a in top and b in top and abs(top[a] - top[b]) <= NEAR_TIE


def all_at_once(urls: list[str], model: str) -> dict[tuple[str, str], list[int]]:
    """Every prompt to every rank at the same time: the ranks' batches differ in size step by step."""
    got: dict[tuple[str, str], list[int]] = {}
    errors: list[Exception] = []

    def one(u: str, p: str) -> None:
        try:
            got[(u, p)] = greedy_ids(u, model, p)
        except (OSError, ValueError, KeyError) as err:  # collected, asserted in the test thread
            errors.append(err)

    threads = [threading.Thread(target=one, args=(u, p)) for u in urls for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    return got


def generation_tokens(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    vals = re.findall(r"^vllm:generation_tokens_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.MULTILINE)
    assert vals, "vllm:generation_tokens_total missing from /metrics"
    return sum(float(v) for v in vals)


def dp1_reference(model_dir: Path, python: str, dtype: str | None = None) -> dict[str, tuple[list[int], list]]:
    """Greedy ids of every prompt from one rank without EP (tiny-moe-cpu.yaml's engine settings)."""
    argv = [
        "--model",
        str(model_dir),
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        "16",
        "--max-num-batched-tokens",
        "2048",
    ] + (["--dtype", dtype] if dtype else [])
    with start_vllm(
        argv, {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}, python=python, timeout=300
    ) as srv:
        return {p: greedy(srv.url, str(model_dir), p) for p in PROMPTS}


def launch(topo: Path, model_dir: Path, python: str, run_dir: Path, *extra: str) -> LaunchProc:
    return LaunchProc(
        [
            str(topo),
            "--model-path",
            str(model_dir),
            "--python",
            python,
            "--run-dir",
            str(run_dir),
            "--backoff",
            "1",
            "--grace",
            "5",
            *extra,
        ]
    )


def assert_equivalent(ref: dict[str, tuple[list[int], list]], urls: list[str], model: str) -> int:
    """One request at a time: every rank's greedy ids equal DP1's. All at once on both ranks (uneven batches, so
    other GEMM shapes on every rank, as in DP1 with a batch): equal, or first apart at a near tie of DP1's. Returns
    how many of the batched requests left DP1's ids at such a tie."""
    for u in urls:
        for p in PROMPTS:
            assert greedy_ids(u, model, p) == ref[p][0], f"{u} differs from DP1 on {p!r}"
    ties = 0
    for (u, p), ids in all_at_once(urls, model).items():
        assert near_tie(ref[p], ids), (
            f"{u} (all prompts at once on both ranks) differs from DP1 on {p!r}: {ids} vs {ref[p]}"
        )
        ties += ids != ref[p][0]
    return ties


# ------------------------------------------------------------------------------------------- the shared deployment


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tiny_moe_dir, vllm_python):
    """DP1 reference ids, then the DP2/EP2 Qwen3-MoE default topology behind vllm-router, one launcher."""
    tmp = tmp_path_factory.mktemp("ep2-qwen")
    ref = dp1_reference(tiny_moe_dir, vllm_python)
    topo, doc = ep2_topology(tmp, "ep2-qwen", router=True)
    lp = launch(topo, tiny_moe_dir, vllm_python, tmp / "run")
    try:
        lp.wait_for(r"ready: ep2-qwen", 300)
        yield {
            "ref": ref,
            "topo": topo,
            "doc": doc,
            "lp": lp,
            "tmp": tmp,
            "model": str(tiny_moe_dir),
            "urls": rank_urls(doc),
            "run_id": lp.run_id(),
        }
    finally:
        lp.stop(signal.SIGKILL)


def test_qwen3_moe_every_rank_of_dp2_ep2_equals_dp1(qwen):
    ties = assert_equivalent(qwen["ref"], qwen["urls"], qwen["model"])
    print(f"\nqwen3_moe bf16: DP2/EP2 == DP1 one at a time; all at once, {ties} of 12 left DP1 at a near tie")


def test_deepseek_v3_every_rank_of_dp2_ep2_equals_dp1(tiny_moe, vllm_python, tmp_path):
    """In float32. In bfloat16 (the model's dtype) 2 of 6 prompts differ from DP1 at one step, each where the top two
    logprobs of the random-weight model are within one bfloat16 step (DP1 -5.61181 vs -5.61572; EP2 an exact tie),
    from rounding each rank's partial expert sum before the combine (then x2.5, routed_scaling_factor): measured,
    see the closing note of issue 14. float32 removes that rounding and leaves the EP logic to be compared (batched
    requests may still leave DP1 at a near tie: see assert_equivalent)."""
    model_dir = tiny_moe("deepseek_v3")
    ref = dp1_reference(model_dir, vllm_python, dtype="float32")
    topo, doc = ep2_topology(tmp_path, "ep2-dsv3", router=False, dtype="float32")
    lp = launch(topo, model_dir, vllm_python, tmp_path / "run")
    try:
        lp.wait_for(r"ready: ep2-dsv3", 300)
        ties = assert_equivalent(ref, rank_urls(doc), str(model_dir))
        print(f"\ndeepseek_v3 fp32: DP2/EP2 == DP1 one at a time; all at once, {ties} of 12 left DP1 at a near tie")
    finally:
        lp.stop(signal.SIGTERM)
    assert wait_gone(lp.run_id(), 60) == []


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "widep", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _records(out: Path, level: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"level-{level}.requests.jsonl").read_text().splitlines() if line]


def _tok_s(recs: list[dict]) -> float:
    ok = [r for r in recs if r["ok"]]
    t0 = min(r["start_s"] for r in ok)
    t1 = max(r["start_s"] + r["e2e_s"] for r in ok)
    return sum(r["completion_tokens"] for r in ok) / (t1 - t0)


def test_uneven_then_concurrent_load_token_counts_match_vllm(qwen):
    urls, topo, tmp = qwen["urls"], qwen["topo"], qwen["tmp"]
    # ---- one rank only: the other idles (vLLM keeps it in step with dummy batches) and generates nothing
    before = [generation_tokens(u) for u in urls]
    out = tmp / "uneven"
    r = _bench(
        "--endpoint",
        urls[0],
        "--gpus",
        "2",
        "--concurrency",
        "2",
        "--isl",
        "24",
        "--osl",
        "16",
        "--num-requests",
        "6",
        "--warmup",
        "0",
        "--out",
        str(out),
        "--accelerator",
        "cpu",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _records(out, "c2")
    assert len(recs) == 6 and all(x["ok"] for x in recs), [x.get("error") for x in recs]
    after = [generation_tokens(u) for u in urls]
    assert after[0] - before[0] == sum(x["completion_tokens"] for x in recs) == 6 * 16
    assert after[1] == before[1], "the idle rank generated tokens"
    print(f"\nuneven (rank 0 only, c2): {_tok_s(recs):.1f} output tok/s")

    # ---- concurrent load over both ranks through the router (`widep bench --topology`)
    before = after
    out = tmp / "router"
    r = _bench(
        "--topology",
        str(topo),
        "--concurrency",
        "4",
        "--isl",
        "24",
        "--osl",
        "16",
        "--num-requests",
        "12",
        "--warmup",
        "0",
        "--out",
        str(out),
        "--accelerator",
        "cpu",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _records(out, "c4")
    assert len(recs) == 12 and all(x["ok"] for x in recs), [x.get("error") for x in recs]
    assert {x["endpoint"] for x in recs} == {f"http://127.0.0.1:{qwen['doc']['router']['port']}"}
    after = [generation_tokens(u) for u in urls]
    deltas = [a - b for a, b in zip(after, before, strict=False)]
    assert sum(deltas) == sum(x["completion_tokens"] for x in recs) == 12 * 16
    assert all(d > 0 for d in deltas), f"the router left a rank idle: {deltas}"
    summary = json.loads((out / "level-c4.summary.json").read_text())["summary"]
    print(
        f"router (both ranks, c4): {summary['output_tps']:.1f} output tok/s per deployment "
        f"({summary['output_tps_per_gpu']:.1f} per rank)"
    )

    # ---- the same, straight to every API server: tok/s per rank
    before = after
    out = tmp / "bypass"
    r = _bench(
        "--topology",
        str(topo),
        "--bypass-router",
        "--concurrency",
        "4",
        "--isl",
        "24",
        "--osl",
        "16",
        "--num-requests",
        "12",
        "--warmup",
        "0",
        "--out",
        str(out),
        "--accelerator",
        "cpu",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _records(out, "c4")
    assert all(x["ok"] for x in recs) and {x["endpoint"] for x in recs} == set(urls)
    after = [generation_tokens(u) for u in urls]
    for u, b, a in zip(urls, before, after, strict=False):
        mine = [x for x in recs if x["endpoint"] == u]
        assert a - b == sum(x["completion_tokens"] for x in mine)
        print(f"bypass-router c4, {u}: {_tok_s(mine):.1f} output tok/s")
    print(f"bypass-router c4, deployment: {_tok_s(recs):.1f} output tok/s")


def _engine_pid(run_id: str, dp_rank: int) -> int:
    """The engine-core process (title VLLM::EngineCore) that rank ``dp_rank``'s API server started.

    Found by parent pid: the engine's title (setproctitle) overwrites its environment block, so WIDEP_RUN_ID
    cannot be read from it."""
    api = []
    for pid in processes_of_run(run_id):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        server = b"vllm.entrypoints.openai.api_server" in cmd and b"widep.run.guard" not in cmd
        if server and cmd[cmd.index(b"--data-parallel-rank") + 1] == str(dp_rank).encode():
            api.append(pid)
    assert len(api) == 1, f"rank {dp_rank}'s API server: {api}"
    engines = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == api[0] and cmd.startswith(b"VLLM::EngineCore"):
            engines.append(int(entry.name))
    assert len(engines) == 1, f"rank {dp_rank}'s engine core: {engines}"
    return engines[0]


def test_engine_sigkill_mid_stream_fails_in_flight_requests_group_restarts_next_level_passes(qwen):
    urls, topo, tmp, lp, run_id = qwen["urls"], qwen["topo"], qwen["tmp"], qwen["lp"], qwen["run_id"]
    out = tmp / "fault"
    before = generation_tokens(urls[1])
    bench = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "widep",
            "bench",
            "--topology",
            str(topo),
            "--bypass-router",
            "--concurrency",
            "4",
            "--isl",
            "16",
            "--osl",
            "400",
            "--num-requests",
            "8",
            "--warmup",
            "0",
            "--request-timeout",
            "240",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while generation_tokens(urls[1]) - before < 20:  # mid-stream: rank 1 has streamed some tokens
            assert time.monotonic() < deadline and bench.poll() is None, "load never reached rank 1"
            time.sleep(0.2)
        engine = _engine_pid(run_id, 1)
        os.kill(engine, signal.SIGKILL)
        t_kill = time.monotonic()
        out_text, _ = bench.communicate(timeout=300)  # no hang: the level ends with the in-flight requests failed
    finally:
        if bench.poll() is None:
            bench.kill()
    # no hang: every request of the level is recorded; the killed engine's group fails them all in a few seconds
    # (rank 0's engine follows its dead peer), so bench usually marks the whole level failed (exit 1)
    assert bench.returncode in (0, 1), out_text[-3000:]
    recs = _records(out, "c4")
    assert len(recs) == 8
    failed = [x for x in recs if not x["ok"]]
    assert failed, "killing an engine mid-stream failed no request"
    assert all(x["error"] for x in failed)
    if bench.returncode == 1:
        assert "no request of the level succeeded" in (out / "level-c4.failure.json").read_text()
    lp.wait_for(r"attempt 0 failed", 120)
    lp.wait_for(r"attempt 1: started serve/0, serve/1", 120)
    lp.wait_for(r"ready: ep2-qwen", 300, count=2)
    t_ready = time.monotonic()
    print(
        f"\nengine SIGKILL -> group healthy again: {t_ready - t_kill:.1f} s; "
        f"{len(failed)} of {len(recs)} requests failed, e.g. {failed[0]['error'][:120]!r}"
    )
    assert _engine_pid(run_id, 1) != engine
    # the next load level passes on the restarted group, straight to both ranks (vllm-router in front of a restarted
    # group answered /v1/models with a non-JSON body once here: its recovery is not asserted)
    out2 = tmp / "after-restart"
    r = _bench(
        "--topology",
        str(topo),
        "--bypass-router",
        "--concurrency",
        "2",
        "--isl",
        "16",
        "--osl",
        "8",
        "--num-requests",
        "4",
        "--warmup",
        "0",
        "--out",
        str(out2),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(x["ok"] for x in _records(out2, "c2"))


def test_sigterm_leaves_no_process(qwen):
    lp, run_id = qwen["lp"], qwen["run_id"]
    assert processes_of_run(run_id)
    assert lp.stop(signal.SIGTERM) == 0
    assert wait_gone(run_id, 60) == []


def test_tp2_with_expert_parallel_equals_dp1(qwen, vllm_python):
    """TP=2 + EP on one rank (two CPU workers, experts split over them, expert_map through the plugin): the greedy
    ids equal DP1's. Runs after the shared DP2/EP2 deployment is stopped (file order)."""
    tmp = qwen["tmp"]
    topo, doc = ep2_topology(tmp, "tp2-ep", router=False)
    doc["roles"][0]["tp"] = 2
    topo.write_text(yaml.safe_dump(doc, sort_keys=False))
    lp = launch(topo, Path(qwen["model"]), vllm_python, tmp / "tp2-run")
    try:
        lp.wait_for(r"ready: tp2-ep", 300)
        url = f"http://127.0.0.1:{doc['serving']['port']}"
        for p in PROMPTS:
            assert greedy_ids(url, qwen["model"], p) == qwen["ref"][p][0], f"TP2+EP differs from DP1 on {p!r}"
    finally:
        lp.stop(signal.SIGTERM)
    assert wait_gone(lp.run_id(), 60) == []
