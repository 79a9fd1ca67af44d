"""The staged LM: causality, exact warm starts, the loss, the MU layout and the graph mask."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sunfish.models.layers as layers
from sunfish.config import ModelPreset, StagedConfig
from sunfish.models import build_model
from sunfish.models.staged import (
    GRAPH_SIMILARITY_BLOCKS,
    MU_BLOCK_INDEX,
    MU_BLOCKS,
    BlockDiagonalLinear,
    MURefinementLayer,
    StagedLM,
    StagedLMConfig,
    fibonacci_offsets,
    graph_attention_mask,
    mu_blocks,
    mu_matrix,
    mu_state,
)

VOCAB = 48
T = 24


def tiny_config(stage: int = 0, mu_full: bool = True, **overrides) -> StagedLMConfig:
    base = dict(
        vocab_size=VOCAB, n_layer=2, n_head=2, d_model=16, d_ff=32, max_seq_len=32, stage=stage,
        mu_full=mu_full, mu_layers=1, temporal_dim=8, graph_window=2, graph_top_k=2, graph_shortcuts=2,
    )
    base.update(overrides)
    return StagedLMConfig(**base)


def make_model(
    stage: int = 0, mu_full: bool = True, seed: int = 0, live: bool = True, **overrides
) -> StagedLM:
    """A tiny model; ``live`` gives the zero-initialised branches non-zero values so they matter."""
    torch.manual_seed(seed)
    model = StagedLM(tiny_config(stage, mu_full, **overrides)).eval()
    if live:
        with torch.no_grad():
            if stage >= 1:
                model.temporal.weight.normal_(0.0, 0.5)
            for block in model.blocks:
                if block.graph_gate is not None:
                    block.graph_gate.fill_(0.8)
    return model


def random_ids(batch: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


STAGE_MODES = [(s, full) for s in range(4) for full in (True, False)]


# ----------------------------------------------------------------------------------------------
# causality


@pytest.mark.parametrize("stage,mu_full", STAGE_MODES)
def test_changing_a_later_token_leaves_earlier_logits_unchanged(stage, mu_full):
    model = make_model(stage, mu_full, mu_layers=2)
    ids = random_ids()
    with torch.no_grad():
        base = model(ids)
        for t in (0, 5, 11, T - 2):
            changed = ids.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1 + torch.arange(2)) % VOCAB
            out = model(changed)
            same = torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5)
            assert same, f"position <= {t} saw token {t + 1}"
            assert not torch.allclose(out[:, t + 1], base[:, t + 1]), "the changed token itself must matter"


@pytest.mark.parametrize("mu_full", [True, False])
def test_gradient_of_early_logits_never_reaches_later_tokens(mu_full):
    """A second, independent causality check through autograd (stage 3: every branch)."""
    model = make_model(3, mu_full)
    ids = random_ids(1)
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["x"] = output

    table = model.mu.embed if mu_full else model.embed
    handle = table.register_forward_hook(keep)
    logits = model(ids)
    handle.remove()
    t = 9
    logits[0, : t + 1].sum().backward()
    grad = captured["x"].grad[0].abs().sum(-1)
    assert grad[: t + 1].sum() > 0
    assert torch.all(grad[t + 1 :] == 0), "early logits depend on later input embeddings"


# ----------------------------------------------------------------------------------------------
# warm start


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("mu_full", [True, False])
def test_warm_start_first_logits_equal_previous_stage(stage, mu_full):
    previous = make_model(stage - 1, mu_full, seed=3)
    ids = random_ids()
    batch = {"input_ids": ids, "targets": torch.roll(ids, -1, 1)}
    # train the previous stage one step so its weights are not an init
    previous.train()
    opt = torch.optim.AdamW(previous.parameters(), lr=1e-2)
    previous.training_loss(batch)[0].backward()
    opt.step()
    previous.eval()
    torch.manual_seed(123)  # the new model's init draws must not matter
    model = StagedLM.warm_start(previous, tiny_config(stage, mu_full))
    assert model.config.stage == stage
    with torch.no_grad():
        assert torch.equal(model(ids), previous(ids))
        assert model.training_loss(batch)[0].item() == previous.training_loss(batch)[0].item()
    # every shared weight was copied
    new_state = model.state_dict()
    for name, value in previous.state_dict().items():
        assert torch.equal(new_state[name], value), name
    # and the new branch is live: it gets a gradient and changes the output once moved
    model.train()
    model.training_loss(batch)[0].backward()
    if stage == 1:
        assert model.temporal.weight.grad.abs().sum() > 0
        with torch.no_grad():
            model.temporal.weight.normal_(0, 0.5)
    if stage == 3:
        assert all(b.graph_gate.grad.abs().sum() > 0 for b in model.blocks)
        with torch.no_grad():
            for b in model.blocks:
                b.graph_gate.fill_(1.0)
    if stage in (1, 3):
        model.eval()
        with torch.no_grad():
            assert not torch.allclose(model(ids), previous(ids))


def test_warm_start_rejects_other_shapes_and_going_back():
    previous = make_model(1)
    with pytest.raises(ValueError):
        StagedLM.warm_start(previous, tiny_config(2, d_model=32))
    with pytest.raises(ValueError):
        StagedLM.warm_start(previous, tiny_config(0))


# ----------------------------------------------------------------------------------------------
# loss and nll


def manual_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    logp = torch.log_softmax(logits.double(), dim=-1)
    total, n = 0.0, 0
    for b in range(targets.size(0)):
        for t in range(targets.size(1)):
            y = int(targets[b, t])
            if y != -100:
                total -= float(logp[b, t, y])
                n += 1
    return total, n


@pytest.mark.parametrize("stage", [0, 3])
def test_padding_never_counts_in_the_loss(stage):
    model = make_model(stage)
    ids = random_ids(3, 10)
    targets = torch.roll(ids, -1, 1)
    targets[0, 6:] = -100
    targets[1, :] = -100  # a row with nothing to predict must not produce NaN
    targets[2, 0] = -100
    batch = {"input_ids": ids, "targets": targets}
    loss, metrics = model.training_loss(batch)
    with torch.no_grad():
        total, n = manual_nll(model(ids), targets)
    assert metrics["tokens"] == n == 6 + 0 + 9
    assert loss.item() == pytest.approx(total / n, rel=1e-5)
    # padded positions get no gradient through the logits
    logits = model(ids).detach().requires_grad_(True)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100).backward()
    assert torch.all(logits.grad[1] == 0) and torch.all(logits.grad[0, 6:] == 0)
    everything_padded = {"input_ids": ids, "targets": torch.full_like(ids, -100)}
    loss, metrics = model.training_loss(everything_padded)
    assert loss.item() == 0.0 and metrics["tokens"] == 0


def test_nll_is_token_weighted_sum():
    model = make_model(1, mu_full=False)
    ids = random_ids(2, 8)
    targets = torch.roll(ids, -1, 1)
    targets[0, 3:] = -100  # row 0: 3 tokens, row 1: 8 tokens
    total, n = model.nll({"input_ids": ids, "targets": targets})
    with torch.no_grad():
        expected, expected_n = manual_nll(model(ids), targets)
    assert n == expected_n == 11
    assert isinstance(n, int) and total.dim() == 0
    assert total.item() == pytest.approx(expected, rel=1e-6)
    # token weighting: summing over two halves reproduces the whole, a mean of means would not
    t0, n0 = model.nll({"input_ids": ids[:1], "targets": targets[:1]})
    t1, n1 = model.nll({"input_ids": ids[1:], "targets": targets[1:]})
    assert (t0 + t1).item() == pytest.approx(total.item(), rel=1e-6) and n0 + n1 == n


def test_a_few_steps_learn_something():
    torch.manual_seed(0)
    model = StagedLM(tiny_config(0, True, d_model=32))
    ids = random_ids(4, 16)
    batch = {"input_ids": ids, "targets": torch.roll(ids, -1, 1)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model.training_loss(batch)[0].item()
    assert abs(first - math.log(VOCAB)) < 0.3 * math.log(VOCAB)
    for _ in range(40):
        loss, _ = model.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


# ----------------------------------------------------------------------------------------------
# MU


def test_mu_layout_blocks_are_the_2x2_tiles_in_row_major_order():
    assert MU_BLOCKS == ("I", "S", "C1", "C2", "R1", "R2", "T", "K", "G", "M", "D", "F", "P", "E", "A", "X")
    matrix = torch.arange(64.0).view(8, 8)
    blocks = mu_blocks(mu_state(matrix))
    assert blocks.shape == (16, 4)
    assert blocks[MU_BLOCK_INDEX["I"]].tolist() == [0, 1, 8, 9]
    assert blocks[MU_BLOCK_INDEX["S"]].tolist() == [2, 3, 10, 11]
    assert blocks[MU_BLOCK_INDEX["K"]].tolist() == [22, 23, 30, 31]  # block row 1, column 3
    assert blocks[MU_BLOCK_INDEX["G"]].tolist() == [32, 33, 40, 41]
    assert blocks[MU_BLOCK_INDEX["X"]].tolist() == [54, 55, 62, 63]
    state = torch.randn(3, 5, 64)
    assert torch.equal(mu_state(mu_matrix(state)), state)
    assert GRAPH_SIMILARITY_BLOCKS == ("I", "R2", "K")


def test_block_diagonal_linear_keeps_blocks_apart():
    torch.manual_seed(0)
    layer = BlockDiagonalLinear(16, 4, 12)
    x = torch.randn(2, 64)
    changed = x.clone()
    changed[:, 3 * 4 : 4 * 4] += 1.0  # block 3 only
    diff = (layer(changed) - layer(x)).view(2, 16, 12).abs().sum(dim=(0, 2))
    assert diff[3] > 0 and diff.sum() == diff[3]
    assert layer.weight.shape == (16, 12, 4)


def test_mu_refinement_is_one_attention_call_per_kind_not_a_loop_over_blocks(monkeypatch):
    calls = []
    original = layers.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append(tuple(q.shape))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    model = make_model(0, True, n_layer=2, mu_layers=1)
    model(random_ids(2, 10))
    # one per-block call (16 heads of width 4), one cross-block call, one per decoder layer
    assert calls[0] == (2, 16, 10, 4)
    assert calls[1] == (2, 4, 10, 16)
    assert len(calls) == 2 + 2


def test_sensitivity_gate_blends_between_state_and_refinement():
    torch.manual_seed(0)
    layer = MURefinementLayer(max_seq_len=16)
    rope_b = layers.RotaryEmbedding(4, 16)(torch.arange(6))
    rope_c = layers.RotaryEmbedding(16, 16)(torch.arange(6))
    state, affinity = torch.randn(1, 6, 64), torch.randn(1, 6, 16)
    with torch.no_grad():
        layer.sensitivity.weight.zero_()
        layer.sensitivity.bias.fill_(-1e4)  # sigma = 0: keep M
        assert torch.equal(layer(state, affinity, rope_b, rope_c), state)
        layer.sensitivity.bias.fill_(1e4)  # sigma = 1: take Y
        full = layer(state, affinity, rope_b, rope_c)
        bias = torch.full((16,), -1e4)
        bias[MU_BLOCK_INDEX["K"]] = 1e4  # only block K moves
        layer.sensitivity.bias.copy_(bias)
        only_k = layer(state, affinity, rope_b, rope_c)
    assert not torch.allclose(full, state)
    moved = (mu_blocks(only_k) != mu_blocks(state)).any(-1)[0]  # [T, 16]
    assert moved[:, MU_BLOCK_INDEX["K"]].all() and moved.sum() == 6
    k = MU_BLOCK_INDEX["K"]
    assert torch.allclose(mu_blocks(only_k)[..., k, :], mu_blocks(full)[..., k, :])


# ----------------------------------------------------------------------------------------------
# graph routing


def test_fibonacci_offsets_skip_the_band():
    assert fibonacci_offsets(4) == [2, 3, 5, 8]
    assert fibonacci_offsets(3, beyond=4) == [5, 8, 13]
    assert fibonacci_offsets(0, beyond=4) == []


@pytest.mark.parametrize("window,top_k,shortcuts", [(1, 0, 0), (2, 3, 2), (4, 5, 6), (40, 2, 3)])
def test_graph_mask_never_links_to_the_future(window, top_k, shortcuts):
    g = torch.Generator().manual_seed(window)
    feats = F.normalize(torch.randn(3, 30, 12, generator=g), dim=-1)
    pos = torch.arange(30)
    offsets = torch.tensor(fibonacci_offsets(shortcuts, window), dtype=torch.long)
    mask = graph_attention_mask(feats, feats, pos, pos, window=window, top_k=top_k, offsets=offsets)
    assert mask.shape == (3, 30, 30) and mask.dtype == torch.bool
    assert not torch.triu(mask, diagonal=1).any(), "an edge to a later token"
    assert mask.diagonal(dim1=1, dim2=2).all(), "every token sees itself"
    i, j = torch.meshgrid(pos, pos, indexing="ij")
    band = (i - j >= 0) & (i - j <= window)
    assert mask[:, band].all(), "the local band is always linked"
    edges = mask.sum(-1)
    assert (edges <= window + 1 + shortcuts + top_k).all()
    # far enough from the start every row gets exactly top_k semantic edges beyond the fixed ones
    fixed = band | torch.isin(i - j, offsets) & (i - j > 0)
    extra = (mask & ~fixed).sum(-1)
    room = (~fixed & (j < i)).sum(-1)
    assert torch.equal(extra, torch.minimum(room, torch.tensor(top_k)).expand_as(extra))
    # rows computed on their own (KV-cache decoding) equal the full mask's rows
    rows = graph_attention_mask(
        feats[:, 20:], feats, pos[20:], pos, window=window, top_k=top_k, offsets=offsets
    )
    assert torch.equal(rows, mask[:, 20:])


def test_graph_semantic_edges_pick_the_most_similar_earlier_token():
    feats = torch.zeros(1, 12, 3)
    feats[0, :, 0] = 1.0
    feats[0, 2] = torch.tensor([0.0, 1.0, 0.0])  # token 2 and token 11 point the same way
    feats[0, 11] = torch.tensor([0.0, 1.0, 0.0])
    feats[0, 5] = torch.tensor([0.0, 0.0, 1.0])
    pos = torch.arange(12)
    none = torch.zeros(0, dtype=torch.long)
    mask = graph_attention_mask(feats, feats, pos, pos, window=1, top_k=1, offsets=none)
    assert mask[0, 11, 2] and mask[0, 11].sum() == 3  # itself, token 10, and token 2
    assert not mask[0, 4, 5] and not mask[0, 2, 11]
    # equally similar earlier tokens: the most recent wins (reproducible between cached/uncached)
    same = torch.zeros(1, 12, 3)
    same[0, :, 0] = 1.0
    mask = graph_attention_mask(same, same, pos, pos, window=1, top_k=2, offsets=none)
    assert mask[0, 11].nonzero().flatten().tolist() == [8, 9, 10, 11]


def test_stage3_reports_graph_edges():
    model = make_model(3, True, graph_window=2, graph_top_k=1, graph_shortcuts=1)
    model(random_ids(2, 20))
    stats = model.last_graph_stats
    assert 1.0 < stats["graph_edges_per_token"] <= 2 + 1 + 1 + 1
    assert 0.0 < stats["graph_density"] < 1.0
    metrics = model.training_loss({"input_ids": random_ids(1, 8), "targets": random_ids(1, 8)})[1]
    assert "graph_edges_per_token" in metrics


# ----------------------------------------------------------------------------------------------
# configuration, registry, groups


def test_config_round_trip_and_params():
    config = tiny_config(2)
    assert StagedLMConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError):
        StagedLMConfig.from_dict({**config.to_dict(), "bogus": 1})
    staged = StagedConfig()
    preset = ModelPreset(n_layer=2, n_head=2, d_model=32, d_ff=64, seq_len=64)
    c = StagedLMConfig.from_params(staged, preset, vocab_size=300, stage=3, eos_id=0)
    assert (c.vocab_size, c.n_layer, c.d_model, c.max_seq_len, c.stage) == (300, 2, 32, 64, 3)
    assert c.graph_window == staged.graph.window and c.mu_full == staged.mu.full
    assert c.k1_mode == staged.k1.mode
    fixed = ModelPreset(n_layer=2, n_head=2, d_model=32, d_ff=64, seq_len=64, vocab_size=512)
    assert StagedLMConfig.from_params(staged, fixed, 300, 0, 0).vocab_size == 512
    with pytest.raises(ValueError):
        StagedLMConfig(vocab_size=10, d_model=30, n_head=4)


def test_build_model_registry():
    model = build_model("staged", tiny_config(1).to_dict())
    assert isinstance(model, StagedLM) and model.kind == "staged" and model.config.stage == 1
    with pytest.raises(KeyError):
        build_model("nonsense", {})


@pytest.mark.parametrize("stage,mu_full", STAGE_MODES)
def test_components_and_tying(stage, mu_full):
    model = make_model(stage, mu_full)
    groups = {model.component_of(name) for name, _ in model.named_parameters()}
    expected = {"attention", "mlp", "head", "mu" if mu_full else "embedding"}
    expected |= {"temporal"} if stage >= 1 else set()
    expected |= {"graph"} if stage >= 3 else set()
    assert groups == expected
    assert model.tied == (not mu_full)  # the MU table is 64 wide, the head d_model wide
