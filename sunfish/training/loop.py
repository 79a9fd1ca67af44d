"""One training loop for every SunFish model.

The loop knows a model only through ``model.training_loss(batch)`` and ``model.nll(batch)``: the
staged stages and the diffusion model share warmup + cosine AdamW, gradient accumulation, clipping,
bf16 autocast on GPU, periodic validation, milestone checkpoints, a tqdm bar and metric logging.
Model-specific gradient work (K-1 credit assignment) plugs in through ``after_clip``.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sunfish.config import ResolvedTraining
from sunfish.errors import NonFiniteLoss, TrainingInterrupted
from sunfish.training.checkpoint import atomic_write_text
from sunfish.training.distributed import (
    DistInfo,
    LossModule,
    barrier,
    gather_objects,
    init_from_env,
    shard_rows,
    sum_across,
    wrap_ddp,
)
from sunfish.training.resume import ResumeCheckpoints, ResumePoint

log = logging.getLogger(__name__)


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    if requested == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use device: auto or cpu")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("train.device is 'mps' but MPS is not available; use device: auto or cpu")
    return torch.device(requested)


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16, AMX-BF16, ARM bf16): where bf16 autocast pays off.

    torch.cpu.get_capabilities() names the instruction sets on every OS; /proc/cpuinfo is the
    fallback (AVX512 alone, as on Skylake-X, has no bf16).
    """
    wanted = {"avx512_bf16", "amx_bf16", "bf16"}
    try:
        caps = torch.cpu.get_capabilities()
        found = any(bool(caps.get(k)) for k in wanted)
    except (AttributeError, RuntimeError):
        found = False
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
            found = bool(wanted & set(flags))
        except OSError:
            pass
    return found and torch.backends.mkldnn.is_available()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs and on CPUs with native bf16 (measured 1.82x the fp32 tokens/s on the
    2-core AVX512-BF16 machine, validation loss within 0.6% after equal steps: benchmarks/)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and (device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())):
        return torch.bfloat16
    return None


def busy_cores(samples: int = 5, interval: float = 0.05, path: str = "/proc/loadavg") -> int:
    """Cores other processes keep busy right now: runnable tasks in /proc/loadavg, minus this one.

    The median of a few samples, so a passing process does not count; 0 where /proc is absent.
    """
    import statistics

    counts = []
    for i in range(samples):
        try:
            with open(path, encoding="ascii") as fh:
                running = int(fh.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        counts.append(max(0, running - 1))
        if i < samples - 1:
            time.sleep(interval)
    return int(statistics.median(counts))


def set_threads(threads: int) -> int:
    """Intra-op threads. 0 = one per core not busy with other work.

    On the idle 2-core machine 2 threads trained 1.9x faster than 1, but with one core busy
    elsewhere 2 threads ran 7x slower than 1 (threads wait on each other): so the default counts
    the cores that are free now rather than all of them (benchmarks/bench_train.py).
    """
    import os

    cores = os.cpu_count() or 1
    n = threads or max(1, cores - busy_cores())
    torch.set_num_threads(n)
    if not threads:
        log.info("using %d of %d cores for intra-op threads", n, cores)
    return n


def lr_at(step: int, cfg: ResolvedTraining) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def backward_micro_batch(loss_fn: Callable[[dict], tuple[torch.Tensor, dict]], batch: dict, *,
                         amp: torch.dtype | None, device: torch.device, accumulate: int = 1
                         ) -> tuple[torch.Tensor, dict]:
    """One micro-batch of a training step: the forward under the training autocast, then the
    backward of loss / ``accumulate``. Returns the (unscaled) loss and the model's metrics. The
    training loop and the diagnose speed probe both step through here, so the probe times the
    step that trains."""
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        loss, metrics = loss_fn(batch)
    (loss / accumulate).backward()
    return loss, metrics


def apply_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                 after_clip: Callable[[], dict] | None = None) -> tuple[float, dict]:
    """The optimiser half of a training step: clip (when ``grad_clip`` > 0), let ``after_clip``
    read the clipped gradients, step and clear. Returns (gradient norm before clipping, or NaN when
    not clipped; what ``after_clip`` returned)."""
    grad_norm = float("nan")
    if grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    extra = after_clip() if after_clip is not None else {}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, extra


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
    resumed_from: int = 0
    threads: int = 0  # intra-op threads this run used (train.threads 0 counts the free cores)

    _SAVED = ("train_seconds", "last_train_loss", "val", "train_curve", "milestones", "skipped_nonfinite",
              "first_loss")

    def to_state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._SAVED}

    def restore(self, state: dict[str, Any]) -> None:
        for k in self._SAVED:
            if k in state:
                setattr(self, k, state[k])


@contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[dict]:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step; a second SIGINT
    stops at once (KeyboardInterrupt). Only possible from the main thread."""
    flag: dict[str, int | None] = {"signum": None}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["signum"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signum"] = signum
        log.warning("%s received: finishing this step, then writing a resume checkpoint "
                    "(press Ctrl-C again to stop at once)", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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
    dist: DistInfo | None = None,
) -> dict[str, float]:
    """Token-weighted validation loss, perplexity and bits per byte over the given batches.

    Under torch.distributed each rank scores every world_size-th batch and the sums are reduced.
    """
    dist = dist or DistInfo()
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed + dist.rank)
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        if i % dist.world_size != dist.rank:
            continue
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            nats, n = model.nll(_to(batch, device), generator=gen)
        total += float(nats)
        count += int(n)
    total, count = sum_across([total, count], dist, device)
    model.train(was_training)
    loss = total / max(count, 1)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": loss / math.log(2) / bytes_per_token,
        "tokens": int(count),
    }


def _trainer_state(optimizer, gen: torch.Generator, result: TrainResult, dist: DistInfo,
                   device: torch.device) -> dict[str, Any]:
    """Everything but the weights that a bit-identical continuation needs (all ranks must call)."""
    rng = gather_objects(torch.get_rng_state(), dist)
    cuda_rng = gather_objects(torch.cuda.get_rng_state(device), dist) if device.type == "cuda" else None
    return {
        "optimizer": optimizer.state_dict(),
        "rng": rng,
        "cuda_rng": cuda_rng,
        "data_rng": gen.get_state(),
        "world_size": dist.world_size,
        "result": result.to_state(),
    }


def _restore_trainer_state(state: dict[str, Any], optimizer, gen: torch.Generator, result: TrainResult,
                           dist: DistInfo, device: torch.device, seed: int) -> None:
    flags = [{k: g.get(k) for k in ("foreach", "fused")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)  # fused on GPU, foreach on CPU: the device decides, not the saved run
    gen.set_state(state["data_rng"])
    result.restore(state.get("result", {}))
    rng = state.get("rng") or []
    if len(rng) == dist.world_size:
        torch.set_rng_state(rng[dist.rank])
        cuda_rng = state.get("cuda_rng")
        if device.type == "cuda" and cuda_rng and len(cuda_rng) == dist.world_size:
            torch.cuda.set_rng_state(cuda_rng[dist.rank], device)
    else:  # another world size: data order is kept, per-rank noise is reseeded
        log.info("resuming %d-process state with %d processes: per-rank RNG reseeded", len(rng), dist.world_size)
        torch.manual_seed(seed + 7919 * int(state.get("step", 0)) + dist.rank)


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
    progress: bool = True,
    progress_file: Path | None = None,
    optimizer_state: dict[str, dict] | None = None,
    checkpoints: ResumeCheckpoints | None = None,
    resume: ResumePoint | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    handle_signals: bool = True,
) -> TrainResult:
    """Train ``model`` to ``cfg.max_steps`` optimiser steps, saving milestones and resume checkpoints.

    ``sample_batch(gen)`` returns one global micro-batch (``cfg.batch_size`` rows); under torchrun
    each rank keeps its own rows. With ``resume`` the run continues from that state exactly: the
    weights, AdamW moments, RNG streams and data position are restored, so the losses that follow
    are the ones an uninterrupted run would have produced.
    """
    from tqdm.auto import tqdm

    dist = init_from_env("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    device = pick_device(cfg.device, dist.local_rank)
    amp = autocast_dtype(cfg.precision, device)
    threads = set_threads(cfg.threads)
    torch.manual_seed(cfg.seed + dist.rank)
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, cfg, device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    milestones = set(cfg.milestones)
    result = TrainResult(steps=0, train_seconds=0.0, tokens_per_s=0.0, last_train_loss=float("nan"),
                         threads=threads)
    start_step = 0
    if resume is not None:
        if checkpoints is None:
            raise ValueError("resume needs the ResumeCheckpoints it came from")
        checkpoints.load_weights_into(model, resume)
        _restore_trainer_state(resume.state, optimizer, gen, result, dist, device, cfg.seed)
        start_step = result.resumed_from = resume.step
        log.info("%s: resumed at step %d of %d", cfg.model, start_step, cfg.max_steps)
    elif optimizer_state:
        carried = load_named_optimizer_state(model, optimizer, optimizer_state)
        log.info("carried AdamW moments over for %d of %d parameter tensors", carried,
                 sum(1 for p in model.parameters() if p.requires_grad))

    loss_module: torch.nn.Module = wrap_ddp(model, dist, device) if dist.enabled else LossModule(model)
    if cfg.compile:
        loss_module = torch.compile(loss_module)
    main = dist.is_main
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc=cfg.model, unit="step",
               disable=not (progress and main), dynamic_ncols=True)
    nonfinite_run = 0
    window_tokens, window_start = 0, time.perf_counter()
    session_start = time.perf_counter()
    seconds_before = result.train_seconds
    tokens_per_s = 0.0
    started = time.time()
    last_saved: int | None = None

    def write_progress(done: int, state: str) -> None:
        if progress_file is None or not main:
            return
        elapsed = time.perf_counter() - session_start
        atomic_write_text(progress_file, json.dumps({
            "model": cfg.model, "state": state, "step": done, "max_steps": cfg.max_steps,
            "loss": result.last_train_loss, "val_loss": result.val[-1]["loss"] if result.val else None,
            "steps_per_min": 60.0 * (done - start_step) / elapsed if elapsed > 0 and done > start_step else None,
            "tokens_per_s": tokens_per_s, "resumed_from": start_step or None,
            "milestones": sorted(milestones), "milestones_reached": list(result.milestones),
            "started": started, "updated": time.time(),
        }))

    def save_resume(done: int) -> Path | None:
        nonlocal last_saved
        if checkpoints is None or last_saved == done:
            return None if checkpoints is None else checkpoints.directory / f"step_{done}"
        result.train_seconds = seconds_before + time.perf_counter() - session_start
        state = _trainer_state(optimizer, gen, result, dist, device)
        path = None
        if main:
            path = checkpoints.save(model, state, done, extra=checkpoint_extra)
        barrier(dist)
        last_saved = done
        return path or checkpoints.directory / f"step_{done}"

    write_progress(start_step, "running")
    with stop_on_signals(handle_signals) as stop, bar:  # closing the bar on errors: messages start a line
        for step in range(start_step, cfg.max_steps):
            done = step + 1
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            extra: dict[str, float] = {}
            for micro in range(cfg.grad_accum_steps):
                batch = _to(shard_rows(sample_batch(gen), dist), device)
                sync = not dist.enabled or micro == cfg.grad_accum_steps - 1
                with (nullcontext() if sync else loss_module.no_sync()):
                    loss, metrics = backward_micro_batch(loss_module, batch, amp=amp, device=device,
                                                         accumulate=cfg.grad_accum_steps)
                loss_sum += float(loss.detach()) / cfg.grad_accum_steps
                extra = metrics
            stop_requested = stop["signum"] is not None
            if dist.enabled:  # one reduce: the mean loss, and whether any rank was asked to stop
                total, stops = sum_across([loss_sum, float(stop_requested)], dist, device)
                loss_sum, stop_requested = total / dist.world_size, stops > 0
            if not math.isfinite(loss_sum):
                optimizer.zero_grad(set_to_none=True)
                nonfinite_run += 1
                result.skipped_nonfinite += 1
                log.warning("step %d: non-finite loss %s, step skipped (%d in a row)", done, loss_sum, nonfinite_run)
                if main:
                    log_metrics({"train/nonfinite_skipped": result.skipped_nonfinite}, done)
                if nonfinite_run >= cfg.max_nonfinite_steps:
                    write_progress(step, "failed")
                    raise NonFiniteLoss(
                        f"{nonfinite_run} non-finite losses in a row at step {done}: lower train.lr "
                        f"(now {cfg.lr}), keep train.grad_clip > 0, or run `sunfish diagnose`"
                    )
            else:
                nonfinite_run = 0
                grad_norm, hooked = apply_update(model, optimizer, cfg.grad_clip,
                                                 (lambda: after_clip(model, done)) if after_clip is not None else None)
                extra = {**extra, **hooked}
                if result.first_loss is None:
                    result.first_loss = loss_sum
                result.last_train_loss = loss_sum
                window_tokens += tokens_per_batch * cfg.grad_accum_steps
                if done % cfg.log_every == 0 or done == cfg.max_steps or done == start_step + 1:
                    now = time.perf_counter()
                    tokens_per_s = window_tokens / max(now - window_start, 1e-9)
                    window_tokens, window_start = 0, now
                    row = {"step": done, "loss": loss_sum, "lr": lr, "tokens_per_s": tokens_per_s}
                    if math.isfinite(grad_norm):
                        row["grad_norm"] = grad_norm
                    result.train_curve.append(row)
                    write_progress(done, "running")
                    if main:
                        log_metrics(
                            {"train/loss": loss_sum, "lr": lr, "tokens_per_s": tokens_per_s,
                             "train/grad_norm": grad_norm, **{f"train/{k}": v for k, v in extra.items()}},
                            done,
                        )
            if done % cfg.eval_every == 0 or done == cfg.max_steps or done in milestones:
                val = validate(model, val_batches(), device, bytes_per_token, amp, dist=dist)
                val["step"] = done
                result.val.append(val)
                if main:
                    log_metrics({"val/loss": val["loss"], "val/ppl": val["ppl"], "val/bpb": val["bpb"],
                                 "val/tokens": val["tokens"]}, done)
                model.train()
            if done in milestones:
                if main:
                    save_milestone(model, done)
                result.milestones.append(done)
            if done % cfg.checkpoint_every == 0 or done in milestones or done == cfg.max_steps:
                save_resume(done)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            if stop_requested:
                bar.close()
                path = save_resume(done)
                write_progress(done, "interrupted")
                raise TrainingInterrupted(done, stop["signum"] or signal.SIGTERM, path)
    bar.close()
    write_progress(cfg.max_steps, "finished")
    result.steps = cfg.max_steps
    result.optimizer_state = named_optimizer_state(model, optimizer)
    session = time.perf_counter() - session_start
    result.train_seconds = seconds_before + session
    session_tokens = tokens_per_batch * cfg.grad_accum_steps * (cfg.max_steps - start_step)
    result.tokens_per_s = session_tokens / max(session, 1e-9) if session_tokens else 0.0
    if not result.tokens_per_s and result.train_curve:
        result.tokens_per_s = float(result.train_curve[-1].get("tokens_per_s", 0.0))
    return result
