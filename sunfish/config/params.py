"""The whole params.yaml (:class:`Params`): its sections, the views stages use, cross-section rules."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from sunfish.config.base import CONTROL_NAMES, MODEL_NAMES, STAGE_SEED_STRIDE, STAGED_MODELS, Budget, Section
from sunfish.config.sections import (
    DEFAULT_PRESETS,
    CfgConfig,
    DataConfig,
    DiagnoseConfig,
    EvalConfig,
    ModelPreset,
    ReportConfig,
    ResolvedTraining,
    SamplingConfig,
    StagedConfig,
    TokenizerConfig,
    TrackingConfig,
    TrainConfig,
)


class Params(Section):
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    # the built-in shapes plus the file's own: a name written in params.yaml adds a preset or replaces
    # the built-in of that name, so a params file names only the presets it changes
    presets: dict[str, ModelPreset] = Field(default_factory=lambda: dict(DEFAULT_PRESETS))
    train: TrainConfig = TrainConfig()
    staged: StagedConfig = StagedConfig()
    cfg: CfgConfig = CfgConfig()
    sampling: SamplingConfig = SamplingConfig()
    eval: EvalConfig = EvalConfig()
    diagnose: DiagnoseConfig = DiagnoseConfig()
    report: ReportConfig = ReportConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("presets", mode="before")
    @classmethod
    def _over_the_built_ins(cls, value: Any) -> Any:
        return {**DEFAULT_PRESETS, **value} if isinstance(value, dict) else value

    # -- derived views --------------------------------------------------------------------------

    def preset_for(self, model: str) -> ModelPreset:
        name = self.cfg.preset if model == "cfg" else self.staged.preset
        return self.presets[name]

    def budget_for(self, model: str) -> Budget:
        """A model's own budget; control_N shares stage_N's, so both get the same extra training."""
        if model == "cfg":
            return self.cfg.budget
        if model in CONTROL_NAMES:
            model = model.replace("control_", "stage_")
        if model not in STAGED_MODELS:
            raise KeyError(
                f"unknown model {model!r}; expected one of {', '.join((*MODEL_NAMES, *CONTROL_NAMES))}"
            )
        return getattr(self.staged, model)

    def training_for(self, model: str) -> ResolvedTraining:
        """train.* merged with the model's own budget (staged.stage_N or cfg.budget; control_N: stage_N's)."""
        budget = self.budget_for(model)
        base = self.train.model_dump()
        for key, value in budget.model_dump().items():
            if value is not None:
                base[key] = value
        if budget.max_steps is not None and budget.milestones is None:
            # milestones written for train.max_steps make no sense for another length: scale them
            base["milestones"] = sorted(
                {max(1, round(m * budget.max_steps / self.train.max_steps)) for m in self.train.milestones}
            )
        base["milestones"] = [m for m in base["milestones"] if m <= base["max_steps"]]
        if base["max_steps"] not in base["milestones"]:
            base["milestones"].append(base["max_steps"])
        base["seq_len"] = self.train.seq_len or self.preset_for(model).seq_len
        kind, _, n = model.partition("_")
        if kind in ("stage", "control") and n.isdigit() and int(n) > 0:
            # stage N draws its batches from its own stream, or it would replay the batches stage 0
            # began with; control_N shares stage N's stream, so seed s of both sees the same batches
            base["seed"] = self.train.seed + STAGE_SEED_STRIDE * int(n)
        return ResolvedTraining(model=model, **base)

    def consistency_problems(self) -> list[str]:
        """Rules that span sections; each line names the key, the value and what is allowed."""
        problems: list[str] = []
        names = sorted(self.presets)
        for key, preset in self.presets.items():
            problems += preset.check(f"presets.{key}")
        for key, chosen in (("staged.preset", self.staged.preset), ("cfg.preset", self.cfg.preset)):
            if chosen not in self.presets:
                problems.append(f"{key}: {chosen!r} is not a preset; choose one of {names}")
        if problems:
            return problems
        if self.tokenizer.kind == "pretrained" and not self.tokenizer.pretrained:
            problems.append("tokenizer.pretrained: required when tokenizer.kind is 'pretrained' (a hub name or path)")
        for model in MODEL_NAMES:
            budget = self.budget_for(model)
            where = "cfg.budget" if model == "cfg" else f"staged.{model}"
            max_steps = budget.max_steps or self.train.max_steps
            milestones = budget.milestones if budget.milestones is not None else None
            if milestones and milestones[-1] > max_steps:
                problems.append(
                    f"{where}.milestones: {milestones} go beyond max_steps={max_steps}; "
                    "every milestone must be <= max_steps"
                )
            warmup = budget.warmup_steps if budget.warmup_steps is not None else self.train.warmup_steps
            own = budget.warmup_steps is not None or budget.max_steps is not None  # else: train.* below
            if own and warmup > max_steps:
                inherited = "" if budget.warmup_steps is not None else " (from train.warmup_steps)"
                problems.append(
                    f"{where}.warmup_steps: {warmup}{inherited} is more than max_steps={max_steps} of {model}: "
                    "the learning rate would never reach its peak; use warmup_steps <= max_steps"
                )
        if self.train.seq_len:  # one line per preset, not per model using it
            users: dict[str, list[str]] = {}
            for key, chosen in (("staged", self.staged.preset), ("cfg", self.cfg.preset)):
                users.setdefault(chosen, []).append(key)
            for chosen, used_by in users.items():
                limit = self.presets[chosen].seq_len
                if self.train.seq_len > limit:
                    problems.append(
                        f"train.seq_len: {self.train.seq_len} exceeds seq_len={limit} of preset {chosen!r} "
                        f"(used by {' and '.join(used_by)}), the longest sequence that model is built for; "
                        f"use <= {limit} or a preset with a longer seq_len"
                    )
        if self.train.warmup_steps > self.train.max_steps:
            problems.append(
                f"train.warmup_steps: {self.train.warmup_steps} is more than train.max_steps={self.train.max_steps}: "
                "the learning rate would never reach its peak; use warmup_steps <= max_steps"
            )
        if self.train.milestones and self.train.milestones[-1] > self.train.max_steps:
            problems.append(
                f"train.milestones: {self.train.milestones} go beyond train.max_steps={self.train.max_steps}"
            )
        if self.sampling.num_steps > self.cfg.timesteps:
            problems.append(
                f"sampling.num_steps: {self.sampling.num_steps} exceeds cfg.timesteps={self.cfg.timesteps}; "
                "sampling steps must be <= timesteps"
            )
        for key, preset in (("staged.preset", self.preset_for("stage_0")), ("cfg.preset", self.preset_for("cfg"))):
            if preset.vocab_size is not None and preset.vocab_size < self.tokenizer.vocab_size and self.tokenizer.kind == "bpe":
                problems.append(
                    f"{key}: the preset fixes vocab_size={preset.vocab_size}, smaller than "
                    f"tokenizer.vocab_size={self.tokenizer.vocab_size}"
                )
        if self.cfg.architecture == "block":
            problems += self._block_problems()
        if self.eval.cfg_seq_len > self.preset_for("cfg").seq_len:
            problems.append(
                f"eval.cfg_seq_len: {self.eval.cfg_seq_len} exceeds the cfg preset's seq_len "
                f"{self.preset_for('cfg').seq_len}"
            )
        return problems


    def _block_problems(self) -> list[str]:
        """The block architecture reuses the stage-0 network: its keys must describe that network."""
        c, problems = self.cfg, []
        if c.init_from == "stage_0" and c.preset != self.staged.preset:
            problems.append(
                f"cfg.preset: {c.preset!r} differs from staged.preset={self.staged.preset!r}; with "
                "cfg.architecture 'block' and cfg.init_from 'stage_0' the diffusion model is the stage-0 "
                "network, so use the same preset (or cfg.init_from: none)")
        for key, value, allowed in (("cfg.objective", c.objective, "masked"),
                                    ("sampling.guidance", self.sampling.guidance, "token"),
                                    ("cfg.prompt_encoder", c.prompt_encoder, "own")):
            if value != allowed:
                problems.append(f"{key}: {value!r} is not available with cfg.architecture 'block' "
                                f"(use {allowed!r}, or cfg.architecture: cross_attention)")
        return problems
