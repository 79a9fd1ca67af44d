"""The copy head (sunfish.models.prompt_copy): a proper distribution that learns to copy any word."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sunfish.config import load_params
from sunfish.diffusion import sample
from sunfish.models.denoiser import DiffusionConfig, DiffusionLM

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def model_with(copy: bool, vocab: int = 32, **kw) -> DiffusionLM:
    torch.manual_seed(0)
    return DiffusionLM(DiffusionConfig(
        vocab_size=vocab, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=16, prompt_encoder_layers=0,
        max_prompt_tokens=6, pad_id=1, eos_id=0, prompt_copy=copy, **kw,
    ))


def test_the_mixture_is_a_distribution_and_the_null_prompt_is_the_vocabulary_softmax():
    model = model_with(True).eval()
    prompts = torch.tensor([[5, 6, 7], [8, 9, 9], [4, 1, 1]])
    mask = torch.tensor([[True, True, True], [False, False, False], [True, False, False]])
    inputs = torch.full((3, 6), model.mask_id)
    with torch.no_grad():
        memory, memory_mask = model.encode_prompt(prompts, mask)
        hidden = model.hidden_states(inputs, memory, memory_mask)
        log_p = model.masked_log_probs(hidden, memory, memory_mask, prompts)
        plain = torch.log_softmax(model.token_logits(hidden).float(), dim=-1)
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(3, 6), atol=1e-5)
    assert torch.allclose(log_p[1], plain[1], atol=1e-6)  # no prompt tokens: no copying
    # copying adds mass only to the prompt's real tokens, never to its padding (id 1 in row 2)
    gain = log_p.exp() - plain.exp()
    assert bool((gain[0, :, [5, 6, 7]] > 0).all()) and bool((gain[2, :, 4] > 0).all())
    assert bool((gain[2, :, 1] < 0).all())


def _copy_task(g: torch.Generator, low: int, high: int, rows: int = 32, length: int = 6) -> dict:
    """Each text holds its prompt's one word at a random position among filler tokens 2..4."""
    word = torch.randint(low, high, (rows, 1), generator=g)
    text = torch.randint(2, 5, (rows, length), generator=g)
    where = torch.randint(0, length, (rows,), generator=g)
    text[torch.arange(rows), where] = word[:, 0]
    return dict(text_ids=text, text_mask=torch.ones(rows, length, dtype=torch.bool),
                prompt_ids=word, prompt_mask=torch.ones(rows, 1, dtype=torch.bool))


def _train(model: DiffusionLM, steps: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        loss, _ = model.training_loss(_copy_task(g, 5, 20))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _unseen_word_rate(model: DiffusionLM) -> float:
    """Guided samples that contain their prompt's word, for words never seen in training (20..31)."""
    words = list(range(20, 32))
    out = sample(model, [[w] for w in words], num_samples=len(words), seq_len=6, num_steps=6,
                 guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    return sum(w in row for w, row in zip(words, out.tolist())) / len(words)


def test_the_copy_head_generalises_to_words_never_seen_in_training():
    with_copy, without = model_with(True, conditioning_dropout=0.1), model_with(False, conditioning_dropout=0.1)
    _train(with_copy, 150)
    _train(without, 150)
    copied, baseline = _unseen_word_rate(with_copy), _unseen_word_rate(without)
    assert copied >= 0.75, (copied, baseline)
    assert copied >= baseline + 0.4, (copied, baseline)  # cross-attention alone cannot name unseen words


def test_prompt_copy_needs_the_masked_objective_and_the_own_encoder():
    with pytest.raises(ValueError, match="prompt_copy needs the masked objective"):
        model_with(True, objective="continuous")
    params = load_params(PARAMS, overrides={"cfg.prompt_copy": True, "cfg.objective": "continuous",
                                            "cfg.architecture": "cross_attention"})
    preset = params.preset_for("cfg")
    resolved = DiffusionConfig.from_params(params.cfg, preset, vocab_size=64, pad_id=1, eos_id=0)
    assert resolved.prompt_copy is False  # params switch: on where it applies
    params = load_params(PARAMS, overrides={"cfg.prompt_copy": True, "cfg.objective": "masked"})
    assert DiffusionConfig.from_params(params.cfg, preset, vocab_size=64, pad_id=1, eos_id=0).prompt_copy
