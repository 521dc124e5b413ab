"""A fast local OpenAI-compatible streaming server, for measuring load generators themselves.

It answers ``POST /v1/completions`` with ``stream: true`` the way vLLM does: one SSE chunk per
token (``choices[0].text``), a last chunk with empty ``choices`` and ``usage`` when
``stream_options.include_usage`` is set, then ``data: [DONE]``. It generates ``max_tokens`` tokens
after ``--ttft-ms``, ``--itl-ms`` apart (0: as fast as it can write). It also serves
``/v1/models``, ``/health``, ``/version`` and ``/metrics`` (vLLM's gauge names: requests in flight
as running), and ``/stamps`` (GET; DELETE clears): per request, the server's own
``time.perf_counter()`` when the request arrived and when its first and last token chunks were
written, keyed by :func:`prompt_key` (which the first token chunk echoes as its text), so a client
on the same host (same CLOCK_MONOTONIC) can measure its own timing error.

It is no model: prompt tokens are counted as whitespace-separated words.

    python -m widep.bench.echo_server --port 0 --ttft-ms 5 --itl-ms 2
    # prints "PORT=<n>" once it listens
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from aiohttp import web

_perf = time.perf_counter


def prompt_key(prompt: Any) -> str:
    """The name the server gives a request: ``k`` + 16 hex digits of the prompt's SHA-1."""
    import hashlib

    return "k" + hashlib.sha1(json.dumps(prompt).encode()).hexdigest()[:16]


class EchoServer:
    def __init__(
        self, model: str = "echo", ttft_ms: float = 0.0, itl_ms: float = 0.0, keep_stamps: bool = True
    ) -> None:
        self.model = model
        self.ttft_s = ttft_ms / 1000.0
        self.itl_s = itl_ms / 1000.0
        self.keep_stamps = keep_stamps
        self.running = 0
        self.served = 0
        self.stamps: dict[str, list[float]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/stamps", self.get_stamps)
        app.router.add_delete("/stamps", self.clear_stamps)
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        t_recv = _perf()
        body: dict[str, Any] = await request.json()
        prompt = body.get("prompt", "")
        n_prompt = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        n = int(body.get("max_tokens") or 16)
        model = body.get("model", self.model)
        if model != self.model:
            return web.json_response(
                {"error": {"message": f"The model `{model}` does not exist.", "code": 404}}, status=404
            )
        if not body.get("stream"):
            return web.json_response(
                {
                    "object": "text_completion",
                    "model": model,
                    "choices": [{"index": 0, "text": " tok" * n, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n},
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.running += 1
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            created = int(time.time())
            key = prompt_key(prompt)
            pre = (
                f'data: {{"id":"cmpl-{self.served}","object":"text_completion","created":{created},'
                f'"model":"{model}","choices":[{{"index":0,"text":'
            )
            head = pre + '" tok","logprobs":null,"finish_reason":'
            mid = (head + 'null,"stop_reason":null}]}\n\n').encode()
            last = (head + '"length","stop_reason":null}]}\n\n').encode()
            # the first token echoes the prompt's key, so a client's saved text names the request
            first = (
                pre
                + json.dumps(" " + key)
                + ',"logprobs":null,"finish_reason":'
                + ("null" if n > 1 else '"length"')
                + ',"stop_reason":null}]}\n\n'
            ).encode()
            if self.ttft_s:
                await asyncio.sleep(self.ttft_s)
            t_first = _perf()
            await resp.write(first)
            for i in range(1, n):
                if self.itl_s:
                    await asyncio.sleep(self.itl_s)
                await resp.write(mid if i < n - 1 else last)
            t_last = _perf()
            if include_usage:
                usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
                tail = {
                    "id": f"cmpl-{self.served}",
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
                await resp.write(b"data: " + json.dumps(tail).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self.served += 1
            if self.keep_stamps:
                self.stamps[key] = [t_recv, t_first, t_last]
            return resp
        finally:
            self.running -= 1

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "root": self.model}]}
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "echo-1"})

    async def metrics(self, request: web.Request) -> web.Response:
        lab = f'{{engine="0",model_name="{self.model}"}}'
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{lab} {float(self.running)}\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{lab} 0.0\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f"vllm:kv_cache_usage_perc{lab} {min(self.running / 100.0, 1.0)}\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def get_stamps(self, request: web.Request) -> web.Response:
        return web.json_response(self.stamps)

    async def clear_stamps(self, request: web.Request) -> web.Response:
        self.stamps.clear()
        return web.Response(status=204)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default="echo")
    ap.add_argument("--ttft-ms", type=float, default=0.0)
    ap.add_argument("--itl-ms", type=float, default=0.0)
    ap.add_argument("--uvloop", action="store_true", help="serve on uvloop")
    args = ap.parse_args(argv)
    srv = EchoServer(args.model, args.ttft_ms, args.itl_ms)

    async def serve() -> None:
        runner = web.AppRunner(srv.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"PORT={port}", flush=True)
        await asyncio.Event().wait()

    factory = None
    if args.uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as r:
            r.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
