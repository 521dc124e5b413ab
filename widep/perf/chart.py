"""A small scatter/line chart written straight to PNG (Pillow) and SVG (text), for the plots of large sweeps.

``widep sweep`` over ten thousand candidates draws one chart: a grey cloud of sampled (tokens/s/user,
tokens/s/GPU) points, the predicted frontier as a dashed line with red markers, and a few labels. Importing
matplotlib and drawing through it costs about 0.65 CPU-seconds, more than scoring every candidate, so this
module draws that chart itself: linear axes from zero with round ticks, a light grid, a legend, labels. Plots
that overlay measured runs, or draw one line per candidate, still go through matplotlib
(:func:`widep.perf.sweep.plot_sweep`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

W, H = 880, 605
LEFT, RIGHT, TOP, BOTTOM = 78, 18, 40, 58
GRID, AXIS, TEXT = "#e6e6e6", "#333333", "#222222"


@dataclass(frozen=True)
class Series:
    """One thing drawn: 'dots' (small filled circles), 'markers' (larger circles) or 'dashed' (a polyline)."""

    xs: Sequence[float]
    ys: Sequence[float]
    kind: str
    color: str
    label: str = ""
    size: float = 2.0


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    color: str


def nice_ticks(hi: float, want: int = 6) -> list[float]:
    """Round tick values from 0 to at least ``hi`` (steps of 1, 2, 2.5 or 5 times a power of ten)."""
    if not hi > 0 or not math.isfinite(hi):
        return [0.0, 1.0]
    raw = hi / want
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw)
    n = math.ceil(hi / step - 1e-9)
    return [round(k * step, 10) for k in range(n + 1)]


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 10 or v == int(v) else f"{v:g}"


class _Frame:
    """Data -> pixel mapping of the plot area."""

    def __init__(self, xt: list[float], yt: list[float]) -> None:
        self.xt, self.yt = xt, yt
        self.x0, self.x1 = LEFT, W - RIGHT
        self.y0, self.y1 = H - BOTTOM, TOP

    def px(self, x: float) -> float:
        return self.x0 + (x / self.xt[-1]) * (self.x1 - self.x0)

    def py(self, y: float) -> float:
        return self.y0 - (y / self.yt[-1]) * (self.y0 - self.y1)


def _dashes(pts: list[tuple[float, float]], on: float = 6.0, off: float = 4.0) -> list[tuple[tuple[float, float], ...]]:
    """A polyline cut into dash segments (Pillow draws no dashed lines)."""
    out: list[tuple[tuple[float, float], ...]] = []
    drawing, left = True, on
    for (ax, ay), (bx, by) in zip(pts, pts[1:], strict=False):
        seg = math.hypot(bx - ax, by - ay)
        t = 0.0
        while t < seg - 1e-9:
            d = min(left, seg - t)
            if drawing:
                p0 = (ax + (bx - ax) * t / seg, ay + (by - ay) * t / seg)
                p1 = (ax + (bx - ax) * (t + d) / seg, ay + (by - ay) * (t + d) / seg)
                out.append((p0, p1))
            t += d
            left -= d
            if left <= 1e-9:
                drawing = not drawing
                left = on if drawing else off
    return out


def render(
    prefix: Path,
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    labels: Sequence[Label] = (),
) -> list[Path]:
    """Write ``prefix``.png and ``prefix``.svg; returns both paths."""
    xs_all = [x for s in series for x in s.xs if math.isfinite(x)]
    ys_all = [y for s in series for y in s.ys if math.isfinite(y)]
    fr = _Frame(nice_ticks(max(xs_all, default=1.0) * 1.04), nice_ticks(max(ys_all, default=1.0) * 1.06))
    png, svg = prefix.with_suffix(".png"), prefix.with_suffix(".svg")
    _png(png, fr, series, labels, title, xlabel, ylabel)
    _svg(svg, fr, series, labels, title, xlabel, ylabel)
    return [png, svg]


def _png(
    path: Path, fr: _Frame, series: Sequence[Series], labels: Sequence[Label], title: str, xlabel: str, ylabel: str
) -> None:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small, tiny, big = (ImageFont.load_default(size=s) for s in (12, 11, 9, 14))
    for t in fr.xt:
        d.line([(fr.px(t), fr.y0), (fr.px(t), fr.y1)], fill=GRID)
        d.text((fr.px(t), fr.y0 + 5), _fmt(t), fill=TEXT, font=small, anchor="mt")
    for t in fr.yt:
        d.line([(fr.x0, fr.py(t)), (fr.x1, fr.py(t))], fill=GRID)
        d.text((fr.x0 - 5, fr.py(t)), _fmt(t), fill=TEXT, font=small, anchor="rm")
    d.rectangle([fr.x0, fr.y1, fr.x1, fr.y0], outline=AXIS)
    for s in series:
        pts = [(fr.px(x), fr.py(y)) for x, y in zip(s.xs, s.ys, strict=False) if math.isfinite(x) and math.isfinite(y)]
        if s.kind == "dashed":
            for a, b in _dashes(pts):
                d.line([a, b], fill=s.color, width=1)
        else:
            r = s.size
            for x, y in pts:
                d.ellipse([x - r, y - r, x + r, y + r], fill=s.color)
    for lb in labels:
        d.text((fr.px(lb.x) + 4, fr.py(lb.y) - 4), lb.text, fill=lb.color, font=tiny, anchor="lb")
    d.text(((fr.x0 + fr.x1) / 2, 14), title, fill=TEXT, font=big, anchor="mt")
    d.text(((fr.x0 + fr.x1) / 2, H - 18), xlabel, fill=TEXT, font=font, anchor="mm")
    tw = int(d.textlength(ylabel, font=font)) + 4
    lab = Image.new("RGB", (tw, 18), "white")
    ImageDraw.Draw(lab).text((2, 9), ylabel, fill=TEXT, font=font, anchor="lm")
    lab = lab.rotate(90, expand=True)
    img.paste(lab, (8, int((fr.y0 + fr.y1) / 2 - tw / 2)))
    _legend_png(d, fr, series, small)
    img.save(path, optimize=False, compress_level=6)


def _legend_rows(series: Sequence[Series]) -> list[Series]:
    return [s for s in series if s.label]


def _legend_png(d: object, fr: _Frame, series: Sequence[Series], font: object) -> None:
    rows = _legend_rows(series)
    if not rows:
        return
    w = 24 + max(int(d.textlength(s.label, font=font)) for s in rows)  # type: ignore[attr-defined]
    x1, y0 = fr.x1 - 8, fr.y1 + 8
    x0 = x1 - w - 12
    d.rectangle([x0, y0, x1, y0 + 8 + 16 * len(rows)], fill="white", outline="#cccccc")  # type: ignore[attr-defined]
    for k, s in enumerate(rows):
        y = y0 + 12 + 16 * k
        if s.kind == "dashed":
            for a, b in _dashes([(x0 + 6, y), (x0 + 22, y)], 4.0, 3.0):
                d.line([a, b], fill=s.color)  # type: ignore[attr-defined]
        else:
            d.ellipse([x0 + 14 - s.size, y - s.size, x0 + 14 + s.size, y + s.size], fill=s.color)  # type: ignore[attr-defined]
        d.text((x0 + 26, y), s.label, fill=TEXT, font=font, anchor="lm")  # type: ignore[attr-defined]


def _svg(
    path: Path, fr: _Frame, series: Sequence[Series], labels: Sequence[Label], title: str, xlabel: str, ylabel: str
) -> None:
    e = escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="DejaVu Sans, Arial, sans-serif">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
    ]
    for t in fr.xt:
        x = fr.px(t)
        out.append(f'<line x1="{x:.1f}" y1="{fr.y0}" x2="{x:.1f}" y2="{fr.y1}" stroke="{GRID}"/>')
        out.append(f'<text x="{x:.1f}" y="{fr.y0 + 16}" font-size="11" text-anchor="middle">{_fmt(t)}</text>')
    for t in fr.yt:
        y = fr.py(t)
        out.append(f'<line x1="{fr.x0}" y1="{y:.1f}" x2="{fr.x1}" y2="{y:.1f}" stroke="{GRID}"/>')
        out.append(f'<text x="{fr.x0 - 5}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{_fmt(t)}</text>')
    out.append(
        f'<rect x="{fr.x0}" y="{fr.y1}" width="{fr.x1 - fr.x0}" height="{fr.y0 - fr.y1}" fill="none" stroke="{AXIS}"/>'
    )
    for s in series:
        pts = [(fr.px(x), fr.py(y)) for x, y in zip(s.xs, s.ys, strict=False) if math.isfinite(x) and math.isfinite(y)]
        if s.kind == "dashed":
            p = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(f'<polyline points="{p}" fill="none" stroke="{s.color}" stroke-dasharray="6 4"/>')
        else:
            out.append(f'<g fill="{s.color}">')
            out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{s.size:g}"/>' for x, y in pts)
            out.append("</g>")
    for lb in labels:
        out.append(
            f'<text x="{fr.px(lb.x) + 4:.1f}" y="{fr.py(lb.y) - 4:.1f}" font-size="9" fill="{lb.color}">'
            f"{e(lb.text)}</text>"
        )
    rows = _legend_rows(series)
    if rows:
        w = 30 + 6.5 * max(len(s.label) for s in rows)
        x1, y0 = fr.x1 - 8, fr.y1 + 8
        x0 = x1 - w
        out.append(
            f'<rect x="{x0:.1f}" y="{y0}" width="{w:.1f}" height="{8 + 16 * len(rows)}" fill="white" stroke="#cccccc"/>'
        )
        for k, s in enumerate(rows):
            y = y0 + 12 + 16 * k
            if s.kind == "dashed":
                out.append(
                    f'<line x1="{x0 + 6:.1f}" y1="{y}" x2="{x0 + 22:.1f}" y2="{y}" stroke="{s.color}" '
                    'stroke-dasharray="4 3"/>'
                )
            else:
                out.append(f'<circle cx="{x0 + 14:.1f}" cy="{y}" r="{s.size:g}" fill="{s.color}"/>')
            out.append(f'<text x="{x0 + 26:.1f}" y="{y + 4}" font-size="11">{e(s.label)}</text>')
    cx, cy = (fr.x0 + fr.x1) / 2, (fr.y0 + fr.y1) / 2
    out.append(f'<text x="{cx:.1f}" y="26" font-size="14" text-anchor="middle">{e(title)}</text>')
    out.append(f'<text x="{cx:.1f}" y="{H - 14}" font-size="12" text-anchor="middle">{e(xlabel)}</text>')
    out.append(
        f'<text x="18" y="{cy:.1f}" font-size="12" text-anchor="middle" transform="rotate(-90 18 {cy:.1f})">'
        f"{e(ylabel)}</text>"
    )
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")
