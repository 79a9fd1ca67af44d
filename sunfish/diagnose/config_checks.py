"""Configuration checks: params.yaml mistakes caught from the settings alone, before a model is built.

Each catches a setting that otherwise fails late or silently: a head count that does not divide the
width (or an odd head width, which RoPE cannot rotate), training windows longer than the model's
block size, a vocabulary that does not cover the tokenizer's ids (the original clipped GPT-2 ids into
8192 rows), milestones beyond max_steps (never saved, without a word), and stage 3's graph window
covering the whole sequence (graph attention then equals full attention and its gate never gets a
gradient).

Threshold: fewer than ``MIN_TOKENS_PER_STEP`` tokens per optimiser step (batch_size x
grad_accum_steps x seq_len) warns: gradients that noisy learn little per step.
"""

from __future__ import annotations

from sunfish.config import ModelPreset, Params, ResolvedTraining
from sunfish.diagnose.core import FAIL, OK, WARN, make_check

MIN_TOKENS_PER_STEP = 1024


def check_heads(preset: ModelPreset, key: str, name: str = "config_heads") -> dict:
    """n_head divides d_model, and the head width is even (RoPE rotates pairs)."""
    value = {"d_model": preset.d_model, "n_head": preset.n_head}
    if preset.n_head <= 0 or preset.d_model % preset.n_head:
        choices = [h for h in range(1, 33) if preset.d_model % h == 0 and (preset.d_model // h) % 2 == 0]
        return make_check(name, FAIL, value, "d_model % n_head == 0",
                          f"{key}.n_head={preset.n_head} does not divide {key}.d_model={preset.d_model}; "
                          f"set {key}.n_head to one of {choices}")
    width = preset.d_model // preset.n_head
    if width % 2:
        return make_check(name, FAIL, value, "even head width",
                          f"head width {key}.d_model/n_head = {width} is odd; RoPE needs an even width: "
                          f"change {key}.n_head or {key}.d_model")
    return make_check(name, OK, value, "d_model % n_head == 0, even head width", f"{preset.n_head} heads of width {width}")


def check_seq_len(tcfg: ResolvedTraining, preset: ModelPreset, key: str, name: str = "config_seq_len") -> dict:
    """The training window fits the model's block size (the preset's seq_len)."""
    if tcfg.seq_len > preset.seq_len:
        return make_check(name, FAIL, tcfg.seq_len, f"<= {preset.seq_len}",
                          f"train.seq_len={tcfg.seq_len} exceeds {key}.seq_len={preset.seq_len} (the block size the "
                          f"model is built for); set train.seq_len <= {preset.seq_len} or raise {key}.seq_len")
    return make_check(name, OK, tcfg.seq_len, f"<= {preset.seq_len}",
                      f"training windows of {tcfg.seq_len} tokens; the model is built for {preset.seq_len}")


def check_vocab(
    model_vocab: int,
    tokenizer_vocab: int,
    max_token_id: int | None = None,
    *,
    key: str = "presets.<preset>.vocab_size",
    configured_vocab: int | None = None,
    prepared_with: int | None = None,
    name: str = "config_vocab",
) -> dict:
    """The model's vocabulary covers every id the tokenizer (and the data) can produce.

    Fewer rows than ids crash or silently alias tokens (the original clipped GPT-2 ids into 8192);
    many unused rows waste the output layer. ``configured_vocab`` (tokenizer.vocab_size) against
    ``prepared_with`` (the size meta.json says data/prepared was built for) detects stale data.
    """
    value = {"model": model_vocab, "tokenizer": tokenizer_vocab}
    if max_token_id is not None:
        value["max_token_id"] = int(max_token_id)
    needed = max(tokenizer_vocab, (max_token_id + 1) if max_token_id is not None else 0)
    if model_vocab < needed:
        what = (f"the data holds token id {max_token_id}" if max_token_id is not None and max_token_id >= tokenizer_vocab
                else f"the tokenizer has {tokenizer_vocab} tokens")
        return make_check(name, FAIL, value, f">= {needed}",
                          f"the model has only {model_vocab} vocabulary rows but {what}: ids beyond the table crash or "
                          f"are clipped into wrong tokens. Set {key}: null (use the tokenizer's) or >= {needed}, or "
                          f"lower tokenizer.vocab_size and rerun prepare")
    if max_token_id is not None and max_token_id >= tokenizer_vocab:
        return make_check(name, FAIL, value, f"< {tokenizer_vocab}",
                          f"the token files hold id {max_token_id} but the tokenizer has {tokenizer_vocab} tokens: "
                          "data/prepared is inconsistent; rerun `dvc repro prepare`")
    if configured_vocab is not None and prepared_with is not None and configured_vocab != prepared_with:
        return make_check(name, WARN, value, f"tokenizer.vocab_size={configured_vocab}",
                          f"data/prepared was built with tokenizer.vocab_size={prepared_with} but params.yaml says "
                          f"{configured_vocab}: the prepared data is stale; rerun `dvc repro prepare`")
    if model_vocab > 1.5 * tokenizer_vocab:
        return make_check(name, WARN, value, f"<= 1.5 x {tokenizer_vocab}",
                          f"the model has {model_vocab} output rows for {tokenizer_vocab} tokens: "
                          f"{model_vocab - tokenizer_vocab} rows are never a target and cost compute; set {key}: null "
                          f"or tokenizer.vocab_size: {model_vocab}")
    return make_check(name, OK, value, f">= {needed}", f"{model_vocab} vocabulary rows for {tokenizer_vocab} tokenizer ids")


def check_milestones(params: Params, model: str, name: str = "config_milestones") -> dict:
    """Configured milestones lie within the model's max_steps (beyond it they are silently dropped)."""
    tcfg = params.training_for(model)
    budget = params.budget_for(model)
    where = "cfg.budget" if model == "cfg" else f"staged.{model}"
    raw = budget.milestones if budget.milestones is not None else params.train.milestones
    raw_key = f"{where}.milestones" if budget.milestones is not None else "train.milestones"
    if budget.max_steps is not None and budget.milestones is None:
        raw = []  # train.milestones are rescaled to the model's own max_steps: nothing is dropped
    beyond = [m for m in raw if m > tcfg.max_steps]
    value = {"milestones": list(tcfg.milestones), "max_steps": tcfg.max_steps}
    if beyond:
        return make_check(name, WARN, value, f"<= {tcfg.max_steps}",
                          f"{raw_key} {beyond} lie beyond max_steps={tcfg.max_steps} and will never be saved; "
                          f"raise {where}.max_steps (or train.max_steps) or drop them")
    if any(m < 1 for m in tcfg.milestones):
        return make_check(name, FAIL, value, ">= 1", f"{raw_key}: milestones must be positive step numbers")
    return make_check(name, OK, value, f"<= {tcfg.max_steps}",
                      f"checkpoints at steps {', '.join(map(str, tcfg.milestones))}")


def check_effective_batch(tcfg: ResolvedTraining, name: str = "config_effective_batch") -> dict:
    """Tokens per optimiser step = batch_size x grad_accum_steps x seq_len."""
    tokens = tcfg.batch_size * tcfg.grad_accum_steps * tcfg.seq_len
    value = tokens
    text = (f"{tcfg.batch_size} x {tcfg.grad_accum_steps} accumulation x {tcfg.seq_len} tokens = "
            f"{tokens:,} tokens per optimiser step")
    if tokens < MIN_TOKENS_PER_STEP:
        return make_check(name, WARN, value, f">= {MIN_TOKENS_PER_STEP}",
                          f"{text}: very noisy gradients; raise train.batch_size or train.grad_accum_steps "
                          f"(accumulation costs no memory)")
    return make_check(name, OK, value, f">= {MIN_TOKENS_PER_STEP}", text)


def check_graph_window(params: Params, model: str, name: str = "config_graph") -> dict:
    """Stage 3: graph routing must leave something out, or graph attention equals full attention and
    the gate that blends them gets exactly zero gradient (it can never learn)."""
    g = params.staged.graph
    seq = params.training_for(model).seq_len
    value = {"window": g.window, "seq_len": seq}
    if g.window >= seq - 1:
        return make_check(name, FAIL, value, f"window < {seq - 1}",
                          f"staged.graph.window={g.window} covers the whole training window (train.seq_len={seq}): "
                          "every query already sees every earlier token, so graph attention equals full attention, "
                          f"the graph gate gets zero gradient and stage 3 adds nothing; set staged.graph.window to about "
                          f"{max(1, seq // 4)}")
    return make_check(name, OK, value, f"window < {seq - 1}",
                      f"local band of {g.window} + {g.shortcuts} shortcuts + top-{g.top_k} similar tokens out of up to {seq}")
