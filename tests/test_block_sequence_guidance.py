"""Selection over k samples for block diffusion: its per-row bound, sequence guidance and best-of-k."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sunfish.diffusion import block as bd
from sunfish.diffusion import sample
from sunfish.diffusion.sequence_guidance import prompt_log_ratio
from sunfish.models.block_denoiser import BlockDiffusionConfig, BlockDiffusionLM
from sunfish.models.staged import StagedLM, StagedLMConfig

VOCAB, EOS, PAD = 12, 0, 1


def block_model(block_size: int = 2, seed: int = 0) -> BlockDiffusionLM:
    torch.manual_seed(seed)
    ar = StagedLM(StagedLMConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=32,
                                 eos_id=EOS))
    config = BlockDiffusionConfig(vocab_size=VOCAB, backbone=BlockDiffusionLM.backbone_from(ar.config),
                                  block_size=block_size, max_prompt_tokens=4, pad_id=PAD, eos_id=EOS,
                                  conditioning_dropout=0.2)
    return BlockDiffusionLM.from_ar(ar, config).eval()


def _prompt_task_batch(g, rows=32, length=6):
    """The text repeats the prompt's only token: solvable only through the prompt."""
    token = torch.randint(2, 8, (rows, 1), generator=g)
    return dict(text_ids=token.expand(rows, length).clone(), text_mask=torch.ones(rows, length, dtype=torch.bool),
                prompt_ids=token.clone(), prompt_mask=torch.ones(rows, 1, dtype=torch.bool))


@pytest.fixture(scope="module")
def prompt_model() -> BlockDiffusionLM:
    model = block_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(80):
        loss, _ = bd.training_loss(model, _prompt_task_batch(g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_row_bounds_are_the_objective_split_by_row():
    """Summed over rows, one draw's conditional bound is exactly what bd.elbo computes with that draw's
    noise: the per-row figures are the objective's, not a second estimator."""
    model = block_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (3, 7), generator=g)
    prompt = torch.randint(2, VOCAB, (3, 3), generator=g)
    mask = torch.ones_like(prompt, dtype=torch.bool)
    cond, uncond, tokens = bd.row_elbo_pair(model, ids, prompt, mask, draws=1, generator=torch.Generator().manual_seed(5))
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(5)))
    batch = {"text_ids": ids, "text_mask": torch.ones_like(ids, dtype=torch.bool), "prompt_ids": prompt,
             "prompt_mask": mask}
    for conditional, rows in ((True, cond), (False, uncond)):
        total, count = bd.elbo(model, batch, generator=torch.Generator().manual_seed(seed), conditional=conditional)
        assert float(rows.sum()) == pytest.approx(float(total), rel=1e-9)
        assert count == int(tokens.sum()) == 3 * 7
    assert cond.dtype == torch.float64 and cond.shape == (3,)
    alone, none, _ = bd.row_elbo_pair(model, ids, prompt, mask, draws=1, generator=torch.Generator().manual_seed(5),
                                      with_null=False)
    assert none is None and torch.equal(alone, cond)  # the same draws without the null-prompt passes


def test_row_bounds_stop_at_the_first_eos_and_a_null_prompt_changes_nothing():
    model = block_model()
    ids = torch.tensor([[5, 6, EOS, 7, 8, 9], [5, 6, 7, 8, EOS, 2]])
    other_tail = torch.tensor([[5, 6, EOS, 2, 2, 2], [5, 6, 7, 8, EOS, 9]])  # the same texts up to their eos
    prompt = torch.tensor([[3, 4], [3, 4]])
    on = torch.ones_like(prompt, dtype=torch.bool)
    cond, uncond, tokens = bd.row_elbo_pair(model, ids, prompt, on, draws=3, generator=torch.Generator().manual_seed(0))
    again, _, _ = bd.row_elbo_pair(model, other_tail, prompt, on, draws=3, generator=torch.Generator().manual_seed(0))
    assert tokens.tolist() == [3, 5]  # the words and the eos that ends them
    torch.testing.assert_close(cond, again)  # what follows the eos is not the sample's text
    assert not torch.allclose(cond, uncond)
    cond0, uncond0, _ = bd.row_elbo_pair(model, ids, prompt, torch.zeros_like(on), draws=3,
                                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cond0, uncond0)  # no prompt: both bounds are the same computation


def test_log_ratio_of_a_block_model_is_large_for_a_text_that_follows_the_prompt(prompt_model):
    prompts = torch.tensor([[2], [2], [5], [5]])
    mask = torch.ones(4, 1, dtype=torch.bool)
    texts = torch.tensor([[2] * 6, [5] * 6, [5] * 6, [2] * 6])  # follows, ignores, follows, ignores
    ratio = prompt_log_ratio(prompt_model, texts, prompts, mask, draws=8, generator=torch.Generator().manual_seed(0))
    assert ratio.shape == (4,)
    # the prompt tells the first token (of 6 possible); the model infers the rest from it
    assert ratio[0] > ratio[1] + 1.5 and ratio[2] > ratio[3] + 1.5
    assert ratio[0] > 0 > ratio[1] and ratio[2] > 0 > ratio[3]


def test_sequence_guidance_runs_on_a_block_model(prompt_model):
    def draw(w, guidance, seed=0, **kw):
        return sample(prompt_model, [[2], [5]], num_samples=2, seq_len=6, num_steps=6, guidance_scale=w,
                      guidance=guidance, generator=torch.Generator().manual_seed(seed), **kw)

    for w in (0.0, 1.0):  # the unconditional and the conditional model, whatever the mode
        assert torch.equal(draw(w, "sequence"), draw(w, "token"))
    guided = draw(5.0, "sequence", candidates=4)
    assert guided.shape == (2, 6) and torch.equal(guided, draw(5.0, "sequence", candidates=4))
    assert (guided == torch.tensor([[2], [5]])).float().mean() > 0.5
    with pytest.raises(ValueError, match="parallel_confidence"):
        draw(5.0, "sequence", parallel_confidence=0.9)


def test_best_of_k_and_selection_cover_block_models(prompt_model):
    from sunfish.evaluation.best_of_k import diffusion_best_of_k
    from sunfish.evaluation.fluency_sampling import selection_k

    cfg = SimpleNamespace(guidance="sequence", guidance_candidates=3)
    assert selection_k(prompt_model, cfg) == 3
    assert selection_k(prompt_model, SimpleNamespace(guidance="token", guidance_candidates=3)) == 1
    out = diffusion_best_of_k(prompt_model, [[2], [5], [7]], k=3, seq_len=6, num_steps=6, exact_counts=True,
                              top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 6)
