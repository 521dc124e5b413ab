"""Server-side view of a level: vLLM's Prometheus ``/metrics`` scraped per rank while it runs.

Three gauges matter for a sweep: ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and
``vllm:kv_cache_usage_perc`` (a 0-1 fraction despite its name). vLLM labels them per engine (DP
rank); an API server that fronts several engines (internal or hybrid LB) reports one line per engine,
so running/waiting are summed and KV usage is averaged over the engines of an endpoint.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from widep.bench.stats import describe

GAUGES: dict[str, str] = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
}


def parse_gauges(text: str) -> dict[str, float]:
    """The three gauges from a Prometheus text exposition; missing ones are absent.

    Several samples of one gauge (one per engine label set) are summed for running/waiting and
    averaged for KV cache usage.
    """
    acc: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace]
            tail = line[line.rfind("}") + 1 :].split()
        else:
            name = line[:space] if space != -1 else line
            tail = line[space + 1 :].split() if space != -1 else []
        key = GAUGES.get(name)
        if key is None or not tail:
            continue
        try:
            v = float(tail[0])
        except ValueError:
            continue
        if math.isnan(v):
            continue
        acc.setdefault(key, []).append(v)
    out: dict[str, float] = {}
    for key, vals in acc.items():
        out[key] = sum(vals) / len(vals) if key == "kv_cache_usage" else sum(vals)
    return out


@dataclass(slots=True)
class Sample:
    """One scrape of one endpoint."""

    endpoint: str
    t_s: float
    """Seconds since the level started (perf_counter)."""
    wall: float
    """time.time() of the scrape."""
    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class MetricsScraper:
    """Polls every endpoint's ``/metrics`` every ``interval_s`` until stopped."""

    def __init__(self, endpoints: Sequence[str], interval_s: float = 1.0, timeout_s: float = 2.0) -> None:
        self.endpoints = list(endpoints)
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.samples: list[Sample] = []

    async def _one(self, session: aiohttp.ClientSession, ep: str, t0: float) -> Sample:
        s = Sample(endpoint=ep, t_s=time.perf_counter() - t0, wall=time.time())
        try:
            async with session.get(ep + "/metrics", timeout=self.timeout) as resp:
                if resp.status != 200:
                    s.error = f"HTTP {resp.status}"
                    return s
                text = await resp.text(errors="replace")
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            s.error = f"{type(err).__name__}: {err}"[:300]
            return s
        g = parse_gauges(text)
        s.running = g.get("running")
        s.waiting = g.get("waiting")
        s.kv_cache_usage = g.get("kv_cache_usage")
        if not g:
            s.error = "no vllm:* gauges in /metrics"
        return s

    async def run(self, t0: float, stop: asyncio.Event) -> None:
        """Scrape until ``stop`` is set (one last round is taken at the first poll after it)."""
        async with aiohttp.ClientSession(trust_env=False) as session:
            while True:
                tick = time.perf_counter()
                got = await asyncio.gather(*(self._one(session, ep, t0) for ep in self.endpoints))
                self.samples.extend(got)
                if stop.is_set():
                    return
                wait = self.interval_s - (time.perf_counter() - tick)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=max(wait, 0.0))
                except TimeoutError:
                    pass


def summarize_samples(samples: Sequence[Sample]) -> dict[str, dict[str, Any]]:
    """Per endpoint: statistics of each gauge over the level, and how many scrapes failed."""
    by_ep: dict[str, list[Sample]] = {}
    for s in samples:
        by_ep.setdefault(s.endpoint, []).append(s)
    out: dict[str, dict[str, Any]] = {}
    for ep, ss in by_ep.items():
        entry: dict[str, Any] = {"scrapes": len(ss), "failed_scrapes": sum(1 for s in ss if s.error)}
        for key in ("running", "waiting", "kv_cache_usage"):
            entry[key] = describe([getattr(s, key) for s in ss if getattr(s, key) is not None])
        errs = [s.error for s in ss if s.error]
        if errs:
            entry["last_error"] = errs[-1]
        out[ep] = entry
    return out
