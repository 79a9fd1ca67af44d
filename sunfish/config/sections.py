"""The pydantic models of params.yaml's sections: each field's type, allowed range and default.

A field's default here is the value params.yaml sets (tests/test_config_defaults.py keeps the two
equal), so a key left out of params.yaml means what the committed file says. Every section forbids
unknown keys, so a misspelt key is an error rather than a silently ignored setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sunfish.config.base import Budget, Section, check_milestones

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
    described_pairs: bool = Field(False, description="each training story also gives a pair whose prompt describes "
                                  "its main noun without naming it (story/described)")

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


class TrainConfig(Section):
    lr: float = Field(2.0e-3, gt=0.0, le=1.0, description="peak learning rate (after warmup, then cosine decay)")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine floor as a share of lr")
    warmup_steps: int = Field(30, ge=0, description="linear warmup steps to the peak lr")
    max_steps: int = Field(240, ge=1)
    milestones: list[int] = Field(default_factory=lambda: [24, 48, 120, 240],
                                  description="steps with a saved checkpoint; max_steps is always one")
    batch_size: int = Field(16, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 disables clipping")
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    seq_len: int | None = Field(128, ge=8, description="training window; null = the preset's seq_len")
    eval_every: int = Field(40, ge=1, description="steps between validation losses")
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
        return check_milestones(v)


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


# Stages 1..3 (and their controls) continue the previous stage's weights: a short run at a lower
# peak lr, not train.*'s budget (which stage 0 uses).
STAGE_BUDGET = Budget(max_steps=30, milestones=[30], lr=6.0e-4, warmup_steps=3)


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
    stage_1: Budget = STAGE_BUDGET
    stage_2: Budget = STAGE_BUDGET
    stage_3: Budget = STAGE_BUDGET

    @field_validator("stage_0", "stage_1", "stage_2", "stage_3")
    @classmethod
    def _budget_milestones(cls, v: Budget) -> Budget:
        check_milestones(v.milestones)
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
    self_conditioning: bool = False
    prompt_encoder: str = Field("own", description="own | gpt2 | a local path or hub name of a GPT-2 model")
    prompt_encoder_layers: int = Field(0, ge=0, le=24, description="transformer layers over the prompt embeddings")
    max_prompt_tokens: int = Field(32, ge=1, le=1024)
    prompt_copy: bool = Field(True, description="copy head: text positions may copy prompt tokens (block; cross_attention with the masked objective and own encoder)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    budget: Budget = Budget(lr=1.0e-3)  # train.* except a lower peak lr

    @field_validator("budget")
    @classmethod
    def _budget_milestones(cls, v: Budget) -> Budget:
        check_milestones(v.milestones)
        return v


class SamplingConfig(Section):
    """How the diffusion model samples: the evaluation stages and each checkpoint's generation_config.json.

    Its own section, apart from ``cfg`` (what is trained), so that DVC can track the two apart: a new
    guidance scale reruns the evaluation, never the training."""

    guidance_scale: float = Field(1.0, ge=0.0, le=100.0)
    num_steps: int = Field(64, ge=1, description="denoising steps in all (block: spread over the blocks)")
    scheduler: Literal["ddim", "ddpm"] = "ddim"
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM stochasticity; 1 = DDPM ancestral")
    top_p: float = Field(0.8, gt=0.0, le=1.0, description="masked sampler: nucleus mass per revealed token; 1 = exact")
    guidance: Literal["sequence", "token"] = Field(
        "token", description="sequence: resample whole conditional samples by their prompt information "
                                "(block, or the masked objective); token: CFG on every position's prediction")
    guidance_candidates: int = Field(4, ge=1, le=64, description="sequence guidance: conditional samples per prompt")


# ----------------------------------------------------------------------------------------------
# evaluation, report, diagnose, tracking


class FluencyConfig(Section):
    dev_prompts: int = Field(64, ge=8, description="held-out prompts for choosing settings (reported apart)")
    test_prompts: int = Field(64, ge=8, description="held-out prompts the headline is measured on")
    max_words: int = Field(40, ge=8, le=400, description="judge tokens scored per text (samples and real text)")
    judge_order: int = Field(3, ge=1, le=5, description="n-gram order of the Kneser-Ney judge")
    dev_scales: list[float] = Field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0],
                                    description="guidance scales swept on the dev prompts")
    best_of_k: int = Field(4, ge=1, le=64, description="samples drawn per test prompt for the best-of-k rows (the "
                           "diffusion model and stage 0, each keeping its own most likely sample); 1 = no such rows. "
                           "Under sequence guidance the rows use sampling.guidance_candidates instead")

    @field_validator("dev_scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if any(s < 0 for s in v):
            raise ValueError(f"guidance scales must be >= 0, got {v}")
        return v


class EvalConfig(Section):
    prompts: list[str] = Field(default_factory=lambda: ["The capital of India is", "Once upon a time", "The little dog"],
                               description="prompts every AR checkpoint continues in the report")
    max_new_tokens: int = Field(40, ge=1, le=4096)
    temperature: float = Field(0.8, ge=0.0, le=10.0)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.1, ge=1.0, le=10.0)
    seed: int = 0
    max_eval_tokens: int | None = Field(
        None, ge=256, description="cap on validation tokens scored per checkpoint; null = whole split"
    )
    guidance_scales: list[float] = Field(default_factory=lambda: [0.0, 1.0, 3.0, 5.0, 7.0, 10.0, 15.0],
                                         description="guidance scales of the reported curve")
    cfg_prompts: int = Field(16, ge=1, description="held-out prompts sampled per guidance scale")
    cfg_seq_len: int = Field(64, ge=8, description="length of diffusion samples in tokens")
    fluency: FluencyConfig = FluencyConfig()
    cache: bool = Field(True, description="reuse per-checkpoint results from state/eval_cache (keyed by weights and settings)")
    log_checkpoints: bool = Field(True, description="log each model's best checkpoint to MLflow (checkpoints/<model>) "
                                                    "and register it, as an MLflow logged model (logged only for "
                                                    "new weights), as models:/sunfish-<model>@champion")

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
