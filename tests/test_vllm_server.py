"""One real CPU vLLM server of the tiny MoE answers completions (the only server start here)."""

from __future__ import annotations

import os

import pytest
from vllm_helpers import live_group_members, start_vllm


@pytest.mark.vllm
def test_tiny_moe_served_by_real_vllm(vllm_python: str, tiny_moe_dir) -> None:
    argv = ["--model", str(tiny_moe_dir), "--enforce-eager", "--served-model-name", "tiny-moe"]
    with start_vllm(argv, {"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=300, python=vllm_python) as srv:
        pgid = os.getpgid(srv.proc.pid)
        assert len(live_group_members(pgid)) >= 2  # API server + EngineCore (+ worker)
        models = srv.get_json("/v1/models")
        assert [m["id"] for m in models["data"]] == ["tiny-moe"]
        req = {
            "model": "tiny-moe",
            "prompt": "Wide expert parallelism spreads the experts",
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": True,
        }
        first = srv.post_json("/v1/completions", req)
        again = srv.post_json("/v1/completions", req)
        print(f"vLLM healthy after {srv.startup_s:.1f} s; completion: {first['choices'][0]['text']!r}")
    assert first["usage"]["completion_tokens"] == 8
    assert first["usage"]["prompt_tokens"] > 1  # tokenized by the tiny BPE tokenizer
    assert isinstance(first["choices"][0]["text"], str) and first["choices"][0]["text"]
    assert again["choices"][0]["text"] == first["choices"][0]["text"]  # greedy is deterministic
    # the helper took the whole process group down (API server, EngineCore, workers)
    assert live_group_members(pgid) == []
