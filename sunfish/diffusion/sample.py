"""One entry point to sample text from a diffusion model, whatever its architecture and objective."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sunfish.diffusion import continuous, masked


def _prompt_rows(prompt_ids: list[list[int]], num_samples: int) -> list[list[int]]:
    if len(prompt_ids) == num_samples:
        return [list(p) for p in prompt_ids]
    if len(prompt_ids) == 0 or num_samples % len(prompt_ids):
        raise ValueError(
            f"{len(prompt_ids)} prompts for {num_samples} samples: give one prompt, one per sample, "
            "or a number of prompts that divides num_samples"
        )
    repeat = num_samples // len(prompt_ids)
    return [list(p) for p in prompt_ids for _ in range(repeat)]


@torch.no_grad()
def sample(
    model,
    prompt_ids: list[list[int]] | None,
    *,
    num_samples: int,
    seq_len: int,
    num_steps: int,
    guidance_scale: float,
    scheduler: str = "ddim",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    infill: tuple[torch.Tensor, torch.Tensor] | None = None,
    clamp: bool = False,
    top_p: float = 1.0,
    guidance: str = "token",
    candidates: int = 4,
    parallel_confidence: float | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Draw ``num_samples`` texts of ``seq_len`` tokens -> LongTensor [num_samples, seq_len] (CPU).

    prompt_ids: token ids in the prompt encoder's vocabulary (our tokenizer's for the own encoder;
        GPT-2's for a GPT-2 encoder: see ``model.tokenize_prompts``). One list per sample, a single
        list for all samples, or k lists each repeated num_samples/k times in a row. An empty list
        is the null prompt for that row; ``None`` samples unconditionally.
    guidance_scale: classifier-free guidance w (0 unconditional, 1 conditional, > 1 guided). With
        w = 0 or 1 only one branch is run; otherwise both in one batched forward pass.
    scheduler, eta: for the continuous objective "ddim" (eta 0 = deterministic, 1 = ancestral)
        or "ddpm" (posterior sampling). For the masked objective both are ancestral samplers of
        the same reverse process (token values always drawn from the model in float64):
        "ddpm" reveals each masked position with probability (t - s)/t per step (MDLM); "ddim"
        reveals exactly round(n_masked (t - s)/t) uniformly chosen positions per step, the same
        schedule in expectation without the binomial count noise: the masked analogue of DDIM's
        removal of sampling noise that does not change the marginals. We chose this over a
        confidence-ordered ("most certain first") variant because that one changes the
        distribution and makes small models repeat themselves. ``eta`` is ignored there.
    generator: a torch.Generator (CPU recommended) for every random draw: same seed, same samples.
    infill: (ids LongTensor [num_samples or 1, seq_len], keep BoolTensor [same]): kept positions are
        fixed to the given ids; only the others are sampled.
    clamp: continuous objective only: snap x0_hat to the nearest token embedding at every step.
    parallel_confidence: block diffusion only: a step also reveals the next masked tokens of the
        block, left to right, while each drawn token has at least this probability (None: one
        scheduled reveal at a time; see :func:`sunfish.diffusion.block.sample`).
    top_p: masked objective only: nucleus sampling of each revealed token (1 = exact; params
        sampling.top_p, 0.8 by default, is what evaluate and the CLI use).
    guidance: "token" (CFG on every position's prediction, the formula above) or "sequence"
        (block diffusion or the masked objective: ``candidates`` conditional samples per prompt, one resampled by
        exp((w - 1) log p(x|c)/p(x)); see :mod:`sunfish.diffusion.sequence_guidance`). Both are
        the unconditional model at w = 0 and the conditional one at w = 1.
    on_step: a progress hook, ``on_step(done, total)`` after each denoising step the sampler runs
        (``total``: its step count: block diffusion counts blocks x steps per block, the
        continuous sampler distinct timesteps). Sequence guidance reports the drawing of its
        candidates, not their scoring. Keeps the samplers free of any display.

    Samples are full-length; the caller trims each at the first eos (``model.config.eos_id``).
    """
    if seq_len < 1 or seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} must be in 1..max_seq_len={model.config.max_seq_len}")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale={guidance_scale} must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if guidance not in ("token", "sequence"):
        raise ValueError(f"guidance={guidance!r} must be 'token' or 'sequence'")
    if candidates < 1:
        raise ValueError(f"candidates={candidates} must be >= 1")
    was_training = model.training
    model.eval()
    try:
        ids = mask = None
        if prompt_ids is not None:
            ids, mask = model.pad_prompt_ids(_prompt_rows(prompt_ids, num_samples))
        if infill is not None:
            kept_ids, keep = infill
            kept_ids = torch.as_tensor(kept_ids, dtype=torch.long).expand(num_samples, seq_len)
            keep = torch.as_tensor(keep, dtype=torch.bool).expand(num_samples, seq_len)
            infill = (kept_ids, keep)
        common = dict(
            num_samples=num_samples,
            seq_len=seq_len,
            num_steps=num_steps,
            guidance_scale=float(guidance_scale),
            generator=generator,
            infill=infill,
            on_step=on_step,
        )
        by_sequence = (guidance == "sequence" and prompt_ids is not None
                       and float(guidance_scale) not in (0.0, 1.0))
        if getattr(model, "kind", None) == "block_diffusion" and not by_sequence:
            from sunfish.diffusion import block

            return block.sample(model, ids, mask, exact_counts=scheduler == "ddim", top_p=top_p,
                                parallel_confidence=parallel_confidence, **common).cpu()
        if by_sequence and parallel_confidence is not None:
            raise ValueError("parallel_confidence is not available with guidance='sequence'")
        if parallel_confidence is not None:
            raise ValueError("parallel_confidence is for a block diffusion model (cfg.architecture: block)")
        if by_sequence and model.config.objective != "masked":
            raise ValueError("guidance='sequence' needs the masked objective (it scores samples with the "
                             "masked ELBO); use guidance='token' for the continuous one")
        if by_sequence:
            from sunfish.diffusion.sequence_guidance import draw_candidates, resample

            drawn, log_ratio = draw_candidates(
                model, ids, mask, candidates=candidates, seq_len=seq_len, num_steps=num_steps,
                exact_counts=scheduler == "ddim", top_p=top_p, generator=generator, infill=infill,
                on_step=on_step,
            )
            out = resample(drawn, log_ratio, guidance_scale, generator)
        elif model.config.objective == "masked":
            out = masked.sample(model, ids, mask, exact_counts=scheduler == "ddim", top_p=top_p, **common)
        else:
            out = continuous.sample(model, ids, mask, scheduler=scheduler, eta=eta, clamp=clamp, **common)
    finally:
        model.train(was_training)
    return out.cpu()
