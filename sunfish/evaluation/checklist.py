"""The original SunFish success checklist, judged by measurement.

Input is a model's milestone list as the report summary holds it (see docs/CONTRACTS.md and
sunfish/report): each milestone is a dict with "step", "val_loss", "quality" ({"real_word_share",
"distinct_1", "distinct_2", "repetition_rate", "bigram_share"}) and, for the diffusion model,
"guidance" ([{"scale", "adherence", "n", "ci", ...}]). Any of these may be missing.

Each item is {"name", "passed", "value", "criterion", "step"}; passed is True/False, or None when
the item cannot be measured (no data, or not applicable to the model kind); "step" is the
milestone the value was measured at (the criterion text is the same for every model). Items are judged at
the best checkpoint (best_checkpoint) unless ``step`` is given, except "word variety increasing",
which compares the first and the last milestone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "LOSS_THRESHOLD",
    "REAL_WORD_THRESHOLD",
    "BIGRAM_THRESHOLD",
    "JUDGE_PPL_THRESHOLD",
    "BEST_TOLERANCE",
    "BEST_RULE",
    "best_checkpoint",
    "best_entry",
    "checklist",
    "checklist_for",
]

LOSS_THRESHOLD = 2.0  # validation nats/token
REAL_WORD_THRESHOLD = 0.9  # share of sample words seen in the training corpus
BIGRAM_THRESHOLD = 0.6  # share of sample word pairs seen in the training corpus
JUDGE_PPL_THRESHOLD = 50.0  # perplexity of the samples under a judge language model
BEST_TOLERANCE = 0.02  # relative val-loss window for best_checkpoint

BEST_RULE = (
    "among milestones whose validation loss is within 2% of the lowest, the one with the highest "
    "real_word_share x distinct_2 of its samples (ties: lower loss, then later step); "
    "without sample measures, the lowest validation loss"
)


def _num(x: Any) -> float | None:
    """A finite float, or None for anything else (missing, None, NaN, text)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _milestones(milestones: Any) -> list[dict]:
    if not isinstance(milestones, (list, tuple)):
        return []
    out = [m for m in milestones if isinstance(m, dict) and isinstance(m.get("step"), int)]
    return sorted(out, key=lambda m: m["step"])


def _quality(m: dict, key: str) -> float | None:
    q = m.get("quality")
    return _num(q.get(key)) if isinstance(q, dict) else None


def best_checkpoint(milestones: Sequence[dict], tolerance: float = BEST_TOLERANCE) -> int | None:
    """The milestone step to keep, judged on loss *and* samples (the rule is BEST_RULE).

    1. Let L be the lowest validation loss; candidates are milestones with val_loss <= L + tolerance*|L|.
    2. Among candidates with both real_word_share and distinct_2, pick the highest product
       real_word_share * distinct_2; ties go to the lower loss, then the later step.
    3. Without those measures, the candidate with the lowest loss (later step on ties).
    Milestones without a finite val_loss are only considered when none has one (then by the
    sample score alone, else the last milestone). Returns None for an empty list.
    """
    ms = _milestones(milestones)
    if not ms:
        return None
    with_loss = [m for m in ms if _num(m.get("val_loss")) is not None]
    if with_loss:
        low = min(_num(m["val_loss"]) for m in with_loss)
        limit = low + tolerance * abs(low)
        candidates = [m for m in with_loss if _num(m["val_loss"]) <= limit]
    else:
        candidates = ms

    def loss(m: dict) -> float:
        v = _num(m.get("val_loss"))
        return v if v is not None else math.inf

    scored = []
    for m in candidates:
        rw, d2 = _quality(m, "real_word_share"), _quality(m, "distinct_2")
        if rw is not None and d2 is not None:
            scored.append((rw * d2, -loss(m), m["step"]))
    if scored:
        return max(scored)[2]
    if with_loss:
        return max(candidates, key=lambda m: (-loss(m), m["step"]))["step"]
    return ms[-1]["step"]


def _item(name: str, passed: bool | None, value: Any, criterion: str, step: int | None) -> dict:
    return {"name": name, "passed": passed, "value": value, "criterion": criterion, "step": step}


def _guidance_rows(m: dict | None) -> list[dict]:
    rows = m.get("guidance") if isinstance(m, dict) else None
    if not isinstance(rows, list):
        return []
    return [r for r in rows if isinstance(r, dict) and _num(r.get("scale")) is not None and _num(r.get("adherence")) is not None]


def checklist(
    milestones: Sequence[dict],
    *,
    kind: str = "staged",
    step: int | None = None,
    judge_ppl: float | None = None,
    bigram_share: float | None = None,
    loss_threshold: float = LOSS_THRESHOLD,
    real_word_threshold: float = REAL_WORD_THRESHOLD,
    bigram_threshold: float = BIGRAM_THRESHOLD,
    judge_ppl_threshold: float = JUDGE_PPL_THRESHOLD,
) -> list[dict]:
    """Judge the six checklist items for one model.

    ``kind`` is "staged" or "diffusion" ("prompts have an effect" only applies to diffusion).
    ``step`` picks the milestone to judge (default: best_checkpoint). ``judge_ppl`` is the
    perplexity of that milestone's samples under a judge model, if one was run; ``bigram_share``
    overrides the milestone's quality["bigram_share"].
    """
    ms = _milestones(milestones)
    if step is None:
        step = best_checkpoint(ms)
    at = next((m for m in ms if m["step"] == step), None)
    items: list[dict] = []

    # 1. loss below 2.0
    raw_loss = at.get("val_loss") if at else None
    loss = _num(raw_loss)
    loss_crit = f"validation loss < {loss_threshold:g} nats/token"
    if loss is None and isinstance(raw_loss, float):  # NaN/inf: a diverged run fails
        items.append(_item("loss below 2.0", False, f"{raw_loss} (not finite)", loss_crit, step))
    else:
        items.append(_item("loss below 2.0", None if loss is None else loss < loss_threshold, loss, loss_crit, step))

    # 2. real words
    rw = _quality(at, "real_word_share") if at else None
    items.append(
        _item(
            "real words",
            None if rw is None else rw >= real_word_threshold,
            rw,
            f"share of sample words found in the training corpus >= {real_word_threshold:g}",
            step,
        )
    )

    # 3. word variety increasing (first vs last milestone)
    with_d2 = [m for m in ms if _quality(m, "distinct_2") is not None]
    if len(with_d2) >= 2:
        first, last = with_d2[0], with_d2[-1]
        d_first, d_last = _quality(first, "distinct_2"), _quality(last, "distinct_2")
        items.append(
            _item(
                "word variety increasing",
                d_last > d_first,
                {f"step {first['step']}": d_first, f"step {last['step']}": d_last},
                "distinct-2 of the samples at the last milestone > at the first",
                last["step"],
            )
        )
    else:
        items.append(
            _item(
                "word variety increasing",
                None,
                None,
                "distinct-2 at the last milestone > at the first (needs two milestones with samples)",
                None,
            )
        )

    # 4. phrases forming
    bs = _num(bigram_share) if bigram_share is not None else (_quality(at, "bigram_share") if at else None)
    items.append(
        _item(
            "phrases forming",
            None if bs is None else bs >= bigram_threshold,
            bs,
            f"share of sample word pairs (bigrams) found in the training corpus >= {bigram_threshold:g}",
            step,
        )
    )

    # 5. prompts have an effect (diffusion only)
    if kind != "diffusion":
        items.append(
            _item(
                "prompts have an effect",
                None,
                None,
                "diffusion model only: adherence at the best guidance scale > at guidance 0",
                None,
            )
        )
    else:
        g_at = at
        rows = _guidance_rows(at)
        if not rows:  # the judged milestone was not swept: use the latest one that was
            swept = [m for m in ms if _guidance_rows(m)]
            g_at = swept[-1] if swept else None
            rows = _guidance_rows(g_at)
        zero = [r for r in rows if _num(r["scale"]) == 0.0]
        guided = [r for r in rows if _num(r["scale"]) > 0.0]
        g_step = g_at["step"] if g_at else None
        crit = "prompt adherence at the best guidance scale > adherence at guidance 0"
        if zero and guided:
            a0 = _num(zero[0]["adherence"])
            best = max(guided, key=lambda r: (_num(r["adherence"]), -_num(r["scale"])))
            ab, wb = _num(best["adherence"]), _num(best["scale"])
            items.append(
                _item(
                    "prompts have an effect",
                    ab > a0,
                    {"guidance 0": a0, f"guidance {wb:g}": ab},
                    crit,
                    g_step,
                )
            )
        else:
            items.append(_item("prompts have an effect", None, None, f"{crit} (needs scale 0 and a scale > 0)", g_step))

    # 6. coherent sentences
    jp = _num(judge_ppl) if judge_ppl is not None else None
    items.append(
        _item(
            "coherent sentences",
            None if jp is None else jp < judge_ppl_threshold,
            jp,
            f"perplexity of the samples under a judge language model < {judge_ppl_threshold:g} "
            "(n/a when no judge model was run)",
            step,
        )
    )
    return items


def best_entry(milestones: Sequence[dict], tolerance: float = BEST_TOLERANCE) -> dict:
    """The summary's "best" record: {"step": best_checkpoint(...), "rule": BEST_RULE}."""
    return {"step": best_checkpoint(milestones, tolerance), "rule": BEST_RULE}


def checklist_for(milestones: Sequence[dict], kind: str | None = None, **kwargs: Any) -> list[dict]:
    """checklist() with the model kind inferred when not given: "diffusion" when any milestone
    carries a guidance sweep, else "staged". Keyword arguments go to checklist()."""
    if kind is None:
        kind = "diffusion" if any(isinstance(m, dict) and m.get("guidance") for m in milestones or []) else "staged"
    return checklist(milestones, kind=kind, **kwargs)
