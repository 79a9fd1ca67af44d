"""The names every part of the configuration shares: models, the error type, the section base class.

Torch-free, like the whole ``sunfish.config`` package.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MODEL_NAMES = ("stage_0", "stage_1", "stage_2", "stage_3", "cfg")
STAGED_MODELS = MODEL_NAMES[:4]
# control_N continues stage N-1 for stage N's budget without stage N's new component, so the report
# can say what the component adds at equal extra training (stage_N vs control_N, same steps).
CONTROL_NAMES = ("control_1", "control_2", "control_3")
STAGE_SEED_STRIDE = 1000  # stage N (and control_N) trains with seed train.seed + 1000 N; extra seeds add 1, 2, ...

# Every model the evaluate stage scores, in report order.
EVALUATED_MODELS = (*STAGED_MODELS, *CONTROL_NAMES, "cfg")


def control_of(stage_model: str) -> str | None:
    """The control model of ``stage_N`` (None for stage_0 and the diffusion model)."""
    name = stage_model.replace("stage_", "control_")
    return name if name in CONTROL_NAMES else None


class ParamsError(ValueError):
    """A params file that cannot be used; ``problems`` holds one line per bad key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid parameters in {source}:\n{lines}")


def _is_number(annotation: Any) -> bool:
    """int, float, or an optional one (``int | None``)."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(a in (int, float) for a in args)
    return False


def _merged(default: dict, given: dict) -> dict:
    out = dict(default)
    for key, value in given.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _unwritten_keys_keep_their_defaults(cls, data: Any) -> Any:
        # params.yaml writes a sub-section in part (`stage_1: {max_steps: 100}`, or `{}`): the keys it
        # leaves out mean their defaults, as a section left out does, not the sub-model's own defaults
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if field is None or not isinstance(value, dict) or field.is_required():
                continue
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                out[name] = _merged(default.model_dump(), value)
        return out

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic would read `lr: yes` as 1.0 and `max_steps: true` as 1; YAML makes that an easy slip
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _is_number(field.annotation):
            raise ValueError("expected a number, got a true/false value")
        return value


def check_milestones(v: list[int] | None) -> list[int] | None:
    """Milestones must be positive, strictly increasing step numbers (None: not set)."""
    if v is None:
        return v
    if any(m < 1 for m in v):
        raise ValueError(f"milestones must be positive step numbers, got {v}")
    if sorted(set(v)) != list(v):
        raise ValueError(f"milestones must be strictly increasing, got {v}")
    return v


class Budget(Section):
    """Per-model overrides of the shared training settings; null means "use train.*"."""

    max_steps: int | None = Field(None, ge=1)
    milestones: list[int] | None = None
    lr: float | None = Field(None, gt=0.0, le=1.0)
    warmup_steps: int | None = Field(None, ge=0)
