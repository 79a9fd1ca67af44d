"""Checkpoints that were tampered with, damaged or written by an older SunFish.

- pickles disguised as checkpoint files are refused and never run (model.safetensors through the
  resume path and `sunfish migrate`, optimizer.pt through the stage glue; model.safetensors through
  `sunfish sample`/load_checkpoint and trainer.pt are in tests/test_cli.py, test_checkpoint.py, test_resume.py);
- damage safetensors cannot see (a flipped bit in the tensor bytes) is caught by the sha256 that
  config.json records, on every load path, and a damaged newest resume checkpoint falls back;
- format version 0 is refused with the migration command, and `sunfish migrate` upgrades it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil

import pytest
import torch
from click.testing import CliRunner

from sunfish.cli import main
from sunfish.training.checkpoint import (
    DIGEST_KEY,
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    migrate_checkpoint,
    save_checkpoint,
    sha256_file,
)
from sunfish.training.resume import ResumeCheckpoints, ResumePoint
from tests.ckpt_fixtures import (
    build_checkpoints,
    flip_bit_in_tensor_data,
    make_format_0,
    staged_model,
    tree_digest,
)

VOCAB = 64


class _Payload:
    """Unpickling this runs `touch $SUNFISH_PWNED`."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SUNFISH_PWNED']}",))


@pytest.fixture()
def marker(tmp_path, monkeypatch):
    path = tmp_path / "pwned"
    monkeypatch.setenv("SUNFISH_PWNED", str(path))
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return build_checkpoints(tmp_path_factory.mktemp("ckpts"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _model(shift: float = 0.0):
    model = staged_model(VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift)
    return model


def _resume_dir(tmp_path, steps=(2, 4)) -> ResumeCheckpoints:
    ckpts = ResumeCheckpoints(tmp_path / "resume", keep=5, fingerprint={"k": "v"}, model_name="m")
    for step in steps:
        ckpts.save(_model(step), {"optimizer": {}, "data_rng": torch.Generator().get_state()}, step)
    return ckpts


def _swap_in_other_weights(file):
    other = save_checkpoint(file.parent.parent / "other", _model(7.0), model_name="x", step=1, tokenizer_file=None)
    shutil.copyfile(other / "model.safetensors", file)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ----------------------------------------------------------------------------------------------
# pickles


def test_pickled_optimizer_state_is_ignored_and_never_runs(ckpts, tmp_path, marker, caplog):
    from pipeline.training import OPTIMIZER_STATE, load_optimizer_state

    final = _copy(ckpts["staged"], tmp_path / "final")
    (final / OPTIMIZER_STATE).write_bytes(pickle.dumps({"exp_avg": _Payload()}))
    with caplog.at_level(logging.WARNING):
        assert load_optimizer_state(final) is None
    assert not marker.exists()
    assert "ignoring unreadable optimizer state" in caplog.text and OPTIMIZER_STATE in caplog.text
    # the control: a real one loads
    torch.save({"w": {"exp_avg": torch.zeros(2), "step": torch.tensor(3.0)}}, final / OPTIMIZER_STATE)
    assert load_optimizer_state(final)["w"]["exp_avg"].shape == (2,)


def test_pickled_weights_in_a_resume_checkpoint_are_refused_and_never_run(tmp_path, marker, caplog):
    ckpts = _resume_dir(tmp_path)
    newest = ckpts.directory / "step_4"
    (newest / "model.safetensors").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError, match="step_4/model.safetensors: not a valid safetensors file"):
        ckpts.load_weights_into(staged_model(VOCAB), ResumePoint(newest, 4, {}))
    with caplog.at_level(logging.WARNING):
        point, _ = ckpts.find(10)
    assert point is not None and point.step == 2  # the digest does not match: the previous one is used
    assert "skipping damaged resume checkpoint" in caplog.text
    assert not marker.exists()


def test_migrate_never_converts_a_pickle(ckpts, tmp_path, marker):
    old = make_format_0(_copy(ckpts["staged"], tmp_path / "old"))
    (old / "model.safetensors").write_bytes(pickle.dumps(_Payload()))
    before = tree_digest(tmp_path)
    result = invoke("migrate", old)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "cannot migrate" in result.output and "never loads pickled weights" in result.output
    assert not marker.exists()
    assert tree_digest(tmp_path) == before  # nothing written, no .bak


# ----------------------------------------------------------------------------------------------
# damage: the weights digest


def test_saving_records_the_weights_digest(ckpts):
    meta = json.loads((ckpts["staged"] / "config.json").read_text())
    assert meta[DIGEST_KEY] == sha256_file(ckpts["staged"] / "model.safetensors")
    assert meta["format_version"] == FORMAT_VERSION


def test_a_flipped_bit_in_the_tensor_data_is_caught(ckpts, tmp_path):
    from safetensors.torch import load_file

    ckpt = _copy(ckpts["staged"], tmp_path / "c")
    flip_bit_in_tensor_data(ckpt / "model.safetensors")
    load_file(str(ckpt / "model.safetensors"))  # safetensors itself does not notice: that is the point
    with pytest.raises(CheckpointError, match=r"c/model.safetensors: the file is damaged"):
        load_checkpoint(ckpt)
    result = invoke("sample", ckpt, "--prompt", "The dog")
    assert result.exit_code == 2 and "is damaged" in result.output and "Traceback" not in result.output


DAMAGE = {
    "zero bytes": lambda f: f.write_bytes(b""),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "bit flip in the data": flip_bit_in_tensor_data,
    "bit flip in the header": lambda f: f.write_bytes(f.read_bytes()[:12] + b"\x00" + f.read_bytes()[13:]),
    "missing": lambda f: f.unlink(),
    "another checkpoint's weights": _swap_in_other_weights,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_weights_of_a_resume_checkpoint_are_never_loaded(tmp_path, damage, caplog):
    """load_weights_into refuses (naming the file) before touching the model; find() falls back."""
    ckpts = _resume_dir(tmp_path)
    newest = ckpts.directory / "step_4"
    DAMAGE[damage](newest / "model.safetensors")
    model = _model(-1.0)  # other values: any partial load would show
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="step_4/model.safetensors"):
        ckpts.load_weights_into(model, ResumePoint(newest, 4, {}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with caplog.at_level(logging.WARNING):
        point, reason = ckpts.find(10)
    assert point is not None and point.step == 2, reason
    ckpts.load_weights_into(model, point)
    expected = _model(2).state_dict()
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
    assert "step_4" in caplog.text


def test_a_checkpoint_saved_before_the_digest_still_loads(ckpts, tmp_path):
    ckpt = _copy(ckpts["staged"], tmp_path / "c")
    meta = json.loads((ckpt / "config.json").read_text())
    del meta[DIGEST_KEY]
    (ckpt / "config.json").write_text(json.dumps(meta))
    model, _, _ = load_checkpoint(ckpt)
    reference, _, _ = load_checkpoint(ckpts["staged"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert invoke("migrate", ckpt).exit_code == 0  # format 1 already: nothing to migrate


# ----------------------------------------------------------------------------------------------
# format versions and `sunfish migrate`


def test_format_0_is_refused_with_the_command_that_upgrades_it(ckpts, tmp_path):
    old = make_format_0(_copy(ckpts["staged"], tmp_path / "old"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(old)
    assert "format version 0" in str(info.value) and f"run `sunfish migrate {old}`" in str(info.value)


def test_migrate_in_place_keeps_the_original_and_loads_identically(ckpts, tmp_path):
    old = make_format_0(_copy(ckpts["staged"], tmp_path / "stage_0" / "final"))
    original = tree_digest(old)
    original = {k.replace(str(old), ""): v for k, v in original.items()}
    result = invoke("migrate", tmp_path / "stage_0")  # a model directory: uses final/
    assert result.exit_code == 0, result.output
    assert "migrated from format version 0" in result.output and "final.bak" in result.output
    backup = tmp_path / "stage_0" / "final.bak"
    assert {k.replace(str(backup), ""): v for k, v in tree_digest(backup).items()} == original
    meta = json.loads((old / "config.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["migrated_from"] == 0
    assert meta[DIGEST_KEY] == sha256_file(old / "model.safetensors")
    assert sorted(p.name for p in (tmp_path / "stage_0").iterdir()) == ["final", "final.bak"]  # no temporaries
    model, _, _ = load_checkpoint(old)
    reference, _, _ = load_checkpoint(ckpts["staged"])
    x = torch.randint(0, reference.config.vocab_size, (2, 8))
    assert torch.equal(model(x), reference(x))
    sampled = invoke("sample", old, "--prompt", "The dog", "--max-new-tokens", "3")
    assert sampled.exit_code == 0, sampled.output
    again = invoke("migrate", old)  # now current: says so, writes nothing
    assert again.exit_code == 0 and "already at checkpoint format version" in again.output
    assert sorted(p.name for p in (tmp_path / "stage_0").iterdir()) == ["final", "final.bak"]


def test_migrate_to_an_output_directory_leaves_the_original_alone(ckpts, tmp_path):
    old = make_format_0(_copy(ckpts["diffusion"], tmp_path / "old"))
    before = tree_digest(old)
    result = invoke("migrate", old, "--output", tmp_path / "new")
    assert result.exit_code == 0, result.output
    assert tree_digest(old) == before and not (tmp_path / "old.bak").exists()
    load_checkpoint(tmp_path / "new", expect_kind="diffusion")


MIGRATE_REFUSALS = {
    "another architecture": (lambda m: m["model_config"].update(d_model=64), "weights do not match the architecture"),
    "no model kind": (lambda m: m.pop("kind"), "cannot migrate: no 'kind'"),
    "unknown config field": (lambda m: m["model_config"].update(n_layers=2), "the model it describes cannot be built"),
    "newer format": (lambda m: m.update(format_version=FORMAT_VERSION + 1), "written by a newer SunFish"),
    "unknown format": (lambda m: m.update(format_version="1.0"), "unknown checkpoint format version"),
}


@pytest.mark.parametrize("case", sorted(MIGRATE_REFUSALS))
def test_migrate_explains_what_it_cannot_upgrade(ckpts, tmp_path, case):
    edit, expected = MIGRATE_REFUSALS[case]
    old = make_format_0(_copy(ckpts["staged"], tmp_path / "old"))
    meta = json.loads((old / "config.json").read_text())
    edit(meta)
    (old / "config.json").write_text(json.dumps(meta))
    before = tree_digest(tmp_path)
    result = invoke("migrate", old)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert expected in result.output and "Traceback" not in result.output
    assert tree_digest(tmp_path) == before


def test_migrate_refuses_to_overwrite_a_backup(ckpts, tmp_path):
    old = make_format_0(_copy(ckpts["staged"], tmp_path / "old"))
    (tmp_path / "old.bak").mkdir()
    result = invoke("migrate", old)
    assert result.exit_code == 2 and "old.bak already exists" in result.output


def test_an_interrupted_migration_leaves_the_original_in_place(ckpts, tmp_path, monkeypatch):
    from sunfish.training import checkpoint

    old = make_format_0(_copy(ckpts["staged"], tmp_path / "old"))
    before = tree_digest(tmp_path)

    def disk_full(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_fsync_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        migrate_checkpoint(old)
    assert tree_digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
