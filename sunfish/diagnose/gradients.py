"""Gradient flow: does every trainable tensor get a usable gradient?

A component that is switched on but disconnected (a ``.detach()``, ``torch.no_grad()``, an output
multiplied by a zero that never moves) trains nothing and still costs compute; a branch gated nearly
shut learns too slowly to matter; NaN or huge gradients wreck training from the first steps.

Over ``GRAD_PASSES`` backward passes separated by AdamW steps at ``GRAD_WARM_LR`` (more, up to
``GRAD_MAX_PASSES``, while a tensor has had none: branches used at random, like self-conditioning):

- a tensor that never gets a non-zero gradient (None, or exactly zero: cut from the loss) fails;
- NaN/inf in the loss or a gradient fails;
- vanishing: every tensor of a module (e.g. ``blocks.1.attn``) below ``VANISHING_MEAN_ABS`` mean
  |grad| and ``VANISHING_RELATIVE`` times the median tensor's warns. Judged per module, because the
  queries of identity-initialised attention alone start second-order small, which is fine;
- exploding: a tensor's gradient norm above ``EXPLODING_NORM`` warns.

Zero-initialised output projections are by design: their own gradient is non-zero, and what sits
behind them receives gradient once they have moved. ``COMPONENT_KEYS`` maps a component to its
params.yaml section, so that a finding names the setting to change.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sunfish.diagnose.core import (
    FAIL,
    OK,
    WARN,
    component_of,
    device_of,
    make_check,
    seeded,
    to_device,
    trainable,
)

VANISHING_MEAN_ABS = 1e-6
VANISHING_RELATIVE = 1e-3  # ... and 1000x below the median tensor (see check_gradient_flow)
EXPLODING_NORM = 100.0
GRAD_PASSES = 3
GRAD_MAX_PASSES = 8  # more passes only while some tensor has not yet had a gradient (stochastic branches)
GRAD_WARM_LR = 1e-3
GRAD_LAYERS_SHOWN = 80  # per-layer gradient figures kept in the report's details

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
    params = trainable(m)
    if not params:
        return [make_check(f"{name}_flow", FAIL, 0, "> 0 trainable tensors",
                           "the model has no trainable parameters (all frozen, requires_grad=False): nothing can learn")]
    batch = to_device(batch, device_of(m))
    stats = {n: _GradStats() for n, _ in params}
    opt = torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=0.0)
    nonfinite_loss = None
    done = 0
    for i in range(max(passes, max_passes)):
        opt.zero_grad(set_to_none=True)
        with seeded(seed + i):
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
        shown = [f"{n}{fmt(n)} ({component_of(m, n)})" for n in names[:6]]
        return ", ".join(shown) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    def keys_for(names: list[str]) -> str:
        keys = sorted({COMPONENT_KEYS[c] for c in (component_of(m, n) for n in names) if c in COMPONENT_KEYS})
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
