"""Block diffusion (BD3-LM style): the objective and the sampler of ``BlockDiffusionLM``.

Objective. The text (with its leading <eos>) is cut into blocks of B tokens after the anchor; the
likelihood factorises over blocks left to right, and each block's NLL given everything before it
is bounded by the masked-diffusion ELBO: mask each of its tokens with probability t and score
``(1/t) * sum of -log p(x_j | ...)`` over the masked ones. Summed over blocks this is an upper
bound on the NLL of the text given the prompt; at B = 1 it is the AR model's exact NLL. One t is
drawn per (row, block), stratified over the batch so that every noise level is trained on in
every step. Every block is trained in one pass (the layout of ``sunfish.models.block_denoiser``).

Sampler. Block by block: the context (prompt, <eos>, the blocks done) is fixed; the group (the
anchor, then B-1 [MASK]) is denoised in ``steps_per_block`` steps from t = 1 to 0, each step
revealing a share of the still-masked tokens (a binomial share for "ddpm", exactly
round(n * (t - s) / t) for "ddim"), their values drawn from the guided, nucleus-restricted
distribution. Classifier-free guidance runs the null prompt beside the prompt and mixes the
log-probabilities ``uncond + w * (cond - uncond)`` (``sunfish.diffusion.guidance``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sunfish.diffusion.guidance import combine, guided_log_probs
from sunfish.diffusion.masked import MIN_TIME, _sample_from, nucleus, real_text_mask, uniform


# The attention masks of the block layout (described in sunfish.models.block_denoiser's docstring) live
# here, with the code that builds the layout: the model calls this module for its loss, so importing
# them from the model made an import circle.
def group_mask(prompt_len: int, text_len: int, block_size: int, device=None) -> torch.Tensor:
    """Boolean ``[T, T]`` attention of the training layout (True = may attend), T = P + 2L.

    Rows and columns: prompt (P), clean text (L), noised text (L). See the docstring of
    :mod:`sunfish.models.block_denoiser`.
    """
    p, n, b = prompt_len, text_len, block_size
    total = p + 2 * n
    idx = torch.arange(total, device=device)
    is_noised = idx >= p + n
    text_pos = torch.where(idx >= p, (idx - p) % max(n, 1), idx - p)  # text index for text rows
    causal = idx[None, :] <= idx[:, None]
    q_noised, k_noised = is_noised[:, None], is_noised[None, :]
    k_clean_text = (idx[None, :] >= p) & ~k_noised
    k_prompt = idx[None, :] < p
    group_q = (text_pos // b)[:, None]
    group_k = (text_pos // b)[None, :]
    # clean rows and the prompt: causal over prompt + clean text, never the noised copy
    clean_rows = causal & ~k_noised
    # noised rows: the prompt, the clean text before the group's anchor, and the whole group
    noised_rows = k_prompt | (k_clean_text & (text_pos[None, :] < group_q * b)) | (k_noised & (group_k == group_q))
    return torch.where(q_noised, noised_rows, clean_rows)


def decode_mask(context_len: int, group_len: int, device=None) -> torch.Tensor:
    """Boolean ``[T, T]`` of the sampling layout: a causal context, then one bidirectional group."""
    total = context_len + group_len
    idx = torch.arange(total, device=device)
    causal = idx[None, :] <= idx[:, None]
    in_group = (idx[:, None] >= context_len) & (idx[None, :] >= context_len)
    return causal | in_group


def _layout(model, batch: dict, keep: torch.Tensor | None):
    """Prompt prefix, text with its leading <eos>, their masks and the positions of the layout."""
    c = model.config
    prompt_ids, prompt_mask = model.prompt_prefix(batch["prompt_ids"], batch["prompt_mask"], keep)
    text = batch["text_ids"]
    rows = text.shape[0]
    eos = torch.full((rows, 1), c.eos_id, dtype=text.dtype, device=text.device)
    text = torch.cat((eos, text), dim=1)
    text_mask = torch.cat((torch.ones_like(eos, dtype=torch.bool), batch["text_mask"].bool()), dim=1)
    length = text.shape[1]
    if prompt_ids.shape[1] + length > c.max_seq_len:
        keep_len = c.max_seq_len - prompt_ids.shape[1]
        text, text_mask, length = text[:, :keep_len], text_mask[:, :keep_len], keep_len
    return prompt_ids, prompt_mask, text, text_mask, length


def block_times(rows: int, n_blocks: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ``[rows, n_blocks]``: stratified over all (row, block) cells, in random order."""
    where = generator.device if generator is not None else torch.device("cpu")
    count = rows * n_blocks
    offset = torch.rand((), generator=generator, device=where)
    order = torch.randperm(count, generator=generator, device=where)
    t = (order.float() + offset) / count
    return (MIN_TIME + (1.0 - MIN_TIME) * t).view(rows, n_blocks).to(device)


def _masked_pass(model, batch: dict, keep, t_of_target, generator):
    """Shared by training and the ELBO: the noised layout, one forward pass, per-target CE.

    ``t_of_target(rows, n_blocks)`` gives the masking probability of every block. Returns the CE
    ``[rows, L-1]`` of each target x_1..x_{L-1} (0 where not scored), the weight 1/t of each scored
    target, and the boolean of scored targets.
    """
    c = model.config
    prompt_ids, prompt_mask, text, text_mask, length = _layout(model, batch, keep)
    rows, width, b = text.shape[0], prompt_ids.shape[1], c.block_size
    device = text.device
    n_blocks = max(1, -(-(length - 1) // b))
    t = t_of_target(rows, n_blocks)  # [rows, n_blocks]
    target_block = (torch.arange(1, length, device=device) - 1) // b  # block of target j = 1..L-1
    t_target = t[:, target_block]  # [rows, L-1]
    masked = (uniform((rows, length - 1), generator, device) < t_target) & text_mask[:, 1:]
    # inputs of the noised copy: position i holds x_i, masked when i is not an anchor (i % B != 0)
    positions_text = torch.arange(length, device=device)
    input_masked = torch.zeros_like(text_mask)
    input_masked[:, 1:] = masked & (positions_text[1:] % b != 0)
    logits = layout_logits(model, prompt_ids, prompt_mask, text, text_mask, input_masked)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), text[:, 1:].flatten(), reduction="none").view(rows, -1)
    ce = ce * masked
    return ce, (1.0 / t_target) * masked, masked, text_mask[:, 1:]


def layout_logits(model, prompt_ids, prompt_mask, text, text_mask, input_masked) -> torch.Tensor:
    """Logits ``[rows, L-1, vocab]`` predicting x_1..x_{L-1} from the noised copy of the text
    (with the copy head: log-probabilities, which the same log-softmax and cross-entropy read).

    ``input_masked`` [rows, L]: which inputs of the noised copy are [MASK] (never an anchor).
    """
    width, length = prompt_ids.shape[1], text.shape[1]
    device = text.device
    noised = torch.where(input_masked, torch.full_like(text, model.mask_id), text)
    ids = torch.cat((prompt_ids, text, noised), dim=1)
    positions_text = torch.arange(length, device=device)
    positions = torch.cat((torch.arange(width, device=device), width + positions_text, width + positions_text))
    keys = torch.cat((prompt_mask, text_mask, text_mask), dim=1)
    attn = group_mask(width, length, model.config.block_size, device)[None, None] & keys[:, None, None, :]
    attn = attn | torch.eye(ids.shape[1], dtype=torch.bool, device=device)[None, None]  # padding rows: themselves
    return model.scores(ids, positions, attn, width, prompt_mask, slice(width + length, width + 2 * length - 1))


def text_logits(model, batch: dict, masked: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[rows, L, vocab]`` of the batch's text tokens when the tokens ``masked`` [rows, L]
    are [MASK] in the noised copy (anchors stay clean: they are the previous block's context).

    ``keep`` [rows] False: the null prompt. The diagnose checks' view of the model (initial loss,
    memorisation, conditioning effect), the same pass as training.
    """
    prompt_ids, prompt_mask, text, text_mask, length = _layout(model, batch, keep)
    b = model.config.block_size
    positions = torch.arange(length, device=text.device)
    input_masked = torch.zeros_like(text_mask)
    input_masked[:, 1:] = masked[:, : length - 1].bool() & (positions[1:] % b != 0)
    return layout_logits(model, prompt_ids, prompt_mask, text, text_mask, input_masked)


def training_loss(model, batch: dict):
    c = model.config
    rows = batch["text_ids"].shape[0]
    keep = uniform((rows,), None, batch["text_ids"].device) >= c.conditioning_dropout
    device = batch["text_ids"].device
    ce, weight, masked, real = _masked_pass(
        model, batch, keep, lambda r, n: block_times(r, n, device), None
    )
    n_real = real.sum().clamp(min=1)
    loss = (ce * weight).sum() / n_real
    n_masked = masked.sum().clamp(min=1)
    metrics = {
        "elbo_per_token": float(loss.detach()),
        "masked_ce": float(ce.detach().sum() / n_masked),
        "masked_fraction": float(masked.sum() / n_real),
    }
    return loss, metrics


@torch.no_grad()
def elbo(model, batch: dict, generator: torch.Generator | None = None, conditional: bool = True):
    """Upper bound on the NLL (nats, float64) summed over the texts' tokens, and the token count.

    ``conditional=False`` scores the texts under the null prompt: the unconditional bound.
    The leading <eos> is context, not scored; the tokens after it (the text and its closing
    <eos> where it fits) are.
    """
    rows = batch["text_ids"].shape[0]
    device = batch["text_ids"].device
    keep = torch.full((rows,), conditional, dtype=torch.bool, device=device)
    ce, weight, _, real = _masked_pass(
        model, batch, keep, lambda r, n: block_times(r, n, device, generator), generator
    )
    return (ce.double() * weight.double()).sum(), int(real.sum())


@torch.no_grad()
def row_elbo_pair(model, ids: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                  draws: int = 4, generator: torch.Generator | None = None, with_null: bool = True):
    """(conditional bound, unconditional bound, real tokens) per row, in nats (float64 [N]).

    What sequence guidance needs of a block model: the estimates of -log p(x | c) and -log p(x | null)
    of each sample ``ids`` [N, L] (as the sampler returns them: no leading <eos>; a row's text ends
    at its first <eos>, which is scored). Each of the ``draws`` noise draws is used for both the
    prompt and the null prompt (the same times and masks: common random numbers), so most of the
    bound's noise cancels in the difference. ``with_null=False`` skips the null-prompt passes (what
    best-of-k needs: half the cost) and returns None in their place.
    """
    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1")
    device = model.device
    ids = ids.to(device)
    rows = ids.shape[0]
    batch = {"prompt_ids": prompt_ids.to(device), "prompt_mask": prompt_mask.to(device), "text_ids": ids,
             "text_mask": real_text_mask(ids, model.config.eos_id).to(device)}
    where = generator.device if generator is not None else torch.device("cpu")
    seeds = torch.randint(0, 2**62, (draws,), generator=generator, device=where).tolist()
    totals = {True: torch.zeros(rows, dtype=torch.float64), False: torch.zeros(rows, dtype=torch.float64)}
    tokens = None
    for seed in seeds:
        for conditional in (True, False) if with_null else (True,):
            g = torch.Generator(device=where).manual_seed(int(seed))
            keep = torch.full((rows,), conditional, dtype=torch.bool, device=device)
            ce, weight, _, real = _masked_pass(model, batch, keep, lambda r, n: block_times(r, n, device, g), g)
            totals[conditional] += (ce.double() * weight.double()).sum(dim=1).cpu()
            tokens = real.sum(dim=1).cpu()
    return totals[True] / draws, totals[False] / draws if with_null else None, tokens


def _rows_prefix(model, prompt_ids, prompt_mask, num_samples, device):
    """The prompt prefix of every row (the null prompt when ``prompt_ids`` is None)."""
    if prompt_ids is None:
        return (torch.zeros((num_samples, 0), dtype=torch.long, device=device),
                torch.zeros((num_samples, 0), dtype=torch.bool, device=device))
    ids, mask = model.prompt_prefix(prompt_ids.to(device), prompt_mask.to(device))
    return ids, mask


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor | None,
    prompt_mask: torch.Tensor | None,
    *,
    num_samples: int,
    seq_len: int,
    num_steps: int,
    guidance_scale: float,
    exact_counts: bool = False,
    generator: torch.Generator | None = None,
    infill: tuple[torch.Tensor, torch.Tensor] | None = None,
    top_p: float = 1.0,
    counter: dict | None = None,
    use_cache: bool = True,
    order: str = "left_to_right",
    parallel_confidence: float | None = None,
    on_step: Callable[[int, int], None] | None = None,
    token_log_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """``num_samples`` texts of ``seq_len`` tokens (without the leading <eos>), block by block.

    ``num_steps`` is the whole budget of denoising steps: each block gets ``ceil(num_steps /
    n_blocks)`` of them, at most ``block_size`` (one token a step is already exact). ``infill`` =
    (ids [N, seq_len], keep [N, seq_len]): kept tokens are revealed from the start of their block
    (a block sees the kept tokens of earlier blocks and its own, not of later ones).
    ``counter``: when given, ``counter["forward_rows"]`` is increased by the rows of every network
    call (the cost of a sample, guidance included). ``use_cache``: keep the keys and values of the
    prompt and the finished blocks (computed causally, as the training layout's clean copy; a
    finished block is appended in the same pass as the next block's first look-ahead) and run only
    the block being denoised at each step; False recomputes everything (the reference).
    ``order``: which masked positions of a block a step reveals: "left_to_right" (the earliest; the
    default, it measured far more fluent) or "random" (uniformly chosen, MDLM's order).
    ``parallel_confidence`` (left to right only): a step also reveals the masked positions right
    after the scheduled ones, in order, while the token drawn for each has at least this probability
    under the (guided) model before the nucleus cut; a row whose block is done skips the block's
    remaining passes. None reveals only what the schedule says.
    ``on_step(done, total)`` is called after each step run, counted over all blocks (``total`` =
    blocks x steps per block; a block finished early skips ahead to the next block's count).
    ``token_log_probs`` (float64 [num_samples, seq_len], on the model's device): when given, each drawn token's
    log-probability under the (guided) model before the nucleus cut is written at its position (kept
    infill tokens are left as they are). Left to right, one token a step, their sum is the sample's
    exact log-likelihood in the order it was drawn: ranking samples by it costs no extra pass.
    """
    if order not in ("left_to_right", "random"):
        raise ValueError(f"order={order!r} must be 'left_to_right' or 'random'")
    if parallel_confidence is not None:
        if not 0.0 < parallel_confidence <= 1.0:
            raise ValueError(f"parallel_confidence={parallel_confidence} must be in (0, 1] or None")
        if order != "left_to_right":
            raise ValueError("parallel_confidence extends the left-to-right order; it needs order='left_to_right'")
    c = model.config
    b = c.block_size
    device = model.device
    prefix_ids, prefix_mask = _rows_prefix(model, prompt_ids, prompt_mask, num_samples, device)
    unconditional = prompt_ids is None or guidance_scale == 0.0
    guided = not unconditional and guidance_scale != 1.0
    if unconditional:
        prefix_mask = torch.zeros_like(prefix_mask)
    if guided:  # null prompt rows after the prompted rows
        prefix_ids = torch.cat((prefix_ids, prefix_ids))
        prefix_mask = torch.cat((prefix_mask, torch.zeros_like(prefix_mask)))
    width = prefix_ids.shape[1]
    if width + seq_len + 1 > c.max_seq_len:
        raise ValueError(f"prompt ({width} tokens) + <eos> + {seq_len} tokens exceeds the model's "
                         f"max_seq_len={c.max_seq_len}")
    text = torch.full((num_samples, seq_len + 1), model.mask_id, dtype=torch.long, device=device)
    text[:, 0] = c.eos_id
    if infill is not None:
        ids, keep = infill
        keep = keep.to(device).bool()
        text[:, 1:] = torch.where(keep, ids.to(device), text[:, 1:])
    n_blocks = -(-seq_len // b)
    steps = max(1, min(b, -(-num_steps // n_blocks)))
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    cache = _Context(model, prefix_ids, prefix_mask, guided, counter) if use_cache else None
    for g in range(n_blocks):
        anchor = g * b
        end = min(anchor + b, seq_len)  # targets anchor+1 .. end
        for step in range(steps):
            targets = text[:, anchor + 1 : end + 1]
            still = targets == model.mask_id
            if not bool(still.any()):
                break
            t, s = float(times[step]), float(times[step + 1])
            share = 1.0 if s <= 0.0 else (t - s) / t
            scores = uniform(still.shape, generator, device)
            if order == "left_to_right":  # the earliest masked positions of the block first
                scores = torch.arange(still.shape[1], device=device, dtype=scores.dtype)[None].expand_as(scores) / b
            if exact_counts:
                count = (still.sum(dim=1).double() * share).round().long()
                rank = scores.masked_fill(~still, 2.0).argsort(dim=1).argsort(dim=1)
                reveal = still & (rank < count[:, None])
            else:
                reveal = still & (scores.double() < share)
            needed = still if parallel_confidence is not None else reveal
            if not bool(reveal.any()):
                if on_step is not None:
                    on_step(g * steps + step + 1, n_blocks * steps)
                continue
            if cache is not None:
                log_probs = cache.group_log_probs(text[:, anchor:end], guidance_scale, needed)
            else:
                log_probs = _group_log_probs(model, prefix_ids, prefix_mask, text, anchor, end, guided,
                                             guidance_scale, counter, needed)
            draws = uniform(int(needed.sum()), generator, device).double()
            values = _sample_from(nucleus(log_probs, top_p), draws)
            drawn_lp = log_probs.gather(1, values[:, None]).squeeze(1)
            if parallel_confidence is not None:
                drawn = torch.full_like(targets, model.mask_id).masked_scatter(needed, values)
                sure = torch.zeros_like(still)
                sure[needed] = drawn_lp.exp() >= parallel_confidence
                reveal = _extend_run(still, reveal, sure)
                targets = torch.where(reveal, drawn, targets)
                if token_log_probs is not None:
                    lp = torch.zeros(targets.shape, dtype=torch.float64, device=device)
                    lp = lp.masked_scatter(needed, drawn_lp.double())
                    token_log_probs[:, anchor:end] = torch.where(reveal, lp, token_log_probs[:, anchor:end])
            else:
                targets = targets.masked_scatter(reveal, values)
                if token_log_probs is not None:
                    done = token_log_probs[:, anchor:end]
                    token_log_probs[:, anchor:end] = done.masked_scatter(reveal, drawn_lp.double())
            text[:, anchor + 1 : end + 1] = targets
            if on_step is not None:
                on_step(g * steps + step + 1, n_blocks * steps)
        if cache is not None and g + 1 < n_blocks:
            cache.finish(text[:, anchor : anchor + b])
    return text[:, 1:]


def _extend_run(still: torch.Tensor, reveal: torch.Tensor, sure: torch.Tensor) -> torch.Tensor:
    """``reveal`` [N, G] extended, left to right, over the masked positions that are ``sure``: a
    masked position that is neither revealed nor sure ends a row's run."""
    out = torch.zeros_like(reveal)
    run = torch.ones_like(reveal[:, 0])
    for j in range(reveal.shape[1]):
        take = still[:, j] & run & (reveal[:, j] | sure[:, j])
        out[:, j] = take
        run = run & (~still[:, j] | take)
    return out


class _Context:
    """The KV cache of a block sampler: the prompt prefix, then every finished block (causal).

    A finished block waits (``pending``) and is appended in the same pass as the next block's first
    look-ahead: its rows are causal, the look-ahead rows see it, and the look-ahead's keys are
    dropped afterwards. One pass a block fewer than appending it on its own, and the same keys.
    """

    def __init__(self, model, prefix_ids, prefix_mask, guided: bool, counter: dict | None):
        self.model, self.guided, self.counter = model, guided, counter
        self.width = prefix_ids.shape[1]
        self.keys = prefix_mask[:, :0]  # which cached keys are real (the prompt's padding is not)
        self.cache = model.net.init_cache()
        self.prefix_ids, self.prefix_mask, self.prefix_hidden = prefix_ids, prefix_mask, None
        self.pending: torch.Tensor | None = None
        if self.width:
            hidden = self._forward(prefix_ids, prefix_mask, self.cache, self.keys, causal=prefix_ids.shape[1],
                                   hidden=model.copies)
            self.prefix_hidden = hidden if model.copies else None
            self.keys = prefix_mask

    def _forward(self, ids, new_keys, cache, keys, causal: int, hidden: bool = False) -> torch.Tensor:
        """One pass over ``ids`` after ``cache``: its first ``causal`` positions are causal, the
        rest see every position of the pass (a group being denoised)."""
        rows, n = ids.shape
        device = ids.device
        cached = cache.length
        total = torch.arange(cached + n, device=device)[None, :]
        query = torch.arange(n, device=device)[:, None] + cached
        attn = torch.cat((keys, new_keys), dim=1)[:, None, None, :].expand(rows, 1, n, cached + n)
        in_group = torch.arange(n, device=device)[:, None] >= causal
        attn = attn & (in_group | (total <= query))
        attn = attn | (total == query)  # a padding query sees itself (never a row of nothing)
        if self.counter is not None:
            self.counter["forward_rows"] = self.counter.get("forward_rows", 0) + rows
        return self.model.net(ids, cache=cache, positions=torch.arange(cached, cached + n, device=device),
                              attn_mask=attn, return_hidden=hidden)

    def _rows(self, ids):
        return torch.cat((ids, ids)) if self.guided else ids

    def finish(self, block_ids) -> None:
        """A finished block (its anchor and revealed tokens but the last), appended with the next pass."""
        if self.pending is not None:  # no pass came since the last one: append it on its own
            self._append_pending()
        self.pending = self._rows(block_ids)

    def _append_pending(self) -> None:
        real = torch.ones(self.pending.shape, dtype=torch.bool, device=self.pending.device)
        self._forward(self.pending, real, self.cache, self.keys, causal=self.pending.shape[1])
        self.keys = torch.cat((self.keys, real), dim=1)
        self.pending = None

    def group_log_probs(self, group_ids, scale: float, needed: torch.Tensor) -> torch.Tensor:
        """float64 log-probabilities ``[n, vocab]`` of the group's targets where ``needed`` [N, G]
        (a look-ahead pass, in row-major order); rows with nothing needed are not run."""
        active = needed.any(dim=1)
        if self.pending is not None or bool(active.all()):
            active = torch.ones_like(active)
        run = self._rows(active)
        ids = self._rows(group_ids)[run]
        real = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        keys = self.keys[run]
        if self.pending is not None:  # append the finished block in the same pass
            done = self.pending.shape[1]
            length = self.cache.length
            ids = torch.cat((self.pending, ids), dim=1)
            real = torch.cat((torch.ones_like(self.pending, dtype=torch.bool), real), dim=1)
            out = self._forward(ids, real, self.cache, keys, causal=done, hidden=True)[:, done:]
            self.cache.truncate(length + done)
            self.keys = torch.cat((self.keys, real[:, :done]), dim=1)
            self.pending = None
        else:
            cache = self.cache.fork() if bool(run.all()) else self.cache.select(run)
            out = self._forward(ids, real, cache, keys, causal=0, hidden=True)
        where = needed[active]
        prefix_hidden = None if self.prefix_hidden is None else self.prefix_hidden[run]
        return _log_probs_at(self.model, out, where, self.guided, scale, prefix_hidden,
                             self.prefix_ids[run], self.prefix_mask[run], rows=int(active.sum()))


def _log_probs_at(model, hidden, where, guided: bool, scale: float, prompt_hidden, prompt_ids, prompt_mask,
                  rows: int) -> torch.Tensor:
    """float64 log-probabilities ``[n, vocab]`` of the final hidden states ``hidden`` [R(x2), G, d]
    at the positions ``where`` [R, G] (guided: the conditional rows, then the null-prompt rows)."""
    vocab = model.config.vocab_size
    copies = model.copies and prompt_hidden is not None and prompt_ids.shape[1] > 0
    if guided and copies:
        return copy_guided_log_probs(model, hidden, prompt_hidden, prompt_ids, prompt_mask, scale, where=where)
    if guided:
        logits = model.net.head(torch.cat((hidden[:rows][where], hidden[rows:][where])))[..., :vocab]
        n = int(where.sum())
        return guided_log_probs(logits[:n], logits[n:], scale)
    logits = model.net.head(hidden[where])[..., :vocab]
    if copies:
        log_vocab = torch.log_softmax(logits.float(), dim=-1)
        logits = model.copy_head(hidden, log_vocab, prompt_hidden, prompt_mask, prompt_ids, where=where)
    return torch.log_softmax(logits.double(), dim=-1)


def _group_log_probs(model, prefix_ids, prefix_mask, text, anchor, end, guided, scale, counter, needed=None):
    """float64 log-probabilities of the group's targets, recomputing the whole context (the
    reference the cached sampler is tested against): ``[N, end - anchor, vocab]``, or ``[n,
    vocab]`` at the positions ``needed`` [N, end - anchor]."""
    rows = text.shape[0]
    context = text[:, :anchor]
    group = text[:, anchor:end]  # the anchor and the noised tokens before the last target
    seq = torch.cat((context, group), dim=1)
    if guided:
        seq = torch.cat((seq, seq))
    ids = torch.cat((prefix_ids, seq), dim=1)
    width = prefix_ids.shape[1]
    positions = torch.arange(ids.shape[1], device=ids.device)
    keys = torch.cat((prefix_mask, torch.ones_like(seq, dtype=torch.bool)), dim=1)
    attn = decode_mask(width + anchor, end - anchor, ids.device)[None, None] & keys[:, None, None, :]
    attn = attn | torch.eye(ids.shape[1], dtype=torch.bool, device=ids.device)[None, None]
    if counter is not None:
        counter["forward_rows"] = counter.get("forward_rows", 0) + ids.shape[0]
    hidden = model.net(ids, positions=positions, attn_mask=attn, return_hidden=True)
    where = needed if needed is not None else torch.ones((rows, end - anchor), dtype=torch.bool, device=ids.device)
    out = _log_probs_at(model, hidden[:, width + anchor: width + end], where, guided, scale,
                        hidden[:, :width] if model.copies else None, prefix_ids, prefix_mask, rows)
    return out if needed is not None else out.view(rows, end - anchor, -1)


def copy_guided_log_probs(model, hidden, prompt_hidden, prompt_ids, prompt_mask, scale: float,
                          where: torch.Tensor | None = None) -> torch.Tensor:
    """Guidance with a copy head: CFG on the vocabulary head, the copy mixed in at its learned gate.

    ``hidden`` [2R, N, d] holds the conditional rows, then the unconditional ones (null prompt);
    the prompt tensors are [2R, P(, d)] likewise. The pointer has no unconditional counterpart,
    so guiding the whole mixture multiplies the copied word's odds by about (1/g_u)^(w-1) and
    the samples repeat it; here w scales only what the prompt does through attention, and the
    copy weight is min(w, 1) times the gate. Exactly the unconditional model at w = 0 and the
    conditional one at w = 1. Returns float64 log-probabilities ``[R, N, vocab]``, or ``[n,
    vocab]`` at the positions ``where`` [R, N].
    """
    rows, length = hidden.shape[0] // 2, hidden.shape[1]
    vocab = model.config.vocab_size
    at = where if where is not None else torch.ones((rows, length), dtype=torch.bool, device=hidden.device)
    n = int(at.sum())
    logits = model.net.head(torch.cat((hidden[:rows][at], hidden[rows:][at])))[..., :vocab]
    log_vocab = torch.log_softmax(logits.double(), dim=-1)
    if scale == 0.0:
        out = log_vocab[n:]
    else:
        guided = torch.log_softmax(combine(log_vocab[:n], log_vocab[n:], scale), dim=-1)
        mixed = model.copy_head(hidden[:rows], guided, prompt_hidden[:rows], prompt_mask[:rows], prompt_ids[:rows],
                                where=at, gate_scale=min(scale, 1.0))
        out = torch.log_softmax(mixed, dim=-1)
    return out if where is not None else out.view(rows, length, -1)
