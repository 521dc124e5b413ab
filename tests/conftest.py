"""Shared fixtures: the Python that runs vLLM, the tiny MoE model, and real vLLM servers.

* ``vllm_python`` — a Python that has vLLM installed: ``$WIDEP_VLLM_PYTHON``, else this
  interpreter. Without one the test is skipped, except under CI (``CI=true``), where vLLM is part of
  the environment and a missing vLLM fails the test instead of hiding it.
* ``tiny_moe_dir`` — the tiny Qwen3-MoE built once per session (``widep.tinymoe``), in
  ``$WIDEP_CACHE`` when set (reused across sessions), else in a session temporary directory.
  ``tiny_moe`` is the same for any architecture: ``tiny_moe("deepseek_v3")``.
* real servers: ``from vllm_helpers import start_vllm`` (a context manager; see that module).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

_IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(reason: str) -> None:
    """Skip, or fail under CI where the dependency must be present."""
    if _IN_CI:
        pytest.fail(
            f"{reason} (CI=true: vLLM is part of the CI environment, so this fails instead of skipping)", pytrace=False
        )
    pytest.skip(reason)


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """Path of a Python interpreter that has vLLM installed.

    Only the package is looked up here (cheap); a vLLM that is installed but does not import
    then fails the tests that use it, loudly, rather than skipping them.
    """
    explicit = os.environ.get("WIDEP_VLLM_PYTHON")
    python = explicit or sys.executable
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        _missing(f"cannot run {python} to look for vllm: {err}")
    if proc.returncode != 0:
        source = "WIDEP_VLLM_PYTHON" if explicit else "this interpreter; set WIDEP_VLLM_PYTHON"
        _missing(f"vllm is not installed for {python} ({source})")
    return python


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_moe(arch)`` → directory of the tiny MoE of ``arch``, built at most once a session."""
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        _missing(f"building the tiny MoE needs transformers and tokenizers: {err}")
    from widep.tinymoe import default_cache_dir, ensure_tiny_moe

    root = default_cache_dir() if os.environ.get("WIDEP_CACHE") else tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def get(arch: str = "qwen3_moe") -> Path:
        if arch not in built:
            built[arch] = ensure_tiny_moe(arch, root)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_moe_dir(tiny_moe: Callable[[str], Path]) -> Path:
    """Directory of the tiny Qwen3-MoE (the default architecture)."""
    return tiny_moe("qwen3_moe")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="Rewrite golden files (tests/golden/) from the current output instead of comparing.",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    """True only when pytest runs with --update-golden (the one explicit way to regenerate golden files)."""
    return bool(request.config.getoption("--update-golden"))
