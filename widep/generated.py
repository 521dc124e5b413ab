"""Checked-in generated files (``lws/``, ``launch/``): what is stale against what widep generates now."""

from __future__ import annotations

from pathlib import Path


def stale_files(out_dir: Path, expected: dict[str, str], present: set[str]) -> list[str]:
    """One line per file of ``out_dir`` that is stale, missing or extra against ``expected`` (name -> text).

    ``present`` is the set of names (relative to ``out_dir``) the generator owns there now.
    """
    problems = []
    for name, text in sorted(expected.items()):
        path = out_dir / name
        if name not in present:
            problems.append(f"{path}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path}: differs from what widep generates now")
    for name in sorted(present - set(expected)):
        problems.append(f"{out_dir / name}: not generated from any topology (remove it)")
    return problems
