"""DVC stage `train_cfg_micro`: the prompt-conditioned diffusion model on prompt/text pairs."""

from __future__ import annotations

import itertools
import json
import os

import torch

from pipeline.common import log, open_stage, write_csv, write_json
from pipeline.training import read_meta, run_training

HEALTH_SEED = 0


def run() -> None:
    from sunfish.data.dataset import PairDataset, load_pairs
    from sunfish.data.tokenizer import TextTokenizer
    from sunfish.models.denoiser import DiffusionConfig, DiffusionLM
    from sunfish.training.resume import file_digest

    ctx = open_stage("train_cfg_micro")
    p = ctx.params
    tcfg = p.training_for("cfg")
    meta = read_meta(ctx)
    tok = TextTokenizer.load(ctx.prepared / "tokenizer.json")
    preset = p.preset_for("cfg")
    config = DiffusionConfig.from_params(
        p.cfg, preset, vocab_size=preset.vocab_size or tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id
    )
    torch.manual_seed(tcfg.seed)
    model = DiffusionLM(config)
    train_pairs = PairDataset(load_pairs(ctx.prepared / "pairs_train.jsonl"), tok, tcfg.seq_len, p.cfg.max_prompt_tokens)
    val_pairs = PairDataset(load_pairs(ctx.prepared / "pairs_val.jsonl"), tok, tcfg.seq_len, p.cfg.max_prompt_tokens)

    def sample_batch(gen: torch.Generator) -> dict:
        return train_pairs.sample_batch(tcfg.batch_size, gen)

    def val_batches():
        return itertools.islice(val_pairs.eval_batches(tcfg.batch_size), tcfg.eval_batches)

    flat = {**ctx.flat_params("train", "cfg"),
            **{f"presets.{p.cfg.preset}.{k}": v for k, v in preset.model_dump().items()}}
    run_training(
        ctx, "cfg", model, tcfg,
        sample_batch=sample_batch, val_batches=val_batches,
        tokens_per_batch=tcfg.batch_size * tcfg.seq_len,
        bytes_per_token=meta["splits"]["val"]["bytes_per_token"],
        flat_params=flat,
        identities={"data.pairs": file_digest(ctx.prepared / "pairs_train.jsonl"),
                    "data.tokenizer": file_digest(ctx.prepared / "tokenizer.json")},
        description=f"prompt-conditioned {p.cfg.objective} diffusion, CFG dropout {p.cfg.conditioning_dropout}",
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes reports
        log_milestone_health(ctx, flat)


def log_milestone_health(ctx, flat: dict) -> list[dict]:
    """Embedding health of every milestone checkpoint: the evidence that embeddings do not collapse.

    Mean pairwise cosine of the token embeddings, and for the continuous objective the rounding
    accuracy at the smallest noise level. Read from the saved milestones rather than during
    training so the figures belong exactly to the checkpoints (a resumed run has them all), into
    reports/curves/cfg/health.csv, the stage's metrics ("health") and its MLflow run.
    """
    from sunfish.training.checkpoint import list_milestones, load_checkpoint

    rows = []
    for step, directory in list_milestones(ctx.models / "cfg"):
        model = load_checkpoint(directory, expect_kind="diffusion")[0]
        rows.append({"step": step, **model.health(torch.Generator().manual_seed(HEALTH_SEED))})
    if not rows:
        return rows
    fields = ["step", *[k for k in rows[-1] if k != "step"]]
    write_csv(ctx.reports / "curves" / "cfg" / "health.csv", rows, fields)
    metrics_file = ctx.reports / "metrics" / "cfg.json"
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    metrics["health"] = {k: rows[-1][k] for k in fields[1:]}
    write_json(metrics_file, metrics)
    with ctx.tracking(flat, run_id=metrics.get("mlflow_run_id")) as run:
        for row in rows:
            run.log_metrics({f"health/{k}": row[k] for k in fields[1:]}, row["step"])
    log.info("cfg embedding health at the last milestone: %s",
             ", ".join(f"{k} {rows[-1][k]:.4f}" for k in fields[1:]))
    return rows
