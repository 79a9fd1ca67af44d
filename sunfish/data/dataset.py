"""Batches for training and evaluation, read from the files the prepare stage writes.

- :class:`TokenStream`: a uint16 memmap of a split (documents joined with eos) giving
  autoregressive batches ``input_ids``/``targets`` (targets = inputs shifted by one). Training draws
  random windows; evaluation walks the split in order so that every token from position 1 on is
  predicted exactly once, which is what perplexity and bits per byte need.
- :class:`PairDataset`: prompt/text pairs (``pairs_*.jsonl``) tokenized once, giving the padded
  ``text_ids``/``text_mask``/``prompt_ids``/``prompt_mask`` batches of the diffusion model.

Random draws take an explicit ``torch.Generator`` so that a seeded run is reproducible and the
data order does not depend on what else consumed the global RNG.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sunfish.data.tokenizer import TextTokenizer

IGNORE_INDEX = -100  # target value that the loss ignores (padding)
TOKEN_DTYPE = np.uint16


def write_tokens(path: str | Path, ids: np.ndarray) -> None:
    """Write token ids as raw uint16 (atomically: a reader never sees a half-written file)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError(
            f"{path}: token ids must lie in 0..65535 to be stored as uint16, got {ids.min()}..{ids.max()}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    ids.astype(TOKEN_DTYPE, copy=False).tofile(tmp)
    os.replace(tmp, path)


class TokenStream:
    """A split's tokens as a read-only memmap (no copy in memory, cheap to open per worker)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"token file {self.path} not found; run the prepare stage (dvc repro prepare)"
            )
        size = self.path.stat().st_size
        if size % np.dtype(TOKEN_DTYPE).itemsize:
            raise ValueError(
                f"{self.path}: size {size} bytes is not a whole number of uint16 tokens; re-run prepare"
            )
        if size < 2 * np.dtype(TOKEN_DTYPE).itemsize:
            raise ValueError(
                f"{self.path}: holds fewer than 2 tokens; nothing to predict. "
                "Re-run prepare on a larger corpus"
            )
        self.tokens = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def __len__(self) -> int:
        return self.num_tokens

    def sample_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """``batch_size`` random windows of ``seq_len`` inputs and their next-token targets."""
        if self.num_tokens < seq_len + 1:
            raise ValueError(
                f"{self.path}: {self.num_tokens} tokens cannot fill a window of seq_len={seq_len} + 1; "
                "use a shorter seq_len or a larger corpus / val_fraction"
            )
        starts = torch.randint(0, self.num_tokens - seq_len, (batch_size,), generator=generator).numpy()
        window = self.tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
        return {
            "input_ids": torch.from_numpy(window[:, :-1].copy()),
            "targets": torch.from_numpy(window[:, 1:].copy()),
        }

    def eval_batches(
        self, seq_len: int, batch_size: int, max_tokens: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive non-overlapping windows covering every target (positions 1..N-1) once.

        The last window is padded: padded inputs are 0 and padded targets are -100, so summing the
        loss over non-ignored targets gives the whole split's NLL. With ``max_tokens`` the walk
        stops after that many targets (a cheaper estimate on a prefix of the split). The final
        batch may have fewer than ``batch_size`` rows.
        """
        n_targets = self.num_tokens - 1
        if max_tokens is not None:
            n_targets = min(n_targets, int(max_tokens))
        offsets = np.arange(seq_len)
        for first in range(0, n_targets, seq_len * batch_size):
            starts = np.arange(first, min(first + seq_len * batch_size, n_targets), seq_len)
            pos = starts[:, None] + offsets  # input positions; the target of pos is pos + 1
            valid = pos < n_targets
            # cast before np.where: with uint16 operands -100 would wrap around to 65436
            inputs = self.tokens[np.minimum(pos, n_targets - 1)].astype(np.int64)
            targets = self.tokens[np.minimum(pos + 1, n_targets)].astype(np.int64)
            inputs = np.where(valid, inputs, 0)
            targets = np.where(valid, targets, IGNORE_INDEX)
            yield {"input_ids": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}


# ----------------------------------------------------------------------------------------------
# prompt/text pairs

PAIR_KEYS = ("prompt", "text", "target", "template")


def load_pairs(path: str | Path) -> list[dict]:
    """Read a pairs jsonl file, checking every record has prompt, text, target and template."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} not found; run the prepare stage (dvc repro prepare)")
    records = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg}); re-run prepare") from None
            missing = [k for k in PAIR_KEYS if not isinstance(record, dict) or k not in record]
            if missing:
                raise ValueError(
                    f"{path}:{line_no}: pair record lacks {missing}; expected keys {list(PAIR_KEYS)}"
                )
            records.append(record)
    return records


class PairDataset:
    """Prompt/text pairs tokenized once into fixed-shape tensors.

    text: truncated to ``seq_len`` tokens, followed by eos when it fits (so the model learns where
    a text ends), padded with ``pad_id``. prompt: truncated to ``max_prompt_tokens``, padded. The
    masks mark real tokens; an empty prompt has an all-False mask (the null prompt).
    """

    def __init__(self, records: list[dict], tokenizer: TextTokenizer, seq_len: int, max_prompt_tokens: int):
        if not records:
            raise ValueError("PairDataset needs at least one prompt/text pair; check pairs_*.jsonl")
        self.records = records
        self.seq_len = int(seq_len)
        self.max_prompt_tokens = int(max_prompt_tokens)
        texts = tokenizer.encode_batch([r["text"] for r in records])
        prompts = tokenizer.encode_prompt_batch([r["prompt"] for r in records])
        eos = tokenizer.eos_id
        texts = [ids[:seq_len] + ([eos] if len(ids) < seq_len else []) for ids in texts]
        self.text_ids, self.text_mask = _pad(texts, seq_len, tokenizer.pad_id)
        prompts = [p[:max_prompt_tokens] for p in prompts]
        self.prompt_ids, self.prompt_mask = _pad(prompts, max_prompt_tokens, tokenizer.pad_id)

    def __len__(self) -> int:
        return len(self.records)

    def _batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "text_ids": self.text_ids[index],
            "text_mask": self.text_mask[index],
            "prompt_ids": self.prompt_ids[index],
            "prompt_mask": self.prompt_mask[index],
        }

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``batch_size`` pairs drawn uniformly with replacement."""
        return self._batch(torch.randint(0, len(self), (batch_size,), generator=generator))

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every pair once, in file order; the last batch may be smaller."""
        for first in range(0, len(self), batch_size):
            yield self._batch(torch.arange(first, min(first + batch_size, len(self))))


def _pad(rows: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):  # one loop per record at construction, not per batch
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask
