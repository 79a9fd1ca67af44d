"""Loading data/prepared for the diagnosis, and running the data checks on it.

A missing or broken file must become a ``data/load`` failure naming the file and the remedy, not an
exception: the model checks then say they could not run, and the rest of the report still comes
out. Each data check is guarded on its own, so one broken input does not hide the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sunfish.config import Params
from sunfish.diagnose.core import FAIL, OK, guarded, make_check
from sunfish.diagnose.data_checks import (
    check_batch_content,
    check_pairs,
    check_special_tokens,
    check_splits,
    check_tokenizer_roundtrip,
    check_unknown_tokens,
    check_val_overlap,
)


@dataclass
class PreparedData:
    dir: Path
    meta: dict | None = None
    tokenizer: Any = None
    train: Any = None  # TokenStream
    val: Any = None
    pairs: dict[str, list[dict]] = field(default_factory=dict)


def load_prepared(prepared: Path, want_pairs: bool, checks: list[dict]) -> PreparedData:
    """What of ``prepared`` loads (the rest stays None), and one ``data/load`` row appended to ``checks``."""
    from sunfish.data.dataset import TokenStream, load_pairs
    from sunfish.data.tokenizer import TextTokenizer

    data = PreparedData(prepared)
    remedy = "run `dvc repro prepare` (or `python -m pipeline prepare`)"
    problems = []
    try:
        data.meta = json.loads((prepared / "meta.json").read_text(encoding="utf-8"))
    except Exception as exc:
        problems.append(f"meta.json: {type(exc).__name__}: {exc}")
    try:
        kwargs = {}
        if data.meta:
            kwargs = {"eos_id": data.meta.get("eos_id"), "pad_id": data.meta.get("pad_id")}
        data.tokenizer = TextTokenizer.load(prepared / "tokenizer.json", **kwargs)
    except Exception as exc:
        problems.append(f"tokenizer.json: {exc}")
    for split in ("train", "val"):
        try:
            setattr(data, split, TokenStream(prepared / f"{split}.bin"))
        except Exception as exc:
            problems.append(f"{split}.bin: {exc}")
    if want_pairs:
        for split in ("train", "val"):
            try:
                data.pairs[split] = load_pairs(prepared / f"pairs_{split}.jsonl")
            except Exception as exc:
                problems.append(f"pairs_{split}.jsonl: {exc}")
                data.pairs[split] = []
    if problems:
        checks.append(make_check("data/load", FAIL, len(problems), "0 problems",
                                 f"{prepared}: " + "; ".join(problems)[:800] + f". {remedy}"))
    else:
        checks.append(make_check("data/load", OK, 0, "0 problems", f"{prepared}: meta, tokenizer, token files"
                                 + (" and pairs" if want_pairs else "") + " load"))
    return data


def _sample_texts(data: PreparedData, n: int = 8) -> list[str]:
    texts = ["Once upon a time, a little fox said: \"Hello!\" 42 times.", "Ünïcödé — naïve café, 日本語, emoji 🙂\n\ttabs"]
    stream = data.val if data.val is not None else data.train
    if stream is not None and data.tokenizer is not None and stream.num_tokens > 2:
        eos = data.tokenizer.eos_id
        gen = np.random.default_rng(0)
        for _ in range(n):
            start = int(gen.integers(0, max(1, stream.num_tokens - 64)))
            ids = [int(i) for i in stream.tokens[start : start + 64] if int(i) not in (eos, data.tokenizer.pad_id)]
            text = data.tokenizer.decode(ids)
            if text and "\ufffd" not in text:  # a window may cut a multi-byte character
                texts.append(text)
    return texts


def run_data_checks(data: PreparedData, params: Params, seq_len: int, batch_size: int, want_pairs: bool,
                    sequences_drawn: int | None = None) -> list[dict]:
    """The data checks on whatever loaded; a missing split or tokenizer skips the checks that need it."""
    rows: list[dict] = []
    meta = data.meta or {}
    if data.train is not None or data.val is not None:
        splits = {}
        for split in ("train", "val"):
            stream = getattr(data, split)
            info = dict((meta.get("splits") or {}).get(split) or {})
            info["tokens"] = stream.num_tokens if stream is not None else 0
            splits[split] = info
        rows += guarded("data/splits", check_splits, splits, seq_len, name="data/splits",
                        sequences_drawn=sequences_drawn)
        meta_tokens = {s: (meta.get("splits") or {}).get(s, {}).get("tokens") for s in ("train", "val")}
        mismatch = [s for s in ("train", "val") if meta_tokens[s] is not None and getattr(data, s) is not None
                    and meta_tokens[s] != getattr(data, s).num_tokens]
        if mismatch:
            rows.append(make_check("data/meta", FAIL, {s: meta_tokens[s] for s in mismatch}, "meta == files",
                                   f"meta.json token counts disagree with {', '.join(f'{s}.bin' for s in mismatch)}: a "
                                   "partial or stale prepare; rerun `dvc repro prepare`"))
    if data.train is not None:
        if data.train.num_tokens > seq_len:
            gen = torch.Generator().manual_seed(params.train.seed)
            rows += guarded("data/batch_content", lambda: check_batch_content(
                data.train.sample_batch(batch_size, seq_len, gen), name="data/batch_content"))
        head = np.asarray(data.train.tokens[: 2_000_000])
        if data.tokenizer is not None:
            specials = {"eos": data.tokenizer.eos_id}
            if data.tokenizer.pad_id != data.tokenizer.eos_id:
                specials["pad"] = data.tokenizer.pad_id
            rows += guarded("data/special_tokens", check_special_tokens, head, specials, name="data/special_tokens")
        if data.val is not None:
            rows += guarded("data/val_overlap", check_val_overlap, np.asarray(data.train.tokens),
                            np.asarray(data.val.tokens), seed=params.data.seed, name="data/val_overlap")
    if data.tokenizer is not None:
        texts: list[str] = []  # sampled once, for the round trip and the unknown-token share

        def roundtrip() -> dict:
            texts.extend(_sample_texts(data))
            return check_tokenizer_roundtrip(data.tokenizer, texts, name="data/tokenizer_roundtrip")

        rows += guarded("data/tokenizer_roundtrip", roundtrip)
        head = np.asarray(data.train.tokens[: 2_000_000]) if data.train is not None else None
        rows += guarded("data/unknown_tokens", check_unknown_tokens, data.tokenizer, head, texts,
                        name="data/unknown_tokens")
    if want_pairs and data.pairs:
        rows += guarded("data/pairs", check_pairs, data.pairs, name="data/pairs")
    return rows


def max_token_id(data: PreparedData) -> int | None:
    """The largest id in the token files: the model's vocabulary must cover it, not only the tokenizer's."""
    ids = [int(np.asarray(s.tokens).max()) for s in (data.train, data.val) if s is not None and s.num_tokens]
    return max(ids) if ids else None
