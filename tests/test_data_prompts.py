"""Prompt/text pairs: determinism, natural prompts, checkable targets, and the adherence test."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from sunfish.data.corpora import load_documents
from sunfish.data.prompts import (
    adherent,
    build_pairs,
    described_clue,
    detokenize_title,
    document_style,
    plural,
    spread_over_documents,
    word_forms,
)

CORPORA = Path(__file__).resolve().parents[1] / "data" / "corpora"


@pytest.fixture(scope="module")
def stories() -> list[str]:
    return load_documents("tinystories", CORPORA, max_documents=300)


@pytest.fixture(scope="module")
def story_pairs(stories) -> list[dict]:
    return build_pairs(stories, "tinystories", seed=1337)


def test_records_follow_the_contract(story_pairs, stories):
    assert len(story_pairs) == len(stories)  # one pair per story by default
    for pair, story in zip(story_pairs, stories):
        assert set(pair) == {"prompt", "text", "target", "template"}
        assert pair["text"] == story
        assert isinstance(pair["target"], list) and pair["target"]
        assert all(isinstance(t, str) and t for t in pair["target"])
        assert pair["prompt"].strip() and pair["template"].startswith("story/")


def test_deterministic_and_seeded(stories, story_pairs):
    assert build_pairs(stories, "tinystories", seed=1337) == story_pairs
    other = build_pairs(stories, "tinystories", seed=1)
    # the word is the document's, the phrasing the seed's
    assert all(set(a["target"]) & set(b["target"]) for a, b in zip(other, story_pairs))
    assert sum(a["prompt"] != b["prompt"] for a, b in zip(other, story_pairs)) > len(stories) // 3


def test_every_target_occurs_in_its_own_text(story_pairs):
    assert all(adherent(p["text"], p["target"]) for p in story_pairs)


def test_prompts_name_their_target(story_pairs):
    for p in story_pairs:
        assert adherent(p["prompt"], p["target"]), p


def test_targets_are_content_words_not_filler(story_pairs):
    filler = {"time", "day", "lot", "way", "thing", "little", "big", "the", "a", "was", "named", "happy"}
    heads = Counter(p["target"][0] for p in story_pairs)
    assert not filler & set(heads)
    assert len(heads) > 150  # varied topics, not one word everywhere


def test_prompts_look_like_user_requests(story_pairs):
    natural = re.compile(
        r"^(write a story about|tell me a story about|write a short story about|can you write a story about|"
        r"a story with|write about|describe the|words:)\s|^[a-z]+\.?$",
        re.IGNORECASE,
    )
    assert [p["prompt"] for p in story_pairs if not natural.match(p["prompt"])] == []
    templates = Counter(p["template"] for p in story_pairs)
    assert len(templates) >= 8 and max(templates.values()) < 0.3 * len(story_pairs)
    assert any(p["prompt"][0].islower() for p in story_pairs)
    assert any(p["prompt"][0].isupper() for p in story_pairs)


def test_salient_word_and_article():
    docs = [
        "Once upon a time, there was a little girl. She had a big red ball. The ball was round and the girl "
        "threw the ball every day.",
        "One day, a boy saw two dogs in the park. The dogs ran. A dog barked at the boy.",
        "There was an elephant. The elephant drank the water. The elephant was happy.",
    ]
    pairs = build_pairs(docs, "tinystories", seed=0)
    assert [p["target"] for p in pairs] == [["ball", "balls"], ["dog", "dogs"], ["elephant", "elephants"]]
    prompts = [build_pairs(docs, "tinystories", seed=s)[2]["prompt"] for s in range(30)]
    assert not any(re.search(r"\ba elephant", p, re.IGNORECASE) for p in prompts)
    assert any(re.search(r"\ban elephant\b", p, re.IGNORECASE) for p in prompts)
    assert any(re.search(r"\belephants\b", p) for p in prompts)  # "Write about elephants"


def test_several_pairs_use_different_words_and_templates(stories):
    pairs = build_pairs(stories[:50], "tinystories", seed=3, max_pairs_per_document=3)
    by_doc: dict[str, list[dict]] = {}
    for p in pairs:
        by_doc.setdefault(p["text"], []).append(p)
    assert len(pairs) > 100 and all(len(v) <= 3 for v in by_doc.values())
    for group in by_doc.values():
        assert len({p["template"] for p in group}) == len(group)
        assert len({p["prompt"].lower() for p in group}) == len(group)
    # pair j asks for the document's j-th noun: later pairs bring in other words
    assert sum(len({w for p in group for w in p["target"]}) > 2 for group in by_doc.values()) > 40


def test_shakespeare_pairs():
    docs = load_documents("shakespeare", CORPORA, max_documents=200)
    pairs = build_pairs(docs, "shakespeare", seed=0)
    assert len(pairs) > 150
    assert all(p["template"].startswith("speech/") and adherent(p["text"], p["target"]) for p in pairs)
    by = [p for p in pairs if p["template"] == "speech/speech_by"]
    assert by and all(re.match(r"^[Ww]rite a speech by [A-Z]", p["prompt"]) for p in by)
    assert not any(p["target"] == ["All"] for p in pairs)  # "All:" blocks would check nothing
    assert any("First Citizen" in p["prompt"] for p in pairs)


def test_wikitext_pairs():
    docs = load_documents("wikitext2", CORPORA)
    pairs = build_pairs(docs, "wikitext2", seed=0)
    assert len(pairs) == len(docs)
    assert all(p["template"].startswith("article/") and adherent(p["text"], p["target"]) for p in pairs)
    first = pairs[0]
    assert "Valkyria Chronicles III" in first["prompt"] and "Valkyria" in first["target"]
    gambia = next(p for p in pairs if "Gambia" in p["prompt"])
    assert "Gambia women's national football team" in gambia["prompt"]


def test_style_detection_for_other_sources():
    assert document_style(" = Some Title = \n body", "my.txt") == "article"
    assert document_style("ROMEO:\nBut soft, what light", "hf:x") == "speech"
    assert document_style("The cat sat on the mat.", "hf:x") == "story"
    docs = [" = Blue Whale = \n The blue whale is large .", "Tom had a kite. The kite flew high."]
    pairs = build_pairs(docs, "notes.txt", 0)
    assert pairs[0]["template"].startswith("article/") and "Blue" in pairs[0]["target"]
    assert pairs[1]["target"] == ["kite", "kites"]


def test_document_without_content_words_gets_no_pair():
    pairs = build_pairs(["It was so. He was there.", "A cat sat on a mat with a cat."], "x.txt", 0)
    assert len(pairs) == 1 and pairs[0]["text"].startswith("A cat") and pairs[0]["target"] == ["cat", "cats"]


def test_word_forms_and_titles():
    assert plural("box") == "boxes" and plural("puppy") == "puppies" and plural("boy") == "boys"
    assert word_forms("mouse") == ["mouse", "mice"] and word_forms("fish") == ["fish"]
    assert detokenize_title("USS Atlanta ( 1861 )") == "USS Atlanta (1861)"
    assert detokenize_title("There 's Got to Be a Way") == "There's Got to Be a Way"


@pytest.mark.parametrize(
    "sample, target, expected",
    [
        ("The Boats sailed away.", ["boat", "boats"], True),
        ("A BOAT!", ["boat"], True),
        ("The boathouse was empty.", ["boat", "boats"], False),
        ("a sailboat", ["boat"], False),
        ("The dog's bone", ["dog"], True),
        ("Speech by first   citizen: hello", ["First Citizen"], True),
        ("first and citizen", ["First Citizen"], False),
        ("anything", [], False),
        ("WASP-44 is a star", ["WASP-44"], True),
    ],
)
def test_adherent(sample, target, expected):
    assert adherent(sample, target) is expected


def test_same_pairs_in_another_process_with_another_hash_seed(story_pairs):
    """Set iteration order changes with PYTHONHASHSEED; the pairs (a DVC output) must not."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, sys; from pathlib import Path; from sunfish.data.corpora import load_documents; "
        "from sunfish.data.prompts import build_pairs; "
        f"d = load_documents('tinystories', Path({str(CORPORA)!r}), max_documents=300); "
        "json.dump(build_pairs(d, 'tinystories', seed=1337), sys.stdout)"
    )
    root = Path(__file__).resolve().parents[1]
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(root)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == story_pairs


def test_the_originals_prompt_style_comes_out_of_the_pair_builder():
    """The original's example prompts are among what the builder writes for stories about those words."""
    docs = [
        "Once upon a time, there was a robot. The robot liked to help. Every day the robot cleaned a room.",
        "Tom had two dogs. The dogs ran in the park. A dog barked at a bird and the dogs played.",
        "Sue went to the ocean with her mom. The ocean was big and blue. She swam in the ocean all day.",
    ]
    seen = [set() for _ in docs]
    for seed in range(80):
        for i, pair in enumerate(build_pairs(docs, "tinystories", seed=seed)):
            seen[i].add(pair["prompt"].rstrip(".?").lower())
    assert "write a story about a robot" in seen[0]
    assert "write about dogs" in seen[1]
    assert "describe the ocean" in seen[2]
    for i, target in enumerate(("robot", "dog", "ocean")):
        assert all(adherent(p, [target, target + "s"]) for p in seen[i] if not p.startswith("words:")), seen[i]


def test_held_out_prompts_spread_over_documents(stories):
    pairs = build_pairs(stories[:30], "tinystories", seed=0, max_pairs_per_document=3)
    chosen = spread_over_documents(pairs, 20)
    texts = [p["text"] for p in chosen]
    assert len(chosen) == 20 and len(set(texts)) == 20  # 20 documents, not 7 of them three times
    assert chosen == [p for p in pairs if p in chosen]  # ... in the file's order
    seen: dict[str, int] = {}
    nth = [seen.__setitem__(p["text"], seen.get(p["text"], -1) + 1) or seen[p["text"]] for p in pairs]
    rounds = [p for j in range(3) for p, k in zip(pairs, nth) if k == j]  # every first pair, then every second...
    assert spread_over_documents(pairs, len(pairs)) == rounds
    one_each = build_pairs(stories[:30], "tinystories", seed=0)
    assert spread_over_documents(one_each, 12) == one_each[:12]


def test_described_pairs_describe_the_noun_without_naming_it(stories):
    plain = build_pairs(stories, "tinystories", 1337)
    both = build_pairs(stories, "tinystories", 1337, described=True)
    described = [p for p in both if p["template"] == "story/described"]
    assert [p for p in both if p["template"] != "story/described"] == plain  # the other pairs do not move
    assert len(described) > len(stories) // 4
    for p in described:
        assert not adherent(p["prompt"], p["target"]), p["prompt"]  # the noun is never named
        assert adherent(p["text"], p["target"])  # and the story does name it
        assert re.match(r"(?i)(write a story|tell me a story|a short story) about (something that|someone who) ",
                        p["prompt"]), p["prompt"]
    assert described_clue("The frog hopped out of the mud. It was happy.", "frog") == "hopped out of the mud"
    # at most nine words, without the function words a cut leaves dangling
    assert described_clue("The frog hopped out of the mud and sat on a log.", "frog") == (
        "hopped out of the mud and sat")
    assert described_clue("Lily saw the frog. It was green.", "frog") is None  # nothing follows the noun
    assert described_clue("A dog named Max was there.", "dog") is None  # a name, not a description
    assert described_clue("The dog was happy and the dog barked at the cat.", "dog") == "barked at the cat"  # never the noun
