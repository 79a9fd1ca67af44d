"""The training probes: memorisation of one batch, and the configured learning-rate schedule (a
learning rate of 0, frozen weights, an lr too low or diverging).
"""

from __future__ import annotations

from sunfish.config import parse_params
from sunfish.diagnose.gradients import check_gradient_flow
from sunfish.diagnose.lr_schedule import check_lr_schedule
from sunfish.diagnose.memorise import check_memorisation
from tests.diagnose.helpers import ar_batch, by_name, tiny_lm


def test_healthy_model_memorises_one_batch():
    row = check_memorisation(tiny_lm(), ar_batch(2, 16), steps=150, target=0.1, lr=3e-3)
    assert row["status"] == "ok", row["message"]
    assert 1 < row["value"] < 150


def test_model_that_cannot_learn_fails_memorisation():
    lr0 = check_memorisation(tiny_lm(), ar_batch(2, 16), steps=10, target=0.1, lr=0.0)
    assert lr0["status"] == "fail" and "did not move" in lr0["message"]
    frozen = tiny_lm()
    frozen.requires_grad_(False)
    row = check_memorisation(frozen, ar_batch(2, 16), steps=10, target=0.1)
    assert row["status"] == "fail" and "frozen" in row["message"]
    assert by_name(check_gradient_flow(frozen, ar_batch(), name="g"))["g_flow"]["status"] == "fail"


def test_lr_schedule_too_low_warns():
    tcfg = parse_params({"train": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 50, "milestones": [50],
                                   "seq_len": 16}}).training_for("stage_0")
    batches = [ar_batch(4, 16, seed=0)] * 10  # one batch repeated: a learnable signal
    ok = check_lr_schedule(tiny_lm(), tcfg, batches, ar_batch(4, 16, seed=0))
    assert ok["status"] == "ok", ok["message"]
    low = check_lr_schedule(tiny_lm(), tcfg.model_copy(update={"lr": 1e-9}), batches, ar_batch(4, 16, seed=0))
    assert low["status"] == "warn" and "train.lr" in low["message"]


def test_lr_schedule_divergence_fails():
    tcfg = parse_params({"train": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 50, "milestones": [50],
                                   "seq_len": 16, "grad_clip": 0.0}}).training_for("stage_0")
    batches = [ar_batch(4, 16, seed=i) for i in range(10)]
    row = check_lr_schedule(tiny_lm(), tcfg.model_copy(update={"lr": 30.0}), batches, ar_batch(4, 16, seed=99))
    assert row["status"] == "fail" and "lower train.lr" in row["message"]
