"""The independent n-gram fluency judge: a proper distribution, calibrated, and failing trivial baselines."""

from __future__ import annotations

import gzip
import json
import lzma
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sunfish.evaluation.ngram_judge import (
    UNK,
    Calibration,
    NGramJudge,
    calibrate,
    distinct_ratio,
    reference_rows,
    tokenize,
)

CORPUS = Path(__file__).resolve().parents[1] / "data/corpora/tinystories/TinyStories-train.head2000.txt.xz"
MAX_WORDS = 48
PROMPTS = ["Write a story about a puppy", "Tell me a story about a girl and her ball", "Describe the ocean",
           "Once upon a time", "The little dog", "Can you write a story about a robot?", "Words: sun, tree, cat",
           "Write about flowers", "A story with a kite", "Write a short story about a princess"]


@pytest.fixture(scope="module")
def stories() -> list[str]:
    text = lzma.open(CORPUS, "rt", encoding="utf-8").read()
    docs = [d.strip() for d in text.split("<|endoftext|>") if d.strip()]
    assert len(docs) == 2000
    return docs


@pytest.fixture(scope="module")
def judge(stories) -> NGramJudge:
    return NGramJudge.fit(stories[:1500], order=3)


@pytest.fixture(scope="module")
def calibration(judge, stories) -> Calibration:
    return calibrate(judge, stories[1500:1750], MAX_WORDS, seed=0)


@pytest.fixture(scope="module")
def rows(judge, calibration, stories) -> dict[str, dict]:
    # judged on stories the calibration never saw: the shares are out of sample
    prompts = PROMPTS + [" ".join(s.split()[:6]) for s in stories[1750:1800]]
    return {r["name"]: r for r in reference_rows(judge, calibration, stories[1750:], prompts, MAX_WORDS)}


def _total(judge: NGramJudge, context) -> float:
    return math.fsum(math.exp(judge.log_prob(context, w)) for w in judge.vocabulary)


def test_tokenize_keeps_punctuation_and_apostrophes():
    assert tokenize("Lily said, \u201cDon\u2019t go!\u201d 3 cats?") == [
        "lily", "said", ",", '"', "don't", "go", "!", '"', "cats", "?"]
    assert tokenize("") == [] and tokenize(None) == []


@pytest.mark.parametrize("context", [[], ["once", "upon"], ["zzzq", "qqqz"], ["the"], [".", '"'], "she was very"])
def test_conditional_sums_to_one(judge, context):
    assert _total(judge, context) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("order,discount,min_count", [(1, None, 2), (2, 0.7, 1), (4, None, 1), (5, 0.3, 2)])
def test_sums_to_one_for_other_settings(stories, order, discount, min_count):
    j = NGramJudge.fit(stories[:120], order=order, discount=discount, min_count=min_count)
    for context in ([], ["one", "day", ",", "a"], ["xx", "yy", "zz", "ww"], ["she"]):
        assert _total(j, context) == pytest.approx(1.0, abs=1e-9)
    assert min(math.exp(j.log_prob(["the"], w)) for w in j.vocabulary) > 0


def test_unknown_words_get_unk_probability(judge, stories):
    counts: dict[str, int] = {}
    for s in stories[:1500]:
        for w in tokenize(s):
            counts[w] = counts.get(w, 0) + 1
    rare = next(w for w, c in counts.items() if c == 1)
    assert rare not in judge.vocabulary and UNK in judge.vocabulary  # min_count=2: singletons trained as <unk>
    lp = judge.log_prob(["the", "little"], "qwertyzzz")
    assert math.isfinite(lp) and lp == judge.log_prob(["the", "little"], UNK) == judge.log_prob(["the", "little"], rare)
    # <unk> was trained on real rare words, so it is far likelier than a uniform floor
    assert math.exp(judge.log_prob(["the"], UNK)) > 10 / len(judge.vocabulary)


def test_score_and_perplexity(judge):
    text = "Once upon a time, there was a little girl named Lily. She liked to play."
    nll, n = judge.score(text, max_words=8)
    assert n == 8  # once upon a time , there was a: the comma is a token
    assert judge.perplexity(text, max_words=8) == pytest.approx(math.exp(nll / n))
    assert judge.score(text)[1] == len(tokenize(text))
    assert judge.score("")[1] == 0 and judge.perplexity("") == math.inf
    assert judge.perplexity(text) < judge.perplexity("play liked named she to time was upon a girl little")


def test_calibration_figures(calibration):
    real = calibration.real
    assert real["n"] == 250 and real["share_under_threshold"] == pytest.approx(0.9, abs=0.01)
    assert calibration.threshold == real["ppl_p90"] and real["ppl_p10"] < real["ppl_p50"] < real["ppl_p90"]
    assert 0.5 < calibration.min_distinct < 1.0
    assert 0.8 <= real["fluent_share"] <= 0.97
    for ref in (calibration.shuffled, calibration.random_words):
        assert ref["n"] == 250 and ref["fluent_share"] < 0.05 and ref["share_under_threshold"] < 0.05
        assert ref["ppl_p50"] > 5 * real["ppl_p90"]


def test_reference_rows_separate_real_from_trivial(rows):
    assert list(rows) == ["real held-out", "shuffled", "random words", "repeated sentence", "prompt echo"]
    assert 0.8 <= rows["real held-out"]["fluent_share"] <= 0.97
    assert rows["shuffled"]["fluent_share"] < 0.05 and rows["random words"]["fluent_share"] < 0.05
    assert rows["repeated sentence"]["n"] >= 150 and rows["repeated sentence"]["fluent_share"] < 0.10
    assert rows["prompt echo"]["n"] == 60 and rows["prompt echo"]["fluent_share"] < 0.10
    assert all(set(r) == {"name", "n", "fluent_share", "ppl_median"} for r in rows.values())


def test_distinct_guard_is_what_rejects_loops(judge, calibration, stories, rows):
    # a loop is predictable: perplexity alone would call most repeated sentences fluent
    assert rows["repeated sentence"]["ppl_median"] < calibration.threshold
    loop = "He was happy. " * 20
    assert judge.perplexity(loop, MAX_WORDS) < calibration.threshold
    assert distinct_ratio(loop, MAX_WORDS) < calibration.min_distinct and not calibration.is_fluent(loop, judge)
    assert distinct_ratio("a b a b a", None) == pytest.approx(0.5) and distinct_ratio("word") == 0.0


def test_is_fluent_on_real_text_and_short_text(judge, calibration, stories):
    fluent = [calibration.is_fluent(s, judge) for s in stories[1750:1850]]
    assert 0.7 <= sum(fluent) / len(fluent) <= 1.0
    assert not calibration.is_fluent("Once upon a time.", judge)  # shorter than the calibration texts
    with pytest.raises(ValueError, match="judge"):
        calibration.is_fluent(stories[1750], NGramJudge.fit(stories[:50], order=2))


def test_calibration_json_round_trip(calibration):
    back = Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert back == calibration
    with pytest.raises(ValueError):
        Calibration.from_dict({"threshold": 3.0})


def test_reference_rows_reject_other_length(judge, calibration, stories):
    with pytest.raises(ValueError, match="max_words"):
        reference_rows(judge, calibration, stories[1750:1800], PROMPTS, MAX_WORDS + 1)


def test_save_load_round_trip(judge, stories, tmp_path):
    path = tmp_path / "judge.json.gz"
    judge.save(path)
    back = NGramJudge.load(path)
    assert back.identity == judge.identity and back.settings == judge.settings
    assert back.vocabulary == judge.vocabulary
    for s in stories[1750:1780] + ["zzq unseen words entirely"]:
        assert back.perplexity(s, MAX_WORDS) == judge.perplexity(s, MAX_WORDS)
    doc = json.loads(gzip.decompress(path.read_bytes()))
    assert doc["version"] == 1 and doc["settings"]["order"] == 3 and doc["settings"]["min_count"] == 2


def _corrupt_variants(good: bytes) -> dict[str, bytes]:
    doc = json.loads(gzip.decompress(good))
    wrong_version = dict(doc, version=99)
    bad_ids = json.loads(json.dumps(doc))
    bad_ids["orders"][2]["ngrams"][0] = 10**9
    bad_weight = json.loads(json.dumps(doc))
    bad_weight["orders"][1]["alpha"][0] = 7.5
    short = json.loads(json.dumps(doc))
    short["orders"][2]["alpha"].pop()
    return {"truncated": good[: len(good) // 2], "garbage": b"not gzip at all", "empty": b"",
            "not json": gzip.compress(b"\x00\xff{"), "wrong format": gzip.compress(b'{"format": "other"}'),
            "a list": gzip.compress(b"[1, 2]"),
            **{k: gzip.compress(json.dumps(v).encode()) for k, v in
               {"wrong version": wrong_version, "bad ids": bad_ids, "bad weight": bad_weight,
                "length mismatch": short}.items()}}


def test_corrupt_files_raise_value_error_naming_the_file(stories, tmp_path):
    small = NGramJudge.fit(stories[:100], order=3)
    good = tmp_path / "good.json.gz"
    small.save(good)
    for name, data in _corrupt_variants(good.read_bytes()).items():
        bad = tmp_path / f"bad-{name.replace(' ', '_')}.json.gz"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=bad.name):
            NGramJudge.load(bad)
    with pytest.raises(FileNotFoundError):
        NGramJudge.load(tmp_path / "missing.json.gz")


def test_kneser_ney_beats_lower_orders_and_bad_discounts(stories):
    held = stories[1500:1700]

    def ppl(j: NGramJudge) -> float:
        nll = n = 0
        for s in held:
            a, b = j.score(s)
            nll, n = nll + a, n + b
        return math.exp(nll / n)

    fit = stories[:1500]
    p1, p3 = ppl(NGramJudge.fit(fit, order=1)), ppl(NGramJudge.fit(fit, order=3))
    assert p3 < 0.3 * p1  # context matters: ~49 vs ~300 here
    # barely discounted counts leave almost no mass for backing off: the estimated discounts must win
    assert p3 < 0.8 * ppl(NGramJudge.fit(fit, order=3, discount=0.02))


@pytest.mark.parametrize("kwargs", [{"order": 0}, {"order": 2.5}, {"min_count": 0}, {"discount": 1.5},
                                    {"discount": 0.0}])
def test_fit_rejects_bad_settings(stories, kwargs):
    with pytest.raises(ValueError):
        NGramJudge.fit(stories[:10], **kwargs)


def test_module_does_not_import_torch():
    # the module file alone (not the package, whose other modules are not this test's business)
    path = Path(__file__).resolve().parents[1] / "sunfish/evaluation/ngram_judge.py"
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('nj', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['nj'] = m; spec.loader.exec_module(m); "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
