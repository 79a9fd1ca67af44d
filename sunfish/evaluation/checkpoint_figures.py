"""The figures of one checkpoint: held-out likelihood in dev and test halves, samples, and for the
diffusion model its guidance rows on a prompt set.

The dev half and the selection samples choose the best milestone; the test half and the reported
samples are what the report shows (sunfish.evaluation.likelihood.split_halves,
sunfish.evaluation.checklist.best_checkpoint), so no reported figure was chosen on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from sunfish.evaluation.milestones import halving_batch_size, progress_scales, scoring_autocast

__all__ = ["SELECTION_SEED_OFFSET", "ar_samples", "guidance_sweep", "EvalResources", "checkpoint_figures"]

log = logging.getLogger(__name__)

# Seeds of the samples that choose an autoregressive milestone: draws apart from the reported ones.
SELECTION_SEED_OFFSET = 10_000


def ar_samples(model, tok, ev, seed_offset: int = 0) -> list[dict]:
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


def guidance_sweep(model_tuple, tok, ev, sampling, records, vocabulary, bigrams, scales,
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
    mode = default_guidance(model, sampling.guidance)
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
                    model, padded, mask, candidates=sampling.guidance_candidates, seq_len=ev.cfg_seq_len,
                    num_steps=sampling.num_steps, exact_counts=sampling.scheduler == "ddim", top_p=sampling.top_p,
                    generator=torch.Generator().manual_seed(ev.seed),
                )
                if drawn is not None and checkpoint is not None:
                    drawn[checkpoint] = shared
            ids = resample(*shared, w, gen)
        else:
            ids = diffusion_sample(
                model, prompt_ids, num_samples=len(prompt_ids), seq_len=ev.cfg_seq_len, num_steps=sampling.num_steps,
                guidance_scale=w, scheduler=sampling.scheduler, eta=sampling.eta, generator=gen, top_p=sampling.top_p,
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
            "samples_per_prompt": sampling.guidance_candidates if mode == "sequence" and w != 0.0 else 1,
            "seconds": time.perf_counter() - started,
            "ci": list(wilson_interval(hits, len(samples))),
            "quality": quality([s["text"] for s in samples], vocabulary, bigrams), "samples": samples,
        })
    return sweep


class EvalResources:
    """Validation data, prompt sets, corpus statistics and the judge of one evaluate run, built on
    first use: a fully cached run needs none. ``prepared`` is the prepare stage's folder."""

    def __init__(self, prepared: Path, params, tok, bytes_per_token: float):
        self.prepared, self.params, self.tok, self.bpt = Path(prepared), params, tok, bytes_per_token
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

            train_stream = TokenStream(self.prepared / "train.bin")
            train_text = self.tok.decode(train_stream.tokens[:2_000_000].tolist())
            self._vocab = (corpus_vocabulary([train_text]), corpus_bigrams([train_text[:3_000_000]]))
        return self._vocab

    @property
    def val_stream(self):
        if self._val_stream is None:
            from sunfish.data.dataset import TokenStream

            self._val_stream = TokenStream(self.prepared / "val.bin")
        return self._val_stream

    @property
    def val_records(self) -> list[dict]:
        if self._records is None:
            from sunfish.data.dataset import load_pairs

            self._records = load_pairs(self.prepared / "pairs_val.jsonl")
        return self._records

    @property
    def train_texts(self) -> list[str]:
        if self._train_texts is None:
            from sunfish.data.dataset import load_pairs

            self._train_texts = list(dict.fromkeys(r["text"] for r in load_pairs(self.prepared / "pairs_train.jsonl")))
        return self._train_texts

    def prompts(self, which: str) -> list[dict]:
        """eval.cfg_prompts records of the ``which`` ("dev" or "test") set of evaluate_fluency's prompt
        sets: dev prompts choose the best milestone, test prompts are reported."""
        if self._sets is None:
            from sunfish.data.prompt_sets import prompt_sets

            ev = self.params.eval
            self._sets = prompt_sets(self.val_records, self.train_texts, seed=ev.seed,
                                     n_dev=ev.fluency.dev_prompts, n_test=ev.fluency.test_prompts)
        return self._sets[which][: self.params.eval.cfg_prompts]

    def judge(self):
        """The n-gram judge and its calibration, as evaluate_fluency builds them (the same identity)."""
        if self._judge is None:
            from sunfish.evaluation.judge import fit_judge, judge_summary

            fl = self.params.eval.fluency
            self.prompts("test")
            test_docs = {r["text"] for r in self._sets["test"]}
            held_out = [t for t in dict.fromkeys(r["text"] for r in self.val_records) if t not in test_docs]
            judge, cal, seconds = fit_judge(self.train_texts, held_out, order=fl.judge_order,
                                            max_words=fl.max_words, seed=self.params.eval.seed)
            summary = judge_summary(judge, cal, fit_on=f"{len(self.train_texts)} train documents", seconds=seconds)
            self._judge = (judge, cal, summary)
        return self._judge


def checkpoint_figures(params, res: EvalResources, name: str, step: int, directory: Path, meta: dict) -> dict:
    from sunfish.data.dataset import PairDataset
    from sunfish.evaluation.likelihood import pool, score_batches, split_halves
    from sunfish.evaluation.text_quality import quality
    from sunfish.training.checkpoint import load_checkpoint

    p, ev, tok = params, params.eval, res.tok
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
        entry["samples"] = ar_samples(loaded, tok, ev)
        entry["quality"] = quality([s["continuation"] for s in entry["samples"]], vocabulary, bigrams)
        chooser = ar_samples(loaded, tok, ev, SELECTION_SEED_OFFSET)
        entry["selection"]["quality"] = quality([s["continuation"] for s in chooser], vocabulary, bigrams)
    else:
        entry["guidance"] = guidance_sweep(loaded, tok, ev, p.sampling, res.prompts("dev"), vocabulary, bigrams,
                                            progress_scales(p.sampling.guidance_scale), res.drawn,
                                            f"{directory.resolve()}#dev")
    entry["seconds"] = time.perf_counter() - start
    log.info("%s step %d: val loss %.3f, ppl %.2f, bpb %.3f (%.1fs)", name, step, entry["val_loss"],
             entry["val_ppl"], entry["val_bpb"], entry["seconds"])
    return entry
