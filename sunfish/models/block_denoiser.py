"""The block diffusion LM: the staged AR network turned into a prompt-prefixed block denoiser.

Why this shape. A masked diffusion model trained from scratch for a few hundred CPU steps writes
word salad: it has to learn language and the any-order denoising task at once. The pipeline has
already trained a causal LM (stage 0) that writes locally fluent text, so this model *is* that
network, weights and all, run under another attention mask (the DiffuGPT idea of adapting an AR
LM, Gong et al. 2024, in the block form of BD3-LM, Arriola et al. 2025):

- the text is generated block by block, left to right; inside a block of ``block_size`` tokens
  the tokens are denoised jointly from [MASK] (absorbing diffusion, any order), so a block of 1
  is exactly the AR model and larger blocks trade AR's one-token-per-step for parallel reveals;
- the prompt is an unmasked prefix, read by the same self-attention (LLaDA-style), and the text
  starts with the end-of-text token, so the AR model sees "prompt <eos> story" as it saw one
  document following another. The null prompt (classifier-free guidance) is an empty prefix;
- targets are shifted as in the AR model: the output at position i predicts token i+1, so the
  AR head means the same thing here. The position that predicts the first token of block g is the
  last token of block g-1 (its *anchor*), which therefore joins block g's attention group.

Layout of one training row (BD3-LM's vectorised form: every block is trained in one pass):
``[prompt (P, left-padded)] [text x_0..x_{L-1} (clean)] [text z_0..z_{L-1} (noised)]``, with
``x_0 = <eos>``. Group g of the noised copy is positions gB..gB+B-1 (inputs: the anchor x_{gB},
always clean, then B-1 noised tokens); its outputs predict x_{gB+1}..x_{gB+B}. Attention: the
prompt and the clean copy are causal (exactly the AR model); a noised position of group g sees
the prompt, the clean text before its anchor and its whole group. Both copies use the same RoPE
positions, so a noised token sits where it will sit when sampled.

The [MASK] token is one extra row of the input tables (initialised at the mean of the real
rows); the head never predicts it.

Copy head (``prompt_copy``). Reading a prefix prompt through self-attention means learning, for
every noun separately, that a prompt token should raise the same token's logit in a story slot;
240 fine-tuning steps did not teach it (the conditional and unconditional bounds differed by 0.003
nats/token). The pointer of :mod:`sunfish.models.prompt_copy` makes copying one rule for every
word: queries from the final hidden state of a text position, keys from the final hidden states of
the prompt positions (the same network, causal over the prompt), a learned gate. The output is
still a distribution over the vocabulary, so the ELBO stays a bound and guidance is unchanged; the
null prompt has no tokens, so the unconditional branch is the vocabulary head alone. Whether the
copies land in fluent text is for the fluency judge to say, not for the keyword check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sunfish.models.prompt_copy import PromptCopyHead
from sunfish.models.staged import StagedLM, StagedLMConfig


@dataclass
class BlockDiffusionConfig:
    vocab_size: int  # real tokens; [MASK] is vocab_size
    backbone: dict[str, Any] = field(default_factory=dict)  # StagedLMConfig (stage 0), vocab_size + 1
    block_size: int = 4
    max_prompt_tokens: int = 32
    conditioning_dropout: float = 0.1
    pad_id: int = 1
    eos_id: int = 0
    init_from: str | None = None  # the AR checkpoint the weights started from (provenance only)
    prompt_copy: bool = False  # a pointer from text positions to the prompt's tokens (PromptCopyHead)

    def __post_init__(self):
        problems = []
        if self.block_size < 1:
            problems.append(f"block_size={self.block_size} must be >= 1")
        if not 0.0 <= self.conditioning_dropout <= 1.0:
            problems.append(f"conditioning_dropout {self.conditioning_dropout} must be in [0, 1]")
        if self.max_prompt_tokens < 1:
            problems.append(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 1")
        back = self.backbone
        if back:
            if back.get("vocab_size") != self.vocab_size + 1:
                problems.append(f"backbone vocab_size {back.get('vocab_size')} must be vocab_size + 1 "
                                f"= {self.vocab_size + 1} (the [MASK] row)")
            if back.get("stage", 0) > 2:
                problems.append("the backbone must be a stage 0-2 network (graph routing is causal only)")
        for name in ("pad_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                problems.append(f"{name}={getattr(self, name)} is outside the vocabulary ({self.vocab_size})")
        if problems:
            raise ValueError("invalid BlockDiffusionConfig: " + "; ".join(problems))

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def objective(self) -> str:
        """Absorbing-state (masked) diffusion inside each block, as the masked DiffusionLM."""
        return "masked"

    @property
    def max_seq_len(self) -> int:
        return int(self.backbone["max_seq_len"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockDiffusionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown BlockDiffusionConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)


class BlockDiffusionLM(nn.Module):
    """Prompt-prefixed block diffusion over a stage-0 network; see the module docstring."""

    kind = "block_diffusion"

    def __init__(self, config: BlockDiffusionConfig):
        super().__init__()
        self.config = config
        self.net = StagedLM(StagedLMConfig.from_dict(config.backbone))
        self.mask_id = config.mask_id
        self.copy_head = PromptCopyHead(self.net.config.d_model) if config.prompt_copy else None
        self.copy_enabled = True  # False: the vocabulary head alone (the "copy head off" reference row)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- construction from an AR checkpoint -------------------------------------------------------

    @classmethod
    def backbone_from(cls, ar_config: StagedLMConfig) -> dict[str, Any]:
        """The backbone config of an AR network: stage 0 layout plus the [MASK] row."""
        d = ar_config.to_dict()
        d.update(vocab_size=ar_config.vocab_size + 1, dropout=ar_config.dropout)
        return d

    @classmethod
    def from_ar(cls, ar: StagedLM, config: BlockDiffusionConfig) -> BlockDiffusionLM:
        """Copy every weight of ``ar`` into a new model; the [MASK] rows start at the tables' mean."""
        model = cls(config)
        target = model.net.state_dict()
        vocab = config.vocab_size
        with torch.no_grad():
            for name, tensor in ar.state_dict().items():
                if name not in target:
                    raise ValueError(f"AR weight {name!r} has no place in the block diffusion backbone "
                                     "(only stage 0-2 networks of the same shape can start it)")
                dest = target[name]
                if dest.shape == tensor.shape:
                    dest.copy_(tensor)
                elif dest.shape[0] == vocab + 1 and tensor.shape[0] == vocab and dest.shape[1:] == tensor.shape[1:]:
                    dest[:vocab].copy_(tensor)
                    dest[vocab:].copy_(tensor.float().mean(dim=0, keepdim=True).to(dest.dtype))
                else:
                    raise ValueError(f"AR weight {name!r} has shape {tuple(tensor.shape)}, the backbone "
                                     f"expects {tuple(dest.shape)}: the AR model and cfg shapes differ")
        model.net.load_state_dict(target)
        return model

    # -- the network --------------------------------------------------------------------------

    def logits(self, ids: Tensor, positions: Tensor, attn_mask: Tensor) -> Tensor:
        """Real-token logits ``[B, T, vocab_size]`` of the vocabulary head (the [MASK] column is
        dropped; the copy head, if any, is not applied: see :meth:`scores`)."""
        return self.net(ids, positions=positions, attn_mask=attn_mask)[..., : self.config.vocab_size]

    @property
    def copies(self) -> bool:
        return self.copy_head is not None and self.copy_enabled

    def head_scores(self, hidden: Tensor, prompt_hidden: Tensor, prompt_ids: Tensor, prompt_mask: Tensor
                    ) -> Tensor:
        """Scores ``[B, N, vocab_size]`` of final hidden states ``[B, N, d]``: the vocabulary logits,
        or with the copy head the log-probabilities of the mixture with a copy of the prompt
        (``prompt_hidden`` [B, P, d], ``prompt_ids``/``prompt_mask`` [B, P]). Either way a
        log-softmax gives the log-probabilities."""
        logits = self.net.head(hidden)[..., : self.config.vocab_size]
        if not self.copies or prompt_ids.shape[1] == 0:
            return logits
        log_vocab = torch.log_softmax(logits.float(), dim=-1)
        return self.copy_head(hidden, log_vocab, prompt_hidden, prompt_mask, prompt_ids)

    def scores(self, ids: Tensor, positions: Tensor, attn_mask: Tensor, prompt_width: int,
               prompt_mask: Tensor, out: slice) -> Tensor:
        """:meth:`head_scores` of the positions ``out`` of one pass over ``ids``, whose first
        ``prompt_width`` positions are the prompt prefix (masked by ``prompt_mask``)."""
        if not self.copies:
            return self.logits(ids, positions, attn_mask)[:, out]
        hidden = self.net(ids, positions=positions, attn_mask=attn_mask, return_hidden=True)
        return self.head_scores(hidden[:, out], hidden[:, :prompt_width], ids[:, :prompt_width], prompt_mask)

    def prompt_prefix(self, prompt_ids: Tensor, prompt_mask: Tensor, keep: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:
        """Left-aligned-to-the-right prompt ids and mask ``[B, P]``; rows with ``keep`` False become
        the null prompt (all padding). Right alignment puts every prompt's last token next to the
        text, so the gap between prompt and text is the same in every row (RoPE is relative)."""
        mask = prompt_mask.bool()
        if keep is not None:
            mask = mask & keep[:, None]
        width = mask.shape[1]
        order = torch.argsort(mask.int(), dim=1, stable=True)  # padding first, real tokens last
        ids = torch.gather(prompt_ids, 1, order)
        mask = torch.gather(mask, 1, order)
        ids = torch.where(mask, ids, torch.full_like(ids, self.config.pad_id))
        if width > self.config.max_prompt_tokens:
            ids, mask = ids[:, -self.config.max_prompt_tokens:], mask[:, -self.config.max_prompt_tokens:]
        return ids, mask

    def pad_prompt_ids(self, prompts: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Lists of prompt ids (our tokenizer's) -> right-padded (ids, mask), cut to max_prompt_tokens."""
        width = max(1, min(self.config.max_prompt_tokens, max((len(p) for p in prompts), default=1)))
        ids = torch.full((len(prompts), width), self.config.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for row, p in enumerate(prompts):
            p = list(p)[: self.config.max_prompt_tokens]
            ids[row, : len(p)] = torch.tensor(p, dtype=torch.long)
            mask[row, : len(p)] = True
        return ids.to(self.device), mask.to(self.device)

    def nll(self, batch: dict, generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        """Upper bound (ELBO) on the NLL in nats of the batch's texts given their prompts, and the
        token count (the training loop's validation entry point)."""
        from sunfish.diffusion.block import elbo  # the objective lives with the diffusion code

        return elbo(self, batch, generator=generator)

    def training_loss(self, batch: dict) -> tuple[Tensor, dict[str, float]]:
        from sunfish.diffusion.block import training_loss

        return training_loss(self, batch)
