"""The samplers' progress hook: ``on_step(done, total)`` once per denoising step run, and it changes
nothing about the samples (so `sunfish sample` can show a bar without changing what a seed draws)."""

from __future__ import annotations

import torch

from sunfish.diffusion import sample
from sunfish.diffusion import block as bd
from tests.test_block_diffusion import ar_model, block_model
from tests.test_diffusion import tiny


def run(model, **kwargs):
    calls = []
    out = sample(model, None, num_samples=2, generator=torch.Generator().manual_seed(0),
                 on_step=lambda done, total: calls.append((done, total)), **kwargs)
    plain = sample(model, None, num_samples=2, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(out, plain), "the hook must not change the samples"
    return calls


def test_masked_sampler_reports_every_step():
    calls = run(tiny("masked"), seq_len=12, num_steps=6, guidance_scale=1.0, scheduler="ddim")
    assert calls == [(i, 6) for i in range(1, 7)]


def test_masked_sampler_reports_only_steps_it_runs():
    """An infill that keeps every position leaves nothing to reveal: no step runs, none is reported."""
    ids = torch.full((1, 6), 5)
    assert run(tiny("masked"), seq_len=6, num_steps=4, guidance_scale=1.0,
               infill=(ids, torch.ones_like(ids, dtype=torch.bool))) == []
    ids[0, 2] = 1  # one free position: this seed reveals it before the last step, and the loop ends there
    calls = run(tiny("masked"), seq_len=6, num_steps=4, guidance_scale=1.0, scheduler="ddpm", infill=(ids, ids != 1))
    assert calls == [(i, 4) for i in range(1, len(calls) + 1)] and 1 <= len(calls) < 4


def test_continuous_sampler_reports_every_timestep():
    calls = run(tiny("continuous"), seq_len=8, num_steps=5, guidance_scale=1.0, scheduler="ddim")
    assert calls == [(i, 5) for i in range(1, 6)]


def test_sequence_guidance_reports_the_drawing_of_its_candidates():
    model = tiny("masked")
    calls = []
    sample(model, [[5, 6, 7]], num_samples=1, seq_len=8, num_steps=4, guidance_scale=2.0, guidance="sequence",
           candidates=2, generator=torch.Generator().manual_seed(0), on_step=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 4) for i in range(1, 5)]


def test_block_sampler_counts_steps_over_all_blocks():
    model = block_model(ar_model(), 4)
    # 12 tokens = 3 blocks; 6 steps over 3 blocks = 2 per block; left to right, every step reveals
    calls = run(model, seq_len=12, num_steps=6, guidance_scale=1.0, scheduler="ddim")
    assert calls == [(i, 6) for i in range(1, 7)]


def test_block_sampler_counts_steps_with_nothing_to_reveal_and_skips_finished_blocks():
    model = block_model(ar_model(), 4)
    calls = []
    bd.sample(model, None, None, num_samples=2, seq_len=8, num_steps=8, guidance_scale=1.0, order="random",
              generator=torch.Generator().manual_seed(1), on_step=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert {t for _, t in calls} == {8} and done == sorted(set(done)) and done[-1] <= 8 and len(done) >= 2
