"""`sunfish eval-text`: score any text file with any checkpoint, so users measure on their own text.

Autoregressive checkpoints give the exact negative log-likelihood; the diffusion model gives its
ELBO, an upper bound. Bits per byte divide by the file's UTF-8 bytes, so figures compare across
tokenizers and with the pipeline's validation numbers.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def score_files(checkpoint: str | Path, files: list[Path], *, seq_len: int | None = None, seed: int = 0,
                device: str = "cpu") -> dict:
    import numpy as np
    import torch

    from sunfish.data.dataset import PairDataset, TokenStream, write_tokens
    from sunfish.training.checkpoint import load_checkpoint, load_tokenizer_for

    model, meta, directory = load_checkpoint(checkpoint, device=device)
    tok = load_tokenizer_for(directory, meta)
    length = min(seq_len or model.config.max_seq_len, model.config.max_seq_len)
    results = {"checkpoint": str(directory), "kind": meta["kind"], "step": meta.get("step"),
               "bound": "exact" if meta["kind"] == "staged" else "elbo_upper_bound", "files": []}
    total_nats = total_tokens = total_bytes = 0
    gen = torch.Generator().manual_seed(seed)
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such text file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise FileNotFoundError(f"{path}: not UTF-8 text ({exc})") from None
        if not text.strip():
            raise FileNotFoundError(f"{path}: the file is empty")
        n_bytes = len(text.encode("utf-8"))
        ids = [tok.eos_id] + tok.encode(text)
        nats = 0.0
        count = 0
        with torch.no_grad():
            if meta["kind"] == "staged":
                with tempfile.TemporaryDirectory() as tmp:
                    write_tokens(Path(tmp) / "text.bin", np.asarray(ids))
                    batches = list(TokenStream(Path(tmp) / "text.bin").eval_batches(length, 8))
                for batch in batches:
                    n, c = model.nll(_on(batch, device), generator=gen)
                    nats += float(n)
                    count += int(c)
            else:
                pairs = PairDataset([{"prompt": "", "text": text, "target": []}], tok, length,
                                    model.config.max_prompt_tokens)
                for batch in pairs.eval_batches(8):
                    n, c = model.nll(_on(batch, device), generator=gen)
                    nats += float(n)
                    count += int(c)
        total_nats += nats
        total_tokens += count
        total_bytes += n_bytes
        results["files"].append(_figures(str(path), nats, count, n_bytes))
    results["total"] = _figures("total", total_nats, total_tokens, total_bytes)
    return results


def _on(batch: dict, device: str) -> dict:
    """The batch's tensors on the model's device (the noise draws stay on the CPU generator)."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def _figures(name: str, nats: float, tokens: int, n_bytes: int) -> dict:
    loss = nats / max(tokens, 1)
    return {"file": name, "tokens": tokens, "bytes": n_bytes, "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": nats / math.log(2) / max(n_bytes, 1)}


def model_perplexity(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16) -> dict:
    """Token-weighted perplexity of each ``text`` given its ``context`` under a language model.

    Used by the sampling benchmark; the pipeline's sample judge is the independent n-gram model of
    sunfish.evaluation.judge, never a model of the run.

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
