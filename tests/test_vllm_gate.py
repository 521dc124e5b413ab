"""The first-token gate (widep/vllm_gate.py) on its own, driven through the ASGI protocol with small apps shaped like
vLLM's responses; the real thing (vLLM's API server loading it behind the router, its engine SIGKILLed) is
tests/test_chaos.py's real-vLLM test. Also: the launch renders it only where vLLM's interpreter imports widep."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from widep.vllm_gate import MIDDLEWARE, FirstTokenGate, first_event_error

ROOT = Path(__file__).resolve().parents[1]
SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]


def app_of(status: int, headers: list[tuple[bytes, bytes]], bodies: list[bytes]):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for i, b in enumerate(bodies):
            await send({"type": "http.response.body", "body": b, "more_body": i < len(bodies) - 1})

    return app


def call(app, method: str = "POST") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(m):
        sent.append(dict(m))

    asyncio.run(FirstTokenGate(app)({"type": "http", "method": method, "path": "/v1/completions"}, receive, send))
    return sent


def test_a_stream_whose_first_event_is_an_error_answers_503_with_that_error_and_nothing_else():
    err = b'data: {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError"}}\n\n'
    sent = call(app_of(200, SSE, [b"", err, b"data: [DONE]\n\n", b""]))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    body = json.loads(sent[1]["body"])
    assert body["error"]["message"] == "EngineCore encountered an issue." and body["error"]["retryable"] is True
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(sent[1]["body"])).encode()


def test_a_stream_with_tokens_passes_unchanged_and_its_headers_leave_with_the_first_token():
    chunks = [b'data: {"choices": [{"text": "a"}]}\n\n', b'data: {"error": {"message": "late"}}\n\n', b""]
    app = app_of(200, SSE, chunks)
    sent = call(app)
    assert sent[0] == {"type": "http.response.start", "status": 200, "headers": SSE}
    assert [m["body"] for m in sent[1:]] == chunks  # a mid-stream error is the client's to see


@pytest.mark.parametrize(
    "status,headers,method",
    [
        (200, [(b"content-type", b"application/json")], "POST"),  # not streamed
        (400, SSE, "POST"),  # already an error status
        (200, SSE, "GET"),  # not a generation request
    ],
)
def test_other_responses_pass_through_untouched(status, headers, method):
    bodies = [b'data: {"error": {"message": "x"}}\n\n']
    sent = call(app_of(status, headers, bodies), method)
    assert sent[0]["status"] == status and sent[1]["body"] == bodies[0]


def test_an_app_that_ends_without_a_body_still_completes_its_response():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": SSE})

    sent = call(app)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200


@pytest.mark.parametrize(
    "body,expected",
    [
        (b': ping\n\ndata: {"error": {"message": "m"}}\n\n', {"message": "m"}),
        (b'data: {"error": "plain"}\n\n', {"message": "plain"}),
        (b'data: {"choices": [], "error": null}\n\n', None),
        (b"data: [DONE]\n\n", None),
        (b"event: x\n", None),
    ],
)
def test_first_event_error(body, expected):
    assert first_event_error(body) == expected


def test_the_launch_renders_the_gate_behind_the_router_where_vllms_interpreter_imports_widep(tmp_path):
    import yaml

    from widep.plan import plan
    from widep.render.vllm import render
    from widep.run.host import imports_gate, render_context
    from widep.spec.topology import parse_topology

    assert imports_gate(sys.executable) and not imports_gate(None)
    assert not imports_gate(str(tmp_path / "no-such-python"))
    doc = yaml.safe_load((ROOT / "topologies/tiny-moe-cpu-ep2.yaml").read_text())
    doc.setdefault("vllm", {})["entry_point"] = "module"
    bare = plan(parse_topology(doc))
    doc["router"] = {"enabled": True}
    p = plan(parse_topology(doc))
    ctx = render_context(p, sys.executable, str(tmp_path))
    assert ctx.first_token_gate
    servers = [c for c in render(p, ctx) if not c.headless]
    assert servers and all(c.argv[c.argv.index("--middleware") + 1] == MIDDLEWARE for c in servers)
    assert not render_context(bare, sys.executable, str(tmp_path)).first_token_gate  # no front door to retry
