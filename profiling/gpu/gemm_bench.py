"""Grouped expert GEMM throughput at DeepSeek-V3 MoE shapes, BF16 and FP8, on one GPU.

    python profiling/gpu/gemm_bench.py --out-dir $OUT           # CUDA
    python profiling/gpu/gemm_bench.py --cpu-smoke --out-dir /tmp/x

Per expert: fc1 (gate+up) N=4096 K=7168 and fc2 (down) N=7168 K=2048. A point is ``experts`` local experts
each multiplying ``tokens_per_expert`` rows (uniform, as DeepGEMM's masked/contiguous layouts after
balancing): one grouped GEMM of E x [M, K] @ [K, N]. Grid: M = 1, 2, 4, ..., 4096 and E = 8, 16, 32, 64,
128 with E*M <= --max-rows (65536 by default, which covers 4096 tokens/rank x top-8 on EP >= 2).

Variants (each is tried; an unavailable one records its error instead of a number):

* ``bf16_bmm``            torch.bmm over [E, M, K] x [E, K, N]
* ``bf16_grouped_mm``     torch._grouped_mm, 2-D activations with group offsets x 3-D weights
* ``fp8_rowwise_loop``    torch._scaled_mm per expert, per-row / per-column fp32 scales, loop captured in a
                          CUDA graph (no launch gaps)
* ``fp8_block_loop``      torch._scaled_mm per expert with DeepSeek's scaling (1x128 activation blocks,
                          128x128 weight blocks), CUDA-graph loop
* ``fp8_grouped_rowwise`` torch._scaled_grouped_mm, rowwise scales

Every variant is first checked against a float32 reference computed from the same (dequantized) inputs on
fresh random data (relative Frobenius error; ``check.ok`` when under 2e-2). Timing: CUDA events, warm-up,
then ``--samples`` samples of back-to-back repetitions (about 2 ms each); median, p10, p90, min, max.
TFLOP/s counts 2*E*M*N*K; achieved HBM GB/s counts weights + activations read and the BF16 output written
once. Two dense 8192^3 products (bf16 and fp8 rowwise) record the card's matrix ceiling.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import log, metadata, parse_int_list, pick_inner, stats, time_samples, write_json

FP8 = torch.float8_e4m3fn
VARIANTS = ["bf16_bmm", "bf16_grouped_mm", "fp8_rowwise_loop", "fp8_block_loop", "fp8_grouped_rowwise"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    ref = ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


class Case:
    """Inputs for one (gemm, E, M) point and the callables of every variant."""

    def __init__(self, e: int, m: int, n: int, k: int, w: dict, device: torch.device, block: int):
        self.e, self.m, self.n, self.k, self.block, self.device = e, m, n, k, block, device
        g = torch.Generator(device=device).manual_seed(1000 * e + m)
        self.a = (torch.randn(e * m, k, generator=g, device=device) * 0.5).to(torch.bfloat16)
        self.a8 = self.a.to(FP8)
        self.sa_row = torch.rand(e * m, 1, generator=g, device=device) + 0.5
        # 1x128 activation scales, stored [E, K/128, M] so that expert i's [M, K/128] view is outer-dim-major
        # (stride(0) == 1, stride(1) == M), as cuBLAS's blockwise scaling wants
        self.sa_blk3 = torch.rand(e, k // block, m, generator=g, device=device) + 0.5
        self.w = {name: t[:e] for name, t in w.items()}
        self.offs = torch.arange(m, e * m + 1, m, device=device, dtype=torch.int32)

    # --- variants -------------------------------------------------------------------------------
    def bf16_bmm(self):
        return torch.bmm(self.a.view(self.e, self.m, self.k), self.w["bf16"].transpose(1, 2))

    def bf16_grouped_mm(self):
        return torch._grouped_mm(self.a, self.w["bf16"].transpose(-2, -1), offs=self.offs)

    def fp8_rowwise_one(self, i):
        s = slice(i * self.m, (i + 1) * self.m)
        return torch._scaled_mm(
            self.a8[s],
            self.w["fp8"][i].t(),
            scale_a=self.sa_row[s],
            scale_b=self.w["s_row"][i].view(1, -1),
            out_dtype=torch.bfloat16,
        )

    def fp8_block_one(self, i):
        s = slice(i * self.m, (i + 1) * self.m)
        return torch._scaled_mm(
            self.a8[s],
            self.w["fp8"][i].t(),
            scale_a=self.sa_blk3[i].t(),
            scale_b=self.w["s_blk"][i].t(),
            out_dtype=torch.bfloat16,
        )

    def fp8_grouped_rowwise(self):
        return torch._scaled_grouped_mm(
            self.a8,
            self.w["fp8"].transpose(-2, -1),
            self.sa_row.view(-1),
            self.w["s_row"],
            offs=self.offs,
            out_dtype=torch.bfloat16,
        )

    # --- float32 references from the same inputs ---------------------------------------------------
    def reference(self, variant: str, i: int) -> torch.Tensor:
        s = slice(i * self.m, (i + 1) * self.m)
        if variant.startswith("bf16"):
            return self.a[s].float() @ self.w["bf16"][i].float().t()
        a = self.a8[s].float()
        w = self.w["fp8"][i].float()
        if variant == "fp8_block_loop":
            a = a * self.sa_blk3[i].t().repeat_interleave(self.block, dim=1)
            sb = self.w["s_blk"][i].repeat_interleave(self.block, 0).repeat_interleave(self.block, 1)
            w = w * sb[: w.shape[0], : w.shape[1]]
        else:
            a = a * self.sa_row[s]
            w = w * self.w["s_row"][i].view(-1, 1)
        return a @ w.t()

    def output_of(self, variant: str, out, i: int) -> torch.Tensor:
        if variant == "bf16_bmm":
            return out[i]
        if variant in ("bf16_grouped_mm", "fp8_grouped_rowwise"):
            return out[i * self.m : (i + 1) * self.m]
        return out[i]  # loops return a list


def make_fn(case: Case, variant: str, device: torch.device, use_graph: bool):
    """Callable timing one grouped GEMM of ``variant``, and whether it is a CUDA graph replay."""
    if variant in ("fp8_rowwise_loop", "fp8_block_loop"):
        one = case.fp8_rowwise_one if variant == "fp8_rowwise_loop" else case.fp8_block_one

        def loop():
            return [one(i) for i in range(case.e)]

        if use_graph and device.type == "cuda":
            s = torch.cuda.Stream(device)
            s.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(s):
                loop()
            torch.cuda.current_stream(device).wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = loop()
            case._graph_outs = outs  # keep the captured outputs alive

            def replay():
                graph.replay()
                return outs

            return replay, True
        return loop, False
    return getattr(case, variant), False


def make_weights(e: int, n: int, k: int, device: torch.device, block: int, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    bf = torch.empty(e, n, k, dtype=torch.bfloat16, device=device)
    f8 = torch.empty(e, n, k, dtype=FP8, device=device)
    for i in range(e):  # per expert: keeps the float32 temporary small
        x = torch.randn(n, k, generator=g, device=device) * 0.05
        bf[i].copy_(x)
        f8[i].copy_((x * 20).to(FP8))
    return {
        "bf16": bf,
        "fp8": f8,
        "s_row": torch.rand(e, n, generator=g, device=device) * 0.05 + 0.025,
        "s_blk": torch.rand(e, n // block, k // block, generator=g, device=device) * 0.05 + 0.025,
    }


def check_variant(variant: str, n: int, k: int, w: dict, device, block: int, use_graph: bool) -> dict:
    e, m = 2, 32
    case = Case(e, m, n, k, w, device, block)
    fn, _ = make_fn(case, variant, device, use_graph=False)
    out = fn()
    errs = [rel_err(case.output_of(variant, out, i), case.reference(variant, i)) for i in range(e)]
    worst = max(errs)
    return {"rel_err": worst, "ok": worst < 2e-2, "experts": e, "tokens_per_expert": m}


def dense_peak(device, size: int, samples: int) -> dict:
    out = {}
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    flops = 2 * size**3
    t = stats(time_samples(lambda: a @ b, device, warmup=2, samples=samples))
    out["bf16"] = {"size": size, "time": t, "tflops": flops / t["median_us"] / 1e6}
    try:
        a8, b8 = a.to(FP8), b.to(FP8)
        sa = torch.ones(size, 1, device=device)
        sb = torch.ones(1, size, device=device)
        f = lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
        t = stats(time_samples(f, device, warmup=2, samples=samples))
        out["fp8_rowwise"] = {"size": size, "time": t, "tflops": flops / t["median_us"] / 1e6}
    except Exception as e:
        out["fp8_rowwise"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1-4096x2", help="tokens per expert")
    p.add_argument("--experts", default="8,16,32,64,128", help="local experts")
    p.add_argument("--max-rows", type=int, default=65536, help="skip points with experts*tokens above this")
    p.add_argument("--gemms", default="fc1:4096:7168,fc2:7168:2048", help="name:N:K,...")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--samples", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--target-us", type=float, default=2000.0, help="length of one timed sample")
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--peak-size", type=int, default=8192)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--out-dir", default=".")
    p.add_argument("--out", default=None, help="default <out-dir>/gemm-<card>x1.json")
    p.add_argument("--cpu-smoke", action="store_true", help="CPU, tiny shapes (tests)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.tokens, args.experts, args.gemms = "1,4,16", "2,4", "fc1:256:256,fc2:256:128"
        args.samples, args.target_us, args.peak_size, args.max_rows = 3, 200.0, 128, 1 << 30
    device = torch.device("cpu") if args.cpu_smoke or not torch.cuda.is_available() else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_graph = not args.no_graph
    tokens = parse_int_list(args.tokens)
    experts = parse_int_list(args.experts)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"--variants: Given: {unknown}. Valid: {VARIANTS}", file=sys.stderr)
        return 2
    gemms = []
    for spec in args.gemms.split(","):
        name, n, k = spec.split(":")
        gemms.append((name, int(n), int(k)))

    res = {v: {"available": True, "error": None, "check": {}, "graph": False, "points": []} for v in variants}
    peak = dense_peak(device, args.peak_size, args.samples)
    log(f"dense peak: {peak}")
    for gname, n, k in gemms:
        w = make_weights(max(experts), n, k, device, args.block, seed=zlib.crc32(gname.encode()) & 0xFFFF)
        for v in variants:
            if not res[v]["available"]:
                continue
            try:
                chk = check_variant(v, n, k, w, device, args.block, use_graph)
                res[v]["check"][gname] = chk
                if not chk["ok"]:
                    log(f"{v} {gname}: check FAILED rel_err={chk['rel_err']:.3g}")
            except Exception as e:  # an unavailable kernel is a result
                res[v]["available"] = False
                res[v]["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                log(f"{v}: unavailable: {res[v]['error']}")
                continue
            for e_ in experts:
                for m in tokens:
                    if e_ * m > args.max_rows:
                        continue
                    try:
                        case = Case(e_, m, n, k, w, device, args.block)
                        fn, graphed = make_fn(case, v, device, use_graph)
                        res[v]["graph"] = res[v]["graph"] or graphed
                        inner = pick_inner(fn, device, target_us=args.target_us, cap=50)
                        t = stats(time_samples(fn, device, warmup=args.warmup, samples=args.samples, inner=inner))
                    except Exception as ex:
                        res[v]["points"].append(
                            {
                                "gemm": gname,
                                "experts": e_,
                                "tokens_per_expert": m,
                                "error": f"{type(ex).__name__}: {str(ex)[:300]}",
                            }
                        )
                        log(f"{v} {gname} E={e_} M={m}: {type(ex).__name__}: {str(ex)[:200]}")
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        continue
                    flops = 2.0 * e_ * m * n * k
                    wbytes = e_ * n * k * (1 if v.startswith("fp8") else 2)
                    abytes = e_ * m * k * (1 if v.startswith("fp8") else 2)
                    obytes = e_ * m * n * 2
                    us = t["median_us"]
                    res[v]["points"].append(
                        {
                            "gemm": gname,
                            "n": n,
                            "k": k,
                            "experts": e_,
                            "tokens_per_expert": m,
                            "inner": inner,
                            "time": t,
                            "flops": flops,
                            "bytes": wbytes + abytes + obytes,
                            "tflops": flops / us / 1e6,
                            "hbm_gbps": (wbytes + abytes + obytes) / us / 1e3,
                        }
                    )
                    del case, fn
                log(f"{v} {gname} E={e_}: done")
        del w
        if device.type == "cuda":
            torch.cuda.empty_cache()

    meta = metadata(device, gpus=1 if device.type == "cuda" else 0, args=vars(args))
    doc = {
        "kind": "gemm",
        "meta": meta,
        "config": {
            "gemms": {g: {"n": n, "k": k} for g, n, k in gemms},
            "tokens_per_expert": tokens,
            "experts": experts,
            "max_rows": args.max_rows,
            "samples": args.samples,
            "warmup": args.warmup,
            "fp8_block": args.block,
            "timing": "CUDA events around back-to-back repetitions; median over samples"
            if device.type == "cuda"
            else "perf_counter",
        },
        "dense_peak": peak,
        "variants": res,
    }
    name = args.out or os.path.join(args.out_dir, f"gemm-{meta['card']}x1.json")
    write_json(name, doc)
    log(f"wrote {name}")
    # short table: fc1/fc2 at E=largest with both decode and prefill M
    for v in variants:
        pts = [q for q in res[v]["points"] if "tflops" in q]
        if pts:
            best = max(pts, key=lambda q: q["tflops"])
            log(
                f"{v}: best {best['tflops']:.0f} TFLOP/s ({best['gemm']} E={best['experts']} "
                f"M={best['tokens_per_expert']})"
            )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
