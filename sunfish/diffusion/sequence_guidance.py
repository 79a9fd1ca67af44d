"""Sequence-level classifier-free guidance: resample whole conditional samples by their prompt information.

Classifier-free guidance at scale w aims at the distribution

    p_w(x | c)  proportional to  p(x | c) * p(c | x)^(w - 1)  =  p(x | c) * (p(x | c) / p(x))^(w - 1).

Token-level CFG (:func:`sunfish.diffusion.guidance.guided_log_probs`) applies the ratio to every
position's prediction separately. For a masked diffusion model that is a poor stand-in for the
sequence-level target: the ratio p_c / p_u of a word the prompt names is large at *every* still
masked position, so each of them is pushed towards it and samples repeat the word ("the crab crab
crab"); measured on the quality run, w = 1.5 already cost 3x the judge perplexity of unguided samples.

Here the target is met at the level it is defined: draw ``k`` samples from the conditional model
(w = 1, fluent), weight each by exp((w - 1) * log p(x|c)/p(x)), and resample one per prompt
(sampling-importance-resampling; exact as k grows). log p(x|c) - log p(x) is estimated with the
model's own masked ELBO under the prompt and under the null prompt, with the same masks for both
(common random numbers: most of the ELBO's noise cancels in the difference). A candidate that
carries what the prompt asks for has a large ratio; one that ignores the prompt has a ratio near 0;
no single token is ever pushed. w = 1 gives uniform weights (a plain conditional sample), w = 0 is
the unconditional model and is sampled directly, 0 < w < 1 favours candidates with less prompt
information, as the formula says.

The k candidates do not depend on w: one draw serves every guidance scale of a sweep
(:func:`resample` with each w), which is how evaluate uses it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sunfish.diffusion.masked import real_text_mask, uniform

DEFAULT_CANDIDATES = 4
DEFAULT_DRAWS = 4


@torch.no_grad()
def prompt_log_ratio(
    model,
    ids: torch.Tensor,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    draws: int = DEFAULT_DRAWS,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Estimate of log p(x | c) - log p(x | null) per row, in nats (float64 [N]).

    Each draw masks l of a row's L real tokens (l stratified over the draws: draw d takes u in
    [d/draws, (d+1)/draws)), scores the masked tokens under the prompt and under the null prompt in
    one batched pass, and weights both cross-entropies by L/l, the discrete ELBO of
    :func:`sunfish.diffusion.masked.elbo`. The difference of the two bounds is the estimate.
    """
    cond, uncond, _ = model_elbo_pair(model, ids, prompt_ids, prompt_mask, draws=draws, generator=generator)
    return uncond - cond


def model_elbo_pair(model, ids, prompt_ids, prompt_mask, *, draws: int = DEFAULT_DRAWS,
                    generator: torch.Generator | None = None, with_null: bool = True):
    """:func:`elbo_pair` for either masked family: a block model's bound is its own objective's
    (:func:`sunfish.diffusion.block.row_elbo_pair`; ``with_null=False`` skips its null-prompt passes
    and gives None for that bound), the cross-attention model's the masked ELBO (both in one pass)."""
    if getattr(model, "kind", None) == "block_diffusion":
        from sunfish.diffusion.block import row_elbo_pair

        return row_elbo_pair(model, ids, prompt_ids, prompt_mask, draws=draws, generator=generator,
                             with_null=with_null)
    return elbo_pair(model, ids, prompt_ids, prompt_mask, draws=draws, generator=generator)


def conditional_samples(model, ids_k, mask_k, *, seq_len: int, num_steps: int, exact_counts: bool, top_p: float,
                        generator: torch.Generator | None = None, infill=None, on_step=None) -> torch.Tensor:
    """One w = 1 sample per row of the (already repeated) prompts ``ids_k`` [M, P], with the
    sampler of the model's family: the candidates that selection chooses among."""
    from sunfish.diffusion import masked

    sampler = masked.sample
    if getattr(model, "kind", None) == "block_diffusion":
        from sunfish.diffusion import block

        sampler = block.sample
    return sampler(model, ids_k, mask_k, num_samples=ids_k.shape[0], seq_len=seq_len, num_steps=num_steps,
                   guidance_scale=1.0, exact_counts=exact_counts, generator=generator, infill=infill, top_p=top_p,
                   on_step=on_step)


@torch.no_grad()
def elbo_pair(
    model,
    ids: torch.Tensor,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    draws: int = DEFAULT_DRAWS,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(conditional bound, unconditional bound, real tokens) per row: the ELBO estimates, in nats
    (float64 [N]), of -log p(x | c) and -log p(x | null) with the same masks (see prompt_log_ratio),
    and the tokens each covers. The conditional one alone ranks samples by the model's own
    likelihood: the best-of-k baseline that sequence guidance is compared with."""
    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1")
    device = model.device
    ids = ids.to(device)
    rows, length = ids.shape
    text_mask = real_text_mask(ids, model.config.eos_id).to(device)
    lengths = text_mask.sum(dim=1).clamp(min=1)
    memory = model.encode_prompt_with_null(prompt_ids.to(device), prompt_mask.to(device))
    states, memory_mask = memory
    total_c = torch.zeros(rows, dtype=torch.float64, device=device)
    total_u = torch.zeros(rows, dtype=torch.float64, device=device)
    for d in range(draws):
        u = (d + uniform((rows,), generator, device)) / draws
        n_masked = (u * lengths).ceil().clamp(min=1).minimum(lengths).long()
        scores = uniform((rows, length), generator, device).masked_fill(~text_mask, 2.0)
        rank = scores.argsort(dim=1).argsort(dim=1)
        masked = (rank < n_masked[:, None]) & text_mask
        inputs = torch.where(masked, torch.full_like(ids, model.mask_id), ids)
        cond, uncond = model.hidden_cond_uncond(inputs, text_mask=text_mask, memory=memory)
        lp_c = model.masked_log_probs(cond, states[:rows], memory_mask[:rows], prompt_ids, masked)
        lp_u = model.masked_log_probs(uncond, states[rows:], memory_mask[rows:], prompt_ids, masked)
        target = ids[masked]
        weight = (lengths.double() / n_masked.double())[:, None].expand(rows, length)[masked]
        owner = masked.nonzero(as_tuple=True)[0]
        total_c.index_add_(0, owner, F.nll_loss(lp_c.double(), target, reduction="none") * weight)
        total_u.index_add_(0, owner, F.nll_loss(lp_u.double(), target, reduction="none") * weight)
    return (total_c / draws).cpu(), (total_u / draws).cpu(), lengths.cpu()


def resample(
    candidates: torch.Tensor,
    log_ratio: torch.Tensor,
    guidance_scale: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One candidate per prompt, drawn with probability proportional to exp((w - 1) * log_ratio).

    ``candidates`` [N, k, L], ``log_ratio`` [N, k] -> [N, L].
    """
    if candidates.dim() != 3 or log_ratio.shape != candidates.shape[:2]:
        raise ValueError(f"candidates {tuple(candidates.shape)} and log_ratio {tuple(log_ratio.shape)} do not match")
    logits = (float(guidance_scale) - 1.0) * log_ratio.double()
    probs = torch.softmax(logits, dim=1)
    where = generator.device if generator is not None else torch.device("cpu")
    choice = torch.multinomial(probs.to(where).float(), 1, generator=generator).squeeze(1).to(candidates.device)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), choice]


@torch.no_grad()
def draw_candidates(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    candidates: int,
    seq_len: int,
    num_steps: int,
    exact_counts: bool,
    top_p: float,
    draws: int = DEFAULT_DRAWS,
    generator: torch.Generator | None = None,
    infill: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``candidates`` conditional samples per prompt and their log ratios: ([N, k, L], [N, k]).

    ``prompt_ids``/``prompt_mask`` [N, P] (padded); infill ids/keep [N, L]. The N * k samples are
    drawn as one batch of the masked sampler at w = 1 (``on_step`` is its progress hook).
    """
    if candidates < 1:
        raise ValueError(f"candidates={candidates} must be >= 1")
    was_training = model.training
    model.eval()
    try:
        return _draw(model, prompt_ids, prompt_mask, candidates, seq_len, num_steps, exact_counts, top_p, draws,
                     generator, infill, on_step)
    finally:
        model.train(was_training)


def _draw(model, prompt_ids, prompt_mask, candidates, seq_len, num_steps, exact_counts, top_p, draws, generator,
          infill, on_step=None) -> tuple[torch.Tensor, torch.Tensor]:
    n = prompt_ids.shape[0]
    ids_k = prompt_ids.repeat_interleave(candidates, dim=0)
    mask_k = prompt_mask.repeat_interleave(candidates, dim=0)
    infill_k = None
    if infill is not None:
        infill_k = tuple(t.repeat_interleave(candidates, dim=0) for t in infill)
    drawn = conditional_samples(model, ids_k, mask_k, seq_len=seq_len, num_steps=num_steps, exact_counts=exact_counts,
                                top_p=top_p, generator=generator, infill=infill_k, on_step=on_step)
    ratio = prompt_log_ratio(model, drawn, ids_k, mask_k, draws=draws, generator=generator)
    return drawn.cpu().view(n, candidates, seq_len), ratio.view(n, candidates)
