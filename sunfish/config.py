"""Typed configuration: the one place that says what params.yaml may contain.

Every section of params.yaml has a pydantic model here with ``extra="forbid"``, so a misspelt key
is an error rather than a silently ignored setting. Cross-section rules (a preset that exists, a
milestone inside its run, a sequence that fits the model) are checked after parsing, and every
problem is reported with its dotted key, the offending value and what is allowed.

This module must stay importable without torch: the CLI and the DVC ``validate`` stage use it to
fail fast, before any heavy import.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

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


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic would read `lr: yes` as 1.0 and `max_steps: true` as 1; YAML makes that an easy slip
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _is_number(field.annotation):
            raise ValueError("expected a number, got a true/false value")
        return value


# ----------------------------------------------------------------------------------------------
# data and tokenizer


class DataConfig(Section):
    source: str = Field(
        "tinystories",
        description="tinystories | wikitext2 | shakespeare | hf:<name>[:<config>] | path to a "
        ".txt file or a folder of .txt files",
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    seed: int = 1337
    max_documents: int | None = Field(None, ge=2, description="keep only the first N documents")
    split: Literal["random", "tail"] = Field(
        "random", description="random: whole documents drawn with seed; tail: the last documents (Shakespeare's convention)"
    )
    hf_split: str = "train"
    hf_text_field: str = "text"
    max_pairs_per_document: int = Field(1, ge=1, le=8)

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a corpus: tinystories, wikitext2, shakespeare, hf:<name> or a path")
        return v


class TokenizerConfig(Section):
    kind: Literal["bpe", "pretrained"] = "bpe"
    vocab_size: int = Field(4096, ge=300, le=65535, description="BPE vocabulary (uint16 ids)")
    min_frequency: int = Field(2, ge=1)
    pretrained: str | None = Field(None, description="hub name or local path when kind: pretrained")


# ----------------------------------------------------------------------------------------------
# model shapes


class ModelPreset(Section):
    """A transformer shape shared by both model families (the diffusion model adds cross-attention)."""

    n_layer: int = Field(ge=1, le=256)
    n_head: int = Field(ge=1, le=256)
    d_model: int = Field(ge=8, le=32768)
    d_ff: int = Field(ge=8)
    seq_len: int = Field(ge=8, le=65536, description="the longest sequence the model is built for")
    vocab_size: int | None = Field(None, ge=2, le=65536,
                                   description="fixed vocabulary of the original; null = the tokenizer's")

    def check(self, key: str) -> list[str]:
        problems = []
        if self.d_model % self.n_head:
            problems.append(
                f"{key}.n_head: {self.n_head} does not divide {key}.d_model={self.d_model}; "
                f"pick n_head among {[h for h in range(1, 33) if self.d_model % h == 0]}"
            )
        elif (self.d_model // self.n_head) % 2:
            problems.append(
                f"{key}: head width d_model/n_head={self.d_model // self.n_head} must be even for RoPE"
            )
        return problems


DEFAULT_PRESETS: dict[str, dict[str, int]] = {
    "nano": dict(n_layer=2, n_head=2, d_model=128, d_ff=512, seq_len=128),
    "tiny": dict(n_layer=4, n_head=4, d_model=256, d_ff=1024, seq_len=256),
    "micro": dict(n_layer=8, n_head=8, d_model=512, d_ff=2048, seq_len=256, vocab_size=8192),
    "full": dict(n_layer=20, n_head=16, d_model=2048, d_ff=8192, seq_len=512, vocab_size=8192),
    "original_stage0": dict(n_layer=6, n_head=8, d_model=512, d_ff=1024, seq_len=256),
}


# ----------------------------------------------------------------------------------------------
# training


class Budget(Section):
    """Per-model overrides of the shared training settings; null means "use train.*"."""

    max_steps: int | None = Field(None, ge=1)
    milestones: list[int] | None = None
    lr: float | None = Field(None, gt=0.0, le=1.0)
    warmup_steps: int | None = Field(None, ge=0)


class TrainConfig(Section):
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine floor as a share of lr")
    warmup_steps: int = Field(20, ge=0)
    max_steps: int = Field(300, ge=1)
    milestones: list[int] = Field(default_factory=lambda: [100, 200, 300])
    batch_size: int = Field(16, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 disables clipping")
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    seq_len: int | None = Field(None, ge=8, description="training window; null = the preset's seq_len")
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(8, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    threads: int = Field(0, ge=0, description="intra-op CPU threads; 0 = one per core")
    compile: bool = False
    checkpoint_every: int = Field(50, ge=1, description="steps between resume checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="resume checkpoints kept (milestones are always kept)")
    resume: bool = Field(True, description="continue an interrupted or extended run when its settings match")
    max_nonfinite_steps: int = Field(5, ge=1, description="non-finite losses in a row before training stops")
    nproc_per_node: int = Field(1, ge=1, description="processes per machine; >1 relaunches under torchrun (DDP)")

    @field_validator("milestones")
    @classmethod
    def _milestones_sorted(cls, v: list[int]) -> list[int]:
        return _check_milestones(v)


def _check_milestones(v: list[int] | None) -> list[int] | None:
    if v is None:
        return v
    if any(m < 1 for m in v):
        raise ValueError(f"milestones must be positive step numbers, got {v}")
    if sorted(set(v)) != list(v):
        raise ValueError(f"milestones must be strictly increasing, got {v}")
    return v


class ResolvedTraining(Section):
    """The training settings one model actually uses: train.* with its own overrides applied."""

    model: str
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    max_steps: int
    milestones: list[int]
    batch_size: int
    grad_accum_steps: int
    grad_clip: float
    weight_decay: float
    beta1: float
    beta2: float
    seq_len: int
    eval_every: int
    eval_batches: int
    log_every: int
    seed: int
    device: str
    precision: str
    threads: int
    compile: bool
    checkpoint_every: int
    keep_checkpoints: int
    resume: bool
    max_nonfinite_steps: int
    nproc_per_node: int


# ----------------------------------------------------------------------------------------------
# the staged autoregressive model


class MUConfig(Section):
    full: bool = Field(True, description="semantic-matrix token representation; false = plain embedding")
    layers: int = Field(1, ge=0, le=8, description="MU refinement layers")


class TemporalConfig(Section):
    dim: int = Field(64, ge=1)


class K1Config(Section):
    mode: Literal["log", "scale"] = "log"
    path_mass: float = Field(0.9, gt=0.0, le=1.0)


class GraphConfig(Section):
    window: int = Field(32, ge=1)
    top_k: int = Field(4, ge=0)
    shortcuts: int = Field(6, ge=0)


class StagedConfig(Section):
    preset: str = "tiny"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True
    seeds: int = Field(3, ge=1, description="runs per stage 1..3 and control from the same start, differing in "
                                            "batch order (train.seed, +1, ...); the first is saved and continued")
    mu: MUConfig = MUConfig()
    temporal: TemporalConfig = TemporalConfig()
    k1: K1Config = K1Config()
    graph: GraphConfig = GraphConfig()
    stage_0: Budget = Budget()
    stage_1: Budget = Budget()
    stage_2: Budget = Budget()
    stage_3: Budget = Budget()

    @field_validator("stage_0", "stage_1", "stage_2", "stage_3")
    @classmethod
    def _budget_milestones(cls, v: Budget) -> Budget:
        _check_milestones(v.milestones)
        return v


# ----------------------------------------------------------------------------------------------
# the prompt-conditioned diffusion model


class CfgConfig(Section):
    preset: str = "tiny"
    architecture: Literal["block", "cross_attention"] = Field(
        "block", description="block: block diffusion over the stage-0 network with the prompt as a prefix; "
                             "cross_attention: the denoiser with a prompt encoder")
    block_size: int = Field(2, ge=1, le=64, description="block architecture: tokens denoised jointly per block (1 = AR)")
    init_from: Literal["stage_0", "none"] = Field(
        "stage_0", description="block architecture: start from the trained stage-0 weights, or from a random init")
    objective: Literal["masked", "continuous"] = "masked"
    timesteps: int = Field(1000, ge=1, le=100000)
    noise_schedule: Literal["sqrt", "cosine"] = "sqrt"
    conditioning_dropout: float = Field(0.1, ge=0.0, le=1.0)
    guidance_scale: float = Field(1.0, ge=0.0, le=100.0)
    num_steps: int = Field(50, ge=1)
    scheduler: Literal["ddim", "ddpm"] = "ddim"
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM stochasticity; 1 = DDPM ancestral")
    self_conditioning: bool = False
    prompt_encoder: str = Field("own", description="own | gpt2 | a local path or hub name of a GPT-2 model")
    prompt_encoder_layers: int = Field(0, ge=0, le=24, description="transformer layers over the prompt embeddings (0 measured best)")
    max_prompt_tokens: int = Field(32, ge=1, le=1024)
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="masked sampler: nucleus mass per revealed token; 1 = exact")
    guidance: Literal["sequence", "token"] = Field(
        "token", description="sequence: resample whole conditional samples by their prompt information "
                                "(masked objective); token: CFG on every position's prediction")
    guidance_candidates: int = Field(4, ge=1, le=64, description="sequence guidance: conditional samples per prompt")
    prompt_copy: bool = Field(True, description="copy head: text positions may copy prompt tokens (block; cross_attention with the masked objective and own encoder)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    budget: Budget = Budget()

    @field_validator("budget")
    @classmethod
    def _budget_milestones(cls, v: Budget) -> Budget:
        _check_milestones(v.milestones)
        return v


# ----------------------------------------------------------------------------------------------
# evaluation, report, diagnose, tracking


class FluencyConfig(Section):
    dev_prompts: int = Field(64, ge=8, description="held-out prompts for choosing settings (reported apart)")
    test_prompts: int = Field(64, ge=8, description="held-out prompts the headline is measured on")
    max_words: int = Field(40, ge=8, le=400, description="judge tokens scored per text (samples and real text)")
    judge_order: int = Field(3, ge=1, le=5, description="n-gram order of the Kneser-Ney judge")
    dev_scales: list[float] = Field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0],
                                    description="guidance scales swept on the dev prompts")

    @field_validator("dev_scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if any(s < 0 for s in v):
            raise ValueError(f"guidance scales must be >= 0, got {v}")
        return v


class EvalConfig(Section):
    prompts: list[str] = Field(default_factory=lambda: ["The capital of India is", "Once upon a time"])
    max_new_tokens: int = Field(48, ge=1, le=4096)
    temperature: float = Field(0.8, ge=0.0, le=10.0)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.1, ge=1.0, le=10.0)
    seed: int = 0
    max_eval_tokens: int | None = Field(
        None, ge=256, description="cap on validation tokens scored per checkpoint; null = whole split"
    )
    guidance_scales: list[float] = Field(default_factory=lambda: [0.0, 1.0, 3.0, 7.0])
    cfg_prompts: int = Field(8, ge=1, description="held-out prompts sampled per guidance scale")
    cfg_seq_len: int = Field(64, ge=8, description="length of diffusion samples in tokens")
    fluency: FluencyConfig = FluencyConfig()
    cache: bool = Field(True, description="reuse per-checkpoint results from state/eval_cache (keyed by weights and settings)")
    log_checkpoints: bool = Field(True, description="log each model's best checkpoint to MLflow (checkpoints/<model>) "
                                                    "and register it (models:/sunfish-<model>@champion)")

    @field_validator("guidance_scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if not v or any(s < 0 for s in v):
            raise ValueError(f"guidance scales must be a non-empty list of values >= 0, got {v}")
        return v

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one prompt")
        return v

    @model_validator(mode="after")
    def _prompt_sets(self) -> EvalConfig:
        # evaluate samples cfg_prompts of the dev set and of the test set of eval.fluency
        limit = min(self.fluency.dev_prompts, self.fluency.test_prompts)
        if self.cfg_prompts > limit:
            raise ValueError(f"eval.cfg_prompts: {self.cfg_prompts} is more than the dev/test prompt sets hold "
                             f"(eval.fluency.dev_prompts {self.fluency.dev_prompts}, test_prompts "
                             f"{self.fluency.test_prompts}); use at most {limit}")
        return self


class DiagnoseConfig(Section):
    memorize_steps: int = Field(150, ge=1, description="steps allowed to overfit one batch")
    memorize_target: float = Field(0.1, gt=0.0, description="loss the one-batch overfit must reach")
    init_loss_tolerance: float = Field(0.25, gt=0.0, description="allowed |ln(vocab) - loss| / ln(vocab)")
    fail_on_warn: bool = False


class ReportConfig(Section):
    title: str = "SunFish training report"
    samples_per_milestone: int = Field(2, ge=1)


class TrackingConfig(Section):
    enabled: bool = True
    experiment: str = "sunfish"
    uri: str | None = Field(None, description="null = sqlite store at the repository root")


class Params(Section):
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    presets: dict[str, ModelPreset] = Field(
        default_factory=lambda: {k: ModelPreset(**v) for k, v in DEFAULT_PRESETS.items()}
    )
    train: TrainConfig = TrainConfig()
    staged: StagedConfig = StagedConfig()
    cfg: CfgConfig = CfgConfig()
    eval: EvalConfig = EvalConfig()
    diagnose: DiagnoseConfig = DiagnoseConfig()
    report: ReportConfig = ReportConfig()
    tracking: TrackingConfig = TrackingConfig()

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
        if self.cfg.num_steps > self.cfg.timesteps:
            problems.append(
                f"cfg.num_steps: {self.cfg.num_steps} exceeds cfg.timesteps={self.cfg.timesteps}; "
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
        for key, value, allowed in (("objective", c.objective, "masked"), ("guidance", c.guidance, "token"),
                                    ("prompt_encoder", c.prompt_encoder, "own")):
            if value != allowed:
                problems.append(f"cfg.{key}: {value!r} is not available with cfg.architecture 'block' "
                                f"(use {allowed!r}, or cfg.architecture: cross_attention)")
        return problems


# ----------------------------------------------------------------------------------------------
# loading


def _describe(err: dict[str, Any], raw: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        parent = err["loc"][:-1]
        allowed = _allowed_keys(parent)
        close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{loc}: unknown key (allowed here: {', '.join(allowed)}){hint}"
    if kind == "missing":
        return f"{loc}: required key is missing"
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{loc}: {shown} is invalid: {err['msg']}"


def _allowed_keys(path: tuple) -> list[str]:
    model: Any = Params
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            if model is Params or not hasattr(model, "model_fields"):
                model = ModelPreset  # a preset name inside presets.<name>
                continue
            return []
        ann = field.annotation
        origin = getattr(ann, "__origin__", None)
        if origin is dict:
            model = ann.__args__[1]
        else:
            model = ann
    return sorted(getattr(model, "model_fields", {}))


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate a mapping; raise ParamsError naming every bad key."""
    if raw is None:
        raise ParamsError(source, ["the file is empty; it must be a mapping of sections (data, train, ...)"])
    if not isinstance(raw, dict):
        raise ParamsError(source, [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(source, [_describe(e, raw) for e in exc.errors()]) from None
    problems = params.consistency_problems()
    if problems:
        raise ParamsError(source, problems)
    return params


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; ``overrides`` maps dotted keys to values (CLI -S style)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(str(path), ["file not found"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(str(path), [f"not valid YAML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ParamsError(str(path), [f"not UTF-8 text: {exc}"]) from None
    for key, value in (overrides or {}).items():
        raw = _set_dotted(raw if isinstance(raw, dict) else {}, key, value)
    return parse_params(raw, str(path))


def _set_dotted(raw: dict, key: str, value: Any) -> dict:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return raw


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of nested params, as DVC and MLflow show them."""
    out: dict[str, Any] = {}
    if isinstance(tree, BaseModel):
        tree = tree.model_dump()
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = tree
    return out
