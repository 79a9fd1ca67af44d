"""The prepare stage's library half: corpus -> split -> tokenizer -> token files, pairs and meta.json.

Everything downstream reads only what this writes (``data/prepared/``), so the contract lives in
meta.json: vocabulary, special ids, and per split the documents, UTF-8 bytes and tokens, from which
bits per byte is computed. The split keeps documents whole and the tokenizer is trained on the
training split only, so validation text is never seen before evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from sunfish.config import DataConfig, TokenizerConfig
from sunfish.data.corpora import CorpusError, load_documents
from sunfish.data.dataset import write_tokens
from sunfish.data.prompts import build_pairs
from sunfish.data.tokenizer import TextTokenizer, from_pretrained, train_bpe

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def split_documents(
    documents: list[str], val_fraction: float, method: str, seed: int
) -> tuple[list[str], list[str]]:
    """Whole-document train/val split; each side gets at least one document.

    ``random``: a permutation drawn with ``seed`` picks the validation documents (each side keeps the
    corpus order, which keeps neighbouring text readable). ``tail``: the last documents (the
    char-rnn/nanoGPT convention for Shakespeare, where neighbouring blocks belong to one play).
    """
    n = len(documents)
    if n < 2:
        raise ValueError(f"cannot split {n} document(s) into train and validation; need at least 2")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    if method == "tail":
        val_idx = set(range(n - n_val, n))
    elif method == "random":
        val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    else:
        raise ValueError(f"data.split: {method!r} is not a split method; use random or tail")
    train = [d for i, d in enumerate(documents) if i not in val_idx]
    val = [d for i, d in enumerate(documents) if i in val_idx]
    return train, val


def tokenize_documents(tokenizer: TextTokenizer, documents: list[str]) -> np.ndarray:
    """Documents encoded in one batch and joined, each followed by eos (uint16)."""
    encoded = tokenizer.encode_batch(documents)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    out = np.empty(int(lengths.sum()), dtype=np.uint16)
    ends = np.cumsum(lengths)
    for ids, end, length in zip(encoded, ends, lengths):
        out[end - length : end - 1] = ids
    out[ends - 1] = tokenizer.eos_id
    return out


def _split_stats(documents: list[str], tokens: np.ndarray) -> dict:
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    return {
        "documents": len(documents),
        "bytes": n_bytes,
        "tokens": int(tokens.size),
        "bytes_per_token": round(n_bytes / max(tokens.size, 1), 4),
    }


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def make_tokenizer(tok_cfg: TokenizerConfig, train_documents: list[str]) -> TextTokenizer:
    """BPE trained on the training documents, or the configured pretrained tokenizer."""
    if tok_cfg.kind == "pretrained":
        if not tok_cfg.pretrained:
            raise ValueError(
                "tokenizer.pretrained: required when tokenizer.kind is pretrained "
                "(a hub name or a local folder)"
            )
        return from_pretrained(tok_cfg.pretrained)
    return train_bpe(train_documents, tok_cfg.vocab_size, tok_cfg.min_frequency)


def prepare_corpus(data_cfg: DataConfig, tok_cfg: TokenizerConfig, out_dir: Path, corpora_dir: Path,
                   min_train_tokens: int = 0) -> dict:
    """Write tokenizer.json, train.bin, val.bin, pairs_{train,val}.jsonl and meta.json; return meta.

    ``min_train_tokens`` (one training window, seq_len + 1): a training split shorter than that
    could not fill a single batch row, so it is refused here, naming the source, instead of
    failing later inside a training stage.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    documents = load_documents(
        data_cfg.source,
        Path(corpora_dir),
        hf_split=data_cfg.hf_split,
        hf_text_field=data_cfg.hf_text_field,
        max_documents=data_cfg.max_documents,
    )
    train, val = split_documents(documents, data_cfg.val_fraction, data_cfg.split, data_cfg.seed)
    splits = {"train": train, "val": val}
    log.info("split %d documents: %d train, %d val (%s)", len(documents), len(train), len(val),
             data_cfg.split)

    tokenizer = make_tokenizer(tok_cfg, splits["train"])
    tokenizer.save(out_dir / "tokenizer.json")

    meta: dict = {
        "format_version": FORMAT_VERSION,
        "source": data_cfg.source,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "splits": {},
        "pairs": {},
        "tokenizer": {
            "kind": tok_cfg.kind,
            "requested_vocab_size": tok_cfg.vocab_size if tok_cfg.kind == "bpe" else None,
            "min_frequency": tok_cfg.min_frequency if tok_cfg.kind == "bpe" else None,
            "pretrained": tok_cfg.pretrained if tok_cfg.kind == "pretrained" else None,
        },
        "split": {"method": data_cfg.split, "val_fraction": data_cfg.val_fraction, "seed": data_cfg.seed},
        "pair_templates": {},
    }
    for name, docs in splits.items():
        tokens = tokenize_documents(tokenizer, docs)
        if name == "train" and tokens.size < min_train_tokens:
            raise CorpusError(
                f"{data_cfg.source}: the training split is only {tokens.size} tokens ({len(docs)} documents), "
                f"shorter than one training sequence (train.seq_len + 1 = {min_train_tokens} tokens); "
                "give a larger corpus, or lower train.seq_len or data.val_fraction"
            )
        write_tokens(out_dir / f"{name}.bin", tokens)
        meta["splits"][name] = _split_stats(docs, tokens)
        pairs = build_pairs(docs, data_cfg.source, data_cfg.seed, data_cfg.max_pairs_per_document,
                            described=data_cfg.described_pairs and name == "train")  # held-out pairs stay as they are
        _write_jsonl(out_dir / f"pairs_{name}.jsonl", pairs)
        meta["pairs"][name] = len(pairs)
        meta["pair_templates"][name] = dict(sorted(Counter(p["template"] for p in pairs).items()))
        log.info("%s: %s, %d pairs", name, meta["splits"][name], len(pairs))
    if meta["pairs"]["train"] == 0:
        log.warning("no prompt/text pairs could be built from the training documents; "
                    "the diffusion model needs them")

    tmp = out_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "meta.json")
    log.info("prepared %s in %.1f s -> %s", data_cfg.source, time.perf_counter() - started, out_dir)
    return meta
