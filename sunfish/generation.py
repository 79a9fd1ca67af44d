"""Autoregressive decoding with a KV cache and the usual sampling controls.

Works with any model that has ``forward(input_ids, cache=None) -> logits [B, T, V]``,
``init_cache()`` and ``config.max_seq_len`` (the staged LM). Order of operations on each step's
logits: repetition penalty (CTRL) -> greedy argmax when ``temperature == 0`` -> temperature ->
top-k -> top-p (nucleus) -> one draw from ``generator``. The filters take one row ``[V]`` or a
batch ``[B, V]`` (each row filtered on its own), so one sample and a batch of them share the code:
:func:`generate` is :func:`generate_many` with one row and draws exactly what it always drew.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["generate", "generate_many", "apply_repetition_penalty", "filter_top_k", "filter_top_p", "choose_token",
           "choose_tokens"]


def apply_repetition_penalty(logits: Tensor, previous_ids: Tensor, penalty: float) -> Tensor:
    """CTRL repetition penalty on ``logits [V]`` for every id in ``previous_ids [T]`` (or, row by
    row, on ``[B, V]`` with ``[B, T]``): positive logits are divided by ``penalty``, negative ones
    multiplied (both make the token less likely for ``penalty > 1``). Returns a new tensor."""
    if penalty == 1.0 or previous_ids.numel() == 0:
        return logits
    seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    seen.scatter_(-1, previous_ids.to(logits.device, torch.long), True)
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def filter_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Keep the ``top_k`` largest logits of each row (``0`` = all), set the rest to -inf."""
    if top_k <= 0 or top_k >= logits.size(-1):
        return logits
    threshold = torch.topk(logits, top_k).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def filter_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens of each row whose probability
    reaches ``top_p`` (the most likely token is always kept); ``1.0`` keeps all."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose_token(
    logits: Tensor,
    previous_ids: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """One next token from a logits vector ``[V]`` (see the module docstring for the order)."""
    return int(choose_tokens(logits[None], previous_ids[None], temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, generator=generator)[0])


def choose_tokens(
    logits: Tensor,
    previous_ids: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token of every row, ``[B]``, from ``logits [B, V]`` and each row's context
    ``previous_ids [B, T]`` (the penalty of a row sees only its own context).

    One multinomial draw per row from ``generator`` (on the generator's device: a CPU generator
    gives the same tokens whichever device the model is on).
    """
    logits = apply_repetition_penalty(logits.float(), previous_ids, repetition_penalty)
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    logits = filter_top_p(filter_top_k(logits / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


def generate(
    model: torch.nn.Module,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> list[int]:
    """Continue ``prompt_ids``; returns the NEW tokens only (not the prompt).

    - ``temperature=0`` is greedy. Sampling draws from ``generator`` (pass a seeded one for
      reproducible output; ``None`` uses torch's global RNG).
    - ``repetition_penalty`` (CTRL) applies to every id already in the context, prompt included.
    - Stops after ``max_new_tokens`` or when ``eos_id`` is produced (the eos is not returned).
    - An empty prompt starts from ``eos_id`` (or ``model.config.eos_id``): documents are joined with
      eos, so it is the natural start-of-text.
    - The context is cropped to the last ``model.config.max_seq_len`` tokens: when the cache is
      full it is rebuilt from the last ``max_seq_len`` tokens, so every step matches an uncached
      forward pass over that window exactly.
    The model is put in eval mode for the call and restored afterwards.
    """
    return generate_many(model, prompt_ids, num_samples=1, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, generator=generator,
                         eos_id=eos_id)[0]


@torch.no_grad()
def generate_many(
    model: torch.nn.Module,
    prompt_ids: list[int],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> list[list[int]]:
    """``num_samples`` continuations of one prompt in one KV-cached batch: the NEW tokens of each.

    Every option means what it means for :func:`generate`, row by row: the repetition penalty of
    a row sees its own context, and a row stops at its own eos (not returned) while the others go
    on; a stopped row is fed eos until the batch ends, and its later tokens are dropped. All rows
    draw from the one ``generator``, a token per row per step, so a seed fixes every row; row i is
    not the sample a one-row call seeded differently would give.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    max_len = int(model.config.max_seq_len)
    context = list(prompt_ids)
    if not context:
        start = eos_id if eos_id is not None else getattr(model.config, "eos_id", None)
        if start is None:
            raise ValueError("an empty prompt needs eos_id (the start-of-text token)")
        context = [int(start)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    new_tokens: list[list[int]] = [[] for _ in range(num_samples)]
    stopped = [False] * num_samples
    try:
        cache = model.init_cache()
        history = torch.tensor([context] * num_samples, device=device)  # [B, T]: every row's context
        logits = model(history[:, -max_len:], cache=cache)[:, -1]
        for step in range(max_new_tokens):
            tokens = choose_tokens(logits, history, temperature=temperature, top_k=top_k, top_p=top_p,
                                   repetition_penalty=repetition_penalty, generator=generator)
            for row, token in enumerate(tokens.tolist()):
                if stopped[row]:
                    continue
                if eos_id is not None and token == eos_id:
                    stopped[row] = True
                else:
                    new_tokens[row].append(token)
            if all(stopped):
                break
            if eos_id is not None:  # a stopped row goes on with eos: its tokens no longer matter
                tokens = tokens.masked_fill(torch.tensor(stopped, device=tokens.device), eos_id)
            history = torch.cat((history, tokens[:, None]), dim=1)
            if step == max_new_tokens - 1:
                break
            if cache.length + 1 > max_len:  # full: rebuild from the last max_len tokens
                cache = model.init_cache()
                logits = model(history[:, -max_len:], cache=cache)[:, -1]
            else:
                logits = model(tokens[:, None], cache=cache)[:, -1]
    finally:
        model.train(was_training)
    return new_tokens


@torch.no_grad()
def generate_batch(
    model,
    context: list[int],
    *,
    num_samples: int,
    max_new_tokens: int,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    counter: dict | None = None,
) -> Tensor:
    """``num_samples`` continuations of one ``context`` in one batch, ``[num_samples, max_new_tokens]``.

    The reference the diffusion sampler is compared with: the same rows per call, the same float64
    nucleus and inverse-CDF draw (``sunfish.diffusion.masked``), one KV-cached forward pass per
    token. ``counter["forward_rows"]`` grows by the rows of every call. No early stop at eos: the
    caller trims, as it does for diffusion samples.
    """
    from sunfish.diffusion.masked import _sample_from, nucleus, uniform

    if not context:
        raise ValueError("generate_batch needs a non-empty context (e.g. [eos_id])")
    if len(context) + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"{len(context)} context + {max_new_tokens} new tokens exceed max_seq_len="
                         f"{model.config.max_seq_len}")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        cache = model.init_cache()
        ids = torch.tensor([context] * num_samples, device=device)
        out = torch.empty((num_samples, max_new_tokens), dtype=torch.long, device=device)
        for i in range(max_new_tokens):
            if counter is not None:
                counter["forward_rows"] = counter.get("forward_rows", 0) + num_samples
            logits = model(ids, cache=cache)[:, -1].double()
            log_probs = nucleus(torch.log_softmax(logits, dim=-1), top_p)
            ids = _sample_from(log_probs, uniform(num_samples, generator, device).double())[:, None]
            out[:, i] = ids[:, 0]
    finally:
        model.train(was_training)
    return out.cpu()
