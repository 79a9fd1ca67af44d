"""Evaluation metrics: likelihood pooling, text measures, the checklist and the best-checkpoint rule."""

from __future__ import annotations

import math

import pytest
import torch

from sunfish.evaluation.checklist import (
    BEST_RULE,
    BIGRAM_THRESHOLD,
    JUDGE_PPL_THRESHOLD,
    best_checkpoint,
    best_entry,
    checklist,
    checklist_for,
)
from sunfish.evaluation.likelihood import bits_per_byte, perplexity, score_batches
from sunfish.evaluation.text_quality import (
    bigram_share,
    corpus_bigrams,
    corpus_vocabulary,
    distinct_n,
    quality,
    real_word_share,
    repetition_rate,
    wilson_interval,
    words,
)

# ----------------------------------------------------------------------------------------------
# likelihood


class FakeModel(torch.nn.Module):
    """nll returns the batch's pre-set (nats, tokens) and records the mode it was called in."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, bool, object]] = []

    def nll(self, batch, generator=None):
        self.calls.append((self.training, torch.is_grad_enabled(), generator))
        return torch.tensor(batch["nats"]), batch["tokens"]


def test_score_batches_is_token_weighted():
    model = FakeModel()
    model.train()
    # batch means are 1.0 and 3.0 nats/token; the token-weighted mean is (10 + 90) / (10 + 30) = 2.5
    batches = [{"nats": 10.0, "tokens": 10}, {"nats": 90.0, "tokens": 30}]
    gen = torch.Generator().manual_seed(0)
    out = score_batches(model, batches, bytes_per_token=4.0, generator=gen)
    assert out["loss"] == pytest.approx(2.5)  # not the mean of batch means (2.0)
    assert out["ppl"] == pytest.approx(math.exp(2.5))
    assert out["bpb"] == pytest.approx(2.5 / math.log(2) / 4.0)
    assert out["tokens"] == 40 and out["batches"] == 2
    # eval mode, no grad, the generator passed through; training mode restored afterwards
    assert all(c == (False, False, gen) for c in model.calls)
    assert model.training


def test_score_batches_cap_empty_and_errors():
    model = FakeModel().eval()
    batches = [{"nats": 2.0, "tokens": 2}, {"nats": 0.0, "tokens": 0}, {"nats": 6.0, "tokens": 2}, {"nats": 100.0, "tokens": 1}]
    out = score_batches(model, iter(batches), bytes_per_token=1.0, max_tokens=3)
    assert out["tokens"] == 4 and out["loss"] == pytest.approx(2.0)  # stops after reaching 3 tokens
    assert not model.training  # an eval-mode model stays in eval mode
    with pytest.raises(ValueError):
        score_batches(model, [], bytes_per_token=1.0)
    with pytest.raises(ValueError):
        score_batches(model, batches, bytes_per_token=0.0)


def test_perplexity_and_bits_per_byte():
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == math.inf
    # 8 bits over 2 bytes: ln(2) * 8 nats
    assert bits_per_byte(8 * math.log(2), 2) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


# ----------------------------------------------------------------------------------------------
# text quality


def test_words():
    assert words("Once upon a TIME, the dog's ball -- 42 times!") == ["once", "upon", "a", "time", "the", "dog's", "ball", "times"]
    assert words("don\u2019t") == ["don't"]
    assert words("") == [] and words("123 ... !!") == []
    assert words("Café naïve") == ["café", "naïve"]


def test_real_word_share_and_bigrams():
    corpus = ["The cat sat on the mat.", "A dog ran."]
    vocab = corpus_vocabulary(corpus)
    assert vocab == {"the", "cat", "sat", "on", "mat", "a", "dog", "ran"}
    assert real_word_share("the cat blorped", vocab) == pytest.approx(2 / 3)
    assert real_word_share("!!!", vocab) == 0.0
    pairs = corpus_bigrams(corpus)
    assert "the cat" in pairs and "mat a" not in pairs  # no pair across documents
    # "the cat" yes, "cat ran" no, "ran on" no -> 1/3
    assert bigram_share("The cat ran on", pairs) == pytest.approx(1 / 3)


def test_distinct_n():
    # unigrams: a b a | b c -> 3 unique / 5
    texts = ["a b a", "b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 5)
    # bigrams: "a b", "b a" from the first, "b c" from the second -> 3 unique / 3
    assert distinct_n(texts, 2) == pytest.approx(1.0)
    assert distinct_n(["x y x y x"], 2) == pytest.approx(2 / 4)
    assert distinct_n([], 2) == 0.0 and distinct_n(["one"], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


def test_repetition_rate():
    assert repetition_rate("one two three four five six") == 0.0
    # 8 words -> 5 four-grams (abcd bcda cdab dabc abcd); one of them repeats an earlier one
    assert repetition_rate("a b c d a b c d") == pytest.approx(1 / 5)
    assert repetition_rate("too short") == 0.0
    loop = " ".join(["the cat sat"] * 10)
    assert repetition_rate(loop) > 0.8


def test_quality_pools_over_samples():
    vocab = {"the", "cat", "sat"}
    pairs = {"the cat", "cat sat"}
    q = quality(["the cat sat", "zorp the"], vocab, pairs)
    assert q["real_word_share"] == pytest.approx(4 / 5)  # pooled words, not a mean of 1.0 and 0.5
    assert q["bigram_share"] == pytest.approx(2 / 3)  # the cat, cat sat | zorp the
    assert q["distinct_1"] == pytest.approx(4 / 5)
    assert q["distinct_2"] == pytest.approx(1.0)
    assert q["repetition_rate"] == 0.0
    assert q["words"] == 5 and q["samples"] == 2
    q = quality([], None)
    assert q["real_word_share"] is None and q["bigram_share"] is None and q["distinct_2"] == 0.0


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


# ----------------------------------------------------------------------------------------------
# checklist and best checkpoint


def _m(step, loss, rw=None, d2=None, bigram=None, guidance=None):
    m = {"step": step, "val_loss": loss}
    if rw is not None or d2 is not None or bigram is not None:
        m["quality"] = {"real_word_share": rw, "distinct_2": d2, "bigram_share": bigram}
    if guidance is not None:
        m["guidance"] = [{"scale": w, "adherence": a, "n": 8} for w, a in guidance]
    return m


def test_best_checkpoint_uses_samples_within_two_percent():
    ms = [
        _m(100, 3.0, 0.9, 0.9),
        _m(200, 1.99, 0.95, 0.8),  # within 2% of 1.96; score 0.76
        _m(300, 1.96, 0.90, 0.6),  # lowest loss; score 0.54
    ]
    assert best_checkpoint(ms) == 200
    ms[1]["val_loss"] = 2.01  # now outside 1.96 * 1.02 = 1.9992
    assert best_checkpoint(ms) == 300
    # no sample measures: lowest loss
    assert best_checkpoint([_m(1, 2.0), _m(2, 1.5), _m(3, 1.6)]) == 2
    assert best_checkpoint([]) is None
    assert best_checkpoint([{"step": 5}, {"step": 9}]) == 9
    assert "2%" in BEST_RULE and "real_word_share" in BEST_RULE


def test_checklist_staged():
    ms = [_m(100, 2.5, 0.8, 0.5, 0.4), _m(200, 1.8, 0.93, 0.7, 0.7)]
    items = {i["name"]: i for i in checklist(ms, kind="staged", judge_ppl=30.0)}
    assert list(items) == [
        "loss below 2.0",
        "real words",
        "word variety increasing",
        "phrases forming",
        "prompts have an effect",
        "coherent sentences",
    ]
    assert items["loss below 2.0"]["passed"] is True and items["loss below 2.0"]["value"] == 1.8
    assert items["loss below 2.0"]["step"] == 200
    assert items["real words"]["passed"] is True
    assert items["word variety increasing"]["passed"] is True
    assert items["word variety increasing"]["value"] == {"step 100": 0.5, "step 200": 0.7}
    assert items["phrases forming"]["passed"] is (0.7 >= BIGRAM_THRESHOLD)
    assert items["prompts have an effect"]["passed"] is None  # not applicable to AR models
    assert items["coherent sentences"]["passed"] is (30.0 < JUDGE_PPL_THRESHOLD)
    for item in items.values():
        assert set(item) >= {"name", "passed", "value", "criterion"} and item["criterion"]


def test_checklist_fails_and_unmeasurable():
    ms = [_m(100, 2.2, 0.5, 0.6), _m(200, float("nan"), 0.6, 0.4)]
    items = {i["name"]: i for i in checklist(ms, step=200)}
    assert items["loss below 2.0"]["passed"] is False  # NaN loss: diverged, a failure
    assert items["real words"]["passed"] is False
    assert items["word variety increasing"]["passed"] is False
    assert items["phrases forming"]["passed"] is None  # no bigram share measured
    assert items["coherent sentences"]["passed"] is None  # no judge
    assert checklist(ms, step=200, bigram_share=0.9)[3]["passed"] is True
    items = checklist([], kind="diffusion")
    assert all(i["passed"] is None for i in items)


def test_checklist_diffusion_guidance():
    ms = [
        _m(100, 3.0, 0.9, 0.5, guidance=[(0.0, 0.1), (3.0, 0.2)]),
        _m(200, 2.9, 0.9, 0.6, guidance=[(0.0, 0.125), (1.0, 0.375), (3.0, 0.75), (7.0, 0.5)]),
    ]
    item = checklist(ms, kind="diffusion")[4]
    assert item["name"] == "prompts have an effect"
    assert item["passed"] is True and item["step"] == 200
    assert item["value"] == {"guidance 0": 0.125, "guidance 3": 0.75}
    ms[1]["guidance"] = [{"scale": 0.0, "adherence": 0.5}, {"scale": 7.0, "adherence": 0.5}]
    assert checklist(ms, kind="diffusion")[4]["passed"] is False
    del ms[1]["guidance"]  # the judged milestone was not swept: the latest swept one is used
    item = checklist(ms, kind="diffusion")[4]
    assert item["passed"] is True and item["step"] == 100


def test_best_entry_and_checklist_for():
    ms = [_m(100, 3.0, 0.9, 0.5, guidance=[(0.0, 0.1), (3.0, 0.4)]), _m(200, 2.9, 0.9, 0.6)]
    assert best_entry(ms) == {"step": 200, "rule": BEST_RULE}
    assert checklist_for(ms)[4]["passed"] is True  # kind inferred: diffusion
    assert checklist_for([_m(100, 1.0)])[4]["passed"] is None  # staged
