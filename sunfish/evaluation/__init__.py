"""Evaluation metrics: likelihood (loss, perplexity, bits per byte), text quality, the checklist.

Import the submodules directly; ``likelihood.score_batches`` imports torch lazily so that the
text measures and the checklist stay usable without it.
"""

from sunfish.evaluation.checklist import BEST_RULE, best_checkpoint, best_entry, checklist, checklist_for
from sunfish.evaluation.likelihood import bits_per_byte, perplexity, score_batches
from sunfish.evaluation.text_quality import (
    bigram_share,
    corpus_bigrams,
    corpus_vocabulary,
    distinct_n,
    quality,
    real_word_share,
    repetition_rate,
    wilson_interval,
    words,
)

__all__ = [
    "BEST_RULE",
    "best_checkpoint",
    "best_entry",
    "checklist",
    "checklist_for",
    "bits_per_byte",
    "perplexity",
    "score_batches",
    "bigram_share",
    "corpus_bigrams",
    "corpus_vocabulary",
    "distinct_n",
    "quality",
    "real_word_share",
    "repetition_rate",
    "wilson_interval",
    "words",
]
