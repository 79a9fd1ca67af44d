"""An independent fluency judge: a word-level interpolated Kneser-Ney n-gram model, calibrated on real text.

Why: the project used to judge the diffusion model's samples with the perplexity of its own best
autoregressive checkpoint and a fixed threshold of 50, so the models judged themselves (a judge
finds its own samples easy) and "50" meant nothing in particular. This judge shares nothing with
any evaluated model (no torch, no BPE tokenizer, no weights) and its threshold is read off real
held-out stories of the same length: "fluent" means "as predictable as real text".

Design
- Words, not BPE tokens: lower-cased ``[a-z]+('[a-z]+)?`` plus . , ! ? " as tokens, so sentence
  structure counts. Every text starts with order-1 ``<s>``; no ``</s>`` (samples are cut at a fixed
  length, so their ends say nothing). Words seen fewer than ``min_count`` times become ``<unk>``
  in training too, so ``<unk>`` has a real estimate instead of an arbitrary floor.
- Interpolated modified Kneser-Ney (Chen & Goodman 1998): discounts D1, D2, D3+ per order from its
  count-of-counts, continuation counts at the lower orders (n-grams that start with ``<s>`` keep
  their raw counts: nothing can precede ``<s>``, as in KenLM), the unigram interpolated with the
  uniform distribution, so every probability is > 0 and each conditional sums to 1.
- Scoring is dict lookups only: p(w|h) = alpha(h w) + gamma(h) p(w|h'), with alpha and gamma
  computed once at fit time.
- Files are gzipped JSON (never pickle: a judge file must be safe to load).
- Fluency = perplexity <= the real texts' p90 AND distinct-bigram ratio >= the real texts' p10.
  The second criterion exists because a loop ("he was happy. he was happy. ...") is predictable
  and would pass a perplexity threshold alone. ``reference_rows`` gives the trivial baselines
  (shuffled, random words, repeated sentence, echoed prompt) that a sound measure must fail.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import random
import re
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["BOS", "UNK", "Calibration", "NGramJudge", "calibrate", "distinct_ratio", "reference_rows", "tokenize"]

FORMAT = "sunfish-ngram-judge"
FORMAT_VERSION = 1
BOS, UNK = "<s>", "<unk>"
_BOS_ID, _UNK_ID = 0, 1
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|[.,!?\"]")
_NORMALISE = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"'})
_SENTENCE_END = {".", "!", "?"}


def tokenize(text: str) -> list[str]:
    """The judge's tokens; curly quotes/apostrophes are normalised so typography does not make words unknown."""
    return _TOKEN.findall((text or "").translate(_NORMALISE).lower())


def _mkn_discounts(counts: Counter) -> tuple[float, float, float]:
    """D1, D2, D3+ (Chen & Goodman); falls back to Y or 0.5 where a count-of-count is zero (tiny corpora)."""
    n = Counter(c for c in counts.values() if c <= 4)
    y = n[1] / (n[1] + 2 * n[2]) if n[1] and n[2] else 0.5
    ds = []
    for k in (1, 2, 3):
        d = k - (k + 1) * y * n[k + 1] / n[k] if n[k] and n[k + 1] else y
        ds.append(min(max(d, 1e-3), float(k)))
    return ds[0], ds[1], ds[2]


class NGramJudge:
    """A fitted model; build it with ``fit`` or ``load``, never by hand."""

    def __init__(self, vocab: list[str], alphas: list[dict], gammas: list[dict], settings: dict[str, Any]):
        self._vocab = vocab
        self._index = {w: i for i, w in enumerate(vocab)}
        self._alphas, self._gammas = alphas, gammas
        self.settings = settings
        self.order = int(settings["order"])
        self._uniform = 1.0 / (len(vocab) - 1)  # every token but <s> can be predicted
        sig = [settings, vocab, [len(a) for a in alphas], [repr(math.fsum(g.values())) for g in gammas]]
        self.identity = hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def vocabulary(self) -> list[str]:
        """The tokens the judge predicts (includes <unk>, excludes <s>); their probabilities sum to 1."""
        return self._vocab[1:]

    @classmethod
    def fit(cls, texts: list[str], order: int = 3, discount: float | None = None, min_count: int = 2) -> NGramJudge:
        """Fit on ``texts``; ``discount`` fixes one D for every count and order (plain interpolated KN)."""
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be an int >= 1, got {order!r}")
        if not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
        if discount is not None and not 0.0 < discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {discount!r}")
        t0 = time.perf_counter()
        docs = [tokenize(t) for t in texts]
        freq = Counter()
        for d in docs:
            freq.update(d)
        if not freq:
            raise ValueError("no word tokens in the fitting texts")
        vocab = [BOS, UNK] + sorted(w for w, c in freq.items() if c >= min_count)
        index = {w: i for i, w in enumerate(vocab)}
        pad = [_BOS_ID] * (order - 1)
        counts: list[Counter] = [Counter() for _ in range(order + 1)]
        for d in docs:
            ids = pad + [index.get(w, _UNK_ID) for w in d]
            counts[order].update(zip(*(ids[i:] for i in range(order))))
        for n in range(order - 1, 0, -1):  # continuation counts; <s>-initial n-grams keep raw counts
            low = counts[n]
            for g, c in counts[n + 1].items():
                s = g[1:]
                low[s] += c if s[0] == _BOS_ID else 1
        alphas, gammas, discounts = [], [], []
        for n in range(1, order + 1):
            a = counts[n]
            ds = (discount,) * 3 if discount is not None else _mkn_discounts(a)
            discounts.append(list(ds))
            ctx: dict[tuple, list] = {}
            for g, c in a.items():
                st = ctx.get(g[:-1])
                if st is None:
                    st = ctx[g[:-1]] = [0, 0.0]
                st[0] += c
                st[1] += ds[min(c, 3) - 1]
            alphas.append({g: (c - ds[min(c, 3) - 1]) / ctx[g[:-1]][0] for g, c in a.items()})
            gammas.append({h: d / t for h, (t, d) in ctx.items()})
        settings = {"order": order, "discount": discount, "min_count": min_count, "discounts": discounts,
                    "n_texts": len(texts), "n_tokens": sum(len(d) for d in docs)}
        judge = cls(vocab, alphas, gammas, settings)
        log.info("fitted order-%d KN judge on %d texts (%d tokens, %d types) in %.2f s; discounts %s",
                 order, len(texts), settings["n_tokens"], len(vocab) - 1, time.perf_counter() - t0, discounts)
        return judge

    def _prob(self, hist: tuple[int, ...], w: int) -> float:
        p = self._uniform
        for n in range(self.order):
            h = hist[len(hist) - n:] if n else ()
            g = self._gammas[n].get(h)
            if g is None:  # an unseen context has no seen extension either
                break
            p = self._alphas[n].get(h + (w,), 0.0) + g * p
        return p

    def _ids(self, tokens: Sequence[str]) -> list[int]:
        return [_BOS_ID] * (self.order - 1) + [self._index.get(t, _UNK_ID) for t in tokens]

    def log_prob(self, words_context: Sequence[str] | str, word: str) -> float:
        """ln p(word | context); the context is judge tokens (or a text) after the document start."""
        if word == BOS:
            raise ValueError("<s> is never predicted")
        ctx = tokenize(words_context) if isinstance(words_context, str) else list(words_context)
        ids = self._ids(ctx)
        return math.log(self._prob(tuple(ids[len(ids) - (self.order - 1):]), self._index.get(word, _UNK_ID)))

    def _score_tokens(self, tokens: Sequence[str]) -> tuple[float, int]:
        ids, k = self._ids(tokens), self.order - 1
        nll = -math.fsum(math.log(self._prob(tuple(ids[i - k:i]), ids[i])) for i in range(k, len(ids)))
        return nll, len(tokens)

    def _ppl_tokens(self, tokens: Sequence[str]) -> float:
        nll, n = self._score_tokens(tokens)
        return math.exp(nll / n) if n else math.inf

    def score(self, text: str, max_words: int | None = None) -> tuple[float, int]:
        """(total NLL in nats, tokens scored) over the first ``max_words`` tokens (punctuation counts)."""
        tokens = tokenize(text)
        return self._score_tokens(tokens if max_words is None else tokens[:max_words])

    def perplexity(self, text: str, max_words: int | None = None) -> float:
        """exp(NLL / n); inf for a text without tokens (nothing to call fluent)."""
        tokens = tokenize(text)
        return self._ppl_tokens(tokens if max_words is None else tokens[:max_words])

    def save(self, path: str | Path) -> None:
        """Write gzipped JSON atomically (a killed save leaves the old file or none)."""
        path = Path(path)
        orders = []
        for n in range(self.order):
            ctxs, grams = list(self._gammas[n]), list(self._alphas[n])
            orders.append({"contexts": [i for h in ctxs for i in h], "gamma": [self._gammas[n][h] for h in ctxs],
                           "ngrams": [i for g in grams for i in g], "alpha": [self._alphas[n][g] for g in grams]})
        doc = {"format": FORMAT, "version": FORMAT_VERSION, "settings": self.settings, "vocab": self._vocab,
               "orders": orders}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(gzip.compress(json.dumps(doc, separators=(",", ":")).encode("utf-8"), compresslevel=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> NGramJudge:
        """Read a file written by ``save``; anything else raises ValueError naming the file."""
        path = Path(path)
        raw = path.read_bytes()  # a missing file stays FileNotFoundError: a different remedy
        try:
            doc = json.loads(gzip.decompress(raw).decode("utf-8"))
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError("not an n-gram judge file")
            if doc.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {doc.get('version')!r}, expected {FORMAT_VERSION}")
            settings, vocab, orders = doc["settings"], doc["vocab"], doc["orders"]
            order = settings["order"]
            if (not isinstance(order, int) or len(orders) != order or len(vocab) < 2 or vocab[:2] != [BOS, UNK]
                    or not all(isinstance(w, str) for w in vocab)):
                raise ValueError("inconsistent settings, vocabulary or orders")
            alphas, gammas = [], []
            for n, o in enumerate(orders):
                ctx, grams = cls._keys(o["contexts"], n, len(o["gamma"]), len(vocab)), cls._keys(
                    o["ngrams"], n + 1, len(o["alpha"]), len(vocab))
                for vals in (o["gamma"], o["alpha"]):
                    if vals and not (all(isinstance(v, (int, float)) for v in vals) and 0 <= min(vals) <= max(vals) <= 1):
                        raise ValueError(f"order {n + 1}: weights outside [0, 1]")
                gammas.append(dict(zip(ctx, map(float, o["gamma"]))))
                alphas.append(dict(zip(grams, map(float, o["alpha"]))))
            return cls(vocab, alphas, gammas, settings)
        except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError, KeyError, TypeError,
                AttributeError) as exc:
            raise ValueError(f"{path}: not a valid n-gram judge file ({type(exc).__name__}: {exc})") from None

    @staticmethod
    def _keys(flat: list, n: int, count: int, vocab_size: int) -> list[tuple]:
        if n == 0:
            if count != 1 or flat:
                raise ValueError("order 1 must have exactly one (empty) context")
            return [()]
        if len(flat) != n * count or (flat and not (all(type(i) is int for i in flat)
                                                    and 0 <= min(flat) and max(flat) < vocab_size)):
            raise ValueError(f"bad n-gram ids for length {n}")
        return list(zip(*[iter(flat)] * n))


def _distinct(tokens: Sequence[str]) -> float:
    if len(tokens) < 2:
        return 0.0  # too short to show any variety
    bigrams = list(zip(tokens, tokens[1:]))
    return len(set(bigrams)) / len(bigrams)


def distinct_ratio(text: str, max_words: int | None = None) -> float:
    """Distinct / total word bigrams of the scored tokens: loops are predictable, but not varied."""
    tokens = tokenize(text)
    return _distinct(tokens if max_words is None else tokens[:max_words])


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)  # linear interpolation, as numpy's default
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo) if s[hi] != s[lo] else s[lo]


@dataclass
class Calibration:
    """Thresholds read off real held-out text, and the references that show they separate something."""

    judge_id: str
    max_words: int
    seed: int
    threshold: float  # perplexity p90 of the real texts
    min_distinct: float  # distinct-bigram ratio p10 of the real texts
    real: dict  # per group: n, ppl_p10, ppl_p50, ppl_p90, share_under_threshold, fluent_share
    shuffled: dict
    random_words: dict

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            raise ValueError(f"calibration needs exactly the keys {sorted(names)}")
        return cls(**d)

    def _fluent_tokens(self, tokens: Sequence[str], judge: NGramJudge) -> tuple[bool, float]:
        tokens = tokens[: self.max_words]
        ppl = judge._ppl_tokens(tokens)
        # shorter than the calibration texts: the thresholds say nothing about it
        ok = len(tokens) >= self.max_words / 2 and ppl <= self.threshold and _distinct(tokens) >= self.min_distinct
        return ok, ppl

    def is_fluent(self, text: str, judge: NGramJudge) -> bool:
        """Predictable like real text AND as varied as real text (the guard against loops)."""
        if judge.identity != self.judge_id:
            raise ValueError(f"calibration is for judge {self.judge_id}, not {judge.identity}")
        return self._fluent_tokens(tokenize(text), judge)[0]


def _real_tokens(real_texts: Sequence[str], max_words: int) -> list[list[str]]:
    out = [t[:max_words] for t in map(tokenize, real_texts)]
    return [t for t in out if len(t) >= max_words / 2]


def _references(judge: NGramJudge, real: list[list[str]], seed: int) -> dict[str, list[list[str]]]:
    rng = random.Random(seed)
    pool = [w for w in judge.vocabulary if w != UNK]
    return {"shuffled": [rng.sample(t, len(t)) for t in real],
            "random words": [[rng.choice(pool) for _ in t] for t in real]}


def _group(cal: Calibration, judge: NGramJudge, group: list[list[str]]) -> dict:
    res = [cal._fluent_tokens(t, judge) for t in group]
    ppl = [p for _, p in res]
    n = len(group)
    return {"n": n, "ppl_p10": _quantile(ppl, 0.1) if n else None, "ppl_p50": _quantile(ppl, 0.5) if n else None,
            "ppl_p90": _quantile(ppl, 0.9) if n else None,
            "share_under_threshold": sum(p <= cal.threshold for p in ppl) / n if n else None,
            "fluent_share": sum(ok for ok, _ in res) / n if n else None}


def calibrate(judge: NGramJudge, real_texts: list[str], max_words: int, seed: int = 0) -> Calibration:
    """Thresholds from held-out real texts cut to ``max_words`` tokens (texts under max_words/2 skipped)."""
    if max_words < 2:
        raise ValueError(f"max_words must be >= 2, got {max_words}")
    real = _real_tokens(real_texts, max_words)
    if len(real) < 10:
        raise ValueError(f"only {len(real)} real texts have >= {max_words / 2:g} tokens; need 10 to calibrate")
    ppl = [judge._ppl_tokens(t) for t in real]
    cal = Calibration(judge.identity, max_words, seed, _quantile(ppl, 0.9),
                      _quantile([_distinct(t) for t in real], 0.1), {}, {}, {})
    refs = _references(judge, real, seed)
    cal.real, cal.shuffled, cal.random_words = (_group(cal, judge, g) for g in (real, refs["shuffled"],
                                                                                 refs["random words"]))
    log.info("calibrated on %d real texts (%d tokens): ppl threshold %.2f, min distinct %.3f, real fluent %.3f",
             len(real), max_words, cal.threshold, cal.min_distinct, cal.real["fluent_share"])
    return cal


def _repeat(tokens: list[str], n: int) -> list[str]:
    return (tokens * math.ceil(n / len(tokens)))[:n]


def reference_rows(judge: NGramJudge, calibration: Calibration, real_texts: list[str], prompts: list[str],
                   max_words: int | None = None) -> list[dict]:
    """Rows {"name", "n", "fluent_share", "ppl_median"} to print beside the models: a measure whose
    trivial rows (shuffled, random, loops, echoes) pass is broken, whatever it says about a model."""
    if judge.identity != calibration.judge_id:
        raise ValueError(f"calibration is for judge {calibration.judge_id}, not {judge.identity}")
    max_words = calibration.max_words if max_words is None else max_words
    if max_words != calibration.max_words:
        raise ValueError(f"max_words {max_words} differs from the calibration's {calibration.max_words}")
    real = _real_tokens(real_texts, max_words)
    groups = {"real held-out": real, **_references(judge, real, calibration.seed)}
    firsts = []
    for toks in map(tokenize, real_texts):  # first sentence, only if short enough to repeat at least twice
        end = next((i for i, t in enumerate(toks) if t in _SENTENCE_END), None)
        if end is not None and end + 1 <= max_words // 2:
            firsts.append(_repeat(toks[: end + 1], max_words))
    groups["repeated sentence"] = firsts
    groups["prompt echo"] = [_repeat(t, max_words) for t in map(tokenize, prompts) if t]
    rows = []
    for name, group in groups.items():
        g = _group(calibration, judge, group)
        rows.append({"name": name, "n": g["n"], "fluent_share": g["fluent_share"], "ppl_median": g["ppl_p50"]})
    return rows
