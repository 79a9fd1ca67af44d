"""Evaluation prompt sets: a dev and a test set of held-out prompts, and an implied-topic family.

:func:`prompt_sets` turns the validation pairs (``pairs_val.jsonl``: contract keys prompt, text,
target, template) into three lists of records, each record keeping those keys and adding
``"set"`` (``dev``, ``test`` or ``implied``) and ``"family"``:

- ``dev`` / ``test``: held-out prompts, split **by document** so that no document (no story) gives
  prompts to both; tune on dev, report on test. Documents are ordered by a seeded hash of their text
  (sha256 of ``f"{seed}:{text}"``), so the split depends on the seed and the documents, not on their
  order in the file, and the dev set for ``n_dev=32`` is the first half of the one for ``n_dev=64``.
  Dev takes the first documents of that order, just enough for ``n_dev`` prompts, and test the
  next ones; each document gives at most ``per_document`` prompts (its first pairs: its most salient
  nouns; the default 1 keeps the prompts independent, more lets a small validation split give more
  prompts when it was built with ``data.max_pairs_per_document`` > 1). ``family`` is the template's
  style ("story", "speech" or "article").
- ``implied``: prompts that name a topic **without** its word, "Write a story about a pet that
  barks" -> target ``["dog", "dogs", "puppy", ...]``. A sample adheres when it names the thing
  (:func:`sunfish.data.prompts.adherent`), so this family measures whether the model maps a
  description to a concept rather than copying a prompt word into the text. ``text`` is "" (there is
  no reference document), ``template`` is ``implied/<topic>``, ``family`` is ``implied``. Topics come
  from the hand-written :data:`IMPLIED_TOPICS` table (common TinyStories topics, each with 2-3
  paraphrases none of which contains one of its target words); only topics whose target occurs in
  the training text are kept, since a model cannot learn a word it never saw. The paraphrase of each
  topic is drawn with ``random.Random(f"{seed}:implied:{topic}")``.

Everything is deterministic: the same pairs, train text and seed give the same sets.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable

from sunfish.data.prompts import _WORD, _casual, adherent

#: topic -> (target words, paraphrase prompts). Single words only (so a word set can tell whether
#: the training text has them); no prompt contains any of its own targets as a whole word.
IMPLIED_TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "dog": (
        ("dog", "dogs", "puppy", "puppies", "pup", "pups", "doggy"),
        ("Write a story about a pet that barks",
         "Tell me a story about an animal that wags its tail and says woof",
         "A story about a furry friend who loves to fetch sticks"),
    ),
    "cat": (
        ("cat", "cats", "kitten", "kittens", "kitty"),
        ("Write a story about a pet that says meow",
         "Tell me a story about a soft pet that purrs",
         "A story about a furry pet with whiskers who loves milk"),
    ),
    "bird": (
        ("bird", "birds", "birdie", "robin", "robins", "sparrow", "sparrows", "parrot", "parrots"),
        ("Write a story about an animal with wings and feathers",
         "Tell me a story about a little animal that sings and builds a nest",
         "A story about a small feathered friend that chirps"),
    ),
    "flying": (
        ("bird", "birds", "plane", "planes", "airplane", "airplanes", "kite", "kites", "butterfly",
         "butterflies", "balloon", "balloons", "rocket", "rockets", "jet", "jets"),
        ("Tell me a story about something that flies in the sky",
         "Write a story about something that can fly up high above the houses"),
    ),
    "fish": (
        ("fish", "fishes", "goldfish"),
        ("Write a story about a pet that swims in a bowl",
         "Tell me a story about an animal that lives in the water and has fins",
         "A story about a little swimmer with fins and scales"),
    ),
    "cow": (
        ("cow", "cows", "calf", "calves"),
        ("Write a story about an animal that says moo",
         "Tell me a story about a farm animal that gives us milk"),
    ),
    "pig": (
        ("pig", "pigs", "piggy", "piglet", "piglets"),
        ("Write a story about a pink farm animal that says oink",
         "Tell me a story about a farm animal that loves to roll in the mud"),
    ),
    "sheep": (
        ("sheep", "lamb", "lambs"),
        ("Write a story about an animal that says baa",
         "Tell me a story about a fluffy farm animal covered in wool"),
    ),
    "horse": (
        ("horse", "horses", "pony", "ponies", "foal"),
        ("Write a story about an animal that says neigh",
         "Tell me a story about a farm animal you can ride that gallops"),
    ),
    "duck": (
        ("duck", "ducks", "duckling", "ducklings"),
        ("Write a story about a bird that says quack",
         "Tell me a story about an animal that quacks and swims in the pond"),
    ),
    "frog": (
        ("frog", "frogs", "toad", "toads"),
        ("Write a story about a green animal that hops and says ribbit",
         "Tell me a story about a small animal that jumps from lily pad to lily pad"),
    ),
    "rabbit": (
        ("rabbit", "rabbits", "bunny", "bunnies", "hare"),
        ("Write a story about an animal with long ears that hops and eats carrots",
         "Tell me a story about a fluffy animal with a cotton tail that hops"),
    ),
    "bear": (
        ("bear", "bears", "cub", "cubs"),
        ("Write a story about a big furry animal that loves honey and sleeps all winter",
         "Tell me a story about a large animal of the woods that eats honey and berries"),
    ),
    "lion": (
        ("lion", "lions", "lioness"),
        ("Write a story about the king of the jungle",
         "Tell me a story about a big wild animal with a golden mane that roars"),
    ),
    "elephant": (
        ("elephant", "elephants"),
        ("Write a story about a huge gray animal with a long trunk",
         "Tell me a story about a very big animal with big ears and a trunk"),
    ),
    "monkey": (
        ("monkey", "monkeys"),
        ("Write a story about an animal that swings from branch to branch and eats bananas",
         "Tell me a story about a playful jungle animal that climbs and eats bananas"),
    ),
    "mouse": (
        ("mouse", "mice"),
        ("Write a story about a tiny animal that squeaks and loves cheese",
         "Tell me a story about a little gray animal that squeaks"),
    ),
    "bee": (
        ("bee", "bees", "honeybee", "honeybees"),
        ("Write a story about a little insect that buzzes and makes honey",
         "Tell me a story about a buzzing insect with yellow and black stripes"),
    ),
    "dragon": (
        ("dragon", "dragons"),
        ("Write a story about a big creature with wings that breathes fire",
         "Tell me a story about a scaly monster that breathes fire"),
    ),
    "ball": (
        ("ball", "balls"),
        ("Write a story about a round toy that bounces",
         "Tell me a story about something round that you can kick and throw"),
    ),
    "toy": (
        ("toy", "toys", "doll", "dolls", "teddy"),
        ("Write a story about something a child plays with in her room",
         "Tell me a story about a little boy's favorite plaything"),
    ),
    "tree": (
        ("tree", "trees"),
        ("Write a story about a tall plant with a trunk, branches and leaves",
         "Tell me a story about something big and green that grows in the forest and has bark"),
    ),
    "flower": (
        ("flower", "flowers", "rose", "roses", "daisy", "daisies", "tulip", "tulips"),
        ("Write a story about a pretty plant with colorful petals",
         "Tell me a story about something that blooms in the garden in spring and smells nice"),
    ),
    "apple": (
        ("apple", "apples"),
        ("Write a story about a red fruit that grows on a tree and is crunchy",
         "Tell me a story about a round, crunchy fruit that keeps the doctor away"),
    ),
    "cake": (
        ("cake", "cakes", "cupcake", "cupcakes"),
        ("Write a story about a sweet treat with candles on a birthday",
         "Tell me a story about baking a sweet treat with frosting"),
    ),
    "cookie": (
        ("cookie", "cookies"),
        ("Write a story about a sweet round treat with chocolate chips",
         "Tell me a story about a small sweet treat that comes out of the oven in a batch"),
    ),
    "sun": (
        ("sun", "sunshine"),
        ("Write a story about the big bright light in the sky during the day",
         "Tell me a story about something yellow and hot that shines in the sky all day"),
    ),
    "moon": (
        ("moon", "moons", "moonlight"),
        ("Write a story about the round light that shines in the sky at night",
         "Tell me a story about what glows white and round in the night sky"),
    ),
    "star": (
        ("star", "stars", "starry"),
        ("Write a story about the tiny lights that twinkle in the night sky",
         "Tell me a story about the little lights that twinkle far away at night"),
    ),
    "rain": (
        ("rain", "rains", "raining", "rained", "raindrop", "raindrops", "rainy"),
        ("Write a story about water that falls from the clouds",
         "Tell me a story about a wet, gray day when drops fall from the sky"),
    ),
    "snow": (
        ("snow", "snowy", "snowing", "snowman", "snowflake", "snowflakes"),
        ("Write a story about cold white flakes that fall in winter",
         "Tell me a story about a cold winter day when everything outside turns white"),
    ),
    "rainbow": (
        ("rainbow", "rainbows"),
        ("Write a story about the colorful arc in the sky after a storm",
         "Tell me a story about the many colors that appear in the sky when the storm is over"),
    ),
    "sea": (
        ("sea", "seas", "ocean", "oceans", "beach", "beaches", "seaside"),
        ("Write a story about the big salty water where whales live",
         "Tell me a story about a trip to where the sand meets the waves"),
    ),
    "car": (
        ("car", "cars", "truck", "trucks"),
        ("Write a story about something with four wheels that drives on the road",
         "Tell me a story about what a dad drives to work on the road"),
    ),
    "boat": (
        ("boat", "boats", "ship", "ships", "sailboat", "sailboats"),
        ("Write a story about something that floats and sails on the water",
         "Tell me a story about a sailor's trip across the waves"),
    ),
    "train": (
        ("train", "trains"),
        ("Write a story about something long that goes choo choo on the tracks",
         "Tell me a story about a ride on the railway with many wagons"),
    ),
    "park": (
        ("park", "parks", "playground", "playgrounds"),
        ("Write a story about a place with swings and slides where kids play",
         "Tell me a story about a green place in town with a slide and a swing"),
    ),
    "school": (
        ("school", "schools", "class", "classroom", "teacher", "teachers"),
        ("Write a story about a place where children go to learn",
         "Tell me a story about a place where kids learn to read and write"),
    ),
    "book": (
        ("book", "books", "storybook"),
        ("Write a story about something with pages full of words and pictures to read",
         "Tell me a story about what you read at the library"),
    ),
    "doctor": (
        ("doctor", "doctors", "doc", "nurse", "nurses", "hospital"),
        ("Write a story about a person who helps you when you are sick",
         "Tell me a story about someone in a white coat who makes sick people feel better"),
    ),
}

_HELD_OUT_KEYS = ("prompt", "text", "target", "template")


def word_set(documents: Iterable[str]) -> frozenset[str]:
    """The lower-cased words of ``documents`` (what :func:`implied_prompts` checks targets against)."""
    words: set[str] = set()
    for doc in documents:
        words.update(w.lower() for w in _WORD.findall(doc))
    return frozenset(words)


def _as_word_set(train: Iterable[str]) -> frozenset[str]:
    """A set/frozenset is taken as the words themselves; any other iterable as documents."""
    if isinstance(train, (set, frozenset)):
        return frozenset(w.lower() for w in train)
    if isinstance(train, str):
        raise TypeError(
            "train: give the training documents (a list of strings) or a set of words, not one string"
        )
    return word_set(train)


def _order_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode("utf-8")).hexdigest()


def split_dev_test(
    val_pairs: list[dict],
    seed: int,
    n_dev: int = 64,
    n_test: int = 64,
    per_document: int = 1,
    exclude_texts: Iterable[str] = (),
) -> tuple[list[dict], list[dict]]:
    """Dev and test records (``n_dev`` and ``n_test`` of them) from documents that neither shares.

    ``exclude_texts``: documents that must not be used (the training documents: a text that is in
    both splits, such as Shakespeare's repeated one-line speeches, is not held out).
    Raises ValueError, naming the counts, when the pairs come from too few documents.
    """
    for name, value in (("n_dev", n_dev), ("n_test", n_test), ("per_document", per_document)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    excluded = set(exclude_texts)
    by_text: dict[str, list[dict]] = {}
    for pair in val_pairs:
        missing = [k for k in _HELD_OUT_KEYS if k not in pair]
        if missing:
            raise ValueError(f"validation pair without {missing}: {pair!r:.200}")
        if pair["text"] and pair["text"] not in excluded:
            by_text.setdefault(pair["text"], []).append(pair)
    order = sorted(by_text, key=lambda text: _order_key(seed, text))
    dev_texts = _enough_documents(order, by_text, n_dev, per_document)
    test_texts = _enough_documents(order[len(dev_texts):], by_text, n_test, per_document)
    dev = _spread(dev_texts, by_text, n_dev, per_document)
    test = _spread(test_texts, by_text, n_test, per_document)
    if len(dev) < n_dev or len(test) < n_test:
        dropped = len({p["text"] for p in val_pairs if p["text"]} & excluded)
        raise ValueError(
            f"the validation split has {len(by_text)} documents with prompt pairs ({len(val_pairs)} pairs"
            + (f"; {dropped} documents also in training were left out" if dropped else "")
            + f"), too few for a dev set of {n_dev} and a test set of {n_test} prompts that share no "
            f"document at most {per_document} per document (dev got {len(dev)}, test {len(test)}); "
            "ask for fewer (n_dev / n_test), allow more prompts per document (per_document and "
            "data.max_pairs_per_document), or raise data.val_fraction"
        )
    return (
        [_record(p, "dev") for p in dev],
        [_record(p, "test") for p in test],
    )


def _enough_documents(
    order: list[str], by_text: dict[str, list[dict]], n: int, per_document: int
) -> list[str]:
    """The shortest prefix of ``order`` whose documents give ``n`` prompts (or all of it)."""
    have = 0
    for k, text in enumerate(order):
        if have >= n:
            return order[:k]
        have += min(len(by_text[text]), per_document)
    return order


def _spread(texts: list[str], by_text: dict[str, list[dict]], n: int, per_document: int) -> list[dict]:
    """``n`` pairs of ``texts``: every document's first pair before any document's second."""
    ranked = sorted(
        (j, i, pair) for i, text in enumerate(texts) for j, pair in enumerate(by_text[text][:per_document])
    )
    return [pair for _, _, pair in ranked[:n]]


def _record(pair: dict, which: str) -> dict:
    record = {k: pair[k] for k in _HELD_OUT_KEYS}
    record["target"] = list(record["target"])
    record["set"] = which
    record["family"] = str(pair["template"]).split("/", 1)[0]
    return record


def implied_prompts(
    train: Iterable[str],
    seed: int,
    per_topic: int = 1,
    topics: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] | None = None,
    which: str = "test",
) -> list[dict]:
    """One record per learnable topic of :data:`IMPLIED_TOPICS` (``per_topic`` paraphrases each).

    ``train``: the training documents, or a set of (lower-case) words from them; a topic is kept
    when at least one of its target words occurs there. Records are in the table's order.
    ``which="dev"``: a paraphrase of each topic that the test records do not use (every topic has
    at least two), for choosing settings on implied prompts without reading the reported ones.
    """
    if not isinstance(per_topic, int) or per_topic < 1:
        raise ValueError(f"per_topic must be a positive integer, got {per_topic!r}")
    if which not in ("test", "dev"):
        raise ValueError(f"which must be 'test' or 'dev', got {which!r}")
    words = _as_word_set(train)
    records = []
    for topic, (target, templates) in (IMPLIED_TOPICS if topics is None else topics).items():
        if not any(t.lower() in words for t in target):
            continue
        rng = random.Random(f"{seed}:implied:{topic}")
        chosen = rng.sample(list(templates), min(per_topic, len(templates)))
        if which == "dev":
            rest = [t for t in templates if t not in chosen]
            if not rest:
                raise ValueError(f"implied topic {topic!r}: no paraphrase left for dev beside the "
                                 f"{len(chosen)} test one(s); add one to the table")
            rng = random.Random(f"{seed}:implied-dev:{topic}")
            chosen = rng.sample(rest, min(per_topic, len(rest)))
        for prompt in chosen:
            prompt = _casual(prompt, rng)
            if adherent(prompt, list(target)):  # a table entry that names its own answer
                raise ValueError(
                    f"implied topic {topic!r}: the prompt {prompt!r} contains one of {list(target)}"
                )
            records.append({
                "prompt": prompt,
                "text": "",
                "target": list(target),
                "template": f"implied/{topic}",
                "family": "implied",
                "set": "implied" if which == "test" else "implied_dev",
            })
    return records


def prompt_sets(
    val_pairs: list[dict],
    train: Iterable[str],
    seed: int,
    n_dev: int = 64,
    n_test: int = 64,
    per_document: int = 1,
    implied_per_topic: int = 1,
) -> dict[str, list[dict]]:
    """``{"dev": [...], "test": [...], "implied": [...]}`` (see the module docstring).

    ``val_pairs``: the validation pairs (``build_pairs`` of the validation documents, as in
    ``pairs_val.jsonl``). ``train``: the training documents (then a validation document that is also
    a training document is not used), or a set of words from them (then only the implied family's
    topics are checked against it). Raises ValueError when the validation split is too small.
    """
    words = _as_word_set(train) if isinstance(train, (set, frozenset)) else None
    train_docs: list[str] = [] if words is not None else list(train)
    if words is None:
        words = word_set(train_docs)
    dev, test = split_dev_test(val_pairs, seed, n_dev, n_test, per_document, exclude_texts=train_docs)
    return {"dev": dev, "test": test, "implied": implied_prompts(words, seed, implied_per_topic)}
