"""`sunfish eval-text`: score any text file with any checkpoint, so users measure on their own text.

Autoregressive checkpoints give the exact negative log-likelihood; the diffusion model gives its
ELBO, an upper bound. Bits per byte divide by the file's UTF-8 bytes, so figures compare across
tokenizers and with the pipeline's validation numbers.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path


def score_files(checkpoint: str | Path, files: list[Path], *, seq_len: int | None = None, seed: int = 0) -> dict:
    import numpy as np
    import torch

    from sunfish.data.dataset import PairDataset, TokenStream, write_tokens
    from sunfish.training.checkpoint import load_checkpoint, load_tokenizer_for

    model, meta, directory = load_checkpoint(checkpoint)
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
                    n, c = model.nll(batch, generator=gen)
                    nats += float(n)
                    count += int(c)
            else:
                pairs = PairDataset([{"prompt": "", "text": text, "target": []}], tok, length,
                                    model.config.max_prompt_tokens)
                for batch in pairs.eval_batches(8):
                    n, c = model.nll(batch, generator=gen)
                    nats += float(n)
                    count += int(c)
        total_nats += nats
        total_tokens += count
        total_bytes += n_bytes
        results["files"].append(_figures(str(path), nats, count, n_bytes))
    results["total"] = _figures("total", total_nats, total_tokens, total_bytes)
    return results


def _figures(name: str, nats: float, tokens: int, n_bytes: int) -> dict:
    loss = nats / max(tokens, 1)
    return {"file": name, "tokens": tokens, "bytes": n_bytes, "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": nats / math.log(2) / max(n_bytes, 1)}
