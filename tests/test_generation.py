"""Decoding: KV-cached generation matches the uncached model, and the sampling controls."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sunfish.generation import (
    apply_repetition_penalty,
    choose_token,
    choose_tokens,
    filter_top_k,
    filter_top_p,
    generate,
    generate_many,
)
from sunfish.models.staged import StagedLM
from tests.test_models_staged import make_model

VOCAB = 40


def live_model(stage: int, mu_full: bool, max_seq_len: int = 16) -> StagedLM:
    """A tiny model whose zero-initialised branches are switched on (shared with the model tests)."""
    return make_model(stage, mu_full, seed=stage + 10 * mu_full, vocab_size=VOCAB, max_seq_len=max_seq_len)


# ----------------------------------------------------------------------------------------------
# the sampling controls


def test_ctrl_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 1.0, -0.5])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, -0.5], "the input is not modified"
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([0]), 1.0), logits)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    kept = torch.isfinite(filter_top_k(logits, 2))
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(filter_top_k(logits, 0)).all()
    assert torch.isfinite(filter_top_p(logits, 0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_top_p(logits, 0.5)).tolist() == [True, False, False, False]
    assert torch.isfinite(filter_top_p(logits, 0.1)).tolist() == [True, False, False, False]
    shuffled = logits[[2, 0, 3, 1]]
    assert torch.isfinite(filter_top_p(shuffled, 0.7)).tolist() == [False, True, False, True]


class FixedModel(torch.nn.Module):
    """Always predicts the same logits: token 3 first, token 5 second, both positive."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_seq_len=8, eos_id=0)

    def init_cache(self):
        return SimpleNamespace(length=0)

    def forward(self, ids, cache=None):
        if cache is not None:
            cache.length += ids.size(1)
            assert cache.length <= self.config.max_seq_len
        logits = torch.full((ids.size(0), ids.size(1), 8), -1.0)
        logits[..., 3] = 4.0
        logits[..., 5] = 3.0
        return logits


def test_generate_applies_the_penalty_to_the_context_and_stops_at_eos():
    model = FixedModel()
    assert generate(model, [1], max_new_tokens=3, temperature=0) == [3, 3, 3]
    # 4 / 2 = 2 < 3: token 3 is penalised once it is in the context, then 5 too (3/2 = 1.5 < 2)
    assert generate(model, [1], max_new_tokens=3, temperature=0, repetition_penalty=2.0) == [3, 5, 3]
    assert generate(model, [3], max_new_tokens=1, temperature=0, repetition_penalty=2.0) == [5]
    assert generate(model, [1], max_new_tokens=5, temperature=0, eos_id=3) == []
    # the context window is respected (FixedModel asserts it) for long generations
    assert len(generate(model, [1] * 20, max_new_tokens=12, temperature=0)) == 12


# ----------------------------------------------------------------------------------------------
# the cache against the uncached model


def uncached_greedy(model: StagedLM, prompt: list[int], n: int) -> list[int]:
    context, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            window = context[-model.config.max_seq_len :]
            token = int(model(torch.tensor([window]))[0, -1].argmax())
            out.append(token)
            context.append(token)
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("mu_full", [True, False])
def test_cached_greedy_equals_uncached_argmax(stage, mu_full):
    model = live_model(stage, mu_full)
    prompt = [5, 7, 1, 9, 5]
    # 20 new tokens with a 16-token window: the context is cropped (cache rebuilt) on the way
    cached = generate(model, prompt, max_new_tokens=20, temperature=0)
    assert cached == uncached_greedy(model, prompt, 20)


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("mu_full", [True, False])
def test_cached_logits_match_full_forward_in_chunks(stage, mu_full):
    model = live_model(stage, mu_full)
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = model.init_cache()
        parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 10))]
        parts += [model(ids[:, i : i + 1], cache=cache) for i in range(10, 14)]
    assert cache.length == 14
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError):
        model(ids[:, :3], cache=cache)  # 17 > max_seq_len


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = live_model(1, True)
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_k=10, top_p=0.9, repetition_penalty=1.2)
    a = generate(model, [1, 2, 3], generator=torch.Generator().manual_seed(7), **kwargs)
    b = generate(model, [1, 2, 3], generator=torch.Generator().manual_seed(7), **kwargs)
    assert a == b and len(a) == 12
    assert all(0 <= t < VOCAB for t in a)
    draws = set()
    for seed in range(4):
        draws.add(tuple(generate(model, [1, 2, 3], generator=torch.Generator().manual_seed(seed), **kwargs)))
    assert len(draws) > 1, "temperature 1 sampling should not be deterministic across seeds"


def test_empty_prompt_starts_from_eos_and_mode_is_restored():
    model = live_model(0, False)
    model.train()
    out = generate(model, [], max_new_tokens=4, temperature=0)
    assert out == uncached_greedy(model.eval(), [model.config.eos_id], 4)
    model.train()
    generate(model, [2], max_new_tokens=2, temperature=0)
    assert model.training
    with torch.no_grad():
        assert math.isfinite(float(model(torch.tensor([[1, 2]])).sum()))


# ----------------------------------------------------------------------------------------------
# many samples in one batch (generate_many)


@pytest.mark.parametrize("stage", [0, 3])
def test_batched_greedy_rows_equal_single_row_greedy(stage):
    """20 tokens through a 16-token window: the batch rebuilds its cache like one row does."""
    model = live_model(stage, True)
    prompt = [5, 7, 1, 9, 5]
    rows = generate_many(model, prompt, num_samples=4, max_new_tokens=20, temperature=0, repetition_penalty=1.3)
    single = generate(model, prompt, max_new_tokens=20, temperature=0, repetition_penalty=1.3)
    assert rows == [single] * 4
    assert generate_many(model, prompt, num_samples=3, max_new_tokens=20, temperature=0) == \
        [uncached_greedy(model, prompt, 20)] * 3


def test_one_row_draws_what_generate_always_drew():
    """generate is generate_many with one row: a seed gives the same text as before batching existed."""
    model = live_model(1, True)
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_k=10, top_p=0.9, repetition_penalty=1.2)
    for seed in range(3):
        one = generate_many(model, [1, 2, 3], num_samples=1, generator=torch.Generator().manual_seed(seed), **kwargs)
        assert one == [reference_generate(model, [1, 2, 3], torch.Generator().manual_seed(seed), **kwargs)]


def reference_generate(model, prompt, generator, *, max_new_tokens, temperature, top_k, top_p, repetition_penalty):
    """Uncached, one row, one choose_token per step: the definition the batch must keep row by row."""
    context, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([context[-model.config.max_seq_len:]]))[0, -1]
            token = choose_token(logits, torch.tensor(context), temperature=temperature, top_k=top_k, top_p=top_p,
                                 repetition_penalty=repetition_penalty, generator=generator)
            out.append(token)
            context.append(token)
    return out


def test_batched_sampling_is_reproducible_and_rows_differ():
    model = live_model(1, True)
    kwargs = dict(num_samples=4, max_new_tokens=12, temperature=1.0, top_k=10, top_p=0.9, repetition_penalty=1.2)
    a = generate_many(model, [1, 2, 3], generator=torch.Generator().manual_seed(7), **kwargs)
    b = generate_many(model, [1, 2, 3], generator=torch.Generator().manual_seed(7), **kwargs)
    assert a == b and len(a) == 4 and all(len(row) == 12 for row in a)
    assert len({tuple(row) for row in a}) > 1, "rows of one batch are separate draws"
    c = generate_many(model, [1, 2, 3], generator=torch.Generator().manual_seed(8), **kwargs)
    assert c != a


def test_each_row_stops_at_its_own_eos():
    """A stopped row is fed eos, which is what it drew: so with eos stopping each row is the same
    run without it, cut at its first eos, and the other rows go on untouched."""
    model = live_model(2, False)
    kwargs = dict(num_samples=8, max_new_tokens=14, temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.0)
    eos = 4
    free = generate_many(model, [1, 2, 3], generator=torch.Generator().manual_seed(3), **kwargs)
    cut = generate_many(model, [1, 2, 3], generator=torch.Generator().manual_seed(3), eos_id=eos, **kwargs)
    want = [row[: row.index(eos)] if eos in row else row for row in free]
    assert cut == want
    lengths = {len(row) for row in cut}
    assert len(lengths) > 1 and 14 in lengths, f"need rows that stop early and rows that run to the end: {cut}"
    assert all(eos not in row for row in cut)


def test_the_repetition_penalty_of_a_row_sees_only_its_own_context():
    logits = torch.tensor([[2.0, -2.0, 1.0, -0.5], [2.0, -2.0, 1.0, -0.5]])
    history = torch.tensor([[0, 1, 1], [2, 2, 3]])
    out = apply_repetition_penalty(logits, history, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -0.5], [2.0, -2.0, 0.5, -1.0]]
    for row in range(2):
        assert torch.equal(out[row], apply_repetition_penalty(logits[row], history[row], 2.0))
    # greedy: each row turns away from the token in its own context only
    same = torch.tensor([[2.0, 1.5, 0.0], [2.0, 1.5, 0.0]])
    assert choose_tokens(same, torch.tensor([[0], [1]]), temperature=0, repetition_penalty=2.0).tolist() == [1, 0]


def test_batched_filters_act_row_by_row():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1], [0.1, 0.15, 0.25, 0.5]])
    logits = torch.log(probs)
    assert torch.isfinite(filter_top_k(logits, 2)).tolist() == [[True, True, False, False], [False, False, True, True]]
    assert torch.isfinite(filter_top_p(logits, 0.7)).tolist() == [[True, True, False, False],
                                                                  [False, False, True, True]]


def test_fixed_model_batch_applies_the_penalty_per_row_and_stops_at_eos():
    model = FixedModel()
    assert generate_many(model, [1], num_samples=3, max_new_tokens=3, temperature=0,
                         repetition_penalty=2.0) == [[3, 5, 3]] * 3
    assert generate_many(model, [1], num_samples=2, max_new_tokens=5, temperature=0, eos_id=3) == [[], []]
    assert [len(r) for r in generate_many(model, [1] * 20, num_samples=2, max_new_tokens=12, temperature=0)] == [12, 12]
