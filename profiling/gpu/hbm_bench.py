"""Attention-like HBM bandwidth on one GPU: large copy, large read, and a paged KV-cache read at MLA rows.

    python profiling/gpu/hbm_bench.py --out-dir $OUT
    TRITON_INTERPRET=1 python profiling/gpu/hbm_bench.py --cpu-smoke --out-dir /tmp/x   # kernel on the CPU

Measurements (GB/s = bytes / median time; 1 GB = 1e9 B):

* ``copy``: ``dst.copy_(src)`` of --size-gib, counting bytes read plus bytes written.
* ``read``: ``torch.sum`` of a --size-gib bf16 tensor, counting bytes read.
* ``paged_read``: what MLA decode attention does to its cache: B sequences of L tokens whose KV rows live in
  random blocks of a large pool (--pool-gib), addressed through a block table. Rows are MLA's latent cache,
  576 elements: ``bf16_576`` (1152 B, vLLM's BF16 cache) and ``fp8_656`` (656 B, the FP8 ``fp8_ds_mla``
  layout). Block size 64 (FlashMLA's page) and 1 (token-granular gather, as sparse attention reads).
  A Triton kernel reads every row once and reduces it (split over the sequence so that the grid fills the
  GPU); bytes = B*L*row bytes read. Its result is checked against torch on the same table.
  ``sequential`` is the same kernel over consecutive blocks (the kernel's own ceiling).
* ``paged_gather_torch``: ``index_select`` of the same blocks into a new tensor (read + write counted): what
  an unfused torch path costs.

Each call of a point uses one of several random block tables in turn, so repeated samples do not hit L2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import log, metadata, pick_inner, stats, time_samples, write_json

ROWS = {"bf16_576": (torch.bfloat16, 576), "fp8_656": (torch.uint8, 656)}

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_sum_kernel(
        pool_ptr, table_ptr, out_ptr, blocks_per_seq, blocks_per_split, CHUNK: tl.constexpr, TILE: tl.constexpr
    ):
        b = tl.program_id(0)
        s = tl.program_id(1)
        n_split = tl.num_programs(1)
        start = s * blocks_per_split
        end = tl.minimum(start + blocks_per_split, blocks_per_seq)
        offs = tl.arange(0, TILE)
        acc = tl.zeros([TILE], dtype=tl.float32)
        for j in range(start, end):
            blk = tl.load(table_ptr + b * blocks_per_seq + j).to(tl.int64)
            base = pool_ptr + blk * CHUNK
            for t in tl.static_range(0, CHUNK, TILE):
                idx = t + offs
                x = tl.load(base + idx, mask=idx < CHUNK, other=0)
                acc += x.to(tl.float32)
        tl.store(out_ptr + b * n_split + s, tl.sum(acc, axis=0))

    TRITON_ERROR = None
except Exception as e:
    triton = None
    TRITON_ERROR = f"{type(e).__name__}: {e}"


def triton_usable(device: torch.device) -> str | None:
    """None when the Triton kernel can run on ``device``, else why not."""
    if triton is None:
        return TRITON_ERROR
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU run without TRITON_INTERPRET=1"
    return None


def paged_sum(pool: torch.Tensor, table: torch.Tensor, splits: int, out: torch.Tensor, tile: int) -> torch.Tensor:
    b, bps = table.shape
    per_split = math.ceil(bps / splits)
    chunk = pool[0].numel()
    _paged_sum_kernel[(b, splits)](pool, table, out, bps, per_split, CHUNK=chunk, TILE=tile, num_warps=4)
    return out


def paged_sum_ref(pool: torch.Tensor, table: torch.Tensor, splits: int) -> torch.Tensor:
    b, bps = table.shape
    per_split = math.ceil(bps / splits)
    flat = pool.view(pool.shape[0], -1)
    ids = table.flatten()
    sums = torch.cat([flat[ids[i : i + 16384]].double().sum(-1) for i in range(0, ids.numel(), 16384)]).view(b, bps)
    out = torch.zeros(b, splits, dtype=torch.float64, device=pool.device)
    for s in range(splits):
        out[:, s] = sums[:, s * per_split : min((s + 1) * per_split, bps)].sum(-1)
    return out


def bw_point(fn, nbytes: float, device, samples: int, target_us: float) -> dict:
    inner = pick_inner(fn, device, target_us=target_us, cap=50)
    t = stats(time_samples(fn, device, warmup=2, samples=samples, inner=inner))
    return {"bytes": nbytes, "time": t, "gbps": nbytes / t["median_us"] / 1e3, "inner": inner}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=2.0)
    p.add_argument("--pool-gib", type=float, default=8.0)
    p.add_argument("--shapes", default="8x2048,32x4096,128x4096,128x16384", help="BxL sequences x tokens")
    p.add_argument("--block-sizes", default="64,1")
    p.add_argument("--rows", default="bf16_576,fp8_656")
    p.add_argument("--tables", type=int, default=4, help="random block tables rotated across calls")
    p.add_argument("--samples", type=int, default=9)
    p.add_argument("--target-us", type=float, default=2000.0)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--out-dir", default=".")
    p.add_argument("--out", default=None, help="default <out-dir>/hbm-<card>x1.json")
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.size_gib, args.pool_gib, args.shapes, args.samples, args.target_us = 1 / 64, 1 / 64, "3x64", 3, 100.0
        args.block_sizes, args.tables = "16,1", 2
    device = torch.device("cpu") if args.cpu_smoke or not torch.cuda.is_available() else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    block_sizes = [int(b) for b in args.block_sizes.split(",")]
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        print(f"--rows: Given: {bad}. Valid: {sorted(ROWS)}", file=sys.stderr)
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4

    out: dict = {}
    n = int(args.size_gib * 2**30) // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    out["copy"] = bw_point(lambda: dst.copy_(src), 2.0 * src.numel() * 2, device, args.samples, args.target_us)
    log(f"copy: {out['copy']['gbps']:.0f} GB/s (read+write)")
    dst = None  # free it before the read test
    out["read"] = bw_point(lambda: src.sum(), 1.0 * src.numel() * 2, device, args.samples, args.target_us)
    log(f"read (sum): {out['read']['gbps']:.0f} GB/s")
    src = None

    why_not = triton_usable(device)
    out["triton"] = {
        "usable": why_not is None,
        "why_not": why_not,
        "version": getattr(triton, "__version__", None) if triton else None,
    }
    paged, gathers = [], []
    for rname in rows:
        dtype, width = ROWS[rname]
        row_bytes = width * torch.empty((), dtype=dtype).element_size()
        for bs in block_sizes:
            nblocks = int(args.pool_gib * 2**30) // (bs * row_bytes)
            if dtype == torch.uint8:
                pool = torch.randint(0, 120, (nblocks, bs, width), dtype=dtype, device=device)
            else:
                pool = torch.randn(nblocks, bs, width, dtype=dtype, device=device)
            chunk = bs * width
            tile = min(4096, 1 << (chunk - 1).bit_length())
            layouts = ["random"] + (["sequential"] if (rname, bs) == (rows[0], block_sizes[0]) else [])
            for b, length in shapes:
                bps = math.ceil(length / bs)
                if b * bps > nblocks:
                    continue
                splits = max(1, min(bps, math.ceil(8 * sms / b)))
                nbytes = float(b * bps * bs * row_bytes)
                for layout in layouts:
                    if layout == "random":
                        tables = [
                            torch.randperm(nblocks, device=device)[: b * bps].view(b, bps).to(torch.int32)
                            for _ in range(args.tables)
                        ]
                    else:
                        tables = [
                            (torch.arange(b * bps, device=device, dtype=torch.int32) + i * b * bps % nblocks)
                            .remainder(nblocks)
                            .view(b, bps)
                            for i in range(args.tables)
                        ]
                    pt = {
                        "row": rname,
                        "row_bytes": row_bytes,
                        "block_size": bs,
                        "seqs": b,
                        "tokens": length,
                        "layout": layout,
                        "splits": splits,
                    }
                    if why_not is None:
                        res = torch.empty(b, splits, dtype=torch.float32, device=device)
                        got = paged_sum(pool, tables[0], splits, res, tile).double()
                        ref = paged_sum_ref(pool, tables[0], splits)
                        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                        pt["check_rel_err"] = err
                        pt["check_ok"] = err < 1e-3
                        it = iter(range(1 << 62))

                        def fn(tables=tables, res=res, it=it, pool=pool, splits=splits, tile=tile):
                            return paged_sum(pool, tables[next(it) % len(tables)], splits, res, tile)

                        pt.update(bw_point(fn, nbytes, device, args.samples, args.target_us))
                        log(
                            f"paged_read {rname} bs={bs} B={b} L={length} {layout}: {pt['gbps']:.0f} GB/s "
                            f"(check {err:.1e})"
                        )
                    paged.append(pt)
                    if layout == "random":
                        flat = pool.view(nblocks, -1)
                        it2 = iter(range(1 << 62))

                        def g(tables=tables, flat=flat, it2=it2):
                            return flat.index_select(0, tables[next(it2) % len(tables)].flatten())

                        gp = {"row": rname, "row_bytes": row_bytes, "block_size": bs, "seqs": b, "tokens": length}
                        gp.update(bw_point(g, 2 * nbytes, device, args.samples, args.target_us))
                        gathers.append(gp)
                    del tables
            del pool
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out["paged_read"] = paged
    out["paged_gather_torch"] = gathers

    meta = metadata(device, gpus=1 if device.type == "cuda" else 0, args=vars(args))
    doc = {
        "kind": "hbm",
        "meta": meta,
        "config": {
            "size_gib": args.size_gib,
            "pool_gib": args.pool_gib,
            "shapes": shapes,
            "block_sizes": block_sizes,
            "rows": {r: {"dtype": str(ROWS[r][0]), "width": ROWS[r][1]} for r in rows},
            "samples": args.samples,
            "tables": args.tables,
        },
        "results": out,
    }
    name = args.out or os.path.join(args.out_dir, f"hbm-{meta['card']}x1.json")
    write_json(name, doc)
    log(f"wrote {name}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
