"""Residual branches: does each block actually add its branch to the residual stream?

A residual branch gated to ~0.1 (``x + 0.1 * f(x)``) was the original SunFish's worst bug: under Adam
each branch then moves the stream 10x slower, the deep layers barely learn and the model trains like
a much shallower one. Nothing crashes and the loss still falls, only slowly.

Measured after ``RESIDUAL_STEPS`` training steps (zero-initialised branches open within them):

- ratio: ``||block(x) - x|| / ||x||`` below ``RESIDUAL_RATIO_MIN`` in every block warns: the network
  is nearly the identity;
- gain: the factor with which a block adds its branch outputs to the stream, fitted by least squares
  on the outputs of its Linear layers (exactly 1 for ``x + f(x)`` in any architecture, 0.1 for
  ``x + 0.1 * f(x)``); below ``RESIDUAL_GAIN_MIN`` in any block warns. The ratio alone cannot catch
  the gated branch: a healthy ratio ranges over 0.1..1 with the architecture and init, so 0.1 x a
  healthy one still looks plausible.

Only Linear outputs fitted at ``RESIDUAL_WRITER_SHARE`` of the largest coefficient or more write to
the stream (a cross-attention query, say, gets ~0), and the gain counts only where the Linear outputs
explain ``block(x) - x`` to within ``RESIDUAL_FIT_MAX_ERROR`` (a norm after the residual add breaks
the linear relation). A warning names the block's learnable parameters that look like a gate
(``GATE_NAME_HINTS``) and hold about the measured gain.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from sunfish.diagnose.core import OK, WARN, device_of, make_check, seeded, to_device, trainable

RESIDUAL_RATIO_MIN = 0.01
RESIDUAL_STEPS = 3
RESIDUAL_GAIN_MIN = 0.5  # a plain residual adds its branch with gain 1; the original gated it to ~0.1
RESIDUAL_WRITER_SHARE = 0.05  # Linear outputs fitted below 5% of the largest gain do not write to the stream
RESIDUAL_FIT_MAX_ERROR = 0.05  # the Linear outputs must explain block(x) - x to 5% for the gain to count
GATE_NAME_HINTS = ("gate", "scale", "alpha", "gamma", "rezero")


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
        with torch.no_grad(), seeded(seed):
            model.training_loss(to_device(batch, device_of(model)))
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
    params = [p for _, p in trainable(m)]
    batch = to_device(batch, device_of(m))
    if params and steps > 0:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for i in range(steps):
            with seeded(seed + i):
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
