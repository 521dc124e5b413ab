"""MoE dispatch/combine all-to-all latency at DeepSeek-V3 shapes, through torch.distributed.

Launch on one node with one process per GPU::

    torchrun --standalone --nproc-per-node=4 profiling/gpu/a2a_bench.py --out-dir $OUT
    torchrun --standalone --nproc-per-node=2 profiling/gpu/a2a_bench.py --cpu-smoke --out-dir /tmp/x  # gloo, tiny

What one measurement is. Every rank of an EP group holds ``tokens`` tokens and routes each to ``topk`` of
``experts`` routed experts drawn at random (uniform top-k of random scores: realistic, uneven per-rank
counts). Experts are spread linearly over the EP ranks (expert e lives on rank e // (experts/EP)). Two
payload modes:

* ``expert``: one copy per (token, expert) pair, as DeepEP's low-latency kernels and a naive torch MoE send;
* ``rank``: one copy per (token, destination rank), as DeepEP's normal kernels (deduplicated per rank).

Dispatch moves FP8 rows: ``hidden`` bytes plus one fp32 scale per 128 elements (7168 + 56*4 = 7392 B);
combine moves the same rows back in BF16 (2*hidden = 14336 B). Both are ``all_to_all_single`` with uneven
split sizes (counts exchanged beforehand, untimed; the count exchange itself is timed once per EP size as
``counts``). Several random routings rotate across iterations. Each iteration starts after a barrier and is
timed with CUDA events on every rank; the per-iteration time is the maximum over ranks (a collective ends
when its slowest rank ends), and the statistics (median, p10, p90, min, max) are over iterations.

Bandwidth figures per rank: ``bytes_per_rank`` counts every row a rank sends (its own included);
``remote_bytes_per_rank`` only rows for other ranks; ``*_gbps`` divide the mean over ranks by the median time.

EP sizes smaller than the world run on the first EP ranks while the others wait. DeepEP is tried by import
only: its result (importable or the error) is recorded; this script does not benchmark DeepEP kernels.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import log, metadata, parse_int_list, stats, write_json


def deep_ep_status() -> dict:
    try:
        import deep_ep  # type: ignore[import-not-found]

        return {"importable": True, "version": getattr(deep_ep, "__version__", "unknown"), "benchmarked": False}
    except Exception as e:  # absence is a result
        return {"importable": False, "error": f"{type(e).__name__}: {e}", "benchmarked": False}


def route(tokens: int, experts: int, topk: int, gen: torch.Generator) -> torch.Tensor:
    """Random top-k expert ids [tokens, topk] (distinct per token)."""
    scores = torch.rand(tokens, experts, generator=gen)
    return scores.topk(topk, dim=-1).indices


def send_counts(idx: torch.Tensor, experts: int, ep: int, mode: str) -> torch.Tensor:
    """Rows this rank sends to each of the ep ranks for routing ``idx``."""
    per_rank = experts // ep
    dest = idx // per_rank  # [T, k]
    if mode == "expert":
        return torch.bincount(dest.flatten(), minlength=ep)
    # rank mode: one row per (token, distinct destination rank)
    hit = torch.zeros(idx.shape[0], ep, dtype=torch.bool)
    hit.scatter_(1, dest, True)
    return hit.sum(0)


def exchange_counts(counts: torch.Tensor, group, device) -> torch.Tensor:
    send = counts.to(device=device, dtype=torch.int64)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.cpu()


def barrier(group, device) -> None:
    if device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index])
        torch.cuda.synchronize(device)
    else:
        dist.barrier(group=group)


def timed(fn, device) -> float:
    if device.type == "cuda":
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        return s.elapsed_time(e) * 1000.0
    import time

    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def max_over_ranks(values: list[float], group, device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.cpu().tolist()


def mean_over_ranks(value: float, group, device, ep: int) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return float(t.item()) / ep


def bench_point(args, ep, group, rank_in_group, tokens, mode, device) -> dict:
    row_dispatch = args.hidden + (args.hidden // args.scale_block) * 4  # fp8 bytes + fp32 scales
    bufs = []
    sent_rows, remote_rows = [], []
    for r in range(args.routings):
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + rank_in_group * 7919 + tokens * 31 + r)
        idx = route(tokens, args.experts, args.topk, gen)
        sc = send_counts(idx, args.experts, ep, mode)
        rc = exchange_counts(sc, group, device)
        s_list, r_list = sc.tolist(), rc.tolist()
        n_send, n_recv = sum(s_list), sum(r_list)
        sent_rows.append(n_send)
        remote_rows.append(n_send - s_list[rank_in_group])
        d_send = torch.randint(0, 256, (n_send, row_dispatch), dtype=torch.uint8, device=device)
        d_recv = torch.empty((n_recv, row_dispatch), dtype=torch.uint8, device=device)
        c_send = torch.randn((n_recv, args.hidden), dtype=torch.bfloat16, device=device)
        c_recv = torch.empty((n_send, args.hidden), dtype=torch.bfloat16, device=device)
        bufs.append((s_list, r_list, d_send, d_recv, c_send, c_recv))

    def run(kind: str, n: int) -> list[float]:
        out = []
        for i in range(n):
            s_list, r_list, d_send, d_recv, c_send, c_recv = bufs[i % len(bufs)]
            if kind == "dispatch":
                fn = functools.partial(dist.all_to_all_single, d_recv, d_send, r_list, s_list, group=group)
            else:
                fn = functools.partial(dist.all_to_all_single, c_recv, c_send, s_list, r_list, group=group)
            barrier(group, device)
            out.append(timed(fn, device))
        return out

    run("dispatch", args.warmup)
    d_times = max_over_ranks(run("dispatch", args.iters), group, device)
    run("combine", args.warmup)
    c_times = max_over_ranks(run("combine", args.iters), group, device)

    rows = sum(sent_rows) / len(sent_rows)
    rrows = sum(remote_rows) / len(remote_rows)
    rows_mean = mean_over_ranks(rows, group, device, ep)
    rrows_mean = mean_over_ranks(rrows, group, device, ep)
    d_stats, c_stats = stats(d_times), stats(c_times)
    row_combine = args.hidden * 2
    out = {
        "tokens": tokens,
        "rows_per_rank": rows_mean,
        "remote_rows_per_rank": rrows_mean,
        "dispatch": d_stats,
        "combine": c_stats,
        "dispatch_bytes_per_rank": rows_mean * row_dispatch,
        "combine_bytes_per_rank": rows_mean * row_combine,
        "dispatch_remote_bytes_per_rank": rrows_mean * row_dispatch,
        "combine_remote_bytes_per_rank": rrows_mean * row_combine,
    }
    out["dispatch_gbps_per_rank"] = out["dispatch_bytes_per_rank"] / d_stats["median_us"] / 1e3
    out["combine_gbps_per_rank"] = out["combine_bytes_per_rank"] / c_stats["median_us"] / 1e3
    out["dispatch_remote_gbps_per_rank"] = out["dispatch_remote_bytes_per_rank"] / d_stats["median_us"] / 1e3
    out["combine_remote_gbps_per_rank"] = out["combine_remote_bytes_per_rank"] / c_stats["median_us"] / 1e3
    bufs.clear()  # free the buffers before the next point
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1-4096x2", help="tokens per rank: '1,2,4' or '1-4096x2'")
    p.add_argument(
        "--ep-sizes", default="auto", help="EP group sizes, e.g. '2,4'; auto = 2,4,8,... up to world, and world"
    )
    p.add_argument("--modes", default="expert,rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--scale-block", type=int, default=128)
    p.add_argument("--routings", type=int, default=4, help="random routings rotated across iterations")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out-dir", default=".")
    p.add_argument("--out", default=None, help="output file (default <out-dir>/a2a-<card>x<world>.json)")
    p.add_argument("--cpu-smoke", action="store_true", help="gloo on the CPU with tiny shapes (tests)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.hidden, args.experts, args.topk, args.iters, args.warmup = 256, 16, 4, 3, 1
        if args.tokens == "1-4096x2":
            args.tokens = "1,4,32"

    use_cuda = torch.cuda.is_available() and not args.cpu_smoke
    dist.init_process_group("nccl" if use_cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world < 2:
        print(
            "a2a_bench needs at least 2 ranks. Given: world size 1. Valid: torchrun --nproc-per-node>=2",
            file=sys.stderr,
        )
        return 2
    tokens_list = parse_int_list(args.tokens)
    if args.ep_sizes == "auto":
        eps, e = [], 2
        while e <= world:
            eps.append(e)
            e *= 2
        if world not in eps:
            eps.append(world)
    else:
        eps = parse_int_list(args.ep_sizes)
    bad = [e for e in eps if e < 2 or e > world or args.experts % e]
    if bad:
        print(f"--ep-sizes: Given: {bad}. Valid: 2..{world} dividing {args.experts}", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]

    results: dict = {}
    for ep in eps:
        group = dist.new_group(list(range(ep)))  # collective: every rank calls it
        if rank < ep:
            res_ep: dict = {}
            # the count exchange alone: the latency floor of a tiny all-to-all
            cnt = torch.ones(ep, dtype=torch.int64, device=device)
            cnt_out = torch.empty_like(cnt)
            f = functools.partial(dist.all_to_all_single, cnt_out, cnt, group=group)
            for _ in range(args.warmup):
                f()
            ct = []
            for _ in range(args.iters):
                barrier(group, device)
                ct.append(timed(f, device))
            res_ep["counts"] = stats(max_over_ranks(ct, group, device))
            for mode in modes:
                rows = []
                for t in tokens_list:
                    pt = bench_point(args, ep, group, rank, t, mode, device)
                    rows.append(pt)
                    if rank == 0:
                        log(
                            f"ep={ep} mode={mode} tokens={t}: dispatch {pt['dispatch']['median_us']:.1f} us "
                            f"({pt['dispatch_gbps_per_rank']:.1f} GB/s/rank), combine {pt['combine']['median_us']:.1f} "
                            "us "
                            f"({pt['combine_gbps_per_rank']:.1f} GB/s/rank)"
                        )
                res_ep[mode] = rows
            results[str(ep)] = res_ep
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier()

    if rank == 0:
        meta = metadata(device, gpus=world if use_cuda else 0, args=vars(args), extra={"world_size": world})
        doc = {
            "kind": "a2a",
            "meta": meta,
            "config": {
                "hidden": args.hidden,
                "experts": args.experts,
                "topk": args.topk,
                "dispatch_dtype": f"fp8_e4m3 + fp32 scale per {args.scale_block}",
                "dispatch_bytes_per_row": args.hidden + (args.hidden // args.scale_block) * 4,
                "combine_dtype": "bf16",
                "combine_bytes_per_row": args.hidden * 2,
                "tokens": tokens_list,
                "ep_sizes": eps,
                "modes": modes,
                "warmup": args.warmup,
                "iters": args.iters,
                "routings": args.routings,
                "timing": "CUDA events per iteration after a barrier; max over ranks; stats over iterations"
                if use_cuda
                else "perf_counter per iteration after a barrier; max over ranks",
            },
            "backends": {"nccl" if use_cuda else "gloo": {"ep": results}, "deep_ep": deep_ep_status()},
        }
        name = args.out or os.path.join(args.out_dir, f"a2a-{meta['card']}x{world}.json")
        write_json(name, doc)
        log(f"wrote {name}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
