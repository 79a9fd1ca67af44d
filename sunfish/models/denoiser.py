"""The prompt-conditioned cross-attention diffusion denoiser (``cfg.architecture: cross_attention``).

A pre-norm transformer over the text positions: non-causal self-attention with RoPE, cross-attention
to the encoded prompt (memory slot 0 is a learned null prompt, always visible, so the unconditional
branch of classifier-free guidance is the same network), then a GELU MLP. It only predicts; the
objectives in :mod:`sunfish.diffusion` score and sample it. ``objective="masked"`` reads token ids
with [MASK] = ``vocab_size`` and predicts real tokens through a head tied to the input embedding (so
[MASK] is never predicted); ``objective="continuous"`` reads a noisy point among the normalised
token embeddings plus a timestep embedding and predicts x0, read back by the rounding head.

Why the less usual parts: a zero-initialised width-3 convolution mixes each position's input with
its neighbours', because a masked position otherwise carries nothing of its own and training stalls
at the unigram solution; the prompt encoder defaults to no layers (``cfg.prompt_encoder_layers: 0``),
which carried the most prompt information and costs least; unit-scale embeddings and zero-initialised
residual outputs make every block start as the identity. The measurements behind each choice:
docs/findings/2026-12-04-cross-attention-denoiser-design.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sunfish.models.layers import RotaryEmbedding, TransformerBlock, init_weights, zero_residual_outputs
from sunfish.models.prompt_copy import PromptCopyHead
from sunfish.models.prompt_encoder import (
    BLOCK_OPTIONS,
    PromptEncoder,
    is_own,
    pad_prompts,
    pretrained_embedding_shape,
)

OBJECTIVES = ("masked", "continuous")
LOCAL_MIXING_WIDTH = 3  # input convolution: each position sees its two neighbours' inputs
SCHEDULES = ("sqrt", "cosine")


@dataclass
class DiffusionConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: int = 1024
    max_seq_len: int = 256
    objective: str = "masked"
    timesteps: int = 1000
    noise_schedule: str = "sqrt"
    conditioning_dropout: float = 0.1
    self_conditioning: bool = False
    prompt_encoder: str = "own"
    prompt_encoder_layers: int = 2
    max_prompt_tokens: int = 32
    prompt_prefix: bool = False
    prompt_pooling: bool = False
    prompt_copy: bool = False
    dropout: float = 0.0
    pad_id: int = 1
    eos_id: int = 0

    def __post_init__(self):
        problems = []
        if self.objective not in OBJECTIVES:
            problems.append(f"objective {self.objective!r} is not one of {OBJECTIVES}")
        if self.noise_schedule not in SCHEDULES:
            problems.append(f"noise_schedule {self.noise_schedule!r} is not one of {SCHEDULES}")
        if self.d_model % self.n_head:
            problems.append(f"n_head={self.n_head} does not divide d_model={self.d_model}")
        elif (self.d_model // self.n_head) % 2:
            problems.append(f"head width {self.d_model // self.n_head} must be even for RoPE")
        if not 0.0 <= self.conditioning_dropout <= 1.0:
            problems.append(f"conditioning_dropout {self.conditioning_dropout} must be in [0, 1]")
        if self.vocab_size < 2 or self.timesteps < 1 or self.max_seq_len < 1 or self.max_prompt_tokens < 1:
            problems.append(
                "vocab_size >= 2, timesteps >= 1, max_seq_len >= 1 and max_prompt_tokens >= 1 are required"
            )
        if self.prompt_copy and (self.objective != "masked" or not is_own(self.prompt_encoder)):
            problems.append(
                "prompt_copy needs the masked objective and the own prompt encoder (it copies prompt "
                f"tokens into the text's vocabulary), not objective={self.objective!r} with "
                f"prompt_encoder={self.prompt_encoder!r}"
            )
        for name in ("pad_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                value = getattr(self, name)
                problems.append(f"{name}={value} is outside the vocabulary (size {self.vocab_size})")
        if problems:
            raise ValueError("invalid DiffusionConfig: " + "; ".join(problems))

    @property
    def mask_id(self) -> int:
        """The [MASK] token of the masked objective: one past the real vocabulary."""
        return self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffusionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DiffusionConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_params(cls, cfg, preset, vocab_size: int, pad_id: int, eos_id: int) -> DiffusionConfig:
        """From ``params.cfg`` (CfgConfig), the chosen ModelPreset and the tokenizer's vocabulary.

        A preset that fixes ``vocab_size`` (micro, full: 8192, the original's) wins when it is at
        least the tokenizer's; the unused rows simply learn never to be predicted. ``cfg.prompt_copy``
        turns the copy head on where it applies (masked objective, own prompt encoder).
        """
        vocab = vocab_size
        if preset.vocab_size is not None:
            if preset.vocab_size < vocab_size:
                raise ValueError(
                    f"the preset fixes vocab_size={preset.vocab_size}, "
                    f"smaller than the tokenizer's {vocab_size}"
                )
            vocab = preset.vocab_size
        return cls(
            vocab_size=vocab,
            n_layer=preset.n_layer,
            n_head=preset.n_head,
            d_model=preset.d_model,
            d_ff=preset.d_ff,
            max_seq_len=preset.seq_len,
            objective=cfg.objective,
            timesteps=cfg.timesteps,
            noise_schedule=cfg.noise_schedule,
            conditioning_dropout=cfg.conditioning_dropout,
            self_conditioning=cfg.self_conditioning,
            prompt_encoder=cfg.prompt_encoder,
            prompt_encoder_layers=cfg.prompt_encoder_layers,
            max_prompt_tokens=cfg.max_prompt_tokens,
            prompt_copy=bool(getattr(cfg, "prompt_copy", False))
            and cfg.objective == "masked"
            and is_own(cfg.prompt_encoder),
            dropout=cfg.dropout,
            pad_id=pad_id,
            eos_id=eos_id,
        )


class TimestepEmbedding(nn.Module):
    """Integer timestep t in 1..T -> sinusoidal features -> MLP -> [B, d_model]."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.d_model // 2
        steps = torch.arange(half, device=timesteps.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(10000.0) * steps / half)
        args = timesteps.float()[:, None] * freqs[None, :]
        features = torch.cat([args.sin(), args.cos()], dim=-1)
        if features.shape[-1] < self.d_model:
            features = F.pad(features, (0, self.d_model - features.shape[-1]))
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class DiffusionLM(nn.Module):
    kind = "diffusion"

    def __init__(self, config: DiffusionConfig | dict, *, _pretrained_embeddings: torch.Tensor | None = None):
        super().__init__()
        if isinstance(config, dict):
            config = DiffusionConfig.from_dict(config)
        self.config = config
        c = config
        masked = c.objective == "masked"
        self.token_embedding = nn.Embedding(c.vocab_size + 1 if masked else c.vocab_size, c.d_model)
        self.prompt_encoder = PromptEncoder(
            d_model=c.d_model,
            n_head=c.n_head,
            d_ff=c.d_ff,
            n_layers=c.prompt_encoder_layers,
            max_prompt_tokens=c.max_prompt_tokens,
            dropout=c.dropout,
            source=c.prompt_encoder,
            pretrained_embeddings=_pretrained_embeddings,
        )
        self.time_embedding = None if masked else TimestepEmbedding(c.d_model)
        self.self_condition_projection = (
            nn.Linear(c.d_model, c.d_model, bias=False) if (not masked and c.self_conditioning) else None
        )
        # each position's input plus a learned mix of its neighbours' (kernel LOCAL_MIXING_WIDTH)
        self.local_mixing = nn.Conv1d(
            c.d_model, c.d_model, LOCAL_MIXING_WIDTH, padding=LOCAL_MIXING_WIDTH // 2, bias=False
        )
        # the mean of the encoded prompt, projected and added to every position (zero-initialised)
        self.prompt_pool = nn.Linear(c.d_model, c.d_model, bias=False) if c.prompt_pooling else None
        # with the prefix, self-attention reads the encoded prompt (null slot + prompt) before the text
        rope_positions = c.max_seq_len + (1 + c.max_prompt_tokens if c.prompt_prefix else 0)
        self.rope = RotaryEmbedding(c.d_model // c.n_head, rope_positions)
        self.input_dropout = nn.Dropout(c.dropout)
        # pre-norm: self-attention (RoPE, text mask) -> cross-attention to the prompt -> MLP
        self.blocks = nn.ModuleList(
            TransformerBlock(
                c.d_model, c.n_head, c.d_ff, dropout=c.dropout, cross_attention=True, **BLOCK_OPTIONS
            )
            for _ in range(c.n_layer)
        )
        self.final_norm = nn.LayerNorm(c.d_model)
        self.x0_head = None if masked else nn.Linear(c.d_model, c.d_model, bias=False)
        init_weights(self)
        zero_residual_outputs(self)
        # after init_weights: the copy head sets its own gate bias
        self.copy_head = PromptCopyHead(c.d_model) if c.prompt_copy else None
        if not self.token_embedding.weight.is_meta:
            nn.init.zeros_(self.local_mixing.weight)  # starts as the identity
            # unit-scale token vectors, like the LayerNorm outputs they are added to; the tied head
            # divides by sqrt(d_model) so the first logits have unit scale (loss ~ ln vocab)
            nn.init.normal_(self.token_embedding.weight, std=1.0)
            if self.self_condition_projection is not None:
                nn.init.zeros_(self.self_condition_projection.weight)
            if self.prompt_pool is not None:
                nn.init.zeros_(self.prompt_pool.weight)

    # -- shapes and helpers ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    def unit_embeddings(self) -> torch.Tensor:
        """The real tokens' embedding rows at unit norm, [vocab, d_model] (continuous objective)."""
        return F.normalize(self.token_embedding.weight[: self.config.vocab_size].float(), dim=-1)

    def embed_clean(self, ids: torch.Tensor) -> torch.Tensor:
        """e(x): embeddings normalised to the fixed norm sqrt(d_model) (the continuous x0 target)."""
        return F.normalize(self.token_embedding(ids).float(), dim=-1) * math.sqrt(self.config.d_model)

    # -- the network -----------------------------------------------------------------------------

    def encode_prompt(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (memory [B, 1 + P, d], memory_mask [B, 1 + P]); an all-False mask is the null prompt."""
        return self.prompt_encoder(prompt_ids, prompt_mask, self.token_embedding)

    def hidden_states(
        self,
        inputs: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        self_condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, L, d].

        ``inputs``: token ids [B, L] (masked objective, [MASK] = vocab_size) or z_t [B, L, d]
        (continuous; then ``timesteps`` Long[B] in 1..T is required).
        """
        if self.config.objective == "masked":
            x = self.token_embedding(inputs)
        else:
            if timesteps is None:
                raise ValueError("the continuous objective needs timesteps")
            x = inputs.to(self.token_embedding.weight.dtype)
        x = self._mix_neighbours(x, text_mask)
        if self.config.objective == "continuous":
            x = x + self.time_embedding(timesteps)[:, None, :].to(x.dtype)
            if self.self_condition_projection is not None and self_condition is not None:
                x = x + self.self_condition_projection(self_condition.to(x.dtype))
        if self.prompt_pool is not None:
            weights = memory_mask.to(memory.dtype)[..., None]
            pooled = (memory * weights).sum(1) / weights.sum(1)  # slot 0 (null) is always there
            x = x + self.prompt_pool(pooled.to(x.dtype))[:, None, :]
        length = x.shape[1]
        if length > self.config.max_seq_len:
            raise ValueError(f"sequence of {length} tokens exceeds max_seq_len={self.config.max_seq_len}")
        x = self.input_dropout(x)
        prefix = 0
        if self.config.prompt_prefix:  # the encoded prompt also leads the sequence self-attention reads
            prefix = memory.shape[1]
            x = torch.cat([memory.to(x.dtype), x], dim=1)
            if text_mask is None:
                text_mask = torch.ones(x.shape[0], length, dtype=torch.bool, device=x.device)
            text_mask = torch.cat([memory_mask.bool(), text_mask.bool()], dim=1)
        rope = self.rope(prefix + length)
        for block in self.blocks:
            x = block(
                x, rope=rope, key_padding_mask=text_mask, context=memory, context_padding_mask=memory_mask
            )
        return self.final_norm(x[:, prefix:])

    def _mix_neighbours(self, x: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        """x + conv(x) over the sequence; padding positions contribute nothing to their neighbours."""
        source = x if text_mask is None else x * text_mask[..., None].to(x.dtype)
        return x + self.local_mixing(source.transpose(1, 2)).transpose(1, 2)

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Masked objective: logits over the real vocabulary (the [MASK] row is never a choice).

        The head is the input embedding (tied), scaled by 1/sqrt(d_model).
        """
        table = self.token_embedding.weight[: self.config.vocab_size]
        return (hidden @ table.t()) * self.config.d_model**-0.5

    def masked_log_probs(
        self,
        hidden: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        prompt_ids: torch.Tensor | None,
        where: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masked objective: log p(x_i) over the real vocabulary, float32.

        At the positions ``where`` selects ([N, V]), or everywhere ([B, L, V]) when it is None.
        Without the copy head this is the log-softmax of :meth:`token_logits`; with it, the mixture
        with the copy distribution over ``prompt_ids`` (see :mod:`sunfish.models.prompt_copy`);
        ``memory``/``memory_mask`` are :meth:`encode_prompt`'s output for the same rows.
        """
        selected = hidden if where is None else hidden[where]
        log_vocab = torch.log_softmax(self.token_logits(selected).float(), dim=-1)
        if self.copy_head is None or prompt_ids is None or prompt_ids.shape[1] == 0:
            return log_vocab
        width = min(prompt_ids.shape[1], memory.shape[1] - 1)
        return self.copy_head(
            hidden, log_vocab, memory[:, 1 : 1 + width], memory_mask[:, 1 : 1 + width],
            prompt_ids[:, :width], where,
        )

    def rounding_logits(self, x0: torch.Tensor) -> torch.Tensor:
        """Continuous objective: x0 (embedding space) against the unit-norm embedding matrix."""
        return x0.float() @ self.unit_embeddings().t()

    def prediction(self, hidden: torch.Tensor, memory=None, memory_mask=None, prompt_ids=None) -> torch.Tensor:
        """What the objective consumes: logits (masked) or x0_hat (continuous).

        With the copy head the masked prediction is log-probabilities (normalised logits: softmax
        and cross-entropy read them the same way), which needs the prompt.
        """
        if self.config.objective == "masked":
            if self.copy_head is not None and prompt_ids is not None:
                return self.masked_log_probs(hidden, memory, memory_mask, prompt_ids)
            return self.token_logits(hidden)
        return self.x0_head(hidden)

    def predict(
        self,
        inputs: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        self_condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        memory, memory_mask = self.encode_prompt(prompt_ids, prompt_mask)
        hidden = self.hidden_states(inputs, memory, memory_mask, text_mask, timesteps, self_condition)
        return self.prediction(hidden, memory, memory_mask, prompt_ids)

    def encode_prompt_with_null(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory for the batched guidance pass: rows 0..B-1 the prompts, rows B..2B-1 the null prompt."""
        ids = torch.cat([prompt_ids, prompt_ids], dim=0)
        mask = torch.cat([prompt_mask.bool(), torch.zeros_like(prompt_mask, dtype=torch.bool)], dim=0)
        return self.encode_prompt(ids, mask)

    def predict_cond_uncond(
        self,
        inputs: torch.Tensor,
        prompt_ids: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        self_condition: torch.Tensor | None = None,
        memory: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) predictions from ONE forward pass over a batch of 2B.

        ``memory`` = :meth:`encode_prompt_with_null` output, to encode the prompts once per sample.
        """
        if memory is None:
            memory = self.encode_prompt_with_null(prompt_ids, prompt_mask)
        cond, uncond = self.hidden_cond_uncond(
            inputs, prompt_ids, prompt_mask, text_mask, timesteps, self_condition, memory
        )
        batch = inputs.shape[0]
        states, mask = memory
        if prompt_ids is not None:
            prompt_ids = prompt_ids[:batch]
        return (
            self.prediction(cond, states[:batch], mask[:batch], prompt_ids),
            self.prediction(uncond, states[batch:], mask[batch:], prompt_ids),
        )

    def hidden_cond_uncond(
        self,
        inputs: torch.Tensor,
        prompt_ids: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        self_condition: torch.Tensor | None = None,
        memory: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`predict_cond_uncond`, but the hidden states (to apply a head to a few positions)."""
        if memory is None:
            memory = self.encode_prompt_with_null(prompt_ids, prompt_mask)

        def twice(x):
            return None if x is None else torch.cat([x, x], dim=0)

        hidden = self.hidden_states(
            twice(inputs), memory[0], memory[1], twice(text_mask), twice(timesteps), twice(self_condition)
        )
        batch = inputs.shape[0]
        return hidden[:batch], hidden[batch:]

    # -- prompts ---------------------------------------------------------------------------------

    def tokenize_prompts(self, texts: list[str], tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt texts -> (prompt_ids, prompt_mask) in the prompt encoder's vocabulary.

        Own encoder: ``tokenizer`` (our TextTokenizer) is required. Pretrained (GPT-2) encoder: its
        own tokenizer is used and ``tokenizer`` is ignored.
        """
        return self.prompt_encoder.tokenize(texts, tokenizer, device=self.device)

    def pad_prompt_ids(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.config.pad_id if self.prompt_encoder.uses_own_tokenizer else 0
        return pad_prompts(prompts, self.config.max_prompt_tokens, pad_id=pad, device=self.device)

    def drop_conditioning(self, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditioning dropout: each row's prompt becomes the null prompt with p = conditioning_dropout.

        Only in training mode. Returns (new mask, dropped rows Bool[B]).
        """
        batch = prompt_mask.shape[0]
        p = self.config.conditioning_dropout if self.training else 0.0
        if p <= 0.0:
            return prompt_mask.bool(), torch.zeros(batch, dtype=torch.bool, device=prompt_mask.device)
        dropped = torch.rand(batch, device=prompt_mask.device) < p
        return prompt_mask.bool() & ~dropped[:, None], dropped

    # -- the model contract ----------------------------------------------------------------------

    def _on_device(self, batch: dict) -> dict:
        device = self.device
        return {
            k: (v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v)
            for k, v in batch.items()
        }

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Pair batch -> (loss, metrics). Applies conditioning dropout; padding never counts."""
        from sunfish.diffusion import continuous, masked

        batch = self._on_device(batch)
        prompt_mask, dropped = self.drop_conditioning(batch["prompt_mask"])
        memory, memory_mask = self.encode_prompt(batch["prompt_ids"], prompt_mask)
        objective = masked if self.config.objective == "masked" else continuous
        loss, metrics = objective.training_loss(self, batch, memory, memory_mask)
        metrics["conditioning_dropped"] = float(dropped.float().mean())
        return loss, metrics

    def nll(
        self, batch: dict, generator: torch.Generator | None = None, draws: int = 1
    ) -> tuple[torch.Tensor, int]:
        """(ELBO upper bound on the NLL in nats summed over real text tokens, number of those tokens).

        Conditioned on the batch's prompts (no dropout). ``draws`` averages several noise draws per
        sequence to cut the variance of small evaluations.
        """
        from sunfish.diffusion import continuous, masked

        batch = self._on_device(batch)
        objective = masked if self.config.objective == "masked" else continuous
        with torch.no_grad():
            memory, memory_mask = self.encode_prompt(batch["prompt_ids"], batch["prompt_mask"].bool())
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for _ in range(max(1, draws)):
                total = total + objective.elbo(self, batch, memory, memory_mask, generator)
        return total / max(1, draws), int(batch["text_mask"].sum())

    def health(self, generator: torch.Generator | None = None) -> dict[str, float]:
        """Embedding health: mean pairwise cosine (+ rounding accuracy at the smallest noise level)."""
        from sunfish.diffusion import continuous

        return continuous.embedding_health(self, generator)

    def component_of(self, name: str) -> str:
        if name.startswith(("token_embedding", "local_mixing")):
            return "embedding"
        if name.startswith(("prompt_encoder", "prompt_pool", "copy_head")):
            return "prompt_encoder"
        if name.startswith("time_embedding"):
            return "timestep"
        if name.startswith("self_condition_projection"):
            return "self_conditioning"
        if name.startswith("blocks."):
            part = name.split(".")[2]
            if part in ("attention", "norm_attention"):
                return "attention"
            if part in ("cross_attention", "norm_cross"):
                return "cross_attention"
            return "mlp"
        return "head"  # final_norm, x0_head (the output head is tied to the embedding)


def count_parameters(config: DiffusionConfig | dict) -> int:
    """Trainable parameters of DiffusionLM(config), built on the meta device (allocates nothing).

    Tied weights count once; a pretrained prompt encoder's frozen embeddings do not count (only
    their projection does), and only its config is read.
    """
    if isinstance(config, dict):
        config = DiffusionConfig.from_dict(config)
    pretrained = None
    if not is_own(config.prompt_encoder):
        vocab, dim = pretrained_embedding_shape(config.prompt_encoder)
        pretrained = torch.empty(vocab, dim, device="meta")
    with torch.device("meta"):
        model = DiffusionLM(config, _pretrained_embeddings=pretrained)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
