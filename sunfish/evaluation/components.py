"""What each staged component adds, measured against a control at equal extra training.

Stage N starts from stage N-1 and trains for its own budget with one new component. Comparing its
validation bits per byte with stage N-1's says little: most of the gain is the extra training, not
the component. So control_N starts from the same weights and trains for the same steps on the same
batches *without* the component; the component's effect is stage_N minus control_N at the same step
(negative = the component helps). Differences smaller than the noise floor below are reported as
"no measurable effect", never as a win.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["COMPONENTS", "NOISE_FLOOR_REL", "NOISE_FLOOR_ABS", "VERDICT_RULE", "component_deltas", "headline"]

COMPONENTS = {1: "TEMPORAL", 2: "K-1", 3: "Graph routing"}
# Two runs that differ only in the order of floating-point reductions end up a few thousandths of a
# bit apart after a short run; anything inside this band is not evidence either way.
NOISE_FLOOR_REL = 0.0025  # share of the control's bits per byte
NOISE_FLOOR_ABS = 0.002  # bits per byte
VERDICT_RULE = (
    "delta = stage_N - control_N validation bits per byte at the same step (control_N: stage N-1 "
    "trained for the same extra steps without the component); helps when delta < -floor, hurts when "
    f"delta > +floor, floor = max({NOISE_FLOOR_ABS} bpb, {NOISE_FLOOR_REL:.2%} of the control)"
)


def _bpb_by_step(entry: Any) -> dict[int, float]:
    out: dict[int, float] = {}
    milestones = entry.get("milestones") if isinstance(entry, Mapping) else None
    for m in milestones or []:
        if not isinstance(m, Mapping):
            continue
        step, bpb = m.get("step"), m.get("val_bpb")
        if isinstance(step, int) and isinstance(bpb, (int, float)) and not isinstance(bpb, bool) and math.isfinite(bpb):
            out[step] = float(bpb)
    return out


def _verdict(delta: float, control_bpb: float) -> str:
    floor = max(NOISE_FLOOR_ABS, NOISE_FLOOR_REL * abs(control_bpb))
    if delta < -floor:
        return "helps"
    if delta > floor:
        return "hurts"
    return "no measurable effect"


def component_deltas(models: Mapping[str, Mapping]) -> list[dict]:
    """One row per component and milestone step that both stage_N and control_N reached.

    ``models`` maps a model name to its evaluated summary ({"milestones": [{"step", "val_bpb"}]}).
    A component whose control (or stage) was not evaluated gets one row saying so, with
    verdict "not measured", so the report never silently drops it.
    """
    rows: list[dict] = []
    for n, component in COMPONENTS.items():
        stage, control, previous = f"stage_{n}", f"control_{n}", f"stage_{n - 1}"
        stage_bpb, control_bpb = _bpb_by_step(models.get(stage)), _bpb_by_step(models.get(control))
        prev = _bpb_by_step(models.get(previous))
        baseline = prev[max(prev)] if prev else None
        common = sorted(set(stage_bpb) & set(control_bpb))
        base = {"component": component, "stage": stage, "control": control, "baseline_bpb": baseline}
        if not common:
            missing = [m for m, have in ((stage, stage_bpb), (control, control_bpb)) if not have]
            why = f"{' and '.join(missing)} not evaluated" if missing else "no milestone step in common"
            rows.append({**base, "step": None, "stage_bpb": None, "control_bpb": None, "delta_bpb": None,
                         "verdict": "not measured", "final": True, "text": f"{component}: not measured ({why})."})
            continue
        for step in common:
            s, c = stage_bpb[step], control_bpb[step]
            delta = s - c
            verdict = _verdict(delta, c)
            text = (f"{component} ({stage} vs {control} at step {step}): {s:.4f} vs {c:.4f} bpb, "
                    f"delta {delta:+.4f} ({verdict})")
            if baseline is not None:
                text += f"; from {previous}'s {baseline:.4f}, the extra steps alone gave {c - baseline:+.4f}"
            rows.append({**base, "step": step, "stage_bpb": s, "control_bpb": c, "delta_bpb": delta,
                         "stage_gain_bpb": None if baseline is None else s - baseline,
                         "control_gain_bpb": None if baseline is None else c - baseline,
                         "verdict": verdict, "final": step == common[-1], "text": text + "."})
    return rows


def headline(rows: list[dict]) -> list[dict]:
    """The row per component at the last common step (what a summary shows)."""
    return [r for r in rows if r.get("final")]
