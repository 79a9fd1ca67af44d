"""DVC stage `evaluate`: every milestone checkpoint of every model, scored and sampled.

Validation loss, token-weighted perplexity and bits per byte over the whole validation split (the
diffusion model's figure is its ELBO bound), seeded samples for fixed prompts, text-quality
measures, and for the diffusion model prompt adherence at each guidance scale on held-out prompts.
"""

from __future__ import annotations

import time

import torch

from pipeline.common import log, open_stage, write_json
from pipeline.training import read_meta
from sunfish.config import MODEL_NAMES


def _ar_samples(model, tok, ev) -> list[dict]:
    from sunfish.sampling import sample_from_checkpoint

    out = []
    for i, prompt in enumerate(ev.prompts):
        r = sample_from_checkpoint(
            None, prompt=prompt, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature, top_k=ev.top_k,
            top_p=ev.top_p, repetition_penalty=ev.repetition_penalty, seed=ev.seed + i, model_and_meta=model,
        )[0]
        out.append({"prompt": prompt, "text": r["text"], "continuation": r["continuation"]})
    return out


def _guidance_sweep(model_tuple, tok, ev, cfg, records, vocabulary, bigrams) -> list[dict]:
    from sunfish.data.prompts import adherent
    from sunfish.diffusion.sample import sample as diffusion_sample
    from sunfish.evaluation.text_quality import quality, wilson_interval

    model = model_tuple[0]
    chosen = records[: ev.cfg_prompts]
    prompt_ids = [tok.encode(r["prompt"])[: model.config.max_prompt_tokens] for r in chosen]
    sweep = []
    for w in ev.guidance_scales:
        gen = torch.Generator().manual_seed(ev.seed)
        ids = diffusion_sample(
            model, prompt_ids, num_samples=len(prompt_ids), seq_len=ev.cfg_seq_len, num_steps=cfg.num_steps,
            guidance_scale=w, scheduler=cfg.scheduler, eta=cfg.eta, generator=gen,
        )
        samples = []
        for rec, row in zip(chosen, ids.tolist()):
            if tok.eos_id in row:
                row = row[: row.index(tok.eos_id)]
            text = tok.decode([t for t in row if t != tok.pad_id])
            samples.append({"prompt": rec["prompt"], "text": text, "target": rec["target"],
                            "adherent": adherent(text, rec["target"])})
        hits = sum(s["adherent"] for s in samples)
        sweep.append({
            "scale": w, "adherence": hits / len(samples), "n": len(samples),
            "ci": list(wilson_interval(hits, len(samples))),
            "quality": quality([s["text"] for s in samples], vocabulary, bigrams), "samples": samples,
        })
    return sweep


def run() -> None:
    from sunfish.data.dataset import PairDataset, TokenStream, load_pairs
    from sunfish.data.tokenizer import TextTokenizer
    from sunfish.evaluation.checklist import best_entry, checklist_for
    from sunfish.evaluation.likelihood import score_batches
    from sunfish.evaluation.text_quality import corpus_bigrams, corpus_vocabulary, quality
    from sunfish.training.checkpoint import list_milestones, load_checkpoint
    from sunfish.training.loop import set_threads

    ctx = open_stage("evaluate")
    p, ev = ctx.params, ctx.params.eval
    meta = read_meta(ctx)
    tok = TextTokenizer.load(ctx.prepared / "tokenizer.json")
    bpt = meta["splits"]["val"]["bytes_per_token"]
    val_stream = TokenStream(ctx.prepared / "val.bin")
    train_stream = TokenStream(ctx.prepared / "train.bin")
    train_text = tok.decode(train_stream.tokens[:2_000_000].tolist())
    vocabulary = corpus_vocabulary([train_text])
    bigrams = corpus_bigrams([train_text[:3_000_000]])
    val_records = load_pairs(ctx.prepared / "pairs_val.jsonl")
    set_threads(p.train.threads)

    summary: dict = {"models": {}}
    metrics: dict = {}
    milestone_rows: list[dict] = []
    guidance_rows: list[dict] = []
    flat = ctx.flat_params("eval")
    flat.update({f"cfg.{k}": getattr(p.cfg, k) for k in ("guidance_scale", "num_steps", "scheduler", "eta")})
    with ctx.tracking(flat) as run:
        for name in MODEL_NAMES:
            milestones = list_milestones(ctx.models / name)
            if not milestones:
                log.warning("no milestone checkpoints under %s", ctx.models / name)
                continue
            entries = []
            for step, directory in milestones:
                start = time.perf_counter()
                loaded = load_checkpoint(directory)
                model = loaded[0]
                seq_len = min(model.config.max_seq_len, p.train.seq_len or model.config.max_seq_len)
                if model.kind == "staged":
                    batches = val_stream.eval_batches(seq_len, p.train.batch_size, ev.max_eval_tokens)
                else:
                    pairs = PairDataset(val_records, tok, seq_len, model.config.max_prompt_tokens)
                    batches = pairs.eval_batches(p.train.batch_size)
                scores = score_batches(model, batches, bytes_per_token=bpt,
                                       generator=torch.Generator().manual_seed(ev.seed))
                entry = {"step": step, "checkpoint": str(directory.relative_to(ctx.root)),
                         "val_loss": scores["loss"], "val_ppl": scores["ppl"], "val_bpb": scores["bpb"],
                         "tokens": scores["tokens"]}
                if model.kind == "staged":
                    entry["samples"] = _ar_samples(loaded, tok, ev)
                    entry["quality"] = quality([s["continuation"] for s in entry["samples"]], vocabulary, bigrams)
                else:
                    entry["guidance"] = _guidance_sweep(loaded, tok, ev, p.cfg, val_records, vocabulary, bigrams)
                    at_w = _closest(entry["guidance"], p.cfg.guidance_scale)
                    entry["samples"] = [{"prompt": s["prompt"], "text": s["text"]} for s in at_w["samples"]]
                    entry["quality"] = at_w["quality"]
                    entry["adherence"] = at_w["adherence"]
                    for g in entry["guidance"]:
                        run.log_metrics({f"{name}/adherence_w{g['scale']:g}": g["adherence"]}, step)
                entry["seconds"] = time.perf_counter() - start
                entries.append(entry)
                run.log_metrics({f"{name}/val_loss": entry["val_loss"], f"{name}/val_ppl": entry["val_ppl"],
                                 f"{name}/val_bpb": entry["val_bpb"],
                                 **{f"{name}/{k}": v for k, v in entry["quality"].items()}}, step)
                milestone_rows.append({"model": name, "step": step, "val_bpb": entry["val_bpb"],
                                       "val_loss": entry["val_loss"]})
                log.info("%s step %d: val loss %.3f, ppl %.2f, bpb %.3f (%.1fs)", name, step, entry["val_loss"],
                         entry["val_ppl"], entry["val_bpb"], entry["seconds"])
            best = best_entry(entries)
            model_summary = {"kind": "diffusion" if name == "cfg" else "staged", "milestones": entries,
                             "best": best, "checklist": checklist_for(entries)}
            summary["models"][name] = model_summary
            best_milestone = next((e for e in entries if e["step"] == best["step"]), entries[-1])
            metrics[name] = {"best_step": best["step"], "best_val_bpb": best_milestone["val_bpb"],
                             "final_val_bpb": entries[-1]["val_bpb"], "final_val_loss": entries[-1]["val_loss"],
                             "final_val_ppl": entries[-1]["val_ppl"],
                             "checklist_passed": sum(1 for c in model_summary["checklist"] if c["passed"]),
                             "checklist_total": len(model_summary["checklist"])}
            if name == "cfg":
                last = entries[-1]
                metrics[name]["adherence"] = last["adherence"]
                metrics[name]["adherence_w0"] = _closest(last["guidance"], 0.0)["adherence"]
                guidance_rows = [{"guidance_scale": g["scale"], "adherence": g["adherence"],
                                  "distinct_2": g["quality"].get("distinct_2")} for g in last["guidance"]]
        metrics["mlflow_run_id"] = run.run_id
        summary["mlflow_run_id"] = run.run_id
        write_json(ctx.reports / "milestones.json", summary)
        write_json(ctx.reports / "metrics" / "evaluate.json", metrics)
        write_json(ctx.reports / "plots" / "guidance.json", guidance_rows)
        write_json(ctx.reports / "plots" / "milestones.json", milestone_rows)
        run.log_artifact(ctx.reports / "milestones.json")


def _closest(sweep: list[dict], scale: float) -> dict:
    return min(sweep, key=lambda g: (abs(g["scale"] - scale), g["scale"])) if sweep else {}

