"""The "fluent and on topic" measure: tricks fail it, real on-topic text passes it, costs are per sample."""

from __future__ import annotations

import lzma
import random
from pathlib import Path

import pytest

from sunfish.data.prompts import build_pairs
from sunfish.evaluation.fluency import echo_text, headline, score_row, shuffled_text, wilson
from sunfish.evaluation.ngram_judge import NGramJudge, calibrate
from sunfish.report import fluency_section

CORPUS = Path(__file__).resolve().parents[1] / "data/corpora/tinystories/TinyStories-train.head2000.txt.xz"
MAX_WORDS = 40


@pytest.fixture(scope="module")
def docs() -> list[str]:
    text = lzma.open(CORPUS, "rt", encoding="utf-8").read()
    return [d.strip() for d in text.split("<|endoftext|>") if d.strip()]


@pytest.fixture(scope="module")
def setup(docs):
    judge = NGramJudge.fit(docs[:1500], order=3)
    cal = calibrate(judge, docs[1500:1750], MAX_WORDS, seed=0)
    pairs = build_pairs(docs[1750:], "tinystories", seed=0)[:64]  # held out from judge and calibration
    return judge, cal, pairs


def _row(setup, name, texts, role="reference"):
    judge, cal, pairs = setup
    return score_row(name, texts, [p["target"] for p in pairs], judge, cal, role=role, prompt_set="test",
                     prompts=[p["prompt"] for p in pairs])


def test_real_on_topic_text_passes_and_the_echo_never_does(setup):
    _, _, pairs = setup
    real = _row(setup, "real held-out text", [p["text"] for p in pairs])
    echo = _row(setup, "prompt echoed", [echo_text(p["prompt"], MAX_WORDS) for p in pairs])
    assert real["on_topic"] == 1.0  # each target is a salient noun of its own document
    assert real["fluent_on_topic"] >= 0.75
    assert echo["on_topic"] == 1.0  # the trick that fooled keyword presence...
    assert echo["fluent"] == 0.0 and echo["fluent_on_topic"] == 0.0  # ...fails here


def test_copying_the_keyword_into_word_salad_fails(setup, docs):
    _, _, pairs = setup
    rng = random.Random(0)
    vocab = " ".join(docs[:200]).split()
    salad = [" ".join(rng.choice(vocab) for _ in range(25)) + f" the {p['target'][0]} " +
             " ".join(rng.choice(vocab) for _ in range(25)) for p in pairs]
    shuffled = [shuffled_text(p["text"], i) for i, p in enumerate(pairs)]
    for name, texts in (("salad with the keyword", salad), ("shuffled", shuffled)):
        row = _row(setup, name, texts)
        assert row["on_topic"] >= 0.9, name
        assert row["fluent_on_topic"] <= 0.05, name


def test_fluent_but_off_topic_text_fails(setup, docs):
    _, _, pairs = setup
    # real stories, each paired with another document's prompt: fluent, mostly off topic
    other = [pairs[(i + 7) % len(pairs)]["text"] for i in range(len(pairs))]
    row = _row(setup, "someone else's story", other)
    assert row["fluent"] >= 0.75
    assert row["fluent_on_topic"] < row["fluent"] - 0.3


def test_costs_are_per_sample_and_speed_is_tokens_per_second(setup):
    judge, cal, pairs = setup
    texts = [p["text"] for p in pairs]
    row = score_row("m", texts, [p["target"] for p in pairs], judge, cal, role="model", prompt_set="test",
                    guidance_scale=1.5, seconds=32.0, forward_rows=64 * 128, tokens=64 * 64)
    assert row["seconds_per_sample"] == pytest.approx(0.5)
    assert row["forward_rows_per_sample"] == pytest.approx(128)
    assert row["tokens_per_s"] == pytest.approx(128)
    with pytest.raises(ValueError, match="targets"):
        score_row("m", texts[:3], [["dog"]], judge, cal, role="model", prompt_set="test")


def test_wilson_interval():
    lo, hi = wilson(32, 64)
    assert lo < 0.5 < hi and hi - lo < 0.26
    assert wilson(0, 64)[0] == 0.0 and wilson(64, 64)[1] == 1.0
    assert wilson(0, 0) == [None, None]


def _fake(name, s, w, share, fluent=0.5, tps=None, role="model"):
    return {"name": name, "set": s, "guidance_scale": w, "fluent_on_topic": share, "fluent": fluent,
            "tokens_per_s": tps, "role": role, "n": 64, "ci": [0, 1], "on_topic": share}


def test_headline_reads_test_rows_only():
    rows = [_fake("diffusion", "dev", 1.5, 0.9), _fake("diffusion", "test", 1.5, 0.6, 0.7, 200.0),
            _fake("diffusion", "test", 0.0, 0.1), _fake("diffusion", "test", 1.0, 0.4),
            _fake("AR stage 0", "test", None, 0.2, 0.8, 100.0, "reference"),
            _fake("prompt echoed", "test", None, 0.0, 0.0, None, "reference")]
    h = headline(rows, 1.5)
    assert h["fluent_on_topic"] == 0.6  # not the dev row's 0.9
    assert h["gain_over_w0"] == pytest.approx(0.5)
    assert h["fluent_gap_to_ar"] == pytest.approx(0.1)
    assert h["speed_vs_ar"] == pytest.approx(2.0)
    assert h["echo_fluent_on_topic"] == 0.0
    assert h["best_of_k"] is None and h["best_of_k_fluent_on_topic"] is None  # no such rows: nothing invented
    best = dict(_fake("diffusion, best of 4 by its own likelihood", "test", 1.0, 0.7, 0.8, None, "reference"),
                samples_per_prompt=4)
    ar_best = dict(_fake("AR stage 0, best of 4 by its own likelihood", "test", None, 0.1, 0.6, None, "reference"),
                   samples_per_prompt=4)
    h = headline(rows + [best, ar_best], 1.5)
    assert (h["best_of_k"], h["best_of_k_fluent_on_topic"], h["best_of_k_fluent"], h["ar_best_of_k_fluent"]) == (
        4, 0.7, 0.8, 0.6)
    assert h["fluent_on_topic"] == 0.6  # the single-sample row stays the headline
    header, table = fluency_section.table({"rows": rows})
    assert len(table) == len(rows) and len(table[0]) == len(header)
    assert table[-1][1] == "dev"  # dev rows last: the test rows lead


def test_the_likelihood_table_labels_the_diffusion_figures_as_bounds():
    from sunfish.report.render import render_html, render_markdown

    lk = {"ar_nats_per_token": 3.7, "ar_bpb": 1.34, "uncond_nats_per_token": 4.37, "uncond_bpb": 1.59,
          "cond_nats_per_token": 4.24, "cond_bpb": 1.54, "uncond_over_ar": 4.37 / 3.7, "cond_over_ar": 4.24 / 3.7,
          "tokens": 168702, "scope": "every token of 802 whole validation documents"}
    rows = [_fake("diffusion", "test", 1.0, 0.5)]
    header, table, scope = fluency_section.likelihood_table({"rows": rows, "likelihood": lk})
    assert [r[1] for r in table] == ["exact NLL", "≤ (ELBO, an upper bound)", "≤ (ELBO, conditional)"]
    assert table[1][4] == "1.181" and "802 whole validation documents" in scope and "168702 tokens" in scope
    assert fluency_section.likelihood_table({"rows": rows})[1] == []  # not measured: no table
    summary = {"fluency": {"rows": rows, "likelihood": lk}}
    assert "≤ (ELBO, an upper bound)" in render_html(summary)
    assert "≤ (ELBO, an upper bound)" in render_markdown(summary)


def test_best_of_k_rows_come_with_sequence_guidance_and_cost_k(setup, docs):
    """evaluate_fluency adds the two best-of-k baselines only where sequence guidance draws k."""
    from types import SimpleNamespace

    import torch

    from sunfish.evaluation.fluency_sampling import best_of_k_rows, selection_k
    from sunfish.data.tokenizer import train_bpe
    from sunfish.models.denoiser import DiffusionConfig, DiffusionLM
    from sunfish.models.staged import StagedLM, StagedLMConfig

    judge, cal, pairs = setup
    tok = train_bpe(docs[:200], vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = DiffusionLM(DiffusionConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, d_ff=64,
                                        max_seq_len=16, objective="masked", timesteps=20, prompt_encoder_layers=1,
                                        max_prompt_tokens=8, pad_id=tok.pad_id, eos_id=tok.eos_id)).eval()
    ar = StagedLM(StagedLMConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, d_ff=64,
                                 max_seq_len=32, eos_id=tok.eos_id)).eval()
    sampling = SimpleNamespace(guidance="sequence", guidance_candidates=3, num_steps=4, scheduler="ddim", top_p=1.0)
    assert selection_k(model, sampling) == 3
    assert selection_k(model, SimpleNamespace(**{**vars(sampling), "guidance": "token"})) == 1
    rows = best_of_k_rows(model, ar, tok, pairs[:4], k=3, sampling=sampling, seq_len=8, seed=0, judge=judge, cal=cal)
    assert [r["name"] for r in rows] == ["diffusion, best of 3 by its own likelihood",
                                         "AR stage 0, best of 3 by its own likelihood"]
    for r in rows:
        assert r["samples_per_prompt"] == 3 and r["n"] == 4 and r["forward_rows_per_sample"] >= 3
