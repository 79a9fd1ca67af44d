"""The MU token representation of the staged model: the 8x8 semantic matrix and its causal refinement.

MU layout
---------
A token's MU state has 64 values, read as an 8x8 matrix made of sixteen 2x2 blocks, named in
row-major block order by :data:`MU_BLOCKS` (I S C1 C2 / R1 R2 T K / G M D F / P E A X). Inside the
model the state is stored *block-major*: a ``[..., 16, 4]`` tensor (flattened to 64) whose row b is
block ``MU_BLOCKS[b]`` and whose 4 values are the block's 2x2 entries in row-major order, so every
per-block operation is a reshape, never a loop. :func:`mu_matrix` / :func:`mu_state` convert
between this storage and the literal 8x8 matrix. This is the only definition of the layout.

:class:`MUEncoder` turns token ids into refined MU states ``[B, T, 64]``: an embedding table of
MU states, then ``mu_layers`` :class:`MURefinementLayer` (per-block attention, cross-block
attention and an MLP, blended into the state per token and per block by a learned sensitivity).
Everything is causal. :class:`sunfish.models.staged.StagedLM` holds one as ``mu`` (the weight
names ``mu.*`` of stage checkpoints).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sunfish.models.layers import (
    MLP,
    Attention,
    KVCache,
    LayerCache,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    attend,
)

# ----------------------------------------------------------------------------------------------
# the MU layout: defined once

MU_BLOCKS: tuple[str, ...] = (
    "I", "S", "C1", "C2",
    "R1", "R2", "T", "K",
    "G", "M", "D", "F",
    "P", "E", "A", "X",
)  # fmt: skip
MU_BLOCK_SIDE = 2  # each block is 2x2
MU_GRID = 4  # blocks per matrix row / column
MU_MATRIX_SIDE = MU_GRID * MU_BLOCK_SIDE  # 8
MU_N_BLOCKS = MU_GRID * MU_GRID  # 16
MU_BLOCK_SIZE = MU_BLOCK_SIDE * MU_BLOCK_SIDE  # 4
MU_DIM = MU_N_BLOCKS * MU_BLOCK_SIZE  # 64
MU_BLOCK_INDEX: dict[str, int] = {name: i for i, name in enumerate(MU_BLOCKS)}
MU_AFFINITY_DIM = 16  # width of the per-token affinity vector that drives the sensitivity gate
MU_CROSS_HEADS = 4  # heads of the cross-block attention (width 16 each)

assert len(MU_BLOCKS) == MU_N_BLOCKS


def mu_blocks(state: Tensor) -> Tensor:
    """Block view of a (block-major) MU state: ``[..., 64]`` -> ``[..., 16, 4]`` (no copy)."""
    return state.unflatten(-1, (MU_N_BLOCKS, MU_BLOCK_SIZE))


def mu_matrix(state: Tensor) -> Tensor:
    """The literal 8x8 semantic matrix of a block-major state ``[..., 64]`` -> ``[..., 8, 8]``.

    Block b sits at block-row ``b // 4``, block-column ``b % 4``.
    """
    g = state.unflatten(-1, (MU_GRID, MU_GRID, MU_BLOCK_SIDE, MU_BLOCK_SIDE))  # [.., br, bc, i, j]
    return g.transpose(-3, -2).reshape(*state.shape[:-1], MU_MATRIX_SIDE, MU_MATRIX_SIDE)


def mu_state(matrix: Tensor) -> Tensor:
    """Inverse of :func:`mu_matrix`: ``[..., 8, 8]`` -> block-major ``[..., 64]``."""
    # [.., block row, i, block column, j]
    g = matrix.unflatten(-1, (MU_GRID, MU_BLOCK_SIDE)).unflatten(-3, (MU_GRID, MU_BLOCK_SIDE))
    return g.transpose(-3, -2).reshape(*matrix.shape[:-2], MU_DIM)


# ----------------------------------------------------------------------------------------------
# MU


class BlockDiagonalLinear(nn.Module):
    """A linear map applied to each of ``n_blocks`` blocks separately (its own weights per block).

    ``[..., n_blocks * d_in] -> [..., n_blocks * d_out]`` as ONE matmul with a block-diagonal
    weight assembled without a Python loop.
    """

    def __init__(self, n_blocks: int, d_in: int, d_out: int):
        super().__init__()
        self.n_blocks, self.d_in, self.d_out = n_blocks, d_in, d_out
        self.weight = nn.Parameter(torch.empty(n_blocks, d_out, d_in))
        nn.init.normal_(self.weight, 0.0, 0.02)
        self.register_buffer("eye", torch.eye(n_blocks), persistent=False)

    def dense_weight(self) -> Tensor:
        w = torch.einsum("noi,nm->nomi", self.weight, self.eye.to(self.weight.dtype))
        return w.reshape(self.n_blocks * self.d_out, self.n_blocks * self.d_in)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype))


class MURefinementLayer(nn.Module):
    """One causal refinement of the MU states ``[B, T, 64]``.

    1. per-block attention: the 16 blocks are 16 heads of width 4 (block-diagonal q/k/v/out), each
       block attending causally over the sequence — one SDPA call;
    2. the blocks are concatenated (they already are: the state is block-major) and go through a
       cross-block causal attention (full 64-wide projections, 4 heads of width 16, so blocks mix)
       and a GELU MLP; together: Y;
    3. sensitivity blend: ``M' = M + sigma_b * (Y_b - M_b)`` with ``sigma = sigmoid(W a + c)`` per
       token and per block, ``a`` the token's learned affinity vector.
    """

    def __init__(self, max_seq_len: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.norm_block = RMSNorm(MU_DIM)
        self.block_qkv = BlockDiagonalLinear(MU_N_BLOCKS, MU_BLOCK_SIZE, 3 * MU_BLOCK_SIZE)
        self.block_out = BlockDiagonalLinear(MU_N_BLOCKS, MU_BLOCK_SIZE, MU_BLOCK_SIZE)
        self.norm_cross = RMSNorm(MU_DIM)
        self.cross_block = Attention(MU_DIM, MU_CROSS_HEADS, dropout=dropout)
        self.norm_mlp = RMSNorm(MU_DIM)
        self.mlp = MLP(MU_DIM, 4 * MU_DIM, dropout=dropout)
        self.sensitivity = nn.Linear(MU_AFFINITY_DIM, MU_N_BLOCKS)

    def forward(
        self,
        state: Tensor,
        affinity: Tensor,
        rope_block: tuple[Tensor, Tensor],
        rope_cross: tuple[Tensor, Tensor],
        cache_block: LayerCache | None = None,
        cache_cross: LayerCache | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        b, t, _ = state.shape
        causal = attn_mask is None
        qkv = self.block_qkv(self.norm_block(state)).view(b, t, MU_N_BLOCKS, 3, MU_BLOCK_SIZE)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [B, 16, T, 4]: blocks are heads
        q = apply_rotary(q, *rope_block)
        k = apply_rotary(k, *rope_block)
        if cache_block is not None:
            k, v = cache_block.append(k, v)
        p = self.dropout if self.training else 0.0
        o = attend(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=p).transpose(1, 2).reshape(b, t, MU_DIM)
        y = state + self.block_out(o)
        y = y + self.cross_block(self.norm_cross(y), rope=rope_cross, causal=causal, attn_mask=attn_mask,
                                 cache=cache_cross)
        y = y + self.mlp(self.norm_mlp(y))
        sigma = torch.sigmoid(self.sensitivity(affinity)).unsqueeze(-1)  # [B, T, 16, 1]
        return (mu_blocks(state) + sigma * mu_blocks(y - state)).flatten(-2)


class MUEncoder(nn.Module):
    """Token ids -> refined MU states ``[B, T, 64]`` (block-major), causally."""

    def __init__(self, vocab_size: int, n_layers: int, max_seq_len: int, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, MU_DIM)
        self.affinity = nn.Embedding(vocab_size, MU_AFFINITY_DIM) if n_layers else None
        self.layers = nn.ModuleList(MURefinementLayer(max_seq_len, dropout) for _ in range(n_layers))
        self.rope_block = RotaryEmbedding(MU_BLOCK_SIZE, max_seq_len)
        self.rope_cross = RotaryEmbedding(MU_DIM // MU_CROSS_HEADS, max_seq_len)

    def forward(
        self, input_ids: Tensor, positions: Tensor, cache: KVCache | None = None, attn_mask: Tensor | None = None
    ) -> Tensor:
        state = self.embed(input_ids)
        if not self.layers:
            return state
        affinity = self.affinity(input_ids)
        rope_block = self.rope_block(positions)
        rope_cross = self.rope_cross(positions)
        for i, layer in enumerate(self.layers):
            cb = cache.layer(f"mu.{i}.block") if cache is not None else None
            cc = cache.layer(f"mu.{i}.cross") if cache is not None else None
            state = layer(state, affinity, rope_block, rope_cross, cb, cc, attn_mask)
        return state
