"""What each staged component adds, measured against a control at equal extra training.

Stage N starts from stage N-1 and trains for its own budget with one new component. Comparing its
validation bits per byte with stage N-1's says little: most of the gain is the extra training, not
the component. So control_N starts from the same weights and trains for the same steps on the same
batches *without* the component; the component's effect is stage_N minus control_N.

A single pair of runs cannot say whether such a difference is the component or the luck of one
batch order: two runs of the same model from the same start, differing only in batch order, end a
few thousandths of a bit apart after a short run, which is the size of the effects measured here. A
fixed threshold would be a guess, and one that is wrong whenever the budget, the data or the model
changes. So every stage and control trains ``staged.seeds`` times (batch orders), and the noise
floor is measured from them: seed s of a stage and of its control see the same batches, so the
standard error of the per-seed differences is the noise of the comparison (paired; it is far tighter
than the spread of either model's seeds, which also holds how lucky each batch order was). Only a
difference beyond two standard errors is a verdict; with one seed on either side there is no
verdict at all, never a win. The same spread says whether the extra steps alone moved the model
(control_N's seeds against stage N-1's final figure): if they did not, a component had no room to
show an effect, and "no measurable effect" says nothing about it.

K-1 in ``log`` mode changes no update, so its control would be stage_2 again: it is not trained, and
its row says why instead of reporting an identity as a measurement.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["COMPONENTS", "DESCRIPTIONS", "MIN_EFFECT_BPB", "NEGLIGIBLE", "SE_MULTIPLE", "VERDICT_RULE",
           "NOT_MEASURED_ONE_SEED", "bpb_text",
           "component_deltas", "headline", "read_runs", "verdict"]

COMPONENTS = {1: "TEMPORAL", 2: "K-1", 3: "Graph-routed attention mask"}
DESCRIPTIONS = {
    1: "learned per-token embeddings",
    2: "hierarchical credit assignment on gradients",
    3: "a routed attention mask blended with dense attention: an extra attention pass, no compute saved",
}
SE_MULTIPLE = 2.0
# the smallest difference worth a verdict: paired seeds resolve millionths of a bit per byte, which
# are real (the component does change the model) but change no decision
MIN_EFFECT_BPB = 0.001
NEGLIGIBLE = f"negligible (beyond {SE_MULTIPLE:g} SE, under {MIN_EFFECT_BPB:g} bpb)"
NOT_MEASURED_ONE_SEED = "not measured (one seed)"
ATTRIBUTION_ONLY = "attribution only (k1.mode: log)"
VERDICT_RULE = (
    "delta = mean final validation bits per byte of stage_N's seeds minus control_N's (control_N: stage "
    "N-1 trained from the same start for the same steps without the component; seeds differ in batch "
    "order, and seed s of the stage and of its control see the same batches); SE = the standard error of "
    "the per-seed differences (paired), or sqrt(s_stage^2/n_stage + s_control^2/n_control) when the seeds "
    f"do not pair; helps when delta < -{SE_MULTIPLE:g} SE, hurts when delta > +{SE_MULTIPLE:g} SE, else no "
    f"measurable effect; a difference beyond {SE_MULTIPLE:g} SE but under {MIN_EFFECT_BPB:g} bpb is negligible; with "
    f"fewer than 2 seeds on either side: {NOT_MEASURED_ONE_SEED}"
)


def _number(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _bpb_by_step(entry: Any) -> dict[int, float]:
    out: dict[int, float] = {}
    milestones = entry.get("milestones") if isinstance(entry, Mapping) else None
    for m in milestones or []:
        if not isinstance(m, Mapping):
            continue
        step, bpb = m.get("step"), _number(m.get("val_bpb"))
        if isinstance(step, int) and not isinstance(step, bool) and bpb is not None:
            out[step] = bpb
    return out


def _seeds(run: Any) -> list[float]:
    values = run.get("val_bpb_seeds") if isinstance(run, Mapping) else None
    if not isinstance(values, list):
        return []
    return [v for v in (_number(x) for x in values) if v is not None]


def _spread(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation); the deviation is None below two values."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def verdict(delta: float, se: float | None) -> str:
    """helps / hurts beyond ``SE_MULTIPLE`` standard errors and at least MIN_EFFECT_BPB, else no
    measurable effect (or negligible: real but too small to matter); no SE: no verdict."""
    if se is None:
        return NOT_MEASURED_ONE_SEED
    if abs(delta) <= SE_MULTIPLE * se:
        return "no measurable effect"
    if abs(delta) < MIN_EFFECT_BPB:
        return NEGLIGIBLE
    return "helps" if delta < 0 else "hurts"


def bpb_text(x: float) -> str:
    """A bits-per-byte difference with the digits it needs: paired differences can be a few millionths."""
    return f"{x:+.4f}" if abs(x) >= 0.001 or x == 0 else f"{x:+.6f}"


def read_runs(metrics_dir: str | Path) -> dict[str, dict]:
    """The training records (reports/stages/<model>.json) of the staged models and controls."""
    out = {}
    for name in (*(f"stage_{n}" for n in range(4)), *(f"control_{n}" for n in COMPONENTS)):
        try:
            data = json.loads((Path(metrics_dir) / f"{name}.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            out[name] = data
    return out


def _extra_steps(control_seeds: list[float], baseline: float | None) -> dict:
    """How far the extra steps alone moved the model (control mean minus the starting figure), and
    whether that is beyond SE_MULTIPLE standard errors of the control's seeds."""
    mean, sd = _spread(control_seeds)
    if mean is None or baseline is None:
        return {"extra_steps_bpb": None, "extra_steps_se_bpb": None, "extra_steps_measurable": None}
    se = None if sd is None else sd / math.sqrt(len(control_seeds))
    return {"extra_steps_bpb": mean - baseline, "extra_steps_se_bpb": se,
            "extra_steps_measurable": None if se is None else abs(mean - baseline) > SE_MULTIPLE * se}


def _extra_text(row: dict, control: str, previous: str) -> str:
    extra, baseline = row["extra_steps_bpb"], row["baseline_bpb"]
    if extra is None:
        return ""
    measurable = {True: "beyond", False: "within", None: "no spread to judge against"}[row["extra_steps_measurable"]]
    where = f"{measurable} {SE_MULTIPLE:g} SE of its seeds" if row["extra_steps_se_bpb"] is not None else measurable
    return f"; the extra steps alone moved {control} {extra:+.4f} from {previous}'s {baseline:.4f} ({where})"


def _seed_row(n: int, base: dict, runs: Mapping[str, Mapping]) -> dict | None:
    """The headline row: the means of both models' seeds at their final step."""
    stage, control, previous = base["stage"], base["control"], base["previous"]
    stage_seeds, control_seeds = _seeds(runs.get(stage)), _seeds(runs.get(control))
    baseline = _number((runs.get(previous) or {}).get("val_bpb"))
    step = (runs.get(stage) or {}).get("steps")
    not_trained = (runs.get(control) or {}).get("trained") is False
    if not_trained:
        # the control would be the stage itself: its seeds stand for both in the extra-steps test
        ms, ss = _spread(stage_seeds)
        row = {**base, "basis": "not trained", "step": step, "stage_bpb": ms, "stage_bpb_std": ss,
               "stage_seeds": len(stage_seeds), "control_bpb": None, "control_seeds": 0, "delta_bpb": None,
               "se_bpb": None, "baseline_bpb": baseline, **_extra_steps(stage_seeds, baseline)}
        label = ATTRIBUTION_ONLY if n == 2 else "not trained twice"
        row["verdict"] = label
        why = (runs.get(control) or {}).get("reason") or "identical to its stage by construction"
        row["text"] = (f"{base['component']}: {label}: identical to its control by construction, not trained twice "
                       f"({why})" + _extra_text(row, stage, previous) + ".")
        return row
    if not stage_seeds or not control_seeds:
        return None
    ms, ss = _spread(stage_seeds)
    mc, sc = _spread(control_seeds)
    stage_ids = (runs.get(stage) or {}).get("seed_values")
    paired = (len(stage_seeds) == len(control_seeds) > 1 and isinstance(stage_ids, list)
              and stage_ids == (runs.get(control) or {}).get("seed_values"))
    if paired:  # seed s of both saw the same batches: the spread of the differences is the noise
        diffs = [a - b for a, b in zip(stage_seeds, control_seeds)]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    else:
        se = None if ss is None or sc is None else math.sqrt(ss**2 / len(stage_seeds) + sc**2 / len(control_seeds))
    delta = ms - mc
    row = {**base, "basis": "paired seeds" if paired else "seeds", "step": step, "stage_bpb": ms, "stage_bpb_std": ss, "stage_seeds": len(stage_seeds),
           "control_bpb": mc, "control_bpb_std": sc, "control_seeds": len(control_seeds), "delta_bpb": delta,
           "se_bpb": se, "verdict": verdict(delta, se), "baseline_bpb": baseline,
           "stage_gain_bpb": None if baseline is None else ms - baseline,
           "control_gain_bpb": None if baseline is None else mc - baseline, **_extra_steps(control_seeds, baseline)}
    noise = "" if se is None else f" ± {bpb_text(SE_MULTIPLE * se)[1:]} ({SE_MULTIPLE:g} SE)"
    row["text"] = (f"{base['component']} ({stage} vs {control} at step {step}, means of {len(stage_seeds)} and "
                   f"{len(control_seeds)} seeds): {ms:.4f} vs {mc:.4f} bpb, delta {bpb_text(delta)}{noise} ({row['verdict']})"
                   + _extra_text(row, control, previous) + ".")
    return row


def component_deltas(models: Mapping[str, Mapping] | None = None, runs: Mapping[str, Mapping] | None = None) -> list[dict]:
    """Rows per component: one per milestone step both stage_N and control_N reached (``models``:
    evaluated summaries, {"milestones": [{"step", "val_bpb"}]}, one seed each, so no verdict), and
    the headline row (``final``) from the seeds' final figures in ``runs`` (reports/stages/<model>.json,
    :func:`read_runs`: "val_bpb_seeds", "steps", "val_bpb"; "trained": false for a control not trained).

    Without seed figures the last milestone row is the headline, "not measured (one seed)". A
    component with nothing to compare gets one row saying so, so the report never silently drops it.
    """
    models, runs = models or {}, runs or {}
    rows: list[dict] = []
    for n, component in COMPONENTS.items():
        stage, control, previous = f"stage_{n}", f"control_{n}", f"stage_{n - 1}"
        base = {"component": component, "what": DESCRIPTIONS[n], "stage": stage, "control": control,
                "previous": previous}
        headline_row = _seed_row(n, base, runs)
        stage_bpb, control_bpb = _bpb_by_step(models.get(stage)), _bpb_by_step(models.get(control))
        prev = _bpb_by_step(models.get(previous))
        baseline = prev[max(prev)] if prev else None
        common = sorted(set(stage_bpb) & set(control_bpb))
        for step in common:
            s, c = stage_bpb[step], control_bpb[step]
            text = (f"{component} ({stage} vs {control} at step {step}, test half of the validation split, one seed): "
                    f"{s:.4f} vs {c:.4f} bpb, delta {s - c:+.4f}")
            if baseline is not None:
                text += f"; from {previous}'s {baseline:.4f}, the extra steps alone gave {c - baseline:+.4f}"
            rows.append({**base, "basis": "milestone", "step": step, "stage_bpb": s, "control_bpb": c,
                         "stage_seeds": 1, "control_seeds": 1, "delta_bpb": s - c, "se_bpb": None,
                         "baseline_bpb": baseline, "stage_gain_bpb": None if baseline is None else s - baseline,
                         "control_gain_bpb": None if baseline is None else c - baseline,
                         "verdict": NOT_MEASURED_ONE_SEED,
                         "final": headline_row is None and step == common[-1], "text": text + "."})
        if headline_row is not None:
            rows.append({**headline_row, "final": True})
        elif not common:
            missing = [m for m, have in ((stage, stage_bpb), (control, control_bpb)) if not have]
            why = f"{' and '.join(missing)} not evaluated" if missing else "no milestone step in common"
            rows.append({**base, "basis": None, "step": None, "stage_bpb": None, "control_bpb": None,
                         "delta_bpb": None, "se_bpb": None, "baseline_bpb": baseline, "verdict": "not measured",
                         "final": True, "text": f"{component}: not measured ({why})."})
    return rows


def headline(rows: list[dict]) -> list[dict]:
    """The row per component that a summary shows (the seeds' row when there are seeds)."""
    return [r for r in rows if r.get("final")]
