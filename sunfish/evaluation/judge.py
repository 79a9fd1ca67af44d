"""Judge perplexity: how predictable a model's samples are to the best autoregressive checkpoint.

The original users ticked "coherent sentences" by reading samples. Here the samples of every
model are scored by one fixed judge, the best autoregressive checkpoint of the run (JUDGE_RULE):
fluent text in the corpus's style is predictable to it, word salad is not. The judge is chosen
after every model is evaluated, and the same judge scores every model, so the figures compare
across models and milestones of one run (not across runs with different judges: the report and
milestones.json name the judge).

Caveats, stated where the figures are shown: a judge tends to find its own samples easy (the
judge model's figures are flattering), and a sample that loops on one phrase is also predictable,
which is why the checklist keeps the repetition rate and distinct-2 beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["JUDGE_RULE", "choose_judge", "judge_perplexity"]

JUDGE_RULE = (
    "the autoregressive model (a stage or a control) whose best checkpoint has the lowest validation "
    "bits per byte; ties go to the model listed first"
)


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def choose_judge(models: Mapping[str, Mapping], candidates: Sequence[str]) -> dict | None:
    """The judge by JUDGE_RULE among ``candidates`` (model names, in priority order).

    ``models`` maps a name to its evaluated summary ({"milestones": [...], "best": {"step"}}).
    Returns {"model", "step", "checkpoint", "val_bpb", "val_ppl", "rule"} or None when no
    candidate has a finite validation figure.
    """
    best: dict | None = None
    for name in candidates:
        summary = models.get(name)
        if not isinstance(summary, Mapping):
            continue
        ms = [m for m in summary.get("milestones") or [] if isinstance(m, Mapping)]
        step = (summary.get("best") or {}).get("step")
        chosen = next((m for m in ms if m.get("step") == step), ms[-1] if ms else None)
        bpb = _finite(chosen.get("val_bpb")) if chosen else None
        if bpb is None:
            continue
        if best is None or bpb < best["val_bpb"]:
            best = {"model": name, "step": chosen.get("step"), "checkpoint": chosen.get("checkpoint"),
                    "val_bpb": bpb, "val_ppl": _finite(chosen.get("val_ppl")), "rule": JUDGE_RULE}
    return best


def judge_perplexity(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16) -> dict:
    """Token-weighted perplexity of each ``text`` given its ``context`` under ``model``.

    ``pairs`` are (context, text): for autoregressive samples the prompt and the continuation,
    for diffusion samples an empty context and the sample. Every sequence starts with the end of
    text token (a document boundary, as in training). Only the text's tokens are scored; a text
    longer than the judge's window is scored on its first window. Returns {"ppl", "loss", "tokens",
    "samples"}; ppl and loss are None when no token was scored (empty samples).
    """
    import torch

    max_len = int(model.config.max_seq_len)
    rows: list[tuple[list[int], list[int]]] = []
    for context, text in pairs:
        text_ids = tok.encode(text or "")
        if not text_ids:
            continue
        ctx_ids = [tok.eos_id] + (tok.encode(context) if context else [])
        text_ids = text_ids[:max_len]
        ctx_ids = ctx_ids[-(max_len + 1 - len(text_ids)):] if len(ctx_ids) + len(text_ids) > max_len + 1 else ctx_ids
        ids = ctx_ids + text_ids
        targets = [-100] * (len(ctx_ids) - 1) + text_ids
        rows.append((ids[:-1], targets))
    total_nats, total_tokens = 0.0, 0
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                chunk = rows[i : i + batch_size]
                width = max(len(ids) for ids, _ in chunk)
                input_ids = torch.full((len(chunk), width), tok.pad_id, dtype=torch.long)
                targets = torch.full((len(chunk), width), -100, dtype=torch.long)
                for r, (ids, tgt) in enumerate(chunk):
                    input_ids[r, : len(ids)] = torch.tensor(ids)
                    targets[r, : len(tgt)] = torch.tensor(tgt)
                nats, n = model.nll({"input_ids": input_ids, "targets": targets})
                total_nats += float(nats)
                total_tokens += int(n)
    finally:
        if was_training:
            model.train(True)
    if total_tokens == 0:
        return {"ppl": None, "loss": None, "tokens": 0, "samples": len(rows)}
    loss = total_nats / total_tokens
    return {"ppl": math.exp(min(loss, 700.0)), "loss": loss, "tokens": total_tokens, "samples": len(rows)}
