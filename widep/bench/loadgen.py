"""The built-in load generator: asyncio + aiohttp, streaming SSE on ``/v1/completions``.

Two load models:

- closed loop (``concurrency``): N workers, each sends its next request as soon as its previous one
  finished; the level ends after a request count or a duration.
- open loop (``rate``): arrivals are drawn up front from a Poisson process (gamma inter-arrival
  times with shape ``burstiness``; 1 is Poisson) and each request is sent at its arrival time,
  whether or not earlier ones finished; ``start_s - scheduled_s`` is the send lag (timing error).

Requests go round-robin over all endpoints by request number (one API server per DP rank means the
client has to balance). Clocks are ``time.perf_counter`` (monotonic). The hot path per chunk is
one ``perf_counter`` call, one ``json.loads`` and a list append; ITLs and TPOT are computed after
the request. Every level is bounded: by its request count or duration, by a per-request timeout,
and by a hard level timeout after which unfinished requests are cancelled and recorded as
incomplete. A dead endpoint shows up as request errors, never as an exception out of a level.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import numpy as np

from widep.bench.records import RequestRecord
from widep.bench.workload import Prompt, PromptPool

_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
_loads = json.loads
_perf = time.perf_counter


@dataclass(frozen=True)
class Level:
    """One point of a sweep: a closed-loop concurrency or an open-loop request rate."""

    kind: Literal["concurrency", "rate"]
    value: float
    num_requests: int | None = None
    """Requests to send (count mode)."""
    duration_s: float | None = None
    """Seconds to keep sending (duration mode); in-flight requests then finish."""
    burstiness: float = 1.0
    """Open loop: gamma shape of inter-arrival times (1.0 = Poisson)."""
    max_inflight: int | None = None
    """Open loop: at most this many requests in flight; later arrivals wait (and show as send lag)."""

    def __post_init__(self) -> None:
        if (self.num_requests is None) == (self.duration_s is None):
            raise ValueError("a level needs exactly one of num_requests or duration_s")
        if self.value <= 0:
            raise ValueError(f"level value must be > 0, got {self.value}")

    @property
    def id(self) -> str:
        """Stable name used in file names: ``c8`` (concurrency 8) or ``r2.5`` (2.5 requests/s)."""
        if self.kind == "concurrency":
            return f"c{int(self.value)}"
        return f"r{self.value:g}"

    @property
    def concurrency(self) -> int | None:
        return int(self.value) if self.kind == "concurrency" else None

    @property
    def rate(self) -> float | None:
        return float(self.value) if self.kind == "rate" else None


@dataclass(frozen=True)
class LoadOptions:
    """How requests are sent."""

    model: str
    """The ``model`` field of every request (the served model name)."""
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    request_timeout_s: float = 600.0
    """Per request, connect to end of stream."""
    level_timeout_s: float | None = None
    """Hard bound on a level; None: duration + request timeout (duration mode) or no extra bound."""
    connect_timeout_s: float = 10.0
    seed: int = 0
    arrival_spin_s: float = 0.0
    """Open loop: the last this-many seconds before an arrival are waited out by yielding to the
    event loop (``sleep(0)``) instead of a timer, whose resolution is about 1 ms. It cuts the median
    send lag from ~0.6 to ~0.1 ms but costs CPU; on a small client machine that CPU delays the
    reading of streams more than it helps (profiling/bench_loadgen_cost.py), so it is off by default."""


@dataclass
class LevelRun:
    """What one level produced."""

    records: list[RequestRecord]
    wall_start: float
    """time.time() when the level started."""
    wall_end: float
    duration_s: float
    """perf_counter seconds from level start to the last request's end."""
    timed_out: bool = False
    t0_perf: float = 0.0
    """time.perf_counter() at the level start: records' start_s are relative to it."""


def normalize_endpoint(url: str) -> str:
    """``http://h:8000/``, ``http://h:8000/v1`` and ``http://h:8000`` all mean ``http://h:8000``."""
    u = url.strip().rstrip("/")
    if u.endswith("/v1"):
        u = u[: -len("/v1")]
    return u


def arrival_times(
    rate: float,
    rng: np.random.Generator,
    *,
    n: int | None = None,
    duration_s: float | None = None,
    burstiness: float = 1.0,
) -> np.ndarray:
    """Arrival times (seconds from 0) of an open-loop process: gamma(shape=burstiness,
    scale=1/(rate*burstiness)) gaps, i.e. Poisson for burstiness 1. Give ``n`` or ``duration_s``."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    scale = 1.0 / (rate * burstiness)
    if n is not None:
        gaps = rng.gamma(burstiness, scale, size=n)
        t = np.cumsum(gaps)
        return t - t[0] if n else t  # the first request goes at 0
    assert duration_s is not None
    out: list[np.ndarray] = []
    total = 0
    last = 0.0
    while True:
        k = max(16, int(rate * duration_s * 1.2) - total)
        t = last + np.cumsum(rng.gamma(burstiness, scale, size=k))
        if not out:
            t = t - t[0]
        inside = t[t < duration_s]
        out.append(inside)
        total += inside.size
        if inside.size < t.size:
            return np.concatenate(out)
        last = float(t[-1])


def request_body(opts: LoadOptions, prompt: Prompt) -> bytes:
    """The JSON body of one streamed completion request."""
    body: dict[str, Any] = {
        "model": opts.model,
        "prompt": prompt.text,
        "max_tokens": prompt.output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if opts.ignore_eos:
        body["ignore_eos"] = True
    body.update(opts.extra_body)
    return json.dumps(body).encode()


async def _send(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    rec: RequestRecord,
    t0: float,
    timeout: aiohttp.ClientTimeout,
) -> None:
    """Send one request and fill ``rec``. Never raises except CancelledError."""
    stamps: list[float] = []
    t_start = _perf()
    rec.start_s = t_start - t0
    done = False
    try:
        async with session.post(url, data=body, headers=_HEADERS, timeout=timeout) as resp:
            if resp.status != 200:
                text = await resp.text(errors="replace")
                rec.error = f"HTTP {resp.status}: {text.strip()[:500]}"
                rec.e2e_s = _perf() - t_start
                return
            append = stamps.append
            async for line in resp.content:
                # SSE: "data: {...}\n" lines, blank separators, ":" comments
                if line[:5] != b"data:":
                    continue
                t = _perf()
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                obj = _loads(payload)
                if obj.get("choices"):
                    append(t)
                usage = obj.get("usage")
                if usage:
                    rec.prompt_tokens = usage.get("prompt_tokens")
                    rec.completion_tokens = usage.get("completion_tokens")
                err = obj.get("error")
                if err:
                    rec.error = "stream error: " + (err.get("message", str(err)) if isinstance(err, dict) else str(err))
        end = _perf()
        rec.e2e_s = end - t_start
        if rec.error is None and not done:
            rec.error = f"stream ended without [DONE] after {len(stamps)} chunks"
        elif rec.error is None and not stamps:
            rec.error = "stream had no token chunks"
        rec.ok = rec.error is None
    except asyncio.CancelledError:
        rec.incomplete = True
        rec.error = f"cancelled by the level time bound after {len(stamps)} chunks"
        raise
    except TimeoutError:
        rec.error = f"timeout after {timeout.total:g} s ({len(stamps)} chunks received)"
        rec.e2e_s = _perf() - t_start
    except aiohttp.ClientConnectorError as err:
        rec.error = f"cannot connect: {err}"
        rec.e2e_s = _perf() - t_start
    except (aiohttp.ClientError, ValueError, OSError) as err:
        # ValueError: a malformed JSON chunk (json.JSONDecodeError) or an over-long line
        rec.error = f"{type(err).__name__} after {len(stamps)} chunks: {err}"
        rec.e2e_s = _perf() - t_start
    finally:
        rec.chunks = len(stamps)
        if stamps:
            rec.ttft_s = stamps[0] - t_start
            rec.last_token_s = stamps[-1] - t_start
            rec.itls_s = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


class LoadGenerator:
    """Runs levels against a fixed set of endpoints, with one shared HTTP session."""

    def __init__(self, endpoints: Sequence[str], opts: LoadOptions) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self.endpoints = [normalize_endpoint(e) for e in endpoints]
        self._urls = [e + "/v1/completions" for e in self.endpoints]
        self.opts = opts
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> LoadGenerator:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, read_bufsize=2**18, trust_env=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use LoadGenerator as an async context manager")
        return self._session

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.opts.request_timeout_s, sock_connect=self.opts.connect_timeout_s)

    def _record(self, i: int, prompt: Prompt) -> RequestRecord:
        return RequestRecord(
            index=i,
            endpoint=self.endpoints[i % len(self.endpoints)],
            start_s=0.0,
            expected_input_tokens=prompt.input_tokens,
            expected_output_tokens=prompt.output_tokens,
        )

    async def warmup(self, pool: PromptPool, n: int, concurrency: int | None = None) -> list[RequestRecord]:
        """Send ``n`` requests (round-robin, closed loop) whose results are not kept in any level."""
        if n <= 0:
            return []
        lvl = Level("concurrency", concurrency or min(n, len(self.endpoints)), num_requests=n)
        run = await self.run_level(lvl, pool)
        return run.records

    async def run_level(
        self,
        level: Level,
        pool: PromptPool,
        on_record: Callable[[RequestRecord], None] | None = None,
    ) -> LevelRun:
        """Run one level and return every request's record (failed ones included)."""
        records: list[RequestRecord] = []
        wall_start = time.time()
        t0 = _perf()
        if level.kind == "concurrency":
            body = self._closed_loop(level, pool, records, t0, on_record)
        else:
            body = self._open_loop(level, pool, records, t0, on_record)
        bound = self.opts.level_timeout_s
        if bound is None and level.duration_s is not None:
            bound = level.duration_s + self.opts.request_timeout_s + 5.0
        task = asyncio.ensure_future(body)
        timed_out = False
        try:
            done, _ = await asyncio.wait({task}, timeout=bound)
            if not done:
                timed_out = True
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
            else:
                task.result()
        except asyncio.CancelledError:
            task.cancel()
            raise
        ends = [r.end_s for r in records if r.end_s is not None]
        duration = max(ends) if ends else (_perf() - t0)
        return LevelRun(records, wall_start, time.time(), duration, timed_out, t0)

    async def _closed_loop(self, level, pool, records, t0, on_record) -> None:  # type: ignore[no-untyped-def]
        n_max = level.num_requests
        deadline = (t0 + level.duration_s) if level.duration_s is not None else math.inf
        counter = 0
        session, urls, timeout = self.session, self._urls, self._timeout()
        n_ep = len(urls)
        opts = self.opts

        async def worker() -> None:
            nonlocal counter
            while True:
                if n_max is not None and counter >= n_max:
                    return
                if _perf() >= deadline:
                    return
                i = counter
                counter += 1
                prompt = pool.get(i)
                rec = self._record(i, prompt)
                records.append(rec)
                await _send(session, urls[i % n_ep], request_body(opts, prompt), rec, t0, timeout)
                if on_record is not None:
                    on_record(rec)

        c = int(level.value)
        if n_max is not None:
            c = min(c, n_max)
        await asyncio.gather(*(worker() for _ in range(max(c, 1))))

    async def _open_loop(self, level, pool, records, t0, on_record) -> None:  # type: ignore[no-untyped-def]
        rng = np.random.default_rng([self.opts.seed, 7919, int(level.value * 1000)])
        arrivals = arrival_times(
            float(level.value), rng, n=level.num_requests, duration_s=level.duration_s, burstiness=level.burstiness
        ).tolist()
        session, urls, timeout = self.session, self._urls, self._timeout()
        n_ep = len(urls)
        opts = self.opts
        sem = asyncio.Semaphore(level.max_inflight) if level.max_inflight else None
        tasks: list[asyncio.Task[None]] = []

        async def one(i: int, prompt: Prompt, rec: RequestRecord) -> None:
            try:
                if sem is not None:
                    async with sem:
                        await _send(session, urls[i % n_ep], request_body(opts, prompt), rec, t0, timeout)
                else:
                    await _send(session, urls[i % n_ep], request_body(opts, prompt), rec, t0, timeout)
            except asyncio.CancelledError:
                if not rec.incomplete:  # cancelled while waiting for a max_inflight slot
                    rec.incomplete = True
                    rec.error = "cancelled by the level time bound before it was sent"
                raise
            if on_record is not None:
                on_record(rec)

        spin = self.opts.arrival_spin_s
        try:
            for i, at in enumerate(arrivals):
                target = t0 + at
                while (d := target - _perf()) > 0:
                    await asyncio.sleep(d - spin if d > spin else 0)
                prompt = pool.get(i)
                rec = self._record(i, prompt)
                rec.scheduled_s = at
                rec.start_s = at
                records.append(rec)
                tasks.append(asyncio.create_task(one(i, prompt, rec)))
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # arrivals that never got sent are not records; the ones cancelled mid-flight are
            raise


def run_sync(coro: Any, *, use_uvloop: bool = True) -> Any:
    """Run ``coro`` on a fresh event loop (uvloop when installed and asked for)."""
    factory = None
    if use_uvloop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)
