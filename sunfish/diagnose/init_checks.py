"""The untrained model's forward pass: finite logits and an initial loss near ln(vocab).

An untrained model should predict every token about equally, so its loss should be close to
ln(vocab). Far above means over-confident initial logits (large output weights, a missing final
norm), and the first steps go to undoing the initialisation; far below means the targets leak into
the input (broken causality), and the model learns to copy instead of to predict. The tolerance is
diagnose.init_loss_tolerance. ``forward_logits`` is also the diagnosis's one view of what a model
predicts, AR or diffusion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sunfish.diagnose.core import FAIL, OK, device_of, make_check, seeded, to_device


def model_vocab_size(model: nn.Module) -> int:
    return int(model.config.vocab_size)


def forward_logits(model: nn.Module, batch: dict, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V] at the positions a loss scores, their targets [N]) for an AR or diffusion batch.

    AR: next-token logits where target != -100. Diffusion (masked): every real text token masked, so
    p(text | prompt) from nothing; continuous: the rounding logits of x0_hat from pure noise at t = T.
    """
    batch = to_device(batch, device_of(model))
    if "input_ids" in batch:
        logits = model(batch["input_ids"])
        keep = batch["targets"] != -100
        return logits[keep], batch["targets"][keep]
    ids, mask = batch["text_ids"], batch["text_mask"].bool()
    cfg = model.config
    if getattr(model, "kind", None) == "block_diffusion":
        from sunfish.diffusion.block import text_logits

        logits = text_logits(model, batch, mask)
        mask = mask[:, : logits.shape[1]]
        return logits[mask], ids[:, : logits.shape[1]][mask]
    if getattr(cfg, "objective", "masked") == "masked":
        inputs = torch.where(mask, torch.full_like(ids, model.mask_id), ids)
        logits = model.predict(inputs, batch["prompt_ids"], batch["prompt_mask"], mask)
    else:
        with seeded(seed):
            z = torch.randn(*ids.shape, cfg.d_model, device=ids.device)
        t = torch.full((ids.shape[0],), cfg.timesteps, dtype=torch.long, device=ids.device)
        x0 = model.predict(z, batch["prompt_ids"], batch["prompt_mask"], mask, timesteps=t)
        logits = model.rounding_logits(x0)
    return logits[mask], ids[mask]


def check_init(model: nn.Module, batch: dict, tolerance: float = 0.25, *, name: str = "init") -> list[dict]:
    """Logits are finite and the initial loss is near ln(vocab) (an untrained model should be uniform).

    Returns ``<name>_logits`` and ``<name>_loss``. A loss far above ln(V) means over-confident initial
    logits (large output weights, a missing final norm); far below means the targets leak into the input.
    """
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits, targets = forward_logits(model, batch)
    finally:
        model.train(was)
    vocab = model_vocab_size(model)
    expected = math.log(vocab)
    rows = []
    finite = bool(torch.isfinite(logits).all()) if logits.numel() else True
    n_bad = int((~torch.isfinite(logits)).sum()) if logits.numel() else 0
    if logits.numel() == 0:
        rows.append(make_check(f"{name}_logits", FAIL, 0, "finite", "the batch has no scored position (all targets ignored)"))
        return rows
    if not finite:
        rows.append(make_check(f"{name}_logits", FAIL, n_bad, "0 non-finite",
                               f"{n_bad} of {logits.numel()} initial logits are NaN/inf: a layer produces non-finite "
                               "values at initialisation (see the gradient_nan check for where); check the model code "
                               "and train.precision"))
        rows.append(make_check(f"{name}_loss", FAIL, None, f"ln({vocab}) = {expected:.2f} +- {tolerance:.0%}",
                               "the initial loss is not finite"))
        return rows
    rows.append(make_check(f"{name}_logits", OK, 0, "0 non-finite", f"{logits.shape[0]} positions, all logits finite"))
    loss = float(F.cross_entropy(logits.float(), targets))
    rel = abs(loss - expected) / expected
    threshold = f"ln({vocab}) = {expected:.2f} +- {tolerance:.0%}"
    if rel > tolerance:
        why = ("the initial logits are over-confident (output weights too large, a missing final norm); an untrained "
               "model should predict every token about equally" if loss > expected else
               "the untrained model already predicts the targets: they leak into its input (check causality)")
        return rows + [make_check(f"{name}_loss", FAIL, round(loss, 4), threshold,
                                  f"initial loss {loss:.2f} is {rel:.0%} away from ln(vocab) = {expected:.2f}: {why}; "
                                  "allowed: diagnose.init_loss_tolerance")]
    return rows + [make_check(f"{name}_loss", OK, round(loss, 4), threshold,
                              f"initial loss {loss:.3f} vs ln({vocab}) = {expected:.3f} ({rel:.1%} off)")]
