"""The block sampler's speed against its quality, beside batched KV-cached AR, on a finished run.

Prints figures; it checks nothing (no thresholds). For each guidance scale and each
``parallel_confidence`` (none = one scheduled reveal a step) it samples one story per prompt of a
prompt set (dev by default: settings are chosen there) in one batch, and prints what
evaluate_fluency prints for a row: fluent and on topic, on topic, fluent (the independent n-gram
judge), tokens/s, network rows per sample, and the tokens/s ratio to stage 0's AR samples drawn the
same way (one batch, the same nucleus). Tokens per pass is 64 tokens / rows per sample.

One sample a prompt is too noisy to choose a setting by (64 prompts: about +-12 points), so
``--samples-per-prompt K`` pools K draws of every prompt (seeds eval.seed + 1000 j) into each row.
Each row is followed by its on-topic share split by how many training pairs have the prompt's word
as their target: off-topic samples follow words the model has rarely or never seen as a topic.

    python benchmarks/bench_block_reveal.py                                # this repo's run, dev prompts
    python benchmarks/bench_block_reveal.py --repo DIR --confidence none 0.9 0.7 --guidance 1 1.5
    python benchmarks/bench_block_reveal.py --confidence none --guidance 1 2 --samples-per-prompt 4
    python benchmarks/bench_block_reveal.py --confidence none --acceptance   # + the speculative bound
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import sunfish from the checkout
    sys.path.insert(0, str(ROOT))


def distinct_2(texts: list[str], max_words: int) -> float:
    """Distinct word bigrams over the first ``max_words`` words of every text (what the judge reads):
    the check that a smaller nucleus did not buy its fluency with samples that all say the same.
    Compare it only between sets of as many texts (the share falls as texts are added)."""
    from sunfish.evaluation.text_quality import distinct_n, words

    return distinct_n([" ".join(words(t)[:max_words]) for t in texts], 2)


def _confidence(text: str) -> float | None:
    return None if text.lower() in ("none", "null") else float(text)


# Buckets of "training pairs whose target is the prompt's word" for the on-topic split.
TARGET_COUNT_BUCKETS = ((0, 0), (1, 4), (5, 19), (20, None))


def on_topic_by_target_count(words: list[str], on_topic: list[bool],
                             pair_counts: dict[str, int]) -> list[dict]:
    """On-topic share of the samples whose word ``words[i]`` is the target of so many training pairs.

    ``pair_counts``: training pairs per target word (its first form). Empty buckets are left out.
    """
    if len(words) != len(on_topic):
        raise ValueError(f"{len(words)} words but {len(on_topic)} on-topic flags")
    rows = []
    for lo, hi in TARGET_COUNT_BUCKETS:
        inside = [lo <= pair_counts.get(w, 0) and (hi is None or pair_counts.get(w, 0) <= hi) for w in words]
        hits = [ok for ok, here in zip(on_topic, inside) if here]
        if hits:
            label = f"{lo}" if lo == hi else (f"{lo}+" if hi is None else f"{lo}-{hi}")
            rows.append({"pairs": label, "samples": len(hits), "on_topic": sum(hits) / len(hits)})
    return rows


@torch.no_grad()
def draft_acceptance(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, seq_len: int, top_p: float,
                     generator: torch.Generator) -> torch.Tensor:
    """Acceptance rate ``[n_blocks, rows]`` of exact speculative sampling inside each block of 2.

    What bounds a faster sampler at equal quality: the first step of a block gives the exact
    distribution of its first token and the *marginal* q of its second; drawing the second from q
    and checking it against the conditional p (the second step) keeps it with probability
    sum_v min(p(v), q(v)), both nucleus-restricted as the sampler draws. The text follows the
    one-token-a-step sampler (the reference recomputation, w = 1). At acceptance a, such a sampler
    makes at most 2 / (2 - a) tokens a network pass, before counting that its passes are wider.
    """
    from sunfish.diffusion.block import _group_log_probs, _rows_prefix
    from sunfish.diffusion.masked import _sample_from, nucleus

    if model.config.block_size != 2:
        raise ValueError(f"draft_acceptance measures blocks of 2, the model's are {model.config.block_size}")
    rows = prompt_ids.shape[0]
    prefix_ids, prefix_mask = _rows_prefix(model, prompt_ids, prompt_mask, rows, model.device)
    text = torch.full((rows, seq_len + 1), model.mask_id, dtype=torch.long, device=model.device)
    text[:, 0] = model.config.eos_id
    out = []
    for anchor in range(0, seq_len - 1, 2):
        first = _group_log_probs(model, prefix_ids, prefix_mask, text, anchor, anchor + 2, False, 1.0, None)
        draft = nucleus(first[:, 1], top_p).exp()
        text[:, anchor + 1] = _sample_from(nucleus(first[:, 0], top_p), uniform_draws(rows, generator))
        second = nucleus(_group_log_probs(model, prefix_ids, prefix_mask, text, anchor, anchor + 2, False, 1.0,
                                          None)[:, 1], top_p)
        out.append(torch.minimum(second.exp(), draft).sum(dim=-1))
        text[:, anchor + 2] = _sample_from(second, uniform_draws(rows, generator))
    return torch.stack(out)


def uniform_draws(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def main(argv: list[str] | None = None) -> dict:
    from sunfish.evaluation.fluency_sampling import RowCounter, ar_texts
    from sunfish.evaluation.fluency_sampling import decode as _decode
    from sunfish.evaluation.fluency_sampling import network as _network
    from sunfish.evaluation.fluency_sampling import unique as _unique
    from sunfish.config import load_params
    from sunfish.data.dataset import load_pairs
    from sunfish.data.prompts import adherent
    from sunfish.data.prompt_sets import implied_prompts, prompt_sets, word_set
    from sunfish.data.tokenizer import TextTokenizer
    from sunfish.diffusion.sample import sample
    from sunfish.evaluation.best_of_k import block_best_of_k, diffusion_best_of_k
    from sunfish.evaluation.fluency import score_row
    from sunfish.evaluation.ngram_judge import NGramJudge, calibrate
    from sunfish.training.checkpoint import load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=ROOT, help="a project whose dvc repro has run (default: this one)")
    ap.add_argument("--set", dest="prompt_set", choices=["dev", "test", "implied", "implied_dev"], default="dev",
                    help="implied_dev: other paraphrases of the implied topics, for choosing settings")
    ap.add_argument("--confidence", nargs="+", type=_confidence, default=[None, 0.9, 0.7],
                    help="parallel_confidence values; 'none' = one scheduled reveal a step")
    ap.add_argument("--guidance", nargs="+", type=float, default=None, help="default: sampling.guidance_scale")
    ap.add_argument("--num-steps", type=int, default=None, help="denoising steps in all; default: sampling.num_steps")
    ap.add_argument("--samples-per-prompt", type=int, default=1,
                    help="draws of every prompt pooled into each row (seeds eval.seed + 1000 j)")
    ap.add_argument("--top-p", nargs="+", type=float, default=None,
                    help="nucleus masses of the diffusion rows; default: sampling.top_p (the AR row keeps sampling.top_p)")
    ap.add_argument("--best-of", type=int, default=1,
                    help="each sample the most likely of this many, ranked as --rank says (k x the cost); "
                         "needs --confidence none")
    ap.add_argument("--rank", choices=["sampler", "elbo"], default="sampler",
                    help="with --best-of: the sampler's own log-probabilities (free) or the conditional ELBO "
                         "per token (evaluate's best-of-k row; costs extra passes)")
    ap.add_argument("--acceptance", action="store_true",
                    help="also print the acceptance rate of drafting a block's second token from its first step "
                         "(what bounds exact speculative sampling; block size 2 only)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.samples_per_prompt < 1:
        ap.error(f"--samples-per-prompt must be at least 1, got {args.samples_per_prompt}")
    if args.best_of < 1 or (args.best_of > 1 and args.confidence != [None]):
        ap.error(f"--best-of must be at least 1, and above 1 only with --confidence none (got {args.best_of})")
    if args.rank == "elbo" and args.guidance not in (None, [1.0]):
        ap.error("--rank elbo keeps the most likely of k samples drawn at w = 1: use --guidance 1")
    torch.set_num_threads(args.threads)

    repo = args.repo.resolve()
    p = load_params(repo / "params.yaml")
    ev, fl = p.eval, p.eval.fluency
    prepared = repo / "data" / "prepared"
    tok = TextTokenizer.load(prepared / "tokenizer.json")
    train_pairs = load_pairs(prepared / "pairs_train.jsonl")
    train_texts = _unique(r["text"] for r in train_pairs)
    pair_counts: dict[str, int] = {}
    for r in train_pairs:
        pair_counts[r["target"][0]] = pair_counts.get(r["target"][0], 0) + 1
    val = load_pairs(prepared / "pairs_val.jsonl")
    sets = prompt_sets(val, train_texts, seed=ev.seed, n_dev=fl.dev_prompts, n_test=fl.test_prompts)
    sets["implied_dev"] = implied_prompts(word_set(train_texts), ev.seed, which="dev")
    judge = NGramJudge.fit(train_texts, order=fl.judge_order)
    test_docs = {r["text"] for r in sets["test"]}
    cal = calibrate(judge, [t for t in _unique(r["text"] for r in val) if t not in test_docs],
                    max_words=fl.max_words, seed=ev.seed)
    model = load_checkpoint(repo / "models" / "cfg" / "final")[0]
    ar = load_checkpoint(repo / "models" / "stage_0" / "final", expect_kind="staged")[0]
    records = sets[args.prompt_set]
    steps = args.num_steps or p.sampling.num_steps
    prompts, targets = [r["prompt"] for r in records], [r["target"] for r in records]

    texts, seconds, rows, n_tok = ar_texts(ar, tok, len(records), seq_len=ev.cfg_seq_len, top_p=p.sampling.top_p,
                                           seed=ev.seed)
    ar_row = score_row("AR stage 0", texts, targets, judge, cal, role="reference", prompt_set=args.prompt_set,
                       seconds=seconds, forward_rows=rows, tokens=n_tok, prompts=prompts)
    k = args.samples_per_prompt
    print(f"{len(records)} {args.prompt_set} prompts x {k} samples, {ev.cfg_seq_len} tokens, top_p {p.sampling.top_p}, "
          f"num_steps {steps}, {args.threads} threads")
    ar_row["distinct_2"] = distinct_2(texts, fl.max_words)
    real_distinct = distinct_2([r["text"] for r in records], fl.max_words)
    print(f"{'row':<28} {'fluent&topic':>12} {'on topic':>9} {'fluent':>7} {'distinct-2':>10} {'tok/s':>7} {'x AR':>6} "
          f"{'rows/sample':>11}")
    print(f"{'real text':<28} {'':>12} {'':>9} {'':>7} {real_distinct:>10.3f}")
    print(f"{'AR stage 0':<28} {'':>12} {'':>9} {100 * ar_row['fluent']:>6.1f}% {ar_row['distinct_2']:>10.3f} "
          f"{ar_row['tokens_per_s']:>7.0f} {1.0:>6.2f} {ar_row['forward_rows_per_sample']:>11.1f}")
    out = {"ar": ar_row, "real_distinct_2": real_distinct, "rows": []}
    ids = [tok.encode_prompt(q)[: model.config.max_prompt_tokens] for q in prompts]
    for w, top_p, confidence in itertools.product(args.guidance or [p.sampling.guidance_scale],
                                                  args.top_p or [p.sampling.top_p], args.confidence):
        counter = RowCounter(_network(model))
        seconds, texts, n_tok = 0.0, [], 0
        try:
            for j in range(k):
                start = time.perf_counter()
                gen = torch.Generator().manual_seed(ev.seed + 1000 * j)
                if args.best_of > 1 and args.rank == "elbo":
                    drawn = diffusion_best_of_k(model, ids, k=args.best_of, seq_len=ev.cfg_seq_len, num_steps=steps,
                                                exact_counts=p.sampling.scheduler == "ddim", top_p=top_p, generator=gen)
                elif args.best_of > 1:
                    drawn = block_best_of_k(model, ids, k=args.best_of, seq_len=ev.cfg_seq_len, num_steps=steps,
                                            exact_counts=p.sampling.scheduler == "ddim", top_p=top_p, guidance_scale=w,
                                            eos_id=tok.eos_id, generator=gen)
                else:
                    drawn = sample(model, ids, num_samples=len(ids), seq_len=ev.cfg_seq_len, num_steps=steps,
                                   guidance_scale=w, scheduler=p.sampling.scheduler, top_p=top_p, generator=gen,
                                   parallel_confidence=confidence)
                seconds += time.perf_counter() - start
                texts += [_decode(tok, r) for r in drawn.tolist()]
                n_tok += drawn.numel()
        finally:
            counter.close()
        row = score_row("diffusion", texts, targets * k, judge, cal, role="model",
                        prompt_set=args.prompt_set, guidance_scale=w, seconds=seconds, forward_rows=counter.rows,
                        tokens=n_tok, prompts=prompts * k)
        row["parallel_confidence"], row["top_p"] = confidence, top_p
        row["best_of"], row["rank"] = args.best_of, args.rank if args.best_of > 1 else None
        # per draw (one sample a prompt, as many texts as the real and AR rows), then averaged
        m = len(records)
        row["distinct_2"] = sum(distinct_2(texts[j * m:(j + 1) * m], fl.max_words) for j in range(k)) / k
        row["on_topic_by_target_count"] = on_topic_by_target_count(
            [t[0] for t in targets] * k, [adherent(x, list(t)) for x, t in zip(texts, targets * k)], pair_counts)
        out["rows"].append(row)
        name = f"w={w:g} p={top_p:g} conf={confidence}" + (
            f" best of {args.best_of} ({args.rank})" if args.best_of > 1 else "")
        print(f"{name:<28} {100 * row['fluent_on_topic']:>11.1f}% {100 * row['on_topic']:>8.1f}% "
              f"{100 * row['fluent']:>6.1f}% {row['distinct_2']:>10.3f} {row['tokens_per_s']:>7.0f} "
              f"{row['tokens_per_s'] / ar_row['tokens_per_s']:>6.2f} {row['forward_rows_per_sample']:>11.1f}")
        print("    on topic by training pairs about the word: " + ", ".join(
            f"{b['pairs']}: {100 * b['on_topic']:.0f}% of {b['samples']}" for b in row["on_topic_by_target_count"]))
    if args.acceptance:
        prompt_ids, prompt_mask = model.pad_prompt_ids(ids)
        rates = draft_acceptance(model, prompt_ids, prompt_mask, seq_len=ev.cfg_seq_len, top_p=p.sampling.top_p,
                                 generator=torch.Generator().manual_seed(ev.seed))
        mean = float(rates.mean())
        out["draft_acceptance"] = mean
        print(f"draft acceptance (block's 2nd token from its 1st step, p={p.sampling.top_p:g}): {mean:.3f}; "
              f"exact speculative sampling makes at most {2 / (2 - mean):.2f} tokens a pass (AR: 1)")
    return out


if __name__ == "__main__":
    main()
