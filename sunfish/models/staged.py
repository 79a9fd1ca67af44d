"""The staged autoregressive language model (pipeline stages train_stage_0, train_stage@1 .. train_stage@3).

One network grows by one component per stage and every stage starts exactly where the previous
one ended (``StagedLM.warm_start``):

========  ===================================================================================
stage     adds
========  ===================================================================================
0         MU token representation (8x8 semantic matrix, refined causally), RoPE, causal attention
1         TEMPORAL: a per-token table (zero-initialised) projected into the input stream
2         nothing in the forward pass: K-1 credit assignment acts on gradients
          (``sunfish.training.k1``; ``StagedLM.uses_k1`` says when the loop should call it)
3         a graph-routed causal attention mask, blended with dense attention through a
          zero-initialised gate (an extra attention pass: it saves no compute)
========  ===================================================================================

Everything is causal: no position can see a later token, anywhere (MU refinement, graph
similarity, attention). ``tests/test_models_staged.py`` checks it at every stage.

MU layout
---------
The 8x8 semantic matrix, its block names and storage are defined in :mod:`sunfish.models.mu`
(:data:`MU_BLOCKS`, :func:`mu_matrix`, :func:`mu_state`), with the encoder that refines it.

Stage 1: TEMPORAL
-----------------
``temporal`` is a ``[vocab, temporal_dim]`` table, zero-initialised, read per token and projected
by ``temporal_proj`` (``temporal_dim -> d_model``) into the input stream; positions come from RoPE.
The projection keeps a normal random init on purpose: with the table at zero the branch outputs
exactly 0 (exact warm start) while the table still receives gradient. Zeroing both would leave the
branch stuck at zero forever (each factor's gradient is proportional to the other).

Stage 3: exact warm start
-------------------------
Each decoder layer computes q, k, v once and attends twice: full causal attention (what stage 2
computed) and graph-routed attention (the same q, k, v under the graph mask). The routed pass is
dense attention with more entries masked, not a sparse kernel: stage 3 costs an extra attention
pass and saves no compute; what it tests is whether routing helps the model, not speed. The head
outputs are blended per head, ``out = full + g_h * (graph - full)``, with ``g`` a per-layer,
per-head parameter initialised to zero, so stage 3's first logits are bit-identical to stage 2's,
and the gradient of ``g`` (``sum(dL/dout * (graph - full))``) is non-zero, so the model learns how
much to route through the graph. The graph branch adds no other parameters.

Graph mask (``graph_attention_mask``): boolean ``[B, Tq, Tk]``, built on the device, vectorised;
``causal AND (local band OR shortcut OR semantic)``:

- local band: the ``graph_window`` previous tokens and the token itself;
- shortcuts: Fibonacci offsets 2, 3, 5, 8, 13, ... — the first ``graph_shortcuts`` of them that lie
  *outside* the band (smaller ones are already in it, so they would add nothing);
- semantic: the ``graph_top_k`` earlier tokens, not already linked, whose features are the most
  similar by cosine (ties go to the most recent token; similarities are quantised to 2^-14 so the
  choice is reproducible between the cached and uncached passes). Features: the I, R2 and K blocks
  of the final MU state (12 values) when ``mu_full``; otherwise a fixed random projection (a
  persistent buffer, ``graph_projection``) of the input stream (token embedding + TEMPORAL) to 12
  values. Top-k has no gradient, so the features are not trained by routing.

``model.last_graph_stats`` holds ``graph_edges_per_token`` (mean number of keys each query may
attend to) and ``graph_density`` (that number over the causal count) of the last forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sunfish.models.layers import (
    MLP,
    Attention,
    KVCache,
    LayerCache,
    RMSNorm,
    RotaryEmbedding,
    init_weights,
    scaled_residual_std,
)
from sunfish.models.mu import (
    MU_AFFINITY_DIM,
    MU_BLOCK_INDEX,
    MU_BLOCK_SIDE,
    MU_BLOCK_SIZE,
    MU_BLOCKS,
    MU_CROSS_HEADS,
    MU_DIM,
    MU_GRID,
    MU_MATRIX_SIDE,
    MU_N_BLOCKS,
    BlockDiagonalLinear,
    MUEncoder,
    MURefinementLayer,
    mu_blocks,
    mu_matrix,
    mu_state,
)

if TYPE_CHECKING:  # config stays importable without torch, and this module without pydantic at runtime
    from sunfish.config import ModelPreset, StagedConfig

__all__ = [  # the MU names are sunfish.models.mu's, re-exported where they were defined before
    "GRAPH_FEATURE_DIM", "GRAPH_SIMILARITY_BLOCKS", "MU_AFFINITY_DIM", "MU_BLOCK_INDEX", "MU_BLOCK_SIDE",
    "MU_BLOCK_SIZE", "MU_BLOCKS", "MU_CROSS_HEADS", "MU_DIM", "MU_GRID", "MU_MATRIX_SIDE", "MU_N_BLOCKS",
    "BlockDiagonalLinear", "MUEncoder", "MURefinementLayer", "StagedBlock", "StagedLM", "StagedLMConfig",
    "fibonacci_offsets", "graph_attention_mask", "mu_blocks", "mu_matrix", "mu_state",
]

# ----------------------------------------------------------------------------------------------
# graph routing: the features it compares

GRAPH_SIMILARITY_BLOCKS: tuple[str, ...] = ("I", "R2", "K")
GRAPH_FEATURE_DIM = len(GRAPH_SIMILARITY_BLOCKS) * MU_BLOCK_SIZE  # 12


def fibonacci_offsets(count: int, beyond: int = 1) -> list[int]:
    """The first ``count`` Fibonacci numbers (2, 3, 5, 8, ...) greater than ``beyond``."""
    out: list[int] = []
    a, b = 1, 2
    while len(out) < count:
        if b > beyond:
            out.append(b)
        a, b = b, a + b
    return out


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass
class StagedLMConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: int = 1024
    max_seq_len: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True
    stage: int = 0
    mu_full: bool = True
    mu_layers: int = 1
    temporal_dim: int = 64
    k1_mode: str = "log"
    k1_path_mass: float = 0.9
    graph_window: int = 32
    graph_top_k: int = 4
    graph_shortcuts: int = 6
    eos_id: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.stage <= 3:
            problems.append(f"stage must be 0..3, got {self.stage}")
        if self.d_model % self.n_head:
            problems.append(f"n_head={self.n_head} does not divide d_model={self.d_model}")
        elif (self.d_model // self.n_head) % 2:
            problems.append(f"head width {self.d_model // self.n_head} must be even for RoPE")
        if self.k1_mode not in ("log", "scale"):
            problems.append(f"k1_mode must be 'log' or 'scale', got {self.k1_mode!r}")
        if self.vocab_size < 2:
            problems.append(f"vocab_size must be >= 2, got {self.vocab_size}")
        if problems:
            raise ValueError("invalid StagedLMConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StagedLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown StagedLMConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_params(
        cls, staged: StagedConfig, preset: ModelPreset, vocab_size: int, stage: int, eos_id: int
    ) -> StagedLMConfig:
        """Config for ``stage`` from params.yaml's ``staged`` section and the chosen preset.

        A preset with a fixed ``vocab_size`` (an original's) wins over the tokenizer's, which must fit.
        """
        vocab = preset.vocab_size or vocab_size
        if vocab < vocab_size:
            raise ValueError(
                f"preset vocab_size={preset.vocab_size} is smaller than the tokenizer's {vocab_size}"
            )
        return cls(
            vocab_size=vocab,
            n_layer=preset.n_layer,
            n_head=preset.n_head,
            d_model=preset.d_model,
            d_ff=preset.d_ff,
            max_seq_len=preset.seq_len,
            dropout=staged.dropout,
            tie_embeddings=staged.tie_embeddings,
            stage=stage,
            mu_full=staged.mu.full,
            mu_layers=staged.mu.layers,
            temporal_dim=staged.temporal.dim,
            k1_mode=staged.k1.mode,
            k1_path_mass=staged.k1.path_mass,
            graph_window=staged.graph.window,
            graph_top_k=staged.graph.top_k,
            graph_shortcuts=staged.graph.shortcuts,
            eos_id=eos_id,
        )


# ----------------------------------------------------------------------------------------------
# graph routing


def graph_attention_mask(
    query_features: Tensor,
    key_features: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    *,
    window: int,
    top_k: int,
    offsets: Tensor,
) -> Tensor:
    """Boolean ``[B, Tq, Tk]`` graph mask (True = may attend); never links a query to a later key.

    ``query_features [B, Tq, F]`` / ``key_features [B, Tk, F]`` must be L2-normalised (cosine =
    dot product); ``*_positions`` are absolute positions (1-D); ``offsets`` a 1-D LongTensor of
    shortcut offsets (> 0). See the module docstring for the three kinds of edge.
    """
    distance = query_positions.unsqueeze(1) - key_positions.unsqueeze(0)  # [Tq, Tk]
    linked = (distance >= 0) & (distance <= window)
    if offsets.numel():
        linked = linked | torch.isin(distance, offsets)
    b = query_features.size(0)
    mask = linked.unsqueeze(0).expand(b, -1, -1)
    if top_k > 0:
        candidate = (distance > 0) & ~linked  # earlier and not already linked
        with torch.autocast(query_features.device.type, enabled=False):  # fp32 even under bf16 autocast
            sim = torch.matmul(query_features.float(), key_features.float().transpose(1, 2))
        # integer keys: quantised similarity, ties to the most recent key; -1 = not a candidate
        quantised = torch.round((sim.clamp(-1.0, 1.0) + 1.0) * 16384.0).long()
        keys = quantised * (1 << 24) + key_positions.unsqueeze(0).unsqueeze(0)
        keys = keys.masked_fill(~candidate, -1)
        k = min(top_k, keys.size(-1))
        top, index = keys.topk(k, dim=-1)
        chosen = torch.zeros_like(mask).scatter_(-1, index, top >= 0)
        mask = mask | chosen
    return mask


# ----------------------------------------------------------------------------------------------
# decoder


class StagedBlock(nn.Module):
    """Pre-norm decoder layer; with ``graph=True`` its attention is the gated graph blend."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float, graph: bool):
        super().__init__()
        self.norm_attn = RMSNorm(d_model)
        self.attn = Attention(d_model, n_head, dropout=dropout)
        self.norm_mlp = RMSNorm(d_model)
        self.mlp = MLP(d_model, d_ff, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.graph_gate = nn.Parameter(torch.zeros(n_head)) if graph else None

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        graph_mask: Tensor | None = None,
        cache: LayerCache | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        q, k, v = self.attn.project(self.norm_attn(x), rope=rope, cache=cache)
        heads = self.attn.attend(q, k, v, causal=attn_mask is None, attn_mask=attn_mask)
        if self.graph_gate is not None:
            routed = self.attn.attend(q, k, v, attn_mask=graph_mask.unsqueeze(1))
            gate = self.graph_gate.to(heads.dtype).view(1, -1, 1, 1)
            heads = heads + gate * (routed - heads)
        x = x + self.drop(self.attn.merge(heads))
        return x + self.mlp(self.norm_mlp(x))


class StagedLM(nn.Module):
    """The staged causal LM. See the module docstring for what each stage adds."""

    kind = "staged"

    def __init__(self, config: StagedLMConfig):
        super().__init__()
        self.config = c = config
        if c.mu_full:
            self.mu = MUEncoder(c.vocab_size, c.mu_layers, c.max_seq_len, c.dropout)
            self.mu_norm = RMSNorm(MU_DIM)
            self.mu_proj = nn.Linear(MU_DIM, c.d_model, bias=False)
        else:
            self.embed = nn.Embedding(c.vocab_size, c.d_model)
        if c.stage >= 1:
            self.temporal = nn.Embedding(c.vocab_size, c.temporal_dim)
            self.temporal_proj = nn.Linear(c.temporal_dim, c.d_model, bias=False)
        self.drop = nn.Dropout(c.dropout)
        self.rope = RotaryEmbedding(c.d_model // c.n_head, c.max_seq_len)
        self.blocks = nn.ModuleList(
            StagedBlock(c.d_model, c.n_head, c.d_ff, c.dropout, graph=c.stage >= 3) for _ in range(c.n_layer)
        )
        self.norm = RMSNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.stage >= 3:
            offsets = torch.tensor(fibonacci_offsets(c.graph_shortcuts, c.graph_window), dtype=torch.long)
            self.register_buffer("graph_offsets", offsets, persistent=False)
            if not c.mu_full:
                projection = torch.randn(c.d_model, GRAPH_FEATURE_DIM) / math.sqrt(c.d_model)
                self.register_buffer("graph_projection", projection)
        self._init_weights()
        self.last_graph_stats: dict[str, float] = {}

    # -- construction ----------------------------------------------------------------------------

    def _init_weights(self) -> None:
        c = self.config
        init_weights(self)
        residual_std = scaled_residual_std(c.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, 0.0, residual_std)
            nn.init.normal_(block.mlp.down.weight, 0.0, residual_std)
        if c.stage >= 1:
            # zero table: the branch outputs exactly 0 at the start of stage 1; the projection keeps
            # its random init so the table receives gradient (both zero would never move)
            nn.init.zeros_(self.temporal.weight)
        if c.tie_embeddings:
            if not c.mu_full:
                self.head.weight = self.embed.weight
            elif c.d_model == MU_DIM:
                self.head.weight = self.mu.embed.weight

    @property
    def tied(self) -> bool:
        """Whether the output head shares its weight with the input token table."""
        table = self.mu.embed if self.config.mu_full else self.embed
        return self.head.weight is table.weight

    @property
    def uses_k1(self) -> bool:
        """Whether the training loop should apply K-1 (stage 2 on; ``config.k1_mode`` says how)."""
        return self.config.stage >= 2

    @classmethod
    def warm_start(cls, previous: StagedLM, config: StagedLMConfig | dict) -> StagedLM:
        """A model for ``config.stage`` holding every weight of ``previous``.

        The new stage's components start so that its first logits equal ``previous``'s exactly
        (zero TEMPORAL table, zero graph gates). Raises if the shapes differ or if ``previous`` has
        weights the new model lacks (going back a stage).
        """
        if isinstance(config, dict):
            config = StagedLMConfig.from_dict(config)
        shared: tuple[str, ...] = (
            "vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_seq_len", "tie_embeddings", "mu_full",
            "mu_layers",
        )
        if previous.config.stage >= 1 and config.stage >= 1:
            shared += ("temporal_dim",)
        diff = [
            f"{k}: {getattr(previous.config, k)} -> {getattr(config, k)}"
            for k in shared
            if getattr(previous.config, k) != getattr(config, k)
        ]
        if diff:
            raise ValueError("warm start needs the same shapes; changed: " + ", ".join(diff))
        if config.stage < previous.config.stage:
            raise ValueError(f"cannot warm-start stage {config.stage} from stage {previous.config.stage}")
        reference = next(previous.parameters())
        model = cls(config).to(device=reference.device, dtype=reference.dtype)
        missing, unexpected = model.load_state_dict(previous.state_dict(), strict=False)
        if unexpected:
            raise ValueError(f"previous model has weights the new one lacks: {unexpected}")
        new_components = {model.component_of(name) for name in missing}
        if not new_components <= {"temporal", "graph"}:
            raise ValueError(f"weights missing from the previous model: {missing}")
        model.train(previous.training)
        return model

    # -- groups ------------------------------------------------------------------------------------

    def component_of(self, name: str) -> str:
        """Module group of a parameter/buffer name: embedding, mu, temporal, attention, graph, mlp, head."""
        for prefix in ("_orig_mod.", "module."):
            while name.startswith(prefix):
                name = name[len(prefix):]
        if name.startswith(("mu.", "mu_norm.", "mu_proj.")):
            return "mu"
        if name.startswith("embed."):
            return "embedding"
        if name.startswith("temporal"):
            return "temporal"
        if name.startswith("graph_") or name.endswith("graph_gate"):
            return "graph"
        if name.startswith("blocks."):
            part = name.split(".")[2]
            return "attention" if part in ("attn", "norm_attn") else "mlp"
        if name.startswith(("norm.", "head.")):
            return "head"
        return "other"

    # -- forward -----------------------------------------------------------------------------------

    def init_cache(self) -> KVCache:
        """An empty decoding cache for ``forward(ids, cache=...)``."""
        return KVCache()

    def graph_features(self, state: Tensor | None, stream: Tensor) -> Tensor:
        """L2-normalised similarity features ``[B, T, 12]`` for graph routing."""
        if state is not None:
            index = [MU_BLOCK_INDEX[n] for n in GRAPH_SIMILARITY_BLOCKS]
            feats = mu_blocks(state)[:, :, index].flatten(-2)
        else:
            feats = stream @ self.graph_projection.to(stream.dtype)
        return F.normalize(feats.detach().float(), dim=-1)

    def forward(
        self,
        input_ids: Tensor,
        cache: KVCache | None = None,
        *,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits ``[B, T, vocab]``. With ``cache``, ``input_ids`` are the next tokens after the
        cached ones (positions continue from ``cache.length``) and the cache is extended.

        ``positions`` and ``attn_mask`` (boolean, True = may attend, broadcastable to ``[B, 1, T,
        T_cached + T]``) replace the causal layout everywhere (MU refinement and decoder): the block
        diffusion model (``sunfish.models.block_denoiser``) reuses this network, weights and all,
        under its block-causal mask, and decodes a block against a cache of the blocks before it. ``return_hidden`` returns the final normalised hidden states instead of
        logits. Graph routing (stage 3) is causal by construction and refuses a mask.
        """
        c = self.config
        b, t = input_ids.shape
        offset = cache.length if cache is not None else 0
        if attn_mask is not None and c.stage >= 3:
            raise ValueError("an explicit attn_mask needs a stage 0-2 model (graph routing is causal only)")
        if positions is None:
            positions = torch.arange(offset, offset + t, device=input_ids.device)
        if int(positions.max()) + 1 > c.max_seq_len:
            raise ValueError(f"sequence of {int(positions.max()) + 1} tokens exceeds max_seq_len={c.max_seq_len}")
        state = None
        if c.mu_full:
            state = self.mu(input_ids, positions, cache, attn_mask)
            x = self.mu_proj(self.mu_norm(state))
        else:
            x = self.embed(input_ids)
        if c.stage >= 1:
            x = x + self.temporal_proj(self.temporal(input_ids))
        graph_mask = None
        if c.stage >= 3:
            graph_mask = self._graph_mask(state, x, positions, cache)
        x = self.drop(x)
        rope = self.rope(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, graph_mask, cache.layer(f"block.{i}") if cache is not None else None, attn_mask)
        if cache is not None:
            cache.length = offset + t
        if return_hidden:
            return self.norm(x)
        return self.head(self.norm(x))

    def _graph_mask(
        self, state: Tensor | None, stream: Tensor, positions: Tensor, cache: KVCache | None
    ) -> Tensor:
        c = self.config
        feats = self.graph_features(state, stream)
        key_feats = feats
        if cache is not None:
            previous = cache.extras.get("graph_features")
            key_feats = feats if previous is None else torch.cat((previous, feats), dim=1)
            cache.extras["graph_features"] = key_feats
        key_positions = torch.arange(key_feats.size(1), device=positions.device)
        with torch.no_grad():
            mask = graph_attention_mask(
                feats, key_feats, positions, key_positions,
                window=c.graph_window, top_k=c.graph_top_k, offsets=self.graph_offsets,
            )
            edges = mask.sum(-1, dtype=torch.float32)  # [B, Tq]
            causal_edges = (positions + 1).to(torch.float32)
            self.last_graph_stats = {
                "graph_edges_per_token": float(edges.mean()),
                "graph_density": float((edges / causal_edges).mean()),
            }
        return mask

    # -- objectives --------------------------------------------------------------------------------

    def _summed_nll(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self(batch["input_ids"])
        targets = batch["targets"]
        total = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        return total, (targets != -100).sum()

    def training_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Mean next-token cross-entropy over the non-padding targets (-100 ignored)."""
        total, n = self._summed_nll(batch)
        loss = total / n.clamp(min=1)
        metrics = {"loss": float(loss.detach()), "tokens": float(n)}
        if self.config.stage >= 3:
            metrics.update(self.last_graph_stats)
        return loss, metrics

    @torch.no_grad()
    def nll(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        """Exact summed NLL (nats, float64 scalar) over the non-padding targets, and their count."""
        total, n = self._summed_nll(batch)
        return total.double(), int(n)
