"""widep/perf/chart.py: the matplotlib-free chart of large sweeps (PNG through Pillow, SVG as text)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from widep.perf.chart import Label, Series, _dashes, nice_ticks, render


def test_nice_ticks_cover_the_data_with_round_steps() -> None:
    assert nice_ticks(2.9) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert nice_ticks(2600.0) == [0.0, 500.0, 1000.0, 1500.0, 2000.0, 2500.0, 3000.0]
    assert nice_ticks(140.0) == [0.0, 25.0, 50.0, 75.0, 100.0, 125.0, 150.0]
    for hi in (0.03, 7.0, 99.0, 1234.5, 1e6):
        t = nice_ticks(hi)
        assert t[0] == 0.0 and t[-1] >= hi and 3 <= len(t) <= 12
        steps = {round(b - a, 9) for a, b in zip(t, t[1:], strict=False)}
        assert len(steps) == 1
    assert nice_ticks(0.0) == [0.0, 1.0] and nice_ticks(math.nan) == [0.0, 1.0]


def test_dashes_alternate_along_the_whole_polyline() -> None:
    segs = _dashes([(0.0, 0.0), (10.0, 0.0), (10.0, 10.0)], on=6.0, off=4.0)
    drawn = sum(math.dist(a, b) for a, b in segs)
    assert drawn == 12.0  # 0-6 on, 6-10 off, 10-16 on, 16-20 off
    assert segs[0] == ((0.0, 0.0), (6.0, 0.0))


def test_render_writes_png_and_svg_with_every_series_and_label(tmp_path: Path) -> None:
    series = [
        Series([1.0, 2.0, 3.0, math.nan], [10.0, 20.0, 5.0, 1.0], "dots", "#c8c8c8", "cloud <3 & more>"),
        Series([1.0, 3.0], [20.0, 5.0], "dashed", "#808080", "frontier (predicted)"),
        Series([1.0, 3.0], [20.0, 5.0], "markers", "#d62728", "", 3.0),
    ]
    png, svg = render(
        tmp_path / "c-pareto", series, title="T", xlabel="x", ylabel="y", labels=[Label(1.0, 20.0, "a@1", "#d62728")]
    )
    img = Image.open(png)
    assert img.size == (880, 605) and img.format == "PNG"
    # the red markers are on the picture
    rgb = np.asarray(img.convert("RGB")).astype(int)
    assert ((rgb[..., 0] > 200) & (rgb[..., 1] < 80)).any()
    text = svg.read_text()
    assert text.startswith("<svg") and "frontier (predicted)" in text and "a@1" in text
    assert "cloud &lt;3 &amp; more&gt;" in text  # escaped
    assert text.count("<circle") == 3 + 2 + 1  # finite dots, markers, one legend dot (markers have no label)
