"""DeepEP V1 and DeepGEMM on the GPUs of one node, at DeepSeek-R1 shapes: what the performance model needs.

Built and run by ``profiling/gpu/deep_run.sh SRC_DIR`` (SRC_DIR holds DeepEP/ and DeepGEMM/ source trees;
nothing is fetched at run time). One process per GPU::

    torchrun --standalone --nproc-per-node=2 profiling/gpu/deep_kernels_bench.py --src SRC_DIR --out OUT.json

Parts (each in its own try block: one that fails is recorded with its error and the others still run):

* ``gemm_masked``: DeepGEMM m-grouped masked FP8 GEMM (decode experts), R1 fc1 (N 4096, K 7168) and fc2
  (N 7168, K 2048), 8 local experts, rows per expert 4..512; ``gemm_contiguous``: m-grouped contiguous
  (prefill experts), rows per expert 256..4096; ``gemm_sm_limit``: contiguous fc1 with DeepGEMM limited to
  fewer SMs (what the SMs of DeepEP's normal kernels cost a concurrent GEMM).
* ``ll``: DeepEP low-latency dispatch (FP8) and combine (BF16), hidden 7168, top-8, 256 experts (EP2:
  128 local experts) and 16 experts (8 local experts per GPU, the per-GPU expert load of EP32 on 256
  experts), tokens per rank 1..256, with and without the receive hook (send-only time).
* ``normal``: DeepEP normal (high-throughput) dispatch/combine at 512..8192 tokens per rank, at 24 and
  12 SMs.
* ``moe_layer``: one MoE layer as vLLM runs it with DeepEP LL + DeepGEMM masked: route (gate GEMM + top-8)
  -> LL dispatch -> fc1 -> SiLU*mul + FP8 quantise -> fc2 -> LL combine, against the sum of its parts.
* ``dbo``: two micro-batches over several layers, each layer = a dense stand-in (a BF16 GEMM reading
  ~235 MB, the attention + shared-expert weights of one R1 layer in FP8 and their KV) + the MoE layer;
  serial (blocking kernels) vs overlapped with DeepEP's receive hook (micro-batch 1's dense work and
  micro-batch 0's GEMMs run while the other micro-batch's tokens are in flight), as vLLM's DBO and
  SGLang's TBO schedule it.

Times are CUDA-event medians over iterations that each start after a barrier; for multi-GPU parts the
per-iteration time is the maximum over ranks. Output: one JSON (rank 0 writes it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist

HIDDEN, TOPK, INTER = 7168, 8, 2048


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def timed(fn, iters: int, warm: int = 5, barrier: bool = False) -> list[float]:
    """Per-iteration microseconds (max over ranks when ``barrier``)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        if barrier:
            dist.barrier()
            torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) * 1e3)
    if barrier and dist.is_initialized():
        t = torch.tensor(out, device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out = t.tolist()
    return out


def part(res: dict, name: str, fn, out: str) -> None:
    t0 = time.time()
    try:
        res[name] = fn()
    except (RuntimeError, ValueError, TypeError, AssertionError, ImportError, AttributeError, KeyError, OSError) as exc:
        # recorded, the other parts still run
        res[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    res.setdefault("seconds", {})[name] = round(time.time() - t0, 1)
    if int(os.environ.get("RANK", "0")) == 0:
        state = "ERROR " + res[name]["error"] if "error" in res[name] else "ok"
        print(f"== part {name}: {res['seconds'][name]} s {state}", flush=True)
        with open(out, "w") as f:  # after every part: a run cut short keeps what it measured
            json.dump(res, f, indent=1)


# ------------------------------------------------------------------------------------------------ DeepGEMM


class Experts:
    """FP8 expert weights of ``groups`` local experts (fc1 N=4096 K=7168, fc2 N=7168 K=2048), block-scaled."""

    def __init__(self, groups: int) -> None:
        from generators import MajorTypeAB, grouped_cast_fp8_fp4_with_major

        def w(n: int, k: int):
            b = torch.randn((groups, n, k), device="cuda", dtype=torch.bfloat16)
            return grouped_cast_fp8_fp4_with_major(
                b, MajorTypeAB.KMajor, 128, False, False, use_block_cast_for_fp8=True
            )

        self.groups = groups
        self.w1 = w(2 * INTER, HIDDEN)
        self.w2 = w(HIDDEN, INTER)


def quant_rows(x: torch.Tensor):
    """Per-token-group (1x128) FP8 cast of a (..., K) BF16 tensor, as vLLM's fused activation quantiser."""
    shape = x.shape
    v = x.reshape(-1, shape[-1] // 128, 128).float()
    amax = v.abs().amax(dim=-1).clamp(1e-4)
    sf = amax / 448.0
    q = (v / sf.unsqueeze(-1)).to(torch.float8_e4m3fn).reshape(shape)
    return q, sf.reshape(*shape[:-1], shape[-1] // 128)


def expert_gemms_masked(ex: Experts, a, masked_m: torch.Tensor, expected_m: int):
    """fc1 -> SiLU*mul + FP8 -> fc2 on masked (G, M, K) inputs; returns (G, M, HIDDEN) BF16."""
    import deep_gemm

    g, m = a[0].shape[0], a[0].shape[1]
    h = torch.empty((g, m, 2 * INTER), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_fp8_gemm_nt_masked(a, ex.w1, h, masked_m, expected_m)
    act = torch.nn.functional.silu(h[..., :INTER]) * h[..., INTER:]
    q = quant_rows(act)
    out = torch.empty((g, m, HIDDEN), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_fp8_gemm_nt_masked(q, ex.w2, out, masked_m, expected_m)
    return out


def gemm_masked(args) -> dict:
    import deep_gemm
    from generators import generate_m_grouped_masked

    rows = []
    for n, k in ((2 * INTER, HIDDEN), (HIDDEN, INTER)):
        for m in args.masked_rows:
            g = 8
            max_m = max(128, ((int(m * 1.3) + 127) // 128) * 128)
            a, b, masked_m, _, d, _ = generate_m_grouped_masked(g, max_m, m, n, k)
            masked_m.fill_(m)
            em = int(m * 1.2) + 1

            fn = functools.partial(deep_gemm.m_grouped_fp8_gemm_nt_masked, a, b, d, masked_m, em)
            us = med(timed(fn, args.iters))
            flops = 2.0 * g * m * n * k
            byts = g * n * k + g * m * (k + 2 * n)
            rows.append(
                {
                    "groups": g,
                    "rows_per_expert": m,
                    "n": n,
                    "k": k,
                    "median_us": us,
                    "tflops": flops / us / 1e6,
                    "gbps": byts / us / 1e3,
                }
            )
    return {"rows": rows}


def _contiguous(g: int, m: int, n: int, k: int):
    from generators import MajorTypeAB, generate_m_grouped_contiguous

    return generate_m_grouped_contiguous(g, m, n, k, MajorTypeAB.KMajor, MajorTypeAB.KMajor)


def gemm_contiguous(args) -> dict:
    import deep_gemm

    rows = []
    for n, k in ((2 * INTER, HIDDEN), (HIDDEN, INTER)):
        for m in args.contiguous_rows:
            g = 8
            mm, a, b, layout, d, _ = _contiguous(g, m, n, k)

            fn = functools.partial(deep_gemm.m_grouped_fp8_gemm_nt_contiguous, a, b, d, layout)
            us = med(timed(fn, args.iters))
            flops = 2.0 * mm * n * k
            rows.append(
                {
                    "groups": g,
                    "rows_per_expert": m,
                    "total_rows": mm,
                    "n": n,
                    "k": k,
                    "median_us": us,
                    "tflops": flops / us / 1e6,
                }
            )
    return {"rows": rows}


def gemm_sm_limit(args) -> dict:
    import deep_gemm

    full = deep_gemm.get_num_sms()
    mm, a, b, layout, d, _ = _contiguous(8, 2048, 2 * INTER, HIDDEN)
    rows = []
    for sms in (full, full - 24):
        deep_gemm.set_num_sms(sms)

        fn = functools.partial(deep_gemm.m_grouped_fp8_gemm_nt_contiguous, a, b, d, layout)
        us = med(timed(fn, args.iters))
        rows.append({"sms": sms, "median_us": us, "tflops": 2.0 * mm * 2 * INTER * HIDDEN / us / 1e6})
    deep_gemm.set_num_sms(full)
    return {"device_sms": full, "rows": rows}


# ------------------------------------------------------------------------------------------------ DeepEP


def _routing(tokens: int, experts: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand((tokens, experts), device="cuda", generator=g) + 0.01
    w, idx = torch.topk(scores, TOPK, dim=-1)
    import deep_ep

    return idx.to(deep_ep.topk_idx_t), w.float()


def ll_buffer(group, max_tokens: int, experts: int):
    import deep_ep

    ranks = group.size()
    nbytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(max_tokens, HIDDEN, ranks, experts)
    return deep_ep.Buffer(
        group,
        num_rdma_bytes=nbytes,
        low_latency_mode=True,
        num_qps_per_rank=max(1, experts // ranks),
        allow_nvlink_for_low_latency_mode=True,
        explicitly_destroy=True,
    )


def ll_bench(args, group) -> dict:
    rank = dist.get_rank()
    rows = []
    for experts in (256, 16):
        buf = ll_buffer(group, args.ll_max, experts)
        try:
            for t in args.ll_tokens:
                rows.append(_ll_case(args, buf, experts, t, rank, group.size()))
        finally:
            dist.barrier()
            buf.destroy()
    return {"ranks": group.size(), "max_tokens": args.ll_max, "rows": rows}


def normal_bench(args, group) -> dict:
    import deep_ep

    rank = dist.get_rank()
    buf = deep_ep.Buffer(group, int(1e9), 0, explicitly_destroy=True)
    rows = []
    try:
        for sms in (24, 12):
            deep_ep.Buffer.set_num_sms(sms)
            dcfg = deep_ep.Buffer.get_dispatch_config(group.size())
            ccfg = deep_ep.Buffer.get_combine_config(group.size())
            for t in args.normal_tokens:
                rows.append(_normal_case(args, buf, dcfg, ccfg, sms, t, rank))
    finally:
        dist.barrier()
        buf.destroy()
    return {"ranks": group.size(), "rows": rows}


class MoELayer:
    """Route -> LL dispatch -> masked fc1 -> act+quant -> masked fc2 -> LL combine, on one DeepEP buffer."""

    def __init__(self, buf, experts: int, ranks: int, max_tokens: int, ex: Experts | None = None) -> None:
        self.buf, self.experts, self.max = buf, experts, max_tokens
        self.ex = ex or Experts(experts // ranks)
        self.gate = torch.randn((experts, HIDDEN), device="cuda", dtype=torch.bfloat16) * 0.02

    def expected_m(self, tokens: int, ranks: int) -> int:
        return max(1, int(tokens * ranks * TOPK / self.experts * 1.2) + 1)

    def route(self, x):
        logits = x @ self.gate.t()
        w, idx = torch.topk(torch.sigmoid(logits.float()), TOPK, dim=-1)
        import deep_ep

        return idx.to(deep_ep.topk_idx_t), w

    def dispatch(self, x, idx, hook: bool):
        rx, cnt, h, _ev, hk = self.buf.low_latency_dispatch(
            x, idx, self.max, self.experts, use_fp8=True, return_recv_hook=hook
        )
        return rx, cnt, h, hk

    def gemms(self, rx, cnt, em):
        return expert_gemms_masked(self.ex, rx, cnt, em)

    def combine(self, y, idx, w, h, hook: bool):
        out, _ev, hk = self.buf.low_latency_combine(y, idx, w, h, return_recv_hook=hook)
        return out, hk

    def forward(self, x, em):
        idx, w = self.route(x)
        rx, cnt, h, _ = self.dispatch(x, idx, False)
        y = self.gemms(rx, cnt, em)
        out, _ = self.combine(y, idx, w, h, False)
        return out


def moe_layer(args, group) -> dict:
    ranks = group.size()
    rows = []
    for experts in (256, 16):
        buf = ll_buffer(group, args.ll_max, experts)
        try:
            layer = MoELayer(buf, experts, ranks, args.ll_max)
            for t in args.moe_tokens:
                rows.append(_moe_case(args, layer, experts, t, ranks))
        finally:
            dist.barrier()
            buf.destroy()
    return {"ranks": ranks, "rows": rows}


def dbo(args, group) -> dict:
    """Two micro-batches x L layers: serial (blocking) vs receive-hook overlap."""
    ranks = group.size()
    dense_w = torch.randn((HIDDEN, 16384), device="cuda", dtype=torch.bfloat16) * 0.01  # ~235 MB read per call
    rows = []
    for experts in (256, 16):
        # one low-latency buffer per micro-batch (as vLLM's DBO keeps one all-to-all handle per micro-batch):
        # DeepEP allows one op in flight per buffer with the receive hook
        bufs = [ll_buffer(group, args.ll_max, experts) for _ in range(2)]
        try:
            ex = Experts(experts // ranks)
            mbl = [MoELayer(b, experts, ranks, args.ll_max, ex) for b in bufs]
            for t in args.dbo_tokens:
                rows.append(_dbo_case(args, mbl, dense_w, experts, t, ranks))
        finally:
            dist.barrier()
            for b in bufs:
                b.destroy()
    return {"ranks": ranks, "rows": rows}


def _ll_case(args, buf, experts: int, t: int, rank: int, ranks: int) -> dict:
    x = torch.randn((t, HIDDEN), device="cuda", dtype=torch.bfloat16)
    idx, w = _routing(t, experts, 7 + rank)
    state = {}

    def disp():
        rx, _cnt, h, _ev, _hk = buf.low_latency_dispatch(x, idx, args.ll_max, experts, use_fp8=True)
        state["h"] = h
        state["rx"] = rx

    disp()
    torch.cuda.synchronize()
    gx = torch.randn(state["rx"][0].shape, device="cuda", dtype=torch.bfloat16)

    def comb():
        buf.low_latency_combine(gx, idx, w, state["h"])

    def both():
        disp()
        comb()

    def send_only():
        _rx, _cnt, h, _ev, hk = buf.low_latency_dispatch(
            x, idx, args.ll_max, experts, use_fp8=True, return_recv_hook=True
        )
        state["hk"] = hk
        state["h"] = h

    d_us = med(timed(disp, args.iters, barrier=True))
    c_us = med(timed(comb, args.iters, barrier=True))
    b_us = med(timed(both, args.iters, barrier=True))
    s_us = med(timed(lambda: (send_only(), state["hk"]()), args.iters, barrier=True))
    # send phase alone: issue, then time until the hook is called later (recv part separately)
    sends = []
    recvs = []
    for _ in range(args.iters):
        dist.barrier()
        torch.cuda.synchronize()
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        send_only()
        e1.record()
        torch.cuda._sleep(20000)  # let the data land
        e3 = torch.cuda.Event(enable_timing=True)
        e3.record()
        state["hk"]()
        e2.record()
        e2.synchronize()
        sends.append(e0.elapsed_time(e1) * 1e3)
        recvs.append(e3.elapsed_time(e2) * 1e3)
    disp()
    torch.cuda.synchronize()
    return {
        "experts": experts,
        "local_experts": experts // ranks,
        "tokens_per_rank": t,
        "dispatch_us": d_us,
        "combine_us": c_us,
        "dispatch_combine_us": b_us,
        "dispatch_hooked_us": s_us,
        "dispatch_send_us": med(sends),
        "dispatch_recv_us": med(recvs),
        "dispatch_bytes_per_rank": t * TOPK * (HIDDEN + HIDDEN / 128 * 4),
        "combine_bytes_per_rank": t * TOPK * HIDDEN * 2,
    }


def _normal_case(args, buf, dcfg, ccfg, sms: int, t: int, rank: int) -> dict:
    x = torch.randn((t, HIDDEN), device="cuda", dtype=torch.bfloat16)
    xq = quant_rows(x)
    idx, w = _routing(t, 256, 11 + rank)
    ntr, _, nte, itr, _ = buf.get_dispatch_layout(idx, 256)
    st = {}

    def layout():
        buf.get_dispatch_layout(idx, 256)

    def disp():
        rx, _ri, rw, _lst, h, _ev = buf.dispatch(
            xq,
            num_tokens_per_rank=ntr,
            is_token_in_rank=itr,
            num_tokens_per_expert=nte,
            topk_idx=idx,
            topk_weights=w,
            config=dcfg,
        )
        st["h"], st["rx"], st["rw"] = h, rx, rw

    disp()
    torch.cuda.synchronize()
    rx_bf = torch.randn((st["rx"][0].shape[0], HIDDEN), device="cuda", dtype=torch.bfloat16)

    def comb():
        buf.combine(rx_bf, st["h"], topk_weights=st["rw"], config=ccfg)

    l_us = med(timed(layout, args.iters, barrier=True))
    d_us = med(timed(disp, args.iters, barrier=True))
    c_us = med(timed(comb, args.iters, barrier=True))
    recv = int(st["rx"][0].shape[0])
    return {
        "sms": sms,
        "tokens_per_rank": t,
        "layout_us": l_us,
        "dispatch_us": d_us,
        "combine_us": c_us,
        "recv_tokens": recv,
        "dispatch_gbps": recv * (HIDDEN + HIDDEN / 32) / d_us / 1e3,
        "combine_gbps": recv * HIDDEN * 2 / c_us / 1e3,
    }


def _moe_case(args, layer, experts: int, t: int, ranks: int) -> dict:
    x = torch.randn((t, HIDDEN), device="cuda", dtype=torch.bfloat16)
    em = layer.expected_m(t, ranks)
    idx, w = layer.route(x)
    rx, cnt, h, _ = layer.dispatch(x, idx, False)
    torch.cuda.synchronize()
    y = layer.gemms(rx, cnt, em)
    torch.cuda.synchronize()
    row = {
        "experts": experts,
        "local_experts": experts // ranks,
        "tokens_per_rank": t,
        "expected_m": em,
        "rows_per_local_expert": float(cnt.float().mean()),
        "layer_us": med(timed(lambda: layer.forward(x, em), args.iters, barrier=True)),
        "route_us": med(timed(lambda: layer.route(x), args.iters)),
        "dispatch_us": med(timed(lambda: layer.dispatch(x, idx, False), args.iters, barrier=True)),
        "gemms_us": med(timed(lambda: layer.gemms(rx, cnt, em), args.iters)),
        "combine_us": med(timed(lambda: layer.combine(y, idx, w, h, False), args.iters, barrier=True)),
    }
    row["sum_of_parts_us"] = sum(row[k] for k in ("route_us", "dispatch_us", "gemms_us", "combine_us"))
    return row


def _dbo_case(args, mbl, dense_w, experts: int, t: int, ranks: int) -> dict:
    L = args.dbo_layers
    layer = mbl[0]
    half = t // 2
    xs = [torch.randn((half, HIDDEN), device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    em = layer.expected_m(half, ranks)

    def dense(x):
        return (x @ dense_w)[:, :HIDDEN].contiguous()

    def serial():
        for _ in range(L):
            for i in range(2):
                h = dense(xs[i])
                mbl[i].forward(h, em)

    def overlapped():
        # per layer: dense(0); send d0; dense(1); recv d0; send d1; gemm(0); send c0; recv d1;
        # gemm(1); send c1; recv c0; recv c1 (vLLM DBO / SGLang TBO ordering with LL hooks)
        for _ in range(L):
            m0, m1 = mbl
            h0 = dense(xs[0])
            i0, w0 = m0.route(h0)
            rx0, c0, hd0, hk0 = m0.dispatch(h0, i0, True)
            h1 = dense(xs[1])
            i1, w1 = m1.route(h1)
            hk0()
            rx1, c1, hd1, hk1 = m1.dispatch(h1, i1, True)
            y0 = m0.gemms(rx0, c0, em)
            _, hc0 = m0.combine(y0, i0, w0, hd0, True)
            hk1()
            y1 = m1.gemms(rx1, c1, em)
            hc0()
            _, hc1 = m1.combine(y1, i1, w1, hd1, True)
            hc1()

    def dense_only():
        for _ in range(L):
            for i in range(2):
                dense(xs[i])

    def moe_gemm_only():
        for _ in range(L):
            for i in range(2):
                i0, _ = layer.route(xs[i])
                rx, c, _, _ = layer.dispatch(xs[i], i0, False)
                layer.gemms(rx, c, em)

    s_us = med(timed(serial, args.iters, barrier=True))
    o_us = med(timed(overlapped, args.iters, barrier=True))
    d_us = med(timed(dense_only, args.iters))
    idx, w = layer.route(xs[0])
    rx, c, h, _ = layer.dispatch(xs[0], idx, False)
    y = layer.gemms(rx, c, em)
    comm_us = (
        med(
            timed(
                lambda: (layer.dispatch(xs[0], idx, False), layer.combine(y, idx, w, h, False)),
                args.iters,
                barrier=True,
            )
        )
        * 2
        * L
    )
    g_us = med(timed(lambda: layer.gemms(rx, c, em), args.iters)) * 2 * L
    compute = d_us + g_us
    saved = s_us - o_us
    return {
        "experts": experts,
        "tokens_per_rank": t,
        "layers": L,
        "serial_us": s_us,
        "overlapped_us": o_us,
        "speedup": s_us / o_us,
        "dense_us": d_us,
        "expert_gemms_us": g_us,
        "comm_us": comm_us,
        "hidden_fraction_of_min": saved / min(compute, comm_us),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--parts", default="ll,moe_layer,dbo,normal,gemm_masked,gemm_contiguous,gemm_sm_limit")
    ap.add_argument("--masked-rows", default="4,16,64,256,512")
    ap.add_argument("--contiguous-rows", default="256,1024,4096")
    ap.add_argument("--ll-tokens", default="1,16,64,128,256")
    ap.add_argument("--ll-max", type=int, default=256)
    ap.add_argument("--normal-tokens", default="512,2048,8192")
    ap.add_argument("--moe-tokens", default="1,32,128,256")
    ap.add_argument("--dbo-tokens", default="64,256,512")
    ap.add_argument("--dbo-layers", type=int, default=4)
    args = ap.parse_args()
    for k in ("masked_rows", "contiguous_rows", "ll_tokens", "normal_tokens", "moe_tokens", "dbo_tokens"):
        setattr(args, k, [int(x) for x in getattr(args, k).split(",") if x])
    sys.path.insert(0, os.path.join(args.src, "DeepGEMM", "tests"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device(f"cuda:{local}"))
    group = dist.new_group(list(range(dist.get_world_size())))
    rank = dist.get_rank()
    p = torch.cuda.get_device_properties(local)
    res: dict = {
        "format": "widep-deep-kernels/1",
        "device_name": p.name,
        "sms": p.multi_processor_count,
        "gpus": dist.get_world_size(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "args": {k: v for k, v in vars(args).items()},
    }
    parts = args.parts.split(",")
    single = {"gemm_masked": gemm_masked, "gemm_contiguous": gemm_contiguous, "gemm_sm_limit": gemm_sm_limit}
    multi = {"ll": ll_bench, "normal": normal_bench, "moe_layer": moe_layer, "dbo": dbo}
    for name in parts:
        if name in single:
            if rank == 0:
                part(res, name, lambda f=single[name]: f(args), args.out)
            dist.barrier()
        elif name in multi:
            part(res, name, lambda f=multi[name]: f(args, group), args.out)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps({k: v for k, v in res.items() if k != "args"}, indent=1)[:6000])
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
