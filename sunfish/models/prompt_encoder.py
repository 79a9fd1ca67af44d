"""Prompt encoders for the diffusion model.

The encoder turns prompt tokens into the vectors the denoiser's cross-attention reads (its
"memory"). Two sources of token vectors:

- ``"own"`` (default): the token embeddings of our own tokenizer. The table is the denoiser's own
  token embedding, passed in at call time rather than registered here, so that it is trained by
  both the text and the prompt and stored once in a checkpoint.
- a GPT-2 name or local path (``"gpt2"``, ``/models/gpt2``): the frozen input embeddings (``wte``,
  768-d for GPT-2 small) of that model, loaded once with ``transformers.AutoModel.from_pretrained``,
  followed by a learned projection to the model width. The prompt must then be tokenised by that
  model's own tokenizer: use :meth:`PromptEncoder.tokenize`. The frozen table is a non-persistent
  buffer: checkpoints do not carry it, the config names where to load it from again.

Either way the token vectors then go through ``n_layers`` pre-norm non-causal transformer layers
(RoPE, key padding mask; :class:`sunfish.models.layers.TransformerBlock`) and a final LayerNorm.

The null prompt: a learned vector is always prepended as slot 0 of the memory, and slot 0 is never
masked. An empty prompt (all of ``prompt_mask`` False) therefore encodes to that slot alone; this
is what conditioning dropout and the unconditional branch of classifier-free guidance use, and it
keeps every attention row well defined (no row without a key).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sunfish.models.layers import RotaryEmbedding, TransformerBlock, init_weights, zero_residual_outputs

# How the diffusion family (this encoder and the denoiser) builds the shared blocks: its checkpoints
# hold LayerNorm biases and separate query / key_value projections, and it was trained with RoPE
# rotated in float32.
BLOCK_OPTIONS = {"norm": "layer", "fused_qkv": False, "rope_fp32": True}

# ----------------------------------------------------------------------------------------------
# loading pretrained (GPT-2) token embeddings


def is_own(source: str) -> bool:
    return source.strip().lower() == "own"


def _remedy(name: str) -> str:
    return (
        f"Where the Hugging Face hub is reachable, save it once with "
        f"AutoModel.from_pretrained({name!r}).save_pretrained(DIR) and "
        f"AutoTokenizer.from_pretrained({name!r}).save_pretrained(DIR), then set cfg.prompt_encoder: DIR "
        f"(a local path); or set cfg.prompt_encoder: own to use the model's own tokenizer and embeddings."
    )


def load_pretrained_embeddings(name_or_path: str):
    """(frozen input-embedding matrix [vocab, dim] float32, tokenizer) of a transformers model.

    Loads offline first (a local directory, or the hub cache); a hub name not in the cache is tried
    online unless HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set. Raises ValueError naming the remedy
    when the model cannot be loaded.
    """
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise ValueError(
            f"prompt_encoder {name_or_path!r} needs the transformers package ({exc}). {_remedy(name_or_path)}"
        ) from None

    expanded = str(Path(name_or_path).expanduser())
    local = Path(expanded).is_dir()
    if not local and (name_or_path.startswith(("/", "./", "../", "~")) or Path(expanded).exists()):
        raise ValueError(
            f"prompt_encoder {name_or_path!r}: no such directory "
            "(expected a model saved with save_pretrained). "
            + _remedy("gpt2")
        )
    source = expanded if local else name_or_path
    offline = local or bool(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))
    attempts = [True] if offline else [True, False]
    last: Exception | None = None
    for local_only in attempts:
        try:
            model = AutoModel.from_pretrained(source, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            break
        except Exception as exc:  # OSError, HF validation errors, missing files, no network ...
            last = exc
    else:
        raise ValueError(
            f"cannot load prompt_encoder {name_or_path!r} "
            f"({type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}). "
            + _remedy(name_or_path)
        ) from None
    weight = model.get_input_embeddings().weight.detach().to(torch.float32).clone()
    del model
    return weight, tokenizer


def pretrained_embedding_shape(name_or_path: str) -> tuple[int, int]:
    """(vocab, dim) of a pretrained model's input embeddings, from its config only."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(Path(name_or_path).expanduser()), local_files_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read the config of prompt_encoder {name_or_path!r} ({exc}). {_remedy(name_or_path)}"
        ) from None
    dim = getattr(config, "n_embd", None) or config.hidden_size
    return int(config.vocab_size), int(dim)


# ----------------------------------------------------------------------------------------------
# the encoder


class PromptEncoder(nn.Module):
    """Prompt token ids -> (memory [B, 1 + P, d_model], memory_mask [B, 1 + P]).

    Slot 0 of the memory is the learned null vector (always attended); slots 1..P are the prompt
    tokens. With ``source="own"`` the caller passes its token embedding (``own_embedding``) to
    :meth:`forward`; with a pretrained source the frozen table is loaded here (or given as
    ``pretrained_embeddings``, e.g. a meta tensor to count parameters without loading weights).
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_head: int,
        d_ff: int,
        n_layers: int,
        max_prompt_tokens: int,
        dropout: float = 0.0,
        source: str = "own",
        pretrained_embeddings: torch.Tensor | None = None,
        pretrained_tokenizer=None,
    ):
        super().__init__()
        self.source = source
        self.max_prompt_tokens = max_prompt_tokens
        self.d_model = d_model
        self.tokenizer = None
        self.projection: nn.Linear | None = None
        if not is_own(source):
            if pretrained_embeddings is None:
                pretrained_embeddings, pretrained_tokenizer = load_pretrained_embeddings(source)
            self.register_buffer("pretrained_embeddings", pretrained_embeddings, persistent=False)
            self.tokenizer = pretrained_tokenizer
            self.projection = nn.Linear(pretrained_embeddings.shape[1], d_model, bias=False)
        self.null = nn.Parameter(torch.zeros(d_model))
        self.rope = RotaryEmbedding(d_model // n_head, 1 + max_prompt_tokens)
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, n_head, d_ff, dropout=dropout, **BLOCK_OPTIONS) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        init_weights(self)
        if not self.null.is_meta:
            nn.init.normal_(self.null, std=1.0)  # the scale of the (own) token vectors
        zero_residual_outputs(self)

    @property
    def uses_own_tokenizer(self) -> bool:
        return is_own(self.source)

    def token_vectors(self, prompt_ids: torch.Tensor, own_embedding: nn.Embedding | None) -> torch.Tensor:
        if self.projection is None:
            if own_embedding is None:
                raise ValueError("the own prompt encoder needs the model's token embedding (own_embedding)")
            return own_embedding(prompt_ids)
        vocab = self.pretrained_embeddings.shape[0]
        if prompt_ids.numel() and (int(prompt_ids.max()) >= vocab or int(prompt_ids.min()) < 0):
            raise ValueError(
                f"prompt ids out of range for {self.source!r} (vocab {vocab}): with a pretrained prompt "
                "encoder, tokenise prompts with model.tokenize_prompts(texts)"
            )
        return self.projection(F.embedding(prompt_ids, self.pretrained_embeddings))

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        own_embedding: nn.Embedding | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prompt_ids = prompt_ids[:, : self.max_prompt_tokens]
        prompt_mask = prompt_mask[:, : self.max_prompt_tokens].bool()
        batch = prompt_ids.shape[0]
        tokens = self.token_vectors(prompt_ids, own_embedding)
        null = self.null.to(tokens.dtype).expand(batch, 1, -1)
        x = torch.cat([null, tokens], dim=1)
        null_mask = torch.ones(batch, 1, dtype=torch.bool, device=prompt_mask.device)
        mask = torch.cat([null_mask, prompt_mask], dim=1)
        rope = self.rope(x.shape[1])
        for layer in self.layers:
            x = layer(x, rope=rope, key_padding_mask=mask)
        return self.norm(x), mask

    def tokenize(self, texts: list[str], tokenizer=None, device: torch.device | str = "cpu"):
        """Prompt texts -> (prompt_ids Long[B, P], prompt_mask Bool[B, P]), truncated to max_prompt_tokens.

        ``tokenizer`` (anything with ``encode(text) -> list[int]``; its ``encode_prompt`` when it
        has one, as our TextTokenizer does) is required for the own encoder and ignored for a
        pretrained one, which uses its own tokenizer.
        """
        if self.tokenizer is not None:
            ids = [list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
        elif tokenizer is not None:
            encode = getattr(tokenizer, "encode_prompt", tokenizer.encode)
            ids = [list(encode(text)) for text in texts]
        else:
            raise ValueError("the own prompt encoder needs our tokenizer to tokenise prompt text")
        return pad_prompts(ids, self.max_prompt_tokens, device=device)


def pad_prompts(
    prompts: list[list[int]], max_tokens: int, pad_id: int = 0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> right-padded (ids, mask), each prompt cut to its first ``max_tokens`` ids."""
    cut = [list(p)[:max_tokens] for p in prompts]
    width = max((len(p) for p in cut), default=0)
    ids = torch.full((len(cut), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(cut), width), dtype=torch.bool)
    for row, p in enumerate(cut):
        if p:
            ids[row, : len(p)] = torch.tensor(p, dtype=torch.long)
            mask[row, : len(p)] = True
    return ids.to(device), mask.to(device)
