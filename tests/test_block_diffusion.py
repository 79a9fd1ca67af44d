"""Block diffusion: the layout is block-causal, block 1 is the AR model, the sampler matches the
objective, and the AR initialisation carries the AR weights."""

from __future__ import annotations

import pytest
import torch

from sunfish.diffusion import block as bd
from sunfish.models.block_denoiser import BlockDiffusionConfig, BlockDiffusionLM
from sunfish.models.staged import StagedLM, StagedLMConfig

VOCAB = 40
EOS, PAD = 0, 1


def ar_model(seed: int = 0) -> StagedLM:
    torch.manual_seed(seed)
    return StagedLM(StagedLMConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, d_ff=64,
                                   max_seq_len=64, eos_id=EOS))


def block_model(ar: StagedLM, block_size: int, init: bool = True, copy: bool = False) -> BlockDiffusionLM:
    config = BlockDiffusionConfig(vocab_size=VOCAB, backbone=BlockDiffusionLM.backbone_from(ar.config),
                                  block_size=block_size, max_prompt_tokens=8, pad_id=PAD, eos_id=EOS,
                                  prompt_copy=copy)
    model = BlockDiffusionLM.from_ar(ar, config) if init else BlockDiffusionLM(config)
    if copy:  # an open gate and sharp pointer, so that a wrong prompt state shows
        with torch.no_grad():
            model.copy_head.gate.bias.fill_(1.0)
            model.copy_head.query.weight.normal_(0, 0.5)
            model.copy_head.key.weight.normal_(0, 0.5)
    return model.eval()


def batch(rows: int = 3, length: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(2, VOCAB, (rows, length), generator=g)
    prompt = torch.randint(2, VOCAB, (rows, 5), generator=g)
    prompt_mask = torch.ones_like(prompt, dtype=torch.bool)
    prompt_mask[0, 3:] = False  # a shorter prompt, padded on the right as PairDataset pads
    return {"text_ids": text, "text_mask": torch.ones_like(text, dtype=torch.bool),
            "prompt_ids": prompt, "prompt_mask": prompt_mask}


def test_block_of_one_is_the_ar_model():
    """With B = 1 every noised input is an anchor, so the outputs are the AR model's next-token logits
    on "prompt <eos> text" (the prompt right-aligned against the text)."""
    ar = ar_model()
    model = block_model(ar, 1)
    b = batch()
    prompt_ids, prompt_mask = model.prompt_prefix(b["prompt_ids"], b["prompt_mask"])
    text = torch.cat((torch.full((3, 1), EOS), b["text_ids"]), dim=1)
    text_mask = torch.ones_like(text, dtype=torch.bool)
    with torch.no_grad():
        got = bd.layout_logits(model, prompt_ids, prompt_mask, text, text_mask, torch.zeros_like(text_mask))
        for row in range(3):
            real = prompt_ids[row][prompt_mask[row]]
            want = ar(torch.cat((real, text[row]))[None])[0, len(real): len(real) + text.shape[1] - 1]
            torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4)


def test_group_mask_is_block_causal():
    p, n, b = 2, 9, 4
    m = bd.group_mask(p, n, b)
    clean = lambda i: p + i  # noqa: E731
    noised = lambda i: p + n + i  # noqa: E731
    # the clean copy is causal and never sees the noised copy
    assert m[clean(5), clean(5)] and not m[clean(5), clean(6)] and not m[clean(5), noised(0)]
    # group 1 = noised 4..7: sees the prompt, clean text before its anchor (0..3), and itself
    assert m[noised(5), 0] and m[noised(5), clean(3)] and not m[noised(5), clean(4)]
    assert m[noised(5), noised(7)] and m[noised(4), noised(7)] and not m[noised(5), noised(8)]
    assert not m[noised(5), noised(3)]


def test_no_target_sees_its_own_block_in_clean_form():
    """Changing the clean value of block g's tokens (while masked in the noised copy) cannot change any
    prediction of block g or before: otherwise the objective would leak the answers."""
    torch.manual_seed(0)
    model = block_model(ar_model(), 4)
    b = batch(rows=2, length=12)
    prompt_ids, prompt_mask = model.prompt_prefix(b["prompt_ids"], b["prompt_mask"])
    text = torch.cat((torch.full((2, 1), EOS), b["text_ids"]), dim=1)
    text_mask = torch.ones_like(text, dtype=torch.bool)
    masked = torch.ones_like(text_mask)
    masked[:, ::4] = False  # anchors stay clean
    other = text.clone()
    other[:, 5:8] = (other[:, 5:8] + 7) % (VOCAB - 2) + 2  # block 1's targets 5..8 except the anchor 8
    with torch.no_grad():
        a = bd.layout_logits(model, prompt_ids, prompt_mask, text, text_mask, masked)
        c = bd.layout_logits(model, prompt_ids, prompt_mask, other, text_mask, masked)
    torch.testing.assert_close(a[:, :8], c[:, :8])  # predictions of x_1..x_8
    assert not torch.allclose(a[:, 8:], c[:, 8:])  # later blocks do see them


@pytest.mark.parametrize("copy", [False, True])
def test_sampler_scores_a_group_as_the_objective_does(copy):
    """The sampler's logits for group g equal the training layout's for the same partly revealed text."""
    model = block_model(ar_model(), 4, copy=copy)
    b = batch(rows=2, length=12)
    prompt_ids, prompt_mask = model.prompt_prefix(b["prompt_ids"], b["prompt_mask"])
    text = torch.cat((torch.full((2, 1), EOS), b["text_ids"]), dim=1)
    masked = torch.zeros_like(text, dtype=torch.bool)
    masked[:, 5] = masked[:, 7] = True  # group 1: anchor 4, inputs 5..7, 5 and 7 masked
    partial = torch.where(masked, torch.full_like(text, model.mask_id), text)
    with torch.no_grad():
        train = bd.layout_logits(model, prompt_ids, prompt_mask, text, torch.ones_like(masked), masked)
        sampled = bd._group_log_probs(model, prompt_ids, prompt_mask, partial, 4, 8, False, 1.0, None)
    torch.testing.assert_close(sampled, torch.log_softmax(train[:, 4:8].double(), -1), atol=1e-5, rtol=1e-5)


def test_ar_initialisation_loads_the_weights_it_names():
    """Mutation check of the issue: a random init must change the first loss."""
    torch.manual_seed(0)
    ar = ar_model()
    with torch.no_grad():  # give the AR model something to know: a strong bigram bias
        ar.head.weight.mul_(20)
    warm, cold = block_model(ar, 4), block_model(ar, 4, init=False)
    for name, tensor in ar.state_dict().items():
        got = warm.net.state_dict()[name]
        torch.testing.assert_close(got[: tensor.shape[0]], tensor)
    b = batch()
    g = torch.Generator().manual_seed(0)
    warm_nll = bd.elbo(warm, b, torch.Generator().manual_seed(0))[0]
    cold_nll = bd.elbo(cold, b, g)[0]
    assert abs(float(warm_nll) - float(cold_nll)) > 1.0


def test_sampler_shapes_guidance_and_seed():
    model = block_model(ar_model(), 4)
    b = batch(rows=2)
    kw = dict(num_samples=2, seq_len=10, num_steps=6, generator=None, top_p=0.9, order="random")
    counter: dict = {}
    out = bd.sample(model, b["prompt_ids"][:2], b["prompt_mask"][:2], guidance_scale=3.0, counter=counter,
                    use_cache=False, **{**kw, "generator": torch.Generator().manual_seed(0)})
    again = bd.sample(model, b["prompt_ids"][:2], b["prompt_mask"][:2], guidance_scale=3.0, use_cache=False,
                      **{**kw, "generator": torch.Generator().manual_seed(0)})
    assert out.shape == (2, 10) and bool((out < VOCAB).all())
    assert torch.equal(out, again)
    # 3 blocks x 2 steps, each on 2 prompted + 2 null-prompt rows
    assert counter["forward_rows"] == 3 * 2 * 4
    uncond = bd.sample(model, None, None, guidance_scale=1.0, **{**kw, "generator": torch.Generator().manual_seed(0)})
    assert uncond.shape == (2, 10)


def test_infill_keeps_the_given_tokens():
    model = block_model(ar_model(), 4)
    ids = torch.randint(2, VOCAB, (1, 10))
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[0, [0, 5, 9]] = True
    out = bd.sample(model, None, None, num_samples=1, seq_len=10, num_steps=10, guidance_scale=0.0,
                    infill=(ids, keep), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[keep], ids[keep])


def test_bad_shapes_are_refused_with_the_reason():
    ar = ar_model()
    with pytest.raises(ValueError, match="block_size"):
        BlockDiffusionConfig(vocab_size=VOCAB, backbone=BlockDiffusionLM.backbone_from(ar.config), block_size=0)
    other = StagedLM(StagedLMConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=48, d_ff=64, max_seq_len=64))
    config = BlockDiffusionConfig(vocab_size=VOCAB, backbone=BlockDiffusionLM.backbone_from(ar.config))
    with pytest.raises(ValueError, match="shape"):
        BlockDiffusionLM.from_ar(other, config)
    model = BlockDiffusionLM(config)
    with pytest.raises(ValueError, match="max_seq_len"):
        bd.sample(model, None, None, num_samples=1, seq_len=80, num_steps=4, guidance_scale=0.0)


@pytest.mark.parametrize("mu_full,copy", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_kv_cached_sampler_draws_what_the_full_recompute_draws(mu_full, copy, w):
    torch.manual_seed(0)
    ar = StagedLM(StagedLMConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=64,
                                 eos_id=EOS, mu_full=mu_full))
    with torch.no_grad():
        ar.head.weight.mul_(3)  # peaked distributions: a wrong context shows in the draws
    model = block_model(ar, 4, copy=copy)
    b = batch(rows=3)
    kw = dict(num_samples=3, seq_len=14, num_steps=14, guidance_scale=w, top_p=0.95)
    counter: dict = {}
    cached = bd.sample(model, b["prompt_ids"], b["prompt_mask"], generator=torch.Generator().manual_seed(1),
                       counter=counter, **kw)
    recount: dict = {}
    full = bd.sample(model, b["prompt_ids"], b["prompt_mask"], generator=torch.Generator().manual_seed(1),
                     use_cache=False, counter=recount, **kw)
    assert torch.equal(cached, full)
    rows = 6 if w not in (0.0, 1.0) else 3
    # the same look-ahead passes plus the prefix once: a finished block rides on the next block's first pass
    assert recount["forward_rows"] >= rows * 4
    assert counter["forward_rows"] == recount["forward_rows"] + rows


def test_copy_head_copies_prompt_tokens_and_leaves_the_null_prompt_alone():
    model = block_model(ar_model(), 4, copy=True)
    b = batch(rows=2, length=8)
    prompt_ids, prompt_mask = model.prompt_prefix(b["prompt_ids"], b["prompt_mask"])
    text = torch.cat((torch.full((2, 1), EOS), b["text_ids"]), dim=1)
    ones = torch.ones_like(text, dtype=torch.bool)
    masked = torch.zeros_like(ones)
    masked[:, 1:] = True
    with torch.no_grad():
        mixed = torch.log_softmax(bd.layout_logits(model, prompt_ids, prompt_mask, text, ones, masked).double(), -1)
        model.copy_enabled = False
        vocab = torch.log_softmax(bd.layout_logits(model, prompt_ids, prompt_mask, text, ones, masked).double(), -1)
        null = torch.zeros_like(prompt_mask)
        model.copy_enabled = True
        null_mixed = bd.layout_logits(model, prompt_ids, null, text, ones, masked)
        model.copy_enabled = False
        null_vocab = bd.layout_logits(model, prompt_ids, null, text, ones, masked)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(mixed.shape[:2], dtype=torch.float64))
    for row in range(2):
        in_prompt = torch.zeros(VOCAB, dtype=torch.bool)
        in_prompt[prompt_ids[row][prompt_mask[row]]] = True
        gain = (mixed[row].exp() - vocab[row].exp())[:, in_prompt].sum(-1)
        assert bool((gain > 0.1).all())  # the open gate moves mass onto the prompt's tokens
    torch.testing.assert_close(torch.log_softmax(null_mixed.double(), -1), torch.log_softmax(null_vocab.double(), -1))


def test_copy_guidance_guides_the_vocabulary_and_keeps_the_copy_at_its_gate():
    model = block_model(ar_model(), 4, copy=True)
    b = batch(rows=2, length=6)
    prompt_ids, prompt_mask = model.prompt_prefix(b["prompt_ids"], b["prompt_mask"])
    ids = torch.cat((prompt_ids, b["text_ids"]), dim=1)
    width = prompt_ids.shape[1]
    ids2 = torch.cat((ids, ids))
    pmask2 = torch.cat((prompt_mask, torch.zeros_like(prompt_mask)))
    keys = torch.cat((pmask2, torch.ones(4, b["text_ids"].shape[1], dtype=torch.bool)), dim=1)
    attn = keys[:, None, None, :] | torch.eye(ids.shape[1], dtype=torch.bool)[None, None]
    positions = torch.arange(ids.shape[1])
    with torch.no_grad():
        hidden = model.net(ids2, positions=positions, attn_mask=attn, return_hidden=True)
        text, prompt = hidden[:, width:], hidden[:, :width]
        cond = torch.log_softmax(model.head_scores(text[:2], prompt[:2], ids2[:2, :width], pmask2[:2]).double(), -1)
        uncond = torch.log_softmax(model.net.head(text[2:])[..., :VOCAB].double(), -1)
        at = {w: bd.copy_guided_log_probs(model, text, prompt, ids2[:, :width], pmask2, w) for w in (0.0, 1.0, 3.0)}
        vocab_c = torch.log_softmax(model.net.head(text[:2])[..., :VOCAB].double(), -1)
        gate = torch.sigmoid(model.copy_head.gate(text[:2]).squeeze(-1).double())
    torch.testing.assert_close(at[0.0], uncond)
    torch.testing.assert_close(at[1.0], cond)
    whole_mixture = torch.log_softmax(uncond + 3.0 * (cond - uncond), -1)  # what the plain rule would give
    for row in range(2):
        in_prompt = torch.zeros(VOCAB, dtype=torch.bool)
        in_prompt[prompt_ids[row][prompt_mask[row]]] = True
        copied = at[3.0][row].exp()[:, in_prompt].sum(-1)
        # the prompt's words get the gate's share plus what the guided vocabulary gives them, never
        # the mixture's amplified odds
        assert bool((copied >= gate[row] - 1e-9).all())
        assert float(copied.mean()) < float(whole_mixture[row].exp()[:, in_prompt].sum(-1).mean())
    assert not torch.allclose(at[3.0], torch.log_softmax(vocab_c, -1))
    with pytest.raises(ValueError, match="gate_scale"):
        model.copy_head(text[:2], vocab_c, prompt[:2], pmask2[:2], ids2[:2, :width], gate_scale=1.5)


def test_cache_truncate_and_select_keep_the_right_positions_and_rows():
    from sunfish.models.layers import KVCache

    cache = KVCache()
    layer = cache.layer("block.0")
    layer.append(torch.arange(24.0).view(3, 1, 4, 2), -torch.arange(24.0).view(3, 1, 4, 2))
    cache.length = 4
    rows = cache.select(torch.tensor([True, False, True]))
    assert rows.layers["block.0"].k.shape == (2, 1, 4, 2) and rows.length == 4
    torch.testing.assert_close(rows.layers["block.0"].k[1], layer.k[2])
    cache.truncate(3)
    assert cache.length == 3 and layer.k.shape == (3, 1, 3, 2) and layer.v.shape == (3, 1, 3, 2)
    assert rows.layers["block.0"].k.shape[-2] == 4  # the selection is its own
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(5)


def test_extend_run_reveals_only_a_contiguous_run_of_sure_positions():
    still = torch.tensor([[True, True, True, True], [False, True, True, True], [True, True, True, True]])
    reveal = torch.tensor([[True, False, False, False], [False, True, False, False], [True, False, False, False]])
    sure = torch.tensor([[False, True, False, True], [False, False, True, True], [False, False, True, True]])
    got = bd._extend_run(still, reveal, sure)
    assert got.tolist() == [[True, True, False, False], [False, True, True, True], [True, False, False, False]]


@pytest.mark.parametrize("copy,w", [(False, 1.0), (True, 1.0), (True, 2.5)])
def test_parallel_confidence_reveals_sure_tokens_together_and_caches_as_the_full_recompute(copy, w):
    torch.manual_seed(0)
    ar = ar_model()
    with torch.no_grad():
        ar.head.weight.mul_(40)  # peaked: many draws are sure
    model = block_model(ar, 4, copy=copy)
    b = batch(rows=3)
    kw = dict(num_samples=3, seq_len=16, num_steps=16, guidance_scale=w, top_p=0.95, exact_counts=True)
    one: dict = {}
    bd.sample(model, b["prompt_ids"], b["prompt_mask"], generator=torch.Generator().manual_seed(1),
              counter=one, **kw)
    fast: dict = {}
    cached = bd.sample(model, b["prompt_ids"], b["prompt_mask"], generator=torch.Generator().manual_seed(1),
                       counter=fast, parallel_confidence=0.5, **kw)
    full = bd.sample(model, b["prompt_ids"], b["prompt_mask"], generator=torch.Generator().manual_seed(1),
                     use_cache=False, parallel_confidence=0.5, **kw)
    assert torch.equal(cached, full)
    assert not bool((cached == model.mask_id).any())
    assert fast["forward_rows"] < one["forward_rows"]  # sure tokens came together: fewer passes
    # a threshold no draw reaches is the one-token-a-step sampler's pass count
    never: dict = {}
    bd.sample(model, b["prompt_ids"], b["prompt_mask"], generator=torch.Generator().manual_seed(1),
              counter=never, parallel_confidence=1.0, **kw)
    assert never["forward_rows"] == one["forward_rows"]


def test_parallel_confidence_is_checked():
    model = block_model(ar_model(), 4)
    for bad, match in ((0.0, "parallel_confidence"), (1.5, "parallel_confidence")):
        with pytest.raises(ValueError, match=match):
            bd.sample(model, None, None, num_samples=1, seq_len=8, num_steps=8, guidance_scale=0.0,
                      parallel_confidence=bad)
    with pytest.raises(ValueError, match="left_to_right"):
        bd.sample(model, None, None, num_samples=1, seq_len=8, num_steps=8, guidance_scale=0.0,
                  parallel_confidence=0.9, order="random")


def test_sampler_token_log_probs_are_the_drawn_tokens_log_likelihood_before_the_nucleus_cut():
    """With B = 1 the block model is the AR model, so the log-probability the sampler writes for each
    drawn token must be the AR model's, teacher-forced on "prompt <eos> sample", over the full
    vocabulary (top_p < 1 renormalises the draw, not the score)."""
    ar = ar_model()
    model = block_model(ar, 1)
    prompt = [5, 9, 12]
    ids, mask = model.pad_prompt_ids([prompt, prompt])
    log_probs = torch.zeros(2, 10, dtype=torch.float64)
    drawn = bd.sample(model, ids, mask, num_samples=2, seq_len=10, num_steps=10, guidance_scale=1.0,
                      exact_counts=True, top_p=0.8, generator=torch.Generator().manual_seed(3),
                      token_log_probs=log_probs)
    with torch.no_grad():
        for row in range(2):
            full = torch.cat((torch.tensor(prompt + [EOS]), drawn[row]))
            logp = torch.log_softmax(ar(full[None, :-1])[0, len(prompt):].double(), dim=-1)
            want = logp.gather(1, drawn[row][:, None]).squeeze(1)
            torch.testing.assert_close(log_probs[row], want, atol=1e-4, rtol=1e-4)
    assert bool((log_probs < 0).all())


def test_block_best_of_k_keeps_the_candidate_the_model_finds_most_likely():
    """The kept sample of each prompt is, among the k the same seed draws, the one with the highest
    mean log-probability per token under the AR model it equals at B = 1 (an independent scorer)."""
    from sunfish.evaluation.best_of_k import ar_log_likelihood, block_best_of_k

    ar = ar_model()
    model = block_model(ar, 1)
    prompts, k = [[5, 9, 12], [7, 3]], 5
    kw = dict(seq_len=8, num_steps=8, exact_counts=True, top_p=1.0)
    kept = block_best_of_k(model, prompts, k=k, guidance_scale=1.0, eos_id=None,
                           generator=torch.Generator().manual_seed(4), **kw)
    ids, mask = model.pad_prompt_ids(prompts)
    drawn = bd.sample(model, ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), num_samples=2 * k,
                      guidance_scale=1.0, generator=torch.Generator().manual_seed(4), **kw).view(2, k, 8)
    for i, prompt in enumerate(prompts):
        scores = ar_log_likelihood(ar, drawn[i], prompt + [EOS], eos_id=None)
        assert scores.max() > scores.min()  # the candidates differ, so the choice is a real one
        assert torch.equal(kept[i], drawn[i, scores.argmax()])
