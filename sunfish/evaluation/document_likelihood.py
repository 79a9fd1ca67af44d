"""The block diffusion model's likelihood against the AR model's, over whole held-out documents.

Why whole documents: a figure over each text's first 128 tokens leaves out the later tokens of long
stories, which are the easier ones for a model with context, and says nothing about the rest of the
split. Here every token of every validation document is scored, in chunks that fit the block
model's context together with a prompt: each chunk starts after an <eos> (no context from the chunk
before), for the AR model and the diffusion model alike, so the two score the very same tokens
under the same context. The diffusion figures are upper bounds (ELBO), the AR one is exact, and
that is how they are labelled wherever they are shown.
"""

from __future__ import annotations

import math
from typing import Any

import torch

LN2 = math.log(2.0)


def document_chunks(records: list[dict], tok, chunk_len: int, max_prompt_tokens: int
                    ) -> tuple[list[tuple[list[int], list[int]]], dict[str, int]]:
    """(prompt ids, text ids) chunks of every distinct document of ``records``, each text followed by
    its closing <eos>, cut into pieces of at most ``chunk_len`` tokens; and the counts (documents,
    chunks, bytes). A document's first pair gives the prompt of all its chunks."""
    if chunk_len < 1:
        raise ValueError(f"chunk_len={chunk_len} must be >= 1")
    seen: set[str] = set()
    chunks: list[tuple[list[int], list[int]]] = []
    n_bytes = 0
    for r in records:
        if r["text"] in seen:
            continue
        seen.add(r["text"])
        n_bytes += len(r["text"].encode("utf-8"))
        ids = list(tok.encode(r["text"])) + [tok.eos_id]
        prompt = list(tok.encode_prompt(r["prompt"]))[:max_prompt_tokens]
        chunks += [(prompt, ids[i: i + chunk_len]) for i in range(0, len(ids), chunk_len)]
    return chunks, {"documents": len(seen), "chunks": len(chunks), "bytes": n_bytes}


def _batch(chunks, pad_id: int, width: int, prompt_width: int) -> dict[str, torch.Tensor]:
    rows = len(chunks)
    text = torch.full((rows, width), pad_id, dtype=torch.long)
    text_mask = torch.zeros((rows, width), dtype=torch.bool)
    prompt = torch.full((rows, prompt_width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((rows, prompt_width), dtype=torch.bool)
    for i, (p, t) in enumerate(chunks):
        text[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        text_mask[i, : len(t)] = True
        if p:
            prompt[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            prompt_mask[i, : len(p)] = True
    return {"text_ids": text, "text_mask": text_mask, "prompt_ids": prompt, "prompt_mask": prompt_mask}


@torch.no_grad()
def block_and_ar_nats(model, ar, tok, records: list[dict], *, batch_size: int, seed: int) -> dict[str, Any]:
    """Nats per token and bits per byte over whole documents: the block model's bound with the
    document's prompt and with the null prompt, and the AR model's exact NLL, on the same tokens."""
    from sunfish.diffusion.block import elbo

    c = model.config
    chunk_len = c.max_seq_len - c.max_prompt_tokens - 1  # prompt + <eos> + chunk fit the context
    if ar.config.max_seq_len < chunk_len + 1:
        raise ValueError(f"the AR model's context ({ar.config.max_seq_len}) is shorter than a chunk + <eos> "
                         f"({chunk_len + 1})")
    chunks, counts = document_chunks(records, tok, chunk_len, c.max_prompt_tokens)
    chunks.sort(key=lambda ch: len(ch[1]))  # similar lengths together: less padding
    gen = torch.Generator().manual_seed(seed)
    totals = {"cond": 0.0, "uncond": 0.0, "ar": 0.0}
    tokens = 0
    was = model.training, ar.training
    model.eval()
    ar.eval()
    try:
        for first in range(0, len(chunks), batch_size):
            part = chunks[first: first + batch_size]
            width = max(len(t) for _, t in part)
            batch = _batch(part, tok.pad_id, width, max(1, max(len(p) for p, _ in part)))
            nats, n = elbo(model, batch, gen, conditional=True)
            totals["cond"] += float(nats)
            totals["uncond"] += float(elbo(model, batch, gen, conditional=False)[0])
            rows = batch["text_ids"].shape[0]
            full = torch.cat((torch.full((rows, 1), tok.eos_id), batch["text_ids"]), dim=1)
            targets = full[:, 1:].masked_fill(~batch["text_mask"], -100)
            totals["ar"] += float(ar.nll({"input_ids": full[:, :-1], "targets": targets})[0])
            tokens += n
    finally:
        model.train(was[0])
        ar.train(was[1])
    out: dict[str, Any] = {f"{k}_nats_per_token": v / tokens for k, v in totals.items()}
    out.update({f"{k}_bpb": v / LN2 / counts["bytes"] for k, v in totals.items()})
    out.update(counts, tokens=tokens, chunk_tokens=chunk_len,
               scope=f"every token of {counts['documents']} whole validation documents, in chunks of at most "
                     f"{chunk_len} tokens each scored after <eos>")
    out["uncond_over_ar"] = out["uncond_nats_per_token"] / out["ar_nats_per_token"]
    out["cond_over_ar"] = out["cond_nats_per_token"] / out["ar_nats_per_token"]
    return out
