"""DVC stage `evaluate`: every milestone checkpoint of every model, scored and sampled.

The rules live in the library (sunfish.evaluation.milestones: the incremental loop, the best
milestone's test curve, the summary; sunfish.evaluation.checkpoint_figures: one checkpoint's
likelihood in dev/test halves, its samples and guidance rows). This stage wires them to the
prepared data, the per-checkpoint cache (state/eval_cache: DVC deletes reports/ before a rerun, and a
run that gained one milestone should evaluate that milestone only), the judge, the MLflow run and
the registry, and writes milestones.json (with its figures under "metrics") and the DVC plots.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.common import log, open_stage, write_json
from pipeline.training import read_meta
from sunfish.config import EVALUATED_MODELS, GENERATION_CONFIG
from sunfish.evaluation.checkpoint_figures import EvalResources, checkpoint_figures, guidance_sweep
from sunfish.evaluation.milestones import (
    complete_sweeps,
    evaluate_milestones,
    judge_entries,
    progress_scales,
    scoring_autocast,
    show_chosen_scale,
    summarise,
)
from sunfish.model_registry import register_models

# Code whose change changes evaluation figures: part of every cache key.
_PACKAGE = Path(__file__).resolve().parents[1]
EVAL_SOURCES = (
    _PACKAGE / "sunfish" / "evaluation",
    _PACKAGE / "sunfish" / "generation.py",
    _PACKAGE / "sunfish" / "sampling.py",
    _PACKAGE / "sunfish" / "diffusion",
    _PACKAGE / "sunfish" / "models",
    _PACKAGE / "sunfish" / "data" / "prompts.py",
    _PACKAGE / "sunfish" / "data" / "prompt_sets.py",
    _PACKAGE / "sunfish" / "data" / "dataset.py",
    Path(__file__).resolve(),
)
AR_SETTINGS = ("prompts", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
               "max_eval_tokens")
CFG_SETTINGS = ("seed", "max_eval_tokens", "cfg_prompts", "cfg_seq_len")
SAMPLING = ("num_steps", "scheduler", "eta", "top_p", "guidance", "guidance_candidates")


BEST_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def _settings(ctx, data_id: str, code_id: str) -> Callable[[str], dict]:
    p = ctx.params
    common = {"data": data_id, "code": code_id, "torch": torch.__version__,
              "seq_len": p.train.seq_len, "batch_size": p.train.batch_size,
              "scoring_precision": scoring_autocast(p.train.precision)[1]}

    def settings_for(kind: str) -> dict:
        if kind == "staged":
            return {**common, **{k: getattr(p.eval, k) for k in AR_SETTINGS}}
        return {**common, **{k: getattr(p.eval, k) for k in CFG_SETTINGS},
                **{f"sampling.{k}": getattr(p.sampling, k) for k in SAMPLING},
                "prompt_sets": [p.eval.fluency.dev_prompts, p.eval.fluency.test_prompts],
                "scales": progress_scales(p.sampling.guidance_scale)}

    return settings_for


def run() -> None:
    from sunfish.data.tokenizer import TextTokenizer
    from sunfish.evaluation.cache import EvalCache, digest, file_digest, source_digest
    from sunfish.evaluation.components import component_deltas, read_runs
    from sunfish.training.loop import set_threads

    ctx = open_stage("evaluate")
    p, ev = ctx.params, ctx.params.eval
    meta = read_meta(ctx)
    tok = TextTokenizer.load(ctx.prepared / "tokenizer.json")
    set_threads(p.train.threads)
    res = EvalResources(ctx.prepared, p, tok, meta["splits"]["val"]["bytes_per_token"])
    data_id = file_digest(ctx.prepared / f for f in ("tokenizer.json", "val.bin", "train.bin", "pairs_val.jsonl",
                                                     "pairs_train.jsonl", "meta.json"))
    code_id = source_digest(EVAL_SOURCES)
    cache = EvalCache(ctx.root / "state" / "eval_cache" if ev.cache else None)

    flat = ctx.flat_params("eval", "sampling")
    with ctx.tracking(flat) as run:
        evaluated = evaluate_milestones(
            ctx.models, EVALUATED_MODELS, _settings(ctx, data_id, code_id), cache,
            lambda name, step, directory, m: checkpoint_figures(p, res, name, step, directory, m), root=ctx.root,
        )
        computed = sum(1 for es in evaluated.values() for e in es if not e["cached"])
        reused = sum(1 for es in evaluated.values() for e in es if e["cached"])

        def whole_sweep(entry: dict, missing: list[float]) -> list[dict]:
            from sunfish.training.checkpoint import load_checkpoint

            vocabulary, bigrams = res.corpus
            directory = ctx.root / entry["checkpoint"]
            loaded = load_checkpoint(directory)
            return guidance_sweep(loaded, tok, ev, p.sampling, res.prompts("test"), vocabulary, bigrams, missing,
                                   res.drawn, f"{directory.resolve()}#test")

        for entries in evaluated.values():
            show_chosen_scale(entries, p.sampling.guidance_scale)  # the best milestone depends on it
        completed = complete_sweeps(evaluated, list(ev.guidance_scales), cache, whole_sweep)
        if completed:
            log.info("guidance curve over %s at the best milestone of %d diffusion model(s)",
                     ", ".join(f"{w:g}" for w in ev.guidance_scales), completed)
        log.info("evaluated %d checkpoints, %d of them from the cache (%s)", computed + reused, reused, cache.directory)

        # the judge: an n-gram model fitted on the train split, calibrated on held-out text
        judge = None
        if evaluated:
            from sunfish.evaluation.judge import judge_samples

            ngram, cal, judge = res.judge()
            judge_entries(evaluated, lambda texts: judge_samples(texts, ngram, cal))
            log.info("judge: %s order %d (%s, %.1fs); real held-out text fluent %.0f%%, shuffled %.0f%%",
                     judge["kind"], judge["order"], judge["fit_on"], judge["seconds"],
                     100 * cal.real["fluent_share"], 100 * cal.shuffled["fluent_share"])

        models, metrics = summarise(evaluated, p, judge)
        summary: dict = {"models": models, "judge": judge,
                         "components": component_deltas(models, read_runs(ctx.reports / "stages")),
                         "cache": {"directory": "state/eval_cache" if cache.directory else None,
                                   "reused": reused, "computed": computed}}
        milestone_rows: list[dict] = []
        guidance_rows: list[dict] = []
        for name, model in models.items():
            for e in model["milestones"]:
                q = {k: v for k, v in (e.get("quality") or {}).items() if k not in ("words", "samples")}
                run.log_metrics({f"{name}/val_loss": e["val_loss"], f"{name}/val_ppl": e["val_ppl"],
                                 f"{name}/val_bpb": e["val_bpb"], **{f"{name}/{k}": v for k, v in q.items()}}, e["step"])
                for g in e.get("guidance", []):
                    run.log_metrics({f"{name}/adherence_w{g['scale']:g}": g["adherence"],
                                     f"{name}/judge_ppl_w{g['scale']:g}": g["quality"].get("judge_ppl"),
                                     f"{name}/distinct_2_w{g['scale']:g}": g["quality"].get("distinct_2")}, e["step"])
                milestone_rows.append({"model": name, "step": e["step"], "val_bpb": e["val_bpb"],
                                       "val_loss": e["val_loss"], "judge_ppl": q.get("judge_ppl")})
            best = model["best"]
            run.set_tags({f"sunfish.best.{name}": best["step"]})
            if ev.log_checkpoints:
                for f in BEST_FILES:
                    run.log_artifact(ctx.root / best["checkpoint"] / f, f"checkpoints/{name}")
                if (ctx.root / best["checkpoint"] / GENERATION_CONFIG).exists():  # a diffusion model's own defaults
                    run.log_artifact(ctx.root / best["checkpoint"] / GENERATION_CONFIG, f"checkpoints/{name}")
            if model["kind"] == "diffusion":
                best_m = next(e for e in model["milestones"] if e["step"] == best["step"])
                guidance_rows = [{"guidance_scale": g["scale"], "adherence": g["adherence"],
                                  "ci_low": g["ci"][0], "ci_high": g["ci"][1],
                                  "fluent_on_topic": g.get("fluent_on_topic"),
                                  "distinct_2": g["quality"].get("distinct_2"),
                                  "judge_ppl": g["quality"].get("judge_ppl")}
                                 for g in best_m.get("guidance_test") or best_m["guidance"]]
        if judge is not None:
            run.set_tags({"sunfish.judge": f"ngram-{judge['order']}@{judge['identity']}"})
            cal = judge["calibration"]
            metrics["judge.real_fluent_share"] = cal["real"]["fluent_share"]
            metrics["judge.shuffled_fluent_share"] = cal["shuffled"]["fluent_share"]
            metrics["judge.ppl_threshold"] = cal["threshold"]
        if ev.log_checkpoints:
            register_models(run, models, ctx.root)
        summary["mlflow_run_id"] = run.run_id
        summary["metrics"] = metrics  # every figure, under the names DVC and the parent run use
        write_json(ctx.reports / "milestones.json", summary)
        run.log_experiment_metrics(metrics)  # the headline figures on the experiment's parent run, DVC names
        write_json(ctx.reports / "plots" / "guidance.json", guidance_rows)
        write_json(ctx.reports / "plots" / "milestones.json", milestone_rows)
        run.log_artifact(ctx.reports / "milestones.json")
