"""Diffusion objectives, guidance and samplers (sunfish.diffusion) on tiny models."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sunfish.diffusion import combine, continuous, guided_log_probs, sample
from sunfish.models.denoiser import DiffusionConfig, DiffusionLM


def tiny(objective="masked", **kw) -> DiffusionLM:
    settings = dict(
        vocab_size=24, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=16, objective=objective,
        timesteps=20, prompt_encoder_layers=1, max_prompt_tokens=6, pad_id=1, eos_id=0,
    )
    settings.update(kw)
    torch.manual_seed(0)
    return DiffusionLM(DiffusionConfig(**settings))


def pair_batch(B=4, L=10, P=4, vocab=24, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = dict(
        text_ids=torch.randint(2, vocab, (B, L), generator=g),
        text_mask=torch.ones(B, L, dtype=torch.bool),
        prompt_ids=torch.randint(2, vocab, (B, P), generator=g),
        prompt_mask=torch.ones(B, P, dtype=torch.bool),
    )
    batch["text_mask"][0, L // 2 :] = False
    batch["text_ids"][0, L // 2 :] = 1
    batch["prompt_mask"][1, 2:] = False
    batch["prompt_ids"][1, 2:] = 1
    return batch


def train(model, make_batch, steps, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    model.train()
    losses = []
    for _ in range(steps):
        loss, _ = model.training_loss(make_batch(g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# guidance


def test_cfg_combine_endpoints_and_formula():
    cond, uncond = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.equal(combine(cond, uncond, 1.0), cond)
    assert torch.equal(combine(cond, uncond, 0.0), uncond)
    assert torch.allclose(combine(cond, uncond, 7.0), uncond + 7.0 * (cond - uncond))


def test_guided_log_probs_are_normalised_and_match_endpoints():
    cond, uncond = torch.randn(4, 9), torch.randn(4, 9)
    for w in (0.0, 1.0, 3.0, 15.0):
        lp = guided_log_probs(cond, uncond, w)
        assert lp.dtype == torch.float64
        assert torch.allclose(lp.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(guided_log_probs(cond, uncond, 1.0), torch.log_softmax(cond.double(), -1))
    assert torch.allclose(guided_log_probs(cond, uncond, 0.0), torch.log_softmax(uncond.double(), -1))


# ----------------------------------------------------------------------------------------------
# conditioning


@pytest.mark.parametrize("objective", ["masked", "continuous", "masked+copy"])
def test_cond_uncond_in_one_batched_pass_matches_separate_passes(objective):
    copy = objective == "masked+copy"
    objective = objective.removesuffix("+copy")
    model = tiny(objective, prompt_copy=copy, prompt_encoder_layers=0 if copy else 1).eval()
    batch = pair_batch(B=3)
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
    if objective == "masked":
        inputs = batch["text_ids"].clone()
        inputs[:, ::2] = model.mask_id
        extra = {}
    else:
        inputs = torch.randn(3, 10, 32)
        extra = {"timesteps": torch.tensor([3, 10, 20])}
    with torch.no_grad():
        cond, uncond = model.predict_cond_uncond(inputs, batch["prompt_ids"], batch["prompt_mask"], **extra)
        assert calls == [6]  # one forward over 2B rows
        alone_cond = model.predict(inputs, batch["prompt_ids"], batch["prompt_mask"], **extra)
        null_mask = torch.zeros_like(batch["prompt_mask"])
        alone_uncond = model.predict(inputs, batch["prompt_ids"], null_mask, **extra)
    handle.remove()
    assert torch.allclose(cond, alone_cond, atol=1e-5)
    assert torch.allclose(uncond, alone_uncond, atol=1e-5)


def test_conditioning_dropout_rate_is_observed_in_training_batches():
    model = tiny(conditioning_dropout=0.25).train()
    seen = []
    original = model.encode_prompt

    def spy(ids, mask):
        seen.append(~mask.any(dim=1))
        return original(ids, mask)

    model.encode_prompt = spy
    batch = pair_batch(B=64, L=6)
    batch["prompt_mask"][:] = True
    reported = []
    torch.manual_seed(3)
    with torch.no_grad():
        for _ in range(20):
            _, metrics = model.training_loss(batch)
            reported.append(metrics["conditioning_dropped"])
    observed = float(torch.cat(seen).float().mean())
    assert abs(observed - 0.25) < 0.05, observed  # 1280 rows: 4 standard deviations
    assert abs(sum(reported) / len(reported) - observed) < 1e-6
    # no dropout when evaluating
    seen.clear()
    model.eval()
    with torch.no_grad():
        model.training_loss(batch)
    assert not bool(torch.cat(seen).any())


def _prompt_task_batch(g, B=32, L=6):
    """The text repeats the prompt's only token: solvable only through the prompt."""
    token = torch.randint(2, 7, (B, 1), generator=g)
    return dict(
        text_ids=token.expand(B, L).clone(),
        text_mask=torch.ones(B, L, dtype=torch.bool),
        prompt_ids=token.clone(),
        prompt_mask=torch.ones(B, 1, dtype=torch.bool),
    )


def test_conditional_and_unconditional_differ_after_training_on_a_prompt_task():
    model = tiny(vocab_size=8, conditioning_dropout=0.2)
    losses = train(model, _prompt_task_batch, steps=50)
    assert sum(losses[-10:]) < sum(losses[:10])
    prompts = torch.arange(2, 7)[:, None]
    inputs = torch.full((5, 6), model.mask_id)
    with torch.no_grad():
        cond, uncond = model.predict_cond_uncond(inputs, prompts, torch.ones(5, 1, dtype=torch.bool))
    log_cond, log_uncond = cond.log_softmax(-1), uncond.log_softmax(-1)
    assert (log_cond - log_uncond).abs().max() > 1.0
    assert (cond.argmax(-1) == prompts).float().mean() > 0.9  # conditional: the prompt's token
    # guided sampling follows the prompt; unconditional sampling cannot know it
    out = sample(model, [[t] for t in range(2, 7)], num_samples=5, seq_len=6, num_steps=6,
                 guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert (out == prompts).float().mean() > 0.8  # chance: 0.2


# ----------------------------------------------------------------------------------------------
# losses


@pytest.mark.parametrize("objective", ["masked", "continuous"])
def test_text_and_prompt_padding_never_count(objective):
    model = tiny(objective, conditioning_dropout=0.0).train()
    batch = pair_batch()
    other = {k: v.clone() for k, v in batch.items()}
    other["text_ids"][~other["text_mask"]] = 7  # different ids where the text is padding
    other["prompt_ids"][~other["prompt_mask"]] = 9  # and where the prompt is padding
    results, grads = [], []
    for b in (batch, other):
        torch.manual_seed(11)
        loss, _ = model.training_loss(b)
        model.zero_grad()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        nats, n = model.nll(b, generator=torch.Generator().manual_seed(5))
        results.append((float(loss.detach()), float(nats), n))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)  # padding ids are not even seen as inputs
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    assert results[0][2] == results[1][2] == int(batch["text_mask"].sum())


def _masked_log_probs_all_subsets(model, seqs, L):
    """log p(x_i | x with subset S masked) for every sequence, nonempty S and i in S."""
    subsets = [s for r in range(1, L + 1) for s in itertools.combinations(range(L), r)]
    inputs = []
    for x in seqs:
        for s in subsets:
            z = list(x)
            for i in s:
                z[i] = model.mask_id
            inputs.append(z)
    inputs = torch.tensor(inputs)
    empty = torch.zeros(len(inputs), 0, dtype=torch.long)
    with torch.no_grad():
        logits = model.predict(inputs, empty, empty.bool())
    logp = logits.double().log_softmax(-1)
    table = {}
    row = 0
    for x in seqs:
        for s in subsets:
            table[(x, s)] = {i: float(logp[row, i, x[i]]) for i in s}
            row += 1
    return table


def _toy_sequences(g, B=64):
    """Three tokens from {2, 3, 4}: the first is drawn, the rest mostly copy it."""
    first = torch.randint(2, 5, (B, 1), generator=g)
    noise = torch.randint(2, 5, (B, 3), generator=g)
    copy = torch.rand(B, 3, generator=g) < 0.7
    text = torch.where(copy, first.expand(B, 3), noise)
    return dict(
        text_ids=text,
        text_mask=torch.ones(B, 3, dtype=torch.bool),
        prompt_ids=torch.zeros(B, 0, dtype=torch.long),
        prompt_mask=torch.zeros(B, 0, dtype=torch.bool),
    )


def test_masked_elbo_bounds_the_exact_nll_on_an_enumerable_toy():
    """Vocabulary restricted to 3 tokens in practice, length 3: enumerate everything.

    p(x) is the model's exact likelihood under one-token-at-a-time ancestral sampling (uniform
    random order); the bound is the any-order ELBO, which ``nll`` estimates without bias.
    """
    model = tiny(vocab_size=5, conditioning_dropout=0.0, pad_id=1, eos_id=0)
    train(model, _toy_sequences, steps=100)
    L = 3
    seqs = [s for s in itertools.product(range(5), repeat=L)]
    table = _masked_log_probs_all_subsets(model, seqs, L)
    exact_p, bound = {}, {}
    for x in seqs:
        prob = 0.0
        for order in itertools.permutations(range(L)):
            lp = sum(table[(x, tuple(sorted(order[k:])))][order[k]] for k in range(L))
            prob += math.exp(lp) / math.factorial(L)
        exact_p[x] = prob
        b = 0.0
        for size in range(1, L + 1):
            for s in itertools.combinations(range(L), size):
                b += (L / size) * -sum(table[(x, s)].values()) / math.comb(L, size) / L
        bound[x] = b
    assert sum(exact_p.values()) == pytest.approx(1.0, abs=1e-9)
    for x in seqs:
        assert bound[x] >= -math.log(exact_p[x]) - 1e-9
    # the model learnt the toy: likely sequences get more mass than unlikely ones
    assert exact_p[(2, 2, 2)] > 3 * exact_p[(2, 3, 4)]
    # nll() is an unbiased estimate of the bound
    x = (3, 3, 4)
    n = 600
    batch = dict(
        text_ids=torch.tensor([x] * n),
        text_mask=torch.ones(n, L, dtype=torch.bool),
        prompt_ids=torch.zeros(n, 0, dtype=torch.long),
        prompt_mask=torch.zeros(n, 0, dtype=torch.bool),
    )
    nats, count = model.nll(batch, generator=torch.Generator().manual_seed(0))
    assert count == n * L
    assert float(nats) / n == pytest.approx(bound[x], rel=0.03)
    # and the samplers draw from p(x): "ddim" (exact counts) reveals one token at a time here, as
    # p(x) assumes; "ddpm" (binomial counts) sometimes reveals two at once, a small deviation
    for scheduler, n, steps, tolerance in (("ddim", 4000, 20, 0.05), ("ddpm", 2000, 50, 0.08)):
        out = sample(model, None, num_samples=n, seq_len=L, num_steps=steps, guidance_scale=1.0,
                     scheduler=scheduler, generator=torch.Generator().manual_seed(1))
        counts = {}
        for row in out.tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        total_variation = 0.5 * sum(abs(counts.get(x, 0) / n - exact_p[x]) for x in seqs)
        assert total_variation < tolerance, (scheduler, total_variation)


def test_masked_elbo_is_finite_and_decreases_with_training():
    model = tiny(vocab_size=8, conditioning_dropout=0.1)
    val = _prompt_task_batch(torch.Generator().manual_seed(99), B=16)

    def elbo():
        nats, n = model.nll(val, generator=torch.Generator().manual_seed(0), draws=2)
        return float(nats) / n

    before = elbo()
    assert math.isfinite(before)
    assert math.log(8) < before < math.log(8) + 1.0  # unit-scale logits at init: about ln V + 1/2
    train(model, _prompt_task_batch, steps=60)
    after = elbo()
    assert math.isfinite(after) and after < 0.5 * before


def test_continuous_loss_decreases_and_embeddings_stay_healthy():
    model = tiny("continuous", vocab_size=8, timesteps=50, self_conditioning=True)
    losses = train(model, _prompt_task_batch, steps=60)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < sum(losses[:10])
    health = model.health(torch.Generator().manual_seed(0))
    assert health["embedding_mean_cosine"] < 0.5
    assert health["rounding_accuracy_t1"] == 1.0
    val = _prompt_task_batch(torch.Generator().manual_seed(2))
    nats, n = model.nll(val, torch.Generator().manual_seed(0))
    assert math.isfinite(float(nats)) and float(nats) > 0 and n == 32 * 6


@pytest.mark.parametrize("kind", ["sqrt", "cosine"])
def test_noise_schedules_decrease_from_one_to_near_zero(kind):
    ab = continuous.alpha_bars(1000, kind)
    assert ab[0] == 1.0 and bool((ab[1:] < ab[:-1]).all())
    assert 0.0 <= float(ab[-1]) < 0.01


# ----------------------------------------------------------------------------------------------
# samplers


def test_ddim_step_with_eta_one_is_the_ddpm_posterior_step():
    torch.manual_seed(0)
    ab = continuous.alpha_bars(100, "sqrt")
    z, x0, noise = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for t, s in ((100, 99), (50, 49), (60, 20), (2, 1)):
        a_t, a_s = float(ab[t]), float(ab[s])
        ddim = continuous.ddim_step(z, x0, a_t, a_s, 1.0, noise)
        ddpm = continuous.ddpm_step(z, x0, a_t, a_s, noise)
        assert torch.allclose(ddim, ddpm, atol=1e-5)


def test_ddim_eta_one_with_all_steps_matches_ddpm_with_the_same_noise():
    model = tiny("continuous", timesteps=12, self_conditioning=True).eval()
    finals = {}

    def run(**kw):
        seen = []
        original = model.rounding_logits
        model.rounding_logits = lambda x0: (seen.append(x0.clone()), original(x0))[1]
        try:
            tokens = sample(model, [[3, 4]], num_samples=2, seq_len=8, num_steps=12, guidance_scale=2.0,
                            generator=torch.Generator().manual_seed(4), **kw)
        finally:
            del model.rounding_logits
        return tokens, seen[-1]

    finals["ddim1"] = run(scheduler="ddim", eta=1.0)
    finals["ddpm"] = run(scheduler="ddpm")
    finals["ddim0"] = run(scheduler="ddim", eta=0.0)
    assert torch.equal(finals["ddim1"][0], finals["ddpm"][0])
    assert torch.allclose(finals["ddim1"][1], finals["ddpm"][1], atol=1e-4)
    assert not torch.allclose(finals["ddim0"][1], finals["ddpm"][1], atol=1e-3)


@pytest.mark.parametrize(
    "objective,scheduler",
    [("masked", "ddpm"), ("masked", "ddim"), ("continuous", "ddim"), ("continuous", "ddpm")],
)
def test_sampling_is_reproducible_with_a_seed(objective, scheduler):
    model = tiny(objective)
    kw = dict(num_samples=3, seq_len=12, num_steps=8, guidance_scale=3.0, scheduler=scheduler, eta=0.5)
    a = sample(model, [[2, 3, 4]], generator=torch.Generator().manual_seed(0), **kw)
    b = sample(model, [[2, 3, 4]], generator=torch.Generator().manual_seed(0), **kw)
    c = sample(model, [[2, 3, 4]], generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.max()) < model.config.vocab_size  # never [MASK]
    assert model.training  # sample() restores the mode it found


@pytest.mark.parametrize("objective", ["masked", "continuous"])
def test_infilling_keeps_the_given_tokens(objective):
    model = tiny(objective)
    ids = torch.randint(2, 24, (1, 12), generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(1, 12, dtype=torch.bool)
    keep[0, :3] = True
    keep[0, 8:10] = True
    out = sample(model, [[5, 6]], num_samples=4, seq_len=12, num_steps=6, guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(0), infill=(ids, keep))
    assert torch.equal(out[:, keep[0]], ids[:, keep[0]].expand(4, -1))
    assert not torch.equal(out[:, ~keep[0]], ids[:, ~keep[0]].expand(4, -1))


def test_unconditional_sampling_and_prompt_broadcasting():
    model = tiny("masked")
    def draw(prompts, w, n=2):
        return sample(model, prompts, num_samples=n, seq_len=8, num_steps=4, guidance_scale=w,
                      generator=torch.Generator().manual_seed(0))

    none, w0, empty = draw(None, 7.0), draw([[2, 3]], 0.0), draw([[]], 1.0)
    assert torch.equal(none, w0) and torch.equal(none, empty)  # all three are the null prompt
    assert draw([[2], [3]], 1.0, n=4).shape == (4, 8)
    with pytest.raises(ValueError, match="prompts for 3 samples"):
        sample(model, [[2], [3]], num_samples=3, seq_len=8, num_steps=4, guidance_scale=1.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        sample(model, None, num_samples=1, seq_len=17, num_steps=4, guidance_scale=1.0)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_masked_sampler_reuses_the_network_output_when_nothing_changed(scheduler):
    model = tiny("masked")
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
    out = sample(model, [[2]], num_samples=1, seq_len=5, num_steps=100, guidance_scale=3.0,
                 scheduler=scheduler, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert (out != model.mask_id).all()
    assert 1 <= len(calls) <= 5  # one batched (2B) forward per step that revealed something
    assert set(calls) == {2}


def test_continuous_clamping_and_step_limits():
    model = tiny("continuous", timesteps=10)
    out = sample(model, [[2]], num_samples=2, seq_len=6, num_steps=5, guidance_scale=1.0, clamp=True,
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 6)
    with pytest.raises(ValueError, match="num_steps"):
        sample(model, [[2]], num_samples=1, seq_len=6, num_steps=11, guidance_scale=1.0)


# ----------------------------------------------------------------------------------------------
# the `sunfish sample` command on a diffusion checkpoint


@pytest.fixture(scope="module")
def diffusion_checkpoint(tmp_path_factory):
    from sunfish.data.tokenizer import train_bpe
    from sunfish.training.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("cfg_ckpt")
    text = ["Once upon a time, a little robot went to the park. The dog played with a red ball."] * 8
    tok = train_bpe(text, vocab_size=300, min_frequency=1)
    tok.save(tmp / "tokenizer.json")
    model = tiny(vocab_size=tok.vocab_size, max_seq_len=32, max_prompt_tokens=32,
                 pad_id=tok.pad_id, eos_id=tok.eos_id)
    return save_checkpoint(tmp / "cfg" / "final", model, model_name="cfg", step=1,
                           tokenizer_file=tmp / "tokenizer.json")


def _sample_cli(*args: str):
    from click.testing import CliRunner

    from sunfish.cli import main

    result = CliRunner().invoke(main, ["sample", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_infill_keeps_the_given_text(diffusion_checkpoint):
    out = _sample_cli(str(diffusion_checkpoint), "--infill", "Once upon a time, [MASK] went to the park.",
                      "--seq-len", "24", "--num-steps", "4", "--format", "json")
    row = __import__("json").loads(out)
    assert row["text"].startswith("Once upon a time,") and " went to the park." in row["text"]
    filled = row["text"][len("Once upon a time,"): row["text"].index(" went to the park.")]
    assert filled.strip()  # the span was filled with something


def test_cli_json_prints_one_object_per_sample(diffusion_checkpoint):
    import json

    out = _sample_cli(str(diffusion_checkpoint), "--prompt", "Write a story about a robot", "--guidance-scale", "7",
                      "--num-samples", "2", "--seq-len", "12", "--num-steps", "3", "--scheduler", "ddpm",
                      "--seed", "5", "--format", "json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert {"prompt", "guidance_scale", "text", "tokens", "seconds"} <= set(r)
        assert r["prompt"] == "Write a story about a robot" and r["guidance_scale"] == 7.0
        assert r["scheduler"] == "ddpm" and r["num_steps"] == 3 and 0 <= r["tokens"] <= 12 and r["seconds"] >= 0
    again = [json.loads(line) for line in _sample_cli(
        str(diffusion_checkpoint), "--prompt", "Write a story about a robot", "--guidance-scale", "7",
        "--num-samples", "2", "--seq-len", "12", "--num-steps", "3", "--scheduler", "ddpm", "--seed", "5",
        "--format", "json").splitlines()]
    assert [r["text"] for r in again] == [r["text"] for r in rows]  # seeded


def test_cli_top_p_applies_to_diffusion_and_a_tiny_nucleus_is_the_most_likely_token(diffusion_checkpoint):
    import json

    args = [str(diffusion_checkpoint), "--prompt", "robot", "--guidance-scale", "1", "--seq-len", "12",
            "--num-steps", "12", "--format", "json"]
    greedy = [json.loads(_sample_cli(*args, "--top-p", "0.000001", "--seed", str(seed))) for seed in (1, 2)]
    full = [json.loads(_sample_cli(*args, "--top-p", "1", "--seed", str(seed))) for seed in (1, 2)]
    # tokens, not text: an untrained model's favourite may be half of a multi-byte character, which
    # decodes to nothing
    assert greedy[0]["tokens"] and full[0]["tokens"]
    assert [g["text"] for g in greedy] != [f["text"] for f in full]  # the nucleus changed what was drawn


def test_cli_guidance_mode_and_candidates(diffusion_checkpoint):
    import json

    from click.testing import CliRunner

    from sunfish.cli import main

    args = [str(diffusion_checkpoint), "--prompt", "robot", "--guidance-scale", "3", "--seq-len", "12",
            "--num-steps", "4", "--format", "json"]
    seq = json.loads(_sample_cli(*args, "--guidance", "sequence", "--candidates", "3"))
    tok = json.loads(_sample_cli(*args, "--guidance", "token"))
    assert seq["guidance"] == "sequence" and tok["guidance"] == "token"
    # the default: sampling.guidance of the project params.yaml (token since block diffusion became the default)
    assert json.loads(_sample_cli(*args))["guidance"] == "token"
    again = json.loads(_sample_cli(*args, "--guidance", "sequence", "--candidates", "3"))
    assert again["text"] == seq["text"]  # seeded
    bad = CliRunner().invoke(main, ["sample", *args, "--candidates", "0"])
    assert bad.exit_code == 2 and "--candidates" in bad.output


def test_nucleus_keeps_the_smallest_set_holding_top_p():
    from sunfish.diffusion.masked import nucleus

    log_p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02]]).log()
    assert torch.equal(nucleus(log_p, 1.0), log_p)
    kept = nucleus(log_p, 0.75).exp()
    assert torch.allclose(kept[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))  # 0.5 + 0.3 reach 0.75
    assert torch.allclose(kept[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(nucleus(log_p, 1e-9).exp().amax(-1), torch.ones(2))  # never empty: the top token stays
    with pytest.raises(ValueError, match="top_p"):
        sample(tiny(), None, num_samples=1, seq_len=4, num_steps=2, guidance_scale=0.0, top_p=0.0)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_nucleus_partial_sort_keeps_what_a_full_sort_keeps(top_p, monkeypatch):
    """Peaked rows (the nucleus inside the candidates) and flat ones (the full-sort fallback)."""
    from sunfish.diffusion import masked

    g = torch.Generator().manual_seed(0)
    sharpness = torch.linspace(0.1, 12, 48, dtype=torch.float64)[:, None]
    logits = torch.randn(48, 4096, generator=g, dtype=torch.float64) * sharpness
    log_p = torch.log_softmax(logits, dim=-1)
    probs, order = log_p.exp().sort(dim=-1, descending=True)  # the plain full-sort reference
    drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, (probs.cumsum(-1) - probs) >= top_p)
    want = torch.log_softmax(log_p.masked_fill(drop, float("-inf")), dim=-1)
    got = masked.nucleus(log_p, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got, want)
    monkeypatch.setattr(masked, "NUCLEUS_CANDIDATES", 2)  # every row needs the fallback
    torch.testing.assert_close(masked.nucleus(log_p, top_p), want)


def test_train_stage_logs_embedding_health_of_every_milestone(tmp_path):
    """The continuous objective's non-collapse evidence reaches the metrics, a curve and MLflow."""
    import contextlib
    import csv
    import json
    from types import SimpleNamespace

    from pipeline.train_cfg import log_milestone_health
    from sunfish.training.checkpoint import save_checkpoint

    logged = []
    run = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    ctx = SimpleNamespace(models=tmp_path / "models", reports=tmp_path / "reports",
                          tracking=lambda flat, run_id=None: contextlib.nullcontext(run))
    (tmp_path / "tokenizer.json").write_text("{}")
    model = tiny("continuous")
    for step in (2, 4):
        save_checkpoint(ctx.models / "cfg" / f"step_{step}", model, model_name="cfg", step=step,
                        tokenizer_file=tmp_path / "tokenizer.json")
    metrics_file = ctx.reports / "stages" / "cfg.json"
    metrics_file.parent.mkdir(parents=True)
    metrics_file.write_text(json.dumps({"model": "cfg", "mlflow_run_id": None}))

    rows = log_milestone_health(ctx, {})

    expected = model.health(torch.Generator().manual_seed(0))
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[-1]["embedding_mean_cosine"] == pytest.approx(expected["embedding_mean_cosine"])
    assert 0.0 <= rows[-1]["rounding_accuracy_t1"] <= 1.0
    assert json.loads(metrics_file.read_text())["health"] == {k: rows[-1][k] for k in expected}
    with (ctx.reports / "curves" / "cfg" / "health.csv").open() as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [2, 4]
    assert [s for s, m in logged] == [2, 4] and "health/rounding_accuracy_t1" in logged[0][1]
