"""One DeepSeek-V3 MoE layer (routed experts) in plain torch on N GPUs with expert parallelism, timed end to end.

    torchrun --standalone --nproc-per-node=4 profiling/gpu/moe_layer_bench.py --out-dir $OUT
    torchrun --standalone --nproc-per-node=2 profiling/gpu/moe_layer_bench.py --cpu-smoke --out-dir /tmp/x

Each rank holds ``tokens`` tokens (hidden 7168, BF16) and experts/EP local experts (SwiGLU, inter 2048).
The forward pass, as a naive torch EP implementation does it:

1. ``route``    router GEMM, sigmoid scores, group-limited top-8 (8 groups, best 4 by top-2 sum), weights
                normalised and scaled by 2.5; (token, expert) pairs sorted by expert; FP8 quantization of the
                tokens (e4m3 + one fp32 scale per 128 elements) unless --dispatch bf16
2. ``layout``   all_to_all of per-expert counts, copied to the host (the split sizes the next step needs)
3. ``dispatch`` all_to_all_single of the FP8 rows (one copy per (token, expert) pair)
4. ``regroup``  dequantize to BF16 and sort received rows by local expert
5. ``experts``  fc1 (N=4096, K=7168), SiLU-and-mul, fc2 (N=7168, K=2048) over all local experts:
                torch._grouped_mm when it works here (checked at start), else a loop of torch.mm
6. ``combine``  all_to_all_single of the BF16 outputs back to their tokens' ranks
7. ``reduce``   weighted sum of each token's 8 expert outputs

Timing: a barrier, then CUDA events at each phase boundary on every rank; the per-iteration total is the
maximum over ranks, each phase the maximum over ranks too; statistics over iterations. The shared expert
and attention are not part of this layer.

Correctness: before timing, the same code runs at tiny dimensions (hidden 256, 16 experts) and every rank
compares its output with a single-rank reference that holds all experts (``check`` in the result). That
check runs on the GPUs with NCCL exactly as the timed layer does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import log, metadata, parse_int_list, stats, write_json

FP8 = torch.float8_e4m3fn
PHASES = ["route", "layout", "dispatch", "regroup", "experts", "combine", "reduce"]


class Dims:
    def __init__(self, hidden, inter, experts, topk, groups, topk_groups, scale_block, route_scale=2.5):
        self.hidden, self.inter, self.experts, self.topk = hidden, inter, experts, topk
        self.groups, self.topk_groups, self.scale_block, self.route_scale = (
            groups,
            topk_groups,
            scale_block,
            route_scale,
        )


def expert_weights(dims: Dims, e: int, device, seed: int):
    """Deterministic weights of global expert ``e`` (any rank can rebuild any expert)."""
    g = torch.Generator(device=device).manual_seed(seed * 100_003 + e)
    w13 = (torch.randn(2 * dims.inter, dims.hidden, generator=g, device=device) / dims.hidden**0.5).to(torch.bfloat16)
    w2 = (torch.randn(dims.hidden, dims.inter, generator=g, device=device) / dims.inter**0.5).to(torch.bfloat16)
    return w13, w2


def router_weight(dims: Dims, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed * 7 + 1)
    return (torch.randn(dims.experts, dims.hidden, generator=g, device=device) / dims.hidden**0.5).to(torch.bfloat16)


def route(x, gate, dims: Dims):
    """Group-limited sigmoid top-k as DeepSeek-V3 (without the load-balancing bias). Returns ids, weights."""
    scores = torch.sigmoid((x @ gate.t()).float())  # [T, E]
    t = x.shape[0]
    grouped = scores.view(t, dims.groups, dims.experts // dims.groups)
    gscore = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [T, G]
    keep = gscore.topk(dims.topk_groups, dim=-1).indices
    gmask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, keep, True)
    masked = scores.masked_fill(~gmask.repeat_interleave(dims.experts // dims.groups, dim=1), -1.0)
    idx = masked.topk(dims.topk, dim=-1).indices
    w = scores.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) * dims.route_scale
    return idx, w


def quantize(x, block: int):
    """BF16 [T, H] -> uint8 rows [T, H + 4*H/block]: e4m3 values then fp32 scales (bytes)."""
    t, h = x.shape
    xb = x.float().view(t, h // block, block)
    scale = (xb.abs().amax(-1) / 448.0).clamp_min(1e-8)  # [T, H/block]
    q = (xb / scale.unsqueeze(-1)).to(FP8).view(t, h).view(torch.uint8)
    return torch.cat([q, scale.contiguous().view(torch.uint8).view(t, -1)], dim=1)


def dequantize(rows, hidden: int, block: int):
    r = rows.shape[0]
    q = rows[:, :hidden].contiguous().view(FP8).float().view(r, hidden // block, block)
    s = rows[:, hidden:].contiguous().view(torch.float32).view(r, hidden // block, 1)
    return (q * s).view(r, hidden).to(torch.bfloat16)


def swiglu(h, inter):
    return F.silu(h[:, :inter]) * h[:, inter:]


class Marks:
    """Phase boundaries: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device):
        self.device = device
        self.points = []

    def mark(self):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.points.append(ev)
        else:
            self.points.append(time.perf_counter())

    def durations_us(self):
        if self.device.type == "cuda":
            self.points[-1].synchronize()
            return [a.elapsed_time(b) * 1000.0 for a, b in zip(self.points, self.points[1:], strict=False)]
        return [(b - a) * 1e6 for a, b in zip(self.points, self.points[1:], strict=False)]


class EPMoE:
    def __init__(self, dims: Dims, group, ep: int, rank: int, device, seed: int, dispatch: str, gemm: str):
        self.d, self.group, self.ep, self.rank, self.device = dims, group, ep, rank, device
        self.local = dims.experts // ep
        self.dispatch_dtype = dispatch
        self.gate = router_weight(dims, device, seed)
        ws = [expert_weights(dims, rank * self.local + i, device, seed) for i in range(self.local)]
        self.w13 = torch.stack([w[0] for w in ws])  # [L, 2I, H]
        self.w2 = torch.stack([w[1] for w in ws])  # [L, H, I]
        del ws
        self.gemm = gemm

    def experts_grouped(self, xe, counts):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = torch._grouped_mm(xe, self.w13.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(swiglu(h, self.d.inter).contiguous(), self.w2.transpose(-2, -1), offs=offs)

    def experts_loop(self, xe, counts_host):
        y = torch.empty(xe.shape[0], self.d.hidden, dtype=torch.bfloat16, device=xe.device)
        start = 0
        for e, m in enumerate(counts_host):
            if m:
                h = xe[start : start + m] @ self.w13[e].t()
                y[start : start + m] = swiglu(h, self.d.inter) @ self.w2[e].t()
            start += m
        return y

    def forward(self, x, marks: Marks | None = None):
        d, ep, L = self.d, self.ep, self.local
        mk = marks.mark if marks else (lambda: None)
        mk()
        t = x.shape[0]
        idx, w = route(x, self.gate, d)
        flat = idx.flatten()
        order = torch.sort(flat, stable=True).indices
        token_of = order // d.topk
        per_expert = torch.bincount(flat, minlength=d.experts)  # [E] rows to each expert
        if self.dispatch_dtype == "fp8":
            payload = quantize(x, d.scale_block)[token_of]
        else:
            payload = x[token_of]
        mk()
        recv_pe = torch.empty_like(per_expert)
        dist.all_to_all_single(recv_pe, per_expert, group=self.group)  # [ep src * L local]
        send_split = per_expert.view(ep, L).sum(1)
        both = torch.cat([send_split, recv_pe]).cpu()
        send_list = both[:ep].tolist()
        recv_mat = both[ep:].view(ep, L)
        recv_list = recv_mat.sum(1).tolist()
        mk()
        recv = torch.empty((sum(recv_list), payload.shape[1]), dtype=payload.dtype, device=x.device)
        dist.all_to_all_single(recv, payload, recv_list, send_list, group=self.group)
        mk()
        xr = dequantize(recv, d.hidden, d.scale_block) if self.dispatch_dtype == "fp8" else recv
        local_ids = torch.arange(L, device=x.device).repeat(ep)
        row_expert = torch.repeat_interleave(local_ids, recv_mat.flatten().to(x.device))
        perm = torch.sort(row_expert, stable=True).indices
        xe = xr[perm]
        counts_host = recv_mat.sum(0).tolist()
        mk()
        if self.gemm == "grouped":
            ye = self.experts_grouped(xe, torch.tensor(counts_host, device=x.device))
        else:
            ye = self.experts_loop(xe, counts_host)
        yr = torch.empty_like(ye)
        yr[perm] = ye
        mk()
        back = torch.empty((sum(send_list), d.hidden), dtype=torch.bfloat16, device=x.device)
        dist.all_to_all_single(back, yr, send_list, recv_list, group=self.group)
        mk()
        wsorted = w.flatten()[order]
        out = torch.zeros(t, d.hidden, dtype=torch.float32, device=x.device)
        out.index_add_(0, token_of, back.float() * wsorted.unsqueeze(1))
        out = out.to(torch.bfloat16)
        mk()
        return out


def reference(x, dims: Dims, device, seed: int, dispatch: str):
    """Single-rank MoE with every expert, in float32 from the same (dequantized) inputs."""
    gate = router_weight(dims, device, seed)
    idx, w = route(x, gate, dims)
    xin = dequantize(quantize(x, dims.scale_block), dims.hidden, dims.scale_block) if dispatch == "fp8" else x
    out = torch.zeros(x.shape[0], dims.hidden, dtype=torch.float64, device=device)
    for e in idx.unique().tolist():
        w13, w2 = expert_weights(dims, e, device, seed)
        tok, slot = (idx == e).nonzero(as_tuple=True)
        h = xin[tok].double() @ w13.double().t()
        y = (F.silu(h[:, : dims.inter]) * h[:, dims.inter :]) @ w2.double().t()
        out.index_add_(0, tok, y * w[tok, slot].double().unsqueeze(1))
    return out


def grouped_works(device) -> str | None:
    """None when torch._grouped_mm gives right answers here on uneven groups (zero and one row too)."""
    try:
        counts = [0, 1, 5, 17, 3]
        k, n = 64, 48
        a = torch.randn(sum(counts), k, device=device).to(torch.bfloat16)
        b = torch.randn(len(counts), n, k, device=device).to(torch.bfloat16)
        offs = torch.cumsum(torch.tensor(counts, device=device), 0).to(torch.int32)
        got = torch._grouped_mm(a, b.transpose(-2, -1), offs=offs).float()
        ref, s = [], 0
        for i, m in enumerate(counts):
            ref.append(a[s : s + m].float() @ b[i].float().t())
            s += m
        ref = torch.cat(ref)
        err = float((got - ref).norm() / ref.norm())
        return None if err < 2e-2 else f"wrong result (rel err {err:.3g})"
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:300]}"


def barrier(group, device):
    if device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index])
        torch.cuda.synchronize(device)
    else:
        dist.barrier(group=group)


def run_check(args, group, ep, rank, device, gemm) -> dict:
    dims = Dims(hidden=256, inter=64, experts=16, topk=4, groups=4, topk_groups=2, scale_block=128)
    layer = EPMoE(dims, group, ep, rank, device, args.seed, args.dispatch, gemm)
    g = torch.Generator(device=device).manual_seed(args.seed + 17 * rank)
    errs = []
    for t in (1, 7, 64):
        x = torch.randn(t, dims.hidden, generator=g, device=device).to(torch.bfloat16)
        got = layer.forward(x).double()
        ref = reference(x, dims, device, args.seed, args.dispatch)
        errs.append(float((got - ref).norm() / ref.norm().clamp_min(1e-30)))
    t = torch.tensor([max(errs)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    worst = float(t.item())
    return {"max_rel_err": worst, "ok": worst < 2e-2, "dims": vars(dims), "tokens": [1, 7, 64]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1,16,128,512,2048,4096", help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--topk-groups", type=int, default=4)
    p.add_argument("--scale-block", type=int, default=128)
    p.add_argument("--dispatch", choices=["fp8", "bf16"], default="fp8")
    p.add_argument("--gemm", choices=["auto", "grouped", "loop"], default="auto")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--inputs", type=int, default=3, help="random inputs rotated across iterations")
    p.add_argument("--seed", type=int, default=4321)
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--out-dir", default=".")
    p.add_argument("--out", default=None, help="default <out-dir>/moe-layer-<card>x<world>.json")
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.hidden, args.inter, args.experts, args.groups, args.topk_groups = 512, 128, 16, 4, 2
        args.warmup, args.iters = 1, 3
        if args.tokens == "1,16,128,512,2048,4096":
            args.tokens = "1,8,32"

    use_cuda = torch.cuda.is_available() and not args.cpu_smoke
    dist.init_process_group("nccl" if use_cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    ep = world
    if args.experts % ep:
        print(f"--experts: Given: {args.experts} for EP {ep}. Valid: a multiple of the world size", file=sys.stderr)
        return 2
    group = dist.group.WORLD

    why_not = grouped_works(device)
    gemm = args.gemm if args.gemm != "auto" else ("grouped" if why_not is None else "loop")
    if rank == 0:
        log(f"gemm={gemm} (grouped_mm: {'ok' if why_not is None else why_not})")
    check = None
    if not args.no_check:
        check = run_check(args, group, ep, rank, device, gemm)
        if rank == 0:
            log(f"check: max rel err {check['max_rel_err']:.2e} ok={check['ok']}")

    dims = Dims(args.hidden, args.inter, args.experts, args.topk, args.groups, args.topk_groups, args.scale_block)
    layer = EPMoE(dims, group, ep, rank, device, args.seed, args.dispatch, gemm)
    rows = []
    for t in parse_int_list(args.tokens):
        g = torch.Generator(device=device).manual_seed(args.seed + 1000 * t + rank)
        xs = [torch.randn(t, dims.hidden, generator=g, device=device).to(torch.bfloat16) for _ in range(args.inputs)]
        for i in range(args.warmup):
            layer.forward(xs[i % len(xs)])
        per_iter = []
        for i in range(args.iters):
            barrier(group, device)
            m = Marks(device)
            layer.forward(xs[i % len(xs)], m)
            per_iter.append(m.durations_us())
        mat = torch.tensor(per_iter, dtype=torch.float64, device=device)  # [iters, phases]
        mat = torch.cat([mat, mat.sum(1, keepdim=True)], dim=1)
        dist.all_reduce(mat, op=dist.ReduceOp.MAX, group=group)
        mat = mat.cpu()
        row = {
            "tokens": t,
            "total": stats(mat[:, -1].tolist()),
            "phases": {ph: stats(mat[:, j].tolist()) for j, ph in enumerate(PHASES)},
        }
        rows.append(row)
        if rank == 0:
            log(
                f"ep={ep} tokens={t}: total {row['total']['median_us']:.0f} us; "
                + ", ".join(f"{ph} {row['phases'][ph]['median_us']:.0f}" for ph in PHASES)
            )
        del xs

    if rank == 0:
        meta = metadata(device, gpus=world if use_cuda else 0, args=vars(args), extra={"world_size": world})
        doc = {
            "kind": "moe_layer",
            "meta": meta,
            "config": {
                "ep": ep,
                "hidden": dims.hidden,
                "inter": dims.inter,
                "experts": dims.experts,
                "local_experts": dims.experts // ep,
                "topk": dims.topk,
                "groups": dims.groups,
                "topk_groups": dims.topk_groups,
                "dispatch": args.dispatch,
                "combine": "bf16",
                "gemm": gemm,
                "grouped_mm_probe": why_not or "ok",
                "warmup": args.warmup,
                "iters": args.iters,
                "phases": PHASES,
            },
            "check": check,
            "results": rows,
        }
        name = args.out or os.path.join(args.out_dir, f"moe-layer-{meta['card']}x{world}.json")
        write_json(name, doc)
        log(f"wrote {name}")
    barrier(group, device)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
