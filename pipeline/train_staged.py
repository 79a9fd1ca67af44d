"""DVC stages `train_stage_0`, `train_stage@1` .. `train_stage@3` and their controls `control_stage@1` ..
`control_stage@3` (dvc.yaml's foreach families `train_stage` and `control_stage`; the name is also the
MLflow run's name and its `dvc.stage` tag).

Stage N starts from stage N-1's final weights with its new component zero-initialised, so the
loss it starts at is the loss stage N-1 ended at (logged as warm_start/* and checked by a test).

control_N answers "did stage N's component help, or only its extra steps?": it starts from the
same weights and optimizer moments as stage N, trains on the same batches (same seed) for stage
N's exact budget (staged.stage_N), but keeps stage N-1's model (no new component; for K-1, no
K-1 hook). stage_N minus control_N at equal steps is then the component's own effect.

One run cannot tell a component's effect from the luck of its batch order, so stages 1..3 and the
controls each train ``staged.seeds`` times from the same start (weights, optimizer moments, zero
new component), the extra runs with seeds train.seed+1, +2, ...: only their final validation
figures are kept, and their spread is the noise floor the component table measures against.

K-1 in ``log`` mode only measures gradients, so control_2 would end bit-identical to stage_2:
training it twice would spend minutes to prove an identity, so it is written as not trained.
"""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import statistics
import time
from collections.abc import Callable

import torch

from pipeline.common import TRAINING_HEADLINE, log, open_stage, write_csv, write_json, write_stage_record
from pipeline.training import load_optimizer_state, read_meta, run_training

DESCRIPTIONS = {
    0: "MU semantic-matrix tokens + RoPE + causal attention",
    1: "+ TEMPORAL learned per-token embeddings",
    2: "+ K-1 hierarchical credit assignment on gradients",
    3: "+ graph-routed attention mask blended with dense attention (an extra attention pass, no compute saved)",
}
NOT_TRAINED = "not_trained.json"


def dvc_stage(stage: int, control: bool = False) -> str:
    """The DVC stage that trains stage ``stage`` (or its control): ``train_stage_0``, a plain stage, and
    the members of dvc.yaml's foreach families, ``train_stage@N`` and ``control_stage@N``."""
    if control:
        return f"control_stage@{stage}"
    return "train_stage_0" if stage == 0 else f"train_stage@{stage}"


def run(stage: int) -> None:
    """Train stage ``stage`` (0..3)."""
    _train(dvc_stage(stage), f"stage_{stage}", model_stage=stage, description=DESCRIPTIONS[stage])


def run_control(stage: int) -> None:
    """Train control_``stage`` (1..3): stage ``stage - 1``'s model for stage ``stage``'s budget
    (control_2 under ``staged.k1.mode: log`` is written as not trained: it would equal stage_2)."""
    if not 1 <= stage <= 3:
        raise ValueError(f"controls exist for stages 1..3, got {stage}")
    if stage == 2:
        ctx = open_stage(dvc_stage(2, control=True))
        if ctx.params.staged.k1.mode == "log":
            _write_not_trained(ctx, "control_2", "stage_2", "staged.k1.mode=log changes no update")
            return
    _train(
        dvc_stage(stage, control=True), f"control_{stage}", model_stage=stage - 1,
        description=f"control for stage {stage}: stage {stage - 1} trained for stage {stage}'s extra steps",
        start_stage=stage - 1,
    )


def _write_not_trained(ctx, name: str, same_as: str, because: str) -> None:
    """The outputs DVC expects of ``name`` (models/<name>, its metrics and curves), holding no weights:
    evaluate finds no checkpoint in it, and the report reads the reason from its stage record."""
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun one process writes
        return
    reason = f"identical to {same_as} by construction: {because}"
    out_dir = ctx.models / name
    shutil.rmtree(out_dir, ignore_errors=True)
    write_json(out_dir / NOT_TRAINED, {"model": name, "trained": False, "identical_to": same_as, "reason": reason})
    write_stage_record(ctx.reports, name, {"model": name, "description": f"not trained: {reason}", "trained": False,
                                           "identical_to": same_as, "reason": reason, "steps": 0, "seeds": 0},
                       TRAINING_HEADLINE)  # an empty metrics file: DVC declares it, and there is no figure
    curves = ctx.reports / "curves" / name  # DVC declares the folder: header-only tables
    write_csv(curves / "train.csv", [], ["step", "loss", "lr", "tokens_per_s", "grad_norm"])
    write_csv(curves / "val.csv", [], ["step", "loss", "ppl", "tokens", "bpb"])
    state = ctx.root / "state" / name
    for old in state.glob("seed_*"):
        shutil.rmtree(old, ignore_errors=True)
    write_json(state / "progress.json", {"model": name, "state": "not trained", "note": reason, "step": 0,
                                         "max_steps": 0, "milestones": [], "milestones_reached": [],
                                         "updated": time.time()})
    log.info("%s: not trained (%s); wrote %s", name, reason, out_dir / NOT_TRAINED)


def _seed_runs(name: str, start: torch.nn.Module, tcfg, seeds: int, progress_dir, **loop) -> Callable:
    """``run_training``'s ``after_train``: ``seeds - 1`` more runs of ``start`` for the same budget with
    seeds train.seed+1, ... (other batch orders), saving nothing; returns the seeds' final figures on
    the validation batches the main run's final figure used, the main run first."""

    def after_train(result, run) -> dict:
        from sunfish.training.loop import train

        final = result.val[-1] if result.val else {}
        seeds_used, bpb, loss = [tcfg.seed], [final.get("bpb")], [final.get("loss")]
        run.log_metrics({f"seeds/val_bpb_{tcfg.seed}": final.get("bpb")}, tcfg.max_steps)
        for old in progress_dir.glob("seed_*"):
            shutil.rmtree(old, ignore_errors=True)
        began = time.perf_counter()
        for seed in range(tcfg.seed + 1, tcfg.seed + seeds):
            cfg = tcfg.model_copy(update={"model": f"{name} seed {seed}", "seed": seed, "milestones": [],
                                          "eval_every": tcfg.max_steps})
            out = train(copy.deepcopy(start), cfg, save_milestone=lambda m, s: None,
                        progress_file=progress_dir / f"seed_{seed}" / "progress.json", **loop)
            seeds_used.append(seed)
            bpb.append(out.val[-1]["bpb"])
            loss.append(out.val[-1]["loss"])
            run.log_metrics({f"seeds/val_bpb_{seed}": bpb[-1]}, tcfg.max_steps)
        known = [b for b in bpb if b is not None]
        figures = {"seeds": len(seeds_used), "seed_values": seeds_used, "val_bpb_seeds": bpb, "val_loss_seeds": loss,
                   "val_bpb_mean": statistics.fmean(known) if known else None,
                   "val_bpb_std": statistics.stdev(known) if len(known) > 1 else None,
                   "seeds_train_seconds": time.perf_counter() - began}
        run.log_metrics({"seeds/val_bpb_mean": figures["val_bpb_mean"], "seeds/val_bpb_std": figures["val_bpb_std"],
                         "seeds/count": len(seeds_used)}, tcfg.max_steps)
        if len(known) > 1:
            log.info("%s: final val bpb over %d seeds: %s (mean %.5f, sd %.5f)", name, len(known),
                     ", ".join(f"{b:.5f}" for b in known), figures["val_bpb_mean"], figures["val_bpb_std"])
        return figures

    return after_train


def _train(dvc_stage: str, name: str, *, model_stage: int, description: str, start_stage: int | None = None) -> None:
    """Train ``name`` (its budget from params) with ``model_stage``'s components, warm-started from
    ``start_stage``'s final checkpoint (default: the previous stage; none for stage 0), then its
    extra seeds (stages 1..3 and controls: ``staged.seeds``)."""
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
    after_train = None
    # K-1 in log mode has no control to compare with (it would be stage_2 again): no verdict needs
    # stage_2's seed spread, so its extra seeds are not trained
    seeds = 1 if name == "stage_2" and p.staged.k1.mode == "log" else p.staged.seeds
    if start_stage >= 0:  # the start is copied before the main run moves it
        after_train = _seed_runs(
            name, copy.deepcopy(model), tcfg, seeds, ctx.root / "state" / name,
            sample_batch=sample_batch, val_batches=val_batches, tokens_per_batch=tcfg.batch_size * tcfg.seq_len,
            bytes_per_token=meta["splits"]["val"]["bytes_per_token"], after_clip=after_clip,
            optimizer_state=optimizer_state,
        )
    run_training(
        ctx, name, model, tcfg,
        sample_batch=sample_batch, val_batches=val_batches,
        tokens_per_batch=tcfg.batch_size * tcfg.seq_len,
        bytes_per_token=meta["splits"]["val"]["bytes_per_token"],
        flat_params=flat, stage_params={"model.stage": model_stage}, identities=identities,
        after_clip=after_clip, start_metrics=start_metrics,
        description=description, optimizer_state=optimizer_state, after_train=after_train,
    )
