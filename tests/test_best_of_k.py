"""Best-of-k baselines (sunfish.evaluation.best_of_k): each keeps the candidate its own model finds
most likely, by a criterion that never sees the target word or the judge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sunfish.evaluation.best_of_k import ar_best_of_k, ar_log_likelihood, diffusion_best_of_k, pick_best
from sunfish.models.denoiser import DiffusionConfig, DiffusionLM
from sunfish.models.staged import StagedLM, StagedLMConfig


def test_pick_best_keeps_the_highest_score_per_row():
    cands = torch.arange(2 * 3 * 4).view(2, 3, 4)
    scores = torch.tensor([[0.1, 0.9, 0.2], [-1.0, -3.0, -2.0]])
    assert torch.equal(pick_best(cands, scores), torch.stack([cands[0, 1], cands[1, 0]]))
    with pytest.raises(ValueError, match="do not match"):
        pick_best(cands, scores[:, :2])


def _ar():
    torch.manual_seed(0)
    return StagedLM(StagedLMConfig(vocab_size=12, n_layer=1, n_head=2, d_model=32, d_ff=64, max_seq_len=32,
                                   eos_id=0)).eval()


def test_ar_log_likelihood_is_the_mean_over_the_kept_tokens():
    model = _ar()
    ids = torch.tensor([[3, 4, 5, 6], [3, 0, 9, 9]])  # the second row ends at its eos (0)
    got = ar_log_likelihood(model, ids, [0], eos_id=0)
    full = torch.cat([torch.zeros(2, 1, dtype=torch.long), ids], dim=1)
    logp = -F.cross_entropy(model(full[:, :-1]).double().transpose(1, 2), ids, reduction="none")
    assert got[0].item() == pytest.approx(logp[0].mean().item(), rel=1e-6)
    assert got[1].item() == pytest.approx(logp[1, :2].mean().item(), rel=1e-6)  # tokens after eos are trimmed


def test_ar_best_of_k_returns_the_most_likely_of_its_k_draws():
    from sunfish.generation import generate_batch

    model = _ar()
    counter: dict = {}
    kept = ar_best_of_k(model, [0], n=3, k=4, seq_len=6, top_p=1.0, eos_id=None,
                        generator=torch.Generator().manual_seed(5), counter=counter)
    drawn = generate_batch(model, [0], num_samples=12, max_new_tokens=6, top_p=1.0,
                           generator=torch.Generator().manual_seed(5)).view(3, 4, 6)
    scores = ar_log_likelihood(model, drawn.view(12, 6), [0], eos_id=None).view(3, 4)
    for i in range(3):
        assert torch.equal(kept[i], drawn[i, scores[i].argmax()])
        assert scores[i].max() >= scores[i].mean()  # not a uniform draw
    assert counter["forward_rows"] >= 12 * 6  # k candidates cost k


def test_diffusion_best_of_k_draws_one_sample_per_prompt():
    torch.manual_seed(0)
    model = DiffusionLM(DiffusionConfig(vocab_size=10, n_layer=1, n_head=2, d_model=32, d_ff=64, max_seq_len=16,
                                        objective="masked", timesteps=20, prompt_encoder_layers=1,
                                        max_prompt_tokens=4, pad_id=1, eos_id=0)).eval()
    out = diffusion_best_of_k(model, [[3, 4], [5]], k=3, seq_len=8, num_steps=4, exact_counts=True, top_p=1.0,
                              generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 8) and int(out.max()) < 10
