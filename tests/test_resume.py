"""Resume is exact, stops are clean, checkpoints rotate, and a damaged or foreign state is never used."""

from __future__ import annotations

import os
import pickle
import signal

import pytest
import torch

from sunfish.config import parse_params
from sunfish.models.denoiser import DiffusionConfig, DiffusionLM
from sunfish.models.staged import StagedLM, StagedLMConfig
from sunfish.training.checkpoint import save_checkpoint
from sunfish.training.loop import TrainingInterrupted, train
from sunfish.training.resume import ResumeCheckpoints, RunStates, fingerprint

VOCAB, SEQ = 32, 16


def _cfg(**over):
    raw = {"train": {"max_steps": 12, "milestones": [6, 12], "warmup_steps": 3, "lr": 5e-3, "batch_size": 4,
                     "seq_len": SEQ, "eval_every": 4, "eval_batches": 2, "log_every": 1, "threads": 1,
                     "checkpoint_every": 3, "keep_checkpoints": 2, "precision": "fp32", **over}}
    return parse_params(raw).training_for("stage_0")


def _staged():
    torch.manual_seed(0)  # dropout > 0: the RNG stream must be restored for an exact continuation
    return StagedLM(StagedLMConfig(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=32, d_ff=64,
                                   max_seq_len=SEQ, dropout=0.2))


def _diffusion():
    torch.manual_seed(0)  # noise levels, masks and conditioning dropout all draw from the RNG
    return DiffusionLM(DiffusionConfig(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=32, d_ff=64,
                                       max_seq_len=SEQ, prompt_encoder_layers=1, max_prompt_tokens=4,
                                       timesteps=20))


def _lm_data(gen, bs=4):
    pattern = torch.arange(VOCAB).repeat(16)
    starts = torch.randint(0, len(pattern) - SEQ - 1, (bs,), generator=gen)
    return {"input_ids": torch.stack([pattern[s : s + SEQ] for s in starts]),
            "targets": torch.stack([pattern[s + 1 : s + SEQ + 1] for s in starts])}


def _pair_data(gen, bs=4):
    text = torch.randint(2, VOCAB, (bs, SEQ), generator=gen)
    return {"text_ids": text, "text_mask": torch.ones(bs, SEQ, dtype=torch.bool),
            "prompt_ids": text[:, :4].flip(1), "prompt_mask": torch.ones(bs, 4, dtype=torch.bool)}


KINDS = {"staged": (_staged, _lm_data), "diffusion": (_diffusion, _pair_data)}


def _run(build, data, cfg, tmp_path, *, resume=False, interrupt_at=None, name="m"):
    model = build()
    fp = fingerprint(model.config.to_dict(), cfg, data="toy")
    ckpts = ResumeCheckpoints(tmp_path / "resume", keep=cfg.keep_checkpoints, fingerprint=fp, model_name=name)
    point = None
    if resume:
        point, reason = ckpts.find(cfg.max_steps)
        assert point is not None, reason
    val = lambda: [data(torch.Generator().manual_seed(100 + i)) for i in range(2)]  # noqa: E731

    def log_metrics(metrics, step):
        if step == interrupt_at and "train/loss" in metrics:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does, mid-run

    return train(model, cfg, sample_batch=data, val_batches=val, tokens_per_batch=4 * SEQ, bytes_per_token=1.0,
                 save_milestone=lambda m, s: None, log_metrics=log_metrics, progress=False,
                 checkpoints=ckpts, resume=point), ckpts


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_stop_then_resume_gives_the_same_losses_bit_for_bit(tmp_path, kind):
    build, data = KINDS[kind]
    cfg = _cfg()
    full, _ = _run(build, data, cfg, tmp_path / "full")
    with pytest.raises(TrainingInterrupted) as stopped:
        _run(build, data, cfg, tmp_path / "split", interrupt_at=5)
    assert 5 <= stopped.value.step < cfg.max_steps
    assert "Run the same command again" in str(stopped.value) and stopped.value.exit_code == 130
    resumed, _ = _run(build, data, cfg, tmp_path / "split", resume=True)
    assert resumed.resumed_from == stopped.value.step
    losses = [r["loss"] for r in full.train_curve]
    assert [r["loss"] for r in resumed.train_curve] == losses  # exact, not approximate
    assert [v["loss"] for v in resumed.val] == [v["loss"] for v in full.val]
    assert resumed.milestones == full.milestones == [6, 12]


def test_resume_checkpoints_rotate_and_a_damaged_latest_falls_back(tmp_path, caplog):
    cfg = _cfg()
    _, ckpts = _run(_staged, _lm_data, cfg, tmp_path)
    assert [s for s, _ in ckpts.steps()] == [9, 12]  # keep_checkpoints=2
    (ckpts.directory / "step_12" / "trainer.pt").write_bytes(b"PK\x03\x04 truncated")
    point, reason = ckpts.find(cfg.max_steps)
    assert point is not None and point.step == 9, reason
    assert "skipping unreadable resume checkpoint" in caplog.text and "step_12" in caplog.text


def test_a_pickled_payload_in_resume_state_is_refused_and_never_runs(tmp_path):
    cfg = _cfg()
    _, ckpts = _run(_staged, _lm_data, cfg, tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for _, directory in ckpts.steps():
        with (directory / "trainer.pt").open("wb") as fh:
            pickle.dump({"format": 1, "x": Payload()}, fh)
    point, reason = ckpts.find(cfg.max_steps)
    assert point is None and "unreadable" in reason
    assert not marker.exists()


def test_changed_settings_start_fresh_and_say_why_but_a_longer_run_resumes(tmp_path):
    cfg = _cfg()
    _run(_staged, _lm_data, cfg, tmp_path)
    model = _staged()
    longer = _cfg(max_steps=20, milestones=[6, 12, 20])
    ckpts = ResumeCheckpoints(tmp_path / "resume", keep=2, fingerprint=fingerprint(model.config.to_dict(), longer,
                                                                                    data="toy"), model_name="m")
    point, _ = ckpts.find(longer.max_steps)
    assert point is not None and point.step == 12
    other_lr = _cfg(lr=1e-3)
    ckpts.fingerprint = fingerprint(model.config.to_dict(), other_lr, data="toy")
    point, reason = ckpts.find(other_lr.max_steps)
    assert point is None and "train.lr: 0.005 -> 0.001" in reason
    ckpts.fingerprint = fingerprint(model.config.to_dict(), cfg, data="other corpus")
    point, reason = ckpts.find(cfg.max_steps)
    assert point is None and "data: toy -> other corpus" in reason


def test_run_states_are_kept_per_setting_and_explain_a_fresh_start(tmp_path):
    model = _staged()
    runs = RunStates(tmp_path / "runs", keep_runs=2)
    fps = [fingerprint(model.config.to_dict(), _cfg(lr=lr), data="toy") for lr in (1e-3, 2e-3, 3e-3)]
    assert runs.why_fresh(fps[0]) == "no earlier run of this model"
    dirs = []
    for fp in fps:
        dirs.append(runs.run_dir(fp))
        os.utime(dirs[-1] / runs.FINGERPRINT, (len(dirs), len(dirs)))  # distinct, ordered mtimes
    assert "train.lr: 0.003 -> 0.001" in runs.why_fresh(fps[0])  # compared with the most recent other run
    runs.prune(fps[2])
    assert sorted(p.name for p in runs.root.iterdir()) == sorted([dirs[1].name, dirs[2].name])


def test_grad_accumulation_equals_one_larger_batch():
    pattern = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(3))
    rows = [(pattern[i * 17 : i * 17 + SEQ], pattern[i * 17 + 1 : i * 17 + SEQ + 1]) for i in range(64)]

    def stream(bs):
        position = iter(range(0, 10_000, bs))

        def sample(gen):
            start = next(position)
            chunk = rows[start % 64 : start % 64 + bs]
            return {"input_ids": torch.stack([x for x, _ in chunk]), "targets": torch.stack([y for _, y in chunk])}

        return sample

    def run(batch_size, accum):
        cfg = _cfg(batch_size=batch_size, grad_accum_steps=accum, max_steps=3, milestones=[3], grad_clip=1.0)
        torch.manual_seed(0)
        model = StagedLM(StagedLMConfig(vocab_size=VOCAB, n_layer=1, n_head=2, d_model=32, d_ff=64, max_seq_len=SEQ))
        train(model, cfg, sample_batch=stream(batch_size), val_batches=lambda: [], tokens_per_batch=batch_size * SEQ,
              bytes_per_token=1.0, save_milestone=lambda m, s: None, progress=False)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    one_big = run(8, 1)
    accumulated = run(4, 2)
    # float32 sums over 8 rows vs 2 x 4 rows round differently (1.1e-5 on one of 64k weights on an
    # AMD CPU without AVX-512); a wrong accumulation is off by the learning rate's order (5e-3)
    assert torch.allclose(one_big, accumulated, atol=1e-4, rtol=0)
    assert not torch.allclose(one_big, run(4, 1), atol=1e-4, rtol=0)  # the comparison can fail


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path):
    model = _staged()
    target = save_checkpoint(tmp_path / "ckpt", model, model_name="m", step=1, tokenizer_file=None)
    before = {f.name: f.read_bytes() for f in target.iterdir()}

    def disk_full(path):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "ckpt", model, model_name="m", step=2, tokenizer_file=None,
                        extra_files={"trainer.pt": disk_full})
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind
