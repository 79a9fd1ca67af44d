"""Cheap, model-free measures of generated text.

All measures work on *word tokens*: maximal runs of letters (any script), lower-cased, with inner
apostrophes kept ("don't", "children's"); digits and punctuation are not words. Pass the generated
continuation only, not the prompt: the prompt's words are real by construction and would inflate
the shares.

- real_word_share: share of the sample's words that occur in the training corpus vocabulary.
- bigram_share: share of the sample's adjacent word pairs that occur in the training corpus
  (the "phrases forming" signal: real words in a real order).
- distinct_n: unique n-grams / all n-grams over a set of samples (Li et al., 2016); n-grams never
  cross sample boundaries.
- repetition_rate: share of a sample's word 4-grams that repeat an earlier 4-gram of the same
  sample, i.e. 1 - unique/total; 0 for samples shorter than 4 words. Loops such as
  "the cat sat the cat sat ..." push it towards 1.
- wilson_interval: 95% score interval for a share (prompt adherence over few prompts).

Aggregates over several samples are pooled over words / n-grams, not averaged per sample.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

__all__ = [
    "words",
    "ngrams",
    "real_word_share",
    "bigram_share",
    "distinct_n",
    "repetition_rate",
    "corpus_vocabulary",
    "corpus_bigrams",
    "quality",
    "wilson_interval",
    "REPETITION_N",
]

REPETITION_N = 4
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def words(text: str) -> list[str]:
    """Lower-case word tokens of ``text`` (letters with inner apostrophes; no digits/punctuation)."""
    if not text:
        return []
    return _WORD.findall(text.translate(_APOSTROPHES).lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _bigram_key(a: str, b: str) -> str:
    return f"{a} {b}"


def corpus_vocabulary(texts: Iterable[str]) -> set[str]:
    """Every word that occurs in ``texts`` (the training documents)."""
    vocab: set[str] = set()
    for text in texts:
        vocab.update(words(text))
    return vocab


def corpus_bigrams(texts: Iterable[str]) -> set[str]:
    """Every adjacent word pair of ``texts``, stored as ``"w1 w2"`` strings (cheaper than tuples).

    On a large corpus this set can hold millions of entries: feed a bounded sample of documents.
    """
    pairs: set[str] = set()
    for text in texts:
        toks = words(text)
        pairs.update(_bigram_key(a, b) for a, b in zip(toks, toks[1:]))
    return pairs


def _counts_real(text: str, vocabulary: set[str]) -> tuple[int, int]:
    toks = words(text)
    return sum(t in vocabulary for t in toks), len(toks)


def _counts_bigram(text: str, bigrams: set[str]) -> tuple[int, int]:
    toks = words(text)
    pairs = [_bigram_key(a, b) for a, b in zip(toks, toks[1:])]
    return sum(p in bigrams for p in pairs), len(pairs)


def real_word_share(text: str, vocabulary: set[str]) -> float:
    """Share of the words of ``text`` found in ``vocabulary``; 0.0 for a text with no words."""
    hits, total = _counts_real(text, vocabulary)
    return hits / total if total else 0.0


def bigram_share(text: str, bigrams: set[str]) -> float:
    """Share of adjacent word pairs of ``text`` found in ``bigrams`` (from corpus_bigrams); 0.0 if none."""
    hits, total = _counts_bigram(text, bigrams)
    return hits / total if total else 0.0


def distinct_n(texts: Iterable[str] | str, n: int) -> float:
    """Unique n-grams / total n-grams over all ``texts``; 0.0 when there is no n-gram."""
    if isinstance(texts, str):
        texts = [texts]
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        grams = ngrams(words(text), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def _repetition_counts(text: str, n: int = REPETITION_N) -> tuple[int, int]:
    grams = ngrams(words(text), n)
    return len(grams) - len(set(grams)), len(grams)


def repetition_rate(text: str, n: int = REPETITION_N) -> float:
    """Share of the word n-grams (n=4) of ``text`` that repeat an earlier one: 1 - unique/total."""
    repeated, total = _repetition_counts(text, n)
    return repeated / total if total else 0.0


def quality(
    samples: Sequence[str], vocabulary: set[str] | None, bigrams: set[str] | None = None
) -> dict[str, float | int | None]:
    """All measures over ``samples``, pooled over words / n-grams.

    Returns {"real_word_share", "bigram_share", "distinct_1", "distinct_2", "repetition_rate",
    "words", "samples"}. real_word_share is None without a vocabulary, bigram_share None without
    corpus bigrams. repetition_rate pools the repeated 4-grams of each sample (repeats are counted
    within a sample, never across samples).
    """
    samples = [s for s in samples if isinstance(s, str)]
    n_words = sum(len(words(s)) for s in samples)
    out: dict[str, float | int | None] = {
        "real_word_share": None,
        "bigram_share": None,
        "distinct_1": distinct_n(samples, 1),
        "distinct_2": distinct_n(samples, 2),
        "repetition_rate": 0.0,
        "words": n_words,
        "samples": len(samples),
    }
    if vocabulary is not None:
        hits = total = 0
        for s in samples:
            h, t = _counts_real(s, vocabulary)
            hits, total = hits + h, total + t
        out["real_word_share"] = hits / total if total else 0.0
    if bigrams is not None:
        hits = total = 0
        for s in samples:
            h, t = _counts_bigram(s, bigrams)
            hits, total = hits + h, total + t
        out["bigram_share"] = hits / total if total else 0.0
    rep = total = 0
    for s in samples:
        r, t = _repetition_counts(s)
        rep, total = rep + r, total + t
    out["repetition_rate"] = rep / total if total else 0.0
    return out


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for successes/n (z=1.96: 95%). (0.0, 1.0) when n == 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
