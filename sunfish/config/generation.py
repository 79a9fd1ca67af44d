"""The sampling defaults a diffusion checkpoint carries: its ``generation_config.json``.

Like a Hugging Face generation config, the file sits beside ``config.json`` and says how the model
is sampled when no one says otherwise: `sunfish sample` takes every setting its flags leave open
from it, never from a params.yaml in the current directory. It is written when the checkpoint is
saved (``save_checkpoint(..., generation_config=...)``), from params.yaml's ``sampling`` section
and ``eval.cfg_seq_len`` (the length the evaluate stage samples at). A checkpoint saved before the
file existed samples with the schema defaults of the same keys (:class:`GenerationConfig` ``()``).

The file is a JSON object: ``format_version`` (1) and the fields of :class:`GenerationConfig`,
named as the params keys they come from::

    {"format_version": 1, "guidance_scale": 1.0, "guidance": "token", "guidance_candidates": 4,
     "num_steps": 64, "scheduler": "ddim", "eta": 0.0, "top_p": 0.8, "seq_len": 64}
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from sunfish.config.base import Section
from sunfish.config.sections import EvalConfig, SamplingConfig

GENERATION_CONFIG = "generation_config.json"
GENERATION_FORMAT = 1


def _same_as(model: type[Section], name: str) -> FieldInfo:
    """The field ``name`` of ``model`` (range, default, description): each setting has one home."""
    return copy.deepcopy(model.model_fields[name])


class GenerationConfig(Section):
    """Sampling settings of a diffusion checkpoint: params.yaml's sampling section (each field is the
    params field it is named after) and seq_len, from eval.cfg_seq_len."""

    guidance_scale: float = _same_as(SamplingConfig, "guidance_scale")
    guidance: Literal["sequence", "token"] = _same_as(SamplingConfig, "guidance")
    guidance_candidates: int = _same_as(SamplingConfig, "guidance_candidates")
    num_steps: int = _same_as(SamplingConfig, "num_steps")
    scheduler: Literal["ddim", "ddpm"] = _same_as(SamplingConfig, "scheduler")
    eta: float = _same_as(SamplingConfig, "eta")
    top_p: float = _same_as(SamplingConfig, "top_p")
    seq_len: int = _same_as(EvalConfig, "cfg_seq_len")

    @classmethod
    def from_params(cls, params: Any) -> GenerationConfig:
        """The settings of a validated :class:`sunfish.config.Params` (its sampling and eval sections)."""
        return cls(**params.sampling.model_dump(), seq_len=params.eval.cfg_seq_len)

    def to_json(self) -> str:
        return json.dumps({"format_version": GENERATION_FORMAT, **self.model_dump()}, indent=2) + "\n"

    @classmethod
    def from_mapping(cls, data: Any, source: str) -> tuple[GenerationConfig, list[str]]:
        """Parse a generation_config.json object; keys it lacks take the schema defaults.

        Returns the config and the keys it did not know (a newer SunFish may add some: ignored).
        Raises ValueError naming ``source``, the key and its value when a value is not allowed.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version", GENERATION_FORMAT)
        if version != GENERATION_FORMAT or isinstance(version, bool):
            raise ValueError(f"{source}: format_version {version!r}; this SunFish reads {GENERATION_FORMAT}")
        known = {k: v for k, v in data.items() if k in cls.model_fields}
        unknown = sorted(k for k in data if k not in cls.model_fields and k != "format_version")
        try:
            return cls.model_validate(known), unknown
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e.get('input')!r} is invalid: {e['msg']}"
                                 for e in exc.errors())
            raise ValueError(f"{source}: {problems}") from None
