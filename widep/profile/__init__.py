"""``widep profile``: capture vLLM's torch profiler on chosen ranks of a running deployment."""
