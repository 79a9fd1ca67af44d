"""Sequence-level guidance (sunfish.diffusion.sequence_guidance) on tiny models."""

from __future__ import annotations

import pytest
import torch

from sunfish.diffusion import sample
from sunfish.diffusion.sequence_guidance import draw_candidates, prompt_log_ratio, real_text_mask, resample
from sunfish.models.denoiser import DiffusionConfig, DiffusionLM


def tiny(objective="masked", **kw) -> DiffusionLM:
    settings = dict(
        vocab_size=8, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=16, objective=objective,
        timesteps=20, prompt_encoder_layers=1, max_prompt_tokens=4, pad_id=1, eos_id=0, conditioning_dropout=0.2,
    )
    settings.update(kw)
    torch.manual_seed(0)
    return DiffusionLM(DiffusionConfig(**settings))


def _prompt_task_batch(g, B=32, L=6):
    """The text repeats the prompt's only token: solvable only through the prompt."""
    token = torch.randint(2, 7, (B, 1), generator=g)
    return dict(text_ids=token.expand(B, L).clone(), text_mask=torch.ones(B, L, dtype=torch.bool),
                prompt_ids=token.clone(), prompt_mask=torch.ones(B, 1, dtype=torch.bool))


def trained_on_the_prompt_task(steps: int) -> DiffusionLM:
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        loss, _ = model.training_loss(_prompt_task_batch(g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def prompt_model() -> DiffusionLM:
    return trained_on_the_prompt_task(60)


def test_real_text_mask_ends_at_the_first_eos():
    ids = torch.tensor([[5, 0, 3, 0], [4, 4, 4, 4], [0, 2, 2, 2]])
    assert real_text_mask(ids, 0).tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert real_text_mask(ids, None).all()


def test_resample_draws_in_proportion_to_the_guided_weights():
    n, k = 4000, 3
    log_ratio = torch.tensor([0.0, 1.0, 2.0]).expand(n, k)
    candidates = torch.arange(k).view(1, k, 1).expand(n, k, 2).clone()
    for w in (0.0, 1.0, 2.0):
        chosen = resample(candidates, log_ratio, w, torch.Generator().manual_seed(0))[:, 0]
        freq = torch.bincount(chosen, minlength=k).double() / n
        expected = torch.softmax((w - 1.0) * log_ratio[0].double(), dim=0)
        assert torch.allclose(freq, expected, atol=0.03), (w, freq, expected)
    top = resample(candidates, log_ratio, 50.0, torch.Generator().manual_seed(0))[:, 0]
    assert (top == 2).all()  # a large scale picks the candidate with the most prompt information
    with pytest.raises(ValueError, match="do not match"):
        resample(candidates, log_ratio[:, :2], 2.0)


def test_log_ratio_is_large_for_a_text_that_follows_the_prompt(prompt_model):
    prompts = torch.tensor([[2], [2], [5], [5]])
    mask = torch.ones(4, 1, dtype=torch.bool)
    texts = torch.tensor([[2] * 6, [5] * 6, [5] * 6, [2] * 6])  # follows, ignores, follows, ignores
    ratio = prompt_log_ratio(prompt_model, texts, prompts, mask, draws=8, generator=torch.Generator().manual_seed(0))
    assert ratio.dtype == torch.float64 and ratio.shape == (4,)
    assert ratio[0] > ratio[1] + 3.0 and ratio[2] > ratio[3] + 3.0
    # without the prompt the text is one of 5 repeated tokens: log p(x|c)/p(x) = log 5 = 1.6 nats at best
    assert ratio[0] > 1.0 and ratio[2] > 1.0 and ratio[1] < 0 and ratio[3] < 0
    # a null prompt carries no information: the two bounds are the same computation
    null = prompt_log_ratio(prompt_model, texts, prompts, torch.zeros_like(mask), draws=2,
                            generator=torch.Generator().manual_seed(0))
    assert torch.allclose(null, torch.zeros(4, dtype=torch.float64), atol=1e-6)


def test_sequence_guidance_follows_the_prompt_more_than_the_conditional_model():
    model = trained_on_the_prompt_task(12)  # briefly: the conditional model alone follows the prompt only sometimes
    prompts = [[t] for t in range(2, 7)] * 8

    def follows(**kw):
        out = sample(model, prompts, num_samples=len(prompts), seq_len=6, num_steps=6,
                     generator=torch.Generator().manual_seed(0), **kw)
        return (out == torch.tensor(prompts)).float().mean().item()

    conditional = follows(guidance_scale=1.0)
    guided = follows(guidance_scale=5.0, guidance="sequence", candidates=8)
    assert guided > conditional + 0.1, (conditional, guided)


def test_sequence_guidance_endpoints_seed_and_refusals(prompt_model):
    def draw(w, guidance, seed=0, **kw):
        return sample(prompt_model, [[2], [3]], num_samples=2, seq_len=6, num_steps=4, guidance_scale=w,
                      guidance=guidance, generator=torch.Generator().manual_seed(seed), **kw)

    for w in (0.0, 1.0):  # the unconditional and the conditional model, whatever the mode
        assert torch.equal(draw(w, "sequence"), draw(w, "token"))
    assert torch.equal(draw(3.0, "sequence"), draw(3.0, "sequence"))
    assert draw(3.0, "sequence", candidates=3).shape == (2, 6)
    with pytest.raises(ValueError, match="guidance="):
        draw(3.0, "both")
    with pytest.raises(ValueError, match="candidates"):
        draw(3.0, "sequence", candidates=0)
    continuous = tiny("continuous")
    with pytest.raises(ValueError, match="masked objective"):
        sample(continuous, [[2]], num_samples=1, seq_len=4, num_steps=2, guidance_scale=3.0, guidance="sequence")


def test_draw_candidates_shapes_and_infill_are_kept(prompt_model):
    ids, mask = prompt_model.pad_prompt_ids([[2], [4]])
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[:, 0] = True
    given = torch.full((2, 6), 6)
    drawn, ratio = draw_candidates(prompt_model, ids, mask, candidates=3, seq_len=6, num_steps=3, exact_counts=True,
                                   top_p=1.0, generator=torch.Generator().manual_seed(0), infill=(given, keep))
    assert drawn.shape == (2, 3, 6) and ratio.shape == (2, 3)
    assert (drawn[:, :, 0] == 6).all()
    assert prompt_model.training is False
