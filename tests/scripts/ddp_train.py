"""Train a tiny staged model with sunfish.training.loop.train, alone or under torchrun (gloo).

Usage: [torchrun --nproc_per_node N] ddp_train.py OUT.json STATE_DIR [--stop-at S] [--resume]
Rank 0 writes the loss curve and a parameter checksum to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

from sunfish.config import parse_params
from sunfish.models.staged import StagedLM, StagedLMConfig
from sunfish.training.loop import TrainingInterrupted, train
from sunfish.training.resume import ResumeCheckpoints, fingerprint

VOCAB, SEQ, BATCH = 48, 16, 8


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("state")
    ap.add_argument("--stop-at", type=int)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    cfg = parse_params({"train": {"max_steps": 6, "milestones": [6], "warmup_steps": 1, "lr": 3e-3,
                                  "batch_size": BATCH, "seq_len": SEQ, "eval_every": 3, "eval_batches": 2,
                                  "log_every": 1, "threads": 1, "device": "cpu", "checkpoint_every": 100,
                                  "precision": "fp32"}}
                       ).training_for("stage_0")
    torch.manual_seed(0)
    model = StagedLM(StagedLMConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=SEQ))
    data = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(1))

    def sample(gen):
        starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=gen)
        return {"input_ids": torch.stack([data[s : s + SEQ] for s in starts]),
                "targets": torch.stack([data[s + 1 : s + SEQ + 1] for s in starts])}

    val = [sample(torch.Generator().manual_seed(50 + i)) for i in range(2)]
    ckpts = ResumeCheckpoints(Path(args.state), keep=2, model_name="ddp",
                              fingerprint=fingerprint(model.config.to_dict(), cfg, data="ddp"))
    point = ckpts.find(cfg.max_steps)[0] if args.resume else None
    rank = int(os.environ.get("RANK", "0"))

    def log_metrics(metrics, step):
        if step == args.stop_at and "train/loss" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)  # rank 0 only: the other ranks must stop with it

    try:
        result = train(model, cfg, sample_batch=sample, val_batches=lambda: val, tokens_per_batch=BATCH * SEQ,
                       bytes_per_token=1.0, save_milestone=lambda m, s: None, log_metrics=log_metrics,
                       progress=False, checkpoints=ckpts, resume=point)
        stopped = None
    except TrainingInterrupted as exc:
        result, stopped = None, exc.step
    if rank == 0:
        out = {"stopped": stopped, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
        if result is not None:
            out.update(losses=[r["loss"] for r in result.train_curve], val=[v["loss"] for v in result.val],
                       checksum=float(sum(p.double().abs().sum() for p in model.parameters())))
        Path(args.out).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
