"""Checks of the prompt-conditioned diffusion model (cfg): its prompt path and its noise schedule.

Classifier-free guidance needs a model trained both with and without the prompt: the conditioning
dropout must lie strictly between 0 and 1 and actually reach the model, and after
``CONDITIONING_STEPS`` training steps the prompted and null-prompt predictions must differ by
``CONDITIONING_MIN_DIFF`` (relative) or more, else the prompt never reaches the output. A pretrained
prompt encoder must load offline: training runs without the network.

Sampling starts from pure noise (continuous) or fully masked text (masked), so training must cover
both ends of the schedule: continuous, SNR(1) >= 1 and SNR(T) <= 0.01; masked, the masking rates
drawn in training must reach ``MASK_RATE_LOW`` (nearly clean text, the last sampling steps) and
``MASK_RATE_HIGH`` (nearly fully masked, the first).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable

import torch
from torch import nn

from sunfish.diagnose.core import FAIL, OK, WARN, device_of, make_check, seeded, to_device, trainable

CONDITIONING_STEPS = 4
CONDITIONING_MIN_DIFF = 1e-4
MASK_RATE_LOW = 0.05  # masked objective: training must reach nearly clean text ...
MASK_RATE_HIGH = 0.95  # ... and nearly fully masked text (where sampling starts)


def check_prompt_encoder(source: str, name: str = "prompt_encoder") -> dict:
    """A configured pretrained prompt encoder (hub name or path) loads offline; ``own`` needs nothing."""
    from sunfish.models.prompt_encoder import is_own, load_pretrained_embeddings

    if is_own(source):
        return make_check(name, OK, "own", "loads offline", "the model's own token embeddings encode the prompt")
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        weight, _ = load_pretrained_embeddings(source)
    except Exception as exc:
        return make_check(name, FAIL, source, "loads offline", f"cfg.prompt_encoder: {exc}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return make_check(name, OK, source, "loads offline",
                      f"{source!r} loads offline: {weight.shape[0]} x {weight.shape[1]} frozen embeddings")


def check_conditioning_dropout(model: nn.Module, *, draws: int = 20000, seed: int = 0,
                               name: str = "conditioning_dropout") -> dict:
    """Conditioning dropout is active in training (> 0, < 1), and the model applies what is configured."""
    p = float(model.config.conditioning_dropout)
    threshold = "0 < p < 1 (0.1 typical)"
    measured = None
    if hasattr(model, "drop_conditioning"):
        was = model.training
        model.train()
        try:
            with seeded(seed):
                mask = torch.ones(draws, 1, dtype=torch.bool, device=device_of(model))
                _, dropped = model.drop_conditioning(mask)
            measured = float(dropped.float().mean())
        finally:
            model.train(was)
    value = {"configured": p, "measured": round(measured, 4) if measured is not None else None}
    if p <= 0:
        return make_check(name, FAIL, value, threshold,
                          "cfg.conditioning_dropout is 0: the null prompt is never trained, so classifier-free guidance "
                          "has no unconditional model to push away from; set cfg.conditioning_dropout: 0.1")
    if p >= 1:
        return make_check(name, FAIL, value, threshold,
                          f"cfg.conditioning_dropout is {p:g}: every prompt is dropped, the prompt path never trains; "
                          "set cfg.conditioning_dropout: 0.1")
    if measured is not None and abs(measured - p) > max(0.03, 4 * math.sqrt(p * (1 - p) / draws)):
        return make_check(name, FAIL, value, threshold,
                          f"cfg.conditioning_dropout is {p:g} but the model drops {measured:.1%} of prompts in training "
                          "mode: the setting does not reach the model")
    if p > 0.5:
        return make_check(name, WARN, value, threshold,
                          f"cfg.conditioning_dropout {p:g} drops most prompts: the conditional model gets little "
                          "training; 0.1-0.2 is typical")
    return make_check(name, OK, value, threshold,
                      f"{p:.0%} of prompts dropped in training" + (f" (measured {measured:.1%})" if measured is not None else ""))


def check_noise_schedule(timesteps: int, schedule: str, name: str = "noise_schedule_snr") -> dict:
    """Continuous objective: SNR = abar / (1 - abar) must fall monotonically from clearly-signal at t=1
    to nearly-pure-noise at t=T (else sampling from pure noise starts off the training distribution)."""
    from sunfish.diffusion.continuous import alpha_bars

    ab = alpha_bars(timesteps, schedule)[1:].double()
    snr = ab / (1 - ab).clamp_min(1e-300)
    first, last = float(snr[0]), float(snr[-1])
    value = {"log10_snr_t1": round(math.log10(max(first, 1e-300)), 2), "log10_snr_T": round(math.log10(max(last, 1e-300)), 2)}
    threshold = "SNR(1) >= 1, SNR(T) <= 0.01, decreasing"
    if not bool((snr[1:] <= snr[:-1] * (1 + 1e-9)).all()):
        return make_check(name, FAIL, value, threshold,
                          f"cfg.noise_schedule {schedule!r} with cfg.timesteps={timesteps}: the signal-to-noise ratio is "
                          "not decreasing in t; use sqrt or cosine")
    if last > 1.0:
        return make_check(name, FAIL, value, threshold,
                          f"SNR at t=T is {last:.3g}: the last step is mostly signal, so sampling from pure noise starts "
                          f"far from anything seen in training; raise cfg.timesteps (now {timesteps}) or use "
                          "cfg.noise_schedule: sqrt")
    if last > 0.01:
        return make_check(name, WARN, value, threshold,
                          f"SNR at t=T is {last:.3g} (> 0.01): the noisiest step still holds signal; raise "
                          f"cfg.timesteps (now {timesteps}) or use cfg.noise_schedule: sqrt")
    if first < 1.0:
        return make_check(name, WARN, value, threshold,
                          f"SNR at t=1 is {first:.3g} (< 1): even the least noisy step hides most of the signal, so fine "
                          f"detail is never learnt; raise cfg.timesteps (now {timesteps}) or change cfg.noise_schedule")
    return make_check(name, OK, value, threshold,
                      f"SNR from {first:.3g} at t=1 down to {last:.2g} at t={timesteps} ({schedule})")


def check_mask_schedule(
    batch_size: int,
    *,
    draws: int = 256,
    seed: int = 0,
    times: Callable[[int, torch.Generator], torch.Tensor] | None = None,
    name: str = "noise_schedule_snr",
) -> dict:
    """Masked objective: the masking rates t drawn in training (``masked.stratified_times``) span nearly
    clean to fully masked text. Signal-to-noise of a rate t: SNR = (1 - t) / t (share of tokens kept
    over share masked). Sampling starts from all-[MASK] (t = 1, SNR 0) and ends nearly clean, so
    training must cover both ends; t must stay > 0 (the ELBO weighs the loss by 1/t).

    ``times(batch_size, generator) -> t [batch_size]`` replaces the objective's own draw (tests).
    """
    from sunfish.diffusion.masked import stratified_times

    draw = times or (lambda b, g: stratified_times(b, torch.device("cpu"), g))
    gen = torch.Generator().manual_seed(seed)
    t = torch.cat([draw(batch_size, gen).flatten().double() for _ in range(draws)])
    lo, hi = float(t.min()), float(t.max())

    def log10_snr(x: float) -> float:
        return round(math.log10(max(1.0 - x, 1e-12) / max(x, 1e-12)), 2)

    value = {"mask_rate_min": round(lo, 4), "mask_rate_max": round(hi, 4), "log10_snr_max": log10_snr(lo),
             "log10_snr_min": log10_snr(hi)}
    threshold = f"mask rate 0 < min <= {MASK_RATE_LOW}, max >= {MASK_RATE_HIGH}"
    if not (lo > 0 and hi <= 1 and math.isfinite(lo) and math.isfinite(hi)):
        return make_check(name, FAIL, value, threshold,
                          f"training masking rates range over {lo:.3g}..{hi:.3g}: outside (0, 1], the 1/t weight of the "
                          "masked ELBO is infinite or the rate is meaningless; check sunfish/diffusion/masked.py")
    if hi < MASK_RATE_HIGH:
        return make_check(name, FAIL, value, threshold,
                          f"training never masks more than {hi:.0%} of a text, but sampling starts from fully masked "
                          "text (SNR 0): the first sampling steps run far outside anything seen in training; check "
                          "stratified_times / MIN_TIME in sunfish/diffusion/masked.py")
    if lo > MASK_RATE_LOW:
        return make_check(name, WARN, value, threshold,
                          f"training never masks fewer than {lo:.0%} of the tokens: the last sampling steps (nearly "
                          "clean text) are never trained; check sunfish/diffusion/masked.py")
    return make_check(name, OK, value, threshold,
                      f"masking rates {lo:.3g}..{hi:.3g} in training: log10 SNR from {value['log10_snr_max']:+.1f} "
                      f"down to {value['log10_snr_min']:+.1f} (fully masked), the whole sampling path")


def check_conditioning_effect(
    model: nn.Module,
    batches: list[dict],
    probe: dict,
    *,
    lr: float = 1e-3,
    seed: int = 0,
    name: str = "conditioning_effect",
) -> dict:
    """After ``len(batches)`` training steps on real pairs (a copy), conditional and unconditional
    predictions for the same input must differ: otherwise the prompt path does not reach the output."""
    m = copy.deepcopy(model)
    m.train()
    device = device_of(m)
    params = [p for _, p in trainable(m)]
    if params:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for i, batch in enumerate(batches):
            with seeded(seed + i):
                loss, _ = m.training_loss(to_device(batch, device))
            if not torch.isfinite(loss.detach()) or not loss.requires_grad:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    probe = to_device(probe, device)
    keep = probe["prompt_mask"].bool().any(dim=1)
    if not bool(keep.any()):
        return make_check(name, FAIL, None, f">= {CONDITIONING_MIN_DIFF:g}",
                          "no pair in the probe batch has a prompt; see the data_pairs check")
    probe = {k: v[keep] for k, v in probe.items()}
    ids, mask = probe["text_ids"], probe["text_mask"].bool()
    cfg = m.config
    m.eval()
    with torch.no_grad(), seeded(seed):
        if getattr(m, "kind", None) == "block_diffusion":
            from sunfish.diffusion.block import text_logits

            rows = torch.ones(ids.shape[0], dtype=torch.bool, device=device)
            cond, uncond = text_logits(m, probe, mask, rows), text_logits(m, probe, mask, ~rows)
            mask = mask[:, : cond.shape[1]]
        elif getattr(cfg, "objective", "masked") == "masked":
            inputs = torch.where(mask, torch.full_like(ids, m.mask_id), ids)
            cond, uncond = m.predict_cond_uncond(inputs, probe["prompt_ids"], probe["prompt_mask"], mask)
        else:
            t = torch.full((ids.shape[0],), max(1, cfg.timesteps // 2), dtype=torch.long, device=device)
            z = torch.randn(*ids.shape, cfg.d_model, device=device)
            cond, uncond = m.predict_cond_uncond(z, probe["prompt_ids"], probe["prompt_mask"], mask, timesteps=t)
    cond, uncond = cond[mask].float(), uncond[mask].float()
    scale = float(cond.abs().mean()) or 1.0
    diff = float((cond - uncond).abs().mean()) / scale
    value = diff
    steps = len(batches)
    if not math.isfinite(diff):
        return make_check(name, FAIL, None, f">= {CONDITIONING_MIN_DIFF:g}", "the predictions are not finite")
    if diff < CONDITIONING_MIN_DIFF:
        return make_check(name, FAIL, value, f">= {CONDITIONING_MIN_DIFF:g}",
                          f"after {steps} training steps the conditional and unconditional predictions are identical "
                          f"(relative difference {diff:.2g}): the prompt never reaches the output, so guidance does "
                          "nothing; check cfg.prompt_encoder and cfg.conditioning_dropout (< 1)")
    return make_check(name, OK, value, f">= {CONDITIONING_MIN_DIFF:g}",
                      f"prompted vs null-prompt predictions differ by {diff:.2%} (relative) after {steps} steps")
