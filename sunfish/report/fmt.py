"""Numbers and values as report text, identical in both formats.

A missing value becomes a dash rather than an error, so a stage that did not run leaves a gap in
a table instead of stopping the report.
"""

from __future__ import annotations

import math
from typing import Any

from sunfish.report.access import finite, num

DASH = "–"


def fixed(x: Any, nd: int = 3) -> str:
    """Fixed decimals for numbers; a dash for anything missing."""
    v = num(x)
    if v is None:
        return DASH if x is None else str(x)
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 1e5:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}"


def count(x: Any) -> str:
    v = num(x)
    if v is None:
        return DASH if x is None else str(x)
    if not math.isfinite(v):
        return str(v)
    return f"{v:,.0f}" if v == int(v) else f"{v:,.1f}"


def value(x: Any) -> str:
    """A checklist value or a parameter: numbers to 4 significant digits, dicts as k=v."""
    if x is None:
        return DASH
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return ", ".join(f"{k}: {value(v)}" for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(value(v) for v in x) + "]"
    return str(x)


def duration(seconds: Any) -> str:
    s = finite(seconds)
    if s is None:
        return DASH
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def pct(x: Any) -> str:
    v = finite(x)
    return DASH if v is None else f"{v:.0%}"


def verdict(passed: Any) -> tuple[str, str]:
    """(css class, label) for a checklist result."""
    if passed is True:
        return "pass", "✓ pass"
    if passed is False:
        return "fail", "✗ fail"
    return "na", "– n/a"
