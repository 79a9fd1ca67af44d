"""`python -m pipeline <stage>`: the DVC stage entry point (pipeline/cli.py), its torchrun relaunch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import pipeline.cli
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["validate", "prepare", "diagnose", "train-staged", "train-control", "train-cfg", "evaluate",
            "evaluate-fluency", "report"]


def test_python_m_pipeline_lists_every_stage_command_without_loading_torch():
    code = ("import runpy, sys; sys.argv = ['pipeline', '--help']\n"
            "try:\n    runpy.run_module('pipeline', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert command in proc.stdout
    assert proc.stdout.strip().endswith("False")


def test_the_sunfish_command_has_no_stage_group():
    from sunfish.cli import main as user_main

    result = CliRunner().invoke(user_main, ["stage", "validate"])
    assert result.exit_code == 2 and "No such command 'stage'" in result.output


@pytest.mark.parametrize("args", [["train-staged", "--stage", "4"], ["train-control", "--stage", "0"],
                                  ["train-staged"]])
def test_stage_numbers_are_checked(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output


def _params(tmp_path: Path, nproc: int) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["nproc_per_node"] = nproc
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.parametrize("args,module,function", [
    (["train-staged", "--stage", "1"], "pipeline.train_staged", "run"),
    (["train-control", "--stage", "2"], "pipeline.train_staged", "run_control"),
    (["train-cfg"], "pipeline.train_cfg", "run"),
])
def test_training_stages_relaunch_themselves_under_torchrun(tmp_path, monkeypatch, args, module, function):
    """nproc_per_node > 1: the same command again, under torchrun, and torchrun's exit code."""
    import importlib

    _params(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    launched, trained = [], []
    monkeypatch.setattr(pipeline.cli.subprocess, "call", lambda cmd: launched.append(cmd) or 7)
    monkeypatch.setattr(importlib.import_module(module), function, lambda *a: trained.append(a))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 7, result.output
    assert launched == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         "-m", "pipeline", *args]]
    assert trained == []

    # each process torchrun starts (WORLD_SIZE set) trains instead of relaunching
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(launched) == 1 and trained == [tuple(int(a) for a in args[2:])]


def test_one_process_per_node_trains_in_place(tmp_path, monkeypatch):
    import pipeline.train_staged

    _params(tmp_path, 1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    trained = []
    monkeypatch.setattr(pipeline.cli.subprocess, "call", lambda cmd: pytest.fail(f"relaunched: {cmd}"))
    monkeypatch.setattr(pipeline.train_staged, "run", lambda stage: trained.append(stage))
    result = CliRunner().invoke(main, ["train-staged", "--stage", "0"])
    assert result.exit_code == 0, result.output
    assert trained == [0]


@pytest.mark.slow
def test_a_training_stage_runs_under_torchrun_for_real(tmp_path):
    """train.nproc_per_node: 2 on CPU (gloo): `python -m pipeline train-staged` relaunches itself, both
    processes train, rank 0 writes the model and metrics."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The dog number {i} liked to play in the park with a red ball." for i in range(60)))
    params = {
        "data": {"source": str(corpus), "val_fraction": 0.2, "split": "tail"},
        "tokenizer": {"vocab_size": 300, "min_frequency": 1},
        "presets": {"pico": {"n_layer": 1, "n_head": 2, "d_model": 32, "d_ff": 64, "seq_len": 32}},
        "train": {"max_steps": 4, "milestones": [4], "warmup_steps": 1, "batch_size": 4, "seq_len": 32,
                  "eval_every": 4, "eval_batches": 1, "log_every": 1, "threads": 1, "device": "cpu",
                  "nproc_per_node": 2},
        "staged": {"preset": "pico", "seeds": 1}, "cfg": {"preset": "pico"},
        "eval": {"cfg_seq_len": 16},
        "tracking": {"enabled": False},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    for args in (["prepare"], ["train-staged", "--stage", "0"]):
        proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "relaunching under torchrun" in proc.stderr
    metrics = json.loads((tmp_path / "reports" / "stages" / "stage_0.json").read_text())
    assert metrics["steps"] == 4 and metrics["threads"] == 1
    assert (tmp_path / "models" / "stage_0" / "final").is_dir()
