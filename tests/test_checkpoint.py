"""Checkpoints: round trip, atomic replacement, and refusals that never run code."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from sunfish.models.staged import StagedLM, StagedLMConfig
from sunfish.training.checkpoint import (
    CheckpointError,
    list_milestones,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)


def _model(stage: int = 0) -> StagedLM:
    torch.manual_seed(0)
    cfg = StagedLMConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, d_ff=64, max_seq_len=16, stage=stage)
    return StagedLM(cfg)


@pytest.fixture()
def tokenizer_file(tmp_path):
    from sunfish.data.tokenizer import train_bpe

    tok = train_bpe(["hello world, a tiny corpus for a tiny tokenizer"] * 4, vocab_size=300, min_frequency=1)
    path = tmp_path / "tok.json"
    tok.save(path)
    return path


def test_round_trip_is_exact(tmp_path, tokenizer_file):
    model = _model()
    save_checkpoint(tmp_path / "step_5", model, model_name="stage_0", step=5, tokenizer_file=tokenizer_file)
    loaded, meta, directory = load_checkpoint(tmp_path / "step_5")
    x = torch.randint(0, 64, (2, 8))
    assert torch.equal(model.eval()(x), loaded(x))
    assert meta["step"] == 5 and meta["kind"] == "staged"
    assert (directory / "tokenizer.json").exists()
    # a model directory resolves to its final/ checkpoint
    save_checkpoint(tmp_path / "final", model, model_name="stage_0", step=9, tokenizer_file=None)
    assert read_checkpoint_meta(tmp_path)[1]["step"] == 9
    assert [s for s, _ in list_milestones(tmp_path)] == [5]


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path):
    model = _model()
    target = tmp_path / "step_1"
    save_checkpoint(target, model, model_name="stage_0", step=1, tokenizer_file=None)
    save_checkpoint(target, model, model_name="stage_0", step=2, tokenizer_file=None)
    assert read_checkpoint_meta(target)[1]["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SUNFISH_PWNED']}",))


def test_pickle_weights_are_refused_and_never_run(tmp_path, monkeypatch):
    model = _model()
    ckpt = save_checkpoint(tmp_path / "evil", model, model_name="stage_0", step=1, tokenizer_file=None)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SUNFISH_PWNED", str(marker))
    (ckpt / "model.safetensors").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped"])
def test_damaged_weights_name_the_file(tmp_path, damage):
    ckpt = save_checkpoint(tmp_path / "c", _model(), model_name="stage_0", step=1, tokenizer_file=None)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    if damage == "empty":
        weights.write_bytes(b"")
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ckpt)


def test_architecture_mismatch_says_what_differs(tmp_path):
    ckpt = save_checkpoint(tmp_path / "c", _model(), model_name="stage_0", step=1, tokenizer_file=None)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model_config"]["d_ff"] = 128
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(ckpt)


def test_wrong_version_and_kind(tmp_path):
    ckpt = save_checkpoint(tmp_path / "c", _model(), model_name="stage_0", step=1, tokenizer_file=None)
    with pytest.raises(CheckpointError, match="needs a 'diffusion' model"):
        load_checkpoint(ckpt, expect_kind="diffusion")
    meta = json.loads((ckpt / "config.json").read_text())
    meta["format_version"] = 0
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
