"""Whole-document likelihood: every token of every document is scored once, the AR and block models
score the same tokens, and a block of one is the AR model's exact NLL."""

from __future__ import annotations

import pytest
import torch

from sunfish.data.tokenizer import train_bpe
from sunfish.evaluation.document_likelihood import block_and_ar_nats, document_chunks
from sunfish.models.block_denoiser import BlockDiffusionConfig, BlockDiffusionLM
from sunfish.models.staged import StagedLM, StagedLMConfig

STORIES = [
    "Once upon a time there was a little dog named Max. Max loved to run in the park with his ball.",
    "Lily had a red kite. One windy day she flew the kite high over the hill and laughed with her mom.",
    "The cat sat on the mat. The cat was happy. Then the cat saw a bird and ran after it into the garden.",
    "Tom and Sue built a sand castle at the beach. A big wave came and the castle fell, so they built another.",
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(STORIES * 5, vocab_size=300, min_frequency=1)


def records():
    topics = ("a dog", "a kite", "a cat", "a castle")
    out = [{"prompt": f"Write a story about {w}", "text": t} for w, t in zip(topics, STORIES)]
    out.append({"prompt": "Another prompt for the first story", "text": STORIES[0]})  # a second pair: scored once
    return out


def test_chunks_cover_every_token_of_every_distinct_document_once(tok):
    chunks, counts = document_chunks(records(), tok, chunk_len=7, max_prompt_tokens=32)
    assert counts["documents"] == 4 and counts["chunks"] == len(chunks)
    assert counts["bytes"] == sum(len(s.encode()) for s in STORIES)
    assert [t for _, c in chunks for t in c] == [t for s in STORIES for t in tok.encode(s) + [tok.eos_id]]
    first = [p for p, _ in chunks[: -(-(len(tok.encode(STORIES[0])) + 1) // 7)]]
    assert first and all(p == tok.encode_prompt("Write a story about a dog") for p in first)  # its first pair's
    assert all(1 <= len(c) <= 7 for _, c in chunks)
    with pytest.raises(ValueError, match="chunk_len"):
        document_chunks(records(), tok, chunk_len=0, max_prompt_tokens=4)


def _models(tok, block_size: int):
    torch.manual_seed(0)
    ar = StagedLM(StagedLMConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=24,
                                 eos_id=tok.eos_id))
    config = BlockDiffusionConfig(vocab_size=tok.vocab_size, backbone=BlockDiffusionLM.backbone_from(ar.config),
                                  block_size=block_size, max_prompt_tokens=6, pad_id=tok.pad_id, eos_id=tok.eos_id)
    return BlockDiffusionLM.from_ar(ar, config), ar


def test_the_ar_figure_is_exact_and_a_block_of_one_bounds_it_unbiasedly(tok):
    model, ar = _models(tok, 1)
    out = block_and_ar_nats(model, ar, tok, records(), batch_size=3, seed=0)
    total = sum(len(tok.encode(s)) + 1 for s in STORIES)
    assert out["tokens"] == total and out["documents"] == 4 and out["chunk_tokens"] == 24 - 6 - 1
    exact = 0.0  # each chunk after <eos>, one at a time
    for _, chunk in document_chunks(records(), tok, out["chunk_tokens"], 6)[0]:
        ids = torch.tensor([[tok.eos_id] + chunk])
        with torch.no_grad():
            exact += float(torch.nn.functional.cross_entropy(ar(ids[:, :-1])[0], ids[0, 1:], reduction="sum"))
    assert out["ar_nats_per_token"] == pytest.approx(exact / total, rel=1e-5)
    assert out["ar_bpb"] == pytest.approx(exact / 0.6931471805599453 / out["bytes"], rel=1e-5)
    # B = 1: every input is clean, so the bound is the AR NLL's Monte Carlo estimate (unbiased)
    draws = [block_and_ar_nats(model, ar, tok, records(), batch_size=3, seed=s)["uncond_nats_per_token"]
             for s in range(24)]
    assert sum(draws) / len(draws) == pytest.approx(out["ar_nats_per_token"], rel=0.05)
