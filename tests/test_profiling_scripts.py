"""The GPU microbenchmarks of profiling/gpu/ and their committed results.

The benchmarks themselves need GPUs, which neither this machine nor CI has. What runs here is their real
CPU path (``--cpu-smoke``: torch.distributed with the gloo backend over real processes started by torchrun,
tiny shapes, the Triton kernel in Triton's interpreter), driven through run_all.sh exactly as on the GPU
node, so the scripts, their correctness checks and the calibration step cannot rot. The committed H100
results (profiling/results/) are checked for internal consistency, and make_calibration must reproduce the
committed calibration file from them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "profiling" / "gpu"
RESULTS = ROOT / "profiling" / "results"
sys.path.insert(0, str(GPU))

import make_calibration as mc  # noqa: E402


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """run_all.sh in SMOKE mode: every benchmark's CPU path, then make_calibration, into one folder."""
    out = tmp_path_factory.mktemp("smoke")
    env = _env() | {"SMOKE": "1", "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(GPU / "run_all.sh")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def _load(p: Path) -> dict:
    return json.loads(p.read_text())


def test_smoke_writes_every_file(smoke):
    names = sorted(p.name for p in smoke.iterdir())
    assert names == [
        "a2a-cpux2.json",
        "calibration-cpux2.json",
        "gemm-cpux1.json",
        "hbm-cpux1.json",
        "moe-layer-cpux2.json",
        "run_all.log",
    ]
    for n in names[:-1]:
        doc = _load(smoke / n)
        if n.startswith("calibration"):
            assert doc["format"] == mc.FORMAT and doc["card"] == "cpu"
        else:
            assert doc["meta"]["card"] == "cpu" and doc["meta"]["date"] and doc["meta"]["torch"]


def test_smoke_a2a_counts_are_consistent(smoke):
    doc = _load(smoke / "a2a-cpux2.json")
    cfg = doc["config"]
    assert cfg["dispatch_bytes_per_row"] == cfg["hidden"] + cfg["hidden"] // 128 * 4
    ep2 = doc["backends"]["gloo"]["ep"]["2"]
    assert doc["backends"]["deep_ep"]["importable"] in (True, False)
    for row in ep2["expert"]:
        # one row per (token, expert) pair: exactly tokens*topk rows leave every rank
        assert row["rows_per_rank"] == row["tokens"] * cfg["topk"]
        assert row["dispatch_bytes_per_rank"] == row["rows_per_rank"] * cfg["dispatch_bytes_per_row"]
        assert row["dispatch"]["n"] == cfg["iters"] and row["dispatch"]["median_us"] > 0
        assert row["remote_rows_per_rank"] <= row["rows_per_rank"]
    for row in ep2["rank"]:
        # deduplicated per destination rank: between 1 and min(topk, ep) rows per token
        assert row["tokens"] <= row["rows_per_rank"] <= row["tokens"] * min(cfg["topk"], 2)


def test_smoke_kernel_checks_pass(smoke):
    gemm = _load(smoke / "gemm-cpux1.json")
    ran = {k: v for k, v in gemm["variants"].items() if v["available"]}
    assert {"bf16_bmm", "bf16_grouped_mm"} <= set(ran)
    for name, v in ran.items():
        assert all(c["ok"] for c in v["check"].values()), (name, v["check"])
        assert all("tflops" in p for p in v["points"]), name
    for name, v in gemm["variants"].items():
        if not v["available"]:
            assert v["error"], name  # an unavailable kernel says why

    hbm = _load(smoke / "hbm-cpux1.json")["results"]
    assert hbm["copy"]["gbps"] > 0 and hbm["read"]["gbps"] > 0
    if hbm["triton"]["usable"]:
        assert hbm["paged_read"] and all(p["check_ok"] for p in hbm["paged_read"])
    assert {p["block_size"] for p in hbm["paged_gather_torch"]} == {16, 1}

    moe = _load(smoke / "moe-layer-cpux2.json")
    assert moe["check"]["ok"] and moe["check"]["max_rel_err"] < 2e-2
    assert [r["tokens"] for r in moe["results"]] == [1, 8, 32]
    for r in moe["results"]:
        assert set(r["phases"]) == set(moe["config"]["phases"])


def test_smoke_calibration_has_every_section(smoke):
    cal = _load(smoke / "calibration-cpux2.json")
    for key in ("hbm_gbps_effective", "hbm", "gemm", "a2a", "moe_layer", "model_check"):
        assert key in cal, key
    assert cal["gemm"]["bf16"]["impl"] in mc.BF16_PREFERENCE
    assert [r["tokens"] for r in cal["model_check"]] == [1, 8, 32]


def test_moe_layer_loop_path_matches_reference(tmp_path):
    """The loop-of-mm expert path (used where torch._grouped_mm fails) passes the same reference check."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(GPU / "moe_layer_bench.py"),
            "--cpu-smoke",
            "--gemm",
            "loop",
            "--dispatch",
            "bf16",
            "--tokens",
            "4",
            "--out-dir",
            str(tmp_path),
        ],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = _load(tmp_path / "moe-layer-cpux2.json")
    assert doc["config"]["gemm"] == "loop" and doc["config"]["dispatch"] == "bf16"
    assert doc["check"]["ok"]


def test_bad_arguments_say_what_is_valid(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(GPU / "hbm_bench.py"), "--cpu-smoke", "--rows", "fp4_x", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Given: ['fp4_x']" in proc.stderr and "Valid:" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(GPU / "make_calibration.py"), "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Given:" in proc.stderr


# --- committed GPU results -----------------------------------------------------------------------------
def _committed(kind: str) -> list[Path]:
    """Committed result files of one kind: this folder (run 1) and repeat-*/ (later runs)."""
    return sorted(RESULTS.glob(f"{kind}-*.json")) + sorted(RESULTS.glob(f"repeat-*/{kind}-*.json"))


def _assert_same(got, want, where: str) -> None:
    """Equal structure and values; floats to 1e-9 relative (libm differs in the last bits across hosts)."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__} (stale calibration?)"
    if isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys differ: {set(got) ^ set(want)}"
        for k in want:
            _assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{where}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want, strict=False)):
            _assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_committed_calibration_is_reproducible(tmp_path):
    cals = _committed("calibration")
    assert cals, "no committed calibration file"
    for cal_path in cals:
        committed = _load(cal_path)
        out = tmp_path / cal_path.parent.name / cal_path.name
        out.parent.mkdir(exist_ok=True)
        proc = subprocess.run(
            [
                sys.executable,
                str(GPU / "make_calibration.py"),
                "--results",
                str(cal_path.parent),
                "--card",
                committed["card"],
                "--gpus",
                str(committed["gpus"]),
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        _assert_same(_load(out), committed, cal_path.name)


def test_committed_results_are_real_gpu_runs():
    a2a = _committed("a2a")
    assert a2a
    for p in a2a:
        doc = _load(p)
        meta = doc["meta"]
        assert meta["gpus"] >= 2 and meta["nccl"] and meta["device_name"].startswith("NVIDIA")
        assert p.name == f"a2a-{meta['card']}x{meta['gpus']}.json"
        eps = doc["backends"]["nccl"]["ep"]
        assert "2" in eps
        for res in eps.values():
            rows = res["expert"]
            assert [r["tokens"] for r in rows] == doc["config"]["tokens"]
            # bigger messages take longer: 4096 tokens per rank cost more than 1 token
            assert rows[-1]["dispatch"]["median_us"] > rows[0]["dispatch"]["median_us"]
            assert rows[-1]["combine"]["median_us"] > rows[0]["combine"]["median_us"]
            for r in rows:
                assert r["dispatch"]["min_us"] <= r["dispatch"]["median_us"] <= r["dispatch"]["max_us"]
                assert r["rows_per_rank"] == r["tokens"] * doc["config"]["topk"]
    for p in _committed("gemm"):
        doc = _load(p)
        for name, v in doc["variants"].items():
            if v["available"]:
                assert all(c["ok"] for c in v["check"].values()), name
        peak = doc["dense_peak"]["bf16"]["tflops"]
        # nothing measured above the card's own dense 8192^3 bf16 rate by more than noise (bf16 variants)
        for name in ("bf16_bmm", "bf16_grouped_mm"):
            for pt in doc["variants"][name]["points"]:
                if "tflops" in pt:
                    assert pt["tflops"] < 1.15 * peak, (name, pt["experts"], pt["tokens_per_expert"])
    for p in _committed("hbm"):
        r = _load(p)["results"]
        assert 500 < r["read"]["gbps"] < 6000 and all(x["check_ok"] for x in r["paged_read"])
    for p in _committed("moe-layer"):
        doc = _load(p)
        assert doc["check"]["ok"] and doc["meta"]["gpus"] == doc["config"]["ep"]


# --- the model in make_calibration ---------------------------------------------------------------------
def test_interp_is_loglinear_and_clamped():
    xs, ys = [1, 4, 16], [10.0, 20.0, 40.0]
    assert mc.interp(xs, ys, 2) == pytest.approx(15.0)
    assert mc.interp(xs, ys, 8, logy=True) == pytest.approx((20.0 * 40.0) ** 0.5)
    assert mc.interp(xs, ys, 0.5) == 10.0 and mc.interp(xs, ys, 100) == 40.0


def test_predicted_layer_terms_follow_the_measurements():
    cal_path = _committed("calibration")[0]
    cal = _load(cal_path)
    ep = sorted(cal["a2a"]["nccl"]["ep"], key=int)[-1]
    small = mc.predict_layer_us(cal, int(ep), 1)
    big = mc.predict_layer_us(cal, int(ep), 4096)
    a2a = cal["a2a"]["nccl"]["ep"][ep]["expert"]
    assert small["terms_us"]["dispatch"] == pytest.approx(a2a["dispatch_us"][0])
    assert big["terms_us"]["combine"] == pytest.approx(a2a["combine_us"][-1])
    # one token per rank touches few experts; 4096 tokens touch all local experts
    assert small["active_experts"] < 256 / int(ep) / 2
    assert big["active_experts"] == pytest.approx(256 / int(ep), rel=1e-6)
    assert big["terms_us"]["experts"] > small["terms_us"]["experts"]
    for row in cal["model_check"]:
        assert row["measured_us"] > 0 and "predicted_with_overhead_us" in row


# --- DeepGEMM itself (profiling/gpu/deepgemm_bench.py) ---------------------------------------------------------
def test_deepgemm_bench_routing_and_cast_on_the_cpu():
    """The bench's torch parts run anywhere: DeepSeek-V3 grouped top-k picks 8 experts inside the 4 best of 8
    groups with weights summing to the routed scale 2.5, and the per-128 FP8 cast round-trips within FP8's error.
    (The GEMM parts need DeepGEMM on a Hopper GPU: profiling/gpu/deepgemm_run.sh builds it there.)"""
    torch = pytest.importorskip("torch")
    import deepgemm_bench as dg

    torch.manual_seed(0)
    logits = torch.randn(16, dg.EXPERTS)
    w, idx = dg.grouped_topk(logits, torch.zeros(dg.EXPERTS))
    assert idx.shape == (16, dg.TOPK) and torch.allclose(w.sum(-1), torch.full((16,), 2.5))
    groups = idx // (dg.EXPERTS // dg.N_GROUP)
    assert all(len(set(g.tolist())) <= dg.TOPK_GROUP for g in groups)
    x = torch.randn(4, 2 * dg.INTER)
    q, sf = dg.quant128(x)
    back = (q.float().view(4, -1, 128) * sf.unsqueeze(-1)).view(4, -1)
    assert torch.allclose(back, x, rtol=0.07, atol=1e-2)


def test_committed_deepgemm_run_is_a_real_h100_run():
    doc = _load(RESULTS / "deepgemm-h100x1.json")
    assert doc["device_name"].startswith("NVIDIA H100") and doc["deep_gemm_commit"] == "54e2261"
    assert max(doc["check_calc_diff"].values()) < 1e-3
    kinds = {(r["kind"], r["gemm"]) for r in doc["rows"]}
    assert kinds == {(k, g) for k in ("masked", "contiguous") for g in ("gate_up", "down")}
    for r in doc["rows"]:
        assert r["graph"]["min_us"] <= r["graph"]["median_us"] <= r["graph"]["p90_us"]
