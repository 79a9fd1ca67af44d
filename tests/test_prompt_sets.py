"""Evaluation prompt sets: dev/test split by held-out document, and the implied-topic family."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sunfish.data.corpora import load_documents
from sunfish.data.prepare import split_documents
from sunfish.data.prompt_sets import (
    IMPLIED_TOPICS,
    implied_prompts,
    prompt_sets,
    split_dev_test,
    word_set,
)
from sunfish.data.prompts import adherent, build_pairs

CORPORA = Path(__file__).resolve().parents[1] / "data" / "corpora"
SEED = 1337
KEYS = {"prompt", "text", "target", "template", "set", "family"}


@pytest.fixture(scope="module")
def split() -> tuple[list[str], list[str]]:
    docs = load_documents("tinystories", CORPORA, max_documents=1500)
    return split_documents(docs, 0.1, "random", SEED)  # 1350 train, 150 validation stories


@pytest.fixture(scope="module")
def val_pairs(split) -> list[dict]:
    return build_pairs(split[1], "tinystories", SEED)


@pytest.fixture(scope="module")
def sets(split, val_pairs) -> dict[str, list[dict]]:
    return prompt_sets(val_pairs, split[0], SEED)


def test_records_and_sizes(sets):
    assert set(sets) == {"dev", "test", "implied"}
    assert (len(sets["dev"]), len(sets["test"])) == (64, 64)
    assert len(sets["implied"]) >= 30
    for name, records in sets.items():
        for r in records:
            assert set(r) == KEYS and r["set"] == name
            assert isinstance(r["target"], list) and r["target"] and r["prompt"].strip()
    held_out = sets["dev"] + sets["test"]
    assert all(r["family"] == "story" and r["template"].startswith("story/") for r in held_out)
    assert all(r["family"] == "implied" and r["text"] == "" for r in sets["implied"])
    assert all(r["template"] == "implied/" + r["template"].split("/")[1] for r in sets["implied"])


def test_dev_and_test_share_no_document_and_come_from_validation_only(sets, split):
    train, val = split
    dev_docs = {r["text"] for r in sets["dev"]}
    test_docs = {r["text"] for r in sets["test"]}
    assert not dev_docs & test_docs
    assert len(dev_docs) == 64 and len(test_docs) == 64  # one prompt per document by default
    assert dev_docs | test_docs <= set(val)
    assert not (dev_docs | test_docs) & set(train)


def test_deterministic_and_independent_of_input_order(sets, split, val_pairs):
    assert prompt_sets(val_pairs, split[0], SEED) == sets
    shuffled = val_pairs[:]
    random.Random(0).shuffle(shuffled)
    assert prompt_sets(shuffled, split[0], SEED) == sets
    other = prompt_sets(val_pairs, split[0], SEED + 1)
    assert {r["text"] for r in other["dev"]} != {r["text"] for r in sets["dev"]}


def test_smaller_sets_are_prefixes_of_the_dev_set(sets, val_pairs):
    dev, test = split_dev_test(val_pairs, SEED, n_dev=8, n_test=5)
    assert (len(dev), len(test)) == (8, 5)
    assert [r["text"] for r in dev] == [r["text"] for r in sets["dev"][:8]]
    assert not {r["text"] for r in dev} & {r["text"] for r in test}


def test_too_small_validation_split_names_the_counts(val_pairs):
    with pytest.raises(ValueError, match=r"150 documents.*dev set of 100 and a test set of 64") as info:
        split_dev_test(val_pairs, SEED, n_dev=100, n_test=64)
    assert "n_dev / n_test" in str(info.value)
    with pytest.raises(ValueError, match=r"has 3 documents"):
        split_dev_test(val_pairs[:3], SEED, n_dev=2, n_test=2)
    with pytest.raises(ValueError, match="n_dev must be a positive integer"):
        split_dev_test(val_pairs, SEED, n_dev=0)


def test_documents_also_in_training_are_not_held_out(split, val_pairs):
    train = list(split[0]) + [val_pairs[0]["text"]]  # a story in both splits (a duplicate)
    out = prompt_sets(val_pairs, train, SEED, n_dev=70, n_test=70)
    assert val_pairs[0]["text"] not in {r["text"] for r in out["dev"] + out["test"]}
    with pytest.raises(ValueError, match="1 documents also in training were left out"):
        prompt_sets(val_pairs, train, SEED, n_dev=75, n_test=75)


def test_several_prompts_per_document_stay_on_one_side(split):
    pairs = build_pairs(split[1][:40], "tinystories", SEED, max_pairs_per_document=3)
    with pytest.raises(ValueError):
        split_dev_test(pairs, SEED, n_dev=30, n_test=30)
    dev, test = split_dev_test(pairs, SEED, n_dev=30, n_test=30, per_document=3)
    assert (len(dev), len(test)) == (30, 30)
    assert not {r["text"] for r in dev} & {r["text"] for r in test}
    assert len({r["text"] for r in dev}) == 10  # first pairs of 10 documents, then their 2nd and 3rd


# ----------------------------------------------------------------------------------------------
# implied topics


def test_no_implied_paraphrase_names_its_target():
    assert 30 <= len(IMPLIED_TOPICS) <= 45
    for topic, (target, templates) in IMPLIED_TOPICS.items():
        assert 2 <= len(templates) <= 3 and all(" " not in t for t in target), topic
        for prompt in templates:
            assert not adherent(prompt, list(target)), (topic, prompt)


def test_implied_prompts_never_contain_their_targets(sets):
    for seed in (SEED, 0, 1, 2):
        for r in implied_prompts(set(w for t, _ in IMPLIED_TOPICS.values() for w in t), seed, per_topic=3):
            assert not adherent(r["prompt"], r["target"]), r
    for r in sets["implied"]:
        assert not adherent(r["prompt"], r["target"]), r
        topic = r["template"].split("/", 1)[1]
        assert r["target"] == list(IMPLIED_TOPICS[topic][0])


def test_implied_topics_must_occur_in_training_text(split, sets):
    words = word_set(split[0])
    for r in sets["implied"]:
        assert any(t in words for t in r["target"])
    # a word set works like the documents, and leaves out topics whose words it lacks
    assert implied_prompts(words, SEED) == sets["implied"]
    only = implied_prompts({"puppy", "Moo", "sky"}, SEED)
    assert [r["template"] for r in only] == ["implied/dog"]
    assert implied_prompts(["The cow said hello to the dog."], SEED) == [
        r for r in sets["implied"] if r["template"] in ("implied/dog", "implied/cow")
    ]
    assert implied_prompts(set(), SEED) == []


def test_implied_choice_is_seeded_and_deterministic(split):
    words = word_set(split[0])
    a = implied_prompts(words, SEED)
    assert implied_prompts(words, SEED) == a
    prompts = {seed: [r["prompt"] for r in implied_prompts(words, seed)] for seed in range(4)}
    assert len({tuple(p) for p in prompts.values()}) > 1
    two = implied_prompts(words, SEED, per_topic=2)
    assert len(two) == 2 * len(a)
    for i in range(0, len(two), 2):
        assert two[i]["template"] == two[i + 1]["template"] and two[i]["prompt"] != two[i + 1]["prompt"]


def test_implied_dev_prompts_are_other_paraphrases_of_the_same_topics(split, sets):
    """Levers for implied topics are chosen on dev paraphrases; the reported ones stay unseen."""
    words = word_set(split[0])
    dev = implied_prompts(words, SEED, which="dev")
    test = sets["implied"]
    assert [r["template"] for r in dev] == [r["template"] for r in test]
    assert all(r["set"] == "implied_dev" and r["family"] == "implied" for r in dev)
    for d, t in zip(dev, test):
        assert d["prompt"].rstrip(".").lower() != t["prompt"].rstrip(".").lower()
        assert not adherent(d["prompt"], d["target"]) and d["target"] == t["target"]
    assert implied_prompts(words, SEED, which="dev") == dev
    with pytest.raises(ValueError, match="which"):
        implied_prompts(words, SEED, which="train")
    with pytest.raises(ValueError, match="no paraphrase left"):
        implied_prompts({"dog"}, SEED, which="dev", topics={"dog": (("dog",), ("A pet that barks",))})
