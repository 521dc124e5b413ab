"""One request's measurements, as every load generator (built-in or adapted) reports them.

Times are seconds. ``start_s`` is relative to the level's start (the same monotonic clock for all
requests of a level); the others are relative to the request's own start. Token counts come from
the server's ``usage`` when it sent one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestRecord:
    """Timings, token counts and outcome of one streamed request."""

    index: int
    """Request number within the level (round-robin endpoint choice uses it)."""
    endpoint: str
    """Base URL the request went to."""
    start_s: float
    """When the request was sent, seconds since the level started."""
    scheduled_s: float | None = None
    """Open loop: when it should have been sent (seconds since level start); None for closed loop."""
    ttft_s: float | None = None
    """Time to the first chunk carrying a token."""
    last_token_s: float | None = None
    """Time to the last chunk carrying a token."""
    e2e_s: float | None = None
    """Time to the end of the stream ([DONE] or the connection closing cleanly)."""
    itls_s: list[float] = field(default_factory=list)
    """Gaps between consecutive token-carrying chunks."""
    chunks: int = 0
    """Token-carrying chunks received."""
    prompt_tokens: int | None = None
    """Input tokens, from the server's usage."""
    completion_tokens: int | None = None
    """Output tokens, from the server's usage."""
    expected_input_tokens: int | None = None
    """Input tokens as counted by the client (the prompt builder)."""
    expected_output_tokens: int | None = None
    """max_tokens sent."""
    ok: bool = False
    """True when the stream completed without error."""
    error: str | None = None
    """What went wrong, for people (HTTP status and body, connection error, timeout)."""
    incomplete: bool = False
    """True when the level's time bound cancelled the request."""

    @property
    def output_tokens(self) -> int:
        """Output tokens: the server's count, else the chunks seen."""
        return self.completion_tokens if self.completion_tokens is not None else self.chunks

    @property
    def input_tokens(self) -> int:
        """Input tokens: the server's count, else the client's."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return self.expected_input_tokens or 0

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (last - first) / (n - 1); None when n < 2."""
        n = self.output_tokens
        if not self.ok or self.ttft_s is None or self.last_token_s is None or n < 2:
            return None
        return (self.last_token_s - self.ttft_s) / (n - 1)

    @property
    def end_s(self) -> float | None:
        """When the request finished, seconds since the level started."""
        return None if self.e2e_s is None else self.start_s + self.e2e_s

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (ITLs in milliseconds to keep lines short)."""
        d = asdict(self)
        d["itls_ms"] = [round(x * 1000.0, 4) for x in d.pop("itls_s")]
        d["tpot_s"] = self.tpot_s
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RequestRecord:
        """Inverse of :meth:`to_json`."""
        d = dict(d)
        d.pop("tpot_s", None)
        d["itls_s"] = [x / 1000.0 for x in d.pop("itls_ms", [])]
        return cls(**d)
