"""The stage-vs-control comparison that says what each staged component adds."""

from __future__ import annotations

import pytest

from sunfish.evaluation.components import COMPONENTS, component_deltas, headline


def _model(points: dict[int, float]) -> dict:
    return {"milestones": [{"step": s, "val_bpb": b, "val_loss": b} for s, b in points.items()]}


def test_delta_is_stage_minus_control_at_the_same_step_with_a_verdict():
    models = {
        "stage_0": _model({100: 2.00, 200: 1.90}),
        "stage_1": _model({30: 1.85, 60: 1.80}),
        "control_1": _model({30: 1.86, 60: 1.85}),
        "stage_2": _model({30: 1.79, 60: 1.78}),
        "control_2": _model({30: 1.79, 60: 1.7801}),
        "stage_3": _model({30: 1.80, 60: 1.82}),
        "control_3": _model({30: 1.78, 60: 1.76}),
    }
    rows = component_deltas(models)
    final = {r["component"]: r for r in headline(rows)}
    assert set(final) == set(COMPONENTS.values())
    temporal = final["TEMPORAL"]
    assert temporal["step"] == 60
    assert temporal["delta_bpb"] == pytest.approx(1.80 - 1.85)
    assert temporal["verdict"] == "helps"
    assert temporal["baseline_bpb"] == pytest.approx(1.90)  # stage_0's last milestone
    assert temporal["control_gain_bpb"] == pytest.approx(1.85 - 1.90)
    assert final["K-1"]["verdict"] == "no measurable effect"
    assert final["Graph routing"]["verdict"] == "hurts"
    assert "hurts" in final["Graph routing"]["text"] and "+0.0600" in final["Graph routing"]["text"]
    # every common step gets a row, the last one is the headline
    assert [r["step"] for r in rows if r["component"] == "TEMPORAL"] == [30, 60]


def test_missing_controls_are_reported_not_dropped():
    models = {"stage_0": _model({10: 2.0}), "stage_1": _model({5: 1.9}), "control_1": _model({4: 1.95})}
    rows = {r["component"]: r for r in component_deltas(models)}
    assert rows["TEMPORAL"]["verdict"] == "not measured"
    assert "no milestone step in common" in rows["TEMPORAL"]["text"]
    assert rows["K-1"]["verdict"] == "not measured"
    assert "stage_2 and control_2 not evaluated" in rows["K-1"]["text"]


def test_bad_values_are_ignored():
    models = {
        "stage_1": {"milestones": [{"step": 5, "val_bpb": float("nan")}, {"step": 6, "val_bpb": 1.0}, "junk"]},
        "control_1": {"milestones": [{"step": 5, "val_bpb": 1.0}, {"step": 6, "val_bpb": True}]},
    }
    rows = [r for r in component_deltas(models) if r["component"] == "TEMPORAL"]
    assert len(rows) == 1 and rows[0]["verdict"] == "not measured"
