"""Likelihood metrics: token-weighted loss, perplexity and bits per byte.

Every figure is pooled over tokens: the summed negative log-likelihood of all batches divided by
the number of scored tokens. A mean of per-batch means would over-weight short (padded) batches.

    loss = sum(nats) / sum(tokens)          nats per token
    ppl  = exp(loss)
    bpb  = loss / ln 2 / bytes_per_token    bits per UTF-8 byte of the original text

Bits per byte makes models with different tokenizers comparable; ``bytes_per_token`` is the
split's ``bytes / tokens`` from ``meta.json`` (sunfish.data).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["score_batches", "perplexity", "bits_per_byte", "pool", "split_halves"]

LN2 = math.log(2.0)


def perplexity(total_nats: float, tokens: int) -> float:
    """exp(total_nats / tokens); ``inf`` when the exponent overflows."""
    if tokens <= 0:
        raise ValueError(f"perplexity needs at least one token, got tokens={tokens}")
    loss = float(total_nats) / tokens
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def bits_per_byte(total_nats: float, n_bytes: int | float) -> float:
    """Summed NLL in nats converted to bits, divided by the bytes of text it covers."""
    if n_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive byte count, got n_bytes={n_bytes}")
    return float(total_nats) / LN2 / float(n_bytes)


def score_batches(
    model: Any,
    batches: Iterable[dict],
    *,
    bytes_per_token: float,
    generator: Any = None,
    max_tokens: int | None = None,
) -> dict[str, float | int]:
    """Score ``batches`` with ``model.nll(batch, generator)`` and pool the result over tokens.

    ``model.nll`` returns ``(total_nats, n_tokens)`` (a scalar tensor or float, an int or 0-d
    tensor). The model is put in eval mode under ``torch.no_grad`` and its previous training mode
    is restored afterwards. ``max_tokens`` stops after the first batch that brings the scored
    total to at least that many tokens (``eval.max_eval_tokens``); None scores every batch.

    Returns ``{"loss": nats/token, "ppl": exp(loss), "bpb": bits/byte, "tokens": n, "batches": k,
    "parts": [(nats, tokens) per scored batch]}``; ``pool`` turns any subset of parts into figures.
    A diverged model gives NaN/inf figures rather than an exception (the report shows them).
    Raises ValueError when no token was scored.
    """
    import torch  # local import: the package's light modules must not need torch

    if not bytes_per_token or bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token}")
    was_training = bool(getattr(model, "training", False))
    total_nats = 0.0
    total_tokens = 0
    n_batches = 0
    parts: list[tuple[float, int]] = []
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                nats, n = model.nll(batch, generator)
                n = int(n)
                if n <= 0:
                    continue
                total_nats += float(nats)
                total_tokens += n
                parts.append((float(nats), n))
                n_batches += 1
                if max_tokens is not None and total_tokens >= max_tokens:
                    break
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)
    if total_tokens == 0:
        raise ValueError("no tokens were scored: the batches were empty or fully padded")
    return {**pool(parts, bytes_per_token), "parts": parts}


def pool(parts: list[tuple[float, int]], bytes_per_token: float) -> dict[str, float | int]:
    """Token-weighted figures of some scored batches: {"loss", "ppl", "bpb", "tokens", "batches"}."""
    total_nats = sum(n for n, _ in parts)
    total_tokens = sum(t for _, t in parts)
    if total_tokens <= 0:
        raise ValueError("no tokens were scored: the batches were empty or fully padded")
    loss = total_nats / total_tokens
    return {
        "loss": loss,
        "ppl": perplexity(total_nats, total_tokens),
        "bpb": loss / LN2 / float(bytes_per_token),
        "tokens": total_tokens,
        "batches": len(parts),
    }


def split_halves(parts: list[tuple[float, int]]) -> tuple[list, list]:
    """(dev, test): the first half of the scored batches chooses, the second half is reported.

    The batches walk the split in order, so the halves are disjoint stretches of held-out text.
    With a single batch there is nothing to halve and both are that batch (the caller says so).
    """
    if len(parts) < 2:
        return list(parts), list(parts)
    half = len(parts) // 2
    return list(parts[:half]), list(parts[half:])
