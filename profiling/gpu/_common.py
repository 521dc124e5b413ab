"""Shared helpers of the GPU microbenchmarks in profiling/gpu/ (timing, statistics, metadata, output).

The benchmark scripts are standalone: they need torch (and Triton for one optional kernel) but not widep,
because they run on the device machine, which has PyTorch and no widep. Each script imports this module
from its own folder.

Timing: on CUDA every sample is bracketed by CUDA events on the current stream after a warm-up; on the CPU
(the ``--cpu-smoke`` paths that tests run) by ``time.perf_counter``. A sample may hold several back-to-back
repetitions (``inner``) so that sub-10-µs operations are not dominated by event resolution; its value is the
mean time of one repetition. Statistics are median, p10, p90, min, max and the number of samples.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

SCHEMA_VERSION = 1


def card_slug(device_name: str | None) -> str:
    """Short lower-case card name for file names: 'NVIDIA H100 80GB HBM3' -> 'h100', None -> 'cpu'."""
    if not device_name:
        return "cpu"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", device_name.upper())
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "gpu"


def stats(samples_us: Iterable[float]) -> dict:
    """Median, p10, p90, min, max and count of a list of times in microseconds."""
    xs = sorted(float(x) for x in samples_us)
    if not xs:
        raise ValueError("stats() needs at least one sample")

    def pct(p: float) -> float:
        if len(xs) == 1:
            return xs[0]
        k = (len(xs) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {
        "median_us": statistics.median(xs),
        "p10_us": pct(0.10),
        "p90_us": pct(0.90),
        "min_us": xs[0],
        "max_us": xs[-1],
        "n": len(xs),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_samples(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int,
    samples: int,
    inner: int = 1,
    before: Callable[[], None] | None = None,
) -> list[float]:
    """Run ``fn`` ``warmup`` times, then ``samples`` samples of ``inner`` back-to-back calls.

    Returns per-call microseconds for each sample. ``before`` runs (untimed) before every sample, e.g. a
    barrier so that all ranks of a collective start together.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    out: list[float] = []
    for _ in range(samples):
        if before is not None:
            before()
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1000.0 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter() - t0) * 1e6 / inner)
    return out


def pick_inner(fn: Callable[[], object], device: torch.device, target_us: float = 1000.0, cap: int = 100) -> int:
    """How many back-to-back calls make one sample last about ``target_us`` (at least 1, at most ``cap``)."""
    one = statistics.median(time_samples(fn, device, warmup=1, samples=3, inner=1))
    if one <= 0:
        return cap
    return max(1, min(cap, int(target_us / one)))


def metadata(device: torch.device, *, gpus: int, args: dict, extra: dict | None = None) -> dict:
    """Card, GPU count, software versions, date and the script's arguments."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    meta = {
        "schema_version": SCHEMA_VERSION,
        "card": card_slug(name),
        "device_name": name or f"cpu ({platform.processor() or platform.machine()})",
        "gpus": gpus,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": None,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "args": args,
        "env": {k: os.environ[k] for k in sorted(os.environ) if k.startswith(("NCCL_", "TORCH_SYMM", "NVSHMEM_"))},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["sm_count"] = props.multi_processor_count
        meta["memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["capability"] = f"{props.major}.{props.minor}"
        try:
            v = torch.cuda.nccl.version()
            meta["nccl"] = ".".join(str(x) for x in v) if isinstance(v, tuple) else str(v)
        except Exception as e:  # recorded, not fatal
            meta["nccl"] = f"unavailable: {type(e).__name__}"
    if extra:
        meta.update(extra)
    return meta


def write_json(path: str | os.PathLike, obj: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    tmp.replace(p)
    return p


def parse_int_list(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; '1-4096x2' -> powers-of-two style geometric range 1,2,4,...,4096."""
    text = text.strip()
    m = re.fullmatch(r"(\d+)-(\d+)x(\d+)", text)
    if m:
        lo, hi, f = (int(g) for g in m.groups())
        if lo < 1 or f < 2:
            raise ValueError(f"bad geometric range {text!r}: start >= 1 and factor >= 2 needed")
        out, v = [], lo
        while v <= hi:
            out.append(v)
            v *= f
        return out
    return [int(x) for x in text.split(",") if x.strip()]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
