"""P/D disaggregation with a real KV hand-off on the CPU: prefill and decode vLLM ranks started by `widep launch`
behind vllm-router in P/D mode (topologies/tiny-moe-cpu-pd.yaml), one deployment shared by every assertion.

The connector is vLLM's own NixlConnector with NIXL 1.5.1 from PyPI (the `nixl` extra): its UCX backend registers
the CPU KV cache as DRAM (`kv_buffer_device: cpu`, the only buffer vLLM 0.32 allows on the CPU backend) and moves
blocks between the two processes over UCX's shared-memory/TCP transports, with no CUDA on the machine. It is the
connector real deployments use; what this machine cannot exercise is the GPU side (VRAM registration, RDMA).

The hand-off is proved from vLLM's own Prometheus counters, not from timing: the prefill rank computes the prompt
tokens (prompt_tokens_by_source{source="local_compute"}); the decode rank reports them as
source="external_kv_transfer" and runs NIXL transfers (nixl_xfer_time_seconds_count, nixl_bytes_transferred),
computing at most the last prompt token itself. Greedy token ids through the router equal those of an aggregated
(mixed) vLLM of the same model. Faults: each role's API server is SIGKILLed under load; requests fail with an HTTP
error (kv_load_failure_policy: fail) rather than hang or answer wrongly, the launcher restarts that group, service
resumes through the router, and no process of the run is left at the end.

Cost: about 4-8 minutes on 2 cores (one mixed reference server, the P/D pair started once and each role restarted
once).
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
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from launch_helpers import ROOT, LaunchProc, free_ports, pd_topology_copy, processes_of_run, wait_gone
from vllm_helpers import start_vllm

from widep.run.host import pd_smoke_body, pd_smoke_prompt

pytestmark = pytest.mark.vllm

TOPOLOGY = "tiny-moe-cpu-pd.yaml"
SENTENCE = "Prefill computes the prompt once and hands its KV blocks to decode over NIXL. "
# distinct from their first token on: no prompt shares a prefix-cache block with another
PROMPTS = [f"Case {n}. " + SENTENCE * n for n in (1, 3, 6, 12)]
MAX_TOKENS = 8
SMOKE_PROMPT = "Wide expert parallelism is"  # widep launch --prompt's default
SMOKE_TOKENS = 16  # and the --once completion's length
SMOKE_REFERENCE = 5  # round-robin over 2 decode ranks needs 2 requests (and --once retries at most 2 failures)


NEAR_TIE = 0.01
"""Largest gap (logprob) of DP1's two best tokens at which EP2 may pick the other one (tests/test_wide_ep.py's)."""


def ep2_near_tie(ref_choice: dict, got: list[int]) -> bool:
    """``got`` equals the DP1 reference's ids, or first leaves them where DP1's two best tokens were within NEAR_TIE
    and ``got`` took the other one (a rounding-level difference; the continuations then legitimately differ)."""
    ids, tops = ref_choice["token_ids"], ref_choice["logprobs"]["top_logprobs"]
    if got == ids:
        return True
    k = next(k for k in range(min(len(ids), len(got))) if ids[k] != got[k])
    a, b = f"token_id:{ids[k]}", f"token_id:{got[k]}"
    return a in tops[k] and b in tops[k] and abs(tops[k][a] - tops[k][b]) <= NEAR_TIE


def _post(port: int, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:
        err.msg = f"{err.msg}: {err.read()[:500]!r}"
        raise


def _greedy(port: int, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> dict:
    return _post(
        port,
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )


def metrics(port: int) -> dict[tuple[str, str], float]:
    """vLLM's /metrics as {(name, source label or ''): value}, summed over engines."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[tuple[str, str], float] = {}
    for m in re.finditer(r"^(vllm:[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", text, re.MULTILINE):
        src = re.search(r'source="([a-z_]+)"', m.group(2) or "")
        key = (m.group(1), src.group(1) if src else "")
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def delta(after: dict, before: dict, name: str, source: str = "") -> float:
    return after.get((name, source), 0.0) - before.get((name, source), 0.0)


@pytest.fixture(scope="module")
def mixed_outputs(tiny_moe_dir, vllm_python):
    """Greedy token ids of an aggregated (mixed) vLLM of the same model and flags, no KV connector: for PROMPTS,
    and for the first SMOKE_REFERENCE prompts of the P/D ``--once`` path (one server for both)."""
    argv = [
        "--model",
        str(tiny_moe_dir),
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
    with start_vllm(argv, {"VLLM_CPU_OMP_THREADS_BIND": "0"}, timeout=400, python=vllm_python) as srv:
        # with the two best tokens per step (logprobs do not change the greedy ids): the EP2 comparison's near ties
        smoke = [
            _post(
                srv.port,
                pd_smoke_body(str(tiny_moe_dir), pd_smoke_prompt(i, SMOKE_PROMPT), SMOKE_TOKENS)
                | {"logprobs": 2, "return_tokens_as_token_ids": True},
            )
            for i in range(SMOKE_REFERENCE)
        ]
        return {"pd": [_greedy(srv.port, str(tiny_moe_dir), p) for p in PROMPTS], "smoke": smoke}


@pytest.fixture(scope="module")
def mixed_reference(mixed_outputs):
    return mixed_outputs["pd"]


class PD:
    def __init__(self, launch: LaunchProc, doc: dict, path: Path, model: str) -> None:
        self.launch, self.doc, self.path, self.model = launch, doc, path, model
        self.prefill_port = doc["roles"][0]["port"]
        self.decode_port = doc["roles"][1]["port"]
        self.router_port = doc["router"]["port"]
        self.run_dir = path.parent / "run"

    def server_pid(self, port: int) -> int:
        """The API server of the rank serving ``port`` (not its guard)."""
        for pid in processes_of_run(self.launch.run_id()):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                b"vllm.entrypoints.openai.api_server" in cmd
                and b"widep.run.guard" not in cmd
                and cmd[cmd.index(b"--port") + 1] == str(port).encode()
            ):
                return pid
        raise AssertionError(f"no API server on port {port}:\n{self.launch.output()}")


@pytest.fixture(scope="module")
def pd(tiny_moe_dir, vllm_python, mixed_reference, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pd")
    doc = yaml.safe_load((ROOT / "topologies" / TOPOLOGY).read_text())
    p_http, d_http, p_rpc, d_rpc, control, p_side, d_side, rport, prom = free_ports(9)
    doc["roles"][0].update({"port": p_http, "rpc_port": p_rpc, "nixl_side_channel_port": p_side})
    doc["roles"][1].update({"port": d_http, "rpc_port": d_rpc, "nixl_side_channel_port": d_side})
    doc["serving"].update({"port": p_http, "control_port": control})
    doc["router"].update({"port": rport, "prometheus_port": prom})
    path = tmp / TOPOLOGY
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    launch = LaunchProc(
        [
            str(path),
            "--node",
            "0",
            "--run-dir",
            str(tmp / "run"),
            "--model-path",
            str(tiny_moe_dir),
            "--python",
            vllm_python,
            "--backoff",
            "1",
        ],
        env=env,
    )
    try:
        launch.wait_for(r"ready: tiny-moe-cpu-pd", 600)
        yield PD(launch, doc, path, str(tiny_moe_dir))
    finally:
        run_id = launch.run_id() if launch.proc.poll() is None or launch.lines else None
        launch.stop(signal.SIGTERM)
        print("--- widep launch output (tail) ---\n" + launch.output())
        if run_id:
            left = wait_gone(run_id, 60)
            launch.stop(signal.SIGKILL)
            assert left == [], f"processes of run {run_id} outlived the launcher: {left}"


def test_handoff_proved_by_vllm_counters_and_greedy_ids_match_mixed(pd, mixed_reference):
    before_p, before_d = metrics(pd.prefill_port), metrics(pd.decode_port)
    outs = [_greedy(pd.router_port, pd.model, p) for p in PROMPTS]  # one at a time: batch shapes as in the reference
    after_p, after_d = metrics(pd.prefill_port), metrics(pd.decode_port)
    n_prompt = sum(o["usage"]["prompt_tokens"] for o in outs)
    n = len(PROMPTS)
    print(
        f"prompt tokens {n_prompt}; prefill local_compute "
        f"{delta(after_p, before_p, 'vllm:prompt_tokens_by_source_total', 'local_compute')}; decode "
        + ", ".join(
            f"{s} {delta(after_d, before_d, 'vllm:prompt_tokens_by_source_total', s)}"
            for s in ("local_compute", "local_cache_hit", "external_kv_transfer")
        )
        + f"; decode NIXL transfers {delta(after_d, before_d, 'vllm:nixl_xfer_time_seconds_count')}, bytes "
        f"{delta(after_d, before_d, 'vllm:nixl_bytes_transferred_sum')}"
    )
    # the prefill rank computed every prompt token and generated only the first token of each request
    assert delta(after_p, before_p, "vllm:prompt_tokens_by_source_total", "local_compute") == n_prompt
    assert delta(after_p, before_p, "vllm:generation_tokens_total") == n
    assert delta(after_p, before_p, "vllm:nixl_xfer_time_seconds_count") == 0  # decode pulls; prefill serves
    # the decode rank received the prompt's KV from the connector and computed at most the last token per request
    received = delta(after_d, before_d, "vllm:prompt_tokens_by_source_total", "external_kv_transfer")
    computed = delta(after_d, before_d, "vllm:prompt_tokens_by_source_total", "local_compute")
    assert computed <= n and received >= n_prompt - n and received + computed == n_prompt
    assert delta(after_d, before_d, "vllm:prompt_tokens_by_source_total", "local_cache_hit") == 0
    assert delta(after_d, before_d, "vllm:nixl_xfer_time_seconds_count") >= n
    assert delta(after_d, before_d, "vllm:nixl_bytes_transferred_sum") > 0
    assert delta(after_d, before_d, "vllm:nixl_num_failed_transfers_total") == 0
    assert delta(after_d, before_d, "vllm:generation_tokens_total") == n * MAX_TOKENS
    # and its log shows the NIXL handshake with the prefill engine (vLLM checks the peer's compatibility hash)
    logs = list(pd.run_dir.glob("attempt-*/decode/rank-0/vllm.log"))
    assert any("NIXL compatibility check passed" in p.read_text(errors="replace") for p in logs), logs
    # same greedy tokens as the aggregated deployment
    for prompt, got, ref in zip(PROMPTS, outs, mixed_reference, strict=True):
        assert got["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
        assert got["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"], prompt


def test_bench_topology_over_pd_writes_reports_with_ttft_itl(pd, tmp_path, capsys):
    from widep.bench.report import read_records
    from widep.cli import main

    out = tmp_path / "bench"
    rc = main(
        [
            "bench",
            "--topology",
            str(pd.path),
            "--concurrency",
            "1,2,4",
            "--isl",
            "64",
            "--osl",
            "8",
            "--num-requests",
            "4",
            "--warmup",
            "1",
            "--out",
            str(out),
            "--scrape-interval",
            "0",
            "--accelerator",
            "cpu",
            "--model",
            pd.model,
            "--tokenizer",
            pd.model,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    streamed = []
    for level in ("c1", "c2", "c4"):
        recs = read_records(out / f"level-{level}.requests.jsonl")
        assert len(recs) == 4 and all(r.ok for r in recs), [r.error for r in recs]
        assert all(r.completion_tokens == 8 and r.ttft_s > 0 for r in recs)
        # one inter-token gap per pair of streamed chunks
        assert all(len(r.itls_s) == r.chunks - 1 for r in recs), [(r.chunks, r.itls_s) for r in recs]
        streamed += [r.chunks for r in recs]
        assert (out / f"level-{level}.report.yaml").is_file()
    # vLLM's API server sends what the engine has made since its last send as one chunk: 8 tokens decoded in a few
    # ms often arrive together (6 of 12 requests in one run), so ITLs are asked of the run, not of every request
    assert any(c > 1 for c in streamed), streamed


class Load:
    """Completions through the router from one thread until stopped: (time, ok, what) per request."""

    def __init__(self, pd: PD) -> None:
        self.pd, self.results, self.stop_ev = pd, [], threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        i = 0
        while not self.stop_ev.is_set():
            i += 1
            t0 = time.monotonic()
            try:
                o = _greedy(self.pd.router_port, self.pd.model, f"{SENTENCE * 4} request {i}", 16)
                good = o["usage"]["completion_tokens"] == 16 and len(o["choices"][0]["token_ids"]) == 16
                self.results.append((t0, time.monotonic() - t0, good, "ok" if good else f"short answer {o}"))
            except urllib.error.HTTPError as err:
                self.results.append((t0, time.monotonic() - t0, False, f"HTTP {err.code}"))
                time.sleep(0.2)  # a client backing off, not a loop hammering the router on 2 cores
            except OSError as err:
                self.results.append((t0, time.monotonic() - t0, False, f"{type(err).__name__}: {err}"))
                time.sleep(0.2)

    def finish(self) -> list:
        self.stop_ev.set()
        self.t.join(150)
        return self.results


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_rank_killed_under_load_fails_cleanly_restarts_and_resumes(pd, role):
    port = pd.prefill_port if role == "prefill" else pd.decode_port
    ready_before = sum(1 for line in pd.launch.lines if re.search(r"ready: tiny-moe-cpu-pd", line))
    load = Load(pd)
    time.sleep(3)
    os.kill(pd.server_pid(port), signal.SIGKILL)
    killed_at = time.monotonic()
    pd.launch.wait_for(rf"\[{role}\] attempt 0 failed", 120)
    pd.launch.wait_for(r"ready: tiny-moe-cpu-pd", 600, count=ready_before + 1)
    # the router re-admits the restarted server after its health checks; then every request must succeed
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        tail = [r for r in load.results if r[0] > time.monotonic() - 20]
        if len(tail) >= 3 and all(r[2] for r in tail[-3:]):
            break
        time.sleep(1)
    results = load.finish()
    during = [r for r in results if r[0] + r[1] >= killed_at]
    failed = [r for r in during if not r[2]]
    print(
        f"{role} killed: {len(results)} requests, {len(during)} after the kill, {len(failed)} failed: "
        f"{sorted({r[3] for r in failed})}; slowest {max(r[1] for r in results):.1f} s"
    )
    assert all(r[2] for r in results[-3:]), f"service did not resume after {role} restart: {results[-5:]}"
    # failures are clean errors (HTTP status or refused connection), never a wrong or truncated answer, never a hang
    assert not [r for r in results if r[3].startswith("short answer")]
    assert all(r[1] < 120 for r in results)
    assert len(during) >= 3, "the load stopped at the kill"


def test_once_with_dp2_ep2_decode_group_hands_kv_to_both_decode_ranks_and_matches_mixed(
    tiny_moe_dir, vllm_python, mixed_outputs, tmp_path
):
    """`widep launch tiny-moe-cpu-pd-dp2.yaml --once`: 1 prefill + DP2/EP2 decode (3 engines on cluster.cpu_cores 2)
    behind the P/D router; every decode rank decodes a request whose prompt KV came from the prefill rank, and the
    greedy ids equal the mixed server's."""
    path = pd_topology_copy("tiny-moe-cpu-pd-dp2.yaml", tmp_path)
    env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    args = [str(path), "--once", "--node", "0", "--run-dir", str(tmp_path / "run"), "--model-path", str(tiny_moe_dir)]
    launch = LaunchProc([*args, "--python", vllm_python], env=env)
    try:
        rc = launch.proc.wait(timeout=900)
        launch.t.join(10)
    finally:
        run_id = launch.run_id() if launch.lines else None
        launch.stop(signal.SIGKILL)
        print("--- widep launch --once output (tail) ---\n" + launch.output())
    assert rc == 0, launch.output()
    assert run_id and wait_gone(run_id, 60) == []
    out = "\n".join(launch.lines)
    served = re.findall(
        r"request (\d+) \(.*prefill prefill/0 \(computed (\d+)\) -> decode (decode/[01]) "
        r"\(external KV (\d+) tokens, computed (\d+), NIXL transfers (\d+), (\d+) bytes\)\n\s+token ids: (\[[^]]*\])",
        out,
    )
    assert {m[2] for m in served} == {"decode/0", "decode/1"}, out
    assert re.search(r"requests with external KV per decode rank: decode/0 [1-9]\d*, decode/1 [1-9]", out), out
    for i, computed, _, external, dec_computed, xfers, nbytes, ids in served:
        ref = mixed_outputs["smoke"][int(i)]
        n_prompt = ref["usage"]["prompt_tokens"]
        assert int(computed) == n_prompt and int(external) + int(dec_computed) == n_prompt and int(dec_computed) <= 1
        assert int(xfers) >= 1 and int(nbytes) > 0
        # the whole completion equals DP1's, or first leaves it at a near tie of DP1's two best tokens: decode is EP2
        # (the experts' outputs summed across ranks in another order); profiling/pd_ep2_vs_mixed.py measured it (P/D
        # with a DP1 decode rank equals DP1 on 6 of 6 prompts x 32 tokens; P/D+EP2 and mixed DP2/EP2 each left DP1 on
        # 1 of 6, at DP1 gaps of 0.0039 and 0.0 logprob, where EP2 itself saw an exact tie)
        got, want = json.loads(ids), ref["choices"][0]["token_ids"]
        assert len(got) == SMOKE_TOKENS and ep2_near_tie(ref["choices"][0], got), (i, got, want)


@pytest.mark.timeout(1800)  # two cold starts of the decode group (3 engines on 2 cores) and the load between
def test_chaos_kill_of_a_decode_rank_restarts_the_decode_group_as_one_and_spares_prefill_and_router(
    tiny_moe_dir, vllm_python, tmp_path
):
    """`widep bench chaos tiny-moe-cpu-pd-dp2.yaml --kill decode/1` (fate sharing of the DP2/EP2 decode group):
    SIGKILL of decode/1's API server under streaming load through the P/D router; both decode ranks restart as one
    group (new API servers, next attempt), the prefill rank and the router keep their processes and attempt, the
    router serves again once the group is back, and no process is left."""
    # a 2-core machine shared with other jobs: a start can pass 300 s
    topo = pd_topology_copy("tiny-moe-cpu-pd-dp2.yaml", tmp_path, ready_timeout_s=600)
    argv = [sys.executable, "-m", "widep", "bench", "chaos", str(topo), "--kill", "decode/1", "--at", "5"]
    argv += ["--duration", "30", "--concurrency", "2", "--max-tokens", "16", "--json", "--out", str(tmp_path / "out")]
    argv += ["--model-path", str(tiny_moe_dir), "--python", vllm_python, "--launch-arg=--backoff", "--launch-arg=1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=1500, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    (run,) = out["runs"]
    print(json.dumps(run, indent=1))
    log = Path(run["launch_log"]).read_text(errors="replace")
    assert run["killed_pid"] is not None and run["kill_s"] is not None
    assert run["group_restarted"], log[-3000:]  # decode/0 and decode/1 both serve from new API servers
    assert run["survived"] == {"prefill": True, "router": True}, log[-3000:]
    assert re.search(r"\[decode\] attempt 0 failed", log) and not re.search(r"\[prefill\] attempt 0 failed", log)
    assert "[router] started (start 2)" not in log  # the router was never restarted
    assert run["full_width_s"] is not None and run["served_again_s"] is not None, run
    assert run["served_again_s"] >= run["full_width_s"] - 1.0  # served by the restarted group, not before it
    assert run["orphans"] == 0
    assert run["ok"] + run["failed_before_first_token"] + run["failed_mid_stream"] == run["requests"]
