"""DVC stage `train_cfg_micro`: the prompt-conditioned diffusion model on prompt/text pairs."""

from __future__ import annotations

import itertools

import torch

from pipeline.common import open_stage
from pipeline.training import read_meta, run_training


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
