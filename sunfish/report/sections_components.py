"""Stage comparison and what each component adds.

A stage beating the previous one does not show that its new component helped: it also trained
for more steps. The component table sets each stage beside its control (the same extra steps
without the component) and only calls a verdict beyond the seed noise.
"""

from __future__ import annotations

from typing import Any

from sunfish.evaluation.components import bpb_text
from sunfish.report import html as H
from sunfish.report import markdown as M
from sunfish.report.access import as_dict, as_list, component_rows, finite
from sunfish.report.fmt import DASH, count, fixed
from sunfish.report.table import Cell, Table

COMPONENT_COLUMNS = ["Component", "Stage vs control", "Step", "Seeds", "Stage bpb", "Control bpb", "Δ bpb", "2 SE",
                     "Extra steps alone", "Verdict"]
COMPONENT_NOTE = ("Δ = stage − control validation bits per byte (negative: the component helps). Seed rows: means over "
                  "staged.seeds runs from the same start (batch orders); a verdict needs |Δ| > 2 SE of the per-seed "
                  "differences and >= 0.001 bpb. "
                  "Milestone rows: one seed, the test half of the validation split, no verdict. Extra steps alone: control − the previous stage.")
_COMPARISON_NOTE = ("Lower bits per byte is better; a negative Δ means the model improved on the previous "
                    "stage. A control continues the previous stage for the same steps without the new component.")
_VERDICT_CLASS = {"helps": "pass", "hurts": "fail"}


def _component_row(r: dict) -> list[Any]:
    delta, se, extra = (finite(r.get(k)) for k in ("delta_bpb", "se_bpb", "extra_steps_bpb"))
    moved = {True: " (beyond 2 SE)", False: " (within 2 SE)"}.get(r.get("extra_steps_measurable"), "")
    verdict = str(r.get("verdict") or DASH)
    return [
        Cell(r.get("component", "?"), strong=True),
        f"{r.get('stage', '?')} vs {r.get('control', '?')}",
        r.get("step") if r.get("step") is not None else DASH,
        f"{r.get('stage_seeds', DASH)} / {r.get('control_seeds', DASH)}",
        fixed(r.get("stage_bpb"), 4),
        fixed(r.get("control_bpb"), 4),
        DASH if delta is None else bpb_text(delta),
        DASH if se is None else bpb_text(2 * se)[1:],
        DASH if extra is None else f"{extra:+.4f}{moved}",
        Cell(verdict, css=_VERDICT_CLASS.get(verdict, "na")),
    ]


def components_table(rows: list[dict], **layout: Any) -> Table:
    """The component rows; the summary shows the final ones, the stage comparison all of them."""
    return Table(COMPONENT_COLUMNS, [_component_row(r) for r in rows], css="components", num=(2, 4, 5, 6, 7), **layout)


def _comparison_table(s: dict) -> Table:
    rows = []
    for r in (as_dict(r) for r in as_list(s.get("stage_comparison")) if isinstance(r, dict)):
        delta = finite(r.get("delta_bpb_vs_previous"))
        rows.append([Cell(r.get("model", "?"), note="(control)" if r.get("control") else ""), fixed(r.get("val_bpb")),
                     DASH if delta is None else f"{delta:+.3f}", count(r.get("tokens_per_s"))])
    return Table(["Model", "Val bits/byte", "Δ bpb vs previous stage", "Tokens/s"], rows, num=(1, 2, 3),
                 empty="No stage comparison available.")


def _all_components(s: dict) -> Table:
    return components_table(component_rows(s, False), title="What each component adds", anchor="components",
                            note=COMPONENT_NOTE,
                            empty="No component comparison: the control models were not evaluated.")


def to_html(s: dict) -> str:
    comparison = _comparison_table(s)
    out = [H.table(comparison)]
    if comparison.rows:
        out.append(H.muted(_COMPARISON_NOTE))
    out.append(H.table(_all_components(s)))
    return H.section("comparison", "Stage comparison", out)


def to_markdown(s: dict) -> list[str]:
    return ["## Stage comparison", ""] + M.table(_comparison_table(s)) + M.table(_all_components(s))
