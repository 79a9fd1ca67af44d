"""The one transformer kit of both model families: the staged LM (and the block denoiser built
on it) and the diffusion denoiser with its prompt encoder.

One kit so that a fix to masking, RoPE or initialisation reaches every model. The families differ
in a few places that their checkpoints and trained numerics depend on, and those are options
here rather than second copies: the norm (RMSNorm vs LayerNorm with bias), the attention
projections (one fused ``qkv`` vs ``query`` + ``key_value``, the latter also serving
cross-attention) and the precision RoPE rotates in. The staged LM keeps the defaults; the diffusion
family's choices are ``prompt_encoder.BLOCK_OPTIONS``.

Mask conventions (the same everywhere, and the same as ``scaled_dot_product_attention``):
boolean, **True = may attend**. ``attn_mask`` broadcasts to ``[B, H, Tq, Tk]`` (so ``[Tq, Tk]``,
``[B, 1, Tq, Tk]`` ...). ``key_padding_mask`` is ``[B, Tk]`` with True = a real key (the data
contract's ``text_mask`` / ``prompt_mask``). A query whose keys are all padding (a batch row
without any text) attends to every key instead of producing NaN; such a row is padding throughout
and nothing reads its outputs.

Tensor layout inside attention: ``[B, H, T, head_dim]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RMSNorm",
    "make_norm",
    "RotaryEmbedding",
    "apply_rotary",
    "causal_mask",
    "attend",
    "Attention",
    "MLP",
    "TransformerBlock",
    "LayerCache",
    "KVCache",
    "init_weights",
    "zero_residual_outputs",
    "scaled_residual_std",
]


# ----------------------------------------------------------------------------------------------
# normalisation


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dimension (weight starts at 1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != self.weight.dtype:  # e.g. bf16 activations under autocast: normalise in fp32
            return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).to(x.dtype)
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(kind: str, dim: int) -> nn.Module:
    """``"rms"``: :class:`RMSNorm`, the staged LM's. ``"layer"``: ``nn.LayerNorm``, the diffusion
    family's, whose checkpoints carry its bias and whose numerics were trained with it."""
    if kind == "rms":
        return RMSNorm(dim)
    if kind == "layer":
        return nn.LayerNorm(dim)
    raise ValueError(f"unknown norm {kind!r}; known: 'rms', 'layer'")


# ----------------------------------------------------------------------------------------------
# rotary position embedding


class RotaryEmbedding(nn.Module):
    """RoPE tables for one head width.

    ``rope(positions)`` returns ``(cos, sin)``, each ``[T, head_dim // 2]`` (float32), for a 1-D
    LongTensor of absolute positions; pass them to :func:`apply_rotary` or to
    ``Attention(..., rope=(cos, sin))``. Tables are precomputed for ``max_seq_len`` positions and
    computed on the fly beyond that. They are non-persistent buffers (not in checkpoints).
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head width, got {head_dim}")
        self.head_dim = head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        t = torch.arange(max_seq_len, dtype=torch.float32)
        angles = torch.outer(t, inv_freq)
        self.register_buffer("cos_table", angles.cos(), persistent=False)
        self.register_buffer("sin_table", angles.sin(), persistent=False)

    def forward(self, positions: Tensor | int) -> tuple[Tensor, Tensor]:
        """``positions`` may be an int n for positions ``0 .. n-1``: sliced from the tables without
        reading a tensor on the host, so a GPU forward pass does not wait for it."""
        if isinstance(positions, int):
            if positions <= self.cos_table.size(0):
                return self.cos_table[:positions], self.sin_table[:positions]
            positions = torch.arange(positions, device=self.cos_table.device)
        positions = positions.to(self.cos_table.device)
        if positions.numel() and int(positions.max()) >= self.cos_table.size(0):
            angles = torch.outer(positions.float(), self.inv_freq)
            return angles.cos(), angles.sin()
        return self.cos_table[positions], self.sin_table[positions]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, upcast: bool = False) -> Tensor:
    """Rotate ``x [..., T, D]`` by the angles of ``cos/sin [T, D/2]`` (half-split convention).

    By default the tables are cast to ``x``'s dtype, so under bf16 autocast the rotation stays in
    bf16. ``upcast=True`` rotates in the tables' float32 and rounds once at the end: the diffusion
    family has always done so, and its bf16 numerics stay what they were trained with.
    """
    if not upcast:
        cos = cos.to(x.dtype)
        sin = sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# attention


def causal_mask(n_query: int, n_key: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean ``[n_query, n_key]`` causal mask, bottom-right aligned.

    The queries are taken to be the *last* ``n_query`` positions of the ``n_key`` keys, so query i
    (absolute position ``n_key - n_query + i``) sees keys ``0 .. n_key - n_query + i``.
    """
    offset = n_key - n_query
    q = torch.arange(n_query, device=device).unsqueeze(1) + offset
    k = torch.arange(n_key, device=device).unsqueeze(0)
    return k <= q


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Scaled dot-product attention over ``[B, H, T, D]`` tensors with composed boolean masks.

    - ``causal``: no query attends to a later key; with fewer queries than keys the queries are
      the last positions (KV-cache decoding). Uses the fast ``is_causal`` path when it can.
    - ``attn_mask``: boolean, True = may attend, broadcastable to ``[B, H, Tq, Tk]``.
    - ``key_padding_mask``: boolean ``[B, Tk]``, True = real key. Queries with no real key at all
      attend to every key (not NaN; their outputs are padding). All real keys means no mask, which
      keeps the fast unmasked kernels; checking costs one host sync.
    Returns ``[B, H, Tq, D]``.
    """
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    n_query, n_key = q.size(-2), k.size(-2)
    mask = attn_mask
    is_causal = False
    if causal:
        if mask is None and key_padding_mask is None and n_query == n_key:
            is_causal = True
        elif n_query == 1 and mask is None:
            pass  # the last position sees every key
        else:
            c = causal_mask(n_query, n_key, q.device)
            mask = c if mask is None else mask & c
    if key_padding_mask is not None:
        keep = key_padding_mask | ~key_padding_mask.any(dim=-1, keepdim=True)  # rows without a real key: all
        keep = keep[:, None, None, :]
        mask = keep if mask is None else mask & keep
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


@dataclass
class LayerCache:
    """Keys and values of one attention layer, ``[B, H, T_cached, D]`` each (None when empty)."""

    k: Tensor | None = None
    v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.size(-2)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new keys/values and return all of them."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k), dim=-2)
            self.v = torch.cat((self.v, v), dim=-2)
        return self.k, self.v


@dataclass
class KVCache:
    """A model's decoding cache: named :class:`LayerCache` entries plus free-form ``extras``.

    ``length`` is the number of positions already processed; the model advances it at the end
    of each forward call. Create an empty one and pass it to every forward call of a decode.
    """

    layers: dict[str, LayerCache] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    length: int = 0

    def fork(self) -> KVCache:
        """A cache that extends this one without changing it (appends build new tensors): a
        look-ahead pass, e.g. denoising a block that is not final yet."""
        return KVCache({k: LayerCache(c.k, c.v) for k, c in self.layers.items()}, dict(self.extras), self.length)

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on: a pass that both appended finished tokens and
        looked ahead at a block still being denoised keeps only the finished ones."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        for c in self.layers.values():
            if c.k is not None:
                c.k, c.v = c.k[..., :length, :], c.v[..., :length, :]
        self.length = length

    def select(self, rows: Tensor) -> KVCache:
        """A cache of the rows ``rows`` (an index or boolean over the batch) that extends this one
        without changing it, as :meth:`fork` does."""
        return KVCache({k: LayerCache(None if c.k is None else c.k[rows], None if c.v is None else c.v[rows])
                        for k, c in self.layers.items()}, dict(self.extras), self.length)

    def layer(self, name: str) -> LayerCache:
        if name not in self.layers:
            self.layers[name] = LayerCache()
        return self.layers[name]


class Attention(nn.Module):
    """Multi-head attention with RoPE, composed masks and an optional KV cache.

    Two projection layouts, one per model family, because each family's checkpoints hold its own:
    ``fused_qkv=True`` (the staged LM) projects ``x`` once to q, k and v (``qkv``), so it is
    self-attention only; ``fused_qkv=False`` (the diffusion family) has a ``query`` projection of
    ``x`` and a ``key_value`` projection of ``context`` (width ``context_dim``), or of ``x`` when
    no context is given, so the same class does cross-attention. ``rope_fp32``: see
    :func:`apply_rotary`.

    ``forward(x, context=None, *, rope=None, causal=False, attn_mask=None,
    key_padding_mask=None, cache=None) -> [B, T, d_model]``.
    The pieces are public (``project``, ``attend``, ``merge``) so a model can do something of its
    own between them (the staged LM's graph-gated attention does).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        dropout: float = 0.0,
        fused_qkv: bool = True,
        context_dim: int | None = None,
        bias: bool = False,
        rope_fp32: bool = False,
    ):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"n_head={n_head} does not divide d_model={d_model}")
        if fused_qkv and context_dim is not None:
            raise ValueError("a fused qkv projection reads x only: cross-attention needs fused_qkv=False")
        self.d_model = d_model
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.dropout = dropout
        self.fused_qkv = fused_qkv
        self.rope_fp32 = rope_fp32
        if fused_qkv:
            self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        else:
            self.query = nn.Linear(d_model, d_model, bias=bias)
            self.key_value = nn.Linear(context_dim or d_model, 2 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def project(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: LayerCache | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q ``[B, H, Tq, hd]`` and k, v ``[B, H, Tk, hd]`` (RoPE applied, cache extended).

        ``rope`` rotates q and k by the same positions, so it is for self-attention: a prompt's
        positions and a text's are unrelated.
        """
        b, t, _ = x.shape
        if self.fused_qkv:
            if context is not None:
                raise ValueError("a fused qkv projection reads x only: cross-attention needs fused_qkv=False")
            qkv = self.qkv(x).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            source = x if context is None else context
            q = self.query(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
            kv = self.key_value(source).view(b, source.size(1), 2, self.n_head, self.head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q = apply_rotary(q, *rope, upcast=self.rope_fp32)
            k = apply_rotary(k, *rope, upcast=self.rope_fp32)
        if cache is not None:
            k, v = cache.append(k, v)
        return q, k, v

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        p = self.dropout if self.training else 0.0
        return attend(
            q, k, v, causal=causal, attn_mask=attn_mask, key_padding_mask=key_padding_mask, dropout_p=p
        )

    def merge(self, heads: Tensor) -> Tensor:
        """``[B, H, T, hd]`` -> output projection ``[B, T, d_model]``."""
        return self.out(heads.transpose(1, 2).flatten(2))

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        causal: bool = False,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        q, k, v = self.project(x, context, rope=rope, cache=cache)
        heads = self.attend(q, k, v, causal=causal, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        return self.merge(heads)


# ----------------------------------------------------------------------------------------------
# feed-forward and block


class MLP(nn.Module):
    """``Linear(d_model, d_ff) -> GELU -> Linear(d_ff, d_model) -> dropout``."""

    def __init__(self, d_model: int, d_ff: int, *, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x += attn(norm(x))``; [``x += cross(norm(x), context)``]; ``x += mlp(norm(x))``.

    The diffusion denoiser's blocks (with ``cross_attention``) and its prompt encoder's layers
    (without). The attribute names are the state_dict keys of their checkpoints; ``norm``,
    ``fused_qkv`` and ``rope_fp32`` are passed to :func:`make_norm` and :class:`Attention`. The
    staged LM has its own block because its attention is the graph-gated blend.

    ``forward(x, *, rope=None, causal=False, attn_mask=None, key_padding_mask=None, context=None,
    context_padding_mask=None, cache=None)``. ``key_padding_mask`` masks the block's own keys
    (self-attention), ``context_padding_mask`` the context's (cross-attention).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_ff: int,
        *,
        dropout: float = 0.0,
        cross_attention: bool = False,
        context_dim: int | None = None,
        norm: str = "rms",
        fused_qkv: bool = True,
        rope_fp32: bool = False,
    ):
        super().__init__()
        options = {"dropout": dropout, "rope_fp32": rope_fp32}
        self.norm_attention = make_norm(norm, d_model)
        self.attention = Attention(d_model, n_head, fused_qkv=fused_qkv, **options)
        self.norm_cross = make_norm(norm, d_model) if cross_attention else None
        self.cross_attention = (
            Attention(d_model, n_head, fused_qkv=False, context_dim=context_dim, **options)
            if cross_attention
            else None
        )
        self.norm_mlp = make_norm(norm, d_model)
        self.mlp = MLP(d_model, d_ff, dropout=dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        causal: bool = False,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_padding_mask: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        x = x + self.dropout(
            self.attention(
                self.norm_attention(x),
                rope=rope,
                causal=causal,
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
                cache=cache,
            )
        )
        if self.cross_attention is not None:
            if context is None:
                raise ValueError("a block with cross-attention needs a context")
            cross = self.cross_attention(self.norm_cross(x), context, key_padding_mask=context_padding_mask)
            x = x + self.dropout(cross)
        return x + self.mlp(self.norm_mlp(x))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-style init: normal(0, std) for Linear/Embedding weights, zero biases, unit norms.

    Modules on the meta device are skipped: a parameter count builds the model there and has
    nothing to initialise.
    """
    for m in module.modules():
        if any(p.is_meta for p in m.parameters(recurse=False)):
            continue
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, (nn.LayerNorm, RMSNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def zero_residual_outputs(module: nn.Module) -> None:
    """Zero the output projection of every residual branch (each :class:`Attention`'s ``out``, each
    :class:`MLP`'s ``down``), so every block starts as the identity: the diffusion family's init,
    measured in the denoiser's module docstring."""
    for m in module.modules():
        if isinstance(m, Attention) and not m.out.weight.is_meta:
            nn.init.zeros_(m.out.weight)
        elif isinstance(m, MLP) and not m.down.weight.is_meta:
            nn.init.zeros_(m.down.weight)


def scaled_residual_std(n_layer: int, std: float = 0.02) -> float:
    """Std for the output projections that write into the residual stream (GPT-2: std/sqrt(2L))."""
    return std / math.sqrt(2 * n_layer)
