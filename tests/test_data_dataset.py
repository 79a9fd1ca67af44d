"""Token streams (AR batches) and prompt/text pair batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sunfish.data.dataset import PairDataset, TokenStream, load_pairs, write_tokens
from sunfish.data.tokenizer import train_bpe


@pytest.fixture
def stream(tmp_path) -> TokenStream:
    # distinct values so that every window can be located in the source
    write_tokens(tmp_path / "t.bin", np.arange(1000, 2000))
    return TokenStream(tmp_path / "t.bin")


def test_write_and_read_back(tmp_path, stream):
    assert stream.num_tokens == len(stream) == 1000
    assert (tmp_path / "t.bin").stat().st_size == 2000  # uint16
    assert stream.tokens[0] == 1000 and stream.tokens[-1] == 1999


def test_write_tokens_rejects_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="0..65535"):
        write_tokens(tmp_path / "x.bin", np.array([1, 65536]))
    with pytest.raises(ValueError, match="0..65535"):
        write_tokens(tmp_path / "x.bin", np.array([-1, 3]))
    write_tokens(tmp_path / "ok.bin", np.array([0, 65535]))
    assert TokenStream(tmp_path / "ok.bin").tokens.tolist() == [0, 65535]


def test_sample_batch_windows_and_shift(stream):
    batch = stream.sample_batch(8, 16, torch.Generator().manual_seed(0))
    x, y = batch["input_ids"], batch["targets"]
    assert set(batch) == {"input_ids", "targets"}
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    start = x[:, :1] - 1000
    assert torch.equal(x, start + 1000 + torch.arange(16))  # contiguous windows from the file
    assert int(y.max()) <= 1999 and int(x.min()) >= 1000


def test_sample_batch_is_deterministic(stream):
    a = stream.sample_batch(4, 32, torch.Generator().manual_seed(7))
    b = stream.sample_batch(4, 32, torch.Generator().manual_seed(7))
    c = stream.sample_batch(4, 32, torch.Generator().manual_seed(8))
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], c["input_ids"])


def test_sample_batch_reaches_both_ends(tmp_path):
    write_tokens(tmp_path / "s.bin", np.arange(10))
    stream = TokenStream(tmp_path / "s.bin")
    batch = stream.sample_batch(500, 4, torch.Generator().manual_seed(0))
    assert int(batch["input_ids"][:, 0].min()) == 0 and int(batch["targets"][:, -1].max()) == 9
    with pytest.raises(ValueError, match="seq_len=10"):
        stream.sample_batch(1, 10, torch.Generator())


@pytest.mark.parametrize(
    "num_tokens, seq_len, batch_size", [(1000, 16, 4), (1000, 7, 3), (17, 16, 2), (2, 8, 5), (65, 8, 8)]
)
def test_eval_batches_cover_every_target_once(tmp_path, num_tokens, seq_len, batch_size):
    data = np.arange(num_tokens) + 100
    write_tokens(tmp_path / "e.bin", data)
    batches = list(TokenStream(tmp_path / "e.bin").eval_batches(seq_len, batch_size))
    inputs = torch.cat([b["input_ids"].flatten() for b in batches])
    targets = torch.cat([b["targets"].flatten() for b in batches])
    valid = targets != -100
    assert int(valid.sum()) == num_tokens - 1
    assert targets[valid].tolist() == data[1:].tolist()  # in order, each once
    assert inputs[valid].tolist() == data[:-1].tolist()
    assert all(b["input_ids"].shape[0] <= batch_size and b["input_ids"].shape[1] == seq_len for b in batches)
    assert all(b["targets"].dtype == torch.int64 for b in batches)
    # padding only at the very end
    assert bool(valid[: int(valid.sum())].all())


def test_eval_batches_max_tokens(stream):
    batches = list(stream.eval_batches(seq_len=10, batch_size=3, max_tokens=45))
    targets = torch.cat([b["targets"].flatten() for b in batches])
    assert int((targets != -100).sum()) == 45
    assert targets[targets != -100].tolist() == list(range(1001, 1046))


def test_token_stream_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare"):
        TokenStream(tmp_path / "missing.bin")
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="whole number"):
        TokenStream(tmp_path / "odd.bin")
    (tmp_path / "one.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="fewer than 2"):
        TokenStream(tmp_path / "one.bin")


# ----------------------------------------------------------------------------------------------
# pairs


@pytest.fixture(scope="module")
def tok():
    texts = ["Write a story about a dog. The dog ran to the park and played with a ball."] * 20
    return train_bpe(texts, vocab_size=300, min_frequency=2)


def _records():
    return [
        {"prompt": "Write a story about a dog", "text": "The dog ran.", "target": ["dog"], "template": "s"},
        {"prompt": "", "text": "A ball.", "target": ["ball"], "template": "t"},
        {"prompt": "Describe the park " * 10, "text": "The dog ran to the park and played with a ball. " * 5,
         "target": ["park"], "template": "t"},
    ]


def test_load_pairs_round_trip_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()) + "\n", encoding="utf-8")
    assert load_pairs(path) == _records()
    path.write_text(json.dumps(_records()[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p.jsonl:2: not valid JSON"):
        load_pairs(path)
    path.write_text(json.dumps({"prompt": "x", "text": "y"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p.jsonl:1: .*\['target', 'template'\]"):
        load_pairs(path)
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "missing.jsonl")


def test_pair_dataset_tensors(tok):
    ds = PairDataset(_records(), tok, seq_len=12, max_prompt_tokens=5)
    assert len(ds) == 3
    batch = next(ds.eval_batches(batch_size=3))
    assert set(batch) == {"text_ids", "text_mask", "prompt_ids", "prompt_mask"}
    assert batch["text_ids"].shape == (3, 12) and batch["prompt_ids"].shape == (3, 5)
    assert batch["text_ids"].dtype == torch.long and batch["text_mask"].dtype == torch.bool
    # text 0 is short: its tokens, then eos, then padding
    ids0 = tok.encode("The dog ran.")
    n0 = len(ids0)
    assert batch["text_ids"][0, :n0].tolist() == ids0
    assert int(batch["text_ids"][0, n0]) == tok.eos_id
    assert batch["text_mask"][0].tolist() == [True] * (n0 + 1) + [False] * (12 - n0 - 1)
    assert bool((batch["text_ids"][0, n0 + 1 :] == tok.pad_id).all())
    # text 2 is long: truncated, no room for eos, every position real
    assert bool(batch["text_mask"][2].all())
    assert batch["text_ids"][2].tolist() == tok.encode(_records()[2]["text"])[:12]
    # the empty prompt is the null prompt; the long prompt is truncated
    assert not bool(batch["prompt_mask"][1].any()) and bool((batch["prompt_ids"][1] == tok.pad_id).all())
    assert bool(batch["prompt_mask"][2].all())
    prompt0 = batch["prompt_ids"][0][batch["prompt_mask"][0]]
    assert prompt0.tolist() == tok.encode(" Write a story about a dog")[:5]  # tokenised as inside a text


def test_pair_dataset_sampling_and_order(tok):
    records = _records() * 3
    ds = PairDataset(records, tok, seq_len=16, max_prompt_tokens=8)
    a = ds.sample_batch(6, torch.Generator().manual_seed(1))
    b = ds.sample_batch(6, torch.Generator().manual_seed(1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["text_ids"].shape == (6, 16)
    batches = list(ds.eval_batches(batch_size=4))
    assert [x["text_ids"].shape[0] for x in batches] == [4, 4, 1]
    assert torch.equal(torch.cat([x["text_ids"] for x in batches]), ds.text_ids)


def test_pair_dataset_needs_records(tok):
    with pytest.raises(ValueError, match="at least one"):
        PairDataset([], tok, seq_len=8, max_prompt_tokens=4)
