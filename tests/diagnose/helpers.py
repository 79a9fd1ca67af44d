"""Tiny models and batches for the diagnose tests, some broken on purpose.

Everything is tiny and single-threaded, so that each check runs in well under a second.
"""

from __future__ import annotations

import torch
from torch import nn

from sunfish.models.staged import StagedLM, StagedLMConfig

torch.set_num_threads(1)

VOCAB = 64


# ----------------------------------------------------------------------------------------------
# tiny models, broken on purpose


def tiny_lm(**over) -> StagedLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=32, mu_full=False)
    cfg.update(over)
    return StagedLM(StagedLMConfig(**cfg))


def ar_batch(rows: int = 2, length: int = 16, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (rows, length + 1), generator=gen)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}


def tiny_diffusion():
    from sunfish.models.denoiser import DiffusionConfig, DiffusionLM

    torch.manual_seed(0)
    return DiffusionLM(DiffusionConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=16,
                                       prompt_encoder_layers=1, max_prompt_tokens=4))


def pair_batch(rows: int = 4, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"text_ids": torch.randint(2, VOCAB, (rows, 16), generator=gen),
            "text_mask": torch.ones(rows, 16, dtype=torch.bool),
            "prompt_ids": torch.randint(2, VOCAB, (rows, 4), generator=gen),
            "prompt_mask": torch.ones(rows, 4, dtype=torch.bool)}


class DetachedBranch(nn.Module):
    """The block's branch is computed but cut from the graph: its weights never get a gradient."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x, *args, **kwargs):
        return x + (self.block(x, *args, **kwargs) - x).detach()


class ScaledResidual(nn.Module):
    """``x + scale * branch(x)``: the original's gated residual."""

    def __init__(self, block: nn.Module, scale: float):
        super().__init__()
        self.block, self.scale = block, scale

    def forward(self, x, *args, **kwargs):
        return x + self.scale * (self.block(x, *args, **kwargs) - x)


class NaNLayer(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x, *args, **kwargs):
        y = self.block(x, *args, **kwargs)
        return y + torch.sqrt(torch.full_like(y, -1.0))  # NaN everywhere


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows}
