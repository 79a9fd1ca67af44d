"""Speed: how long will training take on this machine, and what does one step use at its peak?

A run that takes days should be known before it starts. A few real training steps at the configured
batch and train.threads (``SPEED_STEPS``, the first a warm-up on two rows) give the step time,
tokens/s, the ETA of max_steps and of every milestone, and the measured peak memory. An ETA over
``ETA_WARN_SECONDS`` warns, for one model and for the whole pipeline (``pipeline_eta``). Busy or
oversubscribed cores make several threads far slower than one, so on CPU one thread is timed too
and a warning says to set train.threads: 1 when it is much faster.

The probe runs the training loop's own step (sunfish.training.loop.backward_micro_batch, then
apply_update), with device syncs between the two halves so that the micro-batch and the optimiser
update are timed apart; it shares the loop's optimiser, lr schedule, autocast and thread settings.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from sunfish.config import MODEL_NAMES, Params, ResolvedTraining
from sunfish.diagnose.core import FAIL, OK, WARN, device_of, fmt_seconds, make_check, plural, to_device
from sunfish.diagnose.environment import available_memory

SPEED_STEPS = 2
ETA_WARN_SECONDS = 24 * 3600


def _rss_now() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss() -> int | None:
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024
    except (ImportError, OSError):
        return None


def measure_speed(
    model: nn.Module,
    tcfg: ResolvedTraining,
    sample_batch: Callable[[torch.Generator], dict],
    *,
    steps: int = SPEED_STEPS,
    estimate_mb: float | None = None,
    threads: int | None = None,
    name: str = "",
) -> list[dict]:
    """A few real training steps at the configured batch: step time, tokens/s, ETA, peak memory.

    The model is trained in place for ``steps`` steps (pass a copy if that matters): the first is a
    warm-up on two rows, the others are timed (the fastest counts). One step = ``grad_accum_steps``
    micro-batches: the micro-batch is timed and multiplied. Rows: ``<name>speed``,
    ``<name>eta`` (max_steps and every milestone) and ``<name>peak_memory``. ``threads``: intra-op
    threads during the measurement (as train.threads: 0 = one per core); None keeps the current.
    """
    from sunfish.training.loop import set_threads

    before = torch.get_num_threads()
    if threads is not None:
        set_threads(threads)
    try:
        return _measure_speed(model, tcfg, sample_batch, steps=steps, estimate_mb=estimate_mb, name=name)
    finally:
        torch.set_num_threads(before)


def _train_step(model, opt, batch, tcfg, step, amp, device) -> tuple[float, float]:
    """One micro-batch forward/backward and one optimiser step: (micro-batch seconds, optimiser seconds)."""
    from sunfish.training.loop import apply_update, backward_micro_batch, lr_at

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    backward_micro_batch(model.training_loss, batch, amp=amp, device=device)
    sync()
    mid = time.perf_counter()
    for group in opt.param_groups:
        group["lr"] = lr_at(step, tcfg)
    apply_update(model, opt, tcfg.grad_clip)
    sync()
    return mid - start, time.perf_counter() - mid


def _measure_speed(model, tcfg, sample_batch, *, steps, estimate_mb, name) -> list[dict]:
    from sunfish.training.loop import autocast_dtype, make_optimizer

    device = device_of(model)
    amp = autocast_dtype(tcfg.precision, device)
    model.train()
    opt = make_optimizer(model, tcfg, device)
    gen = torch.Generator().manual_seed(tcfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _rss_now()
    micro_times, opt_times = [], []
    tokens = tcfg.batch_size * tcfg.seq_len
    steps = max(2, steps)
    batch = None
    for step in range(steps):
        batch = to_device(sample_batch(gen), device)
        if step == 0:  # warm-up (kernels, allocator, optimiser state) on two rows: cheap, not timed
            warm = {k: (v[:2] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            _train_step(model, opt, warm, tcfg, step, amp, device)
            continue
        micro, opt_time = _train_step(model, opt, batch, tcfg, step, amp, device)
        micro_times.append(micro)
        opt_times.append(opt_time)
    threads = torch.get_num_threads()
    micro = min(micro_times)
    step_time = micro * tcfg.grad_accum_steps + min(opt_times)
    tokens_per_s = tokens * tcfg.grad_accum_steps / step_time
    details = {"step_seconds": round(step_time, 4), "micro_batch_seconds": [round(t, 4) for t in micro_times],
               "threads": threads}
    shape = (f"{tcfg.batch_size} x {tcfg.seq_len} tokens"
             f"{f' x {tcfg.grad_accum_steps} accumulation' if tcfg.grad_accum_steps > 1 else ''}")
    head = (f"{step_time:.2f} s per optimiser step ({shape}) = {tokens_per_s:,.0f} tokens/s on {device.type}, "
            f"{plural(threads, 'thread')}")
    speed_row = None
    if device.type == "cpu" and threads > 1:
        # busy or oversubscribed cores make several threads far slower than one: measure one thread too
        torch.set_num_threads(1)
        try:
            one_micro, one_opt = _train_step(model, opt, batch, tcfg, steps, amp, device)
        finally:
            torch.set_num_threads(threads)
        one_step = one_micro * tcfg.grad_accum_steps + one_opt
        details["single_thread_step_seconds"] = round(one_step, 4)
        if one_step < 0.7 * step_time:
            speed_row = make_check(f"{name}speed", WARN, round(tokens_per_s, 1), "no faster with 1 thread",
                                   f"{head}, but ONE thread takes only {one_step:.2f} s per step: the cores are busy "
                                   f"(other jobs) or oversubscribed, and {threads} threads spin waiting for each other. "
                                   f"Set train.threads: 1 (or free the cores); the ETA below assumes {threads} threads",
                                   details)
    if speed_row is None:
        speed_row = make_check(f"{name}speed", OK, round(tokens_per_s, 1),
                               "no faster with 1 thread" if "single_thread_step_seconds" in details
                               else "measured (the eta row judges it)", head, details)
    rows = [speed_row]
    eta = step_time * tcfg.max_steps
    per_milestone = {str(m): round(step_time * m, 1) for m in tcfg.milestones}
    text = (f"{tcfg.max_steps} steps ~ {fmt_seconds(eta)}; milestones "
            + ", ".join(f"{m}: {fmt_seconds(step_time * m)}" for m in tcfg.milestones)
            + " (training only; evaluation adds a little)")
    if eta > ETA_WARN_SECONDS:
        rows.append(make_check(f"{name}eta", WARN, round(eta, 1), f"<= {fmt_seconds(ETA_WARN_SECONDS)}",
                               f"{text}: more than a day on this machine; lower the max_steps of this model, pick a "
                               "smaller preset, or check the diagnose table before committing to it", per_milestone))
    else:
        rows.append(make_check(f"{name}eta", OK, round(eta, 1), f"<= {fmt_seconds(ETA_WARN_SECONDS)}", text, per_milestone))
    # peak memory of the step
    mb = 1024 * 1024
    avail, total, what = available_memory(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        source = "torch.cuda.max_memory_allocated"
    else:
        peak = _maxrss()
        source = "peak RSS of this process (getrusage)"
    details = {"source": source}
    if rss_before is not None and device.type != "cuda":
        details["rss_before_mb"] = round(rss_before / mb, 1)
    if estimate_mb is not None:
        details["estimate_mb"] = round(estimate_mb, 1)
    if peak is None:
        rows.append(make_check(f"{name}peak_memory", WARN, None, None, "could not measure the peak memory", details))
        return rows
    peak_mb = round(peak / mb, 1)
    limit = total if total else None
    if limit and peak > 0.9 * limit:
        rows.append(make_check(f"{name}peak_memory", FAIL if peak > limit else WARN, peak_mb,
                               f"<= 90% of {limit / mb:,.0f} MB",
                               f"one training step peaks at {peak_mb:,.0f} MB ({source}) of {limit / mb:,.0f} MB: lower "
                               "train.batch_size and raise train.grad_accum_steps", details))
    else:
        rows.append(make_check(f"{name}peak_memory", OK, peak_mb,
                               f"<= 90% of {limit / mb:,.0f} MB" if limit else None,
                               f"one training step peaks at {peak_mb:,.0f} MB ({source})"
                               + (f"; {avail / mb:,.0f} MB {what}" if avail else ""), details))
    return rows


def pipeline_eta(params: Params, speeds: dict[str, float]) -> dict | None:
    """The ``pipeline/eta`` row: every model's max_steps at its measured step time (stages not measured
    at the measured staged one), or None when nothing was measured."""
    staged_step = next((speeds[m] for m in ("stage_0", "stage_1", "stage_2", "stage_3") if m in speeds), None)
    parts, total, estimated = {}, 0.0, []
    for model in MODEL_NAMES:
        step = speeds.get(model)
        if step is None:
            if model == "cfg" or staged_step is None:
                continue
            step = staged_step
            estimated.append(model)
        seconds = step * params.training_for(model).max_steps
        parts[model] = round(seconds, 1)
        total += seconds
    if not parts:
        return None
    text = ", ".join(f"{m} {fmt_seconds(s)}" for m, s in parts.items())
    note = f" ({', '.join(estimated)} at the measured staged step time)" if estimated else ""
    status = WARN if total > ETA_WARN_SECONDS else OK
    message = f"training all models ~ {fmt_seconds(total)}: {text}{note}"
    if status == WARN:
        message += "; more than a day: lower train.max_steps or pick a smaller preset"
    return make_check("pipeline/eta", status, round(total, 1), f"<= {fmt_seconds(ETA_WARN_SECONDS)}", message, parts)
