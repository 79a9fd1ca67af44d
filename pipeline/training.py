"""Shared glue of the training stages: MLflow run, milestone checkpoints, metrics and curves."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch

from pipeline.common import TRAINING_HEADLINE, StageContext, log, write_csv, write_json, write_stage_record
from sunfish.config import GenerationConfig, ResolvedTraining
from sunfish.training.checkpoint import link_tree, list_milestones, save_checkpoint
from sunfish.training.distributed import barrier, init_from_env
from sunfish.training.loop import TrainingInterrupted, TrainResult, train
from sunfish.training.resume import ResumeCheckpoints, RunStates, fingerprint, fingerprint_id

OPTIMIZER_STATE = "optimizer.pt"


def load_optimizer_state(checkpoint_dir) -> dict | None:
    """The named AdamW moments saved next to a final checkpoint, if any (never unpickles code)."""
    path = checkpoint_dir / OPTIMIZER_STATE
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file only costs the warm optimizer, not the run
        log.warning("ignoring unreadable optimizer state %s: %s", path, exc)
        return None


def read_meta(ctx: StageContext) -> dict:
    path = ctx.prepared / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `dvc repro prepare` first")
    return json.loads(path.read_text(encoding="utf-8"))


class _NoRun:
    """What ranks other than 0 get instead of an MLflow run: they train, rank 0 records."""

    run_id = None

    def log_metrics(self, metrics, step=0) -> None:
        pass


def run_training(
    ctx: StageContext,
    model_name: str,
    model: torch.nn.Module,
    tcfg: ResolvedTraining,
    *,
    sample_batch: Callable[[torch.Generator], dict],
    val_batches: Callable[[], Iterable[dict]],
    tokens_per_batch: int,
    bytes_per_token: float,
    flat_params: dict,
    identities: dict[str, str],
    after_clip: Callable[[torch.nn.Module, int], dict[str, float]] | None = None,
    start_metrics: dict[str, float] | None = None,
    description: str = "",
    optimizer_state: dict | None = None,
    stage_params: dict | None = None,
    after_train: Callable[[TrainResult, object], dict] | None = None,
    generation_config: GenerationConfig | None = None,
) -> TrainResult:
    """Train one model for a DVC stage, resuming its interrupted or extended run when that is sound.

    DVC deletes a stage's outputs (models/<model>) before running it, so the resume state lives
    outside them, in state/<model>/runs/<fingerprint>/ (untracked): resume checkpoints plus hard-linked
    mirrors of the milestones already written, which are put back into models/<model>/ on resume.
    ``identities`` name the data and starting weights (file digests) so that new data or a retrained
    previous stage starts a fresh run instead of continuing a stale one.
    ``after_train(result, run)`` runs on every process once training is done (the staged seeds use it:
    more runs that save nothing); what it returns joins reports/stages/<model>.json.
    ``generation_config``: the sampling defaults every checkpoint of a diffusion model carries.
    """
    dist = init_from_env("cuda" if torch.cuda.is_available() and tcfg.device in ("auto", "cuda") else "cpu")
    out_dir = ctx.models / model_name
    tokenizer_file = ctx.prepared / "tokenizer.json"
    n_params = sum(p.numel() for p in model.parameters())
    fp = fingerprint(model.config.to_dict(), tcfg, **identities)
    runs = RunStates(ctx.root / "state" / model_name / "runs")
    run_dir = runs.root / fingerprint_id(fp)
    checkpoints = ResumeCheckpoints(run_dir / "resume", keep=tcfg.keep_checkpoints, fingerprint=fp,
                                    model_name=model_name, tokenizer_file=tokenizer_file)
    mirror = run_dir / "milestones"
    point, reason = checkpoints.find(tcfg.max_steps) if tcfg.resume else (None, "train.resume is false")
    if point is None and reason == "no resume checkpoint":
        reason = runs.why_fresh(fp)
    previous_run_id = None
    if dist.is_main:
        runs.run_dir(fp)
        if out_dir.exists():  # outside DVC a rerun must not mix old milestones with new ones
            shutil.rmtree(out_dir)
        if point is None:
            log.info("%s: starting a fresh run: %s", model_name, reason)
            checkpoints.clear()
            shutil.rmtree(mirror, ignore_errors=True)
        else:
            log.info("%s: %s", model_name, reason)
            for step, directory in list_milestones(mirror):
                if step <= point.step:
                    link_tree(directory, out_dir / directory.name)
            previous_run_id = json.loads((point.directory / "config.json").read_text(encoding="utf-8")).get(
                "mlflow_run_id")
        runs.prune(fp)
    barrier(dist)

    tracking = ctx.tracking(flat_params, run_id=previous_run_id, stage_params=stage_params, system_metrics=True,
                            **{"sunfish.model": model_name, "sunfish.kind": model.kind})
    with (tracking if dist.is_main else nullcontext(_NoRun())) as run:
        if point is None:
            run.log_metrics({"model/parameters": n_params, **(start_metrics or {})}, 0)
        run_meta = {"train": tcfg.model_dump(), "mlflow_run_id": run.run_id,
                    "data": {"source": ctx.params.data.source}}  # what a model card says it learned from

        def save(m: torch.nn.Module, step: int) -> None:
            target = save_checkpoint(out_dir / f"step_{step}", m, model_name=model_name, step=step,
                                     tokenizer_file=tokenizer_file, extra=run_meta,
                                     generation_config=generation_config)
            link_tree(target, mirror / target.name)

        try:
            result = train(
                model, tcfg,
                sample_batch=sample_batch, val_batches=val_batches,
                tokens_per_batch=tokens_per_batch, bytes_per_token=bytes_per_token,
                save_milestone=save, log_metrics=run.log_metrics, after_clip=after_clip,
                progress_file=ctx.root / "state" / model_name / "progress.json",
                optimizer_state=optimizer_state, checkpoints=checkpoints, resume=point,
                checkpoint_extra={"mlflow_run_id": run.run_id},
            )
            extra = after_train(result, run) if after_train is not None else {}
        except TrainingInterrupted as exc:
            run.log_metrics({"interrupted_at_step": exc.step}, exc.step)
            raise
        if not dist.is_main:
            return result
        save_checkpoint(out_dir / "final", model, model_name=model_name, step=result.steps,
                        tokenizer_file=tokenizer_file, extra=run_meta, generation_config=generation_config)
        # the next stage continues with these AdamW moments (loads with torch.load(weights_only=True))
        torch.save(result.optimizer_state, out_dir / "final" / OPTIMIZER_STATE)
        last_val = result.val[-1] if result.val else {}
        first_val_loss = result.val[0]["loss"] if result.val else math.nan
        metrics = {
            "model": model_name,
            "description": description,
            "parameters": n_params,
            "steps": result.steps,
            "resumed_from_step": result.resumed_from,
            "train_loss": result.last_train_loss,
            "first_train_loss": result.first_loss,
            "val_loss": last_val.get("loss"),
            "val_ppl": last_val.get("ppl"),
            "val_bpb": last_val.get("bpb"),
            "val_tokens": last_val.get("tokens"),  # train.eval_batches batches, not the whole split
            "tokens_per_s": result.tokens_per_s,
            "train_seconds": result.train_seconds,
            "milestones": result.milestones,
            "skipped_nonfinite_steps": result.skipped_nonfinite,
            "processes": dist.world_size,
            # the float sums, and so the weights, depend on it: two runs compare bit for bit only at equal threads
            "threads": result.threads,
            **(start_metrics or {}),
            **extra,
            "mlflow_run_id": run.run_id,
        }
        run.set_tags({"sunfish.threads": result.threads})
        run.log_metrics({"final/val_loss": last_val.get("loss"), "final/val_bpb": last_val.get("bpb"),
                         "final/tokens_per_s": result.tokens_per_s, "final/train_seconds": result.train_seconds},
                        result.steps)
        write_stage_record(ctx.reports, model_name, metrics, TRAINING_HEADLINE)
        curves = ctx.reports / "curves" / model_name
        write_csv(curves / "train.csv", result.train_curve, ["step", "loss", "lr", "tokens_per_s", "grad_norm"])
        # bpb stays the last column: DVC plots a curves folder without x/y by its last column
        write_csv(curves / "val.csv", result.val, ["step", "loss", "ppl", "tokens", "bpb"])
        log.info(
            "%s: %d steps in %.0fs (%.0f tokens/s); val loss %.3f -> %.3f, bpb %.3f (on %s validation tokens: "
            "train.eval_batches; evaluate scores the whole split)",
            model_name, result.steps, result.train_seconds, result.tokens_per_s, first_val_loss,
            last_val.get("loss", math.nan), last_val.get("bpb", math.nan), last_val.get("tokens", "?"),
        )
    return result
