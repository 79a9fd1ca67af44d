"""The prepare stage's library: split, tokenizer trained on train only, token files, pairs, meta.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sunfish.config import DataConfig, TokenizerConfig
from sunfish.data.corpora import load_documents
from sunfish.data.dataset import TokenStream, load_pairs
from sunfish.data.prepare import prepare_corpus, split_documents
from sunfish.data.tokenizer import TextTokenizer

CORPORA = Path(__file__).resolve().parents[1] / "data" / "corpora"
FILES = ["meta.json", "pairs_train.jsonl", "pairs_val.jsonl", "tokenizer.json", "train.bin", "val.bin"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    data = DataConfig(source="tinystories", max_documents=200, seed=5)
    meta = prepare_corpus(data, TokenizerConfig(vocab_size=512), out, CORPORA)
    return out, meta, data


def _documents(tokens: np.ndarray, tok: TextTokenizer) -> list[str]:
    """Decode a token file back into its documents (split at eos)."""
    ends = np.flatnonzero(tokens == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


def test_files_and_meta_contract(prepared):
    out, meta, _ = prepared
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert json.loads((out / "meta.json").read_text()) == meta
    assert {"source", "vocab_size", "eos_id", "pad_id", "splits", "pairs"} <= set(meta)
    assert (meta["source"], meta["vocab_size"], meta["eos_id"], meta["pad_id"]) == ("tinystories", 512, 0, 1)
    assert meta["splits"]["train"]["documents"] == 180 and meta["splits"]["val"]["documents"] == 20
    for name in ("train", "val"):
        split = meta["splits"][name]
        assert set(split) == {"documents", "bytes", "tokens", "bytes_per_token"}
        assert (out / f"{name}.bin").stat().st_size == 2 * split["tokens"]
        assert split["bytes_per_token"] == pytest.approx(split["bytes"] / split["tokens"], abs=1e-3)
        assert meta["pairs"][name] == len(load_pairs(out / f"pairs_{name}.jsonl")) > 0


def test_token_files_decode_to_the_split_documents(prepared):
    out, meta, data = prepared
    tok = TextTokenizer.load(out / "tokenizer.json")
    documents = load_documents("tinystories", CORPORA, max_documents=200)
    train = _documents(np.asarray(TokenStream(out / "train.bin").tokens), tok)
    val = _documents(np.asarray(TokenStream(out / "val.bin").tokens), tok)
    assert len(train) == 180 and len(val) == 20
    assert sorted(train + val) == sorted(documents)  # whole documents, nothing lost, nothing shared
    assert [d for d in documents if d in set(val)] == val  # corpus order kept inside a split
    assert meta["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in val)
    pairs_val = load_pairs(out / "pairs_val.jsonl")
    assert {p["text"] for p in pairs_val} <= set(val)  # held-out prompts come from held-out text


def test_prepare_is_reproducible(prepared, tmp_path):
    out, _, data = prepared
    prepare_corpus(data, TokenizerConfig(vocab_size=512), tmp_path, CORPORA)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_tokenizer_sees_only_training_text(tmp_path):
    corpus = tmp_path / "c.txt"
    train = [f"the cat sat on the mat number {i}" for i in range(30)]
    corpus.write_text("\n\n".join(train + ["qqqjjj " * 50]), encoding="utf-8")
    data = DataConfig(source=str(corpus), split="tail", val_fraction=0.03)
    meta = prepare_corpus(data, TokenizerConfig(vocab_size=400, min_frequency=2), tmp_path / "out", tmp_path)
    vocab = TextTokenizer.load(tmp_path / "out" / "tokenizer.json").tokenizer.get_vocab()
    assert meta["splits"]["val"]["documents"] == 1
    assert not any("qq" in token or "jj" in token for token in vocab)
    assert any("cat" in token for token in vocab)


def test_split_documents_rules():
    docs = [str(i) for i in range(10)]
    train, val = split_documents(docs, 0.2, "tail", 0)
    assert (train, val) == (docs[:8], docs[8:])
    train, val = split_documents(docs, 0.2, "random", 0)
    assert len(val) == 2 and sorted(train + val) == sorted(docs) and train == sorted(train, key=int)
    assert split_documents(docs, 0.2, "random", 0) == (train, val)
    assert len(split_documents(["a", "b"], 0.01, "random", 1)[1]) == 1
    assert split_documents(["a", "b"], 0.49, "tail", 1) == (["a"], ["b"])
    assert len(split_documents(docs, 0.01, "random", 3)[1]) == 1  # at least one on each side
    with pytest.raises(ValueError, match="random or tail"):
        split_documents(docs, 0.1, "middle", 0)


def test_random_split_depends_on_seed():
    docs = [str(i) for i in range(100)]
    assert split_documents(docs, 0.1, "random", 0)[1] != split_documents(docs, 0.1, "random", 1)[1]


def test_pretrained_needs_a_name(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.pretrained"):
        prepare_corpus(DataConfig(max_documents=10), TokenizerConfig(kind="pretrained"), tmp_path, CORPORA)
