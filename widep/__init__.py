"""widep: plan, launch and benchmark wide expert-parallel vLLM deployments."""

__version__ = "0.1.0"
