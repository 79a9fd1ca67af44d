"""The whole diagnosis: every check for the chosen models on the prepared data, as one report.

People train for hours on a CPU and get gibberish with no idea why: a model far too large for the
steps it gets, a residual branch gated to 10% so that gradients barely flow, data that silently
failed to load, a prompt path that never trains. Each check catches one such cause in seconds, names
it, and says which key of params.yaml to change. They run cheapest first, and a failure that makes
the rest meaningless (data that does not load, a model that cannot be built or does not fit in
memory) skips what depends on it instead of crashing.

``run_diagnostics(params, prepared_dir, models)`` returns::

    {"status": "ok" | "warn" | "fail", "counts": {"ok", "warn", "fail"},
     "checks": [{"name", "status", "value", "threshold", "message", "details"?, "seconds"?}],
     "environment": {...}, "models": [...], "seconds": float}

By default (``DEFAULT_MODELS``) stage_0 and cfg get every check and stage_3 (all components on,
``LIGHT_BY_DEFAULT``) is built and checked for initialisation, gradient flow and residual branches
only (no memorisation, lr or speed probes); a model asked for explicitly gets every check.

Every probe works on a deep copy, on small real batches (``PROBE_SHAPE`` for the init, gradient and
residual checks) and, below ``SMALL_CHECK_MAX_PARAMS``, on ``SMALL_CHECK_THREADS`` CPU thread (as
fast for such batches, and immune to busy cores); only the speed check uses the configured batch and
train.threads. Above ``HEAVY_PARAMS_CPU`` parameters on CPU the multi-step probes are skipped: at
minutes per step they would take longer than the training they are meant to save.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sunfish.config import MODEL_NAMES, Params
from sunfish.diagnose import diffusion_checks, lr_schedule, memorise
from sunfish.diagnose.budget import (
    check_memory_fit,
    check_size_vs_data,
    estimate_training_memory,
    layer_specs,
)
from sunfish.diagnose.build import build_config, build_model, count_params, preset_name
from sunfish.diagnose.config_checks import (
    check_effective_batch,
    check_graph_window,
    check_heads,
    check_milestones,
    check_seq_len,
    check_vocab,
)
from sunfish.diagnose.core import FAIL, OK, WARN, fmt_count, guarded, make_check, plural, worst
from sunfish.diagnose.diffusion_checks import (
    check_conditioning_dropout,
    check_conditioning_effect,
    check_mask_schedule,
    check_noise_schedule,
    check_prompt_encoder,
)
from sunfish.diagnose.environment import available_memory, environment
from sunfish.diagnose.gradients import check_gradient_flow
from sunfish.diagnose.init_checks import check_init
from sunfish.diagnose.lr_schedule import check_lr_schedule
from sunfish.diagnose.memorise import check_memorisation, memorisation_loss, memorize_lr
from sunfish.diagnose.prepared import PreparedData, load_prepared, max_token_id, run_data_checks
from sunfish.diagnose.residual import check_residual_branches
from sunfish.diagnose.speed import measure_speed, pipeline_eta

DEFAULT_MODELS = ("stage_0", "stage_3", "cfg")
LIGHT_BY_DEFAULT = ("stage_3",)  # built and checked for forward/backward only when not asked for explicitly
PROBE_SHAPE = (4, 64)  # batch used for init / gradient / residual checks
SMALL_CHECK_THREADS = 1  # the probe-sized checks run single-threaded: as fast, and immune to busy cores
SMALL_CHECK_MAX_PARAMS = 20_000_000  # larger models use the training threads everywhere
HEAVY_PARAMS_CPU = 150_000_000  # above this, on CPU, the multi-step probes are skipped (minutes per step)


def _crop(batch: dict, length: int) -> dict:
    """A pair batch cut to its first ``length`` text positions."""
    out = dict(batch)
    out["text_ids"] = batch["text_ids"][:, :length]
    out["text_mask"] = batch["text_mask"][:, :length]
    return out


def _diagnose_model(
    name: str,
    params: Params,
    data: PreparedData,
    device: torch.device,
    light: bool,
    speeds: dict[str, float],
) -> list[dict]:
    rows: list[dict] = []
    pre = f"{name}/"
    tcfg = params.training_for(name)
    preset = params.preset_for(name)
    preset_key = f"presets.{preset_name(params, name)}"
    rows += guarded(pre + "config_heads", check_heads, preset, preset_key, name=pre + "config_heads")
    rows += guarded(pre + "config_seq_len", check_seq_len, tcfg, preset, preset_key, name=pre + "config_seq_len")
    rows += guarded(pre + "config_milestones", check_milestones, params, name, name=pre + "config_milestones")
    rows += guarded(pre + "config_effective_batch", check_effective_batch, tcfg, name=pre + "config_effective_batch")
    if name == "stage_3":
        rows += guarded(pre + "config_graph", check_graph_window, params, name, name=pre + "config_graph")
    tok = data.tokenizer
    if tok is None:
        rows.append(make_check(pre + "model_checks", FAIL, None, None,
                               "not run: the prepared tokenizer did not load (see data/load)"))
        return rows
    rows += guarded(pre + "config_vocab", check_vocab, preset.vocab_size or tok.vocab_size, tok.vocab_size,
                    max_token_id(data), key=f"{preset_key}.vocab_size",
                    configured_vocab=params.tokenizer.vocab_size if params.tokenizer.kind == "bpe" else None,
                    prepared_with=((data.meta or {}).get("tokenizer") or {}).get("requested_vocab_size"),
                    name=pre + "config_vocab")
    if name == "cfg":
        enc = guarded(pre + "prompt_encoder", check_prompt_encoder, params.cfg.prompt_encoder, name=pre + "prompt_encoder")
        rows += enc
        if enc[0]["status"] == FAIL:
            return rows
        if params.cfg.objective == "continuous":
            rows += guarded(pre + "noise_schedule_snr", check_noise_schedule, params.cfg.timesteps,
                            params.cfg.noise_schedule, name=pre + "noise_schedule_snr")
        else:
            rows += guarded(pre + "noise_schedule_snr", check_mask_schedule, tcfg.batch_size, seed=tcfg.seed,
                            name=pre + "noise_schedule_snr")
    try:
        config = build_config(params, name, tok)
        n_params = count_params(name, config)
    except Exception as exc:
        rows.append(make_check(pre + "build", FAIL, None, "builds", f"the model cannot be built from params.yaml: {exc}"))
        return rows
    amp = device.type == "cuda" and tcfg.precision in ("auto", "bf16")
    estimate = estimate_training_memory(
        n_params, layer_specs(params, name, tcfg.seq_len), batch_size=tcfg.batch_size, seq_len=tcfg.seq_len,
        vocab_size=config.vocab_size, activation_bytes=2 if amp else 4)
    avail, _, what = available_memory(device)
    fit = guarded(pre + "config_memory_fit", check_memory_fit, estimate, avail, what=what, preset_key=preset_key,
                  name=pre + "config_memory_fit")
    rows += fit
    if fit[0]["status"] == FAIL:
        return rows
    try:
        torch.manual_seed(tcfg.seed)
        model = build_model(name, config, device)
    except Exception as exc:
        rows.append(make_check(pre + "build", FAIL, None, "builds", f"the model cannot be built: {type(exc).__name__}: {exc}"))
        return rows
    if device.type == "cpu" and n_params < SMALL_CHECK_MAX_PARAMS:
        torch.set_num_threads(SMALL_CHECK_THREADS)
    train_tokens = data.train.num_tokens if data.train is not None else None
    earlier = 0
    if name != "cfg":
        for k in range(int(name.split("_")[1])):
            t_k = params.training_for(f"stage_{k}")
            earlier += t_k.batch_size * t_k.grad_accum_steps * t_k.seq_len * t_k.max_steps
    rows += guarded(pre + "size_vs_data", check_size_vs_data, model, tcfg.batch_size * tcfg.grad_accum_steps * tcfg.seq_len,
                    tcfg.max_steps, train_tokens, earlier_tokens=earlier, preset_key=preset_key,
                    steps_key=("cfg.budget.max_steps" if name == "cfg" else f"staged.{name}.max_steps") + " / train.max_steps",
                    name=pre + "size_vs_data")

    # batches
    gen = torch.Generator().manual_seed(tcfg.seed)
    if name == "cfg":
        from sunfish.data.dataset import PairDataset

        if not data.pairs.get("train"):
            rows.append(make_check(pre + "model_checks", FAIL, None, None, "not run: no prompt/text pairs (see data/pairs)"))
            return rows
        pairs = PairDataset(data.pairs["train"], tok, tcfg.seq_len, params.cfg.max_prompt_tokens)
        val_pairs = (PairDataset(data.pairs["val"], tok, tcfg.seq_len, params.cfg.max_prompt_tokens)
                     if data.pairs.get("val") else pairs)

        def sample(b: int, t: int, g: torch.Generator, source=pairs) -> dict:
            return _crop(source.sample_batch(b, g), t)

        def sample_val(b: int, t: int, g: torch.Generator) -> dict:
            return sample(b, t, g, val_pairs)
    else:
        if data.train is None or data.train.num_tokens <= tcfg.seq_len:
            rows.append(make_check(pre + "model_checks", FAIL, None, None,
                                   "not run: the train split cannot fill one window (see data/splits)"))
            return rows

        def sample(b: int, t: int, g: torch.Generator) -> dict:
            return data.train.sample_batch(b, t, g)

        val_stream = data.val if data.val is not None and data.val.num_tokens > tcfg.seq_len else data.train

        def sample_val(b: int, t: int, g: torch.Generator) -> dict:
            return val_stream.sample_batch(b, t, g)

    t_probe = min(PROBE_SHAPE[1], tcfg.seq_len)
    probe = sample(PROBE_SHAPE[0], t_probe, gen)
    rows += guarded(pre + "init", check_init, model, probe, params.diagnose.init_loss_tolerance, name=pre + "init")
    rows += guarded(pre + "gradient", check_gradient_flow, model, probe, seed=tcfg.seed, name=pre + "gradient")
    heavy = device.type == "cpu" and n_params > HEAVY_PARAMS_CPU
    if not heavy:  # 3 steps on the probe batch: cheap enough for the light (forward/backward) models too
        rows += guarded(pre + "residual_branches", check_residual_branches, model, probe, seed=tcfg.seed,
                        name=pre + "residual_branches")
    if light:
        return rows
    if name == "cfg":
        rows += guarded(pre + "conditioning_dropout", check_conditioning_dropout, model, name=pre + "conditioning_dropout")
    if heavy:
        rows.append(make_check(pre + "training_probes", WARN, n_params, f"<= {fmt_count(HEAVY_PARAMS_CPU)} parameters on CPU",
                               f"{fmt_count(n_params)} parameters: the residual-branch, memorisation, lr-schedule and "
                               "conditioning probes (hundreds of steps) are skipped on CPU; run diagnose on a GPU "
                               "(train.device: cuda) to probe this preset, or use a smaller one"))
    else:
        rows += _training_probes(name, pre, model, params, tcfg, probe, sample, sample_val, gen)

    def full_batch(g: torch.Generator) -> dict:
        return sample(tcfg.batch_size, tcfg.seq_len, g)

    speed = guarded(pre + "speed", measure_speed, model, tcfg, full_batch,
                    estimate_mb=estimate["total"] / 2**20, threads=tcfg.threads, name=pre)
    rows += speed
    step = (speed[0].get("details") or {}).get("step_seconds")
    if isinstance(step, (int, float)):
        speeds[name] = float(step)
    return rows


def _training_probes(name, pre, model, params, tcfg, probe, sample, sample_val, gen) -> list[dict]:
    """The checks that train a copy for a few to a hundred steps on small batches."""
    rows: list[dict] = []
    # the probe sizes are read from their modules at call time (tests may patch them there)
    mem_rows, mem_len = memorise.MEMORIZE_SHAPE
    mem_batch = sample(mem_rows, min(mem_len, tcfg.seq_len), gen)
    rows += guarded(pre + "memorisation", check_memorisation, model, mem_batch,
                    steps=params.diagnose.memorize_steps, target=params.diagnose.memorize_target,
                    lr=memorize_lr(model), seed=tcfg.seed,
                    loss_fn=lambda mod, b: memorisation_loss(mod, b, seed=tcfg.seed),
                    relative_target=memorise.MEMORIZE_RELATIVE.get(getattr(model, "kind", "staged")),
                    name=pre + "memorisation")
    lr_rows, lr_len = lr_schedule.LR_SANITY_SHAPE
    t_lr = min(lr_len, tcfg.seq_len)
    lr_batches = [sample(lr_rows, t_lr, gen) for _ in range(min(lr_schedule.LR_SANITY_STEPS, tcfg.max_steps))]
    eval_batch = sample_val(8, t_lr, gen)
    lr_key = "cfg.budget.lr" if name == "cfg" else f"staged.{name}.lr"
    rows += guarded(pre + "lr_schedule", check_lr_schedule, model, tcfg, lr_batches, eval_batch, seed=tcfg.seed,
                    lr_key=f"{lr_key} / train.lr", name=pre + "lr_schedule")
    if name == "cfg":
        rows += guarded(pre + "conditioning_effect", check_conditioning_effect, model,
                        lr_batches[:diffusion_checks.CONDITIONING_STEPS], sample_val(8, t_lr, gen), seed=tcfg.seed,
                        name=pre + "conditioning_effect")
    return rows


def run_diagnostics(params: Params, prepared_dir: Path, models: list[str] | None = None) -> dict:
    """Every check for ``models`` (default: stage_0 in full, stage_3 forward/backward only, cfg in full)."""
    from sunfish.training.loop import pick_device, set_threads

    started = time.perf_counter()
    prepared_dir = Path(prepared_dir)
    explicit = bool(models)
    chosen = list(dict.fromkeys(models)) if models else list(DEFAULT_MODELS)
    unknown = [m for m in chosen if m not in MODEL_NAMES]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {list(MODEL_NAMES)}")
    checks: list[dict] = []
    first = params.training_for(chosen[0])
    threads_before = torch.get_num_threads()
    try:
        device = pick_device(first.device)
    except RuntimeError as exc:
        checks.append(make_check("environment", FAIL, first.device, "an available device", f"train.device: {exc}"))
        device = torch.device("cpu")
    set_threads(first.threads)
    try:
        env = environment(device)
        checks.append(make_check("environment", OK, f"{device.type}, {plural(env['threads'], 'thread')}", "reported",
                                 f"torch {env['torch']}, Python {env['python']}, {env['cpu_count']} CPUs, "
                                 f"{env.get('device_name', '') + ', ' if env.get('device_name') else ''}"
                                 f"{env.get('memory_available_mb') or '?'} MB available"))
        data = load_prepared(prepared_dir, "cfg" in chosen, checks)
        seq_model = next((m for m in chosen if m != "cfg"), chosen[0])
        tcfg = params.training_for(seq_model)
        try:
            checks += run_data_checks(data, params, tcfg.seq_len, tcfg.batch_size, "cfg" in chosen,
                                   tcfg.batch_size * tcfg.grad_accum_steps * tcfg.max_steps)
        except Exception as exc:  # each data check is guarded; this catches the glue
            checks.append(make_check("data/checks", FAIL, None, None, f"data checks stopped: {type(exc).__name__}: {exc}"[:600]))
        speeds: dict[str, float] = {}
        for name in chosen:
            light = not explicit and name in LIGHT_BY_DEFAULT
            try:
                checks += _diagnose_model(name, params, data, device, light, speeds)
            except Exception as exc:  # a bug in the glue must still give a report
                checks.append(make_check(f"{name}/model_checks", FAIL, None, None,
                                         f"diagnosis of {name} stopped: {type(exc).__name__}: {exc}"[:600]))
        eta = pipeline_eta(params, speeds)
        if eta:
            checks.append(eta)
    finally:
        torch.set_num_threads(threads_before)
    counts = {s: sum(1 for c in checks if c["status"] == s) for s in (OK, WARN, FAIL)}
    return {
        "status": worst(c["status"] for c in checks),
        "counts": counts,
        "checks": checks,
        "environment": env,
        "models": chosen,
        "seconds": round(time.perf_counter() - started, 2),
    }
