"""K-1 hierarchical credit assignment (train stage 2 onward).

Call after ``loss.backward()`` and gradient clipping, before ``optimizer.step()``::

    stats = k1_attribution(model.named_parameters(), cfg.k1_path_mass, model.component_of)
    if cfg.k1_mode == "scale":
        stats.update(k1_scale_(model.named_parameters()))

or let the training loop do it: ``after_clip = make_k1_hook(mode, path_mass, every=log_every)``.

Definitions (n_p = the L2 norm of parameter tensor p's gradient; tensors without a gradient are
ignored):

- the **error path** is the smallest set of tensors whose summed gradient norms reach
  ``path_mass`` of the sum of all n_p — take tensors in decreasing n_p until the running sum
  reaches ``path_mass * sum(n)``;
- **scaling** multiplies each gradient by ``min(1, n_p / mean(n))``: tensors with a below-average
  gradient norm (off the error path) get proportionally smaller updates, the others are untouched.

Why two modes: with Adam-type optimisers a constant per-tensor gradient scale is almost cancelled
by the second-moment normalisation, so ``scale`` can act only through how the scale changes from
step to step (and through epsilon); whether that helps is an empirical question, answered at equal
steps against a control (README, "What each component adds"). ``log`` measures the error path
without touching an update, so a stage trained with it is the same run as one trained without K-1:
the pipeline then does not train control_2 at all (``pipeline.train_staged``), and the report calls
K-1 attribution only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["gradient_norms", "k1_attribution", "k1_scale_", "k1_metrics", "make_k1_hook"]


def gradient_norms(named_params: Iterable[tuple[str, Tensor]]) -> tuple[list[str], list[Tensor], Tensor]:
    """Names, gradients and their L2 norms (float32 ``[N]``) of the tensors that have a gradient."""
    names, grads = [], []
    for name, p in named_params:
        if p.grad is not None:
            names.append(name)
            grads.append(p.grad)
    if not grads:
        return names, grads, torch.zeros(0)
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
    return names, grads, norms


def k1_attribution(
    named_params: Iterable[tuple[str, Tensor]],
    path_mass: float = 0.9,
    component_of: Callable[[str], str] | None = None,
) -> dict:
    """Find the error path and attribute gradient norm to components.

    Returns a JSON-friendly dict:

    - ``k1_tensors``: tensors with a gradient; ``k1_grad_norm``: their global L2 norm;
    - ``k1_path_size``: tensors on the error path; ``k1_path_share``: that count over ``k1_tensors``;
      ``k1_path_mass``: the share of the summed norms the path actually holds (>= ``path_mass``);
    - ``path_members``: names on the path, largest gradient first;
    - ``components``: ``{component: {"tensors", "path_tensors", "norm_share"}}`` with
      ``norm_share`` = the component's summed n_p over the total (``component_of`` defaults to the
      first dotted part of the name).
    """
    if not 0.0 < path_mass <= 1.0:
        raise ValueError(f"path_mass must be in (0, 1], got {path_mass}")
    names, _, norms = gradient_norms(named_params)
    component_of = component_of or (lambda n: n.split(".")[0])
    if not names:
        return {"k1_tensors": 0, "k1_grad_norm": 0.0, "k1_path_size": 0, "k1_path_share": 0.0,
                "k1_path_mass": 0.0, "path_members": [], "components": {}}
    total = norms.sum()
    order = torch.argsort(norms, descending=True)
    cumulative = torch.cumsum(norms[order], dim=0)
    # smallest count whose running sum reaches path_mass of the total (tolerate rounding)
    reached = cumulative >= path_mass * total * (1 - 1e-6)
    size = int(reached.float().argmax()) + 1 if bool(reached.any()) else len(names)
    on_path = order[:size].tolist()
    norm_list = norms.tolist()
    denominator = float(total) if float(total) > 0 else 1.0
    members = [names[i] for i in on_path]
    path_set = set(on_path)
    components: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        entry = components.setdefault(
            component_of(name), {"tensors": 0, "path_tensors": 0, "norm_share": 0.0}
        )
        entry["tensors"] += 1
        entry["path_tensors"] += int(i in path_set)
        entry["norm_share"] += norm_list[i] / denominator
    return {
        "k1_tensors": len(names),
        "k1_grad_norm": float(torch.linalg.vector_norm(norms)),
        "k1_path_size": size,
        "k1_path_share": size / len(names),
        "k1_path_mass": float(cumulative[size - 1]) / denominator,
        "path_members": members,
        "components": components,
    }


@torch.no_grad()
def k1_scale_(named_params: Iterable[tuple[str, Tensor]]) -> dict[str, float]:
    """Scale each gradient in place by ``min(1, n_p / mean(n))``.

    Returns ``{"k1_mean_norm", "k1_scaled_tensors", "k1_min_scale"}``.
    """
    _, grads, norms = gradient_norms(named_params)
    if not grads:
        return {"k1_mean_norm": 0.0, "k1_scaled_tensors": 0, "k1_min_scale": 1.0}
    mean = norms.mean()
    if float(mean) == 0.0:
        return {"k1_mean_norm": 0.0, "k1_scaled_tensors": 0, "k1_min_scale": 1.0}
    scales = torch.clamp(norms / mean, max=1.0)
    torch._foreach_mul_(grads, scales.tolist())
    return {
        "k1_mean_norm": float(mean),
        "k1_scaled_tensors": int((scales < 1).sum()),
        "k1_min_scale": float(scales.min()),
    }


def k1_metrics(attribution: dict) -> dict[str, float]:
    """The numeric part of a :func:`k1_attribution` result, flat, for MLflow:
    ``k1_path_size``, ``k1_path_share``, ``k1_path_mass``, ``k1_grad_norm``, ``k1_tensors``,
    ``k1_norm_share/<component>`` and ``k1_path_tensors/<component>``."""
    out = {k: float(v) for k, v in attribution.items() if k.startswith("k1_")}
    for component, entry in attribution.get("components", {}).items():
        out[f"k1_norm_share/{component}"] = float(entry["norm_share"])
        out[f"k1_path_tensors/{component}"] = float(entry["path_tensors"])
    return out


def make_k1_hook(
    mode: str, path_mass: float, every: int = 1
) -> Callable[[torch.nn.Module, int], dict[str, float]]:
    """An ``after_clip(model, step) -> metrics`` hook for the training loop.

    ``mode="scale"`` scales the gradients every step; ``"log"`` leaves them alone. The attribution
    is computed on step 1 and every ``every`` steps (it needs a host sync), after which its flat
    metrics (:func:`k1_metrics`) are returned; other steps return only the scaling figures (or
    nothing). The latest full attribution, members included, is kept on ``hook.last_attribution``.
    """
    if mode not in ("log", "scale"):
        raise ValueError(f"k1 mode must be 'log' or 'scale', got {mode!r}")

    def hook(model: torch.nn.Module, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if step == 1 or step % max(1, every) == 0:
            component_of = getattr(model, "component_of", None)
            attribution = k1_attribution(model.named_parameters(), path_mass, component_of)
            hook.last_attribution = attribution
            metrics.update(k1_metrics(attribution))
        if mode == "scale":
            metrics.update({k: float(v) for k, v in k1_scale_(model.named_parameters()).items()})
        return metrics

    hook.last_attribution = None
    return hook
