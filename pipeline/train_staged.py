"""DVC stages `train_stage_0` .. `train_stage_3` and their controls `control_stage_1` .. `control_stage_3`.

Stage N starts from stage N-1's final weights with its new component zero-initialised, so the
loss it starts at is the loss stage N-1 ended at (logged as warm_start/* and checked by a test).

control_N answers "did stage N's component help, or only its extra steps?": it starts from the
same weights and optimizer moments as stage N, trains on the same batches (same seed) for stage
N's exact budget (staged.stage_N), but keeps stage N-1's model (no new component; for K-1, no
K-1 hook). stage_N minus control_N at equal steps is then the component's own effect.
"""

from __future__ import annotations

import itertools

import torch

from pipeline.common import open_stage
from pipeline.training import load_optimizer_state, read_meta, run_training

DESCRIPTIONS = {
    0: "MU semantic-matrix tokens + RoPE + causal attention",
    1: "+ TEMPORAL learned per-token embeddings",
    2: "+ K-1 hierarchical credit assignment on gradients",
    3: "+ graph-routed sparse causal attention",
}


def run(stage: int) -> None:
    """Train stage ``stage`` (0..3)."""
    _train(f"train_stage_{stage}", f"stage_{stage}", model_stage=stage, description=DESCRIPTIONS[stage])


def run_control(stage: int) -> None:
    """Train control_``stage`` (1..3): stage ``stage - 1``'s model for stage ``stage``'s budget."""
    if not 1 <= stage <= 3:
        raise ValueError(f"controls exist for stages 1..3, got {stage}")
    _train(
        f"control_stage_{stage}", f"control_{stage}", model_stage=stage - 1,
        description=f"control for stage {stage}: stage {stage - 1} trained for stage {stage}'s extra steps",
        start_stage=stage - 1,
    )


def _train(dvc_stage: str, name: str, *, model_stage: int, description: str, start_stage: int | None = None) -> None:
    """Train ``name`` (its budget from params) with ``model_stage``'s components, warm-started from
    ``start_stage``'s final checkpoint (default: the previous stage; none for stage 0)."""
    from sunfish.data.dataset import TokenStream
    from sunfish.data.tokenizer import TextTokenizer
    from sunfish.models.staged import StagedLM, StagedLMConfig
    from sunfish.training.checkpoint import load_checkpoint
    from sunfish.training.resume import file_digest

    if start_stage is None:
        start_stage = model_stage - 1
    ctx = open_stage(dvc_stage)
    p = ctx.params
    tcfg = p.training_for(name)
    meta = read_meta(ctx)
    tok = TextTokenizer.load(ctx.prepared / "tokenizer.json")
    preset = p.preset_for(name)
    config = StagedLMConfig.from_params(
        p.staged, preset, vocab_size=preset.vocab_size or tok.vocab_size, stage=model_stage, eos_id=tok.eos_id
    )
    torch.manual_seed(tcfg.seed)
    train_stream = TokenStream(ctx.prepared / "train.bin")
    val_stream = TokenStream(ctx.prepared / "val.bin")

    def sample_batch(gen: torch.Generator) -> dict:
        return train_stream.sample_batch(tcfg.batch_size, tcfg.seq_len, gen)

    def val_batches():
        return itertools.islice(val_stream.eval_batches(tcfg.seq_len, tcfg.batch_size), tcfg.eval_batches)

    start_metrics = {}
    optimizer_state = None
    identities = {"data.train": file_digest(ctx.prepared / "train.bin"),
                  "data.tokenizer": file_digest(ctx.prepared / "tokenizer.json")}
    if start_stage < 0:
        model = StagedLM(config)
    else:
        previous, _, previous_dir = load_checkpoint(ctx.models / f"stage_{start_stage}" / "final", expect_kind="staged")
        identities["start.weights"] = file_digest(previous_dir / "model.safetensors")
        model = StagedLM.warm_start(previous, config)
        optimizer_state = load_optimizer_state(previous_dir)
        probe = sample_batch(torch.Generator().manual_seed(tcfg.seed + 1))
        with torch.no_grad():
            previous.eval()
            model.eval()
            start_metrics = {
                "warm_start/previous_loss": float(previous.training_loss(probe)[0]),
                "warm_start/initial_loss": float(model.training_loss(probe)[0]),
            }
        model.train()

    after_clip = None
    if model.uses_k1:
        from sunfish.training.k1 import make_k1_hook

        after_clip = make_k1_hook(p.staged.k1.mode, p.staged.k1.path_mass, every=tcfg.log_every)

    flat = {**ctx.flat_params("train", "staged"),
            **{f"presets.{p.staged.preset}.{k}": v for k, v in preset.model_dump().items()}}
    run_training(
        ctx, name, model, tcfg,
        sample_batch=sample_batch, val_batches=val_batches,
        tokens_per_batch=tcfg.batch_size * tcfg.seq_len,
        bytes_per_token=meta["splits"]["val"]["bytes_per_token"],
        flat_params=flat, stage_params={"model.stage": model_stage}, identities=identities,
        after_clip=after_clip, start_metrics=start_metrics,
        description=description, optimizer_state=optimizer_state,
    )
