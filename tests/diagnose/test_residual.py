"""Residual branches: a branch scaled by 0.1, a learnable gate at 0.1 or a branch nearly shut is caught,
and every healthy architecture passes with gain 1.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sunfish.diagnose.residual import RESIDUAL_RATIO_MIN, check_residual_branches
from tests.diagnose.helpers import (
    VOCAB,
    ScaledResidual,
    ar_batch,
    by_name,
    pair_batch,
    tiny_diffusion,
    tiny_lm,
)


class GatedResidual(nn.Module):
    """``x + gate * branch(x)`` with a learnable scalar gate (the original SunFish's form of the bug)."""

    def __init__(self, block: nn.Module, value: float):
        super().__init__()
        self.block = block
        self.gate = nn.Parameter(torch.tensor(value))

    def forward(self, x, *args, **kwargs):
        return x + self.gate * (self.block(x, *args, **kwargs) - x)


def _healthy_models():
    from sunfish.models.denoiser import DiffusionConfig, DiffusionLM

    torch.manual_seed(0)
    continuous = DiffusionLM(DiffusionConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, d_ff=64,
                                             max_seq_len=16, prompt_encoder_layers=1, max_prompt_tokens=4,
                                             objective="continuous", self_conditioning=True))
    return {
        "stage_0": (tiny_lm(), ar_batch(4)),
        "stage_0_mu": (tiny_lm(mu_full=True), ar_batch(4)),
        "stage_1": (tiny_lm(stage=1), ar_batch(4)),
        "stage_3_mu": (tiny_lm(stage=3, mu_full=True, graph_window=4, graph_top_k=2, graph_shortcuts=2), ar_batch(4)),
        "deep": (tiny_lm(n_layer=6), ar_batch(4)),
        "cfg_masked": (tiny_diffusion(), pair_batch()),
        "cfg_continuous": (continuous, pair_batch()),
    }


def test_healthy_residual_branches_have_gain_one():
    """No false alarm: every healthy architecture (staged stages, MU on/off, deeper, both diffusion
    objectives with zero-initialised branches) adds its branches with gain 1, whatever its ratio."""
    for label, (model, batch) in _healthy_models().items():
        rows = by_name(check_residual_branches(model, batch))
        ratio, gain = rows["residual_branches"], rows["residual_gain"]
        assert ratio["status"] == "ok" and ratio["value"] > RESIDUAL_RATIO_MIN, (label, ratio["message"])
        assert gain["status"] == "ok", (label, gain["message"])
        assert gain["value"] == pytest.approx(1.0, abs=1e-3), label


def test_residual_scaled_by_a_tenth_is_caught():
    """The original's worst bug: ``x + 0.1 * f(x)``. Its ratio looks healthy (0.1 x a healthy 0.6), so
    only the gain row catches it; in every block, in one block, and in every architecture."""
    for label, (model, batch) in _healthy_models().items():
        for i, block in enumerate(model.blocks):
            model.blocks[i] = ScaledResidual(block, 0.1)
        gain = by_name(check_residual_branches(model, batch))["residual_gain"]
        assert gain["status"] == "warn", (label, gain["message"])
        assert gain["value"] == pytest.approx(0.1, abs=1e-3), label
        assert "worst bug" in gain["message"] and "x = x + f(x)" in gain["message"]
    model = tiny_lm()
    model.blocks[1] = ScaledResidual(model.blocks[1], 0.1)
    rows = by_name(check_residual_branches(model, ar_batch(4)))
    assert rows["residual_branches"]["status"] == "ok"  # the ratio alone misses it ...
    gain = rows["residual_gain"]
    assert gain["status"] == "warn" and "blocks.1 0.1" in gain["message"]  # ... the gain names the block
    assert "blocks.0" not in gain["message"] and "a constant" in gain["message"]
    assert gain["details"]["blocks.0"]["gain"] == pytest.approx(1.0, abs=1e-3)


def test_learnable_residual_gate_is_named():
    model = tiny_lm()
    for i, block in enumerate(model.blocks):
        model.blocks[i] = GatedResidual(block, 0.1)
    gain = by_name(check_residual_branches(model, ar_batch(4), name="stage_0/residual_branches"))[
        "stage_0/residual_gain"]
    assert gain["status"] == "warn"
    assert 0.05 < gain["value"] < 0.2  # the gate itself trains for the 3 steps
    assert "blocks.0.gate" in gain["message"] and "blocks.1.gate" in gain["message"]
    # a gate of 1 is fine
    model = tiny_lm()
    for i, block in enumerate(model.blocks):
        model.blocks[i] = GatedResidual(block, 1.0)
    assert by_name(check_residual_branches(model, ar_batch(4)))["residual_gain"]["status"] == "ok"
    # the stage-3 graph gate (zero-initialised, inside attention) is not blamed for a constant scale
    model = tiny_lm(stage=3, graph_window=4)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = ScaledResidual(block, 0.1)
    gain = by_name(check_residual_branches(model, ar_batch(4)))["residual_gain"]
    assert gain["status"] == "warn" and "graph_gate" not in gain["message"] and "a constant" in gain["message"]


def test_residual_scaled_nearly_shut_warns_both_rows():
    gated = tiny_lm()
    for i, block in enumerate(gated.blocks):
        gated.blocks[i] = ScaledResidual(block, 0.001)
    rows = by_name(check_residual_branches(gated, ar_batch(4)))
    row = rows["residual_branches"]
    assert row["status"] == "warn", row["message"]
    assert row["value"] < RESIDUAL_RATIO_MIN
    assert "gate" in row["message"]
    assert rows["residual_gain"]["status"] == "warn"
