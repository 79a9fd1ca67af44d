"""Classifier-free guidance: one formula, used by both objectives.

    guided = uncond + w * (cond - uncond)

w = 0: the unconditional prediction; w = 1: the conditional one (no guidance); w > 1: guided
(the original's default is 7). The masked objective applies it to log-probabilities and
renormalises (:func:`guided_log_probs`); the continuous one applies it to x0_hat.
"""

from __future__ import annotations

import torch


def combine(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """uncond + w * (cond - uncond); exactly ``uncond`` at w = 0 and exactly ``cond`` at w = 1."""
    if guidance_scale == 0.0:
        return uncond
    if guidance_scale == 1.0:
        return cond
    return uncond + guidance_scale * (cond - uncond)


def guided_log_probs(
    cond_logits: torch.Tensor, uncond_logits: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """CFG on log-probabilities in float64, renormalised: log softmax(log p_u + w (log p_c - log p_u))."""
    log_cond = torch.log_softmax(cond_logits.double(), dim=-1)
    log_uncond = torch.log_softmax(uncond_logits.double(), dim=-1)
    return torch.log_softmax(combine(log_cond, log_uncond, guidance_scale), dim=-1)
