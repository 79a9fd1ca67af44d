"""Learning-rate sanity: does the configured schedule make the loss fall at all?

A learning rate too low (or a warmup too long) spends the start of a run learning nothing; one too
high diverges. With the training loop's own optimiser and warmup + cosine schedule (``make_optimizer``,
``lr_at``), on ``LR_SANITY_STEPS`` real batches of ``LR_SANITY_SHAPE`` (rows x tokens), a fixed
held-out batch's loss must fall by ``LR_SANITY_MIN_DROP`` (relative) or the check warns; a rise above
``LR_SANITY_DIVERGE`` fails.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from sunfish.config import ResolvedTraining
from sunfish.diagnose.core import FAIL, OK, WARN, device_of, make_check, seeded, to_device

LR_SANITY_STEPS = 20
LR_SANITY_SHAPE = (4, 64)
LR_SANITY_MIN_DROP = 0.01  # relative fall of a fixed held-out batch's loss
LR_SANITY_DIVERGE = 0.10


def _eval_loss(model: nn.Module, batch: dict, seed: int) -> float:
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), seeded(seed):
            return float(model.training_loss(batch)[0])
    finally:
        model.train(was)


def check_lr_schedule(
    model: nn.Module,
    tcfg: ResolvedTraining,
    batches: list[dict],
    eval_batch: dict,
    *,
    seed: int = 0,
    lr_key: str = "train.lr",
    name: str = "lr_schedule",
) -> dict:
    """With the configured optimiser and lr schedule (warmup + cosine, ``lr_at``) on real batches, the
    loss of a fixed held-out batch falls over the first ``len(batches)`` steps (on a copy)."""
    from sunfish.training.loop import lr_at, make_optimizer

    m = copy.deepcopy(model)
    m.train()
    device = device_of(m)
    eval_batch = to_device(eval_batch, device)
    opt = make_optimizer(m, tcfg, device)
    before = _eval_loss(m, eval_batch, seed)
    lrs, losses = [], []
    for step, batch in enumerate(batches):
        lr = lr_at(step, tcfg)
        lrs.append(lr)
        for group in opt.param_groups:
            group["lr"] = lr
        with seeded(seed + 1 + step):
            loss, _ = m.training_loss(to_device(batch, device))
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            return make_check(name, FAIL, None, f"falls by >= {LR_SANITY_MIN_DROP:.0%}",
                              f"the loss became {value} at step {step + 1} of the configured schedule (lr {lr:.2g}): "
                              f"lower {lr_key} (now {tcfg.lr:g}) and keep train.grad_clip > 0",
                              {"losses": losses, "lrs": lrs})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(m.parameters(), tcfg.grad_clip)
        opt.step()
    after = _eval_loss(m, eval_batch, seed)
    change = (after - before) / max(abs(before), 1e-12)
    n = len(batches)
    details = {"loss_before": before, "loss_after": after, "lr_first": lrs[0] if lrs else None,
               "lr_last": lrs[-1] if lrs else None, "train_losses": [round(x, 4) for x in losses]}
    head = (f"held-out loss {before:.3f} -> {after:.3f} ({change:+.1%}) over the first {n} steps "
            f"(lr {lrs[0]:.2g} -> {lrs[-1]:.2g})") if lrs else "no steps"
    threshold = f"falls by >= {LR_SANITY_MIN_DROP:.0%}"
    if not math.isfinite(after) or change > LR_SANITY_DIVERGE:
        return make_check(name, FAIL, round(change, 4) if math.isfinite(change) else None, threshold,
                          f"{head}: the loss rises, training diverges; lower {lr_key} (now {tcfg.lr:g}) or lengthen "
                          "train.warmup_steps", details)
    if change > -LR_SANITY_MIN_DROP:
        return make_check(name, WARN, round(change, 4), threshold,
                          f"{head}: the loss does not fall; the learning rate is too low early on: raise {lr_key} "
                          f"(now {tcfg.lr:g}) or shorten train.warmup_steps (now {tcfg.warmup_steps})", details)
    return make_check(name, OK, round(change, 4), threshold, head, details)
