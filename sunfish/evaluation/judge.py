"""The sample judge of the evaluate stage: an n-gram model that shares nothing with the models it judges.

Why: evaluate used to score every model's samples with the best autoregressive checkpoint of the same
run and call them "coherent" below a perplexity of 50. The judged models were that judge's siblings
(within 1e-4 bits per byte of it), a judge finds its own kind of text easy, and 50 was a number
nobody had calibrated. Here the judge is the evaluate_fluency stage's word-level Kneser-Ney model
(sunfish.evaluation.ngram_judge), fitted on the train split's documents, and "fluent" is read off
real held-out text of the same length: perplexity at most the real texts' 90th percentile and a
distinct-bigram ratio at least their 10th (a loop is predictable, so predictability alone is not
enough). The calibration rows (real, shuffled, random words) go into milestones.json beside the
figures, so a reader sees that real text passes and the trivial texts do not.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence

from sunfish.evaluation.ngram_judge import Calibration, NGramJudge, _distinct, calibrate, tokenize

__all__ = ["JUDGE_RULE", "fit_judge", "judge_samples", "judge_summary"]

log = logging.getLogger(__name__)

JUDGE_RULE = (
    "a word-level interpolated Kneser-Ney n-gram model fitted on the train split's documents, independent "
    "of every evaluated model; a sample is fluent when its perplexity is at most the 90th percentile of "
    "real held-out texts of the same length and its distinct-bigram ratio at least their 10th percentile"
)


def fit_judge(train_texts: Sequence[str], calibration_texts: Sequence[str], *, order: int, max_words: int,
              seed: int) -> tuple[NGramJudge, Calibration, float]:
    """The judge and its calibration on held-out ``calibration_texts``; the third value is the seconds
    both took. Raises ValueError when there is too little text to fit or calibrate on."""
    start = time.perf_counter()
    judge = NGramJudge.fit(list(train_texts), order=order)
    cal = calibrate(judge, list(calibration_texts), max_words=max_words, seed=seed)
    return judge, cal, time.perf_counter() - start


def judge_samples(texts: Sequence[str], judge: NGramJudge, cal: Calibration) -> dict:
    """{"judge_ppl": median perplexity, "fluent_share", "varied_share" (distinct-bigram ratio at least
    real text's 10th percentile), "fluent": one bool per text}; None figures for no texts. A text shorter than half the calibration length is never fluent: the thresholds
    say nothing about it."""
    if judge.identity != cal.judge_id:
        raise ValueError(f"calibration is for judge {cal.judge_id}, not {judge.identity}")
    fluent, varied, ppl = [], [], []
    for text in texts:
        tokens = tokenize(text or "")
        ok, p = cal._fluent_tokens(tokens, judge)
        fluent.append(bool(ok))
        cut = tokens[: cal.max_words]
        varied.append(len(cut) >= cal.max_words / 2 and _distinct(cut) >= cal.min_distinct)
        ppl.append(p)
    finite = [p for p in ppl if p == p and p != float("inf")]
    n = len(fluent)
    return {"judge_ppl": statistics.median(finite) if finite else None,
            "fluent_share": sum(fluent) / n if n else None, "varied_share": sum(varied) / n if n else None,
            "fluent": fluent}


def judge_summary(judge: NGramJudge, cal: Calibration, *, fit_on: str, seconds: float) -> dict:
    """What milestones.json and the report say about the judge: how it was built and its reference rows."""
    return {"kind": "word-level interpolated Kneser-Ney", "order": judge.order,
            "identity": judge.identity, "fit_on": fit_on, "seconds": seconds, "rule": JUDGE_RULE,
            "calibration": cal.to_dict()}
