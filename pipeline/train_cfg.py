"""DVC stage `train_cfg_micro`: the prompt-conditioned diffusion model on prompt/text pairs.

cfg.architecture "block" (the default) turns the stage-0 network into a block diffusion model and
starts it from stage 0's final weights (cfg.init_from); "cross_attention" trains the denoiser with
a prompt encoder from scratch.
"""

from __future__ import annotations

import itertools
import json
import os

import torch

from pipeline.common import log, open_stage, write_csv, write_json
from pipeline.training import read_meta, run_training

HEALTH_SEED = 0


def run() -> None:
    from sunfish.config import GenerationConfig
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
    identities = {"data.pairs": file_digest(ctx.prepared / "pairs_train.jsonl"),
                  "data.tokenizer": file_digest(ctx.prepared / "tokenizer.json")}
    torch.manual_seed(tcfg.seed)
    if p.cfg.architecture == "block":
        model, start = build_block_model(ctx, tok)
        identities.update(start)
    else:
        config = DiffusionConfig.from_params(
            p.cfg, preset, vocab_size=preset.vocab_size or tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id
        )
        model = DiffusionLM(config)
    train_pairs = PairDataset(load_pairs(ctx.prepared / "pairs_train.jsonl"), tok, tcfg.seq_len, p.cfg.max_prompt_tokens)
    val_pairs = PairDataset(load_pairs(ctx.prepared / "pairs_val.jsonl"), tok, tcfg.seq_len, p.cfg.max_prompt_tokens)

    def sample_batch(gen: torch.Generator) -> dict:
        return train_pairs.sample_batch(tcfg.batch_size, gen)

    def val_batches():
        return itertools.islice(val_pairs.eval_batches(tcfg.batch_size), tcfg.eval_batches)

    flat = {**ctx.flat_params("train", "cfg", "sampling"),
            **{f"presets.{p.cfg.preset}.{k}": v for k, v in preset.model_dump().items()}}
    run_training(
        ctx, "cfg", model, tcfg,
        sample_batch=sample_batch, val_batches=val_batches,
        tokens_per_batch=tcfg.batch_size * tcfg.seq_len,
        bytes_per_token=meta["splits"]["val"]["bytes_per_token"],
        flat_params=flat,
        identities=identities,
        # sampling defaults the checkpoints carry (`sunfish sample` reads them, never ./params.yaml)
        generation_config=GenerationConfig.from_params(p),
        description=(f"block diffusion (B={p.cfg.block_size}, from {p.cfg.init_from}), CFG dropout "
                     f"{p.cfg.conditioning_dropout}" if p.cfg.architecture == "block" else
                     f"prompt-conditioned {p.cfg.objective} diffusion, CFG dropout {p.cfg.conditioning_dropout}"),
    )
    if os.environ.get("RANK", "0") == "0" and model.kind == "diffusion":  # only rank 0 writes reports
        log_milestone_health(ctx, flat)


def build_block_model(ctx, tok) -> tuple[torch.nn.Module, dict[str, str]]:
    """The block diffusion model: stage 0's network and weights (cfg.init_from stage_0) or a fresh
    network of the staged preset's shape (none). Returns the model and the identity of its start."""
    from sunfish.models.block_denoiser import BlockDiffusionConfig, BlockDiffusionLM
    from sunfish.models.staged import StagedLMConfig
    from sunfish.training.checkpoint import load_checkpoint
    from sunfish.training.resume import file_digest

    p = ctx.params
    common = dict(block_size=p.cfg.block_size, max_prompt_tokens=p.cfg.max_prompt_tokens,
                  conditioning_dropout=p.cfg.conditioning_dropout, pad_id=tok.pad_id, eos_id=tok.eos_id,
                  prompt_copy=p.cfg.prompt_copy)
    if p.cfg.init_from == "none":
        preset = p.preset_for("cfg")
        ar_config = StagedLMConfig.from_params(p.staged, preset, vocab_size=tok.vocab_size, stage=0,
                                               eos_id=tok.eos_id)
        backbone = {**BlockDiffusionLM.backbone_from(ar_config), "dropout": p.cfg.dropout}
        config = BlockDiffusionConfig(vocab_size=ar_config.vocab_size, backbone=backbone, **common)
        return BlockDiffusionLM(config), {"start.weights": "random"}
    source = ctx.models / "stage_0" / "final"
    ar, _, directory = load_checkpoint(source, expect_kind="staged")
    if ar.config.stage != 0:
        raise ValueError(f"{source}: holds a stage {ar.config.stage} model; cfg.init_from stage_0 needs stage 0")
    if ar.config.vocab_size < tok.vocab_size:
        raise ValueError(f"{source}: vocabulary of {ar.config.vocab_size} tokens, the tokenizer has "
                         f"{tok.vocab_size}: retrain stage 0 (`dvc repro train_stage_0`)")
    backbone = {**BlockDiffusionLM.backbone_from(ar.config), "dropout": p.cfg.dropout}
    config = BlockDiffusionConfig(vocab_size=ar.config.vocab_size, backbone=backbone,
                                  init_from=str(source.relative_to(ctx.root)), **common)
    model = BlockDiffusionLM.from_ar(ar, config)
    log.info("block diffusion (B=%d) starts from %s", p.cfg.block_size, source)
    return model, {"start.weights": file_digest(directory / "model.safetensors")}


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
    metrics_file = ctx.reports / "stages" / "cfg.json"
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    metrics["health"] = {k: rows[-1][k] for k in fields[1:]}
    write_json(metrics_file, metrics)
    with ctx.tracking(flat, run_id=metrics.get("mlflow_run_id")) as run:
        for row in rows:
            run.log_metrics({f"health/{k}": row[k] for k in fields[1:]}, row["step"])
    log.info("cfg embedding health at the last milestone: %s",
             ", ".join(f"{k} {rows[-1][k]:.4f}" for k in fields[1:]))
    return rows
