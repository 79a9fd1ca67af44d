"""Shared glue of the training stages: MLflow run, milestone checkpoints, metrics and curves."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterable

import torch

from pipeline.common import StageContext, log, write_csv, write_json
from sunfish.config import ResolvedTraining
from sunfish.training.checkpoint import save_checkpoint
from sunfish.training.loop import TrainResult, train

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
    after_clip: Callable[[torch.nn.Module, int], dict[str, float]] | None = None,
    start_metrics: dict[str, float] | None = None,
    description: str = "",
    optimizer_state: dict | None = None,
) -> TrainResult:
    out_dir = ctx.models / model_name
    if out_dir.exists():  # outside DVC a rerun must not mix old milestones with new ones
        shutil.rmtree(out_dir)
    tokenizer_file = ctx.prepared / "tokenizer.json"
    n_params = sum(p.numel() for p in model.parameters())

    with ctx.tracking(flat_params, **{"sunfish.model": model_name, "sunfish.kind": model.kind}) as run:
        run.log_metrics({"model/parameters": n_params, **(start_metrics or {})}, 0)

        def save(m: torch.nn.Module, step: int) -> None:
            save_checkpoint(
                out_dir / f"step_{step}", m, model_name=model_name, step=step, tokenizer_file=tokenizer_file,
                extra={"train": tcfg.model_dump(), "mlflow_run_id": run.run_id},
            )

        result = train(
            model, tcfg,
            sample_batch=sample_batch, val_batches=val_batches,
            tokens_per_batch=tokens_per_batch, bytes_per_token=bytes_per_token,
            save_milestone=save, log_metrics=run.log_metrics, after_clip=after_clip,
            progress_file=ctx.root / "state" / model_name / "progress.json",
            optimizer_state=optimizer_state,
        )
        save_checkpoint(
            out_dir / "final", model, model_name=model_name, step=result.steps, tokenizer_file=tokenizer_file,
            extra={"train": tcfg.model_dump(), "mlflow_run_id": run.run_id},
        )
        # the next stage continues with these AdamW moments (loads with torch.load(weights_only=True))
        torch.save(result.optimizer_state, out_dir / "final" / OPTIMIZER_STATE)
        last_val = result.val[-1] if result.val else {}
        first_val_loss = result.val[0]["loss"] if result.val else math.nan
        metrics = {
            "model": model_name,
            "description": description,
            "parameters": n_params,
            "steps": result.steps,
            "train_loss": result.last_train_loss,
            "first_train_loss": result.first_loss,
            "val_loss": last_val.get("loss"),
            "val_ppl": last_val.get("ppl"),
            "val_bpb": last_val.get("bpb"),
            "tokens_per_s": result.tokens_per_s,
            "train_seconds": result.train_seconds,
            "milestones": result.milestones,
            "skipped_nonfinite_steps": result.skipped_nonfinite,
            **(start_metrics or {}),
            "mlflow_run_id": run.run_id,
        }
        run.log_metrics({"final/val_loss": last_val.get("loss"), "final/val_bpb": last_val.get("bpb"),
                         "final/tokens_per_s": result.tokens_per_s, "final/train_seconds": result.train_seconds},
                        result.steps)
        write_json(ctx.reports / "metrics" / f"{model_name}.json", metrics)
        curves = ctx.reports / "curves" / model_name
        write_csv(curves / "train.csv", result.train_curve, ["step", "loss", "lr", "tokens_per_s", "grad_norm"])
        write_csv(curves / "val.csv", result.val, ["step", "loss", "ppl", "bpb"])
        log.info(
            "%s: %d steps in %.0fs (%.0f tokens/s); val loss %.3f -> %.3f, bpb %.3f",
            model_name, result.steps, result.train_seconds, result.tokens_per_s, first_val_loss,
            last_val.get("loss", math.nan), last_val.get("bpb", math.nan),
        )
    return result
