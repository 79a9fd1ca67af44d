"""The bar a guided diffusion model has to clear: prompts followed, without paying in fluency.

A guidance curve (one milestone's rows: scale, adherence, judge perplexity) clears the bar when
one scale w meets all three marks at once:

- adherence: at least MIN_ADHERENCE of the held-out prompts get a sample with their target word;
- gain: at least MIN_GAIN above the unguided samples (w = 0), so the prompt is what did it;
- fluency: the judge perplexity of its samples is at most MAX_JUDGE_RATIO times the unguided
  samples', so the adherence was not bought with word salad or with the target word repeated.

Why one function: the three marks are what "the model follows prompts" means in this project (the
quality recipe in the README is judged by them), so evaluate logs the verdict of every run to
MLflow and DVC metrics, and the report prints it under the curve, rather than a reader working it
out from the table. A curve without w = 0 or without judge figures gets marks of None (not
measured), never a pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["MIN_ADHERENCE", "MIN_GAIN", "MAX_JUDGE_RATIO", "BAR_RULE", "guidance_bar"]

MIN_ADHERENCE = 0.80
MIN_GAIN = 0.15
MAX_JUDGE_RATIO = 1.10

BAR_RULE = (
    f"one guidance scale with adherence >= {MIN_ADHERENCE:.0%}, >= {MIN_GAIN * 100:.0f} points above guidance 0, "
    f"and judge perplexity <= {MAX_JUDGE_RATIO:.2f}x guidance 0's"
)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _judge(row: dict) -> float | None:
    quality = row.get("quality")
    return _num(quality.get("judge_ppl")) if isinstance(quality, dict) else None


def guidance_bar(rows: Sequence[dict]) -> dict | None:
    """The verdict on one guidance curve, or None when it has no guided scale (w > 0) to judge.

    Returns {"met", "scale", "adherence", "gain", "judge_ratio", "marks": {"adherence", "gain",
    "fluency"}, "rule"}. ``scale`` is the scale that clears the bar with the highest adherence
    (ties: the smaller scale); when none clears it, the nearest miss: the scale that meets the most
    marks, then the lowest judge ratio, the highest adherence, the smaller scale. ``met`` is True
    when a scale clears the bar, False when every scale fails at least one mark, and None when some
    scale fails none but lacks a figure (no w = 0 row, no judge).
    """
    usable = [r for r in rows if isinstance(r, dict) and _num(r.get("scale")) is not None
              and _num(r.get("adherence")) is not None]
    base = next((r for r in usable if _num(r["scale"]) == 0.0), None)
    guided = [r for r in usable if _num(r["scale"]) > 0.0]
    if not guided:
        return None
    a0 = _num(base["adherence"]) if base else None
    ppl0 = _judge(base) if base else None

    def verdict(row: dict) -> dict:
        a, ppl = _num(row["adherence"]), _judge(row)
        gain = None if a0 is None else a - a0
        ratio = None if ppl is None or ppl0 is None or ppl0 <= 0 else ppl / ppl0
        marks = {
            "adherence": a >= MIN_ADHERENCE - 1e-12,
            "gain": None if gain is None else gain >= MIN_GAIN - 1e-12,
            "fluency": None if ratio is None else ratio <= MAX_JUDGE_RATIO + 1e-12,
        }
        return {"scale": _num(row["scale"]), "adherence": a, "gain": gain, "judge_ratio": ratio, "marks": marks}

    verdicts = [verdict(r) for r in guided]
    passing = [v for v in verdicts if all(m is True for m in v["marks"].values())]
    if passing:
        chosen = max(passing, key=lambda v: (v["adherence"], -v["scale"]))
        met: bool | None = True
    else:
        def nearness(v: dict) -> tuple:
            ratio = v["judge_ratio"] if v["judge_ratio"] is not None else math.inf
            return (sum(m is True for m in v["marks"].values()), -ratio, v["adherence"], -v["scale"])

        chosen = max(verdicts, key=nearness)
        # not met when every scale fails a mark; unknown when some scale fails none but lacks a figure
        met = False if all(any(m is False for m in v["marks"].values()) for v in verdicts) else None
    return {"met": met, **chosen, "rule": BAR_RULE}
