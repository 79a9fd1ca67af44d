"""Train a tiny staged model with a resume checkpoint after every step, so that it can be killed anywhere.

Usage: kill_train.py OUT.json STATE_DIR [--die-in-write STEP] [--die-in-rotate STEP]

Resumes from the newest usable checkpoint in STATE_DIR (as the training stages do), prints READY
when training starts, and at the end writes the loss curve (restored part included) to OUT.json.
``--die-in-write N`` SIGKILLs itself halfway through writing trainer.pt of step N;
``--die-in-rotate N`` SIGKILLs itself halfway through deleting the rotated-out step_N: the two
moments where a kill could leave a damaged checkpoint behind.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  (AdamW imports it on first use: ~1.5 s that should not count as training)

from sunfish.config import parse_params
from sunfish.models.staged import StagedLM, StagedLMConfig
from sunfish.training.loop import train
from sunfish.training.resume import ResumeCheckpoints, fingerprint

VOCAB, SEQ, BATCH, STEPS = 256, 32, 8, 24


def training_config():
    return parse_params({"train": {"max_steps": STEPS, "milestones": [STEPS], "warmup_steps": 3, "lr": 3e-3,
                                   "batch_size": BATCH, "seq_len": SEQ, "eval_every": STEPS, "eval_batches": 1,
                                   "log_every": 1, "threads": 1, "device": "cpu", "checkpoint_every": 1,
                                   "keep_checkpoints": 2}}).training_for("stage_0")


def build_model() -> StagedLM:
    torch.manual_seed(0)
    return StagedLM(StagedLMConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=64, d_ff=256, max_seq_len=SEQ,
                                   dropout=0.1))


def checkpoints(state: Path) -> ResumeCheckpoints:
    cfg = training_config()
    return ResumeCheckpoints(Path(state), keep=cfg.keep_checkpoints, model_name="kill",
                             fingerprint=fingerprint(build_model().config.to_dict(), cfg, data="kill"))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("state")
    ap.add_argument("--die-in-write", type=int)
    ap.add_argument("--die-in-rotate", type=int)
    args = ap.parse_args()

    if args.die_in_write is not None:
        real_save = torch.save

        def save(obj, f, *a, **k):
            if Path(f).name == "trainer.pt" and Path(f).parent.name.startswith(f".step_{args.die_in_write}."):
                with open(f, "wb") as fh:
                    fh.write(b"PK\x03\x04 half a file")
                    fh.flush()
                _die()
            return real_save(obj, f, *a, **k)

        torch.save = save
    if args.die_in_rotate is not None:
        real_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):
            found = re.search(r"step_(\d+)", Path(path).name)
            if found and int(found.group(1)) == args.die_in_rotate:
                for name in ("trainer.pt", "model.safetensors"):  # what a half-done delete leaves
                    (Path(path) / name).unlink(missing_ok=True)
                _die()
            return real_rmtree(path, *a, **k)

        shutil.rmtree = rmtree

    cfg = training_config()
    model = build_model()
    data = torch.randint(0, VOCAB, (8192,), generator=torch.Generator().manual_seed(1))

    def sample(gen):
        starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=gen)
        return {"input_ids": torch.stack([data[s : s + SEQ] for s in starts]),
                "targets": torch.stack([data[s + 1 : s + SEQ + 1] for s in starts])}

    val = [sample(torch.Generator().manual_seed(50))]
    ckpts = checkpoints(Path(args.state))
    point, _ = ckpts.find(cfg.max_steps)
    print("READY", point.step if point else 0, flush=True)
    result = train(model, cfg, sample_batch=sample, val_batches=lambda: val, tokens_per_batch=BATCH * SEQ,
                   bytes_per_token=1.0, save_milestone=lambda m, s: None, progress=False, checkpoints=ckpts,
                   resume=point)
    Path(args.out).write_text(json.dumps({"curve": [[r["step"], r["loss"]] for r in result.train_curve],
                                          "resumed_from": result.resumed_from}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
