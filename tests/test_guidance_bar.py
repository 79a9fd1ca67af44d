"""The guidance bar: one scale must meet adherence, gain over w = 0 and fluency at once."""

from __future__ import annotations

from sunfish.evaluation.guidance_bar import MAX_JUDGE_RATIO, guidance_bar


def _row(scale: float, adherence: float, judge: float | None) -> dict:
    return {"scale": scale, "adherence": adherence, "quality": {} if judge is None else {"judge_ppl": judge}}


def test_met_at_the_scale_that_holds_all_three_marks():
    rows = [_row(0, 0.05, 40.0), _row(1, 0.82, 43.0), _row(3, 0.95, 400.0)]
    bar = guidance_bar(rows)
    # w = 3 has more adherence but pays 10x in judge perplexity: w = 1 clears the bar
    assert bar["met"] is True and bar["scale"] == 1
    assert bar["marks"] == {"adherence": True, "gain": True, "fluency": True}
    assert abs(bar["gain"] - 0.77) < 1e-9 and abs(bar["judge_ratio"] - 43.0 / 40.0) < 1e-9


def test_each_mark_can_fail_on_its_own():
    too_few = guidance_bar([_row(0, 0.0, 40.0), _row(1, 0.79, 40.0)])
    assert too_few["met"] is False and too_few["marks"]["adherence"] is False
    no_gain = guidance_bar([_row(0, 0.70, 40.0), _row(1, 0.84, 40.0)])  # +14 points only
    assert no_gain["met"] is False and no_gain["marks"] == {"adherence": True, "gain": False, "fluency": True}
    word_salad = guidance_bar([_row(0, 0.0, 40.0), _row(1.5, 0.85, 40.0 * MAX_JUDGE_RATIO * 1.01)])
    assert word_salad["met"] is False and word_salad["marks"]["fluency"] is False


def test_the_nearest_miss_is_named():
    # the quality run's curve: w = 1.5 meets two marks with the lowest judge ratio of those that do
    rows = [_row(0, 0.02, 37.7), _row(1, 0.71, 53.6), _row(1.5, 0.85, 141.9), _row(3, 0.88, 8483.5),
            _row(5, 0.90, 29638.8)]
    bar = guidance_bar(rows)
    assert bar["met"] is False and bar["scale"] == 1.5
    assert bar["marks"] == {"adherence": True, "gain": True, "fluency": False}


def test_unmeasured_marks_never_pass():
    no_judge = guidance_bar([_row(0, 0.0, None), _row(1, 0.9, None)])
    assert no_judge["met"] is None and no_judge["marks"]["fluency"] is None
    no_baseline = guidance_bar([_row(1, 0.9, 40.0)])
    assert no_baseline["met"] is None and no_baseline["gain"] is None
    # a curve that fails adherence everywhere is not met, judge or not
    assert guidance_bar([_row(0, 0.0, None), _row(1, 0.3, None)])["met"] is False
    assert guidance_bar([_row(0, 0.1, 40.0)]) is None and guidance_bar([]) is None
