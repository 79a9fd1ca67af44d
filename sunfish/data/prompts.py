"""Prompt/text pairs for the prompt-conditioned diffusion model, and the adherence test.

The diffusion model learns ``p(text | prompt)`` from these pairs, and its prompt adherence is
measured on the pairs of held-out documents and on prompts a user types ("Write a story about a
robot", "Describe the ocean"). So the prompts imitate what a user would write, and each pair carries
a *checkable target*: words of which at least one must appear in a sample that follows the prompt.

Scheme (deterministic: the same documents, source and seed give the same pairs)

1. The text of every pair is the document itself (the model learns to generate it).
2. Salient words. Candidate nouns are words that follow a determiner (a, an, the, his, her, my,
   their, some, thy, ...), skipping known adjectives ("a big red ball" -> ball) and participles
   that precede another word ("the shining sun" -> sun); stop words, common verbs and generic
   nouns (time, day, lot, way, thing, ...) are never candidates. Plurals are merged with their
   singular when the singular occurs in the corpus ("dogs" -> dog). A candidate's score is its
   count in the document times its inverse document frequency over all the documents given, times
   1.5 when it first occurs in the first 60 words (short samples should reach it). Ties: earlier
   first occurrence, then alphabetical. Pair ``j`` of a document uses its ``j``-th best noun.
3. Templates, drawn with ``random.Random(f"{seed}:{source}:{document index}")``; the first letter is
   sometimes lower-cased and a final full stop sometimes added, as users type:
   - stories (TinyStories, and any plain text): "Write a story about a {w}", "Tell me a story about
     a {w}", "Write a short story about a {w}", "Can you write a story about a {w}?", "A story with
     a {w}", "Write about {w}s", "Describe the {w}", "{w}" (a bare topic), "Words: {w1}, {w2}, {w3}"
     (the TinyStories-Instruct keyword style) and "Tell me a story about a {character} and her/his
     {w}" (character = the document's most frequent person/animal noun, e.g. girl, boy, dog). The
     article follows the document: "a"/"an" for nouns it uses with a/an, the plural for nouns it
     only uses in the plural, "the" otherwise ("Write a story about the sea"); "Write about {w}s"
     keeps mass nouns singular ("Write about water": no plural anywhere in the corpus).
   - Shakespeare speech blocks ("SPEAKER:" line + speech): "Write a speech by {Speaker}", "Write a
     speech by {Speaker} about the {w}", "Write a speech about {w}s", "Write lines about the {w}",
     "Words: {w1}, {w2}, {w3}"; blocks without a candidate noun only get "Write a speech by {Speaker}"
     (none when the speaker is "All" or "Both", which would check nothing).
   - WikiText articles (`` = Title = `` first line): "Write about {Title}", "Write an article about
     {Title}", "Tell me about {Title}", "Describe {Title}", "Write a Wikipedia article about
     {Title}", "{Title}", with the title detokenised ("Gambia women 's" -> "Gambia women's").
   - described (``build_pairs(described=True)``, training stories only): one more pair per story
     whose prompt describes its noun in the story's own words without naming it, "Write a story
     about something that hopped out of the mud" -> frog (:func:`described_clue`).
4. Targets: the salient word(s) the prompt names, with their plural (s/es/ies and a few irregular
   forms): "Write a story about a puppy" -> ["puppy", "puppies"]; keyword prompts -> the forms of
   all three words; the character of the two-noun template is context, not a target (girl and boy
   appear in most stories, so they would say nothing about adherence). A speech by a speaker
   without a topic -> the speaker's name (the text opens with it); an article -> the title's main
   words (not stop words, not numbers).
5. ``adherent(sample, target)``: True when any target appears in the sample as a whole word or
   phrase, ignoring case: "Boats!" matches the target ["boat", "boats"], "boathouse" does not.

Source selection: ``tinystories`` -> stories, ``shakespeare`` -> speeches, ``wikitext2`` -> articles;
any other source is decided per document (a `` = Title = `` first line -> article, a ``Name:`` first
line -> speech, else story). A document with no usable word gets no pair.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_CLAUSE_BREAK = re.compile(r"[.,;:!?\"()\[\]\u201c\u201d\u2014\n-]+")
_WIKI_TITLE = re.compile(r"^ = [^=].* = $")
_SPEAKER = re.compile(r"^([A-Z][A-Za-z.' -]{0,40}):$")

DETERMINERS = frozenset(
    "a an the his her my your their our its this that these those some every each another "
    "thy thine mine".split()
)
_STOP = frozenset(
    """
    a an the and or but if then than so as at by for from in into of off on onto out over to up
    upon with without about above after again against all also am any are aren't around away back
    be because been before being below between both can can't cannot could couldn't did didn't do
    does doesn't doing don't down during each even ever every few first further had hadn't has
    hasn't have haven't having he he'd he'll he's her here here's hers herself him himself his how
    i i'd i'll i'm i've into is isn't it it's its itself just last least less let let's like made
    make many may me might more most much must my myself never new next no nor not now o oh ok okay
    once one only other ought our ours ourselves own really same said say says she she'd she'll
    she's should shouldn't since some soon still such sure that that's their theirs them
    themselves there there's these they they'd they'll they're they've this those though through
    thus too under until very was wasn't we we'd we'll we're we've well were weren't what what's
    when when's where where's whether which while who who's whom whose why why's will with won't
    would wouldn't yes yet you you'd you'll you're you've your yours yourself yourselves
    thou thee thy thine ye hath doth art shalt wilt dost hast ay nay tis 'tis ere hence thence
    whence wherefore hither thither sir lord good
    went go goes going gone get got gets getting come came comes coming see saw seen sees look
    looked looks looking want wanted wants find found take took give gave given know knew think
    thought tell told ask asked feel felt keep kept try tried put play played help helped love
    loved run ran walk walked jump jumped eat ate stop stopped start started turn turned call
    called named decided began started smiled laughed cried agreed nodded replied shouted
    """.split()
)
ADJECTIVES = frozenset(
    """
    little big small tiny huge large giant great old young new good bad nice kind mean happy sad
    angry scared brave shy proud silly funny pretty beautiful ugly special strong weak fast slow
    long short tall high low hot cold warm cool wet dry soft hard loud quiet bright dark shiny
    sparkly fluffy furry cute sweet yummy tasty dirty clean fancy magic magical favorite
    favourite best whole same other own real wild busy lazy sleepy hungry thirsty tired red blue
    green yellow orange purple pink white black brown gray grey golden colorful colourful lovely
    gentle noble poor rich dear sweetest fair true false deep heavy light empty full friendly
    curious careful important different wonderful strange smart clever wise lonely jolly
    """.split()
)
GENERIC_NOUNS = frozenset(
    """
    time times day days lot lots bit way ways end thing things something anything everything
    nothing kind sort moment while idea place name part rest side top bottom front middle
    morning night today tomorrow week year years minute minutes hour hours turn
    one ones other others way mind heart eyes eye face head hand hands voice word words
    """.split()
)
# who a two-noun prompt is about ("a girl and her cat"); family words read oddly after "a"
CHARACTERS = frozenset(
    """
    girl boy man woman lady kid child baby king queen prince princess dog puppy cat kitten bird
    bunny rabbit bear fox mouse duck frog fish lion tiger monkey elephant owl pig cow horse
    """.split()
)
_EXCLUDED = _STOP | GENERIC_NOUNS | ADJECTIVES  # never a salient noun
_ING_NOUNS = frozenset(
    "king ring thing morning evening swing wing string spring building painting ceiling clothing "
    "sibling pudding wedding darling ding sling sting".split()
)
_IRREGULAR = {
    "man": "men", "woman": "women", "child": "children", "mouse": "mice", "foot": "feet",
    "tooth": "teeth", "goose": "geese", "person": "people", "leaf": "leaves", "wolf": "wolves",
    "knife": "knives", "life": "lives", "wife": "wives", "shelf": "shelves", "loaf": "loaves",
    "fish": "fish", "sheep": "sheep", "deer": "deer",
}
_SINGULAR = {plural: single for single, plural in _IRREGULAR.items() if plural != single}


# ----------------------------------------------------------------------------------------------
# word forms


def plural(word: str) -> str:
    """Simple English plural: box -> boxes, puppy -> puppies, dog -> dogs (+ a few irregulars)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


def _singular_guesses(word: str) -> list[str]:
    if word in _SINGULAR:
        return [_SINGULAR[word]]
    guesses = []
    if word.endswith("ies") and len(word) > 4:
        guesses.append(word[:-3] + "y")
    if re.search(r"(s|x|z|ch|sh)es$", word):
        guesses.append(word[:-2])
    if word.endswith("s") and not re.search(r"(ss|us|is)$", word) and len(word) > 3:
        guesses.append(word[:-1])
    return guesses


def word_forms(word: str) -> list[str]:
    """The word and its plural (or, for a word only seen in the plural, its singular guess)."""
    guesses = _singular_guesses(word)
    if guesses and (word in _SINGULAR or word.endswith("s")):  # "marshmallows": no singular in the corpus
        return [word, guesses[0]]
    return [word] if plural(word) == word else [word, plural(word)]


def _indefinite(word: str) -> str:
    vowel = word[0] in "aeiou" and not word.startswith(("uni", "use", "usu", "eu", "one", "once"))
    return ("an " if vowel or word.startswith(("hour", "honest", "honor", "heir")) else "a ") + word


# ----------------------------------------------------------------------------------------------
# salient nouns


@dataclass
class _Noun:
    word: str  # canonical (singular) form
    count: int = 0  # occurrences in the document (any form)
    first: int = 1 << 30  # position of the first occurrence, in words
    with_a: bool = False  # used with a/an: countable, "a {w}" reads naturally
    as_plural: bool = False  # used in the plural in this document
    countable: bool = False  # used with a/an here or in the plural anywhere in the corpus
    possessive: Counter = field(default_factory=Counter)  # his/her/their before it

    def phrase(self) -> str:
        """'a dog', 'flowers' or 'the sea': how the document itself refers to it."""
        if self.with_a:
            return _indefinite(self.word)
        return plural(self.word) if self.as_plural else "the " + self.word

    def about(self) -> str:
        """'dogs' or 'water' (a mass noun stays singular)."""
        return plural(self.word) if self.countable else self.word


def _clauses(text: str) -> list[list[tuple[str, bool]]]:
    """Words (lower-cased, was-capitalised) per clause; punctuation ends a noun phrase."""
    return [[(w.lower(), w[0].isupper()) for w in _WORD.findall(part)] for part in _CLAUSE_BREAK.split(text)]


def _head_after_determiner(clause: list[tuple[str, bool]], start: int) -> int | None:
    """Index of the noun a determiner at ``start - 1`` introduces, or None."""
    i = start
    while i < len(clause) and i < start + 3:
        word = clause[i][0]
        nxt = clause[i + 1][0] if i + 1 < len(clause) else None
        modifier_like = word in ADJECTIVES or (
            nxt is not None
            and nxt not in _STOP
            and (word.endswith(("ful", "less", "ous")) or (word.endswith("ing") and word not in _ING_NOUNS)
                 or (word.endswith("ed") and len(word) > 4))
        )
        if not modifier_like:
            return i
        i += 1
    return None


class _Vocabulary:
    """Word statistics over all the documents of a call: the corpus word set and document counts."""

    def __init__(self, documents: list[str]):
        self.df: Counter = Counter()
        for doc in documents:
            self.df.update({w.lower() for w in _WORD.findall(doc)})
        self.n_docs = len(documents)
        self._canonical: dict[str, str] = {}
        for word in self.df:
            guesses = [g for g in _singular_guesses(word) if g in self.df]
            if guesses:
                self._canonical[word] = guesses[0]

    def canonical(self, word: str) -> str:
        """The singular of ``word`` when the corpus uses it ("dogs" -> "dog"), else ``word``."""
        return self._canonical.get(word, word)

    def idf(self, word: str) -> float:
        df = max(self.df.get(word, 0), self.df.get(plural(word), 0), 1)
        return math.log(1.0 + self.n_docs / df)


def salient_nouns(document: str, vocab: _Vocabulary) -> list[_Noun]:
    """Candidate nouns of a document, best first (see the module docstring, step 2)."""
    nouns: dict[str, _Noun] = {}
    position = 0
    clauses = _clauses(document)
    for clause in clauses:
        for i, (word, _) in enumerate(clause[:-1]):
            if word not in DETERMINERS:
                continue
            head = _head_after_determiner(clause, i + 1)
            if head is None:
                continue
            surface = clause[head][0]
            base = vocab.canonical(surface)
            if len(base) < 3 or not base.isalpha() or base in _EXCLUDED:
                continue
            noun = nouns.setdefault(base, _Noun(base))
            noun.with_a |= word in ("a", "an")
            noun.as_plural |= surface != base
            noun.countable = noun.with_a or noun.as_plural or plural(base) in vocab.df
            if word in ("his", "her", "their"):
                noun.possessive[word] += 1
    if not nouns:
        return []
    capitalised: Counter = Counter()  # mid-clause capitals: names such as Lily or Beep
    for clause in clauses:
        for k, (word, capital) in enumerate(clause):
            base = vocab.canonical(word)
            noun = nouns.get(base)
            if noun is not None:
                noun.count += 1
                noun.first = min(noun.first, position)
                if k > 0:  # the first word of a clause is capitalised anyway
                    capitalised[base] += 1 if capital else -1
            position += 1
    scored = [
        (-n.count * vocab.idf(n.word) * (1.5 if n.first < 60 else 1.0), n.first, n.word, n)
        for n in nouns.values()
        if capitalised[n.word] <= 0
    ]
    return [entry[-1] for entry in sorted(scored, key=lambda e: e[:3])]


# ----------------------------------------------------------------------------------------------
# templates


# (template name, prompt, target), or None when a document has no further pair
Made = tuple[str, str, list[str]] | None


def _story_prompts(nouns: list[_Noun], j: int, rng: random.Random, used: set[str]) -> Made:
    """The j-th pair of a story: about its j-th noun."""
    if j >= len(nouns):
        return None
    noun = nouns[j]
    w = noun.word
    others = [n for n in nouns if n is not noun]
    by_count = sorted(others, key=lambda n: (-n.count, n.first, n.word))
    character = next((n for n in by_count if n.word in CHARACTERS), None)
    options = {
        "story_about": (4, f"Write a story about {noun.phrase()}"),
        "tell_story": (3, f"Tell me a story about {noun.phrase()}"),
        "short_story": (2, f"Write a short story about {noun.phrase()}"),
        "can_you": (1, f"Can you write a story about {noun.phrase()}?"),
        "story_with": (2, f"A story with {noun.phrase()}"),
        "write_about": (3, f"Write about {noun.about()}"),
        "describe": (2, f"Describe the {plural(w) if noun.as_plural and not noun.with_a else w}"),
        "topic": (1, noun.about() if rng.random() < 0.5 else w),
    }
    if len(others) >= 2:
        words = [w] + [n.word for n in others[:2]]
        rng.shuffle(words)
        options["keywords"] = (3, "Words: " + ", ".join(words))
    if character is not None and character.word != w:
        owner = noun.possessive.most_common(1)[0][0] if noun.possessive else None
        obj = f"{owner} {w}" if owner in ("his", "her") else noun.phrase()
        options["character_and"] = (3, f"Tell me a story about {_indefinite(character.word)} and {obj}")
    name = _draw(options, rng, used)
    prompt = options[name][1]
    if name == "keywords":
        target = [f for word in prompt[len("Words: "):].split(", ") for f in word_forms(word)]
    else:
        target = word_forms(w)
    return name, _casual(prompt, rng), target


# A description names what the document's noun does or is, in the document's own words, and not the
# noun: "Write a story about something that was swimming in the deep blue sea" -> whale. Pairs like
# these are the only training signal for prompts that imply their topic (the implied-topic family).
_DESCRIBED_PEOPLE = frozenset("girl boy man woman lady kid child baby king queen prince princess mom dad person "
                              "mother father friend teacher farmer doctor".split())
_VERB_LIKE = frozenset("was had could can would will liked loved wanted ran flew swam ate sat saw made "
                       "fell grew sang drank took gave found felt lived sat swam dug hid".split())
_DESCRIBED_WORDS = 9  # at most this many words of the clause after the noun


def described_clue(document: str, noun: str) -> str | None:
    """What ``noun`` does or is in ``document`` ("hopped away to find its friend"), or None.

    The clause after a determiner + (one modifier +) the noun, starting at a verb-like word, up to
    the clause's end; kept only when it holds a content word and never names the noun.
    """
    forms = {f.lower() for f in word_forms(noun)}
    for clause in _clauses(document):
        words = [w for w, _ in clause]
        for i, word in enumerate(words):
            if word not in forms or i == 0:
                continue
            before = words[i - 1] if words[i - 1] in DETERMINERS else words[i - 2] if i >= 2 else ""
            if before not in DETERMINERS:
                continue
            tail = words[i + 1 : i + 1 + _DESCRIBED_WORDS]
            if not tail or tail[0] in ("named", "called") or not (
                    tail[0] in _VERB_LIKE or (tail[0].endswith("ed") and len(tail[0]) > 3)):
                continue
            while len(tail) > 1 and tail[-1] in _STOP:  # "... and gave her the" -> "... and gave her"
                tail = tail[:-1]
            if forms & {w.split("'")[0] for w in tail} or not any(w not in _STOP and len(w) > 2 for w in tail[1:]):
                continue
            shown = [w.capitalize() if clause[i + 1 + k][1] else w for k, w in enumerate(tail)]  # names keep capitals
            return " ".join(shown)
    return None


def _described_prompt(document: str, nouns: list[_Noun], rng: random.Random) -> Made:
    """A pair about the document's most salient noun, described and not named."""
    for noun in nouns[:3]:
        clue = described_clue(document, noun.word)
        if clue is None:
            continue
        who = "someone who" if noun.word in _DESCRIBED_PEOPLE else "something that"
        options = {
            "write": (3, f"Write a story about {who} {clue}"),
            "tell": (2, f"Tell me a story about {who} {clue}"),
            "short": (1, f"A short story about {who} {clue}"),
        }
        name = _draw(options, rng, set())
        return "described", _casual(options[name][1], rng), word_forms(noun.word)
    return None


def _speech_prompts(speaker: str, nouns: list[_Noun], j: int, rng: random.Random, used: set[str]) -> Made:
    shown = _display_name(speaker)
    if j >= max(1, len(nouns)):
        return None
    named = shown.lower() not in _STOP  # "All", "Both": not a name, and no check at all
    options: dict[str, tuple[int, str]] = {}
    if named:
        options["speech_by"] = (2, f"Write a speech by {shown}")
    if nouns:
        noun = nouns[j]
        if named:
            options["speech_by_about"] = (3, f"Write a speech by {shown} about the {noun.word}")
        options["speech_about"] = (3, f"Write a speech about {noun.about()}")
        options["lines_about"] = (2, f"Write lines about the {noun.word}")
        if len(nouns) >= 3:
            words = [noun.word] + [n.word for n in nouns if n is not noun][:2]
            rng.shuffle(words)
            options["keywords"] = (2, "Words: " + ", ".join(words))
    if not options:
        return None
    name = _draw(options, rng, used)
    prompt = options[name][1]
    if name == "speech_by":
        target = [shown]
    elif name == "keywords":
        target = [f for word in prompt[len("Words: "):].split(", ") for f in word_forms(word)]
    else:
        target = word_forms(nouns[j].word)
    return name, _casual(prompt, rng), target


def _article_prompts(title: str, j: int, rng: random.Random, used: set[str]) -> Made:
    target = title_words(title)
    if not target:
        return None
    options = {
        "article_about": (3, f"Write about {title}"),
        "article": (3, f"Write an article about {title}"),
        "tell_about": (2, f"Tell me about {title}"),
        "describe": (2, f"Describe {title}"),
        "wikipedia": (1, f"Write a Wikipedia article about {title}"),
        "topic": (1, title),
    }
    if j >= len(options):
        return None
    name = _draw(options, rng, used)
    return name, _casual(options[name][1], rng, lower_ok=False), target


def _draw(options: dict[str, tuple[int, str]], rng: random.Random, used: set[str]) -> str:
    """A template name by weight, avoiding templates this document already used."""
    names = [n for n in options if n not in used] or list(options)
    name = rng.choices(names, weights=[options[n][0] for n in names])[0]
    used.add(name)
    return name


def _casual(prompt: str, rng: random.Random, lower_ok: bool = True) -> str:
    """Users do not always capitalise or punctuate: vary both a little, deterministically."""
    if lower_ok and rng.random() < 0.25:
        prompt = prompt[0].lower() + prompt[1:]
    if not prompt.endswith("?") and rng.random() < 0.3:
        prompt += "."
    return prompt


def _display_name(speaker: str) -> str:
    """'KING RICHARD III' -> 'King Richard III'; 'First Citizen' unchanged."""
    words = []
    for w in speaker.split():
        words.append(w if re.fullmatch(r"[IVX]+", w) or not w.isupper() else w.capitalize())
    return " ".join(words)


def detokenize_title(title: str) -> str:
    """WikiText spacing -> natural spacing: "Gambia women 's" -> "Gambia women's", "( 1861 )" -> "(1861)"."""
    title = re.sub(r" ('s|'|n't|'re|'ve|'ll|'d|'m)(?=\s|$)", r"\1", title)
    title = re.sub(r"\( ", "(", title)
    title = re.sub(r" ([),.;:!?])", r"\1", title)
    return title.strip()


def title_words(title: str) -> list[str]:
    """The main words of a title: not stop words, not numbers or punctuation."""
    words = []
    for token in re.findall(r"[\w][\w.'-]*", title):
        token = token.strip(".'-")
        if token.endswith("'s"):
            token = token[:-2]
        if not re.search(r"[A-Za-z]", token) or token.lower() in _STOP or len(token) < 2:
            continue
        if len(token) < 3 and not token.isupper():
            continue
        if token not in words:
            words.append(token)
    return words


# ----------------------------------------------------------------------------------------------
# public API


def document_style(document: str, source: str) -> str:
    """'story', 'speech' or 'article' (see the module docstring, source selection)."""
    fixed = {"tinystories": "story", "shakespeare": "speech", "wikitext2": "article"}
    if source in fixed:
        return fixed[source]
    first = document.split("\n", 1)[0]
    if _WIKI_TITLE.match(first) or _WIKI_TITLE.match(" " + first.strip() + " "):
        return "article"
    if _SPEAKER.match(first.strip()) and "\n" in document:
        return "speech"
    return "story"


def build_pairs(documents: list[str], source: str, seed: int, max_pairs_per_document: int = 1,
                described: bool = False) -> list[dict]:
    """Deterministic prompt/text pairs (contract keys: prompt, text, target, template).

    ``described``: a story also gives one pair that describes its noun without naming it
    (template ``story/described``), after its other pairs and drawn with its own random stream, so
    the other pairs are the same with or without it.
    """
    vocab = _Vocabulary(documents)
    pairs = []
    for index, document in enumerate(documents):
        rng = random.Random(f"{seed}:{source}:{index}")
        style = document_style(document, source)
        used: set[str] = set()
        head, _, rest = document.partition("\n")
        if style == "article":
            title = detokenize_title(head.strip().strip("=").strip())
        elif style == "speech":
            speaker = head.strip().rstrip(":").strip()
            nouns = salient_nouns(rest, vocab)
        else:
            nouns = salient_nouns(document, vocab)
        for j in range(max_pairs_per_document):
            if style == "article":
                made = _article_prompts(title, j, rng, used)
            elif style == "speech":
                made = _speech_prompts(speaker, nouns, j, rng, used)
            else:
                made = _story_prompts(nouns, j, rng, used)
            if made is None:
                break
            name, prompt, target = made
            template = f"{style}/{name}"
            pairs.append({"prompt": prompt, "text": document, "target": target, "template": template})
        if described and style == "story":
            made = _described_prompt(document, nouns, random.Random(f"{seed}:{source}:{index}:described"))
            if made is not None:
                name, prompt, target = made
                pairs.append({"prompt": prompt, "text": document, "target": target, "template": f"story/{name}"})
    return pairs


def spread_over_documents(pairs: list[dict], n: int) -> list[dict]:
    """The first ``n`` pairs, taking every document's first pair before any document's second.

    With ``max_pairs_per_document`` > 1 a document's pairs sit together, so the first n pairs would
    cover only n/k held-out documents (and their stories); adherence is a claim about prompts on
    unseen documents, so it is measured on as many documents as the sample count allows. With one
    pair per document this is simply ``pairs[:n]``. A document is recognised by its text.
    """
    rank: dict[str, int] = {}
    order = []
    for i, pair in enumerate(pairs):
        j = rank.get(pair["text"], 0)
        rank[pair["text"]] = j + 1
        order.append((j, i))
    return [pairs[i] for _, i in sorted(order)[:n]]


def adherent(sample: str, target: list[str]) -> bool:
    """True when any target word or phrase occurs in ``sample`` as a whole word, ignoring case."""
    for word in target:
        pattern = r"\s+".join(re.escape(part) for part in word.split())
        if pattern and re.search(rf"(?<!\w){pattern}(?!\w)", sample, re.IGNORECASE):
            return True
    return False
