"""DeepGEMM's own FP8 expert GEMMs and the non-GEMM phases of a MoE layer on one GPU: the kernel-true calibration.

Built and run by ``profiling/gpu/deepgemm_run.sh SRC_TGZ`` (a tarball of deepseek-ai/DeepGEMM 54e2261 with its
cutlass/fmt ``include/`` trees, as ``../shared/reference/deepep-deepgemm-on-device.md`` describes; nothing is
fetched at run time)::

    python3 profiling/gpu/deepgemm_bench.py --src DeepGEMM_DIR --out OUT.json

Rows (format ``widep-deepgemm/1``, read by ``widep calibrate --kernels`` and ``profiling/fidelity.py``):

* ``masked``: ``m_grouped_fp8_gemm_nt_masked`` (the decode path vLLM runs with DeepEP low-latency), DeepSeek-R1
  expert shapes gate_up (N 4096, K 7168) and down (N 7168, K 2048), G = 8/16/32 local experts, 1..256 rows per
  expert, every expert holding the same rows.
* ``contiguous``: ``m_grouped_fp8_gemm_nt_contiguous`` (prefill, DeepEP normal kernels), G = 8/32, 4,096 and
  16,384 rows in all.
* each GEMM row: ``graph`` (per call, from CUDA-graph replay of ``inner`` calls, the way vLLM's decode runs),
  ``loop`` (eager back-to-back calls) and ``single`` (one eager call on an idle GPU: host dispatch + kernel);
  ``bytes`` = FP8 weights + their block scales + FP8 activations + their scales + BF16 outputs of the rows the
  kernel touches. Weights rotate over ``weight_copies`` copies so that one replay streams >= 300 MB (no L2 reuse).
* ``phases``: the non-GEMM phases of one MoE layer at T tokens per rank (256 experts, top-8; every GPU receives
  8 T expert rows): ``route`` (router GEMM, BF16), ``topk`` (DeepSeek-V3 grouped top-k with the correction bias),
  ``permute`` (expert counts + scatter of the received rows into the masked or contiguous layout),
  ``act`` (SiLU x mul + per-128 FP8 cast of the gate_up output) and ``reduce`` (top-k weighted sum of the down
  outputs), torch kernels timed in a CUDA graph (decode) or eagerly.
* ``stream``: a device-to-device copy (HBM read + write) for the card's streaming rate.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback

import torch

HIDDEN, INTER, TOPK, EXPERTS, N_GROUP, TOPK_GROUP = 7168, 2048, 8, 256, 8, 4
SHAPES = {"gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}


def stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {
        "median_us": float(statistics.median(xs)),
        "min_us": float(xs[0]),
        "p90_us": float(xs[int(0.9 * (len(xs) - 1))]),
        "n": len(xs),
    }


def ev_time(fn, samples: int, per: int = 1, sync_each: bool = True) -> list[float]:
    out = []
    for _ in range(samples):
        if sync_each:
            torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) * 1e3 / per)
    return out


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def timings(calls: list, samples: int, inner: int) -> dict:
    """single / loop / graph timings of a GEMM call, rotating over ``calls`` (one per weight copy)."""

    def seq():
        for i in range(inner):
            calls[i % len(calls)]()

    for _ in range(3):
        seq()
    single = ev_time(calls[0], samples)
    loop = ev_time(seq, samples, inner)
    g = graph_of(seq)
    for _ in range(3):
        g.replay()
    graph = ev_time(g.replay, samples, inner)
    return {"single": stats(single), "loop": stats(loop), "graph": stats(graph)}


def fp8_weights(groups: int, n: int, k: int):
    from generators import MajorTypeAB, grouped_cast_fp8_fp4_with_major

    b = torch.randn((groups, n, k), device="cuda", dtype=torch.bfloat16)
    return grouped_cast_fp8_fp4_with_major(b, MajorTypeAB.KMajor, 128, False, False, use_block_cast_for_fp8=True)


def tensor_bytes(*ts) -> int:
    return int(sum(t.numel() * t.element_size() for t in ts))


def weight_bytes(groups: int, n: int, k: int) -> int:
    return groups * n * k + groups * math.ceil(n / 128) * math.ceil(k / 128) * 4


def masked_rows(args, out: dict) -> None:
    for groups in args.groups:
        for gemm, (n, k) in SHAPES.items():
            _masked_case(args, out, groups, gemm, n, k)
            torch.cuda.empty_cache()


def _masked_case(args, out: dict, groups: int, gemm: str, n: int, k: int) -> None:
    import deep_gemm
    from generators import MajorTypeAB, grouped_cast_fp8_fp4_with_major

    max_m = max(args.masked_m)
    wb = weight_bytes(groups, n, k)
    copies = max(1, math.ceil(args.stream_bytes / wb))
    ws = [fp8_weights(groups, n, k) for _ in range(copies)]
    a = torch.randn((groups, max_m, k), device="cuda", dtype=torch.bfloat16)
    a = grouped_cast_fp8_fp4_with_major(a, MajorTypeAB.KMajor, 128, False, False)
    d = torch.empty((groups, max_m, n), device="cuda", dtype=torch.bfloat16)
    masked = torch.empty((groups,), device="cuda", dtype=torch.int32)
    for m in args.masked_m:
        masked.fill_(m)
        calls = [(lambda w=w, m=m: deep_gemm.m_grouped_fp8_gemm_nt_masked(a, w, d, masked, m)) for w in ws]
        t = timings(calls, args.samples, args.inner)
        us = t["graph"]["median_us"]
        rows = groups * m
        act = rows * k + rows * math.ceil(k / 128) * 4 + rows * n * 2
        out["rows"].append(
            {
                "kind": "masked",
                "gemm": gemm,
                "groups": groups,
                "rows_per_expert": m,
                "total_rows": rows,
                "n": n,
                "k": k,
                "weight_copies": copies,
                **t,
                "us": us,
                "timing_used": "graph",
                "flops": 2.0 * rows * n * k,
                "weight_bytes": wb,
                "bytes": wb + act,
                "tflops": 2.0 * rows * n * k / us / 1e6,
                "gbps": (wb + act) / us / 1e3,
                "weight_gbps": wb / us / 1e3,
            }
        )
        print(f"masked {gemm} G={groups} m={m}: {us:.1f} us (single {t['single']['median_us']:.1f})")


def contiguous_rows(args, out: dict) -> None:
    import deep_gemm

    out["mk_alignment"] = int(deep_gemm.get_mk_alignment_for_contiguous_layout())
    for groups in args.contig_groups:
        for gemm, (n, k) in SHAPES.items():
            w = fp8_weights(groups, n, k)
            for total in args.contig_total:
                _contiguous_case(args, out, w, groups, gemm, n, k, total)
            torch.cuda.empty_cache()


def _contiguous_case(args, out: dict, w, groups: int, gemm: str, n: int, k: int, total: int) -> None:
    import deep_gemm
    from generators import MajorTypeAB, cast_fp8_fp4_with_major

    align = out["mk_alignment"]
    wb = weight_bytes(groups, n, k)
    m = max(align, (total // groups) // align * align)
    mm = m * groups
    a = cast_fp8_fp4_with_major(
        torch.randn((mm, k), device="cuda", dtype=torch.bfloat16), MajorTypeAB.KMajor, 128, False, False
    )
    layout = torch.arange(groups, device="cuda", dtype=torch.int32).repeat_interleave(m)
    d = torch.empty((mm, n), device="cuda", dtype=torch.bfloat16)
    t = timings([lambda: deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, w, d, layout)], args.samples, 4)
    us = t["graph"]["median_us"]
    act = mm * k + mm * math.ceil(k / 128) * 4 + mm * n * 2
    out["rows"].append(
        {
            "kind": "contiguous",
            "gemm": gemm,
            "groups": groups,
            "rows_per_expert": m,
            "total_rows": mm,
            "n": n,
            "k": k,
            "weight_copies": 1,
            **t,
            "us": us,
            "timing_used": "graph",
            "flops": 2.0 * mm * n * k,
            "weight_bytes": wb,
            "bytes": wb + act,
            "tflops": 2.0 * mm * n * k / us / 1e6,
            "gbps": (wb + act) / us / 1e3,
            "weight_gbps": wb / us / 1e3,
        }
    )
    print(f"contiguous {gemm} G={groups} rows={mm}: {us:.1f} us, {2.0 * mm * n * k / us / 1e6:.0f} TFLOP/s")


def check(args, out: dict) -> None:
    """Numerical check of one masked shape against a BF16 reference (the built kernel computes the right thing)."""
    import deep_gemm
    from generators import generate_m_grouped_masked

    res = {}
    for n, k in SHAPES.values():
        a, b, masked, _, d, ref = generate_m_grouped_masked(8, 128, 64, n, k)
        deep_gemm.m_grouped_fp8_gemm_nt_masked(a, b, d, masked, 77)
        torch.cuda.synchronize()
        diffs = []
        for j in range(8):
            mj = int(masked[j].item())
            x, y = d[j, :mj].double(), ref[j, :mj].double()
            diffs.append(float(1 - 2 * (x * y).sum() / (x * x + y * y).sum()))
        res[f"masked_{n}x{k}"] = max(diffs)
    out["check_calc_diff"] = res


# ------------------------------------------------------------------------------------------- non-GEMM phases


def grouped_topk(logits: torch.Tensor, bias: torch.Tensor):
    """DeepSeek-V3 routing (noaux_tc): sigmoid scores + bias, best 4 of 8 groups by top-2 sum, top-8 in them."""
    scores = logits.float().sigmoid()
    choice = scores + bias
    t = choice.shape[0]
    gs = choice.view(t, N_GROUP, -1).topk(2, dim=-1)[0].sum(dim=-1)
    gidx = gs.topk(TOPK_GROUP, dim=-1, sorted=False)[1]
    gmask = torch.zeros_like(gs).scatter_(1, gidx, 1.0)
    smask = gmask.unsqueeze(-1).expand(t, N_GROUP, EXPERTS // N_GROUP).reshape(t, -1)
    masked = choice.masked_fill(smask == 0, float("-inf"))
    idx = masked.topk(TOPK, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    w = w / w.sum(dim=-1, keepdim=True) * 2.5
    return w, idx


def quant128(x: torch.Tensor):
    v = x.view(*x.shape[:-1], x.shape[-1] // 128, 128).float()
    sf = v.abs().amax(dim=-1).clamp(1e-4) / 448.0
    return (v / sf.unsqueeze(-1)).to(torch.float8_e4m3fn).view(x.shape), sf


def phase_rows(args, out: dict) -> None:
    gate = torch.randn((EXPERTS, HIDDEN), device="cuda", dtype=torch.bfloat16) * 0.02
    bias = torch.randn((EXPERTS,), device="cuda", dtype=torch.float32) * 0.01
    for layout in ("masked", "contiguous"):
        toks = args.phase_tokens if layout == "masked" else args.phase_tokens_prefill
        for groups in args.groups if layout == "masked" else (32,):
            for t in toks:
                out["phases"].append(_phase_case(args, gate, bias, layout, groups, t))
                torch.cuda.empty_cache()


def _phase_case(args, gate, bias, layout: str, groups: int, t: int) -> dict:
    rows = TOPK * t  # expert rows this GPU receives (every rank sends T x top-8)
    per = max(1, rows // groups)
    x = torch.randn((t, HIDDEN), device="cuda", dtype=torch.bfloat16)
    logits = torch.empty((t, EXPERTS), device="cuda", dtype=torch.bfloat16)
    recv = torch.randint(0, 255, (rows, HIDDEN), device="cuda", dtype=torch.uint8)  # FP8 bytes
    local = torch.randint(0, groups, (rows,), device="cuda", dtype=torch.int64)
    ones = torch.ones_like(local)
    if layout == "masked":
        buf = torch.empty((groups, max(per * 2, 128), HIDDEN), device="cuda", dtype=torch.uint8)
    else:
        buf = torch.empty((rows + 128 * groups, HIDDEN), device="cuda", dtype=torch.uint8)
    h = torch.randn((rows, 2 * INTER), device="cuda", dtype=torch.bfloat16)
    y = torch.randn((t, TOPK, HIDDEN), device="cuda", dtype=torch.bfloat16)
    w8 = torch.rand((t, TOPK), device="cuda", dtype=torch.float32)
    o = torch.empty((t, HIDDEN), device="cuda", dtype=torch.bfloat16)

    def route():
        torch.matmul(x, gate.t(), out=logits)

    def topk():
        grouped_topk(logits, bias)

    def permute():
        order = torch.argsort(local, stable=True)
        counts = torch.zeros(groups, device="cuda", dtype=torch.int64).scatter_add_(0, local, ones)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(rows, device="cuda") - starts[local[order]]
        if layout == "masked":
            buf[local[order], pos.clamp(max=buf.shape[1] - 1)] = recv[order]
        else:
            buf[:rows] = recv[order]

    def act():
        quant128(torch.nn.functional.silu(h[:, :INTER]) * h[:, INTER:])

    def reduce():
        torch.sum(y * w8.unsqueeze(-1).to(y.dtype), dim=1, out=o)

    phases = {"route": route, "topk": topk, "permute": permute, "act": act, "reduce": reduce}
    res: dict = {}
    for name, fn in phases.items():
        for _ in range(3):
            fn()
        eager = ev_time(fn, args.samples)
        gt = None
        if layout == "masked":
            try:
                g = graph_of(fn)
                gt = ev_time(g.replay, args.samples)
            except RuntimeError as exc:  # a data-dependent op that cannot be captured
                res[name + "_graph_error"] = str(exc)[:200]
        res[name] = {"eager": stats(eager), "graph": stats(gt) if gt else None}
    shown = {k: (v["graph"] or v["eager"])["median_us"] for k, v in res.items() if isinstance(v, dict)}
    print(f"phases {layout} G={groups} T={t}: " + ", ".join(f"{k} {v:.0f}" for k, v in shown.items()))
    return {"layout": layout, "groups": groups, "tokens": t, "rows": rows, "rows_per_expert": per, **res}


def stream_rate(args, out: dict) -> None:
    n = int(1 << 30)
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = ev_time(lambda: b.copy_(a), args.samples)
    us = statistics.median(ts)
    out["stream"] = {"bytes": 2 * n, "median_us": us, "gbps": 2 * n / us / 1e3}
    print(f"stream copy: {2 * n / us / 1e3:.0f} GB/s (read + write)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", required=True, help="the DeepGEMM source tree (its tests/ has generators.py)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--groups", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32])
    ap.add_argument(
        "--masked-m", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64, 96, 128, 192, 256]
    )
    ap.add_argument("--contig-groups", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    ap.add_argument("--contig-total", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384])
    ap.add_argument("--phase-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128, 256])
    ap.add_argument("--phase-tokens-prefill", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192])
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--stream-bytes", type=float, default=3e8)
    ap.add_argument("--parts", default="check,stream,phases,contiguous,masked")
    args = ap.parse_args()
    sys.path.insert(0, args.src + "/tests")
    import deep_gemm

    props = torch.cuda.get_device_properties(0)
    out = {
        "format": "widep-deepgemm/1",
        "device_name": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deep_gemm": getattr(deep_gemm, "__version__", "?"),
        "args": vars(args),
        "rows": [],
        "phases": [],
        "errors": {},
    }
    t0 = time.time()
    parts = {"check": check, "stream": stream_rate, "masked": masked_rows, "contiguous": contiguous_rows}
    parts["phases"] = phase_rows
    for name in args.parts.split(","):
        t1 = time.time()
        try:
            parts[name](args, out)
        except (RuntimeError, ValueError, TypeError, AssertionError, ImportError, AttributeError, KeyError) as exc:
            out["errors"][name] = "".join(traceback.format_exception(exc))[-2000:]
            print(f"part {name} failed: {exc}")
        out.setdefault("part_seconds", {})[name] = time.time() - t1
        out["seconds"] = time.time() - t0
        with open(args.out, "w") as f:  # after every part: what ran survives a later failure or the time limit
            json.dump(out, f, indent=1)
    return 0 if not out["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
