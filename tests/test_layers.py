"""The shared transformer kit: the diffusion family's options keep its checkpoints and numerics."""

from __future__ import annotations

import pytest
import torch

from sunfish.models.denoiser import DiffusionConfig, DiffusionLM
from sunfish.models.layers import Attention, RotaryEmbedding, apply_rotary, attend

# The layout of one denoiser block and one prompt-encoder layer in existing checkpoints (d_model 8,
# d_ff 16), as written before the two model families shared one kit.
ENCODER_LAYER = {
    "norm_attention.weight": (8,), "norm_attention.bias": (8,),
    "attention.query.weight": (8, 8), "attention.key_value.weight": (16, 8), "attention.out.weight": (8, 8),
    "norm_mlp.weight": (8,), "norm_mlp.bias": (8,), "mlp.up.weight": (16, 8), "mlp.down.weight": (8, 16),
}  # fmt: skip
DENOISER_BLOCK = {
    **ENCODER_LAYER,
    "norm_cross.weight": (8,), "norm_cross.bias": (8,), "cross_attention.query.weight": (8, 8),
    "cross_attention.key_value.weight": (16, 8), "cross_attention.out.weight": (8, 8),
}  # fmt: skip


def test_denoiser_checkpoint_layout_is_unchanged():
    config = DiffusionConfig(vocab_size=40, n_layer=1, n_head=2, d_model=8, d_ff=16, max_seq_len=16,
                             prompt_encoder_layers=1, max_prompt_tokens=4)
    model = DiffusionLM(config)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for prefix, layout in (("blocks.0.", DENOISER_BLOCK), ("prompt_encoder.layers.0.", ENCODER_LAYER)):
        assert {k[len(prefix):]: s for k, s in state.items() if k.startswith(prefix)} == layout


def test_upcast_rope_rounds_once_like_the_rotate_half_form():
    """The diffusion family rotated bf16 activations in float32 (x * cos + rotate_half(x) * sin,
    rounded once); ``upcast=True`` must give exactly that, the default need not."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g).bfloat16()
    cos, sin = RotaryEmbedding(8, 16)(5)
    full_cos, full_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    rotated = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
    reference = (x * full_cos + rotated * full_sin).to(x.dtype)
    assert torch.equal(apply_rotary(x, cos, sin, upcast=True), reference)
    xf = x.float()  # in float32 the half-split form is the same arithmetic, bit for bit
    assert torch.equal(apply_rotary(xf, cos, sin), xf * full_cos + rotated.float() * full_sin)


def test_int_positions_slice_the_tables_and_extend_past_them():
    rope = RotaryEmbedding(4, 6)
    for n in (3, 6, 9):
        cos, sin = rope(n)
        ref_cos, ref_sin = rope(torch.arange(n))
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin) and cos.shape == (n, 2)


def test_key_padding_all_real_is_no_mask_and_an_empty_row_stays_finite():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 4, 8, generator=g) for _ in range(3))
    assert torch.equal(attend(q, k, v, key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), attend(q, k, v))
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    out = attend(q, k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], attend(q[:1], k[:1, :, :2], v[:1, :, :2])[0], atol=1e-6)


def test_cross_attention_reads_the_context_and_a_fused_projection_refuses_one():
    attn = Attention(8, 2, fused_qkv=False, context_dim=6)
    x, context = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    assert attn(x, context).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="fused_qkv=False"):
        Attention(8, 2)(x, torch.randn(2, 5, 8))
