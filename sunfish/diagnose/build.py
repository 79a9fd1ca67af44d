"""Building the models a params.yaml describes, for the model checks.

The checks must look at the network training will run, so the configs come from the same
``from_params`` constructors as the training stages. ``count_params`` builds on the meta device (no
memory), so that a preset too large for the machine fails the memory check before it is built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sunfish.config import Params


def preset_name(params: Params, model: str) -> str:
    """The preset a model is built from, for remedies that name ``presets.<name>``."""
    return params.cfg.preset if model == "cfg" else params.staged.preset


def build_config(params: Params, model: str, tokenizer: Any):
    """The model config training would build for ``model`` (the vocabulary from the prepared tokenizer)."""
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


def build_model(model: str, config: Any, device: torch.device | str = "cpu") -> nn.Module:
    """The model of ``config``; on the meta device it has shapes but no memory."""
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


def count_params(model: str, config: Any) -> int:
    """Trainable parameters of the model, without allocating its weights."""
    if model == "cfg" and not hasattr(config, "backbone"):
        from sunfish.models.denoiser import count_parameters

        return count_parameters(config)
    m = build_model(model, config, "meta")
    return sum(p.numel() for p in m.parameters() if p.requires_grad)
