"""Budget checks: does the model suit the data it will see and the memory it will run in?

A model far too large for the steps it gets stays undertrained and writes gibberish; one far too
small wastes the run; too many passes over a small corpus memorise it. Tokens seen per parameter
(earlier stages included: stage N warm-starts from stage N-1) below ``TOKENS_PER_PARAM_LOW`` or above
``TOKENS_PER_PARAM_HIGH`` warns (Chinchilla-optimal is about 20); more than ``MAX_EPOCHS`` passes
over the training split warns.

A preset too large for the machine should fail in a second, before it is built, rather than after
minutes of allocation or an out-of-memory kill: the estimate of one training step (weights +
gradients + 2 AdamW copies + activations + logits) above the available memory fails, above
``MEMORY_WARN_SHARE`` of it warns. The estimate is rough (+-50%); the speed check measures the real
peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from sunfish.config import Params
from sunfish.diagnose.core import FAIL, OK, WARN, component_of, fmt_count, make_check

TOKENS_PER_PARAM_LOW = 0.05
TOKENS_PER_PARAM_HIGH = 2000.0
MAX_EPOCHS = 20.0
MEMORY_WARN_SHARE = 0.7


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


def layer_specs(params: Params, model: str, seq_len: int) -> list[LayerSpec]:
    """The layers of ``model`` as the memory estimate sees them (attention lengths differ per architecture)."""
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


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per component (``model.component_of``); tied tensors count once."""
    counts: dict[str, int] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            comp = component_of(model, n)
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
    by_comp = ", ".join(f"{k} {fmt_count(v)}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    epochs = None
    if train_tokens:
        epochs = seen / train_tokens
        details["epochs"] = round(epochs, 2)
    head = (f"{fmt_count(n_params)} parameters ({by_comp}); {max_steps} steps x {tokens_per_step:,} tokens"
            + (f" + {fmt_count(earlier_tokens)} from earlier stages" if earlier_tokens else "")
            + f" = {fmt_count(seen)} tokens, {tpp:.3g} per parameter")
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
