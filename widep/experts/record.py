"""Record expert load from a live deployment through vLLM's routed-expert return (no patch to vLLM).

vLLM 0.3x started with ``--enable-return-routed-experts`` (topology ``serving.record_routed_experts: true``)
adds ``routed_experts`` to every completion choice: base64 of ``.npy`` bytes of an integer array shaped
``(tokens - 1, layers, top_k)`` (the last sampled token has not been forwarded yet), the logical expert ids each
token was routed to in each MoE layer (vllm/entrypoints/openai/completion/protocol.py). :class:`Aggregator`
sums them into ``counts[layer][expert]``; :func:`record` drives the requests (one thread per in-flight request,
round-robin over the topology's endpoints) with greedy sampling, so recording changes no served token.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from widep.errors import UserError
from widep.experts.load import ExpertLoad

FLAG = "--enable-return-routed-experts"
NOT_ENABLED = (
    "the deployment returns no routed_experts: it was not started with vLLM's " + FLAG + ". Set "
    "serving.record_routed_experts: true in the topology (widep render / launch / lws then add "
    + FLAG
    + ") or add "
    + FLAG
    + " to the vLLM command line, and restart."
)


def decode_routed_experts(b64: str) -> np.ndarray:
    """The (tokens, layers, top_k) array of one choice's ``routed_experts`` field."""
    arr = np.load(io.BytesIO(base64.b64decode(b64)), allow_pickle=False)
    if arr.ndim != 3:
        raise UserError(f"routed_experts: expected a (tokens, layers, top_k) array; got shape {arr.shape}.")
    return arr


@dataclass
class Aggregator:
    """Sums routed-expert arrays into counts[moe_layer][expert]."""

    layers: int
    """MoE layers of the model."""
    experts: int
    counts: np.ndarray = field(init=False)
    tokens: int = 0
    requests: int = 0

    def __post_init__(self) -> None:
        self.counts = np.zeros((self.layers, self.experts), dtype=np.int64)

    def add(self, routed: np.ndarray) -> None:
        t, n_layers, _ = routed.shape
        if n_layers < self.layers:
            raise UserError(
                f"routed_experts: {n_layers} layers in the response but the model has {self.layers} MoE layers."
            )
        moe = routed[:, n_layers - self.layers :, :]  # dense layers (first_k_dense_replace) come first
        if moe.size and (moe.min() < 0 or moe.max() >= self.experts):
            raise UserError(
                f"routed_experts: expert ids outside 0..{self.experts - 1} (min {moe.min()}, max {moe.max()})."
            )
        for li in range(self.layers):
            self.counts[li] += np.bincount(moe[:, li, :].ravel(), minlength=self.experts)
        self.tokens += t
        self.requests += 1

    def add_response(self, body: dict[str, Any]) -> None:
        choices = body.get("choices") or []
        if not choices or all(c.get("routed_experts") is None for c in choices):
            raise UserError(NOT_ENABLED)
        for c in choices:
            if c.get("routed_experts") is not None:
                self.add(decode_routed_experts(c["routed_experts"]))

    def result(self, model: str, source: str) -> ExpertLoad:
        if self.tokens == 0:
            raise UserError("record: no token was routed; nothing to write.")
        return ExpertLoad(
            model=model,
            layers=self.layers,
            experts=self.experts,
            counts=tuple(tuple(float(x) for x in row) for row in self.counts),
            tokens=self.tokens,
            source=source,
        )


PROMPT_WORDS = (
    "wide expert parallelism spreads the experts of a mixture of experts model over many GPUs each data parallel "
    "rank runs its own attention and KV cache the router picks the top experts for every token"
).split()


def prompts(n: int, words: int = 24, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(PROMPT_WORDS, size=words)) for _ in range(n)]


def _post(url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(
        url.rstrip("/") + "/v1/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise UserError(f"{url}: HTTP {err.code}: {err.read()[:300].decode(errors='replace')}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        raise UserError(f"{url}: no answer ({getattr(err, 'reason', err)}). Is the deployment running?") from None


def record(
    urls: list[str],
    model_name: str,
    agg: Aggregator,
    *,
    requests: int,
    max_tokens: int,
    concurrency: int,
    timeout: float = 300.0,
) -> list[str]:
    """Send ``requests`` greedy completions round-robin over ``urls`` and aggregate their routed experts.
    Returns the generated texts (in request order)."""
    texts = prompts(requests)

    def one(i: int) -> dict[str, Any]:
        payload = {"model": model_name, "prompt": texts[i], "max_tokens": max_tokens, "temperature": 0.0}
        return _post(urls[i % len(urls)], payload, timeout)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        bodies = list(pool.map(one, range(requests)))
    out = []
    for body in bodies:
        agg.add_response(body)
        out.append("".join(c.get("text", "") for c in body.get("choices", [])))
    return out
