"""The stage-vs-control comparison that says what each staged component adds."""

from __future__ import annotations

import math
import statistics

import pytest

from sunfish.evaluation.components import (
    COMPONENTS,
    NEGLIGIBLE,
    NOT_MEASURED_ONE_SEED,
    VERDICT_RULE,
    component_deltas,
    headline,
    verdict,
)


def _model(points: dict[int, float]) -> dict:
    return {"milestones": [{"step": s, "val_bpb": b, "val_loss": b} for s, b in points.items()]}


def _run(seeds: list[float], steps: int = 40, **extra) -> dict:
    return {"val_bpb": seeds[0] if seeds else None, "val_bpb_seeds": seeds, "steps": steps, "seeds": len(seeds), **extra}


CONTROL = [1.000, 1.010, 1.020]  # mean 1.01, sample sd 0.01
SE = math.sqrt(2 * 0.01**2 / 3)  # the stage's seeds below have the same spread


def _shifted(delta: float) -> list[float]:
    return [b + delta for b in CONTROL]


def test_milestone_rows_are_one_seed_so_no_verdict():
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
    assert temporal["baseline_bpb"] == pytest.approx(1.90)  # stage_0's last milestone
    assert temporal["control_gain_bpb"] == pytest.approx(1.85 - 1.90)
    # a 0.05 bpb difference from one seed each is still not a win: no spread to judge it against
    assert {r["verdict"] for r in rows} == {NOT_MEASURED_ONE_SEED}
    assert "+0.0600" in final[COMPONENTS[3]]["text"]
    # every common step gets a row; without seed figures the last one is the headline
    assert [r["step"] for r in rows if r["component"] == "TEMPORAL"] == [30, 60]


def test_noise_floor_is_measured_from_the_seeds():
    runs = {"stage_0": _run([1.10]), "control_1": _run(CONTROL), "stage_1": _run(_shifted(-3 * SE)),
            "control_3": _run(CONTROL), "stage_3": _run(_shifted(-1 * SE)),
            "control_2": _run(CONTROL), "stage_2": _run(_shifted(+3 * SE))}
    rows = component_deltas({}, runs)
    final = {r["component"]: r for r in headline(rows)}
    temporal = final["TEMPORAL"]
    assert temporal["basis"] == "seeds" and temporal["stage_seeds"] == temporal["control_seeds"] == 3
    assert temporal["se_bpb"] == pytest.approx(SE)
    assert temporal["delta_bpb"] == pytest.approx(-3 * SE)
    assert temporal["verdict"] == "helps"  # 3 SE
    assert final[COMPONENTS[3]]["verdict"] == "no measurable effect"  # 1 SE
    assert final["K-1"]["verdict"] == "hurts"  # +3 SE
    assert f"± {2 * SE:.4f} (2 SE)" in temporal["text"]
    # the extra steps alone: control mean 1.01 against stage_0's 1.10, SE of the control's seeds 0.01/sqrt(3)
    assert temporal["extra_steps_bpb"] == pytest.approx(1.01 - 1.10)
    assert temporal["extra_steps_se_bpb"] == pytest.approx(0.01 / math.sqrt(3))
    assert temporal["extra_steps_measurable"] is True
    assert "beyond 2 SE of its seeds" in temporal["text"]
    # control_2 within 2 SE of stage_1's final figure: the budget did not move the model measurably
    runs["stage_1"] = _run([1.0101, 1.02, 1.03])
    k1 = {r["component"]: r for r in headline(component_deltas({}, runs))}["K-1"]
    assert k1["extra_steps_measurable"] is False and "within 2 SE" in k1["text"]
    assert verdict(-0.5, None) == NOT_MEASURED_ONE_SEED and "2 SE" in VERDICT_RULE


def test_paired_seeds_measure_the_noise_of_the_difference():
    # seed s of stage and control saw the same batches: the batch-order luck cancels in the differences
    stage, control = [1.000, 1.100, 1.200], [1.010, 1.111, 1.209]
    runs = {"stage_1": _run(stage, seed_values=[1, 2, 3]), "control_1": _run(control, seed_values=[1, 2, 3])}
    row = {r["component"]: r for r in headline(component_deltas({}, runs))}["TEMPORAL"]
    diffs = [a - b for a, b in zip(stage, control)]
    assert row["basis"] == "paired seeds" and row["se_bpb"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(3))
    assert row["verdict"] == "helps"  # -0.010 against an SE of 0.0006
    # the same figures from seeds that do not pair (other seed lists): the spread of each model is the noise
    runs["control_1"] = _run(control, seed_values=[4, 5, 6])
    row = {r["component"]: r for r in headline(component_deltas({}, runs))}["TEMPORAL"]
    assert row["basis"] == "seeds" and row["verdict"] == "no measurable effect"
    # a difference of millionths that every seed agrees on is real but changes nothing: negligible, not "hurts"
    runs = {"stage_3": _run([1.0, 1.1, 1.2], seed_values=[1, 2, 3]),
            "control_3": _run([1.0 - 1.1e-5, 1.1 - 1.0e-5, 1.2 - 0.9e-5], seed_values=[1, 2, 3])}
    row = {r["component"]: r for r in headline(component_deltas({}, runs))}[COMPONENTS[3]]
    assert row["verdict"] == NEGLIGIBLE and "+0.000010" in row["text"]


def test_one_seed_is_not_a_verdict():
    runs = {"stage_1": _run([1.50]), "control_1": _run([1.90, 1.91, 1.92]), "stage_0": _run([2.0])}
    models = {"stage_1": _model({20: 1.5, 40: 1.5}), "control_1": _model({20: 1.9, 40: 1.9})}
    rows = [r for r in component_deltas(models, runs) if r["component"] == "TEMPORAL"]
    assert [r["final"] for r in rows] == [False, False, True]  # the seed row is the headline
    assert all(r["verdict"] == NOT_MEASURED_ONE_SEED for r in rows)
    assert rows[-1]["delta_bpb"] == pytest.approx(1.5 - 1.91) and rows[-1]["se_bpb"] is None


def test_a_control_not_trained_is_attribution_only():
    runs = {"stage_1": _run([1.30]), "stage_2": _run([1.20, 1.21, 1.22]),
            "control_2": {"model": "control_2", "trained": False, "steps": 0, "seeds": 0,
                          "reason": "identical to stage_2 by construction: staged.k1.mode=log changes no update"}}
    k1 = [r for r in component_deltas({"stage_2": _model({40: 1.2})}, runs) if r["component"] == "K-1"]
    assert len(k1) == 1 and k1[0]["final"]
    assert k1[0]["verdict"] == "attribution only (k1.mode: log)"
    assert "identical to its control by construction, not trained twice" in k1[0]["text"]
    assert k1[0]["delta_bpb"] is None and k1[0]["stage_bpb"] == pytest.approx(1.21)
    assert k1[0]["extra_steps_bpb"] == pytest.approx(1.21 - 1.30)


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
    runs = {"stage_1": {"val_bpb_seeds": "junk"}, "control_1": {"val_bpb_seeds": [float("nan"), None]}}
    rows = [r for r in component_deltas(models, runs) if r["component"] == "TEMPORAL"]
    assert len(rows) == 1 and rows[0]["verdict"] == "not measured"


def test_the_report_shows_the_seed_row():
    from sunfish.report.render import render_html, render_markdown

    runs = {"stage_0": _run([1.10]), "control_1": _run(CONTROL), "stage_1": _run(_shifted(-3 * SE)),
            "stage_2": _run(CONTROL), "control_2": {"trained": False, "reason": "identical"}}
    summary = {"components": component_deltas({}, runs)}
    for doc in (render_html(summary), render_markdown(summary)):
        assert "helps" in doc and f"{2 * SE:.4f}" in doc and "3 / 3" in doc and "(beyond 2 SE)" in doc
        assert "attribution only (k1.mode: log)" in doc
