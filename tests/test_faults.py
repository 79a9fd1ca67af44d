"""Faults during training: kill -9 at any moment, and a disk that fills up while a checkpoint is written.

(An MLflow server going away and two writers at once: tests/test_tracking_async.py.)
"""

from __future__ import annotations

import copy
import errno
import importlib.util
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.cli import main

SCRIPT = Path(__file__).parent / "scripts" / "kill_train.py"


def _script():
    spec = importlib.util.spec_from_file_location("kill_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kt = _script()


def _launch(out: Path, state: Path, *flags: str, log: Path) -> tuple[subprocess.Popen, int]:
    with log.open("ab") as err:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(state), *flags],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    ready = proc.stdout.readline().split()
    assert ready and ready[0] == "READY", log.read_text()
    return proc, int(ready[1])


def _check_after_kill(state: Path) -> int:
    """Every step_* directory is complete, and find() gives a state that loads (or None before any)."""
    named = sorted(p for p in state.glob("step_*")) if state.exists() else []
    for directory in named:
        assert sorted(f.name for f in directory.iterdir()) == ["config.json", "model.safetensors", "trainer.pt"], \
            f"{directory} is incomplete: {sorted(f.name for f in directory.iterdir())}"
    ckpts = kt.checkpoints(state)
    point, reason = ckpts.find(kt.STEPS)
    if not named:
        assert point is None and reason == "no resume checkpoint"
        return 0
    assert point is not None, reason
    assert point.step == max(int(d.name[len("step_"):]) for d in named)  # the newest complete one
    ckpts.load_weights_into(kt.build_model(), point)
    assert point.state["step"] == point.step and point.state["result"]["train_curve"][-1]["step"] == point.step
    return point.step


def _timed_reference(out: Path, state: Path, log: Path) -> tuple[float, float]:
    """Run uninterrupted; return (seconds from READY to the first checkpoint, seconds per step after it)."""
    proc, _ = _launch(out, state, log=log)
    ready = time.perf_counter()
    first = last = None
    while proc.poll() is None:
        now = time.perf_counter() - ready
        if first is None and (state / "step_1").exists():
            first = now
        if last is None and (state / f"step_{kt.STEPS}").exists():
            last = now
        time.sleep(0.002)
    assert proc.wait(timeout=120) == 0, log.read_text()
    assert first is not None and last is not None and last > first
    return first, (last - first) / (kt.STEPS - 1)


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_losses(tmp_path):
    log = tmp_path / "stderr.log"
    warmup, per_step = _timed_reference(tmp_path / "reference.json", tmp_path / "reference_state", log)
    reference = json.loads((tmp_path / "reference.json").read_text())["curve"]
    assert [s for s, _ in reference] == list(range(1, kt.STEPS + 1))

    state, out = tmp_path / "state", tmp_path / "out.json"
    rng = random.Random(8)
    # the first two kills land at the two dangerous moments for sure; the rest at random moments
    planned = [("--die-in-write", "3"), ("--die-in-rotate", "6")]
    kills, resumed, leftovers, mid_write, finished = 0, [], 0, 0, False
    while kills < 10:
        flags = planned.pop(0) if planned else ()
        proc, start_step = _launch(out, state, *flags, log=log)
        resumed.append(start_step)
        if not flags and start_step < kt.STEPS:
            # anywhere from resuming to 4 steps later: while loading, stepping, writing or deleting
            time.sleep(rng.uniform(0.5 * warmup, warmup + per_step * 4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=120)
        if code == 0:
            finished = True
            break
        assert code == -signal.SIGKILL, log.read_text()
        kills += 1
        leftovers += len(list(state.glob(".step_*")))  # a kill mid-write or mid-delete leaves a hidden one
        mid_write += bool(list(state.glob(".step_*.tmp-*")))
        step = _check_after_kill(state)
        assert step >= start_step  # never goes back past what was complete
    if not finished:
        proc, start_step = _launch(out, state, log=log)
        resumed.append(start_step)
        assert proc.wait(timeout=120) == 0, log.read_text()
    assert kills >= 5, f"only {kills} kills landed before the run finished (resumed at {resumed})"
    assert leftovers >= 2  # the planned kills did hit a write and a delete
    assert resumed == sorted(resumed) and resumed[-1] > 0
    final = json.loads(out.read_text())
    assert final["resumed_from"] == resumed[-1]
    assert final["curve"] == reference  # steps and losses, bit for bit
    print(f"{kills} kills, {mid_write} during a checkpoint write; resumed at steps {resumed}")
    assert not list(state.glob(".step_*"))  # the last run swept what the killed ones left


# ----------------------------------------------------------------------------------------------
# disk full


def _failing_trainer_save(monkeypatch, step: int) -> list[Path]:
    """torch.save of trainer.pt for ``step`` writes a few bytes, then fails as a full disk does."""
    real_save = torch.save
    attempts: list[Path] = []

    def save(obj, f, *a, **k):
        path = Path(f)
        if path.name == "trainer.pt" and path.parent.name.startswith(f".step_{step}."):
            attempts.append(path)
            path.write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    return attempts


def _train(state: Path):
    from sunfish.training.loop import train

    cfg = kt.training_config().model_copy(update={"checkpoint_every": 2, "max_steps": 8, "milestones": [8]})
    model = kt.build_model()
    data = torch.randint(0, kt.VOCAB, (4096,), generator=torch.Generator().manual_seed(1))

    def sample(gen):
        starts = torch.randint(0, len(data) - kt.SEQ - 1, (4,), generator=gen)
        return {"input_ids": torch.stack([data[s : s + kt.SEQ] for s in starts]),
                "targets": torch.stack([data[s + 1 : s + kt.SEQ + 1] for s in starts])}

    ckpts = kt.checkpoints(state)
    point, _ = ckpts.find(cfg.max_steps)
    return train(model, cfg, sample_batch=sample, val_batches=lambda: [], tokens_per_batch=4 * kt.SEQ,
                 bytes_per_token=1.0, save_milestone=lambda m, s: None, progress=False, checkpoints=ckpts,
                 resume=point), ckpts


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_resumes(tmp_path, monkeypatch):
    reference, _ = _train(tmp_path / "reference")
    attempts = _failing_trainer_save(monkeypatch, step=4)
    with pytest.raises(OSError) as info:
        _train(tmp_path / "state")
    assert attempts and info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert "No space left on device while writing checkpoint" in message
    assert str(tmp_path / "state" / "step_4") in message and ".tmp-" not in message
    state = tmp_path / "state"
    assert sorted(p.name for p in state.iterdir()) == ["step_2"]  # no half step_4, no temporary
    monkeypatch.undo()
    resumed, ckpts = _train(state)
    assert resumed.resumed_from == 2
    assert [(r["step"], r["loss"]) for r in resumed.train_curve] == \
        [(r["step"], r["loss"]) for r in reference.train_curve]


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A project with prepared data, small enough to train a stage in a second."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The dog number {i} liked to play in the park with a red ball." for i in range(60)))
    params = {
        "data": {"source": str(corpus), "val_fraction": 0.2, "split": "tail"},
        "tokenizer": {"vocab_size": 300, "min_frequency": 1},
        "presets": {"pico": {"n_layer": 1, "n_head": 2, "d_model": 32, "d_ff": 64, "seq_len": 32}},
        "train": {"max_steps": 6, "milestones": [6], "warmup_steps": 1, "batch_size": 4, "seq_len": 32,
                  "eval_every": 6, "eval_batches": 1, "log_every": 1, "threads": 1, "device": "cpu",
                  "checkpoint_every": 2},
        "staged": {"preset": "pico"}, "cfg": {"preset": "pico"},
        "eval": {"cfg_seq_len": 16},
        "tracking": {"enabled": False},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(copy.deepcopy(params)))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["prepare"])
    assert result.exit_code == 0, result.output
    return tmp_path


def test_a_full_disk_stops_the_training_stage_with_one_line(project, monkeypatch):
    attempts = _failing_trainer_save(monkeypatch, step=4)
    result = CliRunner().invoke(main, ["train-staged", "--stage", "0"])
    assert attempts, result.output
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: No space left on device while writing checkpoint "), lines
    assert "step_4" in lines[0] and "run the same command again" in lines[0]
    resume_dir = next((project / "state" / "stage_0" / "runs").glob("*/resume"))
    assert sorted(p.name for p in resume_dir.iterdir()) == ["step_2"]
    monkeypatch.undo()
    monkeypatch.chdir(project)
    again = CliRunner().invoke(main, ["train-staged", "--stage", "0"])
    assert again.exit_code == 0, again.output
    metrics = json.loads((project / "reports" / "stages" / "stage_0.json").read_text())
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 6
