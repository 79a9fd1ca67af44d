"""Diagnose a configuration before hours of training: is it going to learn anything?

People train for hours on a CPU and get gibberish with no idea why: a model far too large for the
steps it gets, a residual branch gated to 10% so that gradients barely flow, data that silently
failed to load, a prompt path that never trains. Each check here catches one such cause in
seconds, names it, and says which key of params.yaml to change.

``run_diagnostics(params, prepared_dir, models)`` runs every check for the chosen models on the
prepared data and returns::

    {"status": "ok" | "warn" | "fail", "counts": {"ok", "warn", "fail"},
     "checks": [{"name", "status", "value", "threshold", "message", "details"?, "seconds"?}],
     "environment": {...}, "models": [...], "seconds": float}

``format_table(report)`` renders it for a terminal. Every check is a small function that can be
called on its own with a model and a batch (the tests build deliberately broken models and data),
and a check that raises becomes a ``fail`` carrying the exception's message (``guarded``).

Check names are ``<scope>/<topic>``: ``data/...`` for the prepared data, ``<model>/...`` (stage_0,
stage_3, cfg) for a model, ``pipeline/eta`` and ``environment``. By default stage_0 and cfg get
every check and stage_3 (all components on) is built and checked for initialisation, gradient flow
and residual branches only (no memorisation, lr or speed probes).

What trains: every probe works on a deep copy, on small real batches (``PROBE_SHAPE``,
``MEMORIZE_SHAPE``, ``LR_SANITY_SHAPE``) and single-threaded on CPU (as fast for such batches, and
immune to busy cores); only the speed check uses the configured batch and ``train.threads``.

Thresholds (module constants; each message states the one it used)
-------------------------------------------------------------------
- gradients, over ``GRAD_PASSES`` backward passes separated by AdamW steps (more, up to
  ``GRAD_MAX_PASSES``, while a tensor has had none: branches used at random): a tensor that never
  gets a non-zero gradient (None, or exactly zero: cut from the loss) fails; NaN/inf fails;
  vanishing = every tensor of a module (e.g. ``blocks.1.attn``) below ``VANISHING_MEAN_ABS`` mean
  |grad| and ``VANISHING_RELATIVE`` times the median tensor's (the queries of identity-initialised
  attention alone start second-order small, which is fine); exploding = tensor norm above
  ``EXPLODING_NORM``. Zero-initialised output projections are by design: their own gradient is
  non-zero, and what sits behind them receives gradient once they have moved.
- residual branches, after ``RESIDUAL_STEPS`` training steps: ``||block(x) - x|| / ||x||`` below
  ``RESIDUAL_RATIO_MIN`` in every block warns (the network is nearly the identity); and the *gain*
  with which a block adds its branch outputs to the stream, fitted by least squares on the outputs
  of its Linear layers (exactly 1 for ``x + f(x)`` in any architecture, 0.1 for ``x + 0.1 * f(x)``),
  below ``RESIDUAL_GAIN_MIN`` in any block warns: a residual branch gated to ~0.1 was the original
  SunFish's worst bug, and its ratio (0.1 x a healthy 0.1..1) looks like a healthy one.
- memorisation: loss < diagnose.memorize_target on one batch within diagnose.memorize_steps
  (AdamW at ``MEMORIZE_LR``, scaled as 1 / d_model above ``MEMORIZE_LR_WIDTH``); the masked
  denoiser is scored on a fixed half-masked copy of the batch and also passes below
  ``MEMORIZE_RELATIVE`` x its first loss (see ``check_memorisation``).
- learning rate: the configured schedule must lower a held-out batch's loss by
  ``LR_SANITY_MIN_DROP`` within ``LR_SANITY_STEPS`` steps; a rise above ``LR_SANITY_DIVERGE`` fails.
- model size vs data: tokens seen per parameter (earlier stages included) below
  ``TOKENS_PER_PARAM_LOW`` or above ``TOKENS_PER_PARAM_HIGH`` warns (Chinchilla-optimal is about
  20); more than ``MAX_EPOCHS`` passes over the training split warns.
- data: special tokens above ``SPECIAL_SHARE_WARN`` / ``SPECIAL_SHARE_FAIL`` of the train stream;
  the unknown token above ``UNK_SHARE_WARN`` / ``UNK_SHARE_FAIL``; more than ``OVERLAP_WARN`` of
  sampled validation ``OVERLAP_NGRAM``-grams found in train.
- diffusion schedule: continuous, SNR(1) >= 1 and SNR(T) <= 0.01; masked, the training masking
  rates must reach ``MASK_RATE_LOW`` and ``MASK_RATE_HIGH``.
- effective batch below ``MIN_TOKENS_PER_STEP`` tokens per optimiser step warns.
- memory: the estimate (weights + gradients + 2 AdamW copies + activations + logits) above the
  available memory fails, above ``MEMORY_WARN_SHARE`` of it warns.
- speed: warns when one thread is faster than ``train.threads`` (busy or oversubscribed cores);
  an ETA over ``ETA_WARN_SECONDS`` warns.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import sys
import textwrap
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sunfish.config import MODEL_NAMES, ModelPreset, Params, ResolvedTraining

OK, WARN, FAIL = "ok", "warn", "fail"
_SEVERITY = {OK: 0, WARN: 1, FAIL: 2}

DEFAULT_MODELS = ("stage_0", "stage_3", "cfg")
LIGHT_BY_DEFAULT = ("stage_3",)  # built and checked for forward/backward only when not asked for explicitly

VANISHING_MEAN_ABS = 1e-6
VANISHING_RELATIVE = 1e-3  # ... and 1000x below the median tensor (see check_gradient_flow)
EXPLODING_NORM = 100.0
GRAD_PASSES = 3
GRAD_MAX_PASSES = 8  # more passes only while some tensor has not yet had a gradient (stochastic branches)
GRAD_WARM_LR = 1e-3
GRAD_LAYERS_SHOWN = 80  # per-layer gradient figures kept in the report's details
RESIDUAL_RATIO_MIN = 0.01
RESIDUAL_STEPS = 3
RESIDUAL_GAIN_MIN = 0.5  # a plain residual adds its branch with gain 1; the original gated it to ~0.1
RESIDUAL_WRITER_SHARE = 0.05  # Linear outputs fitted below 5% of the largest gain do not write to the stream
RESIDUAL_FIT_MAX_ERROR = 0.05  # the Linear outputs must explain block(x) - x to 5% for the gain to count
GATE_NAME_HINTS = ("gate", "scale", "alpha", "gamma", "rezero")
MEMORIZE_LR = {"staged": 3e-3, "diffusion": 1e-3}  # the tied-embedding denoiser oscillates at 3e-3 on one batch
MEMORIZE_LR_WIDTH = 256  # ... at d_model <= 256; wider models get lr x 256 / d_model (Adam's lr ~ 1 / width):
# at 3e-3 the micro preset (d_model 512) oscillates around loss 1 and never memorises; at 1.5e-3 it does in 21 steps
MEMORIZE_RELATIVE = {"diffusion": 0.3}  # see check_memorisation
MEMORIZE_SHAPE = (2, 32)  # rows x tokens of the one batch to overfit
PROBE_SHAPE = (4, 64)  # batch used for init / gradient / residual checks
LR_SANITY_STEPS = 20
LR_SANITY_SHAPE = (4, 64)
LR_SANITY_MIN_DROP = 0.01  # relative fall of a fixed held-out batch's loss
LR_SANITY_DIVERGE = 0.10
SPEED_STEPS = 2
SMALL_CHECK_THREADS = 1  # the probe-sized checks run single-threaded: as fast, and immune to busy cores
SMALL_CHECK_MAX_PARAMS = 20_000_000  # larger models use the training threads everywhere
HEAVY_PARAMS_CPU = 150_000_000  # above this, on CPU, the multi-step probes are skipped (minutes per step)
TOKENS_PER_PARAM_LOW = 0.05
TOKENS_PER_PARAM_HIGH = 2000.0
MAX_EPOCHS = 20.0
MIN_TOKENS_PER_STEP = 1024
SPECIAL_SHARE_WARN = 0.2
SPECIAL_SHARE_FAIL = 0.5
UNK_SHARE_WARN = 0.001
UNK_SHARE_FAIL = 0.05
UNK_NAMES = ("<unk>", "[UNK]", "<|unk|>", "<UNK>", "<|unknown|>")
OVERLAP_NGRAM = 32
OVERLAP_SAMPLES = 256
OVERLAP_WARN = 0.05
OVERLAP_MAX_SCAN = 20_000_000  # train tokens hashed at most (random chunks beyond that)
MEMORY_WARN_SHARE = 0.7
CONDITIONING_STEPS = 4
MASK_RATE_LOW = 0.05  # masked objective: training must reach nearly clean text ...
MASK_RATE_HIGH = 0.95  # ... and nearly fully masked text (where sampling starts)
CONDITIONING_MIN_DIFF = 1e-4
ETA_WARN_SECONDS = 24 * 3600

# which params.yaml section governs a model component (for remedies)
COMPONENT_KEYS = {
    "mu": "staged.mu",
    "temporal": "staged.temporal",
    "graph": "staged.graph",
    "prompt_encoder": "cfg.prompt_encoder / cfg.prompt_encoder_layers",
    "cross_attention": "cfg.conditioning_dropout",
    "timestep": "cfg.objective",
    "self_conditioning": "cfg.self_conditioning",
}


# ----------------------------------------------------------------------------------------------
# the check record


def make_check(
    name: str,
    status: str,
    value: Any = None,
    threshold: Any = None,
    message: str = "",
    details: dict | None = None,
) -> dict:
    """One row of the report. ``value``/``threshold``: a number, a short string or a small dict."""
    if status not in _SEVERITY:
        raise ValueError(f"status must be one of {list(_SEVERITY)}, got {status!r}")
    check = {"name": name, "status": status, "value": _plain(value), "threshold": _plain(threshold), "message": message}
    if details:
        check["details"] = _plain(details)
    return check


def _plain(x: Any) -> Any:
    """JSON-safe copy: tensors and numpy scalars to Python numbers, non-finite floats to strings."""
    if isinstance(x, torch.Tensor):
        x = x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def worst(statuses: Iterable[str]) -> str:
    out = OK
    for s in statuses:
        if _SEVERITY.get(s, 0) > _SEVERITY[out]:
            out = s
    return out


def guarded(row_name: str, fn: Callable[..., dict | list[dict]], /, *args: Any, **kwargs: Any) -> list[dict]:
    """Run one check; an exception becomes a ``fail`` row named ``row_name`` with the exception's message."""
    started = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    except Exception as exc:  # a broken input must give a failing row, never a crash
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        out = [make_check(row_name, FAIL, None, None, f"the check raised {type(exc).__name__}: {text}"[:600])]
    out = out if isinstance(out, list) else [out]
    if out:
        out[0]["seconds"] = round(time.perf_counter() - started, 3)  # time of the whole call, on its first row
    return out


@contextlib.contextmanager
def _seeded(seed: int):
    """Fixed global RNG inside (stochastic objectives draw from it), restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _component(model: nn.Module, name: str) -> str:
    fn = getattr(model, "component_of", None)
    if fn is None:
        return name.split(".")[0]
    try:
        return str(fn(name))
    except Exception:
        return "other"


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return str(s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _plural(n: Any, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _fmt_count(n: float) -> str:
    n = float(n)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


# ----------------------------------------------------------------------------------------------
# configuration checks


def check_heads(preset: ModelPreset, key: str, name: str = "config_heads") -> dict:
    """n_head divides d_model, and the head width is even (RoPE rotates pairs)."""
    value = {"d_model": preset.d_model, "n_head": preset.n_head}
    if preset.n_head <= 0 or preset.d_model % preset.n_head:
        choices = [h for h in range(1, 33) if preset.d_model % h == 0 and (preset.d_model // h) % 2 == 0]
        return make_check(name, FAIL, value, "d_model % n_head == 0",
                          f"{key}.n_head={preset.n_head} does not divide {key}.d_model={preset.d_model}; "
                          f"set {key}.n_head to one of {choices}")
    width = preset.d_model // preset.n_head
    if width % 2:
        return make_check(name, FAIL, value, "even head width",
                          f"head width {key}.d_model/n_head = {width} is odd; RoPE needs an even width: "
                          f"change {key}.n_head or {key}.d_model")
    return make_check(name, OK, value, "d_model % n_head == 0, even head width", f"{preset.n_head} heads of width {width}")


def check_seq_len(tcfg: ResolvedTraining, preset: ModelPreset, key: str, name: str = "config_seq_len") -> dict:
    """The training window fits the model's block size (the preset's seq_len)."""
    if tcfg.seq_len > preset.seq_len:
        return make_check(name, FAIL, tcfg.seq_len, f"<= {preset.seq_len}",
                          f"train.seq_len={tcfg.seq_len} exceeds {key}.seq_len={preset.seq_len} (the block size the "
                          f"model is built for); set train.seq_len <= {preset.seq_len} or raise {key}.seq_len")
    return make_check(name, OK, tcfg.seq_len, f"<= {preset.seq_len}",
                      f"training windows of {tcfg.seq_len} tokens; the model is built for {preset.seq_len}")


def check_vocab(
    model_vocab: int,
    tokenizer_vocab: int,
    max_token_id: int | None = None,
    *,
    key: str = "presets.<preset>.vocab_size",
    configured_vocab: int | None = None,
    prepared_with: int | None = None,
    name: str = "config_vocab",
) -> dict:
    """The model's vocabulary covers every id the tokenizer (and the data) can produce.

    Fewer rows than ids crash or silently alias tokens (the original clipped GPT-2 ids into 8192);
    many unused rows waste the output layer. ``configured_vocab`` (tokenizer.vocab_size) against
    ``prepared_with`` (the size meta.json says data/prepared was built for) detects stale data.
    """
    value = {"model": model_vocab, "tokenizer": tokenizer_vocab}
    if max_token_id is not None:
        value["max_token_id"] = int(max_token_id)
    needed = max(tokenizer_vocab, (max_token_id + 1) if max_token_id is not None else 0)
    if model_vocab < needed:
        what = (f"the data holds token id {max_token_id}" if max_token_id is not None and max_token_id >= tokenizer_vocab
                else f"the tokenizer has {tokenizer_vocab} tokens")
        return make_check(name, FAIL, value, f">= {needed}",
                          f"the model has only {model_vocab} vocabulary rows but {what}: ids beyond the table crash or "
                          f"are clipped into wrong tokens. Set {key}: null (use the tokenizer's) or >= {needed}, or "
                          f"lower tokenizer.vocab_size and rerun prepare")
    if max_token_id is not None and max_token_id >= tokenizer_vocab:
        return make_check(name, FAIL, value, f"< {tokenizer_vocab}",
                          f"the token files hold id {max_token_id} but the tokenizer has {tokenizer_vocab} tokens: "
                          "data/prepared is inconsistent; rerun `dvc repro prepare`")
    if configured_vocab is not None and prepared_with is not None and configured_vocab != prepared_with:
        return make_check(name, WARN, value, f"tokenizer.vocab_size={configured_vocab}",
                          f"data/prepared was built with tokenizer.vocab_size={prepared_with} but params.yaml says "
                          f"{configured_vocab}: the prepared data is stale; rerun `dvc repro prepare`")
    if model_vocab > 1.5 * tokenizer_vocab:
        return make_check(name, WARN, value, f"<= 1.5 x {tokenizer_vocab}",
                          f"the model has {model_vocab} output rows for {tokenizer_vocab} tokens: "
                          f"{model_vocab - tokenizer_vocab} rows are never a target and cost compute; set {key}: null "
                          f"or tokenizer.vocab_size: {model_vocab}")
    return make_check(name, OK, value, f">= {needed}", f"{model_vocab} vocabulary rows for {tokenizer_vocab} tokenizer ids")


def check_milestones(params: Params, model: str, name: str = "config_milestones") -> dict:
    """Configured milestones lie within the model's max_steps (beyond it they are silently dropped)."""
    tcfg = params.training_for(model)
    budget = params.budget_for(model)
    where = "cfg.budget" if model == "cfg" else f"staged.{model}"
    raw = budget.milestones if budget.milestones is not None else params.train.milestones
    raw_key = f"{where}.milestones" if budget.milestones is not None else "train.milestones"
    if budget.max_steps is not None and budget.milestones is None:
        raw = []  # train.milestones are rescaled to the model's own max_steps: nothing is dropped
    beyond = [m for m in raw if m > tcfg.max_steps]
    value = {"milestones": list(tcfg.milestones), "max_steps": tcfg.max_steps}
    if beyond:
        return make_check(name, WARN, value, f"<= {tcfg.max_steps}",
                          f"{raw_key} {beyond} lie beyond max_steps={tcfg.max_steps} and will never be saved; "
                          f"raise {where}.max_steps (or train.max_steps) or drop them")
    if any(m < 1 for m in tcfg.milestones):
        return make_check(name, FAIL, value, ">= 1", f"{raw_key}: milestones must be positive step numbers")
    return make_check(name, OK, value, f"<= {tcfg.max_steps}",
                      f"checkpoints at steps {', '.join(map(str, tcfg.milestones))}")


def check_effective_batch(tcfg: ResolvedTraining, name: str = "config_effective_batch") -> dict:
    """Tokens per optimiser step = batch_size x grad_accum_steps x seq_len."""
    tokens = tcfg.batch_size * tcfg.grad_accum_steps * tcfg.seq_len
    value = tokens
    text = (f"{tcfg.batch_size} x {tcfg.grad_accum_steps} accumulation x {tcfg.seq_len} tokens = "
            f"{tokens:,} tokens per optimiser step")
    if tokens < MIN_TOKENS_PER_STEP:
        return make_check(name, WARN, value, f">= {MIN_TOKENS_PER_STEP}",
                          f"{text}: very noisy gradients; raise train.batch_size or train.grad_accum_steps "
                          f"(accumulation costs no memory)")
    return make_check(name, OK, value, f">= {MIN_TOKENS_PER_STEP}", text)


def check_graph_window(params: Params, model: str, name: str = "config_graph") -> dict:
    """Stage 3: graph routing must leave something out, or graph attention equals full attention and
    the gate that blends them gets exactly zero gradient (it can never learn)."""
    g = params.staged.graph
    seq = params.training_for(model).seq_len
    value = {"window": g.window, "seq_len": seq}
    if g.window >= seq - 1:
        return make_check(name, FAIL, value, f"window < {seq - 1}",
                          f"staged.graph.window={g.window} covers the whole training window (train.seq_len={seq}): "
                          "every query already sees every earlier token, so graph attention equals full attention, "
                          f"the graph gate gets zero gradient and stage 3 adds nothing; set staged.graph.window to about "
                          f"{max(1, seq // 4)}")
    return make_check(name, OK, value, f"window < {seq - 1}",
                      f"local band of {g.window} + {g.shortcuts} shortcuts + top-{g.top_k} similar tokens out of up to {seq}")


@dataclass
class LayerSpec:
    """Activation-relevant shape of one kind of layer: ``count`` layers over ``tokens_per_row``."""

    count: int
    width: int
    d_ff: int
    heads: int
    keys: int  # attention length (keys per query)
    tokens_per_row: int


def estimate_training_memory(
    n_params: int,
    layers: list[LayerSpec],
    *,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    activation_bytes: int = 4,
    optimizer_copies: int = 2,
) -> dict[str, float]:
    """Bytes of one training step: weights, gradients, AdamW state, activations kept for backward, logits.

    Activations per layer and token ~ 10 x width (norms, q/k/v, attention output, residual) + 2 x d_ff
    (MLP up and GELU) + 2 x heads x keys (attention scores and probabilities, math backend). A rough
    estimate (+-50%): the speed check measures the real peak.
    """
    weights = 4 * n_params
    grads = 4 * n_params
    optimizer = 4 * n_params * optimizer_copies
    acts = 0
    for spec in layers:
        per_token = 10 * spec.width + 2 * spec.d_ff + 2 * spec.heads * spec.keys
        acts += spec.count * batch_size * spec.tokens_per_row * per_token * activation_bytes
    logits = batch_size * seq_len * vocab_size * 4 * 3  # logits, float log-softmax, their gradient
    total = weights + grads + optimizer + acts + logits
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": acts,
            "logits": logits, "total": total}


def available_memory(device: torch.device) -> tuple[int | None, int | None, str]:
    """(available bytes, total bytes, what) of the device's memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total), "free GPU memory"
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, rest = line.split(":", 1)
                info[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    avail, total = info.get("MemAvailable"), info.get("MemTotal")
    if avail is None:
        try:
            import psutil  # optional

            vm = psutil.virtual_memory()
            avail, total = int(vm.available), int(vm.total)
        except Exception:
            try:
                page = os.sysconf("SC_PAGE_SIZE")
                avail = os.sysconf("SC_AVPHYS_PAGES") * page
                total = os.sysconf("SC_PHYS_PAGES") * page
            except (ValueError, OSError, AttributeError):
                return None, None, "available RAM"
    return avail, total, "available RAM"


def check_memory_fit(
    estimate: dict[str, float],
    available: int | None,
    *,
    what: str = "available RAM",
    preset_key: str = "presets.<preset>",
    name: str = "config_memory_fit",
) -> dict:
    """The estimated memory of one training step against the device's available memory."""
    mb = 1024 * 1024
    total = estimate["total"]
    value = round(total / mb, 1)
    details = {k: round(v / mb, 1) for k, v in estimate.items()}
    breakdown = (f"weights {details['weights']:.0f} MB + gradients {details['gradients']:.0f} + AdamW "
                 f"{details['optimizer']:.0f} + activations {details['activations']:.0f} + logits {details['logits']:.0f}")
    if available is None:
        return make_check(name, WARN, value, None, f"estimated {value:,.0f} MB per training step ({breakdown}); "
                          "could not read the available memory", details)
    avail_mb = round(available / mb, 1)
    details["available"] = avail_mb
    if total > available:
        return make_check(name, FAIL, value, f"<= {avail_mb:,.0f} MB",
                          f"one training step needs about {value:,.0f} MB ({breakdown}) but only {avail_mb:,.0f} MB "
                          f"{what} is left: lower train.batch_size (keep the tokens per step with "
                          f"train.grad_accum_steps), train.seq_len, or use a smaller preset than {preset_key}", details)
    if total > MEMORY_WARN_SHARE * available:
        return make_check(name, WARN, value, f"<= {MEMORY_WARN_SHARE:.0%} of {avail_mb:,.0f} MB",
                          f"one training step needs about {value:,.0f} MB ({breakdown}), close to the {avail_mb:,.0f} MB "
                          f"{what}; lower train.batch_size and raise train.grad_accum_steps to be safe", details)
    return make_check(name, OK, value, f"<= {avail_mb:,.0f} MB",
                      f"about {value:,.0f} MB per training step ({breakdown}) of {avail_mb:,.0f} MB {what}", details)


# ----------------------------------------------------------------------------------------------
# data checks


def sequences_in(tokens: int, seq_len: int) -> int:
    """Training sequences in a stream of ``tokens``: windows of ``seq_len`` inputs whose targets are the
    next tokens, laid end to end (each needs seq_len + 1 tokens, neighbours share one): (tokens - 1) // seq_len."""
    return max(0, int(tokens) - 1) // seq_len


def check_splits(
    splits: dict[str, dict[str, int]],
    seq_len: int,
    name: str = "data_splits",
    *,
    sequences_drawn: int | None = None,
) -> list[dict]:
    """Documents, tokens and training sequences per split; train and val must hold windows.

    ``splits``: {"train": {"documents", "tokens"}, "val": {...}} (tokens as found in the token files).
    Sequences are the distinct non-overlapping training windows (:func:`sequences_in`); training
    draws random windows (``TokenStream.sample_batch``), ``sequences_drawn`` of them over the run
    (batch_size x grad_accum_steps x max_steps), i.e. that many / sequences epochs.
    Returns two rows: ``<name>`` (train) and ``data/val_split``.
    """
    value = {}
    for split, info in splits.items():
        value[f"{split}_documents"] = int(info.get("documents", 0) or 0)
        value[f"{split}_tokens"] = int(info.get("tokens", 0) or 0)
        value[f"{split}_sequences"] = sequences_in(int(info.get("tokens", 0) or 0), seq_len)
    details = {}
    rows = []
    train = splits.get("train", {})
    n_train = int(train.get("tokens", 0) or 0)
    n_seq = sequences_in(n_train, seq_len)
    drawn = ""
    if sequences_drawn is not None:
        details["sequences_drawn"] = int(sequences_drawn)
        if n_seq:
            details["epochs"] = round(sequences_drawn / n_seq, 3)
            drawn = f"; the run draws {sequences_drawn:,} random windows = {sequences_drawn / n_seq:.2g} epochs"
    if n_train < seq_len + 1:
        rows.append(make_check(name, FAIL, value, f"train tokens > seq_len={seq_len}",
                               f"the train split holds {n_train} tokens, not one window of train.seq_len={seq_len} + 1: "
                               "the corpus failed to load or is tiny; check data.source / data.max_documents and rerun "
                               "`dvc repro prepare`", details))
    else:
        rows.append(make_check(name, OK, value, f"train tokens > seq_len={seq_len}",
                               f"train: {value.get('train_documents', 0):,} documents, {n_train:,} tokens, "
                               f"{n_seq:,} sequences of {seq_len} (+1 target){drawn}", details))
    val = splits.get("val", {})
    n_val = int(val.get("tokens", 0) or 0)
    vname = name.rsplit("/", 1)[0] + "/val_split" if "/" in name else "val_split"
    if n_val < seq_len + 1:
        status = FAIL if n_val < 2 else WARN
        rows.append(make_check(vname, status, n_val, f"> {seq_len} tokens",
                               f"the val split holds {n_val} tokens ({value.get('val_documents', 0)} documents), "
                               f"{'nothing to evaluate' if n_val < 2 else 'less than one window'}: raise "
                               "data.val_fraction (or data.max_documents) and rerun prepare"))
    else:
        rows.append(make_check(vname, OK, n_val, f"> {seq_len} tokens",
                               f"val: {value.get('val_documents', 0):,} documents, {n_val:,} tokens, "
                               f"{sequences_in(n_val, seq_len):,} sequences"))
    return rows


def check_batch_content(batch: dict, name: str = "data_batch_content") -> dict:
    """A sampled training batch is neither empty nor one token repeated (data that failed silently)."""
    ids = batch.get("input_ids", batch.get("text_ids"))
    if ids is None or ids.numel() == 0:
        return make_check(name, FAIL, 0, "> 0 tokens", "the sampled batch is empty: the token file holds no data; "
                          "rerun `dvc repro prepare` and check data.source")
    real = ids
    mask = batch.get("text_mask")
    if mask is not None:
        real = ids[mask.bool()]
    if real.numel() == 0:
        return make_check(name, FAIL, 0, "> 0 real tokens", "every position of the sampled batch is padding: the "
                          "texts are empty; check data.source and rerun prepare")
    distinct = int(torch.unique(real).numel())
    value = {"distinct_tokens": distinct, "tokens": int(real.numel())}
    if distinct <= 1:
        return make_check(name, FAIL, value, ">= 2 distinct tokens",
                          f"the sampled batch is one token (id {int(real.flatten()[0])}) repeated: the data failed to "
                          "load or tokenize (all zeros?); inspect data/prepared/train.bin, check data.source and rerun "
                          "`dvc repro prepare`")
    if distinct < min(16, real.numel() // 4):
        return make_check(name, WARN, value, ">= 16 distinct tokens",
                          f"only {distinct} distinct tokens in {real.numel()} sampled: the text is degenerate; "
                          "check data.source")
    return make_check(name, OK, value, ">= 2 distinct tokens", f"{distinct} distinct ids in {real.numel()} sampled tokens")


def check_special_tokens(tokens: np.ndarray, special_ids: dict[str, int], name: str = "data_special_tokens") -> dict:
    """Share of special tokens (eos, pad) in the train stream: documents far too short, or padding."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return make_check(name, FAIL, None, f"< {SPECIAL_SHARE_FAIL:.0%}", "the train stream is empty")
    shares = {k: float(np.count_nonzero(tokens == v)) / tokens.size for k, v in special_ids.items()}
    ids = sorted(set(special_ids.values()))
    share = float(np.isin(tokens, ids).sum()) / tokens.size
    value = round(share, 4)
    details = {f"{k}_share": round(v, 4) for k, v in shares.items()}
    docs = shares.get("eos", 0.0)
    text = ", ".join(f"{k} {v:.1%}" for k, v in shares.items())
    if share >= SPECIAL_SHARE_FAIL:
        return make_check(name, FAIL, value, f"< {SPECIAL_SHARE_FAIL:.0%}",
                          f"{share:.0%} of the train tokens are special ({text}): the documents are empty or the "
                          "data failed to load; check data.source (and data.hf_text_field) and rerun prepare", details)
    if share >= SPECIAL_SHARE_WARN:
        return make_check(name, WARN, value, f"< {SPECIAL_SHARE_WARN:.0%}",
                          f"{share:.0%} of the train tokens are special ({text}): documents average "
                          f"{1 / max(docs, 1e-9):.1f} tokens; the model mostly learns to end documents. Check how "
                          "data.source splits documents", details)
    return make_check(name, OK, value, f"< {SPECIAL_SHARE_WARN:.0%}", f"special tokens: {text}", details)


def unknown_token_id(tokenizer: Any) -> int | None:
    """The tokenizer's unknown-token id, or None (byte-level BPE has none: every byte is a token).

    ``tokenizer.unk_id`` when set; else the model's ``unk_token`` of a ``tokenizers`` tokenizer, or
    one of the usual names (``<unk>``, ``[UNK]``...) in its vocabulary.
    """
    explicit = getattr(tokenizer, "unk_id", None)
    if explicit is not None:
        return int(explicit)
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    to_id = getattr(inner, "token_to_id", None)
    if to_id is None:
        return None
    names = [getattr(getattr(inner, "model", None), "unk_token", None), *UNK_NAMES]
    for n in names:
        if n:
            token_id = to_id(n)
            if token_id is not None:
                return int(token_id)
    return None


def check_unknown_tokens(
    tokenizer: Any,
    tokens: np.ndarray | None,
    texts: list[str] = (),
    name: str = "data_unknown_tokens",
) -> dict:
    """Share of the unknown token in the train stream (and in sample texts): text the tokenizer cannot
    represent is learnt as one meaningless token and generated back as such."""
    unk = unknown_token_id(tokenizer)
    threshold = f"< {UNK_SHARE_WARN:.1%}"
    if unk is None:
        return make_check(name, OK, 0.0, threshold,
                          "the tokenizer has no unknown token (byte-level: every text is representable)")
    details: dict[str, Any] = {"unk_id": unk}
    share = None
    if tokens is not None and np.asarray(tokens).size:
        tokens = np.asarray(tokens)
        share = float(np.count_nonzero(tokens == unk)) / tokens.size
        details["train_share"] = round(share, 5)
    if texts:
        ids = [i for t in texts for i in tokenizer.encode(t)]
        text_share = sum(1 for i in ids if i == unk) / max(len(ids), 1)
        details["sample_text_share"] = round(text_share, 5)
        share = text_share if share is None else share
    if share is None:
        return make_check(name, OK, None, threshold, f"unknown token id {unk}; nothing to measure", details)
    value = round(share, 5)
    if share >= UNK_SHARE_FAIL:
        return make_check(name, FAIL, value, f"< {UNK_SHARE_FAIL:.0%}",
                          f"{share:.1%} of the train tokens are the unknown token (id {unk}): the tokenizer cannot "
                          "represent much of the corpus, so the model learns to predict 'unknown'; use tokenizer.kind: "
                          "bpe (byte-level, trained on this corpus) and rerun `dvc repro prepare`", details)
    if share >= UNK_SHARE_WARN:
        return make_check(name, WARN, value, threshold,
                          f"{share:.2%} of the train tokens are the unknown token (id {unk}); tokenizer.kind: bpe "
                          "never produces one", details)
    return make_check(name, OK, value, threshold, f"{share:.3%} unknown tokens (id {unk})", details)


def check_tokenizer_roundtrip(tokenizer: Any, texts: list[str], name: str = "data_tokenizer_roundtrip") -> dict:
    """decode(encode(text)) == text for sample texts, and every id lies inside the vocabulary."""
    bad, spacing = [], []
    n_tokens = 0
    vocab = int(tokenizer.vocab_size)
    for text in texts:
        ids = tokenizer.encode(text)
        n_tokens += len(ids)
        if any(i < 0 or i >= vocab for i in ids):
            bad.append(f"ids outside 0..{vocab - 1} for {text[:40]!r}")
            continue
        back = tokenizer.decode(ids)
        if back != text:
            (spacing if back.split() == text.split() else bad).append(f"{text[:40]!r} -> {back[:40]!r}")
    chars = sum(len(t) for t in texts)
    value = {"texts": len(texts), "chars_per_token": round(chars / max(n_tokens, 1), 2)}
    if bad:
        return make_check(name, FAIL, value, "exact round trip",
                          f"{len(bad)} of {len(texts)} texts do not survive encode/decode ({bad[0]}): the tokenizer "
                          "loses text, so the model learns (and is scored on) something else; use tokenizer.kind: bpe "
                          "(byte-level, lossless) and rerun prepare")
    if spacing:
        return make_check(name, WARN, value, "exact round trip",
                          f"{len(spacing)} of {len(texts)} texts come back with different whitespace ({spacing[0]}); "
                          "tokenizer.kind: bpe is lossless")
    return make_check(name, OK, value, "exact round trip",
                      f"{len(texts)} sample texts round-trip exactly ({value['chars_per_token']} characters per token)")


def _ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash (wrapping uint64) of every n-gram: [len - n + 1]."""
    t = np.asarray(tokens, dtype=np.uint64)
    if t.size < n:
        return np.zeros(0, dtype=np.uint64)
    base = np.uint64(1_000_003)
    h = np.zeros(t.size - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * base + t[j : j + h.size] + np.uint64(1)
    return h


def check_val_overlap(
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    *,
    n: int = OVERLAP_NGRAM,
    samples: int = OVERLAP_SAMPLES,
    seed: int = 0,
    name: str = "data_val_overlap",
) -> dict:
    """Share of sampled validation n-grams that also occur in train (duplicated documents leak)."""
    val_tokens = np.asarray(val_tokens)
    train_tokens = np.asarray(train_tokens)
    if val_tokens.size < n or train_tokens.size < n:
        return make_check(name, OK, None, f"< {OVERLAP_WARN:.0%}", f"splits shorter than {n} tokens: nothing to compare")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, val_tokens.size - n + 1, size=min(samples, val_tokens.size - n + 1))
    windows = np.stack([val_tokens[s : s + n] for s in starts]).astype(np.uint64)
    sample_hashes = np.zeros(windows.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # the same hash as _ngram_hashes, one per sampled window
            sample_hashes = sample_hashes * np.uint64(1_000_003) + windows[:, j] + np.uint64(1)
    found = np.zeros(sample_hashes.size, dtype=bool)
    scanned = 0
    chunk = 1_000_000
    n_chunks = math.ceil(train_tokens.size / chunk)
    order = np.arange(n_chunks)
    if train_tokens.size > OVERLAP_MAX_SCAN:
        order = rng.permutation(n_chunks)[: max(1, OVERLAP_MAX_SCAN // chunk)]
    for c in order:
        lo = int(c) * chunk
        part = train_tokens[lo : lo + chunk + n - 1]
        found |= np.isin(sample_hashes, _ngram_hashes(part, n))
        scanned += min(chunk, train_tokens.size - lo)
    share = float(found.mean())
    coverage = scanned / train_tokens.size
    value = round(share, 4)
    details = {"ngram": n, "samples": int(sample_hashes.size), "train_coverage": round(coverage, 3)}
    if share > OVERLAP_WARN:
        return make_check(name, WARN, value, f"<= {OVERLAP_WARN:.0%}",
                          f"{share:.0%} of {sample_hashes.size} sampled validation {n}-token windows also occur in train"
                          f"{'' if coverage >= 1 else f' (scanned {coverage:.0%} of train)'}: duplicated documents make "
                          "validation loss optimistic; deduplicate data.source or use data.split: tail", details)
    return make_check(name, OK, value, f"<= {OVERLAP_WARN:.0%}",
                      f"{share:.1%} of {sample_hashes.size} sampled validation {n}-grams occur in train", details)


def check_pairs(pairs: dict[str, list[dict]], name: str = "data_pairs") -> dict:
    """Prompt/text pairs exist for both splits and the prompts are not empty (else the prompt path never trains)."""
    counts = {k: len(v) for k, v in pairs.items()}
    value = dict(counts)
    train = pairs.get("train", [])
    if not train:
        return make_check(name, FAIL, value, "> 0 train pairs",
                          "no prompt/text pairs for the cfg model: pairs_train.jsonl is empty, so the diffusion model "
                          "has nothing to learn from; check data.source / data.max_pairs_per_document and rerun prepare")
    with_prompt = sum(1 for r in train if str(r.get("prompt", "")).strip())
    with_text = sum(1 for r in train if str(r.get("text", "")).strip())
    value["prompt_share"] = round(with_prompt / len(train), 3)
    if with_text < len(train) / 2:
        return make_check(name, FAIL, value, "texts not empty",
                          f"{len(train) - with_text} of {len(train)} train pairs have an empty text; rerun prepare")
    if with_prompt < len(train) / 2:
        return make_check(name, FAIL, value, ">= 50% non-empty prompts",
                          f"only {with_prompt} of {len(train)} train pairs have a prompt: the prompt path would barely "
                          "train; check data.source and rerun prepare")
    if not pairs.get("val"):
        return make_check(name, WARN, value, "> 0 val pairs",
                          "no validation pairs: prompt adherence cannot be measured; raise data.val_fraction")
    return make_check(name, OK, value, "> 0 pairs, prompts present",
                      f"{counts.get('train', 0):,} train / {counts.get('val', 0):,} val pairs, "
                      f"{value['prompt_share']:.0%} with a prompt")


# ----------------------------------------------------------------------------------------------
# model checks


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per component (``model.component_of``); tied tensors count once."""
    counts: dict[str, int] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            comp = _component(model, n)
            counts[comp] = counts.get(comp, 0) + p.numel()
    return counts


def check_size_vs_data(
    model: nn.Module,
    tokens_per_step: int,
    max_steps: int,
    train_tokens: int | None = None,
    *,
    earlier_tokens: int = 0,
    preset_key: str = "presets.<preset>",
    steps_key: str = "train.max_steps",
    name: str = "size_vs_data",
) -> dict:
    """Parameters by component and tokens per parameter over the run (Chinchilla-optimal ~ 20).

    ``earlier_tokens``: tokens the weights saw in earlier stages they continue from (stage N
    warm-starts from stage N-1).
    """
    counts = parameter_counts(model)
    n_params = sum(counts.values())
    seen = tokens_per_step * max_steps + earlier_tokens
    tpp = seen / max(n_params, 1)
    value = round(tpp, 4)
    details = {"parameters": n_params, "tokens_seen": seen, **{f"params_{k}": v for k, v in counts.items()}}
    by_comp = ", ".join(f"{k} {_fmt_count(v)}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    epochs = None
    if train_tokens:
        epochs = seen / train_tokens
        details["epochs"] = round(epochs, 2)
    head = (f"{_fmt_count(n_params)} parameters ({by_comp}); {max_steps} steps x {tokens_per_step:,} tokens"
            + (f" + {_fmt_count(earlier_tokens)} from earlier stages" if earlier_tokens else "")
            + f" = {_fmt_count(seen)} tokens, {tpp:.3g} per parameter")
    threshold = f"{TOKENS_PER_PARAM_LOW:g}..{TOKENS_PER_PARAM_HIGH:g} (optimal ~20)"
    if n_params == 0:
        return make_check(name, FAIL, 0, threshold, "the model has no trainable parameters", details)
    if tpp < TOKENS_PER_PARAM_LOW:
        return make_check(name, WARN, value, threshold,
                          f"{head}: far too few tokens for this model size, it will stay undertrained (gibberish); "
                          f"raise {steps_key} at least {math.ceil(TOKENS_PER_PARAM_LOW / tpp)}x (Chinchilla-optimal "
                          f"~20 tokens/parameter would be {20 / tpp:.0f}x), or pick a smaller preset than {preset_key}",
                          details)
    if tpp > TOKENS_PER_PARAM_HIGH:
        return make_check(name, WARN, value, threshold,
                          f"{head}: the model is far too small for this much training; a larger preset than "
                          f"{preset_key} would learn much more from the same steps", details)
    if epochs is not None and epochs > MAX_EPOCHS:
        return make_check(name, WARN, value, threshold,
                          f"{head}, but that is {epochs:.0f} passes over the {train_tokens:,}-token train split: it "
                          f"will memorise the corpus; use more data (data.source, data.max_documents) or lower "
                          f"{steps_key}", details)
    return make_check(name, OK, value, threshold, head + (f", {epochs:.2g} epochs" if epochs is not None else ""), details)


def model_vocab_size(model: nn.Module) -> int:
    return int(model.config.vocab_size)


def forward_logits(model: nn.Module, batch: dict, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V] at the positions a loss scores, their targets [N]) for an AR or diffusion batch.

    AR: next-token logits where target != -100. Diffusion (masked): every real text token masked, so
    p(text | prompt) from nothing; continuous: the rounding logits of x0_hat from pure noise at t = T.
    """
    batch = _to(batch, _device_of(model))
    if "input_ids" in batch:
        logits = model(batch["input_ids"])
        keep = batch["targets"] != -100
        return logits[keep], batch["targets"][keep]
    ids, mask = batch["text_ids"], batch["text_mask"].bool()
    cfg = model.config
    if getattr(model, "kind", None) == "block_diffusion":
        from sunfish.diffusion.block import text_logits

        logits = text_logits(model, batch, mask)
        mask = mask[:, : logits.shape[1]]
        return logits[mask], ids[:, : logits.shape[1]][mask]
    if getattr(cfg, "objective", "masked") == "masked":
        inputs = torch.where(mask, torch.full_like(ids, model.mask_id), ids)
        logits = model.predict(inputs, batch["prompt_ids"], batch["prompt_mask"], mask)
    else:
        with _seeded(seed):
            z = torch.randn(*ids.shape, cfg.d_model, device=ids.device)
        t = torch.full((ids.shape[0],), cfg.timesteps, dtype=torch.long, device=ids.device)
        x0 = model.predict(z, batch["prompt_ids"], batch["prompt_mask"], mask, timesteps=t)
        logits = model.rounding_logits(x0)
    return logits[mask], ids[mask]


def check_init(model: nn.Module, batch: dict, tolerance: float = 0.25, *, name: str = "init") -> list[dict]:
    """Logits are finite and the initial loss is near ln(vocab) (an untrained model should be uniform).

    Returns ``<name>_logits`` and ``<name>_loss``. A loss far above ln(V) means over-confident initial
    logits (large output weights, a missing final norm); far below means the targets leak into the input.
    """
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits, targets = forward_logits(model, batch)
    finally:
        model.train(was)
    vocab = model_vocab_size(model)
    expected = math.log(vocab)
    rows = []
    finite = bool(torch.isfinite(logits).all()) if logits.numel() else True
    n_bad = int((~torch.isfinite(logits)).sum()) if logits.numel() else 0
    if logits.numel() == 0:
        rows.append(make_check(f"{name}_logits", FAIL, 0, "finite", "the batch has no scored position (all targets ignored)"))
        return rows
    if not finite:
        rows.append(make_check(f"{name}_logits", FAIL, n_bad, "0 non-finite",
                               f"{n_bad} of {logits.numel()} initial logits are NaN/inf: a layer produces non-finite "
                               "values at initialisation (see the gradient_nan check for where); check the model code "
                               "and train.precision"))
        rows.append(make_check(f"{name}_loss", FAIL, None, f"ln({vocab}) = {expected:.2f} +- {tolerance:.0%}",
                               "the initial loss is not finite"))
        return rows
    rows.append(make_check(f"{name}_logits", OK, 0, "0 non-finite", f"{logits.shape[0]} positions, all logits finite"))
    loss = float(F.cross_entropy(logits.float(), targets))
    rel = abs(loss - expected) / expected
    threshold = f"ln({vocab}) = {expected:.2f} +- {tolerance:.0%}"
    if rel > tolerance:
        why = ("the initial logits are over-confident (output weights too large, a missing final norm); an untrained "
               "model should predict every token about equally" if loss > expected else
               "the untrained model already predicts the targets: they leak into its input (check causality)")
        return rows + [make_check(f"{name}_loss", FAIL, round(loss, 4), threshold,
                                  f"initial loss {loss:.2f} is {rel:.0%} away from ln(vocab) = {expected:.2f}: {why}; "
                                  "allowed: diagnose.init_loss_tolerance")]
    return rows + [make_check(f"{name}_loss", OK, round(loss, 4), threshold,
                              f"initial loss {loss:.3f} vs ln({vocab}) = {expected:.3f} ({rel:.1%} off)")]


@dataclass
class _GradStats:
    ever_nonzero: bool = False
    ever_seen: bool = False
    nonfinite: bool = False
    mean_abs: float = 0.0
    norm: float = 0.0


def check_gradient_flow(
    model: nn.Module,
    batch: dict,
    *,
    passes: int = GRAD_PASSES,
    max_passes: int = GRAD_MAX_PASSES,
    lr: float = GRAD_WARM_LR,
    seed: int = 0,
    name: str = "gradient",
) -> list[dict]:
    """Per parameter tensor, over ``passes`` backward passes separated by AdamW steps (on a copy),
    continued up to ``max_passes`` while some tensor has not yet received a non-zero gradient.

    Rows: ``<name>_flow`` (tensors that never receive a non-zero gradient: None = detached from the
    loss, or exactly zero), ``<name>_vanishing`` (mean |grad| < 1e-6), ``<name>_exploding`` (norm >
    100) and ``<name>_nan`` (NaN/inf loss or gradients).
    """
    m = copy.deepcopy(model)
    m.train()
    params = _trainable(m)
    if not params:
        return [make_check(f"{name}_flow", FAIL, 0, "> 0 trainable tensors",
                           "the model has no trainable parameters (all frozen, requires_grad=False): nothing can learn")]
    batch = _to(batch, _device_of(m))
    stats = {n: _GradStats() for n, _ in params}
    opt = torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=0.0)
    nonfinite_loss = None
    done = 0
    for i in range(max(passes, max_passes)):
        opt.zero_grad(set_to_none=True)
        with _seeded(seed + i):
            loss, _ = m.training_loss(batch)
        if not torch.isfinite(loss.detach()).all():
            nonfinite_loss = float(loss.detach())
        if loss.requires_grad:
            loss.backward()
        done += 1
        any_nonfinite = False
        for n, p in params:
            g = p.grad
            s = stats[n]
            if g is None:
                continue
            s.ever_seen = True
            g = g.detach()
            if not torch.isfinite(g).all():
                s.nonfinite = True
                any_nonfinite = True
                continue
            nz = g != 0
            if bool(nz.any()):
                s.ever_nonzero = True
                s.mean_abs = float(g[nz].abs().float().mean())
            else:
                s.mean_abs = 0.0
            s.norm = float(g.float().norm())
        if nonfinite_loss is not None or any_nonfinite:
            break
        if i >= passes - 1 and all(s.ever_nonzero for s in stats.values()):
            break  # a branch used at random (self-conditioning) gets more passes, up to max_passes
        opt.step()
    rows = []

    def listing(names: list[str], fmt: Callable[[str], str] = lambda n: "") -> str:
        shown = [f"{n}{fmt(n)} ({_component(m, n)})" for n in names[:6]]
        return ", ".join(shown) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    def keys_for(names: list[str]) -> str:
        keys = sorted({COMPONENT_KEYS[c] for c in (_component(m, n) for n in names) if c in COMPONENT_KEYS})
        return f" (component settings: {', '.join(keys)})" if keys else ""

    # NaN / inf
    nan_names = [n for n, s in stats.items() if s.nonfinite]
    if nonfinite_loss is not None or nan_names:
        where = f"; non-finite gradients in {listing(nan_names)}" if nan_names else ""
        rows.append(make_check(f"{name}_nan", FAIL, len(nan_names), "0",
                               f"the loss is {nonfinite_loss if nonfinite_loss is not None else 'finite'} after "
                               f"{done} pass(es){where}: a layer produces NaN/inf (a division by zero, log of 0, an "
                               "overflow); lower train.lr, keep train.grad_clip > 0, use train.precision: fp32, and "
                               "check the named layers", {"tensors": nan_names[:20]}))
    else:
        rows.append(make_check(f"{name}_nan", OK, 0, "0", f"loss and gradients finite over {done} passes"))
    # no gradient at all
    none_names = [n for n, s in stats.items() if not s.ever_seen and not s.nonfinite]
    zero_names = [n for n, s in stats.items() if s.ever_seen and not s.ever_nonzero and not s.nonfinite]
    dead = none_names + zero_names
    total = len(params)
    if dead:
        parts = []
        if none_names:
            parts.append(f"{len(none_names)} get no gradient at all (grad is None: detached from the loss or unused "
                         f"in forward): {listing(none_names)}")
        if zero_names:
            parts.append(f"{len(zero_names)} only ever get exactly zero gradient: {listing(zero_names)}")
        rows.append(make_check(f"{name}_flow", FAIL, len(dead), f"0 of {total} tensors",
                               "; ".join(parts) + f" over {done} passes. Training can never change them; a component "
                               "is switched on but disconnected (a .detach(), torch.no_grad(), an output multiplied by a "
                               "zero that never moves)" + keys_for(dead),
                               {"no_grad": none_names[:50], "zero_grad": zero_names[:50]}))
    else:
        rows.append(make_check(f"{name}_flow", OK, 0, f"0 of {total} tensors",
                               f"all {total} trainable tensors receive gradient within {done} passes"))
    if nonfinite_loss is not None or nan_names:
        return rows  # magnitudes of a NaN run say nothing
    live = {n: s for n, s in stats.items() if s.ever_nonzero}
    median = float(np.median([s.mean_abs for s in live.values()])) if live else 0.0
    floor = min(VANISHING_MEAN_ABS, VANISHING_RELATIVE * median)
    # judged per module (the parameter's grandparent, e.g. blocks.1.attn): a gated branch starves all of
    # its tensors, while attention queries/keys alone start second-order small next to their live output
    groups: dict[str, float] = {}
    for n, s in live.items():
        g = _module_group(n)
        groups[g] = max(groups.get(g, 0.0), s.mean_abs)
    vanishing = sorted((n for n, s in live.items() if groups[_module_group(n)] < floor), key=lambda n: live[n].mean_abs)
    smallest = min((s.mean_abs for s in live.values()), default=0.0)
    v_threshold = f"mean |grad| >= min({VANISHING_MEAN_ABS:g}, {VANISHING_RELATIVE:g} x median)"
    # per layer (module group): the largest mean |grad| of its tensors, in the order of the model
    per_layer = {"per_layer_mean_abs": _first(groups)}
    if vanishing:
        rows.append(make_check(f"{name}_vanishing", WARN, len(vanishing), v_threshold,
                               f"{len(vanishing)} tensors get vanishing gradients: "
                               f"{listing(vanishing, lambda n: f' {live[n].mean_abs:.1e}')} (median tensor "
                               f"{median:.1e}); they will barely learn: "
                               "look for a small gate or scale on their branch, or a very deep stack without "
                               "normalisation" + keys_for(vanishing), {"tensors": vanishing[:50], **per_layer}))
    else:
        rows.append(make_check(f"{name}_vanishing", OK, 0, v_threshold,
                               f"smallest mean |grad| {smallest:.2e} (median {median:.2e})", per_layer))
    exploding = sorted((n for n, s in live.items() if s.norm > EXPLODING_NORM), key=lambda n: -live[n].norm)
    largest = max((s.norm for s in live.values()), default=0.0)
    layer_norms: dict[str, float] = {}
    for n, s in live.items():
        g = _module_group(n)
        layer_norms[g] = math.hypot(layer_norms.get(g, 0.0), s.norm)
    if exploding:
        rows.append(make_check(f"{name}_exploding", WARN, len(exploding), f"norm <= {EXPLODING_NORM:g}",
                               f"{len(exploding)} tensors get exploding gradients: "
                               f"{listing(exploding, lambda n: f' {live[n].norm:.3g}')}; keep train.grad_clip > 0 "
                               "(e.g. 1.0) and lower train.lr",
                               {"tensors": exploding[:50], "per_layer_norm": _first(layer_norms)}))
    else:
        rows.append(make_check(f"{name}_exploding", OK, 0, f"norm <= {EXPLODING_NORM:g}",
                               f"largest tensor gradient norm {largest:.3g}", {"per_layer_norm": _first(layer_norms)}))
    return rows


def _first(figures: dict[str, float], n: int = GRAD_LAYERS_SHOWN) -> dict[str, float]:
    return {k: float(f"{v:.3g}") for k, v in list(figures.items())[:n]}


def _module_group(param_name: str) -> str:
    parts = param_name.split(".")
    return ".".join(parts[:-2]) if len(parts) > 2 else ".".join(parts[:-1]) or param_name


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks whose residual branches are measured: ``model.blocks`` or modules named *Block."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
        return [(f"blocks.{i}", b) for i, b in enumerate(blocks)]
    return [(n, mod) for n, mod in model.named_modules() if n and type(mod).__name__.endswith("Block")]


def _branch_gain(delta: torch.Tensor, outputs: list[torch.Tensor]) -> dict:
    """Least-squares fit ``delta = sum_i c_i * outputs_i`` (float64): the gain of each Linear output.

    ``delta`` is ``block(x) - x``; ``outputs`` are the block's Linear outputs shaped like ``x``. The
    layers that write into the residual stream (attention output, MLP down projection) get their
    gain (1 for ``x + branch(x)``, 0.1 for ``x + 0.1 * branch(x)``); the others (a cross-attention
    query, say) get ~0. Returns {"gain": the smallest |coefficient| of a writer, or None when the Linear
    outputs do not explain ``delta`` (fit_error above ``RESIDUAL_FIT_MAX_ERROR``), "gains", "fit_error"}.
    """
    d = delta.detach().double().flatten()
    d_norm = float(d.norm())
    cols = [o.detach().double().flatten() for o in outputs]
    norms = [float(c.norm()) for c in cols]
    live = [i for i, n in enumerate(norms) if n > 0 and math.isfinite(n)]
    if not live or d_norm == 0 or not math.isfinite(d_norm):
        return {"gain": None, "gains": [], "fit_error": None}
    o = torch.stack([cols[i] / norms[i] for i in live], dim=1)  # unit columns: a well-conditioned system
    gram, rhs = (o.T @ o).cpu(), (o.T @ d.unsqueeze(1)).cpu()
    unit = (torch.linalg.pinv(gram, rtol=1e-10) @ rhs).squeeze(1)
    fit_error = float((d - o @ unit.to(o.device)).norm()) / d_norm
    coef = [float(unit[j]) / norms[i] for j, i in enumerate(live)]
    largest = max(abs(c) for c in coef)
    writers = [abs(c) for c in coef if abs(c) >= RESIDUAL_WRITER_SHARE * largest]  # x - f(x) learns like x + f(x)
    gain = min(writers) if writers and fit_error <= RESIDUAL_FIT_MAX_ERROR else None
    return {"gain": gain, "gains": [round(c, 4) for c in coef], "fit_error": fit_error}


def residual_measurements(model: nn.Module, batch: dict, *, seed: int = 0) -> dict[str, dict]:
    """Per block, from one forward pass of ``model.training_loss`` (eval mode, no grad):

    - ``ratio``: ``||block(x) - x|| / ||x||``, how much the block changes the residual stream;
    - ``gain`` / ``gains`` / ``fit_error``: see :func:`_branch_gain`, fitted on the outputs of the
      block's ``nn.Linear`` layers shaped like ``x`` (last call of the block wins: self-conditioning
      runs the blocks twice).
    """
    found: dict[str, dict] = {}
    handles = []

    def watch(block_name: str, block: nn.Module):
        outputs: list[torch.Tensor] = []  # this call's Linear outputs shaped like the block input
        shape: list[torch.Size] = []

        def first_tensor(args, kwargs):
            return args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)

        def before(module, args, kwargs):
            outputs.clear()
            shape.clear()
            x = first_tensor(args, kwargs)
            if isinstance(x, torch.Tensor):
                shape.append(x.shape)

        def linear(module, args, output):
            if shape and isinstance(output, torch.Tensor) and output.shape == shape[0]:
                outputs.append(output)

        def after(module, args, kwargs, output):
            x = first_tensor(args, kwargs)
            y = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape:
                delta = y.float() - x.float()
                den = float(x.float().norm())
                row = {"ratio": float(delta.norm()) / den if den > 0 else float("inf"), "width": int(x.shape[-1])}
                row.update(_branch_gain(delta, outputs))
                found[block_name] = row
            outputs.clear()

        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(after, with_kwargs=True))
        for mod in block.modules():
            if isinstance(mod, nn.Linear):
                handles.append(mod.register_forward_hook(linear))

    for block_name, block in find_blocks(model):
        watch(block_name, block)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), _seeded(seed):
            model.training_loss(_to(batch, _device_of(model)))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return found


def residual_ratios(model: nn.Module, batch: dict, *, seed: int = 0) -> dict[str, float]:
    """||block output - block input|| / ||block input|| per block, from one forward pass (no grad)."""
    return {k: v["ratio"] for k, v in residual_measurements(model, batch, seed=seed).items()}


def _gate_parameters(block: nn.Module, width: int) -> dict[str, float]:
    """Small learnable tensors of a block named like a gate or scale (``*gate*``, ``*scale*``, ``alpha``,
    ``gamma``, ``rezero``...), with their mean |value|: the usual ways a residual branch is gated."""
    out = {}
    for n, p in block.named_parameters():
        leaf = n.rsplit(".", 1)[-1].lower()
        if p.numel() <= width and any(h in leaf for h in GATE_NAME_HINTS):
            out[n] = float(p.detach().float().abs().mean())
    return out


def check_residual_branches(
    model: nn.Module,
    batch: dict,
    *,
    steps: int = RESIDUAL_STEPS,
    lr: float = 3e-3,
    seed: int = 0,
    name: str = "residual_branches",
    gain_name: str | None = None,
) -> list[dict]:
    """How much the residual branches contribute, after ``steps`` AdamW steps on ``batch`` (a copy).

    Two rows:

    - ``<name>``: ``||block(x) - x|| / ||x||`` below ``RESIDUAL_RATIO_MIN`` in every block warns: the
      network is nearly the identity. Zero-initialised branches open within the few steps.
    - ``residual_gain`` (``gain_name``): the gain with which each block adds its branch outputs to the
      residual stream, fitted by least squares on the outputs of the block's Linear layers (see
      :func:`_branch_gain`). A plain residual ``x + f(x)`` has gain exactly 1 whatever the
      architecture, depth or initialisation; ``x + 0.1 * f(x)`` has 0.1 (the original SunFish's
      worst bug: a residual branch gated to ~0.1, so each branch moves the stream 10x slower and
      the deep layers barely learn). Below ``RESIDUAL_GAIN_MIN`` in any block warns, naming the
      block and any learnable gate/scale parameter in it of about that value (``GATE_NAME_HINTS``);
      none means a constant scales the branch. The ratio alone cannot catch this: a
      healthy block's ratio ranges over 0.1..1 with the architecture and init, so 0.1 x a healthy
      ratio is still a plausible one.
    """
    if gain_name is None:
        gain_name = name.rsplit("/", 1)[0] + "/residual_gain" if "/" in name else "residual_gain"
    gain_threshold = f"min >= {RESIDUAL_GAIN_MIN} (plain residual: 1)"
    m = copy.deepcopy(model)
    m.train()
    blocks = find_blocks(m)
    if not blocks:
        text = "no transformer blocks found (model.blocks); residual branches not measured"
        return [make_check(name, WARN, None, f"max >= {RESIDUAL_RATIO_MIN}", text),
                make_check(gain_name, WARN, None, gain_threshold, text)]
    params = [p for _, p in _trainable(m)]
    batch = _to(batch, _device_of(m))
    if params and steps > 0:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for i in range(steps):
            with _seeded(seed + i):
                loss, _ = m.training_loss(batch)
            if not torch.isfinite(loss.detach()) or not loss.requires_grad:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    measured = residual_measurements(m, batch, seed=seed)
    if not measured:
        text = "the blocks' inputs and outputs could not be compared; residual branches not measured"
        return [make_check(name, WARN, None, f"max >= {RESIDUAL_RATIO_MIN}", text),
                make_check(gain_name, WARN, None, gain_threshold, text)]
    return [_ratio_row(measured, steps, name), _gain_row(measured, dict(blocks), steps, gain_name, gain_threshold)]


def _ratio_row(measured: dict[str, dict], steps: int, name: str) -> dict:
    ratios = {k: v["ratio"] for k, v in measured.items()}
    finite = [r for r in ratios.values() if math.isfinite(r)]
    best = max(finite) if finite else float("nan")
    details = {k: round(v, 5) if math.isfinite(v) else str(v) for k, v in ratios.items()}
    shown = ", ".join(f"{k.split('.')[-1]}: {v:.3g}" for k, v in ratios.items())
    if finite and best < RESIDUAL_RATIO_MIN:
        return make_check(name, WARN, round(best, 6), f"max >= {RESIDUAL_RATIO_MIN}",
                          f"every block changes its input by less than {RESIDUAL_RATIO_MIN:.0%} after {steps} training "
                          f"steps (||block(x) - x|| / ||x|| per block: {shown}): the residual branches are gated or "
                          "scaled nearly shut, so the network is close to the identity and learns very slowly. Remove "
                          "the gate/scale on the residual branch (or initialise it near 1); check staged.* component "
                          "settings", details)
    return make_check(name, OK, round(best, 6) if finite else None, f"max >= {RESIDUAL_RATIO_MIN}",
                      f"||block(x) - x|| / ||x|| per block after {steps} steps: {shown}", details)


def _gain_row(measured: dict[str, dict], blocks: dict[str, nn.Module], steps: int, name: str, threshold: str) -> dict:
    gains = {k: v.get("gain") for k, v in measured.items()}
    known = {k: g for k, g in gains.items() if g is not None and math.isfinite(g)}
    details = {k: {"gain": round(g, 4) if g is not None else None, "linear_gains": v.get("gains"),
                   "fit_error": round(v["fit_error"], 6) if v.get("fit_error") is not None else None}
               for k, (g, v) in ((k, (gains[k], measured[k])) for k in measured)}
    if not known:
        return make_check(name, OK, None, threshold,
                          "block(x) - x is not a weighted sum of the blocks' Linear outputs here (a norm after the "
                          "residual add, or branches still at zero), so the branch gain is not measured; the "
                          "residual_branches ratio still applies", details)
    low = {k: g for k, g in known.items() if g < RESIDUAL_GAIN_MIN}
    shown = ", ".join(f"{k.split('.')[-1]}: {g:.3g}" for k, g in known.items())
    smallest = min(known.values())
    if low:
        listed = ", ".join(f"{k} {g:.3g}" for k, g in list(low.items())[:8]) + (" ..." if len(low) > 8 else "")
        gates: dict[str, float] = {}
        for k in low:
            block = blocks.get(k)
            if block is not None:  # gate-like parameters whose value is about the measured gain
                gates.update({f"{k}.{n}": v for n, v in _gate_parameters(block, measured[k]["width"]).items()
                              if low[k] / 3 <= v <= 3 * low[k]})
        where = (" Learnable gate/scale parameters of about that value (mean |value|): "
                 + ", ".join(f"{n} = {v:.3g}" for n, v in list(gates.items())[:8]) + "."
                 if gates else " No learnable gate/scale parameter has that value: a constant (or a gate computed "
                 "from other weights) multiplies the branch.")
        details["gate_parameters"] = {n: round(v, 5) for n, v in gates.items()}
        return make_check(name, WARN, round(smallest, 4), threshold,
                          f"residual branches are added to the stream scaled down, gain per block: {listed} (a plain "
                          f"residual x + f(x) has gain 1; measured after {steps} steps).{where} A branch scaled by "
                          "0.1 moves the stream 10x slower under Adam, so those layers barely learn and the model "
                          "trains like a much shallower one: the original SunFish's worst bug. Add the branch "
                          "unscaled (x = x + f(x)), or initialise the gate at 1 and keep it out of weight decay",
                          details)
    return make_check(name, OK, round(smallest, 4), threshold,
                      f"every block adds its branch outputs with gain ~1 (per block: {shown})", details)


def check_memorisation(
    model: nn.Module,
    batch: dict,
    *,
    steps: int = 150,
    target: float = 0.1,
    lr: float = 3e-3,
    seed: int = 0,
    name: str = "memorisation",
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    relative_target: float | None = None,
) -> dict:
    """A copy of the model must overfit ONE small batch to loss < ``target`` within ``steps`` AdamW steps.

    The objective's own randomness (masks, noise, conditioning dropout) is fixed by reseeding each
    step, so the batch is truly the same every step. ``loss_fn(model, batch) -> loss`` replaces
    ``model.training_loss`` (the diffusion model uses a fixed-mask objective, see ``memorisation_loss``).
    A model that cannot memorise 64 tokens will not learn a corpus: frozen parameters, a learning rate
    of 0, a loss not connected to the weights, or branches gated shut.

    ``relative_target``: also accept a loss below that share of the first step's loss (the masked
    denoiser must first learn to locate its positions by attention, which takes hundreds of steps
    even on one batch; falling to 30% of the initial loss already proves it learns).
    """
    m = copy.deepcopy(model)
    m.train()
    params = [p for _, p in _trainable(m)]
    shape = "x".join(str(s) for s in next(iter(v for v in batch.values() if isinstance(v, torch.Tensor))).shape)
    if not params:
        return make_check(name, FAIL, None, f"loss < {target} within {steps} steps",
                          f"the model has no trainable parameters (all frozen): it cannot even memorise one {shape} "
                          "batch")
    batch = _to(batch, _device_of(m))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = loss_fn or (lambda mod, b: mod.training_loss(b)[0])
    first = best = last = float("nan")
    goal = target
    threshold = f"loss < {target} within {steps} steps"
    started = time.perf_counter()
    for step in range(1, steps + 1):
        with _seeded(seed):
            loss = loss_fn(m, batch)
        last = float(loss.detach())
        if step == 1:
            first = best = last
            if relative_target is not None and math.isfinite(first):
                goal = max(target, relative_target * first)
                threshold = f"loss < max({target}, {relative_target:g} x initial) within {steps} steps"
        best = min(best, last)
        if not math.isfinite(last):
            return make_check(name, FAIL, step, threshold,
                              f"the loss became {last} at step {step} while overfitting one {shape} batch at lr {lr:g}: "
                              "the model is numerically unstable (see the gradient_nan check)",
                              {"first_loss": first, "lr": lr})
        if last < goal:
            return make_check(name, OK, step, threshold,
                              f"overfit one {shape} batch in {step} steps ({first:.2f} -> {last:.3f}, lr {lr:g}, "
                              f"{time.perf_counter() - started:.1f} s)", {"first_loss": first, "final_loss": last, "lr": lr})
        if not loss.requires_grad:
            return make_check(name, FAIL, step, threshold,
                              "the loss is not connected to any trainable parameter (no grad_fn): nothing can learn")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    details = {"first_loss": first, "final_loss": last, "best_loss": best, "lr": lr}
    if abs(first - last) < 1e-4 * max(1.0, abs(first)):
        why = ("the loss did not move at all: the parameters are not being updated (frozen, a learning rate of 0, or "
               "gradients that never reach the weights; see the gradient_flow check)")
    else:
        why = ("a healthy model reaches it in tens of steps; likely causes: residual branches gated nearly shut, a "
               "model too narrow for the batch, or heavy dropout (staged.dropout / cfg.dropout). If the loss is still "
               "falling steadily, raise diagnose.memorize_steps")
    return make_check(name, FAIL, steps, threshold,
                      f"could not overfit one {shape} batch: loss {first:.2f} -> {last:.3f} (best {best:.3f}) after "
                      f"{steps} steps at lr {lr:g}; {why}", details)


def memorize_lr(model: nn.Module) -> float:
    """The AdamW lr of the memorisation probe: ``MEMORIZE_LR`` of the model's kind, scaled down as
    1 / width above ``MEMORIZE_LR_WIDTH`` (one fixed lr makes wide models oscillate on one batch)."""
    base = MEMORIZE_LR.get(getattr(model, "kind", "staged"), 3e-3)
    width = int(getattr(getattr(model, "config", None), "d_model", MEMORIZE_LR_WIDTH) or MEMORIZE_LR_WIDTH)
    return base * min(1.0, MEMORIZE_LR_WIDTH / width)


def memorisation_loss(model: nn.Module, batch: dict, *, mask_share: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Deterministic per-batch objective for memorisation.

    AR models: their training loss. Diffusion (masked): cross-entropy on a FIXED random half of the
    real text tokens, the rest visible (the training objective draws a new mask ratio per row, and a
    fully masked row cannot tell its positions apart, so it can never be memorised exactly).
    Continuous: the training loss under fixed noise (seeded by the caller).
    """
    if "input_ids" in batch or getattr(model.config, "objective", "masked") != "masked":
        return model.training_loss(batch)[0]
    ids, text_mask = batch["text_ids"], batch["text_mask"].bool()
    gen = torch.Generator().manual_seed(seed)
    chosen = (torch.rand(ids.shape, generator=gen) < mask_share).to(ids.device) & text_mask
    if not bool(chosen.any()):
        chosen = text_mask
    if getattr(model, "kind", None) == "block_diffusion":
        from sunfish.diffusion.block import text_logits

        logits = text_logits(model, batch, chosen)
        chosen = chosen[:, : logits.shape[1]]
        return F.cross_entropy(logits[chosen].float(), ids[:, : logits.shape[1]][chosen])
    inputs = torch.where(chosen, torch.full_like(ids, model.mask_id), ids)
    memory, memory_mask = model.encode_prompt(batch["prompt_ids"], batch["prompt_mask"])
    hidden = model.hidden_states(inputs, memory, memory_mask, text_mask)
    log_probs = model.masked_log_probs(hidden, memory, memory_mask, batch["prompt_ids"], chosen)
    return F.nll_loss(log_probs, ids[chosen])


def _eval_loss(model: nn.Module, batch: dict, seed: int) -> float:
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), _seeded(seed):
            return float(model.training_loss(batch)[0])
    finally:
        model.train(was)


def check_lr_schedule(
    model: nn.Module,
    tcfg: ResolvedTraining,
    batches: list[dict],
    eval_batch: dict,
    *,
    seed: int = 0,
    lr_key: str = "train.lr",
    name: str = "lr_schedule",
) -> dict:
    """With the configured optimiser and lr schedule (warmup + cosine, ``lr_at``) on real batches, the
    loss of a fixed held-out batch falls over the first ``len(batches)`` steps (on a copy)."""
    from sunfish.training.loop import lr_at, make_optimizer

    m = copy.deepcopy(model)
    m.train()
    device = _device_of(m)
    eval_batch = _to(eval_batch, device)
    opt = make_optimizer(m, tcfg, device)
    before = _eval_loss(m, eval_batch, seed)
    lrs, losses = [], []
    for step, batch in enumerate(batches):
        lr = lr_at(step, tcfg)
        lrs.append(lr)
        for group in opt.param_groups:
            group["lr"] = lr
        with _seeded(seed + 1 + step):
            loss, _ = m.training_loss(_to(batch, device))
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            return make_check(name, FAIL, None, f"falls by >= {LR_SANITY_MIN_DROP:.0%}",
                              f"the loss became {value} at step {step + 1} of the configured schedule (lr {lr:.2g}): "
                              f"lower {lr_key} (now {tcfg.lr:g}) and keep train.grad_clip > 0",
                              {"losses": losses, "lrs": lrs})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(m.parameters(), tcfg.grad_clip)
        opt.step()
    after = _eval_loss(m, eval_batch, seed)
    change = (after - before) / max(abs(before), 1e-12)
    n = len(batches)
    details = {"loss_before": before, "loss_after": after, "lr_first": lrs[0] if lrs else None,
               "lr_last": lrs[-1] if lrs else None, "train_losses": [round(x, 4) for x in losses]}
    head = (f"held-out loss {before:.3f} -> {after:.3f} ({change:+.1%}) over the first {n} steps "
            f"(lr {lrs[0]:.2g} -> {lrs[-1]:.2g})") if lrs else "no steps"
    threshold = f"falls by >= {LR_SANITY_MIN_DROP:.0%}"
    if not math.isfinite(after) or change > LR_SANITY_DIVERGE:
        return make_check(name, FAIL, round(change, 4) if math.isfinite(change) else None, threshold,
                          f"{head}: the loss rises, training diverges; lower {lr_key} (now {tcfg.lr:g}) or lengthen "
                          "train.warmup_steps", details)
    if change > -LR_SANITY_MIN_DROP:
        return make_check(name, WARN, round(change, 4), threshold,
                          f"{head}: the loss does not fall; the learning rate is too low early on: raise {lr_key} "
                          f"(now {tcfg.lr:g}) or shorten train.warmup_steps (now {tcfg.warmup_steps})", details)
    return make_check(name, OK, round(change, 4), threshold, head, details)


# -- diffusion-specific -----------------------------------------------------------------------------


def check_prompt_encoder(source: str, name: str = "prompt_encoder") -> dict:
    """A configured pretrained prompt encoder (hub name or path) loads offline; ``own`` needs nothing."""
    from sunfish.models.prompt_encoder import is_own, load_pretrained_embeddings

    if is_own(source):
        return make_check(name, OK, "own", "loads offline", "the model's own token embeddings encode the prompt")
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        weight, _ = load_pretrained_embeddings(source)
    except Exception as exc:
        return make_check(name, FAIL, source, "loads offline", f"cfg.prompt_encoder: {exc}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return make_check(name, OK, source, "loads offline",
                      f"{source!r} loads offline: {weight.shape[0]} x {weight.shape[1]} frozen embeddings")


def check_conditioning_dropout(model: nn.Module, *, draws: int = 20000, seed: int = 0,
                               name: str = "conditioning_dropout") -> dict:
    """Conditioning dropout is active in training (> 0, < 1), and the model applies what is configured."""
    p = float(model.config.conditioning_dropout)
    threshold = "0 < p < 1 (0.1 typical)"
    measured = None
    if hasattr(model, "drop_conditioning"):
        was = model.training
        model.train()
        try:
            with _seeded(seed):
                mask = torch.ones(draws, 1, dtype=torch.bool, device=_device_of(model))
                _, dropped = model.drop_conditioning(mask)
            measured = float(dropped.float().mean())
        finally:
            model.train(was)
    value = {"configured": p, "measured": round(measured, 4) if measured is not None else None}
    if p <= 0:
        return make_check(name, FAIL, value, threshold,
                          "cfg.conditioning_dropout is 0: the null prompt is never trained, so classifier-free guidance "
                          "has no unconditional model to push away from; set cfg.conditioning_dropout: 0.1")
    if p >= 1:
        return make_check(name, FAIL, value, threshold,
                          f"cfg.conditioning_dropout is {p:g}: every prompt is dropped, the prompt path never trains; "
                          "set cfg.conditioning_dropout: 0.1")
    if measured is not None and abs(measured - p) > max(0.03, 4 * math.sqrt(p * (1 - p) / draws)):
        return make_check(name, FAIL, value, threshold,
                          f"cfg.conditioning_dropout is {p:g} but the model drops {measured:.1%} of prompts in training "
                          "mode: the setting does not reach the model")
    if p > 0.5:
        return make_check(name, WARN, value, threshold,
                          f"cfg.conditioning_dropout {p:g} drops most prompts: the conditional model gets little "
                          "training; 0.1-0.2 is typical")
    return make_check(name, OK, value, threshold,
                      f"{p:.0%} of prompts dropped in training" + (f" (measured {measured:.1%})" if measured is not None else ""))


def check_noise_schedule(timesteps: int, schedule: str, name: str = "noise_schedule_snr") -> dict:
    """Continuous objective: SNR = abar / (1 - abar) must fall monotonically from clearly-signal at t=1
    to nearly-pure-noise at t=T (else sampling from pure noise starts off the training distribution)."""
    from sunfish.diffusion.continuous import alpha_bars

    ab = alpha_bars(timesteps, schedule)[1:].double()
    snr = ab / (1 - ab).clamp_min(1e-300)
    first, last = float(snr[0]), float(snr[-1])
    value = {"log10_snr_t1": round(math.log10(max(first, 1e-300)), 2), "log10_snr_T": round(math.log10(max(last, 1e-300)), 2)}
    threshold = "SNR(1) >= 1, SNR(T) <= 0.01, decreasing"
    if not bool((snr[1:] <= snr[:-1] * (1 + 1e-9)).all()):
        return make_check(name, FAIL, value, threshold,
                          f"cfg.noise_schedule {schedule!r} with cfg.timesteps={timesteps}: the signal-to-noise ratio is "
                          "not decreasing in t; use sqrt or cosine")
    if last > 1.0:
        return make_check(name, FAIL, value, threshold,
                          f"SNR at t=T is {last:.3g}: the last step is mostly signal, so sampling from pure noise starts "
                          f"far from anything seen in training; raise cfg.timesteps (now {timesteps}) or use "
                          "cfg.noise_schedule: sqrt")
    if last > 0.01:
        return make_check(name, WARN, value, threshold,
                          f"SNR at t=T is {last:.3g} (> 0.01): the noisiest step still holds signal; raise "
                          f"cfg.timesteps (now {timesteps}) or use cfg.noise_schedule: sqrt")
    if first < 1.0:
        return make_check(name, WARN, value, threshold,
                          f"SNR at t=1 is {first:.3g} (< 1): even the least noisy step hides most of the signal, so fine "
                          f"detail is never learnt; raise cfg.timesteps (now {timesteps}) or change cfg.noise_schedule")
    return make_check(name, OK, value, threshold,
                      f"SNR from {first:.3g} at t=1 down to {last:.2g} at t={timesteps} ({schedule})")


def check_mask_schedule(
    batch_size: int,
    *,
    draws: int = 256,
    seed: int = 0,
    times: Callable[[int, torch.Generator], torch.Tensor] | None = None,
    name: str = "noise_schedule_snr",
) -> dict:
    """Masked objective: the masking rates t drawn in training (``masked.stratified_times``) span nearly
    clean to fully masked text. Signal-to-noise of a rate t: SNR = (1 - t) / t (share of tokens kept
    over share masked). Sampling starts from all-[MASK] (t = 1, SNR 0) and ends nearly clean, so
    training must cover both ends; t must stay > 0 (the ELBO weighs the loss by 1/t).

    ``times(batch_size, generator) -> t [batch_size]`` replaces the objective's own draw (tests).
    """
    from sunfish.diffusion.masked import stratified_times

    draw = times or (lambda b, g: stratified_times(b, torch.device("cpu"), g))
    gen = torch.Generator().manual_seed(seed)
    t = torch.cat([draw(batch_size, gen).flatten().double() for _ in range(draws)])
    lo, hi = float(t.min()), float(t.max())

    def log10_snr(x: float) -> float:
        return round(math.log10(max(1.0 - x, 1e-12) / max(x, 1e-12)), 2)

    value = {"mask_rate_min": round(lo, 4), "mask_rate_max": round(hi, 4), "log10_snr_max": log10_snr(lo),
             "log10_snr_min": log10_snr(hi)}
    threshold = f"mask rate 0 < min <= {MASK_RATE_LOW}, max >= {MASK_RATE_HIGH}"
    if not (lo > 0 and hi <= 1 and math.isfinite(lo) and math.isfinite(hi)):
        return make_check(name, FAIL, value, threshold,
                          f"training masking rates range over {lo:.3g}..{hi:.3g}: outside (0, 1], the 1/t weight of the "
                          "masked ELBO is infinite or the rate is meaningless; check sunfish/diffusion/masked.py")
    if hi < MASK_RATE_HIGH:
        return make_check(name, FAIL, value, threshold,
                          f"training never masks more than {hi:.0%} of a text, but sampling starts from fully masked "
                          "text (SNR 0): the first sampling steps run far outside anything seen in training; check "
                          "stratified_times / MIN_TIME in sunfish/diffusion/masked.py")
    if lo > MASK_RATE_LOW:
        return make_check(name, WARN, value, threshold,
                          f"training never masks fewer than {lo:.0%} of the tokens: the last sampling steps (nearly "
                          "clean text) are never trained; check sunfish/diffusion/masked.py")
    return make_check(name, OK, value, threshold,
                      f"masking rates {lo:.3g}..{hi:.3g} in training: log10 SNR from {value['log10_snr_max']:+.1f} "
                      f"down to {value['log10_snr_min']:+.1f} (fully masked), the whole sampling path")


def check_conditioning_effect(
    model: nn.Module,
    batches: list[dict],
    probe: dict,
    *,
    lr: float = 1e-3,
    seed: int = 0,
    name: str = "conditioning_effect",
) -> dict:
    """After ``len(batches)`` training steps on real pairs (a copy), conditional and unconditional
    predictions for the same input must differ: otherwise the prompt path does not reach the output."""
    m = copy.deepcopy(model)
    m.train()
    device = _device_of(m)
    params = [p for _, p in _trainable(m)]
    if params:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for i, batch in enumerate(batches):
            with _seeded(seed + i):
                loss, _ = m.training_loss(_to(batch, device))
            if not torch.isfinite(loss.detach()) or not loss.requires_grad:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    probe = _to(probe, device)
    keep = probe["prompt_mask"].bool().any(dim=1)
    if not bool(keep.any()):
        return make_check(name, FAIL, None, f">= {CONDITIONING_MIN_DIFF:g}",
                          "no pair in the probe batch has a prompt; see the data_pairs check")
    probe = {k: v[keep] for k, v in probe.items()}
    ids, mask = probe["text_ids"], probe["text_mask"].bool()
    cfg = m.config
    m.eval()
    with torch.no_grad(), _seeded(seed):
        if getattr(m, "kind", None) == "block_diffusion":
            from sunfish.diffusion.block import text_logits

            rows = torch.ones(ids.shape[0], dtype=torch.bool, device=device)
            cond, uncond = text_logits(m, probe, mask, rows), text_logits(m, probe, mask, ~rows)
            mask = mask[:, : cond.shape[1]]
        elif getattr(cfg, "objective", "masked") == "masked":
            inputs = torch.where(mask, torch.full_like(ids, m.mask_id), ids)
            cond, uncond = m.predict_cond_uncond(inputs, probe["prompt_ids"], probe["prompt_mask"], mask)
        else:
            t = torch.full((ids.shape[0],), max(1, cfg.timesteps // 2), dtype=torch.long, device=device)
            z = torch.randn(*ids.shape, cfg.d_model, device=device)
            cond, uncond = m.predict_cond_uncond(z, probe["prompt_ids"], probe["prompt_mask"], mask, timesteps=t)
    cond, uncond = cond[mask].float(), uncond[mask].float()
    scale = float(cond.abs().mean()) or 1.0
    diff = float((cond - uncond).abs().mean()) / scale
    value = diff
    steps = len(batches)
    if not math.isfinite(diff):
        return make_check(name, FAIL, None, f">= {CONDITIONING_MIN_DIFF:g}", "the predictions are not finite")
    if diff < CONDITIONING_MIN_DIFF:
        return make_check(name, FAIL, value, f">= {CONDITIONING_MIN_DIFF:g}",
                          f"after {steps} training steps the conditional and unconditional predictions are identical "
                          f"(relative difference {diff:.2g}): the prompt never reaches the output, so guidance does "
                          "nothing; check cfg.prompt_encoder and cfg.conditioning_dropout (< 1)")
    return make_check(name, OK, value, f">= {CONDITIONING_MIN_DIFF:g}",
                      f"prompted vs null-prompt predictions differ by {diff:.2%} (relative) after {steps} steps")


# -- speed ---------------------------------------------------------------------------------------------


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
    from sunfish.training.loop import lr_at

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        loss, _ = model.training_loss(batch)
    loss.backward()
    sync()
    mid = time.perf_counter()
    for group in opt.param_groups:
        group["lr"] = lr_at(step, tcfg)
    if tcfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return mid - start, time.perf_counter() - mid


def _measure_speed(model, tcfg, sample_batch, *, steps, estimate_mb, name) -> list[dict]:
    from sunfish.training.loop import autocast_dtype, make_optimizer

    device = _device_of(model)
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
        batch = _to(sample_batch(gen), device)
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
            f"{_plural(threads, 'thread')}")
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
    text = (f"{tcfg.max_steps} steps ~ {_fmt_seconds(eta)}; milestones "
            + ", ".join(f"{m}: {_fmt_seconds(step_time * m)}" for m in tcfg.milestones)
            + " (training only; evaluation adds a little)")
    if eta > ETA_WARN_SECONDS:
        rows.append(make_check(f"{name}eta", WARN, round(eta, 1), f"<= {_fmt_seconds(ETA_WARN_SECONDS)}",
                               f"{text}: more than a day on this machine; lower the max_steps of this model, pick a "
                               "smaller preset, or check the diagnose table before committing to it", per_milestone))
    else:
        rows.append(make_check(f"{name}eta", OK, round(eta, 1), f"<= {_fmt_seconds(ETA_WARN_SECONDS)}", text, per_milestone))
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


# ----------------------------------------------------------------------------------------------
# environment


def environment(device: torch.device) -> dict:
    avail, total, _ = available_memory(device)
    env = {
        "device": device.type,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "memory_total_mb": round(total / 2**20) if total else None,
        "memory_available_mb": round(avail / 2**20) if avail else None,
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


# ----------------------------------------------------------------------------------------------
# the whole run


@dataclass
class PreparedData:
    dir: Path
    meta: dict | None = None
    tokenizer: Any = None
    train: Any = None  # TokenStream
    val: Any = None
    pairs: dict[str, list[dict]] = field(default_factory=dict)


def _load_prepared(prepared: Path, want_pairs: bool, checks: list[dict]) -> PreparedData:
    from sunfish.data.dataset import TokenStream, load_pairs
    from sunfish.data.tokenizer import TextTokenizer

    data = PreparedData(prepared)
    remedy = "run `dvc repro prepare` (or `sunfish stage prepare`)"
    problems = []
    try:
        data.meta = json.loads((prepared / "meta.json").read_text(encoding="utf-8"))
    except Exception as exc:
        problems.append(f"meta.json: {type(exc).__name__}: {exc}")
    try:
        kwargs = {}
        if data.meta:
            kwargs = {"eos_id": data.meta.get("eos_id"), "pad_id": data.meta.get("pad_id")}
        data.tokenizer = TextTokenizer.load(prepared / "tokenizer.json", **kwargs)
    except Exception as exc:
        problems.append(f"tokenizer.json: {exc}")
    for split in ("train", "val"):
        try:
            setattr(data, split, TokenStream(prepared / f"{split}.bin"))
        except Exception as exc:
            problems.append(f"{split}.bin: {exc}")
    if want_pairs:
        for split in ("train", "val"):
            try:
                data.pairs[split] = load_pairs(prepared / f"pairs_{split}.jsonl")
            except Exception as exc:
                problems.append(f"pairs_{split}.jsonl: {exc}")
                data.pairs[split] = []
    if problems:
        checks.append(make_check("data/load", FAIL, len(problems), "0 problems",
                                 f"{prepared}: " + "; ".join(problems)[:800] + f". {remedy}"))
    else:
        checks.append(make_check("data/load", OK, 0, "0 problems", f"{prepared}: meta, tokenizer, token files"
                                 + (" and pairs" if want_pairs else "") + " load"))
    return data


def _sample_texts(data: PreparedData, n: int = 8) -> list[str]:
    texts = ["Once upon a time, a little fox said: \"Hello!\" 42 times.", "Ünïcödé — naïve café, 日本語, emoji 🙂\n\ttabs"]
    stream = data.val if data.val is not None else data.train
    if stream is not None and data.tokenizer is not None and stream.num_tokens > 2:
        eos = data.tokenizer.eos_id
        gen = np.random.default_rng(0)
        for _ in range(n):
            start = int(gen.integers(0, max(1, stream.num_tokens - 64)))
            ids = [int(i) for i in stream.tokens[start : start + 64] if int(i) not in (eos, data.tokenizer.pad_id)]
            text = data.tokenizer.decode(ids)
            if text and "\ufffd" not in text:  # a window may cut a multi-byte character
                texts.append(text)
    return texts


def _data_checks(data: PreparedData, params: Params, seq_len: int, batch_size: int, want_pairs: bool,
                 sequences_drawn: int | None = None) -> list[dict]:
    rows: list[dict] = []
    meta = data.meta or {}
    if data.train is not None or data.val is not None:
        splits = {}
        for split in ("train", "val"):
            stream = getattr(data, split)
            info = dict((meta.get("splits") or {}).get(split) or {})
            info["tokens"] = stream.num_tokens if stream is not None else 0
            splits[split] = info
        rows += guarded("data/splits", check_splits, splits, seq_len, name="data/splits",
                        sequences_drawn=sequences_drawn)
        meta_tokens = {s: (meta.get("splits") or {}).get(s, {}).get("tokens") for s in ("train", "val")}
        mismatch = [s for s in ("train", "val") if meta_tokens[s] is not None and getattr(data, s) is not None
                    and meta_tokens[s] != getattr(data, s).num_tokens]
        if mismatch:
            rows.append(make_check("data/meta", FAIL, {s: meta_tokens[s] for s in mismatch}, "meta == files",
                                   f"meta.json token counts disagree with {', '.join(f'{s}.bin' for s in mismatch)}: a "
                                   "partial or stale prepare; rerun `dvc repro prepare`"))
    if data.train is not None:
        if data.train.num_tokens > seq_len:
            gen = torch.Generator().manual_seed(params.train.seed)
            rows += guarded("data/batch_content", lambda: check_batch_content(
                data.train.sample_batch(batch_size, seq_len, gen), name="data/batch_content"))
        head = np.asarray(data.train.tokens[: 2_000_000])
        if data.tokenizer is not None:
            specials = {"eos": data.tokenizer.eos_id}
            if data.tokenizer.pad_id != data.tokenizer.eos_id:
                specials["pad"] = data.tokenizer.pad_id
            rows += guarded("data/special_tokens", check_special_tokens, head, specials, name="data/special_tokens")
        if data.val is not None:
            rows += guarded("data/val_overlap", check_val_overlap, np.asarray(data.train.tokens),
                            np.asarray(data.val.tokens), seed=params.data.seed, name="data/val_overlap")
    if data.tokenizer is not None:
        texts: list[str] = []  # sampled once, for the round trip and the unknown-token share

        def roundtrip() -> dict:
            texts.extend(_sample_texts(data))
            return check_tokenizer_roundtrip(data.tokenizer, texts, name="data/tokenizer_roundtrip")

        rows += guarded("data/tokenizer_roundtrip", roundtrip)
        head = np.asarray(data.train.tokens[: 2_000_000]) if data.train is not None else None
        rows += guarded("data/unknown_tokens", check_unknown_tokens, data.tokenizer, head, texts,
                        name="data/unknown_tokens")
    if want_pairs and data.pairs:
        rows += guarded("data/pairs", check_pairs, data.pairs, name="data/pairs")
    return rows


def _max_token_id(data: PreparedData) -> int | None:
    ids = [int(np.asarray(s.tokens).max()) for s in (data.train, data.val) if s is not None and s.num_tokens]
    return max(ids) if ids else None


def _preset_name(params: Params, model: str) -> str:
    return params.cfg.preset if model == "cfg" else params.staged.preset


def _layer_specs(params: Params, model: str, seq_len: int) -> list[LayerSpec]:
    preset = params.preset_for(model)
    d, ff, h, n = preset.d_model, preset.d_ff, preset.n_head, preset.n_layer
    if model == "cfg" and params.cfg.architecture == "block":  # prompt, clean copy, noised copy
        t = params.cfg.max_prompt_tokens + 2 * (seq_len + 1)
        return [LayerSpec(n, d, ff, h, t, t)]
    if model == "cfg":
        p = params.cfg.max_prompt_tokens + 1
        return [LayerSpec(n, d, ff, h, seq_len, seq_len), LayerSpec(n, d, 0, h, p, seq_len),
                LayerSpec(params.cfg.prompt_encoder_layers, d, ff, h, p, p)]
    stage = int(model.split("_")[1])
    specs = [LayerSpec(n, d, ff, h * (2 if stage >= 3 else 1), seq_len, seq_len)]
    if params.staged.mu.full:
        specs.append(LayerSpec(params.staged.mu.layers, 64, 256, 16 + 4, seq_len, seq_len))
    return specs


def _build_config(params: Params, model: str, tokenizer: Any):
    preset = params.preset_for(model)
    vocab = preset.vocab_size or tokenizer.vocab_size
    if model == "cfg" and params.cfg.architecture == "block":  # stage 0's network, at a random init here
        from sunfish.models.block_denoiser import BlockDiffusionConfig, BlockDiffusionLM
        from sunfish.models.staged import StagedLMConfig

        ar = StagedLMConfig.from_params(params.staged, preset, vocab_size=vocab, stage=0, eos_id=tokenizer.eos_id)
        return BlockDiffusionConfig(
            vocab_size=ar.vocab_size, backbone={**BlockDiffusionLM.backbone_from(ar), "dropout": params.cfg.dropout},
            block_size=params.cfg.block_size, max_prompt_tokens=params.cfg.max_prompt_tokens,
            conditioning_dropout=params.cfg.conditioning_dropout, pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id)
    if model == "cfg":
        from sunfish.models.denoiser import DiffusionConfig

        return DiffusionConfig.from_params(params.cfg, preset, vocab_size=vocab, pad_id=tokenizer.pad_id,
                                           eos_id=tokenizer.eos_id)
    from sunfish.models.staged import StagedLMConfig

    return StagedLMConfig.from_params(params.staged, preset, vocab_size=vocab, stage=int(model.split("_")[1]),
                                      eos_id=tokenizer.eos_id)


def _build_model(model: str, config: Any, device: torch.device | str = "cpu") -> nn.Module:
    if model == "cfg" and hasattr(config, "backbone"):
        from sunfish.models.block_denoiser import BlockDiffusionLM

        cls = BlockDiffusionLM
    elif model == "cfg":
        from sunfish.models.denoiser import DiffusionLM

        cls = DiffusionLM
    else:
        from sunfish.models.staged import StagedLM

        cls = StagedLM
    if str(device) == "meta":
        with torch.device("meta"):
            return cls(config)
    return cls(config).to(device)


def _count_params(model: str, config: Any) -> int:
    if model == "cfg" and not hasattr(config, "backbone"):
        from sunfish.models.denoiser import count_parameters

        return count_parameters(config)
    m = _build_model(model, config, "meta")
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def _crop(batch: dict, length: int) -> dict:
    """A pair batch cut to its first ``length`` text positions."""
    out = dict(batch)
    out["text_ids"] = batch["text_ids"][:, :length]
    out["text_mask"] = batch["text_mask"][:, :length]
    return out


def _diagnose_model(
    name: str,
    params: Params,
    data: PreparedData,
    device: torch.device,
    light: bool,
    speeds: dict[str, float],
) -> list[dict]:
    rows: list[dict] = []
    pre = f"{name}/"
    tcfg = params.training_for(name)
    preset = params.preset_for(name)
    preset_key = f"presets.{_preset_name(params, name)}"
    rows += guarded(pre + "config_heads", check_heads, preset, preset_key, name=pre + "config_heads")
    rows += guarded(pre + "config_seq_len", check_seq_len, tcfg, preset, preset_key, name=pre + "config_seq_len")
    rows += guarded(pre + "config_milestones", check_milestones, params, name, name=pre + "config_milestones")
    rows += guarded(pre + "config_effective_batch", check_effective_batch, tcfg, name=pre + "config_effective_batch")
    if name == "stage_3":
        rows += guarded(pre + "config_graph", check_graph_window, params, name, name=pre + "config_graph")
    tok = data.tokenizer
    if tok is None:
        rows.append(make_check(pre + "model_checks", FAIL, None, None,
                               "not run: the prepared tokenizer did not load (see data/load)"))
        return rows
    rows += guarded(pre + "config_vocab", check_vocab, preset.vocab_size or tok.vocab_size, tok.vocab_size,
                    _max_token_id(data), key=f"{preset_key}.vocab_size",
                    configured_vocab=params.tokenizer.vocab_size if params.tokenizer.kind == "bpe" else None,
                    prepared_with=((data.meta or {}).get("tokenizer") or {}).get("requested_vocab_size"),
                    name=pre + "config_vocab")
    if name == "cfg":
        enc = guarded(pre + "prompt_encoder", check_prompt_encoder, params.cfg.prompt_encoder, name=pre + "prompt_encoder")
        rows += enc
        if enc[0]["status"] == FAIL:
            return rows
        if params.cfg.objective == "continuous":
            rows += guarded(pre + "noise_schedule_snr", check_noise_schedule, params.cfg.timesteps,
                            params.cfg.noise_schedule, name=pre + "noise_schedule_snr")
        else:
            rows += guarded(pre + "noise_schedule_snr", check_mask_schedule, tcfg.batch_size, seed=tcfg.seed,
                            name=pre + "noise_schedule_snr")
    try:
        config = _build_config(params, name, tok)
        n_params = _count_params(name, config)
    except Exception as exc:
        rows.append(make_check(pre + "build", FAIL, None, "builds", f"the model cannot be built from params.yaml: {exc}"))
        return rows
    amp = device.type == "cuda" and tcfg.precision in ("auto", "bf16")
    estimate = estimate_training_memory(
        n_params, _layer_specs(params, name, tcfg.seq_len), batch_size=tcfg.batch_size, seq_len=tcfg.seq_len,
        vocab_size=config.vocab_size, activation_bytes=2 if amp else 4)
    avail, _, what = available_memory(device)
    fit = guarded(pre + "config_memory_fit", check_memory_fit, estimate, avail, what=what, preset_key=preset_key,
                  name=pre + "config_memory_fit")
    rows += fit
    if fit[0]["status"] == FAIL:
        return rows
    try:
        torch.manual_seed(tcfg.seed)
        model = _build_model(name, config, device)
    except Exception as exc:
        rows.append(make_check(pre + "build", FAIL, None, "builds", f"the model cannot be built: {type(exc).__name__}: {exc}"))
        return rows
    if device.type == "cpu" and n_params < SMALL_CHECK_MAX_PARAMS:
        torch.set_num_threads(SMALL_CHECK_THREADS)
    train_tokens = data.train.num_tokens if data.train is not None else None
    earlier = 0
    if name != "cfg":
        for k in range(int(name.split("_")[1])):
            t_k = params.training_for(f"stage_{k}")
            earlier += t_k.batch_size * t_k.grad_accum_steps * t_k.seq_len * t_k.max_steps
    rows += guarded(pre + "size_vs_data", check_size_vs_data, model, tcfg.batch_size * tcfg.grad_accum_steps * tcfg.seq_len,
                    tcfg.max_steps, train_tokens, earlier_tokens=earlier, preset_key=preset_key,
                    steps_key=("cfg.budget.max_steps" if name == "cfg" else f"staged.{name}.max_steps") + " / train.max_steps",
                    name=pre + "size_vs_data")

    # batches
    gen = torch.Generator().manual_seed(tcfg.seed)
    if name == "cfg":
        from sunfish.data.dataset import PairDataset

        if not data.pairs.get("train"):
            rows.append(make_check(pre + "model_checks", FAIL, None, None, "not run: no prompt/text pairs (see data/pairs)"))
            return rows
        pairs = PairDataset(data.pairs["train"], tok, tcfg.seq_len, params.cfg.max_prompt_tokens)
        val_pairs = (PairDataset(data.pairs["val"], tok, tcfg.seq_len, params.cfg.max_prompt_tokens)
                     if data.pairs.get("val") else pairs)

        def sample(b: int, t: int, g: torch.Generator, source=pairs) -> dict:
            return _crop(source.sample_batch(b, g), t)

        def sample_val(b: int, t: int, g: torch.Generator) -> dict:
            return sample(b, t, g, val_pairs)
    else:
        if data.train is None or data.train.num_tokens <= tcfg.seq_len:
            rows.append(make_check(pre + "model_checks", FAIL, None, None,
                                   "not run: the train split cannot fill one window (see data/splits)"))
            return rows

        def sample(b: int, t: int, g: torch.Generator) -> dict:
            return data.train.sample_batch(b, t, g)

        val_stream = data.val if data.val is not None and data.val.num_tokens > tcfg.seq_len else data.train

        def sample_val(b: int, t: int, g: torch.Generator) -> dict:
            return val_stream.sample_batch(b, t, g)

    t_probe = min(PROBE_SHAPE[1], tcfg.seq_len)
    probe = sample(PROBE_SHAPE[0], t_probe, gen)
    rows += guarded(pre + "init", check_init, model, probe, params.diagnose.init_loss_tolerance, name=pre + "init")
    rows += guarded(pre + "gradient", check_gradient_flow, model, probe, seed=tcfg.seed, name=pre + "gradient")
    heavy = device.type == "cpu" and n_params > HEAVY_PARAMS_CPU
    if not heavy:  # 3 steps on the probe batch: cheap enough for the light (forward/backward) models too
        rows += guarded(pre + "residual_branches", check_residual_branches, model, probe, seed=tcfg.seed,
                        name=pre + "residual_branches")
    if light:
        return rows
    if name == "cfg":
        rows += guarded(pre + "conditioning_dropout", check_conditioning_dropout, model, name=pre + "conditioning_dropout")
    if heavy:
        rows.append(make_check(pre + "training_probes", WARN, n_params, f"<= {_fmt_count(HEAVY_PARAMS_CPU)} parameters on CPU",
                               f"{_fmt_count(n_params)} parameters: the residual-branch, memorisation, lr-schedule and "
                               "conditioning probes (hundreds of steps) are skipped on CPU; run diagnose on a GPU "
                               "(train.device: cuda) to probe this preset, or use a smaller one"))
    else:
        rows += _training_probes(name, pre, model, params, tcfg, probe, sample, sample_val, gen)

    def full_batch(g: torch.Generator) -> dict:
        return sample(tcfg.batch_size, tcfg.seq_len, g)

    speed = guarded(pre + "speed", measure_speed, model, tcfg, full_batch,
                    estimate_mb=estimate["total"] / 2**20, threads=tcfg.threads, name=pre)
    rows += speed
    step = (speed[0].get("details") or {}).get("step_seconds")
    if isinstance(step, (int, float)):
        speeds[name] = float(step)
    return rows


def _training_probes(name, pre, model, params, tcfg, probe, sample, sample_val, gen) -> list[dict]:
    """The checks that train a copy for a few to a hundred steps on small batches."""
    rows: list[dict] = []
    mem_batch = sample(MEMORIZE_SHAPE[0], min(MEMORIZE_SHAPE[1], tcfg.seq_len), gen)
    rows += guarded(pre + "memorisation", check_memorisation, model, mem_batch,
                    steps=params.diagnose.memorize_steps, target=params.diagnose.memorize_target,
                    lr=memorize_lr(model), seed=tcfg.seed,
                    loss_fn=lambda mod, b: memorisation_loss(mod, b, seed=tcfg.seed),
                    relative_target=MEMORIZE_RELATIVE.get(getattr(model, "kind", "staged")), name=pre + "memorisation")
    t_lr = min(LR_SANITY_SHAPE[1], tcfg.seq_len)
    lr_batches = [sample(LR_SANITY_SHAPE[0], t_lr, gen) for _ in range(min(LR_SANITY_STEPS, tcfg.max_steps))]
    eval_batch = sample_val(8, t_lr, gen)
    lr_key = "cfg.budget.lr" if name == "cfg" else f"staged.{name}.lr"
    rows += guarded(pre + "lr_schedule", check_lr_schedule, model, tcfg, lr_batches, eval_batch, seed=tcfg.seed,
                    lr_key=f"{lr_key} / train.lr", name=pre + "lr_schedule")
    if name == "cfg":
        rows += guarded(pre + "conditioning_effect", check_conditioning_effect, model,
                        lr_batches[:CONDITIONING_STEPS], sample_val(8, t_lr, gen), seed=tcfg.seed,
                        name=pre + "conditioning_effect")
    return rows


def _pipeline_eta(params: Params, speeds: dict[str, float]) -> dict | None:
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
    text = ", ".join(f"{m} {_fmt_seconds(s)}" for m, s in parts.items())
    note = f" ({', '.join(estimated)} at the measured staged step time)" if estimated else ""
    status = WARN if total > ETA_WARN_SECONDS else OK
    message = f"training all models ~ {_fmt_seconds(total)}: {text}{note}"
    if status == WARN:
        message += "; more than a day: lower train.max_steps or pick a smaller preset"
    return make_check("pipeline/eta", status, round(total, 1), f"<= {_fmt_seconds(ETA_WARN_SECONDS)}", message, parts)


def run_diagnostics(params: Params, prepared_dir: Path, models: list[str] | None = None) -> dict:
    """Every check for ``models`` (default: stage_0 in full, stage_3 forward/backward only, cfg in full)."""
    from sunfish.training.loop import pick_device, set_threads

    started = time.perf_counter()
    prepared_dir = Path(prepared_dir)
    explicit = bool(models)
    chosen = list(dict.fromkeys(models)) if models else list(DEFAULT_MODELS)
    unknown = [m for m in chosen if m not in MODEL_NAMES]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {list(MODEL_NAMES)}")
    checks: list[dict] = []
    first = params.training_for(chosen[0])
    threads_before = torch.get_num_threads()
    try:
        device = pick_device(first.device)
    except RuntimeError as exc:
        checks.append(make_check("environment", FAIL, first.device, "an available device", f"train.device: {exc}"))
        device = torch.device("cpu")
    set_threads(first.threads)
    try:
        env = environment(device)
        checks.append(make_check("environment", OK, f"{device.type}, {_plural(env['threads'], 'thread')}", "reported",
                                 f"torch {env['torch']}, Python {env['python']}, {env['cpu_count']} CPUs, "
                                 f"{env.get('device_name', '') + ', ' if env.get('device_name') else ''}"
                                 f"{env.get('memory_available_mb') or '?'} MB available"))
        data = _load_prepared(prepared_dir, "cfg" in chosen, checks)
        seq_model = next((m for m in chosen if m != "cfg"), chosen[0])
        tcfg = params.training_for(seq_model)
        try:
            checks += _data_checks(data, params, tcfg.seq_len, tcfg.batch_size, "cfg" in chosen,
                                   tcfg.batch_size * tcfg.grad_accum_steps * tcfg.max_steps)
        except Exception as exc:  # each data check is guarded; this catches the glue
            checks.append(make_check("data/checks", FAIL, None, None, f"data checks stopped: {type(exc).__name__}: {exc}"[:600]))
        speeds: dict[str, float] = {}
        for name in chosen:
            light = not explicit and name in LIGHT_BY_DEFAULT
            try:
                checks += _diagnose_model(name, params, data, device, light, speeds)
            except Exception as exc:  # a bug in the glue must still give a report
                checks.append(make_check(f"{name}/model_checks", FAIL, None, None,
                                         f"diagnosis of {name} stopped: {type(exc).__name__}: {exc}"[:600]))
        eta = _pipeline_eta(params, speeds)
        if eta:
            checks.append(eta)
    finally:
        torch.set_num_threads(threads_before)
    counts = {s: sum(1 for c in checks if c["status"] == s) for s in (OK, WARN, FAIL)}
    return {
        "status": worst(c["status"] for c in checks),
        "counts": counts,
        "checks": checks,
        "environment": env,
        "models": chosen,
        "seconds": round(time.perf_counter() - started, 2),
    }


# ----------------------------------------------------------------------------------------------
# the terminal table


def _short(value: Any, width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, dict):
        text = ", ".join(f"{k}={_short(v, width)}" for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_short(v, width) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(report: dict, width: int = 120) -> str:
    """A readable terminal table grouped by scope (data, each model, pipeline): one line per check
    with its value and threshold, the message beside or under it (in full for warnings and failures),
    and a closing list of what to change."""
    checks = report.get("checks") or []
    counts = report.get("counts") or {s: sum(1 for c in checks if c.get("status") == s) for s in (OK, WARN, FAIL)}
    env = report.get("environment") or {}
    status = str(report.get("status", "?")).upper()
    head = (f"SunFish diagnose: {status}  ({counts.get(OK, 0)} ok, {counts.get(WARN, 0)} warn, {counts.get(FAIL, 0)} fail)"
            + (f" in {report['seconds']:.1f} s" if isinstance(report.get("seconds"), (int, float)) else "")
            + (f" on {env.get('device')}, {_plural(env.get('threads'), 'thread')}, torch {env.get('torch')}" if env else ""))
    short_names = [str(c.get("name", "?")).split("/", 1)[-1] for c in checks]
    name_w = min(max((len(n) for n in short_names), default=10), 28)
    val_w, thr_w = 18, 24
    lead = 2 + 4 + 2
    lines = [head, "=" * min(width, len(head)),
             f"{'':2}{'':4}  {'CHECK':<{name_w}}  {'VALUE':<{val_w}}  {'THRESHOLD':<{thr_w}}  MESSAGE"]
    indent = " " * (lead + name_w + 2)
    marks = {OK: "ok", WARN: "WARN", FAIL: "FAIL"}
    scope = None
    for c, short in zip(checks, short_names):
        name = str(c.get("name", "?"))
        this_scope = name.split("/", 1)[0] if "/" in name else "general"
        if this_scope != scope:
            lines += ["", f"[{this_scope}]"]
            scope = this_scope
        st = c.get("status", "?")
        msg = " ".join(str(c.get("message") or "").split())
        row = (f"{'':2}{marks.get(st, st):<4}  {_short(short, name_w):<{name_w}}  {_short(c.get('value'), val_w):<{val_w}}  "
               f"{_short(c.get('threshold'), thr_w):<{thr_w}}  ")
        room = width - len(row)
        if len(msg) <= room:
            lines.append(row + msg)
            continue
        lines.append(row.rstrip())
        wrapped = textwrap.wrap(msg, width=width - len(indent))
        if st == OK and len(wrapped) > 2:
            wrapped = wrapped[:2]
            wrapped[-1] = wrapped[-1][: width - len(indent) - 1] + "…"
        lines += [indent + w for w in wrapped]
    bad = [c for c in checks if c.get("status") in (WARN, FAIL)]
    if bad:
        lines += ["", "What to change:"]
        for c in sorted(bad, key=lambda c: -_SEVERITY.get(c.get("status"), 0)):
            lines += textwrap.wrap(f"[{str(c['status']).upper()}] {c['name']}: {c.get('message', '')}", width=width,
                                   initial_indent="  - ", subsequent_indent="    ")
    else:
        lines += ["", "Nothing to change: every check passed."]
    return "\n".join(lines)
