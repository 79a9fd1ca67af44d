"""The shared training loop: schedule, learning, milestones, non-finite losses."""

from __future__ import annotations

import json

import pytest
import torch

from sunfish.config import parse_params
from sunfish.models.staged import StagedLM, StagedLMConfig
from sunfish.training.loop import NonFiniteLoss, lr_at, train


def _cfg(**over):
    raw = {"train": {"max_steps": 30, "milestones": [10, 30], "warmup_steps": 5, "lr": 1e-2, "batch_size": 4,
                     "seq_len": 16, "eval_every": 10, "eval_batches": 2, "log_every": 5, "threads": 1, **over}}
    return parse_params(raw).training_for("stage_0")


def _data(vocab=32, seq=16):
    # a learnable stream: a fixed repeating pattern
    pattern = torch.arange(vocab).repeat(64)

    def sample(gen, bs=4):
        starts = torch.randint(0, len(pattern) - seq - 1, (bs,), generator=gen)
        x = torch.stack([pattern[s : s + seq] for s in starts])
        y = torch.stack([pattern[s + 1 : s + seq + 1] for s in starts])
        return {"input_ids": x, "targets": y}

    return sample


def _model():
    torch.manual_seed(0)
    return StagedLM(StagedLMConfig(vocab_size=32, n_layer=1, n_head=2, d_model=32, d_ff=64, max_seq_len=16))


def test_lr_schedule_warms_up_then_decays():
    cfg = _cfg()
    lrs = [lr_at(s, cfg) for s in range(cfg.max_steps)]
    assert lrs[0] < lrs[4]
    assert lrs[4] == pytest.approx(cfg.lr)
    assert lr_at(cfg.max_steps, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[4:], lrs[5:]))


def test_loop_learns_saves_milestones_and_writes_progress(tmp_path):
    cfg = _cfg()
    sample = _data()
    saved = []
    val = lambda: [sample(torch.Generator().manual_seed(i)) for i in range(2)]  # noqa: E731
    result = train(_model(), cfg, sample_batch=sample, val_batches=val, tokens_per_batch=64, bytes_per_token=1.0,
                   save_milestone=lambda m, s: saved.append(s), progress=False,
                   progress_file=tmp_path / "progress.json")
    assert saved == [10, 30]
    assert result.val[-1]["loss"] < 0.5 * result.val[0]["loss"]
    assert result.threads == 1  # recorded: the weights depend on how many threads summed them
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["state"] == "finished" and progress["step"] == 30 and progress["milestones_reached"] == [10, 30]


def test_nonfinite_losses_are_skipped_then_stop():
    class Exploding(torch.nn.Module):
        kind = "staged"

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def training_loss(self, batch):
            return self.w * float("nan"), {}

        def nll(self, batch, generator=None):
            return self.w.sum() * 0, 1

    with pytest.raises(NonFiniteLoss, match="lower train.lr"):
        train(Exploding(), _cfg(), sample_batch=_data(), val_batches=lambda: [], tokens_per_batch=1,
              bytes_per_token=1.0, save_milestone=lambda m, s: None, progress=False)


def test_adam_moments_carry_over_by_name_to_a_later_stage():
    from sunfish.training.loop import load_named_optimizer_state, make_optimizer

    cfg = _cfg(max_steps=3, milestones=[3], warmup_steps=1)
    first = _model()
    result = train(first, cfg, sample_batch=_data(), val_batches=lambda: [], tokens_per_batch=64,
                   bytes_per_token=1.0, save_milestone=lambda m, s: None, progress=False)
    assert set(result.optimizer_state) == {n for n, p in first.named_parameters() if p.requires_grad}
    later = StagedLM.warm_start(first, StagedLMConfig(vocab_size=32, n_layer=1, n_head=2, d_model=32, d_ff=64,
                                                      max_seq_len=16, stage=1))
    opt = make_optimizer(later, cfg, torch.device("cpu"))
    carried = load_named_optimizer_state(later, opt, result.optimizer_state)
    new = {n for n, _ in later.named_parameters()} - set(result.optimizer_state)
    assert new and carried == sum(1 for _ in later.parameters()) - len(new)
    name, p = next(iter(first.named_parameters()))
    assert torch.equal(opt.state[dict(later.named_parameters())[name]]["exp_avg"], result.optimizer_state[name]["exp_avg"])


def test_default_threads_use_only_the_cores_that_are_free(tmp_path, monkeypatch):
    import os

    from sunfish.training import loop

    loadavg = tmp_path / "loadavg"
    loadavg.write_text("1.50 1.20 0.90 3/412 9876\n")  # 3 runnable: this process and 2 others
    assert loop.busy_cores(samples=3, interval=0, path=str(loadavg)) == 2
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(loop, "busy_cores", lambda: 1)
        assert loop.set_threads(0) == max(1, (os.cpu_count() or 1) - 1)
        monkeypatch.setattr(loop, "busy_cores", lambda: 64)
        assert loop.set_threads(0) == 1 and torch.get_num_threads() == 1
        assert loop.set_threads(3) == 3  # an explicit number wins
    finally:
        torch.set_num_threads(before)


def test_one_training_step_shared_by_the_loop_and_the_speed_probe(monkeypatch):
    import torch

    import sunfish.training.loop as loop
    from sunfish.diagnose import speed

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    batch = {"x": torch.randn(8, 4)}
    loss_fn = lambda b: ((model(b["x"]) ** 2).mean() * 100, {"m": 1.0})  # noqa: E731
    loss, metrics = loop.backward_micro_batch(loss_fn, batch, amp=None, device=torch.device("cpu"), accumulate=4)
    full = torch.autograd.grad((model(batch["x"]) ** 2).mean() * 100, model.weight)[0]
    assert torch.allclose(model.weight.grad, full / 4) and metrics == {"m": 1.0}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = {}
    norm, extra = loop.apply_update(model, opt, 0.5, lambda: seen.setdefault(
        "norm", float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())) and {"hook": 1})
    assert norm > 0.5 and abs(seen["norm"] - 0.5) < 1e-5 and extra == {"hook": 1}  # the hook sees clipped grads
    assert all(p.grad is None for p in model.parameters())
    calls = []
    real = loop.apply_update
    monkeypatch.setattr(loop, "apply_update", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.training_loss = loss_fn
    cfg = type("C", (), {"grad_clip": 1.0, "lr": 0.1, "warmup_steps": 0, "max_steps": 10, "min_lr_ratio": 0.1})()
    speed._train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, cfg, 0, None, torch.device("cpu"))
    assert calls == [1]  # the probe steps through the loop's update
