"""Data and configuration checks, and the diffusion model's schedule and prompt-path checks: all-zero
data, a vocabulary that does not fit, unknown tokens, leaked validation text, bad settings, a masking
schedule that never reaches full masking; and a raising check becomes a failing row.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sunfish.config import parse_params
from sunfish.diagnose.budget import LayerSpec, check_memory_fit, check_size_vs_data, estimate_training_memory
from sunfish.diagnose.config_checks import (
    check_effective_batch,
    check_graph_window,
    check_heads,
    check_milestones,
    check_seq_len,
    check_vocab,
)
from sunfish.diagnose.core import guarded
from sunfish.diagnose.data_checks import (
    check_batch_content,
    check_special_tokens,
    check_splits,
    check_tokenizer_roundtrip,
    check_unknown_tokens,
    check_val_overlap,
    sequences_in,
    unknown_token_id,
)
from sunfish.diagnose.diffusion_checks import (
    check_conditioning_dropout,
    check_mask_schedule,
    check_noise_schedule,
    check_prompt_encoder,
)
from sunfish.diagnose.init_checks import check_init
from tests.diagnose.helpers import VOCAB, ar_batch, by_name, tiny_lm


def test_all_zero_data_fails_batch_and_special_token_checks():
    zeros = np.zeros(10_000, dtype=np.uint16)
    batch = {"input_ids": torch.zeros(4, 16, dtype=torch.long), "targets": torch.zeros(4, 16, dtype=torch.long)}
    row = check_batch_content(batch)
    assert row["status"] == "fail" and "repeated" in row["message"]
    special = check_special_tokens(zeros, {"eos": 0, "pad": 1})
    assert special["status"] == "fail" and special["value"] == 1.0
    assert check_batch_content({"input_ids": torch.zeros(0, 16, dtype=torch.long)})["status"] == "fail"
    splits = by_name(check_splits({"train": {"documents": 0, "tokens": 0}, "val": {"tokens": 0}}, 16, name="data/splits"))
    assert splits["data/splits"]["status"] == "fail" and splits["data/val_split"]["status"] == "fail"


def test_vocabulary_mismatch_fails():
    row = check_vocab(100, 300, key="presets.tiny.vocab_size")
    assert row["status"] == "fail" and "presets.tiny.vocab_size" in row["message"]
    assert check_vocab(300, 300, max_token_id=420)["status"] == "fail"  # data ids beyond the tokenizer
    assert check_vocab(8192, 300)["status"] == "warn"  # rows never used
    assert check_vocab(300, 300, max_token_id=299)["status"] == "ok"
    stale = check_vocab(300, 300, configured_vocab=4096, prepared_with=300)
    assert stale["status"] == "warn" and "rerun" in stale["message"]
    # a model too small for the data's ids: the check that runs it fails instead of crashing
    small = tiny_lm(vocab_size=16)
    rows = guarded("init", check_init, small, ar_batch(2, 8), name="init")
    assert rows[0]["status"] == "fail" and "raised" in rows[0]["message"]


def test_config_checks():
    p = parse_params({"train": {"seq_len": 128, "batch_size": 2, "grad_accum_steps": 1}})
    assert check_graph_window(p, "stage_3")["status"] == "ok"
    wide = parse_params({"train": {"seq_len": 32}, "staged": {"graph": {"window": 32}}})
    assert check_graph_window(wide, "stage_3")["status"] == "fail"
    tcfg = p.training_for("stage_0")
    bad_heads = p.presets["tiny"].model_copy(update={"n_head": 3})
    assert check_heads(bad_heads, "presets.tiny")["status"] == "fail"
    assert check_heads(p.presets["tiny"], "presets.tiny")["status"] == "ok"
    assert check_seq_len(tcfg.model_copy(update={"seq_len": 512}), p.presets["tiny"], "presets.tiny")["status"] == "fail"
    assert check_effective_batch(tcfg)["status"] == "warn"  # 2 x 1 x 128 = 256 tokens
    assert check_milestones(p, "stage_0")["status"] == "ok"
    est = estimate_training_memory(10_000_000, [LayerSpec(4, 256, 1024, 4, 128, 128)], batch_size=16,
                                      seq_len=128, vocab_size=4096)
    assert est["optimizer"] == 2 * est["weights"] == 2 * est["gradients"]
    assert check_memory_fit(est, available=10 * 2**20)["status"] == "fail"
    assert check_memory_fit(est, available=100 * 2**30)["status"] == "ok"


def test_splits_count_real_training_sequences():
    rows = by_name(check_splits({"train": {"documents": 3, "tokens": 1001}, "val": {"documents": 1, "tokens": 257}},
                                   100, name="data/splits", sequences_drawn=40))
    train = rows["data/splits"]
    # windows of 100 inputs + the next token as target, end to end: (tokens - 1) // seq_len
    assert train["value"]["train_sequences"] == 10 and train["value"]["val_sequences"] == 2
    assert train["details"] == {"sequences_drawn": 40, "epochs": 4.0}
    assert "10 sequences of 100" in train["message"] and "4 epochs" in train["message"]
    assert sequences_in(1000, 100) == 9 and sequences_in(0, 100) == 0


def test_milestones_beyond_max_steps_warn():
    p = parse_params({"train": {"max_steps": 100, "milestones": [50, 100]}})
    assert check_milestones(p, "stage_0")["status"] == "ok"
    # params.yaml validation refuses this already; diagnose still says it for params built in code
    bad = p.model_copy(update={"train": p.train.model_copy(update={"milestones": [50, 200]})})
    row = check_milestones(bad, "stage_0")
    assert row["status"] == "warn" and "[200]" in row["message"] and row["threshold"] == "<= 100"


def test_model_size_versus_data():
    model = tiny_lm()
    n = sum(p.numel() for p in model.parameters())
    ok = check_size_vs_data(model, 20 * n // 100, 100, train_tokens=100 * n)
    assert ok["status"] == "ok" and ok["value"] == pytest.approx(20, rel=0.01)
    assert ok["details"]["parameters"] == n and ok["details"]["params_mlp"] > 0 and ok["details"]["params_attention"] > 0
    too_big = check_size_vs_data(model, 16, 10, steps_key="train.max_steps")
    assert too_big["status"] == "warn" and "undertrained" in too_big["message"] and "train.max_steps" in too_big["message"]
    too_small = check_size_vs_data(model, 100 * n, 100)
    assert too_small["status"] == "warn" and "far too small" in too_small["message"]
    epochs = check_size_vs_data(model, 20 * n // 100, 100, train_tokens=n // 2)
    assert epochs["status"] == "warn" and "passes over" in epochs["message"]


def _word_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from sunfish.data.tokenizer import TextTokenizer

    vocab = {"[UNK]": 0, "[SEP]": 1, "[PAD]": 2, "the": 3, "cat": 4, "sat": 5, "on": 6, "mat": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return TextTokenizer(tok)


def test_unknown_token_rate():
    from sunfish.data.tokenizer import train_bpe

    bpe = train_bpe(["the cat sat on the mat"] * 20, 300)
    row = check_unknown_tokens(bpe, np.arange(2, 200), ["Ünïcödé 🙂"])
    assert row["status"] == "ok" and row["value"] == 0.0 and "byte-level" in row["message"]
    words = _word_level_tokenizer()
    assert unknown_token_id(words) == 0
    clean = np.array(words.encode("the cat sat on the mat " * 50))
    assert check_unknown_tokens(words, clean)["status"] == "ok"
    dirty = np.array(words.encode("the dog sat on a rug " * 50))  # dog, a, rug: unknown
    row = check_unknown_tokens(words, dirty, ["the dog"])
    assert row["status"] == "fail" and row["value"] == 0.5 and "tokenizer.kind: bpe" in row["message"]
    assert row["details"]["sample_text_share"] == 0.5
    assert check_tokenizer_roundtrip(words, ["the dog sat"])["status"] == "fail"


def test_val_overlap_detects_duplicated_documents():
    rng = np.random.default_rng(0)
    train = rng.integers(2, 4000, 50_000).astype(np.uint16)
    leaked = train[1000:3000].copy()
    assert check_val_overlap(train, leaked)["status"] == "warn"
    fresh = rng.integers(2, 4000, 2000).astype(np.uint16)
    assert check_val_overlap(train, fresh)["status"] == "ok"


def test_conditioning_dropout_and_noise_schedule():
    from sunfish.models.denoiser import DiffusionConfig, DiffusionLM

    def model(p):
        return DiffusionLM(DiffusionConfig(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=8,
                                           prompt_encoder_layers=0, max_prompt_tokens=4, conditioning_dropout=p))

    assert check_conditioning_dropout(model(0.1))["status"] == "ok"
    assert check_conditioning_dropout(model(0.0))["status"] == "fail"
    assert check_conditioning_dropout(model(1.0))["status"] == "fail"
    assert check_noise_schedule(1000, "sqrt")["status"] == "ok"
    assert check_prompt_encoder("own")["status"] == "ok"
    missing = check_prompt_encoder("/nonexistent/gpt2-folder")
    assert missing["status"] == "fail" and "cfg.prompt_encoder" in missing["message"]


def test_masked_schedule_snr_range():
    row = check_mask_schedule(16)
    assert row["status"] == "ok", row["message"]
    assert row["value"]["mask_rate_min"] < 0.01 and row["value"]["mask_rate_max"] > 0.99
    assert row["value"]["log10_snr_max"] > 2  # nearly clean text is trained ...
    assert row["value"]["log10_snr_min"] < -2  # ... and so is fully masked text, where sampling starts
    never_full = check_mask_schedule(16, times=lambda b, g: 0.05 + 0.6 * torch.rand(b, generator=g))
    assert never_full["status"] == "fail" and "sampling starts" in never_full["message"]
    never_clean = check_mask_schedule(16, times=lambda b, g: 0.3 + 0.7 * torch.rand(b, generator=g))
    assert never_clean["status"] == "warn"
    assert check_mask_schedule(4, times=lambda b, g: torch.zeros(b))["status"] == "fail"  # 1/t infinite


def test_unreachable_hub_prompt_encoder_names_the_remedy(monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent/hf-cache")  # nothing cached, and offline
    row = check_prompt_encoder("sunfish-test/no-such-model")
    assert row["status"] == "fail" and row["threshold"] == "loads offline"
    assert "save_pretrained" in row["message"] and "cfg.prompt_encoder: own" in row["message"]


def test_a_raising_check_becomes_a_failing_row():
    def boom():
        raise RuntimeError("broken input")

    rows = guarded("x/boom", boom)
    assert rows[0]["status"] == "fail" and "broken input" in rows[0]["message"]
