"""Health probes and the group leader's control endpoint (attempt number shared across nodes).

The launcher on a group's leader node serves ``GET /state`` (the group's :class:`GroupStatus`) and
``POST /fail`` (a follower reports a failed rank) on the group's control port. Followers poll
``/state``: when the attempt number moves on they tear down and restart their ranks in step; when the
state is failed or stopped they stop too.
"""

from __future__ import annotations

import http.client
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def probe(host: str, port: int, path: str = "/health", timeout: float = 2.0) -> tuple[str, float]:
    """('healthy' | 'unhealthy' | 'refused' | 'timeout' | 'error', seconds) for GET http://host:port/path."""
    t = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        state = "healthy" if resp.status == 200 else "unhealthy"
    except ConnectionRefusedError:
        state = "refused"
    except TimeoutError:
        state = "timeout"
    except OSError:
        state = "error"
    finally:
        conn.close()
    return state, time.perf_counter() - t


def http_json(host: str, port: int, method: str, path: str, body: dict | None = None, timeout: float = 3.0) -> Any:
    """A small JSON request; raises OSError/ValueError on failure."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status >= 400:
            raise OSError(f"HTTP {resp.status} from {host}:{port}{path}: {raw[:200]!r}")
        return json.loads(raw) if raw else None
    finally:
        conn.close()


@dataclass(frozen=True)
class FailReport:
    attempt: int
    rank: str
    node: str
    reason: str
    log_tail: tuple[str, ...]


class ControlServer:
    """The leader's control endpoint. ``state_fn`` returns the JSON-able state; reports land in ``reports``."""

    def __init__(self, host: str, port: int, state_fn: Callable[[], dict]) -> None:
        self.reports: queue.Queue[FailReport] = queue.Queue()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:  # quiet
                return

            def _send(self, code: int, obj: Any) -> None:
                raw = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                if self.path == "/state":
                    self._send(200, state_fn())
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                if self.path != "/fail":
                    self._send(404, {"error": "not found"})
                    return
                try:
                    n = int(self.headers.get("Content-Length", "0"))
                    d = json.loads(self.rfile.read(n))
                    outer.reports.put(
                        FailReport(
                            int(d["attempt"]),
                            str(d["rank"]),
                            str(d["node"]),
                            str(d["reason"]),
                            tuple(d.get("log_tail", [])),
                        )
                    )
                except (ValueError, KeyError, TypeError) as err:
                    self._send(400, {"error": str(err)})
                    return
                self._send(200, {"ok": True})

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="widep-control", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
