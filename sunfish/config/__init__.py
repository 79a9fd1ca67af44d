"""Typed configuration: the one place that says what params.yaml may contain.

Every section of params.yaml has a pydantic model (:mod:`sunfish.config.sections`) with
``extra="forbid"``, so a misspelt key is an error rather than a silently ignored setting. Its field
defaults are the values params.yaml sets, so each default has one home (tests/test_config_defaults.py
keeps them equal). Cross-section rules (a preset that exists, a milestone inside its run, a sequence
that fits the model) are checked after parsing (:mod:`sunfish.config.params`), and every problem is
reported with its dotted key, the offending value and what is allowed (:mod:`sunfish.config.load`).

Modules: ``base`` (model names, :class:`ParamsError`, the section base class, budgets),
``sections`` (one model per section), ``params`` (:class:`Params` and its derived views),
``load`` (reading and validating a params file), ``generation`` (the sampling defaults a diffusion
checkpoint carries in its ``generation_config.json``).

This package must stay importable without torch: the CLI and the DVC ``validate`` stage use it to
fail fast, before any heavy import. Import its names from here (``from sunfish.config import X``).
"""

from __future__ import annotations

from sunfish.config.base import (
    CONTROL_NAMES,
    EVALUATED_MODELS,
    MODEL_NAMES,
    STAGE_SEED_STRIDE,
    STAGED_MODELS,
    Budget,
    ParamsError,
    Section,
    check_milestones,
    control_of,
)
from sunfish.config.generation import GENERATION_CONFIG, GenerationConfig
from sunfish.config.load import flatten, load_params, parse_params
from sunfish.config.params import Params
from sunfish.config.sections import (
    DEFAULT_PRESETS,
    CfgConfig,
    DataConfig,
    DiagnoseConfig,
    EvalConfig,
    FluencyConfig,
    GraphConfig,
    K1Config,
    ModelPreset,
    MUConfig,
    ReportConfig,
    ResolvedTraining,
    SamplingConfig,
    StagedConfig,
    TemporalConfig,
    TokenizerConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "CONTROL_NAMES", "DEFAULT_PRESETS", "EVALUATED_MODELS", "GENERATION_CONFIG", "MODEL_NAMES", "STAGED_MODELS",
    "STAGE_SEED_STRIDE", "Budget", "CfgConfig", "DataConfig", "DiagnoseConfig", "EvalConfig", "FluencyConfig",
    "GenerationConfig", "GraphConfig", "K1Config", "MUConfig", "ModelPreset", "Params", "ParamsError",
    "ReportConfig", "ResolvedTraining", "SamplingConfig", "Section", "StagedConfig", "TemporalConfig", "TokenizerConfig",
    "TrackingConfig", "TrainConfig", "check_milestones", "control_of", "flatten", "load_params", "parse_params",
]
