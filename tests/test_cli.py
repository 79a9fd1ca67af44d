"""The `sunfish` command as a user runs it: clear errors (exit 2, no traceback), real outputs."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sunfish.cli import main
from sunfish.data.tokenizer import train_bpe
from sunfish.models.staged import StagedLM, StagedLMConfig
from sunfish.training.checkpoint import save_checkpoint

TEXT = ["Once upon a time there was a little dog. The dog liked to play in the park with a red ball."] * 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    tok = train_bpe(TEXT, vocab_size=300, min_frequency=1)
    tok.save(tmp / "tokenizer.json")
    torch.manual_seed(0)
    model = StagedLM(StagedLMConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, d_ff=64,
                                    max_seq_len=64, eos_id=tok.eos_id))
    return save_checkpoint(tmp / "stage_0" / "final", model, model_name="stage_0", step=3,
                           tokenizer_file=tmp / "tokenizer.json")


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_sample_continues_the_prompt(checkpoint):
    result = invoke("sample", str(checkpoint), "--prompt", "Once upon a time", "--max-new-tokens", "5", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Once upon a time")
    again = invoke("sample", str(checkpoint), "--prompt", "Once upon a time", "--max-new-tokens", "5", "--seed", "1")
    assert again.output == result.output


def test_sample_json_and_model_dir(checkpoint):
    result = invoke("sample", str(checkpoint.parent), "--prompt", "The dog", "--num-samples", "2",
                    "--max-new-tokens", "4", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 2 and all(r["prompt"] == "The dog" and r["tokens"] <= 4 for r in rows)


@pytest.mark.parametrize("prompt", ["", "   ", "\x00\x01\x02", "ünïcødé ✓ 日本語", "word " * 500])
def test_odd_prompts_do_not_crash(checkpoint, prompt):
    result = invoke("sample", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output


def test_missing_checkpoint_is_exit_2_without_traceback(tmp_path):
    result = invoke("sample", str(tmp_path / "nope"), "--prompt", "hi")
    assert result.exit_code == 2
    assert "checkpoint not found" in result.output
    assert "Traceback" not in result.output


def test_infill_on_an_autoregressive_checkpoint_is_refused(checkpoint):
    result = invoke("sample", str(checkpoint), "--infill", "a [MASK] b")
    assert result.exit_code == 2 and "diffusion" in result.output


def test_pickle_bomb_checkpoint_is_refused_by_the_real_command(checkpoint, tmp_path):
    import shutil

    evil = tmp_path / "evil"
    shutil.copytree(checkpoint, evil)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (evil / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    proc = subprocess.run([sys.executable, "-m", "sunfish.cli", "sample", str(evil), "--prompt", "hi"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert not marker.exists()
    assert "Traceback" not in proc.stderr and "safetensors" in proc.stderr


def test_eval_text_prints_json(checkpoint, tmp_path):
    f = tmp_path / "held_out.txt"
    f.write_text("The dog liked to play in the park.\n")
    result = invoke("eval-text", str(checkpoint), str(f))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    total = data["total"]
    assert total["tokens"] > 0 and total["bits_per_byte"] > 0 and total["perplexity"] > 1


def test_config_show_and_bad_params(tmp_path):
    root = Path(__file__).resolve().parents[1]
    ok = invoke("config", "show", "--params", str(root / "params.yaml"), "--format", "json")
    assert ok.exit_code == 0 and json.loads(ok.output)["sampling"]["guidance_scale"] >= 0
    bad = tmp_path / "params.yaml"
    bad.write_text((root / "params.yaml").read_text().replace("  lr: 2.0e-3", "  lr: -1"))
    result = invoke("config", "show", "--params", str(bad))
    assert result.exit_code == 2 and "train.lr" in result.output


def test_status_reads_progress_files(tmp_path):
    d = tmp_path / "state" / "stage_0"
    d.mkdir(parents=True)
    (d / "progress.json").write_text(json.dumps({
        "model": "stage_0", "state": "running", "step": 50, "max_steps": 200, "loss": 3.2, "val_loss": 3.4,
        "steps_per_min": 10.0, "milestones": [100, 200], "milestones_reached": [], "updated": 1e12}))
    result = invoke("status", "--root", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "step 50/200" in result.output and "ETA 15m00s" in result.output and "next 100" in result.output
    empty = invoke("status", "--root", str(tmp_path / "none"))
    assert empty.exit_code == 2


def test_status_of_a_stopped_and_resumed_run_says_how_to_continue(tmp_path):
    d = tmp_path / "state" / "cfg"
    d.mkdir(parents=True)
    (d / "progress.json").write_text(json.dumps({
        "model": "cfg", "state": "interrupted", "step": 120, "max_steps": 240, "loss": 5.0, "val_loss": None,
        "steps_per_min": 6.0, "resumed_from": 50, "milestones": [240], "milestones_reached": [],
        "updated": 1e12}))
    result = invoke("status", "--root", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "(resumed at step 50)" in result.output and "`dvc repro`" in result.output
