"""One training loop for every SunFish model.

The loop knows a model only through ``model.training_loss(batch)`` and ``model.nll(batch)``: the
staged stages and the diffusion model share warmup + cosine AdamW, gradient accumulation, clipping,
bf16 autocast on GPU, periodic validation, milestone checkpoints, a tqdm bar and metric logging.
Model-specific gradient work (K-1 credit assignment) plugs in through ``after_clip``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sunfish.config import ResolvedTraining

log = logging.getLogger(__name__)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use device: auto or cpu")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("train.device is 'mps' but MPS is not available; use device: auto or cpu")
    return torch.device(requested)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def set_threads(threads: int) -> None:
    """Intra-op threads: 0 = one per core (measured fastest here; see benchmarks/)."""
    import os

    n = threads or (os.cpu_count() or 1)
    torch.set_num_threads(n)


def lr_at(step: int, cfg: ResolvedTraining) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: ResolvedTraining, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases, gates) do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2)}
    if device.type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, **kwargs)


def named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """AdamW moments keyed by parameter name, so a later stage with extra parameters can reuse them."""
    out = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p)
        if state:
            out[name] = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    return out


def load_named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, dict]) -> int:
    """Seed the optimizer with moments of same-named, same-shaped parameters; returns how many."""
    carried = 0
    for name, p in model.named_parameters():
        state = named.get(name)
        if not state or not p.requires_grad or state["exp_avg"].shape != p.shape:
            continue
        optimizer.state[p] = {k: (v.to(p.device).clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
        carried += 1
    return carried


@dataclass
class TrainResult:
    steps: int
    train_seconds: float
    tokens_per_s: float
    last_train_loss: float
    val: list[dict] = field(default_factory=list)
    train_curve: list[dict] = field(default_factory=list)
    milestones: list[int] = field(default_factory=list)
    skipped_nonfinite: int = 0
    first_loss: float | None = None
    optimizer_state: dict[str, dict] = field(default_factory=dict)


class NonFiniteLoss(RuntimeError):
    pass


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    bytes_per_token: float,
    amp: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Token-weighted validation loss, perplexity and bits per byte over the given batches."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total, count = 0.0, 0
    for batch in batches:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            nats, n = model.nll(_to(batch, device), generator=gen)
        total += float(nats)
        count += int(n)
    model.train(was_training)
    loss = total / max(count, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": loss / math.log(2) / bytes_per_token,
        "tokens": count,
    }


def train(
    model: torch.nn.Module,
    cfg: ResolvedTraining,
    *,
    sample_batch: Callable[[torch.Generator], dict],
    val_batches: Callable[[], Iterable[dict]],
    tokens_per_batch: int,
    bytes_per_token: float,
    save_milestone: Callable[[torch.nn.Module, int], None],
    log_metrics: Callable[[dict[str, float], int], None] = lambda m, s: None,
    after_clip: Callable[[torch.nn.Module, int], dict[str, float]] | None = None,
    max_nonfinite_in_a_row: int = 5,
    progress: bool = True,
    progress_file: Path | None = None,
    optimizer_state: dict[str, dict] | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimiser steps, saving every milestone."""
    from tqdm.auto import tqdm

    device = pick_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model.to(device)
    model.train()
    step_model: torch.nn.Module = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(model, cfg, device)
    if optimizer_state:
        carried = load_named_optimizer_state(model, optimizer, optimizer_state)
        log.info("carried AdamW moments over for %d of %d parameter tensors", carried,
                 sum(1 for p in model.parameters() if p.requires_grad))
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    milestones = set(cfg.milestones)

    result = TrainResult(steps=0, train_seconds=0.0, tokens_per_s=0.0, last_train_loss=float("nan"))
    bar = tqdm(total=cfg.max_steps, desc=cfg.model, unit="step", disable=not progress, dynamic_ncols=True)
    nonfinite_run = 0
    window_tokens, window_start = 0, time.perf_counter()
    start = time.perf_counter()
    tokens_per_s = 0.0
    started = time.time()

    def write_progress(done: int, state: str) -> None:
        if progress_file is None:
            return
        import json

        from sunfish.training.checkpoint import atomic_write_text

        elapsed = time.perf_counter() - start
        atomic_write_text(progress_file, json.dumps({
            "model": cfg.model, "state": state, "step": done, "max_steps": cfg.max_steps,
            "loss": result.last_train_loss, "val_loss": result.val[-1]["loss"] if result.val else None,
            "steps_per_min": 60.0 * done / elapsed if elapsed > 0 else None, "tokens_per_s": tokens_per_s,
            "milestones": sorted(milestones), "milestones_reached": list(result.milestones),
            "started": started, "updated": time.time(),
        }))

    write_progress(0, "running")
    for step in range(cfg.max_steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        extra: dict[str, float] = {}
        for _ in range(cfg.grad_accum_steps):
            batch = _to(sample_batch(gen), device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss, metrics = step_model.training_loss(batch)
            (loss / cfg.grad_accum_steps).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum_steps
            extra = metrics
        if not math.isfinite(loss_sum):
            optimizer.zero_grad(set_to_none=True)
            nonfinite_run += 1
            result.skipped_nonfinite += 1
            log.warning("step %d: non-finite loss %s, step skipped (%d in a row)", step + 1, loss_sum, nonfinite_run)
            log_metrics({"train/nonfinite_skipped": result.skipped_nonfinite}, step + 1)
            if nonfinite_run >= max_nonfinite_in_a_row:
                raise NonFiniteLoss(
                    f"{nonfinite_run} non-finite losses in a row at step {step + 1}: lower train.lr "
                    f"(now {cfg.lr}), keep train.grad_clip > 0, or run `sunfish diagnose`"
                )
            continue
        nonfinite_run = 0
        grad_norm = float("nan")
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        if after_clip is not None:
            extra = {**extra, **after_clip(model, step + 1)}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if result.first_loss is None:
            result.first_loss = loss_sum

        done = step + 1
        window_tokens += tokens_per_batch * cfg.grad_accum_steps
        result.last_train_loss = loss_sum
        if done % cfg.log_every == 0 or done == cfg.max_steps or done == 1:
            now = time.perf_counter()
            tokens_per_s = window_tokens / max(now - window_start, 1e-9)
            window_tokens, window_start = 0, now
            row = {"step": done, "loss": loss_sum, "lr": lr, "tokens_per_s": tokens_per_s}
            if math.isfinite(grad_norm):
                row["grad_norm"] = grad_norm
            result.train_curve.append(row)
            write_progress(done, "running")
            log_metrics(
                {"train/loss": loss_sum, "lr": lr, "tokens_per_s": tokens_per_s, "train/grad_norm": grad_norm,
                 **{f"train/{k}": v for k, v in extra.items()}},
                done,
            )
        if done % cfg.eval_every == 0 or done == cfg.max_steps or done in milestones:
            val = validate(model, val_batches(), device, bytes_per_token, amp)
            val["step"] = done
            result.val.append(val)
            log_metrics({"val/loss": val["loss"], "val/ppl": val["ppl"], "val/bpb": val["bpb"]}, done)
            model.train()
        if done in milestones:
            save_milestone(model, done)
            result.milestones.append(done)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
    bar.close()
    write_progress(cfg.max_steps, "finished")
    result.steps = cfg.max_steps
    result.optimizer_state = named_optimizer_state(model, optimizer)
    result.train_seconds = time.perf_counter() - start
    total_tokens = tokens_per_batch * cfg.grad_accum_steps * cfg.max_steps
    result.tokens_per_s = total_tokens / max(result.train_seconds, 1e-9)
    return result
