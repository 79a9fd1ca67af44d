"""Data checks: is the prepared data text the model can learn from?

Data that silently failed to load (an empty split, a file of zeros, documents that are only
end-of-text markers) trains a model on nothing, and the result is gibberish with no error anywhere.
These checks need no model: the token files, the tokenizer and the prompt/text pairs.

Thresholds:

- special tokens (eos, pad) at ``SPECIAL_SHARE_WARN`` of the train stream or more warn (documents so
  short that the model mostly learns to end them), at ``SPECIAL_SHARE_FAIL`` fail (the text failed to
  load);
- the unknown token at ``UNK_SHARE_WARN`` or more warns, at ``UNK_SHARE_FAIL`` fails: text the
  tokenizer cannot represent is learnt as one meaningless token and generated back as such
  (``UNK_NAMES``: where a tokenizer without an explicit ``unk_id`` keeps it);
- more than ``OVERLAP_WARN`` of ``OVERLAP_SAMPLES`` sampled validation ``OVERLAP_NGRAM``-grams also
  found in train warns: duplicated documents make the validation loss optimistic. At most
  ``OVERLAP_MAX_SCAN`` train tokens are hashed (random chunks beyond that), to keep it to seconds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from sunfish.diagnose.core import FAIL, OK, WARN, make_check

SPECIAL_SHARE_WARN = 0.2
SPECIAL_SHARE_FAIL = 0.5
UNK_SHARE_WARN = 0.001
UNK_SHARE_FAIL = 0.05
UNK_NAMES = ("<unk>", "[UNK]", "<|unk|>", "<UNK>", "<|unknown|>")
OVERLAP_NGRAM = 32
OVERLAP_SAMPLES = 256
OVERLAP_WARN = 0.05
OVERLAP_MAX_SCAN = 20_000_000  # train tokens hashed at most (random chunks beyond that)


def sequences_in(tokens: int, seq_len: int) -> int:
    """Training sequences in a stream of ``tokens``: windows of ``seq_len`` inputs whose targets are the
    next tokens, laid end to end (each needs seq_len + 1 tokens, neighbours share one): (tokens - 1) // seq_len."""
    return max(0, int(tokens) - 1) // seq_len


def check_splits(
    splits: dict[str, dict[str, int]],
    seq_len: int,
    name: str = "data_splits",
    *,
    sequences_drawn: int | None = None,
) -> list[dict]:
    """Documents, tokens and training sequences per split; train and val must hold windows.

    ``splits``: {"train": {"documents", "tokens"}, "val": {...}} (tokens as found in the token files).
    Sequences are the distinct non-overlapping training windows (:func:`sequences_in`); training
    draws random windows (``TokenStream.sample_batch``), ``sequences_drawn`` of them over the run
    (batch_size x grad_accum_steps x max_steps), i.e. that many / sequences epochs.
    Returns two rows: ``<name>`` (train) and ``data/val_split``.
    """
    value = {}
    for split, info in splits.items():
        value[f"{split}_documents"] = int(info.get("documents", 0) or 0)
        value[f"{split}_tokens"] = int(info.get("tokens", 0) or 0)
        value[f"{split}_sequences"] = sequences_in(int(info.get("tokens", 0) or 0), seq_len)
    details = {}
    rows = []
    train = splits.get("train", {})
    n_train = int(train.get("tokens", 0) or 0)
    n_seq = sequences_in(n_train, seq_len)
    drawn = ""
    if sequences_drawn is not None:
        details["sequences_drawn"] = int(sequences_drawn)
        if n_seq:
            details["epochs"] = round(sequences_drawn / n_seq, 3)
            drawn = f"; the run draws {sequences_drawn:,} random windows = {sequences_drawn / n_seq:.2g} epochs"
    if n_train < seq_len + 1:
        rows.append(make_check(name, FAIL, value, f"train tokens > seq_len={seq_len}",
                               f"the train split holds {n_train} tokens, not one window of train.seq_len={seq_len} + 1: "
                               "the corpus failed to load or is tiny; check data.source / data.max_documents and rerun "
                               "`dvc repro prepare`", details))
    else:
        rows.append(make_check(name, OK, value, f"train tokens > seq_len={seq_len}",
                               f"train: {value.get('train_documents', 0):,} documents, {n_train:,} tokens, "
                               f"{n_seq:,} sequences of {seq_len} (+1 target){drawn}", details))
    val = splits.get("val", {})
    n_val = int(val.get("tokens", 0) or 0)
    vname = name.rsplit("/", 1)[0] + "/val_split" if "/" in name else "val_split"
    if n_val < seq_len + 1:
        status = FAIL if n_val < 2 else WARN
        rows.append(make_check(vname, status, n_val, f"> {seq_len} tokens",
                               f"the val split holds {n_val} tokens ({value.get('val_documents', 0)} documents), "
                               f"{'nothing to evaluate' if n_val < 2 else 'less than one window'}: raise "
                               "data.val_fraction (or data.max_documents) and rerun prepare"))
    else:
        rows.append(make_check(vname, OK, n_val, f"> {seq_len} tokens",
                               f"val: {value.get('val_documents', 0):,} documents, {n_val:,} tokens, "
                               f"{sequences_in(n_val, seq_len):,} sequences"))
    return rows


def check_batch_content(batch: dict, name: str = "data_batch_content") -> dict:
    """A sampled training batch is neither empty nor one token repeated (data that failed silently)."""
    ids = batch.get("input_ids", batch.get("text_ids"))
    if ids is None or ids.numel() == 0:
        return make_check(name, FAIL, 0, "> 0 tokens", "the sampled batch is empty: the token file holds no data; "
                          "rerun `dvc repro prepare` and check data.source")
    real = ids
    mask = batch.get("text_mask")
    if mask is not None:
        real = ids[mask.bool()]
    if real.numel() == 0:
        return make_check(name, FAIL, 0, "> 0 real tokens", "every position of the sampled batch is padding: the "
                          "texts are empty; check data.source and rerun prepare")
    distinct = int(torch.unique(real).numel())
    value = {"distinct_tokens": distinct, "tokens": int(real.numel())}
    if distinct <= 1:
        return make_check(name, FAIL, value, ">= 2 distinct tokens",
                          f"the sampled batch is one token (id {int(real.flatten()[0])}) repeated: the data failed to "
                          "load or tokenize (all zeros?); inspect data/prepared/train.bin, check data.source and rerun "
                          "`dvc repro prepare`")
    if distinct < min(16, real.numel() // 4):
        return make_check(name, WARN, value, ">= 16 distinct tokens",
                          f"only {distinct} distinct tokens in {real.numel()} sampled: the text is degenerate; "
                          "check data.source")
    return make_check(name, OK, value, ">= 2 distinct tokens", f"{distinct} distinct ids in {real.numel()} sampled tokens")


def check_special_tokens(tokens: np.ndarray, special_ids: dict[str, int], name: str = "data_special_tokens") -> dict:
    """Share of special tokens (eos, pad) in the train stream: documents far too short, or padding."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return make_check(name, FAIL, None, f"< {SPECIAL_SHARE_FAIL:.0%}", "the train stream is empty")
    shares = {k: float(np.count_nonzero(tokens == v)) / tokens.size for k, v in special_ids.items()}
    ids = sorted(set(special_ids.values()))
    share = float(np.isin(tokens, ids).sum()) / tokens.size
    value = round(share, 4)
    details = {f"{k}_share": round(v, 4) for k, v in shares.items()}
    docs = shares.get("eos", 0.0)
    text = ", ".join(f"{k} {v:.1%}" for k, v in shares.items())
    if share >= SPECIAL_SHARE_FAIL:
        return make_check(name, FAIL, value, f"< {SPECIAL_SHARE_FAIL:.0%}",
                          f"{share:.0%} of the train tokens are special ({text}): the documents are empty or the "
                          "data failed to load; check data.source (and data.hf_text_field) and rerun prepare", details)
    if share >= SPECIAL_SHARE_WARN:
        return make_check(name, WARN, value, f"< {SPECIAL_SHARE_WARN:.0%}",
                          f"{share:.0%} of the train tokens are special ({text}): documents average "
                          f"{1 / max(docs, 1e-9):.1f} tokens; the model mostly learns to end documents. Check how "
                          "data.source splits documents", details)
    return make_check(name, OK, value, f"< {SPECIAL_SHARE_WARN:.0%}", f"special tokens: {text}", details)


def unknown_token_id(tokenizer: Any) -> int | None:
    """The tokenizer's unknown-token id, or None (byte-level BPE has none: every byte is a token).

    ``tokenizer.unk_id`` when set; else the model's ``unk_token`` of a ``tokenizers`` tokenizer, or
    one of the usual names (``<unk>``, ``[UNK]``...) in its vocabulary.
    """
    explicit = getattr(tokenizer, "unk_id", None)
    if explicit is not None:
        return int(explicit)
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    to_id = getattr(inner, "token_to_id", None)
    if to_id is None:
        return None
    names = [getattr(getattr(inner, "model", None), "unk_token", None), *UNK_NAMES]
    for n in names:
        if n:
            token_id = to_id(n)
            if token_id is not None:
                return int(token_id)
    return None


def check_unknown_tokens(
    tokenizer: Any,
    tokens: np.ndarray | None,
    texts: list[str] = (),
    name: str = "data_unknown_tokens",
) -> dict:
    """Share of the unknown token in the train stream (and in sample texts): text the tokenizer cannot
    represent is learnt as one meaningless token and generated back as such."""
    unk = unknown_token_id(tokenizer)
    threshold = f"< {UNK_SHARE_WARN:.1%}"
    if unk is None:
        return make_check(name, OK, 0.0, threshold,
                          "the tokenizer has no unknown token (byte-level: every text is representable)")
    details: dict[str, Any] = {"unk_id": unk}
    share = None
    if tokens is not None and np.asarray(tokens).size:
        tokens = np.asarray(tokens)
        share = float(np.count_nonzero(tokens == unk)) / tokens.size
        details["train_share"] = round(share, 5)
    if texts:
        ids = [i for t in texts for i in tokenizer.encode(t)]
        text_share = sum(1 for i in ids if i == unk) / max(len(ids), 1)
        details["sample_text_share"] = round(text_share, 5)
        share = text_share if share is None else share
    if share is None:
        return make_check(name, OK, None, threshold, f"unknown token id {unk}; nothing to measure", details)
    value = round(share, 5)
    if share >= UNK_SHARE_FAIL:
        return make_check(name, FAIL, value, f"< {UNK_SHARE_FAIL:.0%}",
                          f"{share:.1%} of the train tokens are the unknown token (id {unk}): the tokenizer cannot "
                          "represent much of the corpus, so the model learns to predict 'unknown'; use tokenizer.kind: "
                          "bpe (byte-level, trained on this corpus) and rerun `dvc repro prepare`", details)
    if share >= UNK_SHARE_WARN:
        return make_check(name, WARN, value, threshold,
                          f"{share:.2%} of the train tokens are the unknown token (id {unk}); tokenizer.kind: bpe "
                          "never produces one", details)
    return make_check(name, OK, value, threshold, f"{share:.3%} unknown tokens (id {unk})", details)


def check_tokenizer_roundtrip(tokenizer: Any, texts: list[str], name: str = "data_tokenizer_roundtrip") -> dict:
    """decode(encode(text)) == text for sample texts, and every id lies inside the vocabulary."""
    bad, spacing = [], []
    n_tokens = 0
    vocab = int(tokenizer.vocab_size)
    for text in texts:
        ids = tokenizer.encode(text)
        n_tokens += len(ids)
        if any(i < 0 or i >= vocab for i in ids):
            bad.append(f"ids outside 0..{vocab - 1} for {text[:40]!r}")
            continue
        back = tokenizer.decode(ids)
        if back != text:
            (spacing if back.split() == text.split() else bad).append(f"{text[:40]!r} -> {back[:40]!r}")
    chars = sum(len(t) for t in texts)
    value = {"texts": len(texts), "chars_per_token": round(chars / max(n_tokens, 1), 2)}
    if bad:
        return make_check(name, FAIL, value, "exact round trip",
                          f"{len(bad)} of {len(texts)} texts do not survive encode/decode ({bad[0]}): the tokenizer "
                          "loses text, so the model learns (and is scored on) something else; use tokenizer.kind: bpe "
                          "(byte-level, lossless) and rerun prepare")
    if spacing:
        return make_check(name, WARN, value, "exact round trip",
                          f"{len(spacing)} of {len(texts)} texts come back with different whitespace ({spacing[0]}); "
                          "tokenizer.kind: bpe is lossless")
    return make_check(name, OK, value, "exact round trip",
                      f"{len(texts)} sample texts round-trip exactly ({value['chars_per_token']} characters per token)")


def _ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash (wrapping uint64) of every n-gram: [len - n + 1]."""
    t = np.asarray(tokens, dtype=np.uint64)
    if t.size < n:
        return np.zeros(0, dtype=np.uint64)
    base = np.uint64(1_000_003)
    h = np.zeros(t.size - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * base + t[j : j + h.size] + np.uint64(1)
    return h


def check_val_overlap(
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    *,
    n: int = OVERLAP_NGRAM,
    samples: int = OVERLAP_SAMPLES,
    seed: int = 0,
    name: str = "data_val_overlap",
) -> dict:
    """Share of sampled validation n-grams that also occur in train (duplicated documents leak)."""
    val_tokens = np.asarray(val_tokens)
    train_tokens = np.asarray(train_tokens)
    if val_tokens.size < n or train_tokens.size < n:
        return make_check(name, OK, None, f"< {OVERLAP_WARN:.0%}", f"splits shorter than {n} tokens: nothing to compare")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, val_tokens.size - n + 1, size=min(samples, val_tokens.size - n + 1))
    windows = np.stack([val_tokens[s : s + n] for s in starts]).astype(np.uint64)
    sample_hashes = np.zeros(windows.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # the same hash as _ngram_hashes, one per sampled window
            sample_hashes = sample_hashes * np.uint64(1_000_003) + windows[:, j] + np.uint64(1)
    found = np.zeros(sample_hashes.size, dtype=bool)
    scanned = 0
    chunk = 1_000_000
    n_chunks = math.ceil(train_tokens.size / chunk)
    order = np.arange(n_chunks)
    if train_tokens.size > OVERLAP_MAX_SCAN:
        order = rng.permutation(n_chunks)[: max(1, OVERLAP_MAX_SCAN // chunk)]
    for c in order:
        lo = int(c) * chunk
        part = train_tokens[lo : lo + chunk + n - 1]
        found |= np.isin(sample_hashes, _ngram_hashes(part, n))
        scanned += min(chunk, train_tokens.size - lo)
    share = float(found.mean())
    coverage = scanned / train_tokens.size
    value = round(share, 4)
    details = {"ngram": n, "samples": int(sample_hashes.size), "train_coverage": round(coverage, 3)}
    if share > OVERLAP_WARN:
        return make_check(name, WARN, value, f"<= {OVERLAP_WARN:.0%}",
                          f"{share:.0%} of {sample_hashes.size} sampled validation {n}-token windows also occur in train"
                          f"{'' if coverage >= 1 else f' (scanned {coverage:.0%} of train)'}: duplicated documents make "
                          "validation loss optimistic; deduplicate data.source or use data.split: tail", details)
    return make_check(name, OK, value, f"<= {OVERLAP_WARN:.0%}",
                      f"{share:.1%} of {sample_hashes.size} sampled validation {n}-grams occur in train", details)


def check_pairs(pairs: dict[str, list[dict]], name: str = "data_pairs") -> dict:
    """Prompt/text pairs exist for both splits and the prompts are not empty (else the prompt path never trains)."""
    counts = {k: len(v) for k, v in pairs.items()}
    value = dict(counts)
    train = pairs.get("train", [])
    if not train:
        return make_check(name, FAIL, value, "> 0 train pairs",
                          "no prompt/text pairs for the cfg model: pairs_train.jsonl is empty, so the diffusion model "
                          "has nothing to learn from; check data.source / data.max_pairs_per_document and rerun prepare")
    with_prompt = sum(1 for r in train if str(r.get("prompt", "")).strip())
    with_text = sum(1 for r in train if str(r.get("text", "")).strip())
    value["prompt_share"] = round(with_prompt / len(train), 3)
    if with_text < len(train) / 2:
        return make_check(name, FAIL, value, "texts not empty",
                          f"{len(train) - with_text} of {len(train)} train pairs have an empty text; rerun prepare")
    if with_prompt < len(train) / 2:
        return make_check(name, FAIL, value, ">= 50% non-empty prompts",
                          f"only {with_prompt} of {len(train)} train pairs have a prompt: the prompt path would barely "
                          "train; check data.source and rerun prepare")
    if not pairs.get("val"):
        return make_check(name, WARN, value, "> 0 val pairs",
                          "no validation pairs: prompt adherence cannot be measured; raise data.val_fraction")
    return make_check(name, OK, value, "> 0 pairs, prompts present",
                      f"{counts.get('train', 0):,} train / {counts.get('val', 0):,} val pairs, "
                      f"{value['prompt_share']:.0%} with a prompt")
