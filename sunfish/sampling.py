"""Sampling from any checkpoint: the one entry point behind `sunfish sample`.

The checkpoint says which kind of model it holds; autoregressive stages continue the prompt with a
KV cache, the diffusion model samples a sequence conditioned on the prompt with classifier-free
guidance (unconditional without a prompt). Settings the caller leaves open come from the checkpoint
itself: a diffusion checkpoint's generation_config.json, else the schema defaults of the same keys
(:mod:`sunfish.config.generation`), never from a params.yaml in the current directory. A
checkpoint that lives in MLflow is first downloaded by :mod:`sunfish.mlflow_checkpoints`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from sunfish.config import EvalConfig
from sunfish.errors import UsageProblem

log = logging.getLogger(__name__)

MASK_MARKER = "[MASK]"
AR_TOP_P = EvalConfig.model_fields["top_p"].default  # nucleus mass of the AR stages when none is given
# Rows one diffusion sampler call may hold (samples x sequence-guidance candidates): bounds the memory
# of `--num-samples 256 --candidates 64` while the defaults (k = 4) still draw up to 64 texts at once.
MAX_SAMPLER_ROWS = 256


def default_guidance(model, configured: str | None = None) -> str:
    """The guidance mode when none is asked for: ``configured`` (sampling.guidance: the checkpoint's, or
    params.yaml's in evaluate) where it applies.

    Sequence guidance scores samples with the masked ELBO, so a continuous model gets token guidance.
    """
    if getattr(model, "kind", None) == "block_diffusion":
        return "token"  # its prompt is a prefix: there is no prompt-information estimate to resample by
    masked = getattr(model.config, "objective", None) == "masked"
    if configured == "sequence" and not masked:
        return "token"
    return configured or ("sequence" if masked else "token")


def clean_prompt(
    prompt: str | None, tokenizer, max_tokens: int, keep: str = "last", diffusion: bool = False
) -> tuple[list[int] | None, str | None]:
    """Tokenise a user prompt; drop control characters, truncate with a warning; empty = none.

    ``keep`` says which end survives truncation: an autoregressive model continues the end of its
    context ("last"); the diffusion model's prompt encoder was trained on the first
    ``max_prompt_tokens`` of each prompt ("first"), so it must see the same part at sampling time.
    ``diffusion``: tokenise as the diffusion model's training prompts were (``encode_prompt``).
    """
    if prompt is None:
        return None, None
    text = "".join(ch for ch in prompt if ch in "\n\t" or ch.isprintable())
    if not text.strip():
        return None, None
    ids = tokenizer.encode_prompt(text) if diffusion else tokenizer.encode(text)
    if len(ids) > max_tokens:
        log.warning("prompt is %d tokens; keeping the %s %d", len(ids), keep, max_tokens)
        ids = ids[:max_tokens] if keep == "first" else ids[-max_tokens:]
        text = tokenizer.decode(ids).lstrip() if diffusion else tokenizer.decode(ids)
    return ids, text


def sample_from_checkpoint(
    checkpoint: str | Path,
    *,
    prompt: str | None = None,
    infill: str | None = None,
    max_new_tokens: int = 60,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float | None = None,
    repetition_penalty: float = 1.1,
    guidance_scale: float | None = None,
    num_samples: int = 1,
    seq_len: int | None = None,
    num_steps: int | None = None,
    scheduler: str | None = None,
    seed: int = 0,
    model_and_meta: tuple | None = None,
    guidance: str | None = None,
    candidates: int | None = None,
    device: str = "cpu",
    progress: bool | None = False,
) -> list[dict[str, Any]]:
    """Samples from a checkpoint; a diffusion setting left None is the checkpoint's own
    (generation_config.json, else the schema default: :func:`read_generation_config`).

    Either kind draws its ``num_samples`` as one batch from one generator seeded with ``seed``
    (autoregressive: KV-cached; diffusion: one sampler call, the prompt repeated to every row, in
    more than one call only past MAX_SAMPLER_ROWS rows): the same seed gives the same texts, but
    with more than one sample they are not those of earlier versions, which drew sample i alone
    with seed + i (one sample still is). Each record's ``seconds`` is its batch's time shared out.
    ``device``: where the model runs; the random numbers still come from CPU generators, so a seed
    draws the same numbers on any device (texts can differ only where the device's arithmetic does).
    ``progress``: a bar over the denoising steps on stderr (None: only when stderr is a terminal).
    """
    import torch

    from sunfish.training.checkpoint import load_checkpoint, load_tokenizer_for, read_generation_config

    if model_and_meta is None:
        model, meta, directory = load_checkpoint(checkpoint, device=device)
    else:
        model, meta, directory = model_and_meta
    tok = load_tokenizer_for(directory, meta)
    results = []
    if meta["kind"] == "staged":
        from sunfish.generation import generate_many

        if infill is not None:
            raise UsageProblem("--infill needs a diffusion checkpoint; this one is an autoregressive stage")
        max_ctx = model.config.max_seq_len
        ids, text = clean_prompt(prompt, tok, max(1, max_ctx - 1))
        if ids is None:
            ids, text = [tok.eos_id], ""
        start = time.perf_counter()
        rows = generate_many(
            model, ids, num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=AR_TOP_P if top_p is None else top_p, repetition_penalty=repetition_penalty,
            generator=torch.Generator().manual_seed(seed), eos_id=tok.eos_id,
        )
        share = round((time.perf_counter() - start) / num_samples, 3)  # one batch: its time shared out
        for new in rows:
            continuation = tok.decode(new)
            results.append({
                "prompt": text, "text": (text or "") + continuation, "continuation": continuation,
                "tokens": len(new), "seconds": share, "model": meta.get("model_name"), "step": meta.get("step"),
            })
        return results

    from sunfish.diffusion.sample import sample as diffusion_sample

    own = read_generation_config(directory)  # the checkpoint's sampling defaults
    w = guidance_scale if guidance_scale is not None else own.guidance_scale
    steps = num_steps or own.num_steps
    sched = scheduler or own.scheduler
    eta = 1.0 if sched == "ddpm" else own.eta
    mode = guidance or default_guidance(model, own.guidance)
    if mode == "sequence" and model.config.objective != "masked":
        raise UsageProblem("--guidance sequence needs a masked-objective checkpoint (it scores samples with the "
                           f"masked ELBO); {checkpoint} holds a {model.config.objective!r} model: use --guidance token")
    length = seq_len or min(own.seq_len, model.config.max_seq_len)
    if length > model.config.max_seq_len:
        raise UsageProblem(f"--seq-len {length} exceeds the model's max_seq_len {model.config.max_seq_len}")
    prompt_ids, text = clean_prompt(prompt, tok, model.config.max_prompt_tokens, keep="first", diffusion=True)
    infill_arg = None
    if infill is not None:
        infill_arg = _infill_ids(infill, tok, length)
    run_steps = min(steps, getattr(model.config, "timesteps", steps))
    k = candidates or own.guidance_candidates
    # Sequence guidance draws k candidates per sample, so a batch holds num_samples * k sampler rows;
    # the texts are drawn in as few batches as keep that under MAX_SAMPLER_ROWS (one, short of extremes).
    per_batch = max(1, MAX_SAMPLER_ROWS // (k if mode == "sequence" else 1))
    sizes = [min(per_batch, num_samples - i) for i in range(0, num_samples, per_batch)]
    gen = torch.Generator().manual_seed(seed)  # one generator for every batch: the same seed, the same texts
    bar = _StepBar(progress, len(sizes), run_steps)
    try:
        for b, size in enumerate(sizes):
            start = time.perf_counter()
            out = diffusion_sample(
                model, [prompt_ids] if prompt_ids is not None else None, num_samples=size, seq_len=length,
                num_steps=run_steps, guidance_scale=w, scheduler=sched, eta=eta, generator=gen, infill=infill_arg,
                top_p=own.top_p if top_p is None else top_p, guidance=mode, candidates=k, on_step=bar.step_of(b),
            )
            bar.finish(b)
            share = round((time.perf_counter() - start) / size, 3)  # one batch: its time shared out
            for row in out.tolist():
                if tok.eos_id in row and infill is None:
                    row = row[: row.index(tok.eos_id)]
                ids = [t for t in row if t != tok.pad_id]
                results.append({
                    "prompt": text, "guidance_scale": w, "guidance": mode, "text": tok.decode(ids), "tokens": len(ids),
                    "seconds": share, "num_steps": steps, "scheduler": sched,
                    "model": meta.get("model_name"), "step": meta.get("step"),
                })
    finally:
        bar.close()
    return results


class _StepBar:
    """A tqdm bar on stderr over the denoising steps of all batches (stdout may be --format json).

    ``enabled``: True always, False never, None only when stderr is a terminal. A sampler says how
    many steps it runs in its first call of ``on_step(done, total)`` (block diffusion spreads the
    steps over blocks); a batch that finishes early (nothing left to reveal) jumps to its end.
    """

    def __init__(self, enabled: bool | None, batches: int, steps: int):
        self.batches, self.per_batch, self.bar = batches, steps, None
        if enabled is not False:
            from tqdm import tqdm

            self.bar = tqdm(total=batches * steps, desc="denoising", unit="step", file=sys.stderr,
                            disable=None if enabled is None else False, leave=False, dynamic_ncols=True)

    def _move_to(self, position: int) -> None:
        if self.bar is not None and position > self.bar.n:
            self.bar.update(position - self.bar.n)

    def step_of(self, batch: int):
        if self.bar is None:
            return None

        def on_step(done: int, total: int) -> None:
            if total != self.per_batch:
                self.per_batch = total
                self.bar.total = self.batches * total
                self.bar.refresh()
            self._move_to(batch * total + done)

        return on_step

    def finish(self, batch: int) -> None:
        self._move_to((batch + 1) * self.per_batch)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _infill_ids(text: str, tok, length: int):
    """Token ids with a keep-mask: [MASK] spans become free positions, the rest is kept."""
    import torch

    pieces = text.split(MASK_MARKER)
    ids: list[int] = []
    keep: list[bool] = []
    span = max(4, (length - len(tok.encode(text.replace(MASK_MARKER, "")))) // max(1, len(pieces) - 1))
    for i, piece in enumerate(pieces):
        if piece:
            enc = tok.encode(piece)
            ids += enc
            keep += [True] * len(enc)
        if i < len(pieces) - 1:
            ids += [tok.pad_id] * span
            keep += [False] * span
    ids, keep = ids[:length], keep[:length]
    while len(ids) < length:
        ids.append(tok.eos_id)
        keep.append(True)
    return torch.tensor([ids]), torch.tensor([keep])
