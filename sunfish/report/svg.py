"""A small dependency-free SVG line chart for the HTML report.

``line_chart`` draws several named series of points on shared axes, with ticks, axis labels, a
legend and a title; the y axis can be logarithmic. A point is ``(x, y)`` or ``(x, y, lo, hi)``;
the second form draws an error bar from lo to hi (e.g. a Wilson interval). Points that are not
finite numbers (None, NaN, inf, and y <= 0 on a log axis) are skipped. All text is escaped.
The result is a standalone ``<svg>`` element to inline in HTML.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["line_chart", "nice_ticks", "PALETTE"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")

_FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif"
_CHAR_W = 6.4  # rough width of one 11px character, for legend layout


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        return [lo]
    raw = (hi - lo) / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v = start + len(ticks) * step
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis: the data range [lo, hi] (both > 0) widened to the enclosing ticks."""
    e0, e1 = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    ticks: list[float] = []
    for mults in ((1,), (1, 3), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        seq = [m * 10**e for e in range(e0, e1 + 1) for m in mults]
        below = [t for t in seq if t <= lo * (1 + 1e-9)]
        above = [t for t in seq if t >= hi * (1 - 1e-9)]
        start, end = (below[-1] if below else seq[0]), (above[0] if above else seq[-1])
        ticks = [t for t in seq if start <= t <= end]
        if len(ticks) >= 3:
            return ticks
    return ticks or [lo, hi]


def _fmt_tick(v: float, step: float | None = None) -> str:
    a = abs(v)
    if v == 0:
        return "0"
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e4:
        return f"{v / 1e3:g}k"
    if a < 1e-3:
        return f"{v:.0e}"
    if step is not None and step > 0:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        if step * 10**decimals % 1 > 1e-6:  # 2.5-type steps need one more digit
            decimals += 1
        return f"{v:.{decimals}f}"
    if a >= 100 and v == round(v):
        return f"{v:.0f}"
    return f"{v:.3g}"


def _normalise(series: Mapping[str, Iterable] | Sequence) -> list[tuple[str, list]]:
    items = series.items() if isinstance(series, Mapping) else series
    out = []
    for entry in items:
        try:
            name, points = entry
        except (TypeError, ValueError):
            continue
        out.append((str(name), list(points or [])))
    return out


def _clean(points: list, log_y: bool) -> list[tuple[float, float, float | None, float | None]]:
    out = []
    for p in points:
        if not isinstance(p, (list, tuple)) or len(p) < 2:
            continue
        x, y = _finite(p[0]), _finite(p[1])
        if x is None or y is None or (log_y and y <= 0):
            continue
        lo = _finite(p[2]) if len(p) > 2 else None
        hi = _finite(p[3]) if len(p) > 3 else None
        if log_y:
            lo = lo if lo is not None and lo > 0 else None
            hi = hi if hi is not None and hi > 0 else None
        out.append((x, y, lo, hi))
    out.sort(key=lambda p: p[0])
    return out


def line_chart(
    series: Mapping[str, Iterable] | Sequence[tuple[str, Iterable]],
    *,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    log_y: bool = False,
    width: int = 540,
    height: int = 320,
    y_min: float | None = None,
    y_max: float | None = None,
    markers: bool = True,
    colors: Sequence[str] = PALETTE,
) -> str:
    """An SVG line chart of named series; see the module docstring for the point format.

    ``y_min``/``y_max`` widen the y range to include those values (e.g. 0 and 1 for shares);
    data outside them still shows. An empty chart says "no data".
    """
    named = _normalise(series)
    cleaned = [(name, _clean(points, log_y), colors[i % len(colors)]) for i, (name, points) in enumerate(named)]
    drawn = [(n, p, c) for n, p, c in cleaned if p]

    legend_rows = _legend_layout([n for n, _, _ in drawn], width - 70)
    top = (28 if title else 12) + 16 * len(legend_rows)
    left, right, bottom = 62, 16, 46
    pw, ph = width - left - right, height - top - bottom

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{_esc(title or "chart")}" style="{_FONT}">',
        f"<title>{_esc(title or 'chart')}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    if title:
        parts.append(
            f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="14" font-weight="600" fill="#222">{_esc(title)}</text>'
        )

    if not drawn:
        parts.append(
            f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>'
            f'<text x="{left + pw / 2:.1f}" y="{top + ph / 2:.1f}" text-anchor="middle" font-size="13" fill="#888">no data</text>'
        )
        parts.append("</svg>")
        return "".join(parts)

    xs = [p[0] for _, pts, _ in drawn for p in pts]
    ys = [v for _, pts, _ in drawn for p in pts for v in (p[1], p[2], p[3]) if v is not None]
    for hint in (y_min, y_max):
        h = _finite(hint)
        if h is not None and (not log_y or h > 0):
            ys.append(h)
    x0, x1 = min(xs), max(xs)
    if 0 < x0 <= 0.2 * x1:  # steps: start the axis at 0
        x0 = 0.0
    if x0 == x1:
        pad = abs(x0) * 0.5 or 1.0
        x0, x1 = x0 - pad, x1 + pad
    y0, y1 = min(ys), max(ys)

    if log_y:
        if y0 == y1:
            y0, y1 = y0 / 2, y1 * 2
        y_ticks = _log_ticks(y0, y1)
        ly0, ly1 = math.log10(min(y0, y_ticks[0])), math.log10(max(y1, y_ticks[-1]))

        def ty(v: float) -> float:
            return top + ph - (math.log10(v) - ly0) / (ly1 - ly0) * ph

        y_step = None
    else:
        if y0 == y1:
            pad = abs(y0) * 0.1 or 1.0
            y0, y1 = y0 - pad, y1 + pad
        y_ticks = nice_ticks(y0, y1, target=5)
        if len(y_ticks) > 1:  # widen the axis to the enclosing ticks
            y_step = y_ticks[1] - y_ticks[0]
            y0 = math.floor(y0 / y_step + 1e-9) * y_step
            y1 = math.ceil(y1 / y_step - 1e-9) * y_step
            n = round((y1 - y0) / y_step)
            y_ticks = [y0 + i * y_step for i in range(n + 1)]
            y_ticks = [0.0 if abs(t) < y_step * 1e-9 else t for t in y_ticks]
        y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else None
        lo_y, hi_y = y0, y1

        def ty(v: float) -> float:
            return top + ph - (v - lo_y) / (hi_y - lo_y) * ph

    x_ticks = nice_ticks(x0, x1, target=6)
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else None

    def tx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * pw

    # grid and ticks
    parts.append('<g font-size="11" fill="#444">')
    for t in y_ticks:
        yy = ty(t)
        parts.append(
            f'<line x1="{left}" y1="{yy:.1f}" x2="{left + pw}" y2="{yy:.1f}" stroke="#e5e5e5"/>'
            f'<text x="{left - 6}" y="{yy + 3.5:.1f}" text-anchor="end">{_esc(_fmt_tick(t, y_step))}</text>'
        )
    for t in x_ticks:
        if t < x0 - 1e-9 or t > x1 + 1e-9:
            continue
        xx = tx(t)
        parts.append(
            f'<line x1="{xx:.1f}" y1="{top + ph}" x2="{xx:.1f}" y2="{top + ph + 4}" stroke="#666"/>'
            f'<text x="{xx:.1f}" y="{top + ph + 16}" text-anchor="middle">{_esc(_fmt_tick(t, x_step))}</text>'
        )
    parts.append("</g>")
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    if x_label:
        parts.append(
            f'<text x="{left + pw / 2:.1f}" y="{height - 8}" text-anchor="middle" font-size="12" fill="#333">{_esc(x_label)}</text>'
        )
    if y_label:
        cy = top + ph / 2
        parts.append(
            f'<text x="14" y="{cy:.1f}" text-anchor="middle" font-size="12" fill="#333" '
            f'transform="rotate(-90 14 {cy:.1f})">{_esc(y_label + (" (log)" if log_y else ""))}</text>'
        )

    # series
    for name, pts, color in drawn:
        parts.append(f'<g class="series" data-name="{_esc(name)}">')
        if len(pts) > 1:
            coords = " ".join(f"{tx(x):.1f},{ty(y):.1f}" for x, y, _, _ in pts)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2" stroke-linejoin="round"/>')
        for x, _y, lo, hi in pts:
            if lo is not None and hi is not None:
                xx, ya, yb = tx(x), ty(lo), ty(hi)
                parts.append(
                    f'<line x1="{xx:.1f}" y1="{ya:.1f}" x2="{xx:.1f}" y2="{yb:.1f}" stroke="{color}" stroke-width="1.2"/>'
                    f'<line x1="{xx - 4:.1f}" y1="{ya:.1f}" x2="{xx + 4:.1f}" y2="{ya:.1f}" stroke="{color}"/>'
                    f'<line x1="{xx - 4:.1f}" y1="{yb:.1f}" x2="{xx + 4:.1f}" y2="{yb:.1f}" stroke="{color}"/>'
                )
        if markers and (len(pts) <= 40 or len(pts) == 1):
            for x, y, _, _ in pts:
                parts.append(
                    f'<circle cx="{tx(x):.1f}" cy="{ty(y):.1f}" r="3" fill="{color}"><title>{_esc(name)}: '
                    f"{_esc(_fmt_tick(x))}, {_esc(f'{y:.4g}')}</title></circle>"
                )
        parts.append("</g>")

    # legend, under the title
    colour_of = {n: c for n, _, c in drawn}
    y_leg = (28 if title else 12) + 4
    for row in legend_rows:
        x_leg = left
        for name in row:
            parts.append(
                f'<rect x="{x_leg}" y="{y_leg}" width="14" height="4" fill="{colour_of[name]}"/>'
                f'<text x="{x_leg + 18}" y="{y_leg + 6}" font-size="11" fill="#333">{_esc(name)}</text>'
            )
            x_leg += 18 + _CHAR_W * len(name) + 16
        y_leg += 16
    parts.append("</svg>")
    return "".join(parts)


def _legend_layout(names: list[str], avail: float) -> list[list[str]]:
    rows: list[list[str]] = []
    row: list[str] = []
    used = 0.0
    for name in names:
        w = 18 + _CHAR_W * len(name) + 16
        if row and used + w > avail:
            rows.append(row)
            row, used = [], 0.0
        row.append(name)
        used += w
    if row:
        rows.append(row)
    return rows
