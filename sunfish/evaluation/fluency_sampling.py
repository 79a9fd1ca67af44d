"""Sampling for the fluency rows: the diffusion model's and stage 0's samples drawn the same way
(one batch, the same nucleus), with their compute counted, and the best-of-k baselines.

Counting network rows, not just seconds, makes the cost of a sample comparable across machines
and between a guided pass (two rows) and a plain one.
"""

from __future__ import annotations

import logging
import time

import torch

__all__ = ["RowCounter", "network", "decode", "diffusion_texts", "ar_texts", "selection_k", "best_of_k_rows",
           "unique"]

log = logging.getLogger(__name__)


class RowCounter:
    """Rows through ``module``'s forward: the compute of a sample (a guided pass counts 2 rows)."""

    def __init__(self, module: torch.nn.Module):
        self.rows = 0
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, _module, args) -> None:
        self.rows += int(args[0].shape[0])

    def close(self) -> None:
        self._handle.remove()


def network(model) -> torch.nn.Module:
    """The module called once per network pass of any SunFish model."""
    if getattr(model, "kind", None) == "block_diffusion":
        return model.net
    if getattr(model, "kind", None) == "staged":
        return model
    return model.blocks[0]


def decode(tok, row: list[int]) -> str:
    if tok.eos_id in row:
        row = row[: row.index(tok.eos_id)]
    return tok.decode([t for t in row if t != tok.pad_id])


def diffusion_texts(model, tok, prompts: list[str], *, w: float, sampling, seq_len: int, seed: int
                    ) -> tuple[list[str], float, int, int]:
    """(texts, seconds, network rows, tokens) of one sample per prompt, all in one batch."""
    from sunfish.diffusion.sample import sample

    ids = [tok.encode_prompt(p)[: model.config.max_prompt_tokens] for p in prompts]
    counter = RowCounter(network(model))
    start = time.perf_counter()
    try:
        out = sample(model, ids, num_samples=len(ids), seq_len=seq_len, num_steps=sampling.num_steps,
                     guidance_scale=w, scheduler=sampling.scheduler, eta=sampling.eta, top_p=sampling.top_p,
                     generator=torch.Generator().manual_seed(seed), guidance=sampling.guidance,
                     candidates=sampling.guidance_candidates)
    finally:
        counter.close()
    return ([decode(tok, r) for r in out.tolist()], time.perf_counter() - start, counter.rows,
            out.numel())


def ar_texts(model, tok, n: int, *, seq_len: int, top_p: float, seed: int) -> tuple[list[str], float, int, int]:
    """Stage 0's stories from <eos>, batched and sampled as the diffusion model's are."""
    from sunfish.generation import generate_batch

    counter: dict = {}
    start = time.perf_counter()
    out = generate_batch(model, [tok.eos_id], num_samples=n, max_new_tokens=seq_len, top_p=top_p,
                         generator=torch.Generator().manual_seed(seed), counter=counter)
    return ([decode(tok, r) for r in out.tolist()], time.perf_counter() - start, counter["forward_rows"],
            out.numel())


def selection_k(model, sampling) -> int:
    """Samples drawn per kept sample at w > 1: sampling.guidance_candidates under sequence guidance (block
    diffusion, or the cross-attention model with the masked objective), else 1."""
    sequence = sampling.guidance == "sequence" and (
        model.kind == "block_diffusion"
        or (model.kind == "diffusion" and getattr(model.config, "objective", None) == "masked"))
    return int(sampling.guidance_candidates) if sequence else 1


def best_of_k_rows(model, ar, tok, records: list[dict], *, k: int, sampling, seq_len: int, seed: int, judge, cal
                   ) -> list[dict]:
    """The best-of-k baselines beside sequence guidance's rows (same k, same prompts): the diffusion
    model at w = 1 and stage 0, each keeping the sample it finds most likely."""
    from sunfish.evaluation.best_of_k import ar_best_of_k, diffusion_best_of_k
    from sunfish.evaluation.fluency import score_row

    prompts = [r["prompt"] for r in records]
    targets = [r["target"] for r in records]
    ids = [tok.encode_prompt(q)[: model.config.max_prompt_tokens] for q in prompts]
    counter = RowCounter(network(model))
    start = time.perf_counter()
    try:
        out = diffusion_best_of_k(model, ids, k=k, seq_len=seq_len, num_steps=sampling.num_steps,
                                  exact_counts=sampling.scheduler == "ddim", top_p=sampling.top_p,
                                  generator=torch.Generator().manual_seed(seed))
    finally:
        counter.close()
    seconds = time.perf_counter() - start
    rows = [score_row(f"diffusion, best of {k} by its own likelihood", [decode(tok, r) for r in out.tolist()],
                      targets, judge, cal, role="reference", prompt_set="test", guidance_scale=1.0, seconds=seconds,
                      forward_rows=counter.rows, tokens=out.numel(), prompts=prompts, samples_per_prompt=k)]
    ar_counter: dict = {}
    start = time.perf_counter()
    out = ar_best_of_k(ar, [tok.eos_id], n=len(records), k=k, seq_len=seq_len, top_p=sampling.top_p, eos_id=tok.eos_id,
                       generator=torch.Generator().manual_seed(seed), counter=ar_counter)
    rows.append(score_row(f"AR stage 0, best of {k} by its own likelihood", [decode(tok, r) for r in out.tolist()],
                          targets, judge, cal, role="reference", prompt_set="test",
                          seconds=time.perf_counter() - start, forward_rows=ar_counter["forward_rows"],
                          tokens=out.numel(), prompts=prompts, samples_per_prompt=k))
    for r in rows:
        log.info("test %s: fluent and on topic %.0f%% (fluent %.0f%%), %.2f s/sample", r["name"],
                 100 * r["fluent_on_topic"], 100 * r["fluent"], r["seconds_per_sample"])
    return rows


def unique(texts) -> list[str]:
    return list(dict.fromkeys(t for t in texts if t))
