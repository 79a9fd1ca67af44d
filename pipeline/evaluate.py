"""DVC stage `evaluate`: every milestone checkpoint of every model, scored and sampled.

Validation loss, token-weighted perplexity and bits per byte (the diffusion model's figure is its
ELBO bound) over the validation split cut in two: the first half of its batches chooses the best
milestone (with samples drawn apart from the reported ones), the second half is the reported
figure, so no reported number was chosen on. Seeded samples for fixed prompts, text-quality
measures, for the diffusion model prompt adherence at each guidance scale on held-out prompts,
and every sample judged by an n-gram model independent of the evaluated models (sunfish.evaluation.judge).

Results are cached per checkpoint outside the DVC outputs (state/eval_cache, see
sunfish.evaluation.cache): DVC deletes reports/ before rerunning the stage, and a run that gained
one milestone should evaluate that milestone only.

The diffusion model's guidance sweep costs a sampling run per scale, so every milestone gets the
progress scales only (0, 1 and cfg.guidance_scale) on the dev prompts, which choose the best
milestone; that milestone then gets the whole eval.guidance_scales curve on the test prompts, which
are reported and never used to choose (the prompt sets of sunfish.data.prompt_sets, as in
evaluate_fluency: disjoint held-out documents).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.common import log, open_stage, write_json
from pipeline.training import read_meta
from sunfish.config import CONTROL_NAMES, EVALUATED_MODELS, GENERATION_CONFIG, STAGED_MODELS
from sunfish.models import is_diffusion

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
CFG_SAMPLING = ("num_steps", "scheduler", "eta", "top_p", "guidance", "guidance_candidates")


def progress_scales(guidance_scale: float) -> list[float]:
    """The guidance scales swept at every milestone: unconditional, conditional and the chosen w."""
    return sorted({0.0, 1.0, float(guidance_scale)})
BEST_FILES = ("model.safetensors", "config.json", "tokenizer.json")


# ----------------------------------------------------------------------------------------------
# cache keys and the incremental loops (no model code: testable with fakes)


def checkpoint_weights_id(directory: Path) -> tuple[dict, str]:
    """(config.json, the weights' sha256): the digest config.json records, else the file's own."""
    from sunfish.training.checkpoint import DIGEST_KEY, WEIGHTS, read_checkpoint_meta, sha256_file

    _, meta = read_checkpoint_meta(directory)
    return meta, meta.get(DIGEST_KEY) or sha256_file(directory / WEIGHTS)


def evaluate_milestones(
    models_dir: Path,
    names: tuple[str, ...] | list[str],
    settings_for: Callable[[str], Mapping[str, Any]],
    cache,
    compute: Callable[[str, int, Path, dict], dict],
    root: Path | None = None,
) -> dict[str, list[dict]]:
    """{model: [entry per milestone]}, computing only the checkpoints the cache does not hold.

    The key of a checkpoint is digest(weights sha256, kind, settings_for(kind)); ``compute(name,
    step, directory, meta)`` returns the figures of one checkpoint. Entries get "step",
    "checkpoint", "kind", "cache_key" and "cached" (True when reused).
    """
    from sunfish.evaluation.cache import digest
    from sunfish.training.checkpoint import list_milestones

    out: dict[str, list[dict]] = {}
    for name in names:
        milestones = list_milestones(models_dir / name)
        if not milestones:
            log.info("no milestone checkpoints under %s", models_dir / name)
            continue
        entries = []
        for step, directory in milestones:
            meta, weights = checkpoint_weights_id(directory)
            kind = meta["kind"]
            key = digest("checkpoint", weights, kind, dict(settings_for(kind)))
            entry, cached = cache.get_or_compute(key, functools.partial(compute, name, step, directory, meta))
            where = directory.relative_to(root) if root is not None and directory.is_relative_to(root) else directory
            entry.update({"step": step, "checkpoint": str(where), "kind": kind, "cache_key": key, "cached": cached})
            if cached:
                log.info("%s step %d: cached (val bpb %.4f)", name, step, entry.get("val_bpb", float("nan")))
            entries.append(entry)
        out[name] = entries
    return out


def judge_entries(evaluated: Mapping[str, list[dict]], judge_texts: Callable[[list[str]], dict]) -> None:
    """Add the judge's figures to each entry's quality and to each guidance row.

    ``judge_texts(texts)`` returns {"judge_ppl", "fluent_share", "fluent": [bool per text]} (see
    sunfish.evaluation.judge.judge_samples). Autoregressive samples are judged as the whole text a
    reader sees (prompt and continuation). A guidance row also gets "fluent_on_topic": the share of
    its samples that name their target AND are fluent, which the copy head alone cannot pass.
    """
    def judged(quality: dict, texts: list[str]) -> list[bool]:
        got = judge_texts(texts)
        quality.update({k: got[k] for k in ("judge_ppl", "fluent_share", "varied_share")})
        return got["fluent"]

    for entries in evaluated.values():
        for entry in entries:
            rows = [*entry.get("guidance", []), *entry.get("guidance_test", [])]
            for g in rows:
                fluent = judged(g.setdefault("quality", {}), [s["text"] for s in g.get("samples", [])])
                both = [f and bool(s.get("adherent")) for f, s in zip(fluent, g.get("samples", []))]
                for s_, f in zip(g.get("samples", []), fluent):
                    s_["fluent"] = f
                g["fluent_on_topic"] = sum(both) / len(both) if both else None
            if not entry.get("guidance"):
                judged(entry.setdefault("quality", {}), [s.get("text", "") for s in entry.get("samples", [])])


# ----------------------------------------------------------------------------------------------
# the figures of one checkpoint


# Seeds of the samples that choose an autoregressive milestone: draws apart from the reported ones.
SELECTION_SEED_OFFSET = 10_000


def _ar_samples(model, tok, ev, seed_offset: int = 0) -> list[dict]:
    from sunfish.sampling import sample_from_checkpoint

    out = []
    for i, prompt in enumerate(ev.prompts):
        r = sample_from_checkpoint(
            None, prompt=prompt, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature, top_k=ev.top_k,
            top_p=ev.top_p, repetition_penalty=ev.repetition_penalty, seed=ev.seed + seed_offset + i,
            model_and_meta=model,
        )[0]
        out.append({"prompt": prompt, "text": r["text"], "continuation": r["continuation"]})
    return out


def complete_sweeps(
    evaluated: Mapping[str, list[dict]],
    scales: list[float],
    cache,
    sweep: Callable[[dict, list[float]], list[dict]],
) -> int:
    """Give the best milestone of every diffusion model its reported curve: every one of ``scales``
    on the test prompts, as ``guidance_test`` (its ``guidance`` rows, on the dev prompts, chose it).

    ``sweep(entry, scales)`` samples the test prompts of one entry; the result is cached under the
    entry's key plus the scales. Returns how many entries gained a curve.
    """
    from sunfish.evaluation.cache import digest
    from sunfish.evaluation.checklist import best_checkpoint

    completed = 0
    for entries in evaluated.values():
        if not entries or not is_diffusion(entries[0].get("kind", "")):
            continue
        step = best_checkpoint(entries)
        entry = next((e for e in entries if e["step"] == step), entries[-1])
        wanted = sorted({float(w) for w in scales})
        key = digest("test-sweep", entry["cache_key"], wanted)
        rows, _ = cache.get_or_compute(key, functools.partial(sweep, entry, wanted))
        entry["guidance_test"] = sorted(rows, key=lambda g: g["scale"])
        completed += 1
    return completed


def _guidance_sweep(model_tuple, tok, ev, cfg, records, vocabulary, bigrams, scales,
                    drawn: dict | None = None, checkpoint: str | None = None) -> list[dict]:
    """The guidance rows of ``scales`` for one checkpoint, one sample per prompt record of ``records``.

    ``drawn`` (a dict kept for one evaluate run) holds each ``checkpoint``'s sequence-guidance
    candidates: the best milestone's whole curve reuses those its progress rows drew (the draw is
    seeded, so the rows are the same as a fresh draw; it was a third of that milestone's time).
    """
    from sunfish.data.prompts import adherent
    from sunfish.diffusion.sample import sample as diffusion_sample
    from sunfish.diffusion.sequence_guidance import draw_candidates, resample
    from sunfish.evaluation.text_quality import quality, wilson_interval
    from sunfish.sampling import default_guidance

    model = model_tuple[0]
    chosen = list(records)
    prompt_set = chosen[0].get("set") if chosen else None
    prompt_ids = [tok.encode_prompt(r["prompt"])[: model.config.max_prompt_tokens] for r in chosen]
    mode = default_guidance(model, cfg.guidance)
    # Sequence guidance: one set of conditional candidates serves every scale but 0. Scale 1 takes a
    # uniformly drawn candidate (a plain conditional sample), so every w >= 1 row is drawn from the
    # same pool: the adherence gain of guidance is measured paired, and w = 1 costs no extra sampling.
    shared = None
    sweep = []
    for w in scales:
        gen = torch.Generator().manual_seed(ev.seed)
        started = time.perf_counter()
        if mode == "sequence" and w != 0.0:
            if shared is None and drawn is not None and checkpoint is not None:
                shared = drawn.get(checkpoint)
            if shared is None:
                padded, mask = model.pad_prompt_ids(prompt_ids)
                shared = draw_candidates(
                    model, padded, mask, candidates=cfg.guidance_candidates, seq_len=ev.cfg_seq_len,
                    num_steps=cfg.num_steps, exact_counts=cfg.scheduler == "ddim", top_p=cfg.top_p,
                    generator=torch.Generator().manual_seed(ev.seed),
                )
                if drawn is not None and checkpoint is not None:
                    drawn[checkpoint] = shared
            ids = resample(*shared, w, gen)
        else:
            ids = diffusion_sample(
                model, prompt_ids, num_samples=len(prompt_ids), seq_len=ev.cfg_seq_len, num_steps=cfg.num_steps,
                guidance_scale=w, scheduler=cfg.scheduler, eta=cfg.eta, generator=gen, top_p=cfg.top_p,
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
            "scale": w, "guidance": mode if w not in (0.0, 1.0) else "none", "adherence": hits / len(samples),
            "n": len(samples), "prompt_set": prompt_set,
            # cost: conditional samples drawn per prompt (best-of-k draws k, shared by the rows w >= 1)
            "samples_per_prompt": cfg.guidance_candidates if mode == "sequence" and w != 0.0 else 1,
            "seconds": time.perf_counter() - started,
            "ci": list(wilson_interval(hits, len(samples))),
            "quality": quality([s["text"] for s in samples], vocabulary, bigrams), "samples": samples,
        })
    return sweep


class _Resources:
    """Validation data and corpus statistics, built on first use: a fully cached run needs none."""

    def __init__(self, ctx, tok, bytes_per_token: float):
        self.ctx, self.tok, self.bpt = ctx, tok, bytes_per_token
        self._vocab: tuple[set, set] | None = None
        self._val_stream = None
        self._records: list[dict] | None = None
        self.drawn: dict = {}  # sequence-guidance candidates per checkpoint directory and prompt set, for this run
        self._train_texts: list[str] | None = None
        self._sets: dict | None = None
        self._judge: tuple | None = None

    @property
    def corpus(self) -> tuple[set, set]:
        if self._vocab is None:
            from sunfish.data.dataset import TokenStream
            from sunfish.evaluation.text_quality import corpus_bigrams, corpus_vocabulary

            train_stream = TokenStream(self.ctx.prepared / "train.bin")
            train_text = self.tok.decode(train_stream.tokens[:2_000_000].tolist())
            self._vocab = (corpus_vocabulary([train_text]), corpus_bigrams([train_text[:3_000_000]]))
        return self._vocab

    @property
    def val_stream(self):
        if self._val_stream is None:
            from sunfish.data.dataset import TokenStream

            self._val_stream = TokenStream(self.ctx.prepared / "val.bin")
        return self._val_stream

    @property
    def val_records(self) -> list[dict]:
        if self._records is None:
            from sunfish.data.dataset import load_pairs

            self._records = load_pairs(self.ctx.prepared / "pairs_val.jsonl")
        return self._records

    @property
    def train_texts(self) -> list[str]:
        if self._train_texts is None:
            from sunfish.data.dataset import load_pairs

            self._train_texts = list(dict.fromkeys(r["text"] for r in load_pairs(self.ctx.prepared / "pairs_train.jsonl")))
        return self._train_texts

    def prompts(self, which: str) -> list[dict]:
        """eval.cfg_prompts records of the ``which`` ("dev" or "test") set of evaluate_fluency's prompt
        sets: dev prompts choose the best milestone, test prompts are reported."""
        if self._sets is None:
            from sunfish.data.prompt_sets import prompt_sets

            ev = self.ctx.params.eval
            self._sets = prompt_sets(self.val_records, self.train_texts, seed=ev.seed,
                                     n_dev=ev.fluency.dev_prompts, n_test=ev.fluency.test_prompts)
        return self._sets[which][: self.ctx.params.eval.cfg_prompts]

    def judge(self):
        """The n-gram judge and its calibration, as evaluate_fluency builds them (the same identity)."""
        if self._judge is None:
            from sunfish.evaluation.judge import fit_judge, judge_summary

            fl = self.ctx.params.eval.fluency
            self.prompts("test")
            test_docs = {r["text"] for r in self._sets["test"]}
            held_out = [t for t in dict.fromkeys(r["text"] for r in self.val_records) if t not in test_docs]
            judge, cal, seconds = fit_judge(self.train_texts, held_out, order=fl.judge_order,
                                            max_words=fl.max_words, seed=self.ctx.params.eval.seed)
            summary = judge_summary(judge, cal, fit_on=f"{len(self.train_texts)} train documents", seconds=seconds)
            self._judge = (judge, cal, summary)
        return self._judge


def halving_batch_size(rows: int, batch_size: int) -> int:
    """The scoring batch size: train.batch_size, smaller when needed so that ``rows`` make at least two
    batches (the dev and test halves of split_halves; the pooled figures do not depend on it)."""
    return max(1, min(batch_size, -(-rows // 2)))


def _compute_checkpoint(ctx, res: _Resources, name: str, step: int, directory: Path, meta: dict) -> dict:
    from sunfish.data.dataset import PairDataset
    from sunfish.evaluation.likelihood import pool, score_batches, split_halves
    from sunfish.evaluation.text_quality import quality
    from sunfish.training.checkpoint import load_checkpoint

    p, ev, tok = ctx.params, ctx.params.eval, res.tok
    start = time.perf_counter()
    loaded = load_checkpoint(directory)
    model = loaded[0]
    seq_len = min(model.config.max_seq_len, p.train.seq_len or model.config.max_seq_len)
    if model.kind == "staged":
        targets = min(res.val_stream.num_tokens - 1, ev.max_eval_tokens or res.val_stream.num_tokens)
        rows = -(-targets // seq_len)
        batches = res.val_stream.eval_batches(seq_len, halving_batch_size(rows, p.train.batch_size),
                                              ev.max_eval_tokens)
    else:
        pairs = PairDataset(res.val_records, tok, seq_len, model.config.max_prompt_tokens)
        batches = pairs.eval_batches(halving_batch_size(len(pairs), p.train.batch_size))
    with scoring_autocast(p.train.precision)[0]:
        scores = score_batches(model, batches, bytes_per_token=res.bpt,
                               generator=torch.Generator().manual_seed(ev.seed))
    # choose on the dev half, report the test half (sunfish.evaluation.likelihood.split_halves)
    dev_parts, test_parts = split_halves(scores["parts"])
    dev, test = pool(dev_parts, res.bpt), pool(test_parts, res.bpt)
    entry: dict[str, Any] = {"val_loss": test["loss"], "val_ppl": test["ppl"], "val_bpb": test["bpb"],
                             "tokens": test["tokens"], "split_tokens": scores["tokens"],
                             "selection": {"loss": dev["loss"], "tokens": dev["tokens"],
                                           "disjoint": len(scores["parts"]) >= 2}}
    vocabulary, bigrams = res.corpus
    if model.kind == "staged":
        entry["samples"] = _ar_samples(loaded, tok, ev)
        entry["quality"] = quality([s["continuation"] for s in entry["samples"]], vocabulary, bigrams)
        chooser = _ar_samples(loaded, tok, ev, SELECTION_SEED_OFFSET)
        entry["selection"]["quality"] = quality([s["continuation"] for s in chooser], vocabulary, bigrams)
    else:
        entry["guidance"] = _guidance_sweep(loaded, tok, ev, p.cfg, res.prompts("dev"), vocabulary, bigrams,
                                            progress_scales(p.cfg.guidance_scale), res.drawn,
                                            f"{directory.resolve()}#dev")
    entry["seconds"] = time.perf_counter() - start
    log.info("%s step %d: val loss %.3f, ppl %.2f, bpb %.3f (%.1fs)", name, step, entry["val_loss"],
             entry["val_ppl"], entry["val_bpb"], entry["seconds"])
    return entry


def show_chosen_scale(entries: list[dict], scale: float) -> None:
    """A diffusion milestone's samples, quality and adherence are those of the guidance row at
    ``scale`` (cfg.guidance_scale): what choosing the best milestone and the checklist read."""
    for e in entries:
        at_w = _closest(e.get("guidance") or [], scale)
        if at_w:
            e["samples"] = [{"prompt": s["prompt"], "text": s["text"]} for s in at_w["samples"]]
            e["quality"] = dict(at_w["quality"])
            e.setdefault("selection", {})["quality"] = dict(at_w["quality"])  # dev prompts choose
            e["adherence"] = at_w["adherence"]
            e["adherence_scale"] = at_w["scale"]


def _closest(sweep: list[dict], scale: float) -> dict:
    return min(sweep, key=lambda g: (abs(g["scale"] - scale), g["scale"])) if sweep else {}


# ----------------------------------------------------------------------------------------------
# the stage


def scoring_autocast(precision: str):
    """The autocast context of the likelihood passes: the training precision (train.precision), so a
    CPU with native bf16 scores in bf16 as it trained (about 1.5x faster, losses equal to about 4e-5
    nats). Sampling never runs under it: its draws stay those of float32 weights and float64 draws."""
    from sunfish.training.loop import autocast_dtype

    amp = autocast_dtype(precision, torch.device("cpu"))
    return torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None), str(amp)


def _settings(ctx, data_id: str, code_id: str) -> Callable[[str], dict]:
    p = ctx.params
    common = {"data": data_id, "code": code_id, "torch": torch.__version__,
              "seq_len": p.train.seq_len, "batch_size": p.train.batch_size,
              "scoring_precision": scoring_autocast(p.train.precision)[1]}

    def settings_for(kind: str) -> dict:
        if kind == "staged":
            return {**common, **{k: getattr(p.eval, k) for k in AR_SETTINGS}}
        return {**common, **{k: getattr(p.eval, k) for k in CFG_SETTINGS},
                **{f"cfg.{k}": getattr(p.cfg, k) for k in CFG_SAMPLING},
                "prompt_sets": [p.eval.fluency.dev_prompts, p.eval.fluency.test_prompts],
                "scales": progress_scales(p.cfg.guidance_scale)}

    return settings_for


def summarise(evaluated: dict[str, list[dict]], ctx, judge: dict | None) -> tuple[dict, dict]:
    """milestones.json's "models" and the flat DVC metrics, from the judged entries."""
    from sunfish.evaluation.checklist import best_entry, checklist_for
    from sunfish.evaluation.guidance_bar import guidance_bar

    p = ctx.params
    models: dict = {}
    metrics: dict = {}
    for name, entries in evaluated.items():
        kind = "diffusion" if is_diffusion(entries[0]["kind"]) else "staged"
        if kind == "diffusion":
            show_chosen_scale(entries, p.cfg.guidance_scale)
        best = best_entry(entries)
        best_m = next((e for e in entries if e["step"] == best["step"]), entries[-1])
        quality = best_m.get("quality") or {}
        if kind == "diffusion" and best_m.get("guidance_test"):  # report the test prompts' row at w
            quality = _closest(best_m["guidance_test"], p.cfg.guidance_scale).get("quality") or quality
            best_m = {**best_m, "quality": quality}
        real = ((judge or {}).get("calibration") or {}).get("real") or {}
        items = checklist_for([best_m if e["step"] == best_m["step"] else e for e in entries], kind,
                              step=best["step"], real_fluent_share=real.get("fluent_share"),
                              guidance_scale=p.cfg.guidance_scale)
        models[name] = {"kind": kind, "milestones": entries, "best": {**best, "checkpoint": best_m["checkpoint"]},
                        "checklist": items, "is_control": name in CONTROL_NAMES}
        measured = [i for i in items if i["passed"] is not None]
        passed = sum(1 for i in measured if i["passed"])
        flat = {"best_step": best["step"], "best_val_bpb": best_m["val_bpb"], "best_val_loss": best_m["val_loss"],
                "final_val_bpb": entries[-1]["val_bpb"], "checklist": f"{passed}/{len(measured)}",
                "checklist_passed": passed, "checklist_measured": len(measured),
                "judge_ppl": quality.get("judge_ppl"), "fluent_share": quality.get("fluent_share")}
        if kind == "diffusion":
            reported = best_m.get("guidance_test") or best_m["guidance"]
            at_w, at_0 = _closest(reported, p.cfg.guidance_scale), _closest(reported, 0.0)
            flat["adherence"] = at_w.get("adherence")
            flat["adherence_scale"] = at_w.get("scale")
            flat["adherence_w0"] = at_0.get("adherence")
            flat["fluent_on_topic"] = at_w.get("fluent_on_topic")
            flat["fluent_on_topic_w0"] = at_0.get("fluent_on_topic")
            bar = guidance_bar(reported)
            models[name]["guidance_bar"] = bar
            if bar is not None:  # the bar's verdict as numbers: 1 met, 0 not met, absent when unmeasured
                flat["guidance_bar_met"] = None if bar["met"] is None else int(bar["met"])
                flat["guidance_bar_scale"] = bar["scale"]
                flat["guidance_bar_judge_ratio"] = bar["judge_ratio"]
        for key, value in flat.items():
            metrics[f"{name}.{key}"] = value
    return models, metrics


def register_models(run, models: Mapping[str, dict], root: Path) -> None:
    """Each model's best checkpoint (controls aside: they are yardsticks) as a version of the
    registered model sunfish-<model>, aliased champion (sunfish.model_registry). Needs the store:
    when it is down the checkpoints still go to the fallback file, and this says what was skipped."""
    if not getattr(run, "enabled", False) or getattr(run, "client", None) is None or not run.run_id:
        return
    from sunfish.model_registry import ALIAS, register_best, registered_name
    from sunfish.tracking import open_client

    try:
        client = open_client(run.uri)
        for name, model in models.items():
            if model.get("is_control"):
                continue
            best = model["best"]
            _, weights = checkpoint_weights_id(root / best["checkpoint"])
            version = register_best(client, run_id=run.run_id, model=name, weights_sha256=weights, step=best["step"])
            log.info("registered %s step %s as models:/%s@%s (version %s)", name, best["step"],
                     registered_name(name), ALIAS, version)
    except Exception as exc:  # the registry is a convenience: evaluation's figures stand without it
        log.warning("could not register the best checkpoints in the MLflow model registry at %s (%s); "
                    "they are logged as run artifacts checkpoints/<model>", run.uri, str(exc).splitlines()[0][:200])


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
    res = _Resources(ctx, tok, meta["splits"]["val"]["bytes_per_token"])
    data_id = file_digest(ctx.prepared / f for f in ("tokenizer.json", "val.bin", "train.bin", "pairs_val.jsonl",
                                                     "pairs_train.jsonl", "meta.json"))
    code_id = source_digest(EVAL_SOURCES)
    cache = EvalCache(ctx.root / "state" / "eval_cache" if ev.cache else None)

    flat = ctx.flat_params("eval")
    flat.update({f"cfg.{k}": getattr(p.cfg, k) for k in ("guidance_scale", "num_steps", "scheduler", "eta", "top_p")})
    with ctx.tracking(flat) as run:
        evaluated = evaluate_milestones(
            ctx.models, EVALUATED_MODELS, _settings(ctx, data_id, code_id), cache,
            lambda name, step, directory, m: _compute_checkpoint(ctx, res, name, step, directory, m), root=ctx.root,
        )
        computed = sum(1 for es in evaluated.values() for e in es if not e["cached"])
        reused = sum(1 for es in evaluated.values() for e in es if e["cached"])

        def whole_sweep(entry: dict, missing: list[float]) -> list[dict]:
            from sunfish.training.checkpoint import load_checkpoint

            vocabulary, bigrams = res.corpus
            directory = ctx.root / entry["checkpoint"]
            loaded = load_checkpoint(directory)
            return _guidance_sweep(loaded, tok, ev, p.cfg, res.prompts("test"), vocabulary, bigrams, missing,
                                   res.drawn, f"{directory.resolve()}#test")

        for entries in evaluated.values():
            show_chosen_scale(entries, p.cfg.guidance_scale)  # the best milestone depends on it
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

        models, metrics = summarise(evaluated, ctx, judge)
        summary: dict = {"models": models, "judge": judge,
                         "components": component_deltas(models, read_runs(ctx.reports / "metrics")),
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
        metrics["mlflow_run_id"] = run.run_id
        summary["mlflow_run_id"] = run.run_id
        write_json(ctx.reports / "milestones.json", summary)
        write_json(ctx.reports / "metrics" / "evaluate.json", metrics)
        run.log_experiment_metrics(metrics)  # the headline figures on the experiment's parent run, DVC names
        write_json(ctx.reports / "plots" / "guidance.json", guidance_rows)
        write_json(ctx.reports / "plots" / "milestones.json", milestone_rows)
        run.log_artifact(ctx.reports / "milestones.json")
