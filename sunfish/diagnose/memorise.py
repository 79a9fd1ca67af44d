"""Memorisation: can a copy of the model overfit one small batch?

A model that cannot memorise 64 tokens will not learn a corpus. This is the quickest end-to-end proof
that the loss is connected to the weights and that the optimiser moves them: it fails on frozen
parameters, a learning rate of 0, a loss cut from the graph, or branches gated shut.

The batch is ``MEMORIZE_SHAPE`` (rows x tokens); its loss must fall below diagnose.memorize_target
within diagnose.memorize_steps AdamW steps at ``MEMORIZE_LR`` of the model's kind. One fixed lr makes
wide models oscillate on one batch (Adam's best lr goes as 1 / width), so above ``MEMORIZE_LR_WIDTH``
it is scaled by ``MEMORIZE_LR_WIDTH / d_model``. The masked denoiser is scored on a fixed half-masked
copy of the batch and also passes below ``MEMORIZE_RELATIVE`` x its first loss: it must first learn to
locate its positions by attention, which takes hundreds of steps even on one batch.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sunfish.diagnose.core import FAIL, OK, device_of, make_check, seeded, to_device, trainable

MEMORIZE_LR = {"staged": 3e-3, "diffusion": 1e-3}  # the tied-embedding denoiser oscillates at 3e-3 on one batch
MEMORIZE_LR_WIDTH = 256  # ... at d_model <= 256; wider models get lr x 256 / d_model (Adam's lr ~ 1 / width):
# at 3e-3 the micro preset (d_model 512) oscillates around loss 1 and never memorises; at 1.5e-3 it does in 21 steps
MEMORIZE_RELATIVE = {"diffusion": 0.3}  # see check_memorisation
MEMORIZE_SHAPE = (2, 32)  # rows x tokens of the one batch to overfit


def check_memorisation(
    model: nn.Module,
    batch: dict,
    *,
    steps: int = 150,
    target: float = 0.1,
    lr: float = 3e-3,
    seed: int = 0,
    name: str = "memorisation",
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    relative_target: float | None = None,
) -> dict:
    """A copy of the model must overfit ONE small batch to loss < ``target`` within ``steps`` AdamW steps.

    The objective's own randomness (masks, noise, conditioning dropout) is fixed by reseeding each
    step, so the batch is truly the same every step. ``loss_fn(model, batch) -> loss`` replaces
    ``model.training_loss`` (the diffusion model uses a fixed-mask objective, see ``memorisation_loss``).
    A model that cannot memorise 64 tokens will not learn a corpus: frozen parameters, a learning rate
    of 0, a loss not connected to the weights, or branches gated shut.

    ``relative_target``: also accept a loss below that share of the first step's loss (the masked
    denoiser must first learn to locate its positions by attention, which takes hundreds of steps
    even on one batch; falling to 30% of the initial loss already proves it learns).
    """
    m = copy.deepcopy(model)
    m.train()
    params = [p for _, p in trainable(m)]
    shape = "x".join(str(s) for s in next(iter(v for v in batch.values() if isinstance(v, torch.Tensor))).shape)
    if not params:
        return make_check(name, FAIL, None, f"loss < {target} within {steps} steps",
                          f"the model has no trainable parameters (all frozen): it cannot even memorise one {shape} "
                          "batch")
    batch = to_device(batch, device_of(m))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = loss_fn or (lambda mod, b: mod.training_loss(b)[0])
    first = best = last = float("nan")
    goal = target
    threshold = f"loss < {target} within {steps} steps"
    started = time.perf_counter()
    for step in range(1, steps + 1):
        with seeded(seed):
            loss = loss_fn(m, batch)
        last = float(loss.detach())
        if step == 1:
            first = best = last
            if relative_target is not None and math.isfinite(first):
                goal = max(target, relative_target * first)
                threshold = f"loss < max({target}, {relative_target:g} x initial) within {steps} steps"
        best = min(best, last)
        if not math.isfinite(last):
            return make_check(name, FAIL, step, threshold,
                              f"the loss became {last} at step {step} while overfitting one {shape} batch at lr {lr:g}: "
                              "the model is numerically unstable (see the gradient_nan check)",
                              {"first_loss": first, "lr": lr})
        if last < goal:
            return make_check(name, OK, step, threshold,
                              f"overfit one {shape} batch in {step} steps ({first:.2f} -> {last:.3f}, lr {lr:g}, "
                              f"{time.perf_counter() - started:.1f} s)", {"first_loss": first, "final_loss": last, "lr": lr})
        if not loss.requires_grad:
            return make_check(name, FAIL, step, threshold,
                              "the loss is not connected to any trainable parameter (no grad_fn): nothing can learn")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    details = {"first_loss": first, "final_loss": last, "best_loss": best, "lr": lr}
    if abs(first - last) < 1e-4 * max(1.0, abs(first)):
        why = ("the loss did not move at all: the parameters are not being updated (frozen, a learning rate of 0, or "
               "gradients that never reach the weights; see the gradient_flow check)")
    else:
        why = ("a healthy model reaches it in tens of steps; likely causes: residual branches gated nearly shut, a "
               "model too narrow for the batch, or heavy dropout (staged.dropout / cfg.dropout). If the loss is still "
               "falling steadily, raise diagnose.memorize_steps")
    return make_check(name, FAIL, steps, threshold,
                      f"could not overfit one {shape} batch: loss {first:.2f} -> {last:.3f} (best {best:.3f}) after "
                      f"{steps} steps at lr {lr:g}; {why}", details)


def memorize_lr(model: nn.Module) -> float:
    """The AdamW lr of the memorisation probe: ``MEMORIZE_LR`` of the model's kind, scaled down as
    1 / width above ``MEMORIZE_LR_WIDTH`` (one fixed lr makes wide models oscillate on one batch)."""
    base = MEMORIZE_LR.get(getattr(model, "kind", "staged"), 3e-3)
    width = int(getattr(getattr(model, "config", None), "d_model", MEMORIZE_LR_WIDTH) or MEMORIZE_LR_WIDTH)
    return base * min(1.0, MEMORIZE_LR_WIDTH / width)


def memorisation_loss(model: nn.Module, batch: dict, *, mask_share: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Deterministic per-batch objective for memorisation.

    AR models: their training loss. Diffusion (masked): cross-entropy on a FIXED random half of the
    real text tokens, the rest visible (the training objective draws a new mask ratio per row, and a
    fully masked row cannot tell its positions apart, so it can never be memorised exactly).
    Continuous: the training loss under fixed noise (seeded by the caller).
    """
    if "input_ids" in batch or getattr(model.config, "objective", "masked") != "masked":
        return model.training_loss(batch)[0]
    ids, text_mask = batch["text_ids"], batch["text_mask"].bool()
    gen = torch.Generator().manual_seed(seed)
    chosen = (torch.rand(ids.shape, generator=gen) < mask_share).to(ids.device) & text_mask
    if not bool(chosen.any()):
        chosen = text_mask
    if getattr(model, "kind", None) == "block_diffusion":
        from sunfish.diffusion.block import text_logits

        logits = text_logits(model, batch, chosen)
        chosen = chosen[:, : logits.shape[1]]
        return F.cross_entropy(logits[chosen].float(), ids[:, : logits.shape[1]][chosen])
    inputs = torch.where(chosen, torch.full_like(ids, model.mask_id), ids)
    memory, memory_mask = model.encode_prompt(batch["prompt_ids"], batch["prompt_mask"])
    hidden = model.hidden_states(inputs, memory, memory_mask, text_mask)
    log_probs = model.masked_log_probs(hidden, memory, memory_mask, batch["prompt_ids"], chosen)
    return F.nll_loss(log_probs, ids[chosen])
