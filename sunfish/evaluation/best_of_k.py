"""Best-of-k baselines: what drawing k samples and keeping the model's own favourite buys.

Sequence guidance keeps one of k conditional samples by their prompt information, so each of its
rows costs k samples a prompt. Whether its gain comes from guidance or merely from having k samples
to choose from is answered by the same k drawn without guidance and ranked by the model's own
likelihood: the diffusion model at w = 1 by its conditional ELBO per token, the AR model by its
exact log-likelihood per token. Neither criterion sees the target word or the judge, so neither can
select for what the measure counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pick_best", "ar_log_likelihood", "ar_best_of_k", "diffusion_best_of_k", "block_best_of_k"]


def pick_best(candidates: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The highest-scoring candidate of each row: ``candidates`` [N, k, L], ``scores`` [N, k] -> [N, L]."""
    if candidates.dim() != 3 or scores.shape != candidates.shape[:2]:
        raise ValueError(f"candidates {tuple(candidates.shape)} and scores {tuple(scores.shape)} do not match")
    best = scores.argmax(dim=1)
    return candidates[torch.arange(candidates.shape[0]), best]


def _kept(ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """True up to and including each row's first eos: the text a reader gets (the rest is trimmed)."""
    if eos_id is None:
        return torch.ones_like(ids, dtype=torch.bool)
    is_eos = (ids == eos_id).long()
    return (is_eos.cumsum(dim=1) - is_eos) == 0


@torch.no_grad()
def ar_log_likelihood(model, ids: torch.Tensor, context: list[int], eos_id: int | None) -> torch.Tensor:
    """Mean log-probability per kept token of each row of ``ids`` [M, L] after ``context`` (float64 [M])."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = ids.to(device)
        prefix = torch.tensor([context] * ids.shape[0], device=device)
        full = torch.cat([prefix, ids], dim=1)
        logits = model(full[:, :-1])[:, len(context) - 1:]
        logp = -F.cross_entropy(logits.double().transpose(1, 2), ids, reduction="none")
        kept = _kept(ids, eos_id)
        return ((logp * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1)).cpu()
    finally:
        model.train(was_training)


def ar_best_of_k(model, context: list[int], *, n: int, k: int, seq_len: int, top_p: float,
                 eos_id: int | None, generator: torch.Generator | None = None,
                 counter: dict | None = None) -> torch.Tensor:
    """``n`` samples [n, seq_len], each the most likely (per token, under ``model``) of ``k`` drawn
    from ``context`` as sunfish.generation.generate_batch draws them."""
    from sunfish.generation import generate_batch

    drawn = generate_batch(model, context, num_samples=n * k, max_new_tokens=seq_len, top_p=top_p,
                           generator=generator, counter=counter)
    scores = ar_log_likelihood(model, drawn, context, eos_id)
    if counter is not None:
        counter["forward_rows"] = counter.get("forward_rows", 0) + n * k
    return pick_best(drawn.cpu().view(n, k, seq_len), scores.view(n, k))


def diffusion_best_of_k(model, prompt_ids: list[list[int]], *, k: int, seq_len: int, num_steps: int,
                        exact_counts: bool, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample per prompt [N, seq_len]: of ``k`` conditional (w = 1) samples, the one with the lowest
    conditional ELBO per token, i.e. the model's own favourite given the prompt (either masked family:
    block diffusion or the cross-attention model with the masked objective)."""
    from sunfish.diffusion.sequence_guidance import conditional_samples, model_elbo_pair

    padded, mask = model.pad_prompt_ids(prompt_ids)
    n = padded.shape[0]
    ids_k, mask_k = padded.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)
    drawn = conditional_samples(model, ids_k, mask_k, seq_len=seq_len, num_steps=num_steps, exact_counts=exact_counts,
                                top_p=top_p, generator=generator)
    cond, _, lengths = model_elbo_pair(model, drawn, ids_k, mask_k, generator=generator, with_null=False)
    per_token = -(cond / lengths.double())
    return pick_best(drawn.cpu().view(n, k, seq_len), per_token.view(n, k))


@torch.no_grad()
def block_best_of_k(model, prompt_ids: list[list[int]], *, k: int, seq_len: int, num_steps: int,
                    exact_counts: bool, top_p: float, guidance_scale: float = 1.0, eos_id: int | None,
                    generator: torch.Generator | None = None, counter: dict | None = None) -> torch.Tensor:
    """One block-diffusion sample per prompt [N, seq_len]: of ``k`` drawn at ``guidance_scale``, the
    one whose drawn tokens the sampler found most likely (mean log-probability per kept token, under
    the guided model before the nucleus cut). The score is a by-product of sampling, so the row costs
    exactly k samples; like the ELBO ranking it sees neither the target word nor the judge."""
    from sunfish.diffusion import block

    padded, mask = model.pad_prompt_ids(prompt_ids)
    n = padded.shape[0]
    ids_k, mask_k = padded.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)
    log_probs = torch.zeros(n * k, seq_len, dtype=torch.float64, device=model.device)
    drawn = block.sample(model, ids_k, mask_k, num_samples=n * k, seq_len=seq_len, num_steps=num_steps,
                         guidance_scale=guidance_scale, exact_counts=exact_counts, generator=generator,
                         top_p=top_p, counter=counter, token_log_probs=log_probs)
    kept = _kept(drawn, eos_id)
    score = (log_probs * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1)
    return pick_best(drawn.cpu().view(n, k, seq_len), score.cpu().view(n, k))
