"""Model registry: ``build_model(kind, config_dict)`` -> ``nn.Module``.

Imports are lazy, so ``import sunfish.models`` does not import torch and a model family whose module
is missing does not break the others.
"""

from __future__ import annotations

import importlib
from typing import Any

# kind -> (module, model class, config class); the config class has from_dict
MODEL_REGISTRY: dict[str, tuple[str, str, str]] = {
    "staged": ("sunfish.models.staged", "StagedLM", "StagedLMConfig"),
    "diffusion": ("sunfish.models.denoiser", "DiffusionLM", "DiffusionConfig"),
    "block_diffusion": ("sunfish.models.block_denoiser", "BlockDiffusionLM", "BlockDiffusionConfig"),
}
DIFFUSION_KINDS = frozenset({"diffusion", "block_diffusion"})


def is_diffusion(kind: str) -> bool:
    """Both prompt-conditioned diffusion families: sampled with guidance, scored by an ELBO."""
    return kind in DIFFUSION_KINDS

__all__ = ["DIFFUSION_KINDS", "MODEL_REGISTRY", "build_model", "is_diffusion", "model_class"]


def model_class(kind: str) -> tuple[type, type]:
    """(model class, config class) registered for ``kind``."""
    if kind not in MODEL_REGISTRY:
        raise KeyError(f"unknown model kind {kind!r}; known: {', '.join(sorted(MODEL_REGISTRY))}")
    module_name, model_name, config_name = MODEL_REGISTRY[kind]
    module = importlib.import_module(module_name)
    return getattr(module, model_name), getattr(module, config_name)


def build_model(kind: str, config: dict[str, Any] | Any) -> Any:
    """Build a freshly initialised model of ``kind`` from its config dict (``config.to_dict()``).

    A config object (with ``to_dict``) is accepted too.
    """
    model_cls, config_cls = model_class(kind)
    if not isinstance(config, dict):
        config = config.to_dict()
    return model_cls(config_cls.from_dict(dict(config)))
