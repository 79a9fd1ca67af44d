"""Evaluation metrics: likelihood pooling, text measures, the checklist and the best-checkpoint rule."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sunfish.evaluation.checklist import (
    BEST_RULE,
    BIGRAM_THRESHOLD,
    COHERENT_RATIO,
    PROMPT_EFFECT_GAIN,
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


def _m(step, loss, rw=None, d2=None, bigram=None, guidance=None, fluent=None, varied=None):
    m = {"step": step, "val_loss": loss}
    if rw is not None or d2 is not None or bigram is not None or fluent is not None or varied is not None:
        m["quality"] = {"real_word_share": rw, "distinct_2": d2, "bigram_share": bigram, "fluent_share": fluent,
                        "varied_share": varied}
    if guidance is not None:  # (scale, fluent-and-on-topic share); adherence 1.0: the prompt's word always there
        m["guidance"] = [{"scale": w, "adherence": 1.0, "fluent_on_topic": a, "n": 8} for w, a in guidance]
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


def test_best_checkpoint_chooses_on_selection_figures_not_reported_ones():
    # reported (test-half) figures favour step 300; the dev half and the selection samples favour 200
    ms = [_m(200, 1.90, 0.5, 0.5), _m(300, 1.50, 0.99, 0.99)]
    ms[0]["selection"] = {"loss": 1.40, "quality": {"real_word_share": 0.9, "distinct_2": 0.9}}
    ms[1]["selection"] = {"loss": 1.60, "quality": {"real_word_share": 0.9, "distinct_2": 0.9}}
    assert best_checkpoint(ms) == 200
    # the selection samples break a loss tie, whatever the reported samples say
    ms[1]["selection"]["loss"] = 1.41
    ms[1]["selection"]["quality"] = {"real_word_share": 0.95, "distinct_2": 0.95}
    ms[0]["quality"] = {"real_word_share": 1.0, "distinct_2": 1.0}
    assert best_checkpoint(ms) == 300
    assert "dev" in BEST_RULE


def test_split_halves_are_disjoint_and_pool_token_weighted():
    from sunfish.evaluation.likelihood import pool, split_halves

    parts = [(10.0, 10), (20.0, 10), (90.0, 30), (5.0, 5), (1.0, 1)]
    dev, test = split_halves(parts)
    assert dev == parts[:2] and test == parts[2:]  # first half chooses, second is reported
    assert pool(test, 1.0)["loss"] == pytest.approx(96.0 / 36) and pool(test, 1.0)["tokens"] == 36
    assert split_halves(parts[:1]) == (parts[:1], parts[:1])  # nothing to halve: said by the caller
    model = FakeModel()
    out = score_batches(model, [{"nats": n, "tokens": t} for n, t in parts], bytes_per_token=1.0)
    assert out["parts"] == parts and out["loss"] == pytest.approx(126.0 / 56)


def test_scoring_batch_size_leaves_two_halves():
    from sunfish.evaluation.milestones import halving_batch_size

    assert halving_batch_size(100, 16) == 16  # 7 batches
    assert halving_batch_size(5, 16) == 3  # 3 + 2 rows: two batches
    assert halving_batch_size(2, 16) == 1 and halving_batch_size(1, 16) == 1


def test_checklist_staged():
    ms = [_m(100, 2.5, 0.8, 0.5, 0.4), _m(200, 1.8, 0.93, 0.7, 0.7, fluent=0.67, varied=1.0)]
    items = {i["name"]: i for i in checklist(ms, kind="staged", real_fluent_share=0.84)}
    assert list(items) == [
        "loss below 2.0",
        "real words",
        "word variety",
        "phrases forming",
        "prompts have an effect",
        "coherent sentences",
    ]
    assert items["loss below 2.0"]["passed"] is True and items["loss below 2.0"]["value"] == 1.8
    assert items["loss below 2.0"]["step"] == 200
    assert items["real words"]["passed"] is True
    assert items["word variety"]["passed"] is True and items["word variety"]["value"] == 1.0
    assert items["phrases forming"]["passed"] is (0.7 >= BIGRAM_THRESHOLD)
    assert items["prompts have an effect"]["passed"] is None  # not applicable to AR models
    assert items["coherent sentences"]["passed"] is True and "84%" in items["coherent sentences"]["criterion"]
    for item in items.values():
        assert set(item) >= {"name", "passed", "value", "criterion"} and item["criterion"]


def test_every_checklist_item_can_fail():
    # loops (not varied), unjudged-fluent samples, unknown words, word pairs never seen, a high loss
    ms = [_m(100, 2.2, 0.5, 0.6), _m(200, 2.1, 0.6, 0.9, 0.4, fluent=0.3, varied=0.3)]
    items = {i["name"]: i for i in checklist(ms, step=200, real_fluent_share=0.84)}
    assert items["loss below 2.0"]["passed"] is False
    assert items["real words"]["passed"] is False
    assert items["phrases forming"]["passed"] is False
    # 0.3 < 0.5 x 0.84 and 0.3 < 0.5 x 0.9: relative to real held-out text, not absolute
    assert items["coherent sentences"]["passed"] is False and items["word variety"]["passed"] is False
    assert 0.3 < COHERENT_RATIO * 0.84
    # the bar follows the calibration: where real text is judged fluent only half the time, 0.3 passes
    ok = {i["name"]: i for i in checklist(ms, step=200, real_fluent_share=0.5)}
    assert ok["coherent sentences"]["passed"] is True
    # the copy-head trick: every sample names the target (adherence 1.0 at every scale) but none is fluent
    salad = [_m(200, 2.9, 0.9, 0.6, guidance=[(0.0, 0.0), (1.0, 0.0)])]
    item = checklist(salad, kind="diffusion")[4]
    assert item["name"] == "prompts have an effect" and item["passed"] is False


def test_checklist_unmeasurable():
    ms = [_m(100, 2.2, 0.5, 0.6), _m(200, float("nan"), 0.6, 0.4)]
    items = {i["name"]: i for i in checklist(ms, step=200)}
    assert items["loss below 2.0"]["passed"] is False  # NaN loss: diverged, a failure
    assert items["phrases forming"]["passed"] is None  # no bigram share measured
    assert items["coherent sentences"]["passed"] is None  # no judge
    assert items["word variety"]["passed"] is None
    assert checklist(ms, step=200, bigram_share=0.9)[3]["passed"] is True
    items = checklist([], kind="diffusion")
    assert all(i["passed"] is None for i in items)


def test_checklist_diffusion_guidance():
    ms = [
        _m(100, 3.0, 0.9, 0.5, guidance=[(0.0, 0.1), (3.0, 0.4)]),
        _m(200, 2.9, 0.9, 0.6, guidance=[(0.0, 0.125), (1.0, 0.375), (3.0, 0.75), (7.0, 0.5)]),
    ]
    item = checklist(ms, kind="diffusion")[4]
    assert item["name"] == "prompts have an effect"
    assert item["passed"] is True and item["step"] == 200
    assert item["value"] == {"guidance 0": 0.125, "guidance 3": 0.75}
    # at the chosen scale only: 0.375 - 0.125 >= the gain
    assert checklist(ms, kind="diffusion", guidance_scale=1.0)[4]["value"] == {"guidance 0": 0.125, "guidance 1": 0.375}
    # the reported (test) curve wins over the dev rows the milestone was chosen on
    ms[1]["guidance_test"] = [{"scale": 0.0, "adherence": 1.0, "fluent_on_topic": 0.1},
                              {"scale": 1.0, "adherence": 1.0, "fluent_on_topic": 0.1 + PROMPT_EFFECT_GAIN - 0.01}]
    assert checklist(ms, kind="diffusion", guidance_scale=1.0)[4]["passed"] is False
    del ms[1]["guidance_test"]
    ms[1]["guidance"] = [{"scale": 0.0, "adherence": 0.5, "fluent_on_topic": 0.5},
                         {"scale": 7.0, "adherence": 0.9, "fluent_on_topic": 0.55}]
    assert checklist(ms, kind="diffusion")[4]["passed"] is False
    del ms[1]["guidance"]  # the judged milestone was not swept: the latest swept one is used
    item = checklist(ms, kind="diffusion")[4]
    assert item["passed"] is True and item["step"] == 100


def test_best_entry_and_checklist_for():
    ms = [_m(100, 3.0, 0.9, 0.5, guidance=[(0.0, 0.1), (3.0, 0.4)]), _m(200, 2.9, 0.9, 0.6)]
    assert best_entry(ms) == {"step": 200, "rule": BEST_RULE}
    assert checklist_for(ms)[4]["passed"] is True  # kind inferred: diffusion
    assert checklist_for([_m(100, 1.0)])[4]["passed"] is None  # staged


# ----------------------------------------------------------------------------------------------
# incremental evaluation: the per-checkpoint cache


def _fake_checkpoint(models: Path, name: str, step: int, weights: str, kind: str = "staged") -> Path:
    d = models / name / f"step_{step}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"format_version": 1, "kind": kind, "model_config": {},
                                               "step": step, "weights_sha256": weights}))
    (d / "model.safetensors").write_bytes(b"not read: the digest in config.json identifies the weights")
    return d


class Counting:
    """compute() for evaluate_milestones that records which checkpoints it was asked to evaluate."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, name, step, directory, meta):
        self.calls.append((name, step))
        return {"val_loss": 3.0 - step / 100, "val_bpb": 1.0 - step / 1000, "samples": [], "quality": {}}


def test_cache_evaluates_only_new_or_changed_checkpoints(tmp_path):
    from sunfish.evaluation.milestones import evaluate_milestones
    from sunfish.evaluation.cache import EvalCache

    models = tmp_path / "models"
    _fake_checkpoint(models, "stage_0", 10, "w10")
    _fake_checkpoint(models, "stage_0", 20, "w20")
    cache = EvalCache(tmp_path / "state" / "eval_cache")
    settings = {"staged": {"max_new_tokens": 40, "data": "d1"}}

    def run(counting: Counting) -> dict:
        return evaluate_milestones(models, ["stage_0", "control_1"], lambda kind: settings[kind], cache, counting,
                                   root=tmp_path)

    first = Counting()
    out = run(first)
    assert first.calls == [("stage_0", 10), ("stage_0", 20)]
    assert "control_1" not in out  # no checkpoints: not evaluated
    assert [e["cached"] for e in out["stage_0"]] == [False, False]
    assert out["stage_0"][0]["checkpoint"] == str(Path("models/stage_0/step_10"))

    again = Counting()
    out2 = run(again)
    assert again.calls == []  # nothing loaded or sampled again
    assert [e["cached"] for e in out2["stage_0"]] == [True, True]
    assert [e["val_bpb"] for e in out2["stage_0"]] == [e["val_bpb"] for e in out["stage_0"]]

    _fake_checkpoint(models, "stage_0", 40, "w40")  # a new milestone: only it is evaluated
    new = Counting()
    run(new)
    assert new.calls == [("stage_0", 40)]

    _fake_checkpoint(models, "stage_0", 20, "w20-retrained")  # other weights under the same step
    retrained = Counting()
    run(retrained)
    assert retrained.calls == [("stage_0", 20)]

    settings["staged"] = {"max_new_tokens": 41, "data": "d1"}  # a setting that changes the result
    changed = Counting()
    run(changed)
    assert changed.calls == [("stage_0", 10), ("stage_0", 20), ("stage_0", 40)]

    for f in cache.directory.glob("*.json"):  # a damaged entry is recomputed, never trusted
        f.write_text("{truncated")
    damaged = Counting()
    run(damaged)
    assert len(damaged.calls) == 3

    off = Counting()  # eval.cache: false
    evaluate_milestones(models, ["stage_0"], lambda kind: settings[kind], EvalCache(None), off)
    evaluate_milestones(models, ["stage_0"], lambda kind: settings[kind], EvalCache(None), off)
    assert len(off.calls) == 6


def test_judge_entries_add_fluency_and_fluent_on_topic():
    from sunfish.evaluation.milestones import judge_entries

    evaluated = {
        "stage_0": [{"quality": {"distinct_2": 0.5},
                     "samples": [{"prompt": "Once", "text": "Once upon", "continuation": " upon"}]}],
        "cfg": [{"guidance": [
            {"scale": 0.0, "quality": {}, "samples": [{"prompt": "p", "text": "a cat", "adherent": False}]},
            {"scale": 1.0, "quality": {}, "samples": [{"prompt": "p", "text": "the dog ran", "adherent": True},
                                                     {"prompt": "q", "text": "dog dog dog", "adherent": True}]}],
            "guidance_test": [{"scale": 1.0, "quality": {}, "samples": [{"prompt": "t", "text": "x", "adherent": True}]}]}],
    }
    seen: list = []

    def judge_texts(texts):
        seen.append(list(texts))
        fluent = [t in ("Once upon", "the dog ran") for t in texts]
        return {"judge_ppl": 10.0, "fluent_share": sum(fluent) / len(fluent), "varied_share": 1.0, "fluent": fluent}

    judge_entries(evaluated, judge_texts)
    assert ["Once upon"] in seen  # AR: the whole text a reader sees, prompt included
    assert evaluated["stage_0"][0]["quality"] == {"distinct_2": 0.5, "judge_ppl": 10.0, "fluent_share": 1.0,
                                                  "varied_share": 1.0}
    rows = evaluated["cfg"][0]["guidance"]
    assert rows[1]["fluent_on_topic"] == 0.5  # both name the target; only one is fluent
    assert rows[0]["fluent_on_topic"] == 0.0 and [s["fluent"] for s in rows[1]["samples"]] == [True, False]
    assert evaluated["cfg"][0]["guidance_test"][0]["fluent_on_topic"] == 0.0  # test rows are judged too


def test_ngram_judge_passes_real_text_and_fails_tricks():
    from sunfish.evaluation.judge import JUDGE_RULE, fit_judge, judge_samples

    names = ["Tom", "Lily", "Sam", "Mia", "Ben", "Anna"]
    things = ["ball", "kite", "dog", "cat", "cake", "tree", "boat", "hat"]
    places = ["park", "garden", "house", "beach", "forest", "school"]

    def story(i: int) -> str:
        n, t, pl = names[i % 6], things[(i * 3) % 8], places[(i * 5) % 6]
        return (f"Once upon a time, {n} had a red {t}. {n} took the {t} to the {pl} and played all day. "
                f"The sun was warm and the birds sang. {n} was happy. At night, {n} went home with the {t} "
                f"and said, \"I love the {pl}!\" Then {n} went to sleep.")

    train = [story(i) for i in range(300)]
    held_out = [story(i) for i in range(300, 360)]
    judge, cal, seconds = fit_judge(train, held_out, order=3, max_words=30, seed=0)
    assert cal.real["fluent_share"] > 0.8 and cal.shuffled["fluent_share"] == 0.0 and seconds >= 0
    real = judge_samples(held_out[:10], judge, cal)
    assert real["fluent_share"] >= 0.8 and len(real["fluent"]) == 10
    words = held_out[0].split()
    shuffled = " ".join(words[1::2] + words[::2])
    loop = " ".join(["Tom was happy."] * 12)
    tricks = judge_samples([shuffled, loop, "Write a story about a dog " * 6, "dog"], judge, cal)
    assert tricks["fluent"] == [False, False, False, False]
    assert judge_samples([loop], judge, cal)["varied_share"] == 0.0
    assert "independent" in JUDGE_RULE


def test_model_perplexity_scores_only_the_text_and_ignores_padding(tmp_path):
    from sunfish.data.tokenizer import TextTokenizer
    from sunfish.evaluation.score_text import model_perplexity as judge_perplexity
    from tests.ckpt_fixtures import make_tokenizer, staged_model

    tok = TextTokenizer.load(make_tokenizer(tmp_path))
    model = staged_model(tok.vocab_size, seq=32)
    pairs = [("Once upon a time", " there was a little dog."), ("", "The dog liked to play in the park."),
             ("The dog", " ran")]
    together = judge_perplexity(model, tok, pairs, batch_size=8)
    assert together["tokens"] == sum(len(tok.encode(t)) for _, t in pairs)
    # one at a time (no padding) pools to the same figure: padding does not leak into the score
    nats = tokens = 0.0
    for pair in pairs:
        r = judge_perplexity(model, tok, [pair])
        nats += r["loss"] * r["tokens"]
        tokens += r["tokens"]
    assert together["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert together["ppl"] == pytest.approx(math.exp(together["loss"]))
    # the context conditions the text's score
    assert judge_perplexity(model, tok, [("", " there was a little dog.")])["loss"] != pytest.approx(
        judge_perplexity(model, tok, pairs[:1])["loss"])
    # a text longer than the window is scored on its first window
    long = judge_perplexity(model, tok, [("", "the dog " * 100)])
    assert long["tokens"] == 32
    assert judge_perplexity(model, tok, [("ctx", "")])["ppl"] is None


def _params(**eval_overrides):
    from sunfish.config import Params

    p = Params()
    return SimpleNamespace(params=p.model_copy(update={"eval": p.eval.model_copy(update=eval_overrides)}))


def test_summarise_checklist_uses_judge_and_metrics_are_flat():
    from sunfish.evaluation.milestones import summarise

    ctx = _params()
    judge = {"kind": "word-level interpolated Kneser-Ney", "calibration": {"real": {"fluent_share": 0.8}}}
    ar = [
        {"step": 10, "kind": "staged", "checkpoint": "models/stage_0/step_10", "val_loss": 3.0, "val_bpb": 1.2,
         "quality": {"real_word_share": 0.95, "distinct_2": 0.5, "bigram_share": 0.7, "judge_ppl": 90.0,
                     "fluent_share": 0.0}},
        {"step": 20, "kind": "staged", "checkpoint": "models/stage_0/step_20", "val_loss": 1.9, "val_bpb": 1.0,
         "quality": {"real_word_share": 0.95, "distinct_2": 0.6, "bigram_share": 0.7, "judge_ppl": 35.0,
                     "fluent_share": 2 / 3, "varied_share": 1.0}},
    ]
    row = {"adherence": 0.25, "n": 8, "ci": [0.1, 0.6], "samples": [{"prompt": "p", "text": "t"}],
           "quality": {"real_word_share": 0.5, "distinct_2": 0.4, "judge_ppl": 120.0}}
    test_row = {**row, "quality": {**row["quality"], "judge_ppl": 60.0}, "prompt_set": "test"}
    cfg = [{"step": 20, "kind": "diffusion", "checkpoint": "models/cfg/step_20", "val_loss": 5.0, "val_bpb": 2.0,
            "guidance": [{**row, "scale": 0.0, "adherence": 0.125, "fluent_on_topic": 0.0},
                         {**row, "scale": 7.0, "adherence": 0.5, "fluent_on_topic": 0.5}],
            "guidance_test": [{**test_row, "scale": 0.0, "adherence": 0.25, "fluent_on_topic": 0.0},
                              {**test_row, "scale": 1.0, "adherence": 0.5, "fluent_on_topic": 0.1},
                              {**test_row, "scale": 7.0, "adherence": 0.75, "fluent_on_topic": 0.125}]}]
    ctx.params = ctx.params.model_copy(update={"sampling": ctx.params.sampling.model_copy(update={"guidance_scale": 7.0})})
    models, metrics = summarise({"stage_0": ar, "cfg": cfg}, ctx.params, judge)
    coherent = next(i for i in models["stage_0"]["checklist"] if i["name"] == "coherent sentences")
    assert coherent["value"] == 2 / 3 and coherent["passed"] is True and "80%" in coherent["criterion"]
    # the diffusion milestone's samples and quality are those of the dev rows at sampling.guidance_scale (7)
    assert models["cfg"]["milestones"][0]["adherence"] == 0.5 and models["cfg"]["milestones"][0]["adherence_scale"] == 7.0
    # flat, scalar keys for `dvc exp show`
    assert all(isinstance(v, (int, float, str, type(None))) for v in metrics.values())
    assert metrics["stage_0.best_step"] == 20 and metrics["stage_0.best_val_bpb"] == 1.0
    assert metrics["stage_0.checklist"] == f"{metrics['stage_0.checklist_passed']}/{metrics['stage_0.checklist_measured']}"
    # reported figures come from the test prompts' curve, not the dev rows that chose the milestone
    assert metrics["cfg.adherence"] == 0.75 and metrics["cfg.adherence_w0"] == 0.25
    assert metrics["cfg.fluent_on_topic"] == 0.125 and metrics["cfg.fluent_on_topic_w0"] == 0.0
    assert metrics["cfg.judge_ppl"] == 60.0
    effect = next(i for i in models["cfg"]["checklist"] if i["name"] == "prompts have an effect")
    assert effect["passed"] is False and effect["value"] == {"guidance 0": 0.0, "guidance 7": 0.125}
    # the guidance bar on the test curve: w = 7 has 75% adherence, so it is not met; logged as numbers
    assert models["cfg"]["guidance_bar"]["met"] is False and models["cfg"]["guidance_bar"]["scale"] == 7.0
    assert metrics["cfg.guidance_bar_met"] == 0 and metrics["cfg.guidance_bar_scale"] == 7.0
    assert metrics["cfg.guidance_bar_judge_ratio"] == 1.0 and "stage_0.guidance_bar_met" not in metrics


def _swept_entry(step: int, val_loss: float, scales) -> dict:
    return {"step": step, "kind": "diffusion", "val_loss": val_loss, "val_bpb": val_loss / 3,
            "cache_key": f"k{step}", "checkpoint": f"models/cfg/step_{step}",
            "guidance": [{"scale": w, "adherence": 0.1 * w, "quality": {"real_word_share": 0.5, "distinct_2": 0.5},
                          "samples": []} for w in scales]}


def test_the_test_curve_is_sampled_at_the_best_milestone_only(tmp_path):
    from sunfish.evaluation.milestones import complete_sweeps, progress_scales, show_chosen_scale
    from sunfish.evaluation.cache import EvalCache

    progress = progress_scales(7.0)
    assert progress == [0.0, 1.0, 7.0] and progress_scales(1.0) == [0.0, 1.0]
    full = [0.0, 1.0, 3.0, 5.0, 7.0, 10.0, 15.0]
    entries = [_swept_entry(10, 5.0, progress), _swept_entry(20, 4.0, progress), _swept_entry(30, 4.5, progress)]
    evaluated = {"cfg": entries, "stage_0": [{"step": 5, "kind": "staged", "val_loss": 3.0, "cache_key": "s"}]}
    show_chosen_scale(entries, 7.0)
    asked: list[tuple[int, list[float]]] = []

    def sweep(entry, scales):
        asked.append((entry["step"], scales))
        return [{"scale": w, "adherence": 0.0, "quality": {}, "samples": [], "prompt_set": "test"} for w in scales]

    cache = EvalCache(tmp_path / "cache")
    assert complete_sweeps(evaluated, full, cache, sweep) == 1
    assert asked == [(20, full)]  # the best milestone, every scale on the test prompts
    assert [g["scale"] for g in entries[1]["guidance_test"]] == full
    assert [g["scale"] for g in entries[1]["guidance"]] == progress  # the dev rows that chose it stay
    assert all("guidance_test" not in e for e in (entries[0], entries[2]))

    again = [_swept_entry(10, 5.0, progress), _swept_entry(20, 4.0, progress), _swept_entry(30, 4.5, progress)]
    complete_sweeps({"cfg": again}, full, cache, sweep)
    assert len(asked) == 1 and [g["scale"] for g in again[1]["guidance_test"]] == full  # from the cache


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_sequence_guided_scales_share_one_set_of_candidates(mode, monkeypatch):
    import sunfish.evaluation.checkpoint_figures as figures
    import sunfish.diffusion.sequence_guidance as sg
    from sunfish.config import EvalConfig, SamplingConfig
    from sunfish.data.tokenizer import train_bpe
    from sunfish.models.denoiser import DiffusionConfig, DiffusionLM

    text = "Once upon a time, a little robot went to the park. The dog played with a red ball."
    tok = train_bpe([text] * 8, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = DiffusionLM(DiffusionConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, d_ff=64,
                                        max_seq_len=16, max_prompt_tokens=8, pad_id=tok.pad_id, eos_id=tok.eos_id))
    records = [{"prompt": f"Write about {w}s", "text": text, "target": [w]} for w in ("robot", "dog", "ball")]
    calls = []
    real = sg.draw_candidates

    def counted(*args, **kw):
        calls.append(kw["candidates"])
        return real(*args, **kw)

    ds = importlib.import_module("sunfish.diffusion.sample")  # the package re-exports the function under this name

    direct = []
    real_sample = ds.sample

    def sampled(*args, **kw):
        direct.append(kw["guidance_scale"])
        return real_sample(*args, **kw)

    monkeypatch.setattr(sg, "draw_candidates", counted)
    monkeypatch.setattr(ds, "sample", sampled)
    sampling = SamplingConfig(guidance=mode, guidance_candidates=3, num_steps=4)
    ev = EvalConfig(cfg_prompts=3, cfg_seq_len=8)
    rows = figures.guidance_sweep((model, {}, None), tok, ev, sampling, records, set(), set(), [0.0, 1.0, 3.0, 7.0])
    assert [r["scale"] for r in rows] == [0.0, 1.0, 3.0, 7.0] and all(r["n"] == 3 for r in rows)
    assert [r["guidance"] for r in rows] == ["none", "none", mode, mode]
    # one draw of 3 candidates serves w = 1 and both guided scales; only w = 0 is sampled directly
    assert calls == ([3] if mode == "sequence" else [])
    assert direct == ([0.0] if mode == "sequence" else [0.0, 1.0, 3.0, 7.0])

    # the best milestone's whole curve (evaluate's second call) reuses the progress rows' candidates
    drawn: dict = {}
    first = figures.guidance_sweep((model, {}, None), tok, ev, sampling, records, set(), set(), [0.0, 1.0, 7.0],
                                     drawn, "ckpt")
    calls.clear()
    rest = figures.guidance_sweep((model, {}, None), tok, ev, sampling, records, set(), set(), [3.0], drawn, "ckpt")
    assert calls == []
    by_scale = {r["scale"]: r for r in rows}
    for r in (*first, *rest):  # the same rows as the one-call sweep: the draw is seeded
        assert [x["text"] for x in r["samples"]] == [x["text"] for x in by_scale[r["scale"]]["samples"]]


def test_scoring_follows_the_training_precision_and_keys_the_cache(monkeypatch):
    import sunfish.evaluation.milestones as evaluate
    import sunfish.training.loop as loop

    context, name = evaluate.scoring_autocast("fp32")
    assert name == "None" and not context._enabled
    context, name = evaluate.scoring_autocast("bf16")
    assert name == "torch.bfloat16" and context._enabled and context.fast_dtype == torch.bfloat16
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)
    assert evaluate.scoring_autocast("auto")[1] == "None"  # no native bf16: fp32, as training
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: True)
    assert evaluate.scoring_autocast("auto")[1] == "torch.bfloat16"


def test_the_evaluation_cache_key_holds_the_scoring_precision():
    from types import SimpleNamespace

    import pipeline.evaluate as evaluate
    from sunfish.config import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    keys = {}
    for precision in ("fp32", "bf16"):
        p = params.model_copy(update={"train": params.train.model_copy(update={"precision": precision})})
        keys[precision] = evaluate._settings(SimpleNamespace(params=p), "data", "code")("staged")
    assert keys["fp32"]["scoring_precision"] == "None" and keys["bf16"]["scoring_precision"] == "torch.bfloat16"
