"""Line and scatter charts as inline SVG text, for the report page: nothing to load in the browser, no network.

A chart holds series of (x, y) points; x is a number (a step, lora.r, optim.lr on a log axis when it spans
a decade or more) or, when any x is text (distributed=zero2), a category.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 520, 270
LEFT, RIGHT, TOP, BOTTOM = 64, 14, 26, 42  # the legend sits in the top margin
MAX_POINTS = 400  # a long run's curve is thinned to this many points (the last one kept)


@dataclass
class Series:
    label: str
    points: list[tuple]  # (x, y)
    color: str
    line: bool = True  # join the points; else markers only
    markers: bool = False


def _thin(points: list[tuple]) -> list[tuple]:
    if len(points) <= MAX_POINTS:
        return points
    stride = math.ceil(len(points) / MAX_POINTS)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering lo..hi."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


class _Axis:
    """Data values to pixels along one axis: linear, logarithmic or by category."""

    def __init__(self, values: list, start: float, end: float, log: bool = False):
        self.start, self.end = start, end
        self.categories = sorted({str(v) for v in values}) if any(isinstance(v, str) for v in values) else None
        self.log = log and self.categories is None and min(values) > 0 and max(values) / min(values) >= 10
        if self.categories is not None:
            self.lo, self.hi = -0.5, len(self.categories) - 0.5
            return
        nums = [math.log10(v) if self.log else float(v) for v in values]
        lo, hi = min(nums), max(nums)
        pad = (hi - lo) * 0.05 or (abs(lo) * 0.05 or 0.5)
        self.lo, self.hi = lo - pad, hi + pad

    def __call__(self, v) -> float:
        if self.categories is not None:
            u = self.categories.index(str(v))
        else:
            u = math.log10(v) if self.log else float(v)
        return self.start + (u - self.lo) / (self.hi - self.lo) * (self.end - self.start)

    def ticks(self) -> list[tuple[float, str]]:
        """(pixel, label) of each tick."""
        if self.categories is not None:
            return [(self(c), c) for c in self.categories]
        if self.log:  # powers of ten over several decades, else 1-2-5 steps
            decades = range(math.floor(self.lo), math.ceil(self.hi) + 1)
            steps = (1,) if len(decades) > 3 else (1, 2, 5)
            values = [m * 10.0**e for e in decades for m in steps if self.lo <= math.log10(m) + e <= self.hi]
            return [(self(v), f"{v:g}") for v in values]
        ticks = nice_ticks(self.lo, self.hi)
        digits = max(0, -math.floor(math.log10(ticks[1] - ticks[0]))) if len(ticks) > 1 else 4
        return [(self(t), f"{t:.{digits}f}") for t in ticks]


def chart(series: list[Series], x_label: str, y_label: str, log_x: bool = False) -> str:
    """An <svg> of the series with axes, ticks, a legend and a tooltip on each marker."""
    series = [Series(s.label, _thin(s.points), s.color, s.line, s.markers) for s in series if s.points]
    if not series:
        return '<p class="empty">nothing to plot</p>'
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    fx = _Axis(xs, LEFT, WIDTH - RIGHT, log=log_x)
    fy = _Axis(ys, HEIGHT - BOTTOM, TOP)
    parts = [
        f'<svg class="chart" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">',
        f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
        'fill="#fff" stroke="#bbb"/>',
    ]
    for px, label in fx.ticks():
        parts.append(
            f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" stroke="#eee"/>'
            f'<text x="{px:.1f}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle">{escape(label)}</text>'
        )
    for py, label in fy.ticks():
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py:.1f}" y2="{py:.1f}" stroke="#eee"/>'
            f'<text x="{LEFT - 4}" y="{py + 4:.1f}" text-anchor="end">{escape(label)}</text>'
        )
    parts.append(
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 6}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
        f'<text transform="translate(12 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    for i, s in enumerate(series):
        xy = [(fx(x), fy(y)) for x, y in s.points]
        if s.line and len(xy) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in xy)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="1.5"/>')
        if s.markers or len(xy) == 1:
            parts += [
                f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{s.color}">'
                f"<title>{escape(f'{s.label}: {x_label} {x}, {y_label} {y:.4g}')}</title></circle>"
                for (px, py), (x, y) in zip(xy, s.points)
            ]
        lx = LEFT + 120 * i
        parts.append(
            f'<rect x="{lx}" y="6" width="10" height="10" fill="{s.color}"/>'
            f'<text x="{lx + 14}" y="15">{escape(s.label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
