"""Sampling from any checkpoint: the one entry point behind `sunfish sample`.

The checkpoint says which kind of model it holds; autoregressive stages continue the prompt with a
KV cache, the diffusion model samples a sequence conditioned on the prompt with classifier-free
guidance (unconditional without a prompt).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MASK_MARKER = "[MASK]"


def clean_prompt(prompt: str | None, tokenizer, max_tokens: int) -> tuple[list[int] | None, str | None]:
    """Tokenise a user prompt; drop control characters, truncate with a warning; empty = none."""
    if prompt is None:
        return None, None
    text = "".join(ch for ch in prompt if ch in "\n\t" or ch.isprintable())
    if not text.strip():
        return None, None
    ids = tokenizer.encode(text)
    if len(ids) > max_tokens:
        log.warning("prompt is %d tokens; keeping the last %d", len(ids), max_tokens)
        ids = ids[-max_tokens:]
        text = tokenizer.decode(ids)
    return ids, text


def sample_from_checkpoint(
    checkpoint: str | Path,
    *,
    prompt: str | None = None,
    infill: str | None = None,
    max_new_tokens: int = 60,
    temperature: float = 0.8,
    top_k: int = 40,
    top_p: float = 0.95,
    repetition_penalty: float = 1.1,
    guidance_scale: float | None = None,
    num_samples: int = 1,
    seq_len: int | None = None,
    num_steps: int | None = None,
    scheduler: str | None = None,
    seed: int = 0,
    model_and_meta: tuple | None = None,
) -> list[dict[str, Any]]:
    import torch

    from sunfish.training.checkpoint import load_checkpoint, load_tokenizer_for

    if model_and_meta is None:
        model, meta, directory = load_checkpoint(checkpoint)
    else:
        model, meta, directory = model_and_meta
    tok = load_tokenizer_for(directory, meta)
    results = []
    if meta["kind"] == "staged":
        from sunfish.cli import UsageProblem
        from sunfish.generation import generate

        if infill is not None:
            raise UsageProblem("--infill needs a diffusion checkpoint; this one is an autoregressive stage")
        max_ctx = model.config.max_seq_len
        ids, text = clean_prompt(prompt, tok, max(1, max_ctx - 1))
        if ids is None:
            ids, text = [tok.eos_id], ""
        for i in range(num_samples):
            gen = torch.Generator().manual_seed(seed + i)
            start = time.perf_counter()
            new = generate(
                model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=repetition_penalty, generator=gen, eos_id=tok.eos_id,
            )
            continuation = tok.decode(new)
            results.append({
                "prompt": text, "text": (text or "") + continuation, "continuation": continuation,
                "tokens": len(new), "seconds": round(time.perf_counter() - start, 3), "model": meta.get("model_name"),
                "step": meta.get("step"),
            })
        return results

    from sunfish.diffusion.sample import sample as diffusion_sample

    w = guidance_scale if guidance_scale is not None else 7.0
    steps = num_steps or 50
    sched = scheduler or "ddim"
    eta = 1.0 if sched == "ddpm" else 0.0
    length = seq_len or min(64, model.config.max_seq_len)
    if length > model.config.max_seq_len:
        from sunfish.cli import UsageProblem

        raise UsageProblem(f"--seq-len {length} exceeds the model's max_seq_len {model.config.max_seq_len}")
    prompt_ids, text = clean_prompt(prompt, tok, model.config.max_prompt_tokens)
    infill_arg = None
    if infill is not None:
        infill_arg = _infill_ids(infill, tok, length)
    for i in range(num_samples):
        gen = torch.Generator().manual_seed(seed + i)
        start = time.perf_counter()
        out = diffusion_sample(
            model, [prompt_ids] if prompt_ids is not None else None, num_samples=1, seq_len=length,
            num_steps=min(steps, getattr(model.config, "timesteps", steps)), guidance_scale=w, scheduler=sched,
            eta=eta, generator=gen, infill=infill_arg,
        )
        ids = out[0].tolist()
        if tok.eos_id in ids and infill is None:
            ids = ids[: ids.index(tok.eos_id)]
        ids = [t for t in ids if t != tok.pad_id]
        results.append({
            "prompt": text, "guidance_scale": w, "text": tok.decode(ids), "tokens": len(ids),
            "seconds": round(time.perf_counter() - start, 3), "num_steps": steps, "scheduler": sched,
            "model": meta.get("model_name"), "step": meta.get("step"),
        })
    return results


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
