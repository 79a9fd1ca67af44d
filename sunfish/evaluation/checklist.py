"""The original SunFish success checklist, judged by measurement.

Input is a model's milestone list as the report summary holds it (see docs/CONTRACTS.md and
sunfish/report): each milestone is a dict with "step", "val_loss", "quality" ({"real_word_share",
"distinct_1", "distinct_2", "repetition_rate", "bigram_share", and the judge's "fluent_share",
"varied_share", "judge_ppl"}) and, for the diffusion model, "guidance" (dev-prompt rows
[{"scale", "adherence", "fluent_on_topic", "n", "ci", ...}]) and at the best milestone
"guidance_test" (the reported test-prompt curve). Any of these may be missing.

Each item is {"name", "passed", "value", "criterion", "step"}; passed is True/False, or None when
the item cannot be measured (no data, or not applicable to the model kind); "step" is the
milestone the value was measured at. Items are judged at the best checkpoint (best_checkpoint)
unless ``step`` is given. Every item can fail on text a trick produces: the judged items are
relative to real held-out text under a judge independent of the models (sunfish.evaluation.judge),
and "prompts have an effect" counts only samples that are fluent AND name the prompt's target, so
a copy head that pastes the prompt's word into word salad does not pass it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "LOSS_THRESHOLD",
    "REAL_WORD_THRESHOLD",
    "BIGRAM_THRESHOLD",
    "COHERENT_RATIO",
    "PROMPT_EFFECT_GAIN",
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
COHERENT_RATIO = 0.5  # a judged share must reach this fraction of real held-out text's share
PROMPT_EFFECT_GAIN = 0.15  # fluent-and-on-topic share above guidance 0's
BEST_TOLERANCE = 0.02  # relative val-loss window for best_checkpoint

BEST_RULE = (
    "chosen on dev data, reported on test data: among milestones whose validation loss on the dev "
    "half of the split is within 2% of the lowest, the one with the highest real_word_share x "
    "distinct_2 of its selection samples (drawn apart from the reported samples; the diffusion "
    "model's on the dev prompts) (ties: lower loss, then later step); without sample measures, the "
    "lowest dev-half loss"
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


def _selection(m: dict) -> dict:
    """What chooses a milestone: its "selection" record (dev-half loss, selection samples' quality),
    falling back to the reported figures for milestones that carry none."""
    sel = m.get("selection") if isinstance(m.get("selection"), dict) else {}
    loss = _num(sel.get("loss")) if "loss" in sel else _num(m.get("val_loss"))
    quality = sel.get("quality") if isinstance(sel.get("quality"), dict) else m.get("quality")
    return {"val_loss": loss, "quality": quality}


def best_checkpoint(milestones: Sequence[dict], tolerance: float = BEST_TOLERANCE) -> int | None:
    """The milestone step to keep, judged on loss *and* samples (the rule is BEST_RULE), on the
    milestones' "selection" figures when they have them (dev data: never the reported figures).

    1. Let L be the lowest validation loss; candidates are milestones with val_loss <= L + tolerance*|L|.
    2. Among candidates with both real_word_share and distinct_2, pick the highest product
       real_word_share * distinct_2; ties go to the lower loss, then the later step.
    3. Without those measures, the candidate with the lowest loss (later step on ties).
    Milestones without a finite val_loss are only considered when none has one (then by the
    sample score alone, else the last milestone). Returns None for an empty list.
    """
    ms = [{**_selection(m), "step": m["step"]} for m in _milestones(milestones)]
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


def _reported_rows(m: dict | None) -> list[dict]:
    """The guidance rows a milestone reports: its test-prompt curve when it has one, else its rows."""
    if isinstance(m, dict) and isinstance(m.get("guidance_test"), list) and m["guidance_test"]:
        return _guidance_rows({"guidance": m["guidance_test"]})
    return _guidance_rows(m)


def _judged(at: dict | None, key: str, real: float | None, name: str, what: str, step: int | None) -> dict:
    """An item that passes when the share ``key`` of the samples is at least COHERENT_RATIO x real text's."""
    share = _quality(at, key) if at else None
    crit = (f"share of samples {what} >= {COHERENT_RATIO:g} x real held-out text's"
            + ("" if real is None else f" ({real:.0%})") + " under the independent n-gram judge")
    if share is None or real is None:
        return _item(name, None, share, crit + " (n/a without judged samples)", step)
    return _item(name, share >= COHERENT_RATIO * real - 1e-12, share, crit, step)


def checklist(
    milestones: Sequence[dict],
    *,
    kind: str = "staged",
    step: int | None = None,
    real_fluent_share: float | None = None,
    real_varied_share: float = 0.9,
    guidance_scale: float | None = None,
    bigram_share: float | None = None,
    loss_threshold: float = LOSS_THRESHOLD,
    real_word_threshold: float = REAL_WORD_THRESHOLD,
    bigram_threshold: float = BIGRAM_THRESHOLD,
) -> list[dict]:
    """Judge the six checklist items for one model.

    ``kind`` is "staged" or "diffusion" ("prompts have an effect" only applies to diffusion).
    ``step`` picks the milestone to judge (default: best_checkpoint). The judge's figures come from
    the milestone's quality ("fluent_share", "varied_share") and guidance rows ("fluent_on_topic");
    ``real_fluent_share`` is the share of real held-out texts the same judge calls fluent (its
    calibration), ``real_varied_share`` theirs for variety (0.9 by construction: the threshold is real
    text's 10th percentile). ``guidance_scale`` is the scale whose row "prompts have an effect" reads
    (default: the guided row with the most fluent-and-on-topic samples). ``bigram_share`` overrides
    the milestone's quality["bigram_share"].
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

    # 3. word variety: as varied as real text (a loop fails; distinct-2 of a few samples rising from
    # the first milestone could not fail in practice)
    items.append(_judged(at, "varied_share", real_varied_share, "word variety",
                         "whose distinct-bigram ratio reaches real text's 10th percentile", step))

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

    # 5. prompts have an effect (diffusion only): fluent AND on topic, so copying the prompt's word
    # into word salad does not count
    crit = (f"share of samples fluent and naming the prompt's target at the guidance scale >= "
            f"{PROMPT_EFFECT_GAIN * 100:g} points above guidance 0 (test prompts)")
    if kind != "diffusion":
        items.append(_item("prompts have an effect", None, None, "diffusion model only: " + crit, None))
    else:
        g_at = at
        rows = _reported_rows(at)
        if not rows:  # the judged milestone was not swept: use the latest one that was
            swept = [m for m in ms if _guidance_rows(m)]
            g_at = swept[-1] if swept else None
            rows = _reported_rows(g_at)
        g_step = g_at["step"] if g_at else None
        rows = [r for r in rows if _num(r.get("fluent_on_topic")) is not None]
        zero = [r for r in rows if _num(r["scale"]) == 0.0]
        guided = [r for r in rows if _num(r["scale"]) > 0.0]
        if guidance_scale is not None:
            guided = [r for r in guided if abs(_num(r["scale"]) - guidance_scale) < 1e-9] or guided
        if zero and guided:
            a0 = _num(zero[0]["fluent_on_topic"])
            best = max(guided, key=lambda r: (_num(r["fluent_on_topic"]), -_num(r["scale"])))
            ab, wb = _num(best["fluent_on_topic"]), _num(best["scale"])
            items.append(_item("prompts have an effect", ab - a0 >= PROMPT_EFFECT_GAIN - 1e-12,
                               {"guidance 0": a0, f"guidance {wb:g}": ab}, crit, g_step))
        else:
            items.append(_item("prompts have an effect", None, None,
                               f"{crit} (needs judged rows at scale 0 and a scale > 0)", g_step))

    # 6. coherent sentences
    items.append(_judged(at, "fluent_share", real_fluent_share, "coherent sentences",
                         "judged fluent (perplexity <= real text's 90th percentile, as varied as real text)", step))
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
