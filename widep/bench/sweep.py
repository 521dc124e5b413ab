"""A sweep: levels run one after another into one directory, resumable, failures recorded.

Directory layout (``--out DIR``)::

    sweep.json                    settings of the sweep (checked on resume)
    level-<id>.report.yaml        llm-d Benchmark Report v0.2.1 (written last: marks the level done)
    level-<id>.summary.json       the level's statistics, incl. tokens/s/GPU and tokens/s/user
    level-<id>.requests.jsonl     one line per request
    level-<id>.metrics.jsonl      /metrics scrapes per rank (builtin and vllm generators)
    level-<id>.failure.json       why a level failed (removed when a later attempt succeeds)
    level-<id>.native/            the adapted tool's own output (vllm, inference-perf)
    summary.csv                   one row per completed level

A level whose report exists is skipped on the next run; a failed level is run again.
"""

from __future__ import annotations

import asyncio
import json
import time
import traceback
import uuid
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from widep import __version__
from widep.bench import report as rpt
from widep.bench.loadgen import Level, LoadGenerator, LoadOptions, normalize_endpoint, run_sync
from widep.bench.metrics import MetricsScraper, Sample, summarize_samples
from widep.bench.records import RequestRecord
from widep.bench.stats import Slo, error_kinds, summarize
from widep.bench.workload import PromptBuilder, PromptPool, WorkloadSpec, build_prompts
from widep.errors import UserError

Generator = Literal["builtin", "vllm", "inference-perf"]
GENERATORS: tuple[str, ...] = ("builtin", "vllm", "inference-perf")
TOOL_NAMES = {"builtin": "widep", "vllm": "vllm-benchmark", "inference-perf": "inference-perf"}


@dataclass(frozen=True)
class SweepConfig:
    """Everything a sweep needs; the parts that define its results are saved in sweep.json."""

    endpoints: tuple[str, ...]
    model: str
    workload: WorkloadSpec
    levels: tuple[Level, ...]
    stack: rpt.StackInfo
    generator: Generator = "builtin"
    slo: Slo = field(default_factory=Slo)
    warmup_requests: int = 0
    request_timeout_s: float = 600.0
    level_timeout_s: float | None = None
    scrape_interval_s: float | None = 1.0
    """None: do not scrape /metrics."""
    pool_max: int = 2048
    """Most distinct prompts built per level (see PromptPool)."""
    label: str | None = None
    """Name of this run in plots and the CSV (default: the directory name)."""
    description: str | None = None
    use_uvloop: bool = True
    vllm_python: str | None = None
    """Python interpreter that has vllm, for --generator vllm (default: this one)."""

    @property
    def gpus(self) -> int:
        return self.stack.gpus

    def identity(self) -> dict[str, Any]:
        """The settings that must not change between a sweep and its resumption."""
        return {
            "model": self.model,
            "workload": self.workload.model_dump(mode="json"),
            "generator": self.generator,
            "gpus": self.gpus,
            "endpoints": len(self.endpoints),
        }


class Progress(Protocol):
    """What a sweep reports while it runs (the CLI draws it with rich)."""

    def note(self, message: str) -> None: ...
    def level_start(self, level: Level, expected: int | None) -> None: ...
    def request_done(self, rec: RequestRecord) -> None: ...
    def level_end(self, level: Level, outcome: LevelOutcome) -> None: ...


@dataclass
class LevelOutcome:
    level: Level
    status: Literal["done", "skipped", "failed"]
    summary: dict[str, Any] | None = None
    error: str | None = None


def level_paths(out: Path, level: Level) -> dict[str, Path]:
    base = f"level-{level.id}"
    return {
        "report": out / f"{base}.report.yaml",
        "summary": out / f"{base}.summary.json",
        "requests": out / f"{base}.requests.jsonl",
        "metrics": out / f"{base}.metrics.jsonl",
        "failure": out / f"{base}.failure.json",
        "native": out / f"{base}.native",
    }


def _level_seed(level: Level) -> int:
    return zlib.crc32(level.id.encode())


def _expected_requests(level: Level) -> int | None:
    if level.num_requests is not None:
        return level.num_requests
    if level.kind == "rate" and level.duration_s is not None:
        return int(level.value * level.duration_s)
    return None


def _prepare_dir(cfg: SweepConfig, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "sweep.json"
    ident = cfg.identity()
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(
                f"--out holds an unreadable sweep.json ({err}). Given: {out}. Valid: a new directory"
            ) from None
        old = meta.get("identity", {})
        for key, value in ident.items():
            if old.get(key) != value:
                raise UserError(
                    f"--out {out} holds a sweep with different settings, so it cannot be resumed: "
                    f"{key} was {old.get(key)!r}. Given: {value!r}. "
                    "Valid: the same settings to resume, or another --out directory"
                )
        meta["levels"] = sorted(set(meta.get("levels", [])) | {lv.id for lv in cfg.levels})
        meta["resumed"] = meta.get("resumed", 0) + 1
    else:
        meta = {
            "sweep_id": str(uuid.uuid4()),
            "created": time.time(),
            "widep_version": __version__,
            "label": cfg.label or out.resolve().name,
            "identity": ident,
            "levels": [lv.id for lv in cfg.levels],
            "resumed": 0,
        }
    meta["endpoints"] = list(cfg.endpoints)
    meta["stack"] = [asdict(c) for c in cfg.stack.components]
    meta["slo"] = {k: v for k, v in asdict(cfg.slo).items() if v is not None}
    rpt.atomic_write(meta_path, json.dumps(meta, indent=2))
    return meta


def _native_args(cfg: SweepConfig, level: Level) -> dict[str, Any]:
    return {
        "generator": cfg.generator,
        "level": asdict(level),
        "workload": cfg.workload.model_dump(mode="json"),
        "endpoints": list(cfg.endpoints),
        "model": cfg.model,
        "request_timeout_s": cfg.request_timeout_s,
    }


async def _fetch_engine_version(endpoint: str) -> str | None:
    """vLLM's /version, if the server answers it."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(trust_env=False) as s:
            async with s.get(endpoint + "/version", timeout=aiohttp.ClientTimeout(total=3)) as r:
                if r.status == 200:
                    return str((await r.json(content_type=None)).get("version"))
    except Exception:  # optional information
        return None
    return None


async def fetch_served_model(endpoint: str, timeout_s: float = 5.0) -> tuple[str, str | None]:
    """(id, root) of the first model in ``/v1/models``; UserError when it cannot be read."""
    import aiohttp

    url = normalize_endpoint(endpoint) + "/v1/models"
    try:
        async with aiohttp.ClientSession(trust_env=False) as s:
            async with s.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                body = await r.json(content_type=None)
                data = body.get("data") or []
                if r.status != 200 or not data:
                    raise UserError(f"--model not given and {url} lists no model (HTTP {r.status}). Given: {endpoint}")
                return str(data[0]["id"]), data[0].get("root")
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError) as err:
        raise UserError(
            f"--model not given and the served model could not be read from {url}: {err}. "
            "Valid: pass --model NAME, or an endpoint that answers /v1/models"
        ) from None


class _Sweep:
    def __init__(self, cfg: SweepConfig, out: Path, progress: Progress | None) -> None:
        self.cfg = cfg
        self.out = out
        self.progress = progress
        self._builder: PromptBuilder | None = None
        self._warmed = False

    def note(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.note(msg)

    @property
    def builder(self) -> PromptBuilder:
        if self._builder is None:
            self._builder = PromptBuilder(self.cfg.workload.tokenizer)
            if self._builder.note:
                self.note(self._builder.note)
        return self._builder

    def _pool(self, level: Level, seed_name: str | None = None) -> PromptPool:
        expected = _expected_requests(level)
        if expected is None:  # closed loop for a duration: enough for a few rounds per worker
            expected = max(int(level.value) * 8, 64)
        n = max(1, min(expected, self.cfg.pool_max))
        seed = zlib.crc32(seed_name.encode()) if seed_name else _level_seed(level)
        return PromptPool(build_prompts(self.cfg.workload, n, level_seed=seed, builder=self.builder))

    async def run(self, meta: dict[str, Any]) -> list[LevelOutcome]:
        outcomes = []
        version = await _fetch_engine_version(normalize_endpoint(self.cfg.endpoints[0]))
        if version:
            comps = tuple(
                c if c.tool_version != "unknown" else replace(c, tool_version=version)
                for c in self.cfg.stack.components
            )
            self.cfg = replace(self.cfg, stack=rpt.StackInfo(comps))
        for index, level in enumerate(self.cfg.levels):
            paths = level_paths(self.out, level)
            if paths["report"].exists():
                outcome = LevelOutcome(level, "skipped")
                if paths["summary"].exists():
                    outcome.summary = json.loads(paths["summary"].read_text())["summary"]
                outcomes.append(outcome)
                if self.progress:
                    self.progress.level_end(level, outcome)
                continue
            outcome = await self._run_level(index, level, paths, meta)
            outcomes.append(outcome)
            rpt.write_summary_csv(self.out, meta["label"])
            if self.progress:
                self.progress.level_end(level, outcome)
        return outcomes

    async def _warmup(self, gen: LoadGenerator, level: Level) -> None:
        if self._warmed or self.cfg.warmup_requests <= 0:
            return
        self._warmed = True
        # prompts of its own, so that no level finds its prompts in the prefix cache
        pool = self._pool(Level("concurrency", 1, num_requests=min(self.cfg.warmup_requests, 64)), "warm-up")
        recs = await gen.warmup(pool, self.cfg.warmup_requests)
        bad = [r for r in recs if not r.ok]
        if recs and len(bad) == len(recs):
            raise UserError(
                "every warm-up request failed, so no endpoint is serving: "
                + "; ".join(f"{k} (x{v})" for k, v in error_kinds(recs, 3).items())
                + f". Given: --endpoint {' '.join(gen.endpoints)}",
                exit_code=1,
            )
        if bad:
            self.note(f"warm-up: {len(bad)} of {len(recs)} requests failed: {bad[0].error}")

    async def _measure_builtin(
        self, level: Level, on_record: Any
    ) -> tuple[list[RequestRecord], float, float, float, dict[str, Any]]:
        opts = LoadOptions(
            model=self.cfg.model,
            ignore_eos=self.cfg.workload.ignore_eos,
            extra_body=dict(self.cfg.workload.extra_body),
            request_timeout_s=self.cfg.request_timeout_s,
            level_timeout_s=self.cfg.level_timeout_s,
            seed=self.cfg.workload.seed,
        )
        pool = self._pool(level)
        async with LoadGenerator(self.cfg.endpoints, opts) as gen:
            await self._warmup(gen, level)
            run = await gen.run_level(level, pool, on_record)
        extra = {"timed_out": run.timed_out}
        return run.records, run.wall_start, run.wall_end, run.duration_s, extra

    async def _run_level(self, index: int, level: Level, paths: dict[str, Path], meta: dict[str, Any]) -> LevelOutcome:
        cfg = self.cfg
        if self.progress:
            self.progress.level_start(level, _expected_requests(level))
        stop = asyncio.Event()
        scraper = None
        scrape_task = None
        t0 = time.perf_counter()
        try:
            if cfg.scrape_interval_s:
                scraper = MetricsScraper([normalize_endpoint(e) for e in cfg.endpoints], cfg.scrape_interval_s)
                scrape_task = asyncio.create_task(scraper.run(t0, stop))
            on_record = self.progress.request_done if self.progress else None
            if cfg.generator == "builtin":
                records, w0, w1, duration, extra = await self._measure_builtin(level, on_record)
                tool_version = __version__
            elif cfg.generator == "vllm":
                from widep.bench import adapters

                records, w0, w1, duration, extra = await adapters.run_vllm_level(cfg, level, paths["native"])
                tool_version = extra.get("tool_version", "unknown")
            else:
                from widep.bench import adapters

                records, w0, w1, duration, extra = await adapters.run_inference_perf_level(cfg, level, paths["native"])
                tool_version = extra.get("tool_version", "unknown")
        except UserError:
            raise
        except Exception as err:  # a failed level is recorded, the sweep goes on
            return self._fail(level, paths, f"{type(err).__name__}: {err}", traceback.format_exc())
        finally:
            stop.set()
            if scrape_task is not None:
                try:
                    await asyncio.wait_for(scrape_task, timeout=10)
                except (TimeoutError, Exception):
                    scrape_task.cancel()
        samples: list[Sample] = scraper.samples if scraper else []
        if samples:
            rpt.atomic_write(paths["metrics"], "".join(json.dumps(s.to_json()) + "\n" for s in samples))
        rpt.write_records(paths["requests"], records)
        summary = summarize(records, gpus=cfg.gpus, slo=cfg.slo, duration_s=duration)
        if summary.completed == 0:
            errs = "; ".join(f"{k} (x{v})" for k, v in summary.errors.items()) or "no requests were sent"
            return self._fail(level, paths, f"no request of the level succeeded: {errs}", None, summary.to_json())
        try:
            report = rpt.build_level_report(
                summary=summary,
                level=level,
                level_index=index,
                workload=cfg.workload,
                stack=cfg.stack,
                tool=TOOL_NAMES[cfg.generator],
                tool_version=tool_version,
                wall_start=w0,
                wall_end=w1,
                sweep_id=meta["sweep_id"],
                native_args=_native_args(cfg, level),
                samples=samples,
                description=cfg.description,
            )
        except Exception as err:
            return self._fail(level, paths, f"report not valid: {err}", traceback.format_exc(), summary.to_json())
        level_meta = {
            "id": level.id,
            "kind": level.kind,
            "value": level.value,
            "index": index,
            "generator": cfg.generator,
            "wall_start": w0,
            "wall_end": w1,
            "metrics": summarize_samples(samples) if samples else None,
            **{k: v for k, v in extra.items() if k != "tool_version"},
        }
        rpt.atomic_write(paths["summary"], json.dumps({"level": level_meta, "summary": summary.to_json()}, indent=1))
        rpt.write_report(paths["report"], report)
        if paths["failure"].exists():
            paths["failure"].unlink()
        return LevelOutcome(level, "done", summary=summary.to_json())

    def _fail(
        self,
        level: Level,
        paths: dict[str, Path],
        error: str,
        tb: str | None,
        summary: dict[str, Any] | None = None,
    ) -> LevelOutcome:
        doc = {
            "level": asdict(level),
            "id": level.id,
            "error": error,
            "traceback": tb,
            "time": time.time(),
            "summary": summary,
        }
        rpt.atomic_write(paths["failure"], json.dumps(doc, indent=1, default=str))
        return LevelOutcome(level, "failed", summary=summary, error=error)


def run_sweep(cfg: SweepConfig, out: Path, progress: Progress | None = None) -> list[LevelOutcome]:
    """Run (or resume) a sweep into ``out``. Failed levels are recorded and do not stop it."""
    if cfg.generator not in GENERATORS:
        raise UserError(f"--generator is not known. Given: {cfg.generator!r}. Valid: {', '.join(GENERATORS)}")
    out = Path(out)
    meta = _prepare_dir(cfg, out)
    sweep = _Sweep(cfg, out, progress)
    return run_sync(sweep.run(meta), use_uvloop=cfg.use_uvloop)
