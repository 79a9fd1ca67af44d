"""Diagnose: every check fires on the fault it exists for, and a healthy tiny setup passes them all.

Deliberately broken models (a branch detached from the graph, a residual scaled by 0.1 or nearly
shut, a learnable residual gate at 0.1, a NaN-producing layer, a component built but unused,
over-confident initial logits, frozen weights, a learning rate of 0 or 30) and data (all zeros, a
vocabulary that does not fit, unknown tokens, a masking schedule that never reaches full masking)
go through the check functions directly; a tiny corpus goes through the whole ``run_diagnostics``,
the ``diagnose`` stage (fail / warn with and without ``diagnose.fail_on_warn``) and the
``sunfish diagnose`` command. Everything is tiny and single-threaded.
"""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from sunfish import diagnostics as dg
from sunfish.config import Params, parse_params
from sunfish.models.staged import StagedLM, StagedLMConfig

torch.set_num_threads(1)

VOCAB = 64


# ----------------------------------------------------------------------------------------------
# tiny models, broken on purpose


def tiny_lm(**over) -> StagedLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=32, mu_full=False)
    cfg.update(over)
    return StagedLM(StagedLMConfig(**cfg))


def ar_batch(rows: int = 2, length: int = 16, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (rows, length + 1), generator=gen)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}


def _tiny_diffusion():
    from sunfish.models.denoiser import DiffusionConfig, DiffusionLM

    torch.manual_seed(0)
    return DiffusionLM(DiffusionConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=16,
                                       prompt_encoder_layers=1, max_prompt_tokens=4))


def _pair_batch(rows: int = 4, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"text_ids": torch.randint(2, VOCAB, (rows, 16), generator=gen),
            "text_mask": torch.ones(rows, 16, dtype=torch.bool),
            "prompt_ids": torch.randint(2, VOCAB, (rows, 4), generator=gen),
            "prompt_mask": torch.ones(rows, 4, dtype=torch.bool)}


class DetachedBranch(nn.Module):
    """The block's branch is computed but cut from the graph: its weights never get a gradient."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x, *args, **kwargs):
        return x + (self.block(x, *args, **kwargs) - x).detach()


class ScaledResidual(nn.Module):
    """``x + scale * branch(x)``: the original's gated residual."""

    def __init__(self, block: nn.Module, scale: float):
        super().__init__()
        self.block, self.scale = block, scale

    def forward(self, x, *args, **kwargs):
        return x + self.scale * (self.block(x, *args, **kwargs) - x)


class NaNLayer(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x, *args, **kwargs):
        y = self.block(x, *args, **kwargs)
        return y + torch.sqrt(torch.full_like(y, -1.0))  # NaN everywhere


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows}


# ----------------------------------------------------------------------------------------------
# gradient flow


def test_detached_layer_is_named_by_gradient_flow():
    model = tiny_lm()
    model.blocks[1] = DetachedBranch(model.blocks[1])
    rows = by_name(dg.check_gradient_flow(model, ar_batch(), name="g"))
    flow = rows["g_flow"]
    assert flow["status"] == "fail"
    assert "blocks.1.block.mlp.up.weight" in flow["details"]["no_grad"]
    assert not any(n.startswith("blocks.0") for n in flow["details"]["no_grad"])
    assert "get no gradient" in flow["message"]


def test_unused_parameter_gets_no_gradient():
    model = tiny_lm()
    model.orphan = nn.Parameter(torch.ones(3))
    flow = by_name(dg.check_gradient_flow(model, ar_batch(), name="g"))["g_flow"]
    assert flow["status"] == "fail" and flow["details"]["no_grad"] == ["orphan"]


def test_nan_layer_fails_nan_and_init_checks():
    model = tiny_lm()
    model.blocks[0] = NaNLayer(model.blocks[0])
    rows = by_name(dg.check_gradient_flow(model, ar_batch(), name="g"))
    assert rows["g_nan"]["status"] == "fail"
    init = by_name(dg.check_init(model, ar_batch(), name="init"))
    assert init["init_logits"]["status"] == "fail"
    assert init["init_loss"]["status"] == "fail"


def test_overconfident_initial_logits_fail_init_loss():
    healthy = by_name(dg.check_init(tiny_lm(), ar_batch(), name="init"))
    assert healthy["init_loss"]["status"] == "ok" and healthy["init_logits"]["status"] == "ok"
    model = tiny_lm()
    with torch.no_grad():
        model.head.weight.mul_(200.0)  # logits far from uniform
    row = by_name(dg.check_init(model, ar_batch(), name="init"))["init_loss"]
    assert row["status"] == "fail" and "over-confident" in row["message"]
    assert "ln(64)" in row["threshold"] and row["value"] > 2 * np.log(VOCAB)


def test_zero_initialised_branches_are_not_flagged():
    """Identity-at-init blocks (zero output projections, zero tables) still receive gradient."""
    for model, b in ((_tiny_diffusion(), _pair_batch()), (tiny_lm(stage=1), ar_batch(4))):  # stage 1: zero TEMPORAL table
        rows = by_name(dg.check_gradient_flow(model, b, name="g"))
        assert rows["g_flow"]["status"] == "ok", rows["g_flow"]["message"]
        assert rows["g_nan"]["status"] == "ok"


def test_prompt_path_that_never_trains_is_caught():
    healthy = dg.check_conditioning_effect(_tiny_diffusion(), [_pair_batch(seed=i) for i in range(3)], _pair_batch(seed=9))
    assert healthy["status"] == "ok", healthy["message"]
    # the prompt encoder runs without gradient: its weights never train
    frozen_path = _tiny_diffusion()
    encoder_forward = frozen_path.prompt_encoder.forward

    def no_grad_forward(*args, **kwargs):
        with torch.no_grad():
            return encoder_forward(*args, **kwargs)

    frozen_path.prompt_encoder.forward = no_grad_forward
    flow = by_name(dg.check_gradient_flow(frozen_path, _pair_batch(), name="g"))["g_flow"]
    assert flow["status"] == "fail" and "prompt_encoder" in flow["message"]
    # the prompt never reaches the output: every row is encoded as the null prompt
    deaf = _tiny_diffusion()
    encode = deaf.encode_prompt
    deaf.encode_prompt = lambda ids, mask: encode(ids, torch.zeros_like(mask))
    row = dg.check_conditioning_effect(deaf, [_pair_batch(seed=i) for i in range(3)], _pair_batch(seed=9))
    assert row["status"] == "fail" and "prompt never reaches" in row["message"]


def test_staged_component_built_but_unused_is_named():
    """Stage 1 builds the TEMPORAL table; a forward pass that never uses it leaves it without gradient."""
    model = tiny_lm(stage=1)
    model.temporal_proj.forward = lambda x: x.new_zeros(*x.shape[:-1], model.config.d_model)
    flow = by_name(dg.check_gradient_flow(model, ar_batch(4), name="g"))["g_flow"]
    assert flow["status"] == "fail"
    assert set(flow["details"]["no_grad"]) == {"temporal.weight", "temporal_proj.weight"}
    assert "(temporal)" in flow["message"] and "staged.temporal" in flow["message"]


def test_gradient_figures_per_layer():
    rows = by_name(dg.check_gradient_flow(tiny_lm(), ar_batch(), name="g"))
    per_layer = rows["g_vanishing"]["details"]["per_layer_mean_abs"]
    assert {"blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"} <= set(per_layer)
    assert all(v > 0 for v in per_layer.values())
    assert set(rows["g_exploding"]["details"]["per_layer_norm"]) == set(per_layer)


def test_vanishing_gradient_is_flagged():
    model = tiny_lm()
    model.blocks[1] = ScaledResidual(model.blocks[1], 1e-7)
    rows = by_name(dg.check_gradient_flow(model, ar_batch(), name="g"))
    assert rows["g_vanishing"]["status"] == "warn"
    assert any(n.startswith("blocks.1.") for n in rows["g_vanishing"]["details"]["tensors"])


# ----------------------------------------------------------------------------------------------
# residual branches


class GatedResidual(nn.Module):
    """``x + gate * branch(x)`` with a learnable scalar gate (the original SunFish's form of the bug)."""

    def __init__(self, block: nn.Module, value: float):
        super().__init__()
        self.block = block
        self.gate = nn.Parameter(torch.tensor(value))

    def forward(self, x, *args, **kwargs):
        return x + self.gate * (self.block(x, *args, **kwargs) - x)


def _healthy_models():
    from sunfish.models.denoiser import DiffusionConfig, DiffusionLM

    torch.manual_seed(0)
    continuous = DiffusionLM(DiffusionConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, d_ff=64,
                                             max_seq_len=16, prompt_encoder_layers=1, max_prompt_tokens=4,
                                             objective="continuous", self_conditioning=True))
    return {
        "stage_0": (tiny_lm(), ar_batch(4)),
        "stage_0_mu": (tiny_lm(mu_full=True), ar_batch(4)),
        "stage_1": (tiny_lm(stage=1), ar_batch(4)),
        "stage_3_mu": (tiny_lm(stage=3, mu_full=True, graph_window=4, graph_top_k=2, graph_shortcuts=2), ar_batch(4)),
        "deep": (tiny_lm(n_layer=6), ar_batch(4)),
        "cfg_masked": (_tiny_diffusion(), _pair_batch()),
        "cfg_continuous": (continuous, _pair_batch()),
    }


def test_healthy_residual_branches_have_gain_one():
    """No false alarm: every healthy architecture (staged stages, MU on/off, deeper, both diffusion
    objectives with zero-initialised branches) adds its branches with gain 1, whatever its ratio."""
    for label, (model, batch) in _healthy_models().items():
        rows = by_name(dg.check_residual_branches(model, batch))
        ratio, gain = rows["residual_branches"], rows["residual_gain"]
        assert ratio["status"] == "ok" and ratio["value"] > dg.RESIDUAL_RATIO_MIN, (label, ratio["message"])
        assert gain["status"] == "ok", (label, gain["message"])
        assert gain["value"] == pytest.approx(1.0, abs=1e-3), label


def test_residual_scaled_by_a_tenth_is_caught():
    """The original's worst bug: ``x + 0.1 * f(x)``. Its ratio looks healthy (0.1 x a healthy 0.6), so
    only the gain row catches it; in every block, in one block, and in every architecture."""
    for label, (model, batch) in _healthy_models().items():
        for i, block in enumerate(model.blocks):
            model.blocks[i] = ScaledResidual(block, 0.1)
        gain = by_name(dg.check_residual_branches(model, batch))["residual_gain"]
        assert gain["status"] == "warn", (label, gain["message"])
        assert gain["value"] == pytest.approx(0.1, abs=1e-3), label
        assert "worst bug" in gain["message"] and "x = x + f(x)" in gain["message"]
    model = tiny_lm()
    model.blocks[1] = ScaledResidual(model.blocks[1], 0.1)
    rows = by_name(dg.check_residual_branches(model, ar_batch(4)))
    assert rows["residual_branches"]["status"] == "ok"  # the ratio alone misses it ...
    gain = rows["residual_gain"]
    assert gain["status"] == "warn" and "blocks.1 0.1" in gain["message"]  # ... the gain names the block
    assert "blocks.0" not in gain["message"] and "a constant" in gain["message"]
    assert gain["details"]["blocks.0"]["gain"] == pytest.approx(1.0, abs=1e-3)


def test_learnable_residual_gate_is_named():
    model = tiny_lm()
    for i, block in enumerate(model.blocks):
        model.blocks[i] = GatedResidual(block, 0.1)
    gain = by_name(dg.check_residual_branches(model, ar_batch(4), name="stage_0/residual_branches"))[
        "stage_0/residual_gain"]
    assert gain["status"] == "warn"
    assert 0.05 < gain["value"] < 0.2  # the gate itself trains for the 3 steps
    assert "blocks.0.gate" in gain["message"] and "blocks.1.gate" in gain["message"]
    # a gate of 1 is fine
    model = tiny_lm()
    for i, block in enumerate(model.blocks):
        model.blocks[i] = GatedResidual(block, 1.0)
    assert by_name(dg.check_residual_branches(model, ar_batch(4)))["residual_gain"]["status"] == "ok"
    # the stage-3 graph gate (zero-initialised, inside attention) is not blamed for a constant scale
    model = tiny_lm(stage=3, graph_window=4)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = ScaledResidual(block, 0.1)
    gain = by_name(dg.check_residual_branches(model, ar_batch(4)))["residual_gain"]
    assert gain["status"] == "warn" and "graph_gate" not in gain["message"] and "a constant" in gain["message"]


def test_residual_scaled_nearly_shut_warns_both_rows():
    gated = tiny_lm()
    for i, block in enumerate(gated.blocks):
        gated.blocks[i] = ScaledResidual(block, 0.001)
    rows = by_name(dg.check_residual_branches(gated, ar_batch(4)))
    row = rows["residual_branches"]
    assert row["status"] == "warn", row["message"]
    assert row["value"] < dg.RESIDUAL_RATIO_MIN
    assert "gate" in row["message"]
    assert rows["residual_gain"]["status"] == "warn"


# ----------------------------------------------------------------------------------------------
# memorisation, learning rate


def test_healthy_model_memorises_one_batch():
    row = dg.check_memorisation(tiny_lm(), ar_batch(2, 16), steps=150, target=0.1, lr=3e-3)
    assert row["status"] == "ok", row["message"]
    assert 1 < row["value"] < 150


def test_model_that_cannot_learn_fails_memorisation():
    lr0 = dg.check_memorisation(tiny_lm(), ar_batch(2, 16), steps=10, target=0.1, lr=0.0)
    assert lr0["status"] == "fail" and "did not move" in lr0["message"]
    frozen = tiny_lm()
    frozen.requires_grad_(False)
    row = dg.check_memorisation(frozen, ar_batch(2, 16), steps=10, target=0.1)
    assert row["status"] == "fail" and "frozen" in row["message"]
    assert by_name(dg.check_gradient_flow(frozen, ar_batch(), name="g"))["g_flow"]["status"] == "fail"


def test_lr_schedule_too_low_warns():
    tcfg = parse_params({"train": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 50, "milestones": [50],
                                   "seq_len": 16}}).training_for("stage_0")
    batches = [ar_batch(4, 16, seed=0)] * 10  # one batch repeated: a learnable signal
    ok = dg.check_lr_schedule(tiny_lm(), tcfg, batches, ar_batch(4, 16, seed=0))
    assert ok["status"] == "ok", ok["message"]
    low = dg.check_lr_schedule(tiny_lm(), tcfg.model_copy(update={"lr": 1e-9}), batches, ar_batch(4, 16, seed=0))
    assert low["status"] == "warn" and "train.lr" in low["message"]


def test_lr_schedule_divergence_fails():
    tcfg = parse_params({"train": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 50, "milestones": [50],
                                   "seq_len": 16, "grad_clip": 0.0}}).training_for("stage_0")
    batches = [ar_batch(4, 16, seed=i) for i in range(10)]
    row = dg.check_lr_schedule(tiny_lm(), tcfg.model_copy(update={"lr": 30.0}), batches, ar_batch(4, 16, seed=99))
    assert row["status"] == "fail" and "lower train.lr" in row["message"]


# ----------------------------------------------------------------------------------------------
# data and configuration


def test_all_zero_data_fails_batch_and_special_token_checks():
    zeros = np.zeros(10_000, dtype=np.uint16)
    batch = {"input_ids": torch.zeros(4, 16, dtype=torch.long), "targets": torch.zeros(4, 16, dtype=torch.long)}
    row = dg.check_batch_content(batch)
    assert row["status"] == "fail" and "repeated" in row["message"]
    special = dg.check_special_tokens(zeros, {"eos": 0, "pad": 1})
    assert special["status"] == "fail" and special["value"] == 1.0
    assert dg.check_batch_content({"input_ids": torch.zeros(0, 16, dtype=torch.long)})["status"] == "fail"
    splits = by_name(dg.check_splits({"train": {"documents": 0, "tokens": 0}, "val": {"tokens": 0}}, 16, name="data/splits"))
    assert splits["data/splits"]["status"] == "fail" and splits["data/val_split"]["status"] == "fail"


def test_vocabulary_mismatch_fails():
    row = dg.check_vocab(100, 300, key="presets.tiny.vocab_size")
    assert row["status"] == "fail" and "presets.tiny.vocab_size" in row["message"]
    assert dg.check_vocab(300, 300, max_token_id=420)["status"] == "fail"  # data ids beyond the tokenizer
    assert dg.check_vocab(8192, 300)["status"] == "warn"  # rows never used
    assert dg.check_vocab(300, 300, max_token_id=299)["status"] == "ok"
    stale = dg.check_vocab(300, 300, configured_vocab=4096, prepared_with=300)
    assert stale["status"] == "warn" and "rerun" in stale["message"]
    # a model too small for the data's ids: the check that runs it fails instead of crashing
    small = tiny_lm(vocab_size=16)
    rows = dg.guarded("init", dg.check_init, small, ar_batch(2, 8), name="init")
    assert rows[0]["status"] == "fail" and "raised" in rows[0]["message"]


def test_config_checks():
    p = parse_params({"train": {"seq_len": 128, "batch_size": 2, "grad_accum_steps": 1}})
    assert dg.check_graph_window(p, "stage_3")["status"] == "ok"
    wide = parse_params({"train": {"seq_len": 32}, "staged": {"graph": {"window": 32}}})
    assert dg.check_graph_window(wide, "stage_3")["status"] == "fail"
    tcfg = p.training_for("stage_0")
    bad_heads = p.presets["tiny"].model_copy(update={"n_head": 3})
    assert dg.check_heads(bad_heads, "presets.tiny")["status"] == "fail"
    assert dg.check_heads(p.presets["tiny"], "presets.tiny")["status"] == "ok"
    assert dg.check_seq_len(tcfg.model_copy(update={"seq_len": 512}), p.presets["tiny"], "presets.tiny")["status"] == "fail"
    assert dg.check_effective_batch(tcfg)["status"] == "warn"  # 2 x 1 x 128 = 256 tokens
    assert dg.check_milestones(p, "stage_0")["status"] == "ok"
    est = dg.estimate_training_memory(10_000_000, [dg.LayerSpec(4, 256, 1024, 4, 128, 128)], batch_size=16,
                                      seq_len=128, vocab_size=4096)
    assert est["optimizer"] == 2 * est["weights"] == 2 * est["gradients"]
    assert dg.check_memory_fit(est, available=10 * 2**20)["status"] == "fail"
    assert dg.check_memory_fit(est, available=100 * 2**30)["status"] == "ok"


def test_splits_count_real_training_sequences():
    rows = by_name(dg.check_splits({"train": {"documents": 3, "tokens": 1001}, "val": {"documents": 1, "tokens": 257}},
                                   100, name="data/splits", sequences_drawn=40))
    train = rows["data/splits"]
    # windows of 100 inputs + the next token as target, end to end: (tokens - 1) // seq_len
    assert train["value"]["train_sequences"] == 10 and train["value"]["val_sequences"] == 2
    assert train["details"] == {"sequences_drawn": 40, "epochs": 4.0}
    assert "10 sequences of 100" in train["message"] and "4 epochs" in train["message"]
    assert dg.sequences_in(1000, 100) == 9 and dg.sequences_in(0, 100) == 0


def test_milestones_beyond_max_steps_warn():
    p = parse_params({"train": {"max_steps": 100, "milestones": [50, 100]}})
    assert dg.check_milestones(p, "stage_0")["status"] == "ok"
    # params.yaml validation refuses this already; diagnose still says it for params built in code
    bad = p.model_copy(update={"train": p.train.model_copy(update={"milestones": [50, 200]})})
    row = dg.check_milestones(bad, "stage_0")
    assert row["status"] == "warn" and "[200]" in row["message"] and row["threshold"] == "<= 100"


def test_model_size_versus_data():
    model = tiny_lm()
    n = sum(p.numel() for p in model.parameters())
    ok = dg.check_size_vs_data(model, 20 * n // 100, 100, train_tokens=100 * n)
    assert ok["status"] == "ok" and ok["value"] == pytest.approx(20, rel=0.01)
    assert ok["details"]["parameters"] == n and ok["details"]["params_mlp"] > 0 and ok["details"]["params_attention"] > 0
    too_big = dg.check_size_vs_data(model, 16, 10, steps_key="train.max_steps")
    assert too_big["status"] == "warn" and "undertrained" in too_big["message"] and "train.max_steps" in too_big["message"]
    too_small = dg.check_size_vs_data(model, 100 * n, 100)
    assert too_small["status"] == "warn" and "far too small" in too_small["message"]
    epochs = dg.check_size_vs_data(model, 20 * n // 100, 100, train_tokens=n // 2)
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
    row = dg.check_unknown_tokens(bpe, np.arange(2, 200), ["Ünïcödé 🙂"])
    assert row["status"] == "ok" and row["value"] == 0.0 and "byte-level" in row["message"]
    words = _word_level_tokenizer()
    assert dg.unknown_token_id(words) == 0
    clean = np.array(words.encode("the cat sat on the mat " * 50))
    assert dg.check_unknown_tokens(words, clean)["status"] == "ok"
    dirty = np.array(words.encode("the dog sat on a rug " * 50))  # dog, a, rug: unknown
    row = dg.check_unknown_tokens(words, dirty, ["the dog"])
    assert row["status"] == "fail" and row["value"] == 0.5 and "tokenizer.kind: bpe" in row["message"]
    assert row["details"]["sample_text_share"] == 0.5
    assert dg.check_tokenizer_roundtrip(words, ["the dog sat"])["status"] == "fail"


def test_val_overlap_detects_duplicated_documents():
    rng = np.random.default_rng(0)
    train = rng.integers(2, 4000, 50_000).astype(np.uint16)
    leaked = train[1000:3000].copy()
    assert dg.check_val_overlap(train, leaked)["status"] == "warn"
    fresh = rng.integers(2, 4000, 2000).astype(np.uint16)
    assert dg.check_val_overlap(train, fresh)["status"] == "ok"


def test_conditioning_dropout_and_noise_schedule():
    from sunfish.models.denoiser import DiffusionConfig, DiffusionLM

    def model(p):
        return DiffusionLM(DiffusionConfig(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=8,
                                           prompt_encoder_layers=0, max_prompt_tokens=4, conditioning_dropout=p))

    assert dg.check_conditioning_dropout(model(0.1))["status"] == "ok"
    assert dg.check_conditioning_dropout(model(0.0))["status"] == "fail"
    assert dg.check_conditioning_dropout(model(1.0))["status"] == "fail"
    assert dg.check_noise_schedule(1000, "sqrt")["status"] == "ok"
    assert dg.check_prompt_encoder("own")["status"] == "ok"
    missing = dg.check_prompt_encoder("/nonexistent/gpt2-folder")
    assert missing["status"] == "fail" and "cfg.prompt_encoder" in missing["message"]


def test_masked_schedule_snr_range():
    row = dg.check_mask_schedule(16)
    assert row["status"] == "ok", row["message"]
    assert row["value"]["mask_rate_min"] < 0.01 and row["value"]["mask_rate_max"] > 0.99
    assert row["value"]["log10_snr_max"] > 2  # nearly clean text is trained ...
    assert row["value"]["log10_snr_min"] < -2  # ... and so is fully masked text, where sampling starts
    never_full = dg.check_mask_schedule(16, times=lambda b, g: 0.05 + 0.6 * torch.rand(b, generator=g))
    assert never_full["status"] == "fail" and "sampling starts" in never_full["message"]
    never_clean = dg.check_mask_schedule(16, times=lambda b, g: 0.3 + 0.7 * torch.rand(b, generator=g))
    assert never_clean["status"] == "warn"
    assert dg.check_mask_schedule(4, times=lambda b, g: torch.zeros(b))["status"] == "fail"  # 1/t infinite


def test_unreachable_hub_prompt_encoder_names_the_remedy(monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent/hf-cache")  # nothing cached, and offline
    row = dg.check_prompt_encoder("sunfish-test/no-such-model")
    assert row["status"] == "fail" and row["threshold"] == "loads offline"
    assert "save_pretrained" in row["message"] and "cfg.prompt_encoder: own" in row["message"]


def test_a_raising_check_becomes_a_failing_row():
    def boom():
        raise RuntimeError("broken input")

    rows = dg.guarded("x/boom", boom)
    assert rows[0]["status"] == "fail" and "broken input" in rows[0]["message"]


# ----------------------------------------------------------------------------------------------
# the whole run on a tiny corpus


NOUNS = ["cat", "dog", "bird", "ball", "tree", "boat", "cake", "fish", "hat", "star", "frog", "kite"]
NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max"]
VERBS = ["saw", "liked", "found", "lost", "drew", "wanted", "painted", "hid"]
ADJS = ["red", "big", "small", "happy", "old", "shiny", "blue", "soft"]


def _story(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(5, 9)):
        out.append(f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(ADJS)} {rng.choice(NOUNS)} "
                   f"near a {rng.choice(NOUNS)}.")
    return "Once upon a time, " + " ".join(out)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from sunfish.data.prepare import prepare_corpus

    root = tmp_path_factory.mktemp("diag")
    rng = random.Random(0)
    corpus = root / "stories.txt"
    corpus.write_text("\n\n".join(_story(rng) for _ in range(400)) + "\n", encoding="utf-8")
    raw = {
        "data": {"source": str(corpus), "val_fraction": 0.2},
        "tokenizer": {"vocab_size": 300},
        "presets": {"t": {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "seq_len": 32}},
        "train": {"lr": 3e-3, "warmup_steps": 5, "max_steps": 60, "milestones": [30, 60], "batch_size": 8,
                  "grad_accum_steps": 4, "seq_len": 32, "threads": 1},
        "staged": {"preset": "t", "temporal": {"dim": 8}, "graph": {"window": 4, "top_k": 2, "shortcuts": 2},
                   **{f"stage_{k}": {"max_steps": 10} for k in (1, 2, 3)}},
        "cfg": {"preset": "t", "max_prompt_tokens": 8, "prompt_encoder_layers": 1},
        "eval": {"cfg_seq_len": 32},
        "diagnose": {"memorize_steps": 200},
        "tracking": {"enabled": False},
    }
    params = parse_params(raw)
    prepared = root / "data" / "prepared"
    prepare_corpus(params.data, params.tokenizer, prepared, root)
    return root, raw, params, prepared


def test_healthy_tiny_setup_passes_every_check(tiny_setup):
    _, _, params, prepared = tiny_setup
    report = dg.run_diagnostics(params, prepared)
    bad = [(c["name"], c["status"], c["message"]) for c in report["checks"] if c["status"] != "ok"]
    assert report["status"] == "ok", bad
    names = {c["name"] for c in report["checks"]}
    per_model = ("config_heads", "config_seq_len", "config_milestones", "config_effective_batch", "config_vocab",
                 "config_memory_fit", "size_vs_data", "init_logits", "init_loss", "gradient_nan", "gradient_flow",
                 "gradient_vanishing", "gradient_exploding", "residual_branches", "residual_gain", "memorisation",
                 "lr_schedule", "speed", "eta", "peak_memory")
    for expected in ("environment", "data/load", "data/splits", "data/val_split", "data/batch_content",
                     "data/special_tokens", "data/tokenizer_roundtrip", "data/unknown_tokens", "data/val_overlap",
                     "data/pairs", *(f"stage_0/{c}" for c in per_model), *(f"cfg/{c}" for c in per_model),
                     "stage_3/config_graph", "stage_3/gradient_flow", "stage_3/residual_gain",
                     "cfg/prompt_encoder", "cfg/noise_schedule_snr", "cfg/conditioning_dropout",
                     "cfg/conditioning_effect", "pipeline/eta"):
        assert expected in names, expected
    assert "stage_3/memorisation" not in names  # stage 3: forward/backward and residual probes only
    rows = by_name(report["checks"])
    assert rows["stage_0/residual_gain"]["value"] == pytest.approx(1.0, abs=1e-3)
    assert rows["cfg/residual_gain"]["value"] == pytest.approx(1.0, abs=1e-3)
    splits = rows["data/splits"]
    assert splits["value"]["train_sequences"] == dg.sequences_in(splits["value"]["train_tokens"], 32)
    assert splits["details"]["sequences_drawn"] == 8 * 4 * 60  # batch x accumulation x max_steps
    assert set(rows["stage_0/eta"]["details"]) == {"30", "60"}  # an ETA for every milestone
    assert {"device", "threads", "torch"} <= set(report["environment"])
    for c in report["checks"]:
        assert set(c) >= {"name", "status", "value", "threshold", "message"}
    json.dumps(report)  # JSON-safe
    table = dg.format_table(report)
    assert "stage_0" in table and "memorisation" in table and "Nothing to change" in table


def test_all_zero_token_file_fails_the_run(tiny_setup, tmp_path):
    _, _, params, prepared = tiny_setup
    broken = tmp_path / "prepared"
    shutil.copytree(prepared, broken)
    n = (broken / "train.bin").stat().st_size // 2
    np.zeros(n, dtype=np.uint16).tofile(broken / "train.bin")
    report = dg.run_diagnostics(params, broken, models=["stage_0"])
    rows = by_name(report["checks"])
    assert report["status"] == "fail"
    assert rows["data/batch_content"]["status"] == "fail"
    assert rows["data/special_tokens"]["status"] == "fail"
    assert "What to change" in dg.format_table(report)


def test_missing_data_and_mismatched_vocabulary_do_not_crash(tiny_setup, tmp_path):
    _, raw, params, prepared = tiny_setup
    report = dg.run_diagnostics(params, tmp_path / "nothing", models=["stage_0", "cfg"])
    assert report["status"] == "fail" and by_name(report["checks"])["data/load"]["status"] == "fail"
    small_vocab = Params.model_validate({**raw, "presets": {"t": {**raw["presets"]["t"], "vocab_size": 100}}})
    report = dg.run_diagnostics(small_vocab, prepared, models=["stage_0"])
    rows = by_name(report["checks"])
    assert rows["stage_0/config_vocab"]["status"] == "fail"
    assert report["status"] == "fail"


def test_preset_too_large_for_memory_fails_before_building(tiny_setup):
    _, raw, _, prepared = tiny_setup
    giant = {"n_layer": 96, "n_head": 96, "d_model": 12288, "d_ff": 49152, "seq_len": 32}  # ~175B parameters
    params = Params.model_validate({**raw, "presets": {"t": giant}})
    report = dg.run_diagnostics(params, prepared, models=["stage_0", "cfg"])
    rows = by_name(report["checks"])
    for model in ("stage_0", "cfg"):
        fit = rows[f"{model}/config_memory_fit"]
        assert fit["status"] == "fail", fit["message"]
        assert fit["value"] > 1e6 and fit["details"]["optimizer"] == pytest.approx(2 * fit["details"]["weights"])
        assert "train.batch_size" in fit["message"] and "smaller preset" in fit["message"]
        assert f"{model}/init_loss" not in rows  # nothing was built or trained
    assert report["status"] == "fail" and report["seconds"] < 60


def test_diagnose_stage_writes_report_and_stamp(tiny_setup, monkeypatch):
    import yaml

    from pipeline import diagnose as stage

    root, raw, params, prepared = tiny_setup
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(root)
    monkeypatch.setattr(dg, "run_diagnostics", lambda p, d, models=None: _canned(p, d, "ok"))
    stage.run()
    stamp = root / "data" / "diagnose.ok"
    assert stamp.read_text(encoding="utf-8") == stage.STAMP_TEXT
    report = json.loads((root / "reports" / "diagnose.json").read_text(encoding="utf-8"))
    assert report["status"] == "ok" and "mlflow_run_id" in report
    metrics = stage.report_metrics(report)
    assert metrics["diagnose/stage_0/memorisation"] == 12.0 and metrics["diagnose/checks_fail"] == 0.0

    assert "memorisation" in (root / "state" / "diagnose" / stage.TABLE_NAME).read_text()  # the table, for MLflow

    monkeypatch.setattr(dg, "run_diagnostics", lambda p, d, models=None: _canned(p, d, "fail"))
    with pytest.raises(SystemExit) as exc:
        stage.run()
    assert exc.value.code == 1 and not stamp.exists()
    assert json.loads((root / "reports" / "diagnose.json").read_text())["status"] == "fail"


@pytest.mark.parametrize("fail_on_warn", [False, True])
def test_diagnose_stage_warnings_stop_it_only_when_params_say_so(tiny_setup, monkeypatch, caplog, fail_on_warn):
    import yaml

    from pipeline import diagnose as stage

    root, raw, _, _ = tiny_setup
    raw = {**raw, "diagnose": {**raw["diagnose"], "fail_on_warn": fail_on_warn}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(root)
    monkeypatch.setattr(dg, "run_diagnostics", lambda p, d, models=None: _canned(p, d, "warn"))
    stamp = root / "data" / "diagnose.ok"
    stamp.unlink(missing_ok=True)
    caplog.set_level("INFO")
    if fail_on_warn:
        with pytest.raises(SystemExit) as exc:
            stage.run()
        assert exc.value.code == 1 and not stamp.exists()
        assert "diagnose.fail_on_warn is true; training will not start" in caplog.text
        assert "stage_0/residual_gain: remove the 0.1 scale" in caplog.text  # the remedy, printed
    else:
        stage.run()
        assert stamp.exists()
    assert json.loads((root / "reports" / "diagnose.json").read_text())["status"] == "warn"


def test_failing_stage_prints_the_remedy(tiny_setup, monkeypatch, caplog):
    import yaml

    from pipeline import diagnose as stage

    root, raw, _, _ = tiny_setup
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(root)
    monkeypatch.setattr(dg, "run_diagnostics", lambda p, d, models=None: _canned(p, d, "fail"))
    caplog.set_level("INFO")
    with pytest.raises(SystemExit):
        stage.run()
    assert "diagnose failed; training will not start" in caplog.text
    assert "stage_0/gradient_flow: 3 tensors get no gradient; remove the .detach()" in caplog.text


def test_cli_diagnose_runs_the_same_checks_for_a_chosen_stage_and_preset(tiny_setup):
    import yaml
    from click.testing import CliRunner

    from sunfish.cli import main

    root, raw, _, _ = tiny_setup
    presets = {**raw["presets"], "t2": {**raw["presets"]["t"], "n_layer": 1}}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({**raw, "presets": presets}), encoding="utf-8")
    result = CliRunner().invoke(main, ["diagnose", "--params", str(path), "--model", "stage_1", "--preset", "t2",
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the log goes to stderr
    assert report["status"] == "ok" and report["models"] == ["stage_1"]
    rows = by_name(report["checks"])
    assert rows["stage_1/memorisation"]["status"] == "ok"  # explicitly asked: every check, not the light ones
    assert rows["stage_1/size_vs_data"]["details"]["params_temporal"] > 0
    assert rows["stage_1/residual_gain"]["details"].keys() == {"blocks.0"}  # the t2 preset: one layer
    result = CliRunner().invoke(main, ["diagnose", "--params", str(path), "--model", "stage_0"])
    assert result.exit_code == 0 and "SunFish diagnose: OK" in result.output and "[stage_0]" in result.output


def _canned(params, prepared, status: str) -> dict:
    checks = [dg.make_check("stage_0/memorisation", "ok", 12, "loss < 0.1", "fine")]
    if status == "fail":
        checks.append(dg.make_check("stage_0/gradient_flow", "fail", 3, "0",
                                    "3 tensors get no gradient; remove the .detach()"))
    if status == "warn":
        checks.append(dg.make_check("stage_0/residual_gain", "warn", 0.1, ">= 0.5", "remove the 0.1 scale"))
    counts = {"ok": 1, "warn": int(status == "warn"), "fail": int(status == "fail")}
    return {"status": status, "counts": counts, "checks": checks,
            "environment": {"device": "cpu"}, "models": ["stage_0"], "seconds": 0.1}
