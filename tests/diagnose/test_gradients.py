"""Gradient flow and the initial forward pass: every check fires on the fault it exists for.

Deliberately broken models (a branch detached from the graph, an unused parameter, a NaN-producing
layer, over-confident initial logits, a prompt path that never trains, a component built but unused,
a branch scaled nearly shut) go through the check functions directly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sunfish.diagnose.diffusion_checks import check_conditioning_effect
from sunfish.diagnose.gradients import check_gradient_flow
from sunfish.diagnose.init_checks import check_init
from tests.diagnose.helpers import (
    VOCAB,
    DetachedBranch,
    NaNLayer,
    ScaledResidual,
    ar_batch,
    by_name,
    pair_batch,
    tiny_diffusion,
    tiny_lm,
)


def test_detached_layer_is_named_by_gradient_flow():
    model = tiny_lm()
    model.blocks[1] = DetachedBranch(model.blocks[1])
    rows = by_name(check_gradient_flow(model, ar_batch(), name="g"))
    flow = rows["g_flow"]
    assert flow["status"] == "fail"
    assert "blocks.1.block.mlp.up.weight" in flow["details"]["no_grad"]
    assert not any(n.startswith("blocks.0") for n in flow["details"]["no_grad"])
    assert "get no gradient" in flow["message"]


def test_unused_parameter_gets_no_gradient():
    model = tiny_lm()
    model.orphan = nn.Parameter(torch.ones(3))
    flow = by_name(check_gradient_flow(model, ar_batch(), name="g"))["g_flow"]
    assert flow["status"] == "fail" and flow["details"]["no_grad"] == ["orphan"]


def test_nan_layer_fails_nan_and_init_checks():
    model = tiny_lm()
    model.blocks[0] = NaNLayer(model.blocks[0])
    rows = by_name(check_gradient_flow(model, ar_batch(), name="g"))
    assert rows["g_nan"]["status"] == "fail"
    init = by_name(check_init(model, ar_batch(), name="init"))
    assert init["init_logits"]["status"] == "fail"
    assert init["init_loss"]["status"] == "fail"


def test_overconfident_initial_logits_fail_init_loss():
    healthy = by_name(check_init(tiny_lm(), ar_batch(), name="init"))
    assert healthy["init_loss"]["status"] == "ok" and healthy["init_logits"]["status"] == "ok"
    model = tiny_lm()
    with torch.no_grad():
        model.head.weight.mul_(200.0)  # logits far from uniform
    row = by_name(check_init(model, ar_batch(), name="init"))["init_loss"]
    assert row["status"] == "fail" and "over-confident" in row["message"]
    assert "ln(64)" in row["threshold"] and row["value"] > 2 * np.log(VOCAB)


def test_zero_initialised_branches_are_not_flagged():
    """Identity-at-init blocks (zero output projections, zero tables) still receive gradient."""
    for model, b in ((tiny_diffusion(), pair_batch()), (tiny_lm(stage=1), ar_batch(4))):  # stage 1: zero TEMPORAL table
        rows = by_name(check_gradient_flow(model, b, name="g"))
        assert rows["g_flow"]["status"] == "ok", rows["g_flow"]["message"]
        assert rows["g_nan"]["status"] == "ok"


def test_prompt_path_that_never_trains_is_caught():
    healthy = check_conditioning_effect(tiny_diffusion(), [pair_batch(seed=i) for i in range(3)], pair_batch(seed=9))
    assert healthy["status"] == "ok", healthy["message"]
    # the prompt encoder runs without gradient: its weights never train
    frozen_path = tiny_diffusion()
    encoder_forward = frozen_path.prompt_encoder.forward

    def no_grad_forward(*args, **kwargs):
        with torch.no_grad():
            return encoder_forward(*args, **kwargs)

    frozen_path.prompt_encoder.forward = no_grad_forward
    flow = by_name(check_gradient_flow(frozen_path, pair_batch(), name="g"))["g_flow"]
    assert flow["status"] == "fail" and "prompt_encoder" in flow["message"]
    # the prompt never reaches the output: every row is encoded as the null prompt
    deaf = tiny_diffusion()
    encode = deaf.encode_prompt
    deaf.encode_prompt = lambda ids, mask: encode(ids, torch.zeros_like(mask))
    row = check_conditioning_effect(deaf, [pair_batch(seed=i) for i in range(3)], pair_batch(seed=9))
    assert row["status"] == "fail" and "prompt never reaches" in row["message"]


def test_staged_component_built_but_unused_is_named():
    """Stage 1 builds the TEMPORAL table; a forward pass that never uses it leaves it without gradient."""
    model = tiny_lm(stage=1)
    model.temporal_proj.forward = lambda x: x.new_zeros(*x.shape[:-1], model.config.d_model)
    flow = by_name(check_gradient_flow(model, ar_batch(4), name="g"))["g_flow"]
    assert flow["status"] == "fail"
    assert set(flow["details"]["no_grad"]) == {"temporal.weight", "temporal_proj.weight"}
    assert "(temporal)" in flow["message"] and "staged.temporal" in flow["message"]


def test_gradient_figures_per_layer():
    rows = by_name(check_gradient_flow(tiny_lm(), ar_batch(), name="g"))
    per_layer = rows["g_vanishing"]["details"]["per_layer_mean_abs"]
    assert {"blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"} <= set(per_layer)
    assert all(v > 0 for v in per_layer.values())
    assert set(rows["g_exploding"]["details"]["per_layer_norm"]) == set(per_layer)


def test_vanishing_gradient_is_flagged():
    model = tiny_lm()
    model.blocks[1] = ScaledResidual(model.blocks[1], 1e-7)
    rows = by_name(check_gradient_flow(model, ar_batch(), name="g"))
    assert rows["g_vanishing"]["status"] == "warn"
    assert any(n.startswith("blocks.1.") for n in rows["g_vanishing"]["details"]["tensors"])
