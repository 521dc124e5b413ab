"""Draw docs/architecture.svg: widep's data flow, from the table below (the source of the picture).

    python scripts/architecture_svg.py            # rewrite docs/architecture.svg
    python scripts/architecture_svg.py --check    # exit 1 when the committed SVG differs (tests/test_import_graph.py)

Plain SVG written by hand: no graphviz at test time. Rows are layers, top to bottom; an edge is "what flows".
"""

from __future__ import annotations

import sys
from html import escape
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "architecture.svg"

# (row, column, id, title, subtitle)
NODES = [
    (0, 1, "spec", "spec/", "TopologySpec (pydantic, strict), models, GPUs, vLLM version table, option table"),
    (1, 1, "plan", "plan/", "plan(): DeploymentPlan (frozen) - rules.py, extras.py, memory.py"),
    (2, 0, "render", "render/", "ProcessCommand per rank: argv + env templates, late-bound slots"),
    (2, 2, "perf", "perf/", "sweep: candidates -> rules.py fast path -> model -> Pareto"),
    (3, 0, "run", "run/", "launch: bare metal / Ray / Slurm backends, one supervisor"),
    (3, 1, "k8s", "k8s/", "LeaderWorkerSet + router manifests, validation"),
    (3, 2, "bench", "bench/", "load generator, reports, plots"),
]
# (from, to, label)
EDGES = [
    ("spec", "plan", "TopologySpec"),
    ("plan", "render", "DeploymentPlan"),
    ("plan", "perf", "rules, memory_budget"),
    ("render", "run", "ProcessCommand"),
    ("render", "k8s", "ProcessCommand"),
    ("perf", "bench", "measure"),
    ("perf", "run", "measure: launch"),
]

W, H, COL, ROW, X0, Y0 = 300, 64, 340, 120, 20, 20


def box(row: int, col: int) -> tuple[int, int]:
    return X0 + col * COL, Y0 + row * ROW


def svg() -> str:
    pos = {n[2]: box(n[0], n[1]) for n in NODES}
    width, height = X0 * 2 + 2 * COL + W, Y0 * 2 + 3 * ROW + H
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
        '<defs><marker id="a" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for a, b, label in EDGES:
        (ax, ay), (bx, by) = pos[a], pos[b]
        x1, y1, x2, y2 = ax + W // 2, ay + H, bx + W // 2, by
        out.append(
            f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#555" stroke-width="1.5" marker-end="url(#a)"/>'
        )
        mx, my = (x1 + x2) // 2, (y1 + y2) // 2
        out.append(f'<text x="{mx + 4}" y="{my}" font-size="11" fill="#333">{escape(label)}</text>')
    for _row, _col, ident, title, sub in NODES:
        x, y = pos[ident]
        out.append(f'<rect x="{x}" y="{y}" width="{W}" height="{H}" rx="8" fill="#eef3fb" stroke="#3a6ea5"/>')
        out.append(f'<text x="{x + 10}" y="{y + 22}" font-size="15" font-weight="bold">{escape(title)}</text>')
        words, lines, cur = sub.split(), [], ""
        for w in words:
            if len(cur) + len(w) + 1 > 46:
                lines.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}".strip()
        lines.append(cur)
        for i, ln in enumerate(lines[:2]):
            out.append(f'<text x="{x + 10}" y="{y + 40 + 14 * i}" font-size="11">{escape(ln)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    text = svg()
    if "--check" in argv:
        return 0 if OUT.exists() and OUT.read_text() == text else 1
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
