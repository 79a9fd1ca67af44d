"""K-1 credit assignment: the error path, component shares and gradient scaling."""

from __future__ import annotations

import pytest
import torch

from sunfish.models.staged import StagedLM, StagedLMConfig
from sunfish.training.k1 import k1_attribution, k1_scale_


def params_with_grad_norms(norms: dict[str, float]) -> list[tuple[str, torch.nn.Parameter]]:
    out = []
    for name, norm in norms.items():
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.tensor([norm, 0.0, 0.0, 0.0])  # L2 norm = norm
        out.append((name, p))
    return out


NORMS = {"mlp.a": 6.0, "attention.b": 3.0, "mlp.c": 1.0}


@pytest.mark.parametrize("mass,size", [(0.5, 1), (0.6, 1), (0.61, 2), (0.9, 2), (0.95, 3), (1.0, 3)])
def test_error_path_is_the_smallest_set_holding_the_mass(mass, size):
    stats = k1_attribution(params_with_grad_norms(NORMS), mass)
    assert stats["k1_path_size"] == size
    assert stats["path_members"] == ["mlp.a", "attention.b", "mlp.c"][:size]
    assert stats["k1_path_share"] == pytest.approx(size / 3)
    assert stats["k1_path_mass"] == pytest.approx([0.6, 0.9, 1.0][size - 1])
    assert stats["k1_path_mass"] >= mass - 1e-6


def test_component_counts_and_norm_shares():
    named = params_with_grad_norms(NORMS)
    frozen = torch.nn.Parameter(torch.ones(3))  # no gradient: ignored
    stats = k1_attribution(named + [("head.frozen", frozen)], 0.9, component_of=lambda n: n.split(".")[0])
    assert stats["k1_tensors"] == 3
    assert stats["k1_grad_norm"] == pytest.approx((36 + 9 + 1) ** 0.5)
    comps = stats["components"]
    assert set(comps) == {"mlp", "attention"}
    assert comps["mlp"] == {"tensors": 2, "path_tensors": 1, "norm_share": pytest.approx(0.7)}
    assert comps["attention"] == {"tensors": 1, "path_tensors": 1, "norm_share": pytest.approx(0.3)}


def test_scale_shrinks_only_below_mean_gradients():
    named = params_with_grad_norms(NORMS)
    stats = k1_scale_(named)
    mean = 10.0 / 3
    got = {name: p.grad.norm().item() for name, p in named}
    assert got["mlp.a"] == pytest.approx(6.0)  # above the mean: untouched
    assert got["attention.b"] == pytest.approx(3.0 * 3.0 / mean)
    assert got["mlp.c"] == pytest.approx(1.0 * 1.0 / mean)
    assert stats["k1_scaled_tensors"] == 2
    assert stats["k1_mean_norm"] == pytest.approx(mean)
    # direction is kept
    assert named[2][1].grad[1:].abs().sum() == 0 and named[2][1].grad[0] > 0


def test_no_gradients_is_harmless():
    p = torch.nn.Parameter(torch.ones(2))
    assert k1_attribution([("x", p)], 0.9)["k1_path_size"] == 0
    assert k1_scale_([("x", p)])["k1_scaled_tensors"] == 0


def test_on_a_staged_model_after_backward():
    torch.manual_seed(0)
    config = StagedLMConfig(
        vocab_size=30, n_layer=2, n_head=2, d_model=16, d_ff=32, max_seq_len=16, stage=2, temporal_dim=4
    )
    model = StagedLM(config)
    ids = torch.randint(0, 30, (2, 12))
    model.training_loss({"input_ids": ids, "targets": torch.roll(ids, -1, 1)})[0].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    stats = k1_attribution(model.named_parameters(), model.config.k1_path_mass, model.component_of)
    assert sum(c["norm_share"] for c in stats["components"].values()) == pytest.approx(1.0)
    assert set(stats["components"]) <= {"mu", "temporal", "attention", "mlp", "head"}
    assert 0 < stats["k1_path_size"] <= stats["k1_tensors"]
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    k1_scale_(model.named_parameters())
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.norm() <= before[n].norm() + 1e-7


@pytest.mark.parametrize("mode", ["log", "scale"])
def test_training_loop_hook(mode):
    from sunfish.training.k1 import make_k1_hook

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.big = torch.nn.Parameter(torch.zeros(4))
            self.small = torch.nn.Parameter(torch.zeros(4))

        def component_of(self, name):
            return "group_" + name

    model = Holder()
    model.big.grad = torch.tensor([6.0, 0, 0, 0])
    model.small.grad = torch.tensor([1.0, 0, 0, 0])
    hook = make_k1_hook(mode, 0.8, every=5)
    metrics = hook(model, 1)
    assert metrics["k1_path_size"] == 1.0 and metrics["k1_norm_share/group_big"] == pytest.approx(6 / 7)
    assert all(isinstance(v, float) for v in metrics.values())
    assert hook.last_attribution["path_members"] == ["big"]
    assert model.small.grad[0].item() == pytest.approx(1.0 / 3.5 if mode == "scale" else 1.0)
    if mode == "log":  # attribution only: no gradient changes, which is why control_2 is not trained
        assert model.big.grad.tolist() == [6.0, 0, 0, 0] and model.small.grad.tolist() == [1.0, 0, 0, 0]
    assert "k1_path_size" not in hook(model, 2)
    with pytest.raises(ValueError):
        make_k1_hook("bogus", 0.9)
