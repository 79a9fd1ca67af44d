"""Masked (absorbing-state) diffusion, MDLM-style: the objective and its sampler.

Forward process: at time t in (0, 1] every real text token is replaced by [MASK] (id
``vocab_size``) independently with probability t (log-linear schedule alpha_t = 1 - t). The network
sees the partly masked text and the prompt and predicts every masked token; it cannot predict
[MASK] (the head has no row for it).

Training loss: the continuous-time ELBO E_t[(1/t) sum over masked positions of -log p(x_i | z_t)],
with t stratified across the batch (t_i = (perm_i + u) / B), divided by the number of real tokens.

``elbo`` (for bits per byte): the same bound in its discrete form: mask exactly l of the L real
tokens, l uniform in 1..L (stratified across the batch), weight the masked cross-entropy by L/l.
Its expectation is the any-order bound E_order sum_k -log p(x_order(k) | x_order(<k)) >= -log p(x),
so it is an upper bound on the NLL: report it as such.

Sampling: ancestral, from t = 1 (all masked) to 0 in ``num_steps`` steps; see :func:`sample`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sunfish.diffusion.guidance import guided_log_probs

MIN_TIME = 1e-3  # t is drawn from [MIN_TIME, 1]: the 1/t weight stays bounded


def real_text_mask(ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """True up to and including each row's first eos: what the caller keeps of a sample."""
    if eos_id is None:
        return torch.ones_like(ids, dtype=torch.bool)
    is_eos = ids == eos_id
    before = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0  # no eos strictly before this position
    return before


def uniform(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U(0, 1) drawn on the generator's device (CPU by default), then moved: same numbers anywhere."""
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=where).to(device)


def stratified_times(
    batch: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One t per row, evenly spread over [MIN_TIME, 1] with a shared random offset, in random order."""
    where = generator.device if generator is not None else torch.device("cpu")
    offset = torch.rand((), generator=generator, device=where)
    order = torch.randperm(batch, generator=generator, device=where)
    t = (order.float() + offset) / batch
    return (MIN_TIME + (1.0 - MIN_TIME) * t).to(device)


def training_loss(model, batch: dict, memory: torch.Tensor, memory_mask: torch.Tensor):
    ids = batch["text_ids"]
    text_mask = batch["text_mask"].bool()
    batch_size, length = ids.shape
    t = stratified_times(batch_size, ids.device)
    masked = (uniform((batch_size, length), None, ids.device) < t[:, None]) & text_mask
    inputs = torch.where(masked, torch.full_like(ids, model.mask_id), ids)
    hidden = model.hidden_states(inputs, memory, memory_mask, text_mask)
    log_probs = model.masked_log_probs(hidden, memory, memory_mask, batch["prompt_ids"], masked)
    ce = F.nll_loss(log_probs, ids[masked], reduction="none")
    weight = (1.0 / t)[:, None].expand(batch_size, length)[masked]
    n_real = text_mask.sum().clamp(min=1)
    loss = (ce * weight).sum() / n_real
    metrics = {
        "elbo_per_token": float(loss.detach()),
        "masked_ce": float(ce.detach().mean()) if ce.numel() else 0.0,
        "masked_accuracy": float((log_probs.argmax(-1) == ids[masked]).float().mean()) if ce.numel() else 0.0,
        "masked_fraction": float(masked.sum() / n_real),
    }
    return loss, metrics


def elbo(model, batch: dict, memory: torch.Tensor, memory_mask: torch.Tensor, generator=None) -> torch.Tensor:
    """Upper bound on the NLL in nats, summed over the batch's real text tokens (one draw)."""
    ids = batch["text_ids"]
    text_mask = batch["text_mask"].bool()
    batch_size, length = ids.shape
    lengths = text_mask.sum(dim=1)
    # l_i uniform in 1..L_i, stratified across the batch
    u = stratified_times(batch_size, ids.device, generator)
    n_masked = (u * lengths).ceil().clamp(min=1).minimum(lengths.clamp(min=1)).long()
    # mask the n_masked real positions with the smallest random scores
    scores = uniform((batch_size, length), generator, ids.device).masked_fill(~text_mask, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    masked = (rank < n_masked[:, None]) & text_mask
    inputs = torch.where(masked, torch.full_like(ids, model.mask_id), ids)
    hidden = model.hidden_states(inputs, memory, memory_mask, text_mask)
    log_probs = model.masked_log_probs(hidden, memory, memory_mask, batch["prompt_ids"], masked)
    ce = F.nll_loss(log_probs, ids[masked], reduction="none").double()
    weight = (lengths.double() / n_masked.double())[:, None].expand(batch_size, length)[masked]
    return (ce * weight).sum()


NUCLEUS_CANDIDATES = 128  # tokens ranked by a partial sort before falling back to a full one


def nucleus(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Rows of log-probabilities restricted to their top-p nucleus and renormalised (1 = unchanged).

    The most likely token always stays, so a row is never empty. Why a partial sort: ranking the
    whole vocabulary for every drawn token was a third of an AR sampling step on CPU; the nucleus
    almost always lies in the top few dozen tokens, so only rows whose top ``NUCLEUS_CANDIDATES``
    hold less than ``top_p`` are sorted in full. The kept set is the same either way.
    """
    if top_p >= 1.0:
        return log_probs
    probs = log_probs.exp()
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    top, order = probs.topk(k, dim=-1)  # descending
    mass = top.cumsum(dim=-1)
    short = mass[..., -1] < top_p  # the nucleus reaches beyond the candidates: rank these rows fully
    keep = torch.zeros_like(log_probs, dtype=torch.bool).scatter(-1, order, (mass - top) < top_p)
    if bool(short.any()):
        full, full_order = probs[short].sort(dim=-1, descending=True)
        inside = (full.cumsum(dim=-1) - full) < top_p  # the mass before a token has not reached top_p
        keep[short] = torch.zeros_like(inside).scatter(-1, full_order, inside)
    return torch.log_softmax(log_probs.masked_fill(~keep, float("-inf")), dim=-1)


def _sample_from(log_probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from rows of float64 log-probabilities with uniforms ``u`` [N]."""
    cdf = log_probs.exp().cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=log_probs.shape[-1] - 1)


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor | None,
    prompt_mask: torch.Tensor | None,
    *,
    num_samples: int,
    seq_len: int,
    num_steps: int,
    guidance_scale: float,
    exact_counts: bool = False,
    generator: torch.Generator | None = None,
    infill: tuple[torch.Tensor, torch.Tensor] | None = None,
    top_p: float = 1.0,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Ancestral sampling from t = 1 to t = 0 in ``num_steps`` equal steps.

    Step t -> s: each still-masked position is revealed with probability (t - s)/t (at s = 0: all
    of them), its value drawn in float64 from p(x_i | z_t, prompt) after classifier-free guidance
    on the log-probabilities. Revealed tokens never change. When a step reveals nothing the
    network output is reused (the input did not change and there is no time input).

    ``exact_counts=True`` (the "ddim" scheduler): each step reveals exactly round(n_masked *
    (t - s)/t) positions, chosen uniformly among the masked ones, instead of a binomial number: the
    same schedule in expectation without its count noise; token values are drawn as above.

    ``prompt_ids`` None = unconditional (the null prompt). ``infill`` = (ids [N, L], keep [N, L]):
    kept positions start revealed with the given ids and are never masked. ``top_p`` < 1: each
    revealed token is drawn from the nucleus of its (guided) distribution, the smallest set of
    most likely tokens holding ``top_p`` of the mass (1 = the exact reverse process).
    ``on_step(done, num_steps)`` is called after each step run (a progress hook; the loop ends
    early once nothing is masked).
    """
    device = model.device
    x = torch.full((num_samples, seq_len), model.mask_id, dtype=torch.long, device=device)
    if infill is not None:
        ids, keep = infill
        x = torch.where(keep.to(device), ids.to(device), x)
    unconditional = prompt_ids is None or guidance_scale == 0.0
    if prompt_ids is None:
        prompt_ids = torch.zeros((num_samples, 0), dtype=torch.long, device=device)
        prompt_mask = torch.zeros((num_samples, 0), dtype=torch.bool, device=device)
    if unconditional:
        prompt_mask = torch.zeros_like(prompt_mask, dtype=torch.bool)
    guided = not unconditional and guidance_scale != 1.0
    if guided:
        memory = model.encode_prompt_with_null(prompt_ids, prompt_mask)
    else:
        memory = model.encode_prompt(prompt_ids, prompt_mask)
    rows = num_samples

    def network() -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states (conditional, unconditional or None) for the current x."""
        if guided:
            return model.hidden_cond_uncond(x, memory=memory)
        return model.hidden_states(x, memory[0], memory[1]), None

    def log_probs(hidden: tuple[torch.Tensor, torch.Tensor | None], where: torch.Tensor) -> torch.Tensor:
        """float64 log-probabilities at the positions ``where`` only (the head is the big matmul)."""
        states, mask = memory
        cond = model.masked_log_probs(hidden[0], states[:rows], mask[:rows], prompt_ids, where)
        if guided:
            uncond = model.masked_log_probs(hidden[1], states[rows:], mask[rows:], prompt_ids, where)
            return guided_log_probs(cond, uncond, guidance_scale)
        return torch.log_softmax(cond.double(), dim=-1)

    times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    cached: tuple[torch.Tensor, torch.Tensor | None] | None = None
    for step in range(num_steps):
        still = x == model.mask_id
        if not bool(still.any()):
            break
        t, s = float(times[step]), float(times[step + 1])
        share = 1.0 if s <= 0.0 else (t - s) / t
        scores = uniform((num_samples, seq_len), generator, device)
        if exact_counts:
            count = (still.sum(dim=1).double() * share).round().long()
            rank = scores.masked_fill(~still, 2.0).argsort(dim=1).argsort(dim=1)
            reveal = still & (rank < count[:, None])
        else:
            reveal = still & (scores.double() < share)
        if bool(reveal.any()):
            if cached is None:
                cached = network()
            draws = uniform(int(reveal.sum()), generator, device).double()
            values = _sample_from(nucleus(log_probs(cached, reveal), top_p), draws)
            x = x.masked_scatter(reveal, values)
            cached = None  # the input changed: the next step needs a fresh network output
        if on_step is not None:
            on_step(step + 1, num_steps)
    return x
