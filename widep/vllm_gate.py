"""The first-token gate: ASGI middleware for vLLM's API server (``--middleware widep.vllm_gate.FirstTokenGate``).

Why: vLLM answers a streamed completion with ``200 OK`` the moment it accepts the request, before prefill. When its
engine core dies during that prefill (a SIGKILLed rank, a DP peer gone), the stream carries one
``data: {"error": ...}`` event and ends. The router in front has already forwarded the 200 and cannot retry, so a
request that never produced a token is lost, although nothing of it reached the client.

What: for a ``text/event-stream`` response the gate holds the response start until the first event. If that event
is an error (no token was produced), it answers ``503 Service Unavailable`` with the error as a JSON body instead,
which the front door retries on a live rank or, while the group restarts, with backoff until it answers again.
Otherwise it sends the held start and every chunk through unchanged. The client sees the headers with the first
token, so TTFT is what it was. Other responses (non-streamed, errors, /health, /metrics) pass through untouched.

It runs inside vLLM's API server, which is why it imports nothing but the standard library.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MIDDLEWARE = "widep.vllm_gate.FirstTokenGate"
"""The import path vLLM's ``--middleware`` takes."""

RETRY_STATUS = 503
"""What a stream that failed before its first token answers instead of 200 (a status every router retries)."""


def first_event_error(body: bytes) -> dict[str, Any] | None:
    """The error object when the first server-sent event of ``body`` is ``data: {"error": ...}``, else None."""
    for raw in body.split(b"\n"):
        line = raw.strip()
        if not line or line.startswith(b":"):
            continue
        if not line.startswith(b"data:"):
            return None
        try:
            obj = json.loads(line[5:].strip())
        except ValueError:
            return None
        if isinstance(obj, dict) and obj.get("error") and not obj.get("choices"):
            err = obj["error"]
            return err if isinstance(err, dict) else {"message": str(err)}
        return None
    return None


def _is_event_stream(start: Message) -> bool:
    for name, value in start.get("headers") or ():
        if bytes(name).lower() == b"content-type":
            return bytes(value).split(b";")[0].strip().lower() == b"text/event-stream"
    return False


class FirstTokenGate:
    """Pure ASGI middleware; see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        state = "waiting"  # -> "passing" (sent the held start) or "refused" (sent a 503, drop the rest)

        async def gated(message: Message) -> None:
            nonlocal held, state
            if state == "passing":
                await send(message)
                return
            if state == "refused":
                return
            kind = message.get("type")
            if kind == "http.response.start":
                if message.get("status") != 200 or not _is_event_stream(message):
                    state = "passing"
                    await send(message)
                else:
                    held = message
                return
            if kind != "http.response.body" or held is None:
                state = "passing"
                await send(message)
                return
            body = bytes(message.get("body", b""))
            if not body and message.get("more_body", False):
                return  # nothing yet: keep holding
            err = first_event_error(body)
            if err is not None:
                state = "refused"
                payload = json.dumps({"error": {**err, "retryable": True}}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": RETRY_STATUS,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            (b"retry-after", b"1"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": payload, "more_body": False})
                return
            state = "passing"
            await send(held)
            await send(message)

        await self.app(scope, receive, gated)
        if state == "waiting" and held is not None:
            await send(held)  # the app ended without a body message: let the server close the response
            await send({"type": "http.response.body", "body": b"", "more_body": False})
