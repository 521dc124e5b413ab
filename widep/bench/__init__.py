"""Benchmarking of live OpenAI-compatible endpoints (``widep bench``).

Modules:
  workload  ISL/OSL shapes, presets and prompt building (tokenizer or word fallback)
  loadgen   the built-in asyncio load generator (closed-loop concurrency, open-loop Poisson)
  metrics   scraping vLLM's Prometheus ``/metrics`` per rank during a level
  stats     pure per-level statistics (percentiles, tokens/s/GPU, tokens/s/user, goodput)
  report    llm-d Benchmark Report v0.2.x documents, per-request JSONL, summary CSV
  sweep     a resumable sweep over levels; failed levels recorded, not fatal
  adapters  ``vllm bench serve`` and inference-perf landing in the same report format
  plot      Pareto and latency plots, read only from disk
  cli       the ``widep bench`` command
"""
