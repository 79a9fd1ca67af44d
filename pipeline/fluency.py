"""DVC stage `evaluate_fluency`: is the diffusion model fluent and on topic on prompts it never saw?

The headline of the report (sunfish.evaluation.fluency says why the measure looks like this):
1. an n-gram judge is fit on the train split's documents and calibrated on held-out documents
   that give no test prompt;
2. dev and test prompts come from disjoint held-out documents (sunfish.data.prompt_sets), plus the
   implied-topic family whose target word is not in the prompt;
3. the diffusion model's final checkpoint samples every prompt at w = 0, 1 and sampling.guidance_scale
   (test and implied), and at eval.fluency.dev_scales on dev: settings are chosen there;
4. reference rows on the test prompts: the held-out text itself, the prompt echoed, its words
   shuffled, random words, stage 0's AR samples drawn the same way (batched, same nucleus), and
   with a copy head the diffusion model with the head off (what the prompt does through attention);
5. best-of-k rows: the diffusion model at w = 1 and stage 0, each keeping its own most likely of k
   samples (sunfish.evaluation.best_of_k; neither criterion sees the target or the judge), at k times
   the compute. k is eval.fluency.best_of_k, or sampling.guidance_candidates where sequence guidance keeps
   one of k samples, so that the gain of selection alone is a row of its own.
"""

from __future__ import annotations

from pipeline.common import log, numeric_subset, open_stage, write_json
from pipeline.training import read_meta
from sunfish.evaluation.fluency_sampling import ar_texts, best_of_k_rows, diffusion_texts, selection_k, unique

# The DVC metrics of the stage (the whole table and headline are in reports/fluency.json).
FLUENCY_HEADLINE = ("fluency.fluent_on_topic", "fluency.fluent_on_topic_w0", "fluency.implied_fluent_on_topic",
                    "fluency.fluent", "fluency.ar_fluent", "fluency.speed_vs_ar", "likelihood.uncond_over_ar")
ROW_FIELDS = ("fluent_on_topic", "on_topic", "fluent", "judge_ppl_median", "seconds_per_sample",
              "forward_rows_per_sample", "tokens_per_s")


def run() -> None:
    from sunfish.data.dataset import load_pairs
    from sunfish.data.prompt_sets import prompt_sets
    from sunfish.data.tokenizer import TextTokenizer
    from sunfish.evaluation.fluency import echo_text, headline, score_row, shuffled_text
    from sunfish.evaluation.judge import fit_judge
    from sunfish.training.checkpoint import load_checkpoint
    from sunfish.training.loop import set_threads

    ctx = open_stage("evaluate_fluency")
    p, ev = ctx.params, ctx.params.eval
    fl = ev.fluency
    read_meta(ctx)
    set_threads(p.train.threads)
    tok = TextTokenizer.load(ctx.prepared / "tokenizer.json")
    train_texts = unique(r["text"] for r in load_pairs(ctx.prepared / "pairs_train.jsonl"))
    val_records = load_pairs(ctx.prepared / "pairs_val.jsonl")
    sets = prompt_sets(val_records, train_texts, seed=ev.seed, n_dev=fl.dev_prompts, n_test=fl.test_prompts)
    test_docs = {r["text"] for r in sets["test"]}
    calibration_texts = [t for t in unique(r["text"] for r in val_records) if t not in test_docs]
    judge, cal, judge_seconds = fit_judge(train_texts, calibration_texts, order=fl.judge_order,
                                          max_words=fl.max_words, seed=ev.seed)

    model = load_checkpoint(ctx.models / "cfg" / "final")[0]
    ar = load_checkpoint(ctx.models / "stage_0" / "final", expect_kind="staged")[0]
    w_default = float(p.sampling.guidance_scale)
    rows: list[dict] = []

    k = selection_k(model, p.sampling)

    def model_row(name: str, records: list[dict], w: float, set_name: str) -> None:
        prompts = [r["prompt"] for r in records]
        texts, seconds, fwd, n_tok = diffusion_texts(model, tok, prompts, w=w, sampling=p.sampling, seq_len=ev.cfg_seq_len,
                                                     seed=ev.seed)
        rows.append(score_row(name, texts, [r["target"] for r in records], judge, cal, role="model",
                              prompt_set=set_name, guidance_scale=w, seconds=seconds, forward_rows=fwd,
                              tokens=n_tok, prompts=prompts, samples_per_prompt=k if w not in (0.0, 1.0) else 1))
        r = rows[-1]
        log.info("%s %s w=%g: fluent and on topic %.0f%% (on topic %.0f%%, fluent %.0f%%), %.2f s/sample",
                 set_name, name, w, 100 * r["fluent_on_topic"], 100 * r["on_topic"], 100 * r["fluent"],
                 r["seconds_per_sample"])

    for w in sorted({0.0, 1.0, w_default}):
        model_row("diffusion", sets["test"], w, "test")
    if getattr(model, "copy_head", None) is not None:  # what the prompt does without the pointer
        model.copy_enabled = False
        try:
            model_row("diffusion, copy head off", sets["test"], w_default, "test")
        finally:
            model.copy_enabled = True
    for w in sorted({0.0, w_default}):
        model_row("diffusion (implied topic)", sets["implied"], w, "implied")
    for w in sorted({0.0, *map(float, fl.dev_scales)}):
        model_row("diffusion", sets["dev"], w, "dev")

    test = sets["test"]
    targets = [r["target"] for r in test]
    prompts = [r["prompt"] for r in test]
    refs = {
        "real held-out text": [r["text"] for r in test],
        "prompt echoed": [echo_text(r["prompt"], fl.max_words) for r in test],
        "real text shuffled": [shuffled_text(r["text"], ev.seed + i) for i, r in enumerate(test)],
    }
    for name, texts in refs.items():
        rows.append(score_row(name, texts, targets, judge, cal, role="reference", prompt_set="test", prompts=prompts))
    texts, seconds, fwd, n_tok = ar_texts(ar, tok, len(test), seq_len=ev.cfg_seq_len, top_p=p.sampling.top_p, seed=ev.seed)
    rows.append(score_row("AR stage 0", texts, targets, judge, cal, role="reference", prompt_set="test",
                          seconds=seconds, forward_rows=fwd, tokens=n_tok, prompts=prompts))
    k_rows = k if k > 1 else fl.best_of_k
    if k_rows > 1 and model.config.objective == "masked":
        rows += best_of_k_rows(model, ar, tok, test, k=k_rows, sampling=p.sampling, seq_len=ev.cfg_seq_len, seed=ev.seed,
                               judge=judge, cal=cal)

    likelihood = None
    if model.kind == "block_diffusion":
        from sunfish.evaluation.document_likelihood import block_and_ar_nats

        from sunfish.evaluation.milestones import scoring_autocast

        autocast, precision = scoring_autocast(p.train.precision)
        with autocast:
            likelihood = block_and_ar_nats(model, ar, tok, val_records, batch_size=p.train.batch_size, seed=ev.seed)
        likelihood["precision"] = precision
        log.info("whole held-out documents (%d tokens), nats/token: block ELBO <= %.4f with the prompt, <= %.4f "
                 "without; AR %.4f (ratio %.3f)", likelihood["tokens"], likelihood["cond_nats_per_token"],
                 likelihood["uncond_nats_per_token"], likelihood["ar_nats_per_token"], likelihood["uncond_over_ar"])
    head = headline(rows, w_default)
    chosen_dev = max((r for r in rows if r["set"] == "dev"), key=lambda r: (r["fluent_on_topic"], -r["guidance_scale"]))
    head["dev_best_scale"] = chosen_dev["guidance_scale"]
    head["dev_best_fluent_on_topic"] = chosen_dev["fluent_on_topic"]
    summary = {
        "judge": {"kind": "word-level interpolated Kneser-Ney", "order": fl.judge_order, "identity": judge.identity,
                  "fit_on": f"{len(train_texts)} train documents", "seconds": judge_seconds,
                  "calibration": cal.to_dict()},
        "prompt_sets": {k: len(v) for k, v in sets.items()},
        "headline": head, "rows": rows, "likelihood": likelihood,
        "architecture": p.cfg.architecture, "guidance_scale": w_default,
        "checkpoint": "models/cfg/final", "ar_checkpoint": "models/stage_0/final",
    }
    metrics = {f"fluency.{k}": v for k, v in head.items()}
    metrics.update({f"likelihood.{k}": v for k, v in (likelihood or {}).items() if isinstance(v, (int, float))})
    with ctx.tracking(ctx.flat_params("eval", "sampling")) as run:
        for r in rows:
            tag = f"{r['set']}/{r['name'].replace(' ', '_').replace('(', '').replace(')', '')}"
            tag += f"_w{r['guidance_scale']:g}" if r["guidance_scale"] is not None else ""
            run.log_metrics({f"fluency/{tag}/{k}": r[k] for k in ROW_FIELDS if r[k] is not None}, 0)
        run.log_metrics({f"fluency/{k}": v for k, v in head.items() if isinstance(v, (int, float))}, 0)
        summary["mlflow_run_id"] = run.run_id
        write_json(ctx.reports / "fluency.json", summary)
        shown = numeric_subset(metrics, FLUENCY_HEADLINE)
        write_json(ctx.reports / "metrics" / "fluency.json", shown)
        run.log_experiment_metrics(shown)  # on the experiment's parent run too, under the names DVC shows
        run.log_artifact(ctx.reports / "fluency.json")
    log.info("fluent and on topic on %d test prompts at w=%g: %s (w=0: %s); AR fluent %s, diffusion fluent %s",
             len(test), w_default, head["fluent_on_topic"], head["fluent_on_topic_w0"], head["ar_fluent"],
             head["fluent"])
