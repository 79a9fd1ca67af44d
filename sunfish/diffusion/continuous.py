"""Continuous (Gaussian) diffusion in the space of normalised token embeddings.

e(x) = sqrt(d) * E[x] / |E[x]|: every token sits on the sphere of radius sqrt(d), so the model
cannot win by shrinking the embeddings (the original's collapse).

Forward: z_t = sqrt(abar_t) e(x) + sqrt(1 - abar_t) noise, t in 1..T (T = ``timesteps``), with
the ``sqrt`` schedule (Diffusion-LM: abar(t) = 1 - sqrt(t/T + 1e-4)) or ``cosine`` (Nichol &
Dhariwal); the betas are derived from consecutive ratios of abar and clipped at 0.999.

Network output: x0_hat (not the noise). Training loss per real token = MSE(x0_hat, e(x)) (mean
over dimensions) + rounding cross-entropy (x0_hat against the unit-norm embedding matrix, the
tied "rounding head", vs the true token), averaged over real tokens. Optional self-conditioning:
in half of the batches a first pass (no gradient) estimates x0, which the second pass reads.

``elbo``: the discrete-time variational bound on -log p(x) in nats,
KL(q(z_T|x) || N(0, I)) + sum_{t=2..T} KL(q(z_{t-1}|z_t, x) || p(z_{t-1}|z_t)) - log p(x | z_1),
with the sum estimated by (T - 1) times one stratified t per sequence and p(x | z_1) the
rounding head's softmax at t = 1. An upper bound, usually much looser than the masked one.

Sampling: DDIM (``eta``; 0 deterministic, 1 = DDPM ancestral) or DDPM posterior steps on a
``num_steps``-long subsequence of 1..T, CFG on x0_hat, optional clamping of x0_hat to the nearest
token embedding, and the final x0 decoded by the rounding head (argmax).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sunfish.diffusion.guidance import combine
from sunfish.diffusion.masked import stratified_times

MAX_BETA = 0.999


@functools.lru_cache(maxsize=16)
def _alpha_bars(timesteps: int, kind: str) -> torch.Tensor:
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    if kind == "sqrt":
        f = 1.0 - torch.sqrt(steps + 1e-4)
    elif kind == "cosine":
        s = 0.008
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    else:
        raise ValueError(f"unknown noise schedule {kind!r}; use sqrt or cosine")
    betas = (1.0 - f[1:] / f[:-1]).clamp(0.0, MAX_BETA)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, dim=0)])


def alpha_bars(timesteps: int, kind: str) -> torch.Tensor:
    """abar_t for t = 0..T as float64 [T + 1]; abar_0 = 1 (the clean embedding)."""
    return _alpha_bars(int(timesteps), str(kind)).clone()


def normal(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=where).to(device)


def _stratified_steps(batch: int, low: int, high: int, device, generator=None) -> torch.Tensor:
    """One integer t per row in low..high, stratified across the batch."""
    u = stratified_times(batch, device, generator)
    return (low + (u * (high - low + 1)).floor().long()).clamp(low, high)


def _q_sample(e: torch.Tensor, ab: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    a = ab[t].to(e.dtype)[:, None, None]
    return a.sqrt() * e + (1.0 - a).sqrt() * noise


def training_loss(model, batch: dict, memory: torch.Tensor, memory_mask: torch.Tensor):
    cfg = model.config
    ids = batch["text_ids"]
    text_mask = batch["text_mask"].bool()
    batch_size = ids.shape[0]
    ab = alpha_bars(cfg.timesteps, cfg.noise_schedule).to(ids.device)
    t = _stratified_steps(batch_size, 1, cfg.timesteps, ids.device)
    e = model.embed_clean(ids)
    z = _q_sample(e, ab, t, torch.randn_like(e))
    self_condition = None
    if cfg.self_conditioning and float(torch.rand(())) < 0.5:
        with torch.no_grad():
            first = model.hidden_states(z, memory, memory_mask, text_mask, t, None)
            self_condition = model.x0_head(first).detach()
    hidden = model.hidden_states(z, memory, memory_mask, text_mask, t, self_condition)
    x0 = model.x0_head(hidden).float()
    real = text_mask
    mse = ((x0 - e) ** 2).mean(dim=-1)[real].mean()
    logits = model.rounding_logits(x0[real])
    ce = F.cross_entropy(logits, ids[real])
    loss = mse + ce
    metrics = {
        "mse": float(mse.detach()),
        "rounding_ce": float(ce.detach()),
        "rounding_accuracy": float((logits.argmax(-1) == ids[real]).float().mean()),
    }
    return loss, metrics


def elbo(model, batch: dict, memory: torch.Tensor, memory_mask: torch.Tensor, generator=None) -> torch.Tensor:
    """Upper bound on the NLL in nats summed over the batch's real text tokens (one draw)."""
    cfg = model.config
    T = cfg.timesteps
    ids = batch["text_ids"]
    text_mask = batch["text_mask"].bool()
    batch_size = ids.shape[0]
    device = ids.device
    ab = alpha_bars(T, cfg.noise_schedule).to(device)
    e = model.embed_clean(ids)

    # prior: KL(N(sqrt(abar_T) e, 1 - abar_T) || N(0, 1)), summed over dimensions
    a_T = ab[T]
    dims = e.shape[-1]
    prior = 0.5 * (dims * (1 - a_T) + a_T * (e.double() ** 2).sum(-1) - dims - dims * torch.log1p(-a_T))

    # decoder: -log p(x | z_1)
    ones = torch.ones(batch_size, dtype=torch.long, device=device)
    z1 = _q_sample(e, ab, ones, normal(e.shape, generator, device))
    x0 = model.x0_head(model.hidden_states(z1, memory, memory_mask, text_mask, ones)).float()
    decoder = F.cross_entropy(
        model.rounding_logits(x0).flatten(0, 1), ids.flatten(), reduction="none"
    ).view_as(ids).double()

    # diffusion: (T - 1) * KL at one stratified t in 2..T
    diffusion = torch.zeros_like(decoder)
    if T >= 2:
        t = _stratified_steps(batch_size, 2, T, device, generator)
        zt = _q_sample(e, ab, t, normal(e.shape, generator, device))
        x0 = model.x0_head(model.hidden_states(zt, memory, memory_mask, text_mask, t)).float()
        a_t, a_prev = ab[t], ab[t - 1]
        beta = 1.0 - a_t / a_prev
        weight = a_prev * beta / (2.0 * (1.0 - a_t) * (1.0 - a_prev))  # coef^2 / (2 posterior variance)
        kl = weight[:, None] * ((x0 - e) ** 2).sum(-1).double()
        diffusion = (T - 1) * kl
    total = prior + decoder + diffusion
    return total[text_mask].sum()


def ddim_step(
    z: torch.Tensor, x0: torch.Tensor, a_t: float, a_s: float, eta: float, noise: torch.Tensor | None
) -> torch.Tensor:
    """One DDIM step from t to s < t (abar values a_t, a_s); ``noise`` is needed when eta > 0."""
    eps = (z - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    sigma = eta * math.sqrt((1 - a_s) / (1 - a_t)) * math.sqrt(1 - a_t / a_s)
    out = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma**2, 0.0)) * eps
    return out + sigma * noise if sigma > 0 else out


def ddpm_step(z: torch.Tensor, x0: torch.Tensor, a_t: float, a_s: float, noise: torch.Tensor) -> torch.Tensor:
    """One draw from the Gaussian posterior q(z_s | z_t, x0) for s < t (strided DDPM)."""
    beta = 1.0 - a_t / a_s
    mean = (math.sqrt(a_s) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t)) * z
    return mean + math.sqrt((1 - a_s) / (1 - a_t) * beta) * noise


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
    scheduler: str = "ddim",
    eta: float = 0.0,
    clamp: bool = False,
    generator: torch.Generator | None = None,
    infill: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Reverse diffusion over ``num_steps`` timesteps evenly spread over T..1, then rounding.

    ``scheduler="ddim"``: z_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps_hat + sigma noise,
    sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s). ``"ddpm"``: a draw from
    the posterior q(z_s | z_t, x0_hat) (equal to DDIM with eta = 1; ``eta`` is ignored).
    Infilling replaces x0_hat at the kept positions by their clean embeddings at every step
    (so z_s there follows q(z_s | e(kept))) and returns the kept ids unchanged.
    ``on_step(done, total)`` is called after each network step (a progress hook); ``total`` is the
    number of distinct timesteps, ``num_steps`` unless rounding to whole timesteps merged some.
    """
    cfg = model.config
    T = cfg.timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps={num_steps} must be in 1..timesteps={T}")
    if scheduler not in ("ddim", "ddpm"):
        raise ValueError(f"scheduler {scheduler!r}: use ddim or ddpm")
    device = model.device
    ab = alpha_bars(T, cfg.noise_schedule).to(device)
    steps = torch.linspace(T, 1, num_steps, dtype=torch.float64).round().long().unique_consecutive().tolist()

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

    keep = kept_embeddings = None
    if infill is not None:
        kept_ids, keep = infill[0].to(device), infill[1].to(device).bool()
        kept_embeddings = model.embed_clean(kept_ids)

    z = normal((num_samples, seq_len, cfg.d_model), generator, device)
    x0_previous = torch.zeros_like(z) if cfg.self_conditioning else None
    x0 = z
    for i, t in enumerate(steps):
        s = steps[i + 1] if i + 1 < len(steps) else 0
        timesteps = torch.full((num_samples,), t, dtype=torch.long, device=device)
        if guided:
            cond, uncond = model.predict_cond_uncond(
                z, timesteps=timesteps, self_condition=x0_previous, memory=memory
            )
            x0 = combine(cond.float(), uncond.float(), guidance_scale)
        else:
            hidden = model.hidden_states(z, memory[0], memory[1], None, timesteps, x0_previous)
            x0 = model.x0_head(hidden).float()
        if clamp:
            x0 = model.embed_clean(model.rounding_logits(x0).argmax(-1))
        if keep is not None:
            x0 = torch.where(keep[..., None], kept_embeddings, x0)
        if x0_previous is not None:
            x0_previous = x0
        if on_step is not None:
            on_step(i + 1, len(steps))
        if s == 0:
            break
        a_t, a_s = ab[t].item(), ab[s].item()
        if scheduler == "ddpm":
            z = ddpm_step(z, x0, a_t, a_s, normal(z.shape, generator, device))
        else:
            noise = normal(z.shape, generator, device) if eta > 0 else None
            z = ddim_step(z, x0, a_t, a_s, eta, noise)
    tokens = model.rounding_logits(x0).argmax(-1)
    if keep is not None:
        tokens = torch.where(keep, kept_ids, tokens)
    return tokens


@torch.no_grad()
def embedding_health(
    model, generator: torch.Generator | None = None, max_tokens: int = 1024
) -> dict[str, float]:
    """Mean pairwise cosine between token embeddings (collapse -> 1); for the continuous objective
    also the rounding accuracy at the smallest noise level: e(x) noised to t = 1, read back by the
    rounding head (nearest unit embedding), compared with x."""
    cfg = model.config
    unit = model.unit_embeddings()
    vocab = unit.shape[0]
    where = generator.device if generator is not None else torch.device("cpu")
    idx = torch.randperm(vocab, generator=generator, device=where)[: min(vocab, max_tokens)].to(unit.device)
    rows = unit[idx]
    cos = rows @ rows.t()
    n = rows.shape[0]
    mean_cos = float((cos.sum() - cos.diagonal().sum()) / max(n * (n - 1), 1))
    out = {"embedding_mean_cosine": mean_cos}
    if cfg.objective == "continuous":
        ab = alpha_bars(cfg.timesteps, cfg.noise_schedule)
        a1 = float(ab[1])
        noise = normal(rows.shape, generator, rows.device)
        z = math.sqrt(a1) * math.sqrt(cfg.d_model) * rows + math.sqrt(1 - a1) * noise
        out["rounding_accuracy_t1"] = float(((z @ unit.t()).argmax(-1) == idx).float().mean())
    return out
