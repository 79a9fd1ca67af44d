"""Corpus sources: turn ``data.source`` into a list of documents (plain strings).

A *document* is the unit that the train/validation split keeps whole and that prompt/text pairs are
built from, so each source is cut where its own format puts boundaries:

- ``tinystories``: stories separated by a line that is exactly ``<|endoftext|>``; each is stripped.
  Two bundled files are read in a fixed order, the first 2,000 train stories and then 6,017 more
  (8,017 in all); a story that repeats an earlier one exactly would be dropped (there are none).
- ``shakespeare``: speech blocks (``Speaker:`` line + lines) separated by blank lines.
- ``wikitext2``: articles. A title line matches ``^ = [^=].* = $`` (lines containing `` ; `` are
  table legends, not titles); an article is its title line plus every line up to the next title.
  Lines are kept verbatim (with their leading and trailing space) except that the ``@-@``, ``@,@``
  and ``@.@`` markers are undone (`` @-@ `` -> ``-`` etc.): they are an artefact of WikiText's
  tokenisation that would otherwise cost every number and hyphenated word three extra tokens.
- ``hf:<name>[:<config>]``: ``datasets.load_dataset(name, config, split=hf_split)[hf_text_field]``,
  one non-empty row per document; ``name`` may be a local data set folder (e.g. one holding
  train.jsonl). Data sets whose name contains "wikitext" store one line per row, so their rows are
  joined and cut into articles as above.
- anything else is a local path: a ``.txt`` (or ``.txt.xz``) file, cut on ``<|endoftext|>`` lines
  when it has any and on blank lines otherwise, or a folder whose ``*.txt``/``*.txt.xz`` files
  (sorted by name) are each cut that way.

Every failure is a :class:`CorpusError` that names the file or source and says what to do, because
the prepare stage is the first thing a new user runs and a traceback there explains nothing.
"""

from __future__ import annotations

import contextlib
import logging
import lzma
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from sunfish.errors import CorpusError

log = logging.getLogger(__name__)

EOS_LINE = "<|endoftext|>"

#: builtin source name -> its files under ``corpora_dir``, read in this order and concatenated
#: (``tinystories``: the first 2,000 train stories, then 6,017 more, so ``max_documents`` <= 2000
#: still gives exactly the head of the train file)
BUILTIN_FILES: dict[str, tuple[str, ...]] = {
    "tinystories": (
        "tinystories/TinyStories-train.head2000.txt.xz",
        "tinystories/TinyStories-extra6017.txt.xz",
    ),
    "shakespeare": ("tinyshakespeare/input.txt.xz",),
    "wikitext2": ("wikitext-2-raw/wiki.train.head58.raw.xz",),
}

_WIKI_TITLE = re.compile(r"^ = [^=].* = $")
_WIKI_MARKERS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")
_EOS_SPLIT = re.compile(r"^[ \t]*<\|endoftext\|>[ \t]*$", re.MULTILINE)


# ----------------------------------------------------------------------------------------------
# public entry point


def load_documents(
    source: str,
    corpora_dir: Path,
    *,
    hf_split: str = "train",
    hf_text_field: str = "text",
    max_documents: int | None = None,
) -> list[str]:
    """Load the documents of ``source`` (see the module docstring), keeping the first ``max_documents``."""
    source = source.strip()
    if source in BUILTIN_FILES:
        docs = _load_builtin(source, Path(corpora_dir), max_documents)
    elif source.startswith("hf:"):
        docs = _load_hf(source, hf_split, hf_text_field, max_documents)
    else:
        docs = _load_path(Path(source).expanduser())
    if max_documents is not None:
        docs = docs[:max_documents]
    if len(docs) < 2:
        raise CorpusError(
            f"corpus {source!r} has {len(docs)} document(s); at least 2 are needed so that training "
            "and validation each get one. Separate documents with blank lines or <|endoftext|> lines, "
            "or raise data.max_documents"
        )
    log.info("loaded %d documents from %s", len(docs), source)
    return docs


def _load_builtin(source: str, corpora_dir: Path, max_documents: int | None = None) -> list[str]:
    """A bundled corpus: its files in BUILTIN_FILES order, exact duplicate documents dropped.

    Every file is checked before any is read, so a missing second file fails as fast and as
    clearly as a missing first one. For a corpus of several files, a document that repeats an
    earlier one (same text after stripping) is dropped, keeping the first (the two TinyStories
    files have none). A single-file corpus is kept as it is: Shakespeare repeats short speech
    blocks (a bare "GLOUCESTER:" 18 times) that are real, separate documents. With
    ``max_documents``, later files are read only when the earlier ones hold too few documents.
    """
    paths = [corpora_dir / name for name in BUILTIN_FILES[source]]
    for path in paths:
        if not path.is_file():
            raise CorpusError(
                f"bundled corpus {source!r} not found at {path}; restore data/corpora from the "
                "repository (git checkout -- data/corpora) or point corpora_dir at it"
            )
    splitters = {"tinystories": split_eos, "shakespeare": split_blank_lines, "wikitext2": split_wikitext}
    splitter = splitters[source]
    if len(paths) == 1:
        return splitter(_read_text(paths[0]))
    docs: list[str] = []
    seen: set[str] = set()
    for path in paths:
        if max_documents is not None and len(docs) >= max_documents:
            break
        for doc in splitter(_read_text(path)):
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


# ----------------------------------------------------------------------------------------------
# splitting a text into documents


def split_eos(text: str) -> list[str]:
    """Documents separated by ``<|endoftext|>`` lines, stripped, empties dropped."""
    return [d.strip() for d in _EOS_SPLIT.split(text) if d.strip()]


def split_blank_lines(text: str) -> list[str]:
    """Documents separated by one or more blank lines (Shakespeare's speech blocks)."""
    return [d.strip() for d in _BLANK_LINES.split(text.replace("\r\n", "\n")) if d.strip()]


def split_wikitext(text: str) -> list[str]:
    """WikiText articles: title line + body lines, markers undone (see the module docstring)."""
    for marker, plain in _WIKI_MARKERS:
        text = text.replace(marker, plain)
    articles: list[list[str]] = []
    for line in text.split("\n"):
        if is_wikitext_title(line):
            articles.append([line])
        elif articles:
            articles[-1].append(line)
        elif line.strip():
            articles.append([line])  # text before the first title is kept as its own document
    return ["\n".join(lines).rstrip("\n") for lines in articles if "".join(lines).strip()]


def is_wikitext_title(line: str) -> bool:
    """A top-level WikiText heading (`` = Title = ``), not a table legend such as `` = Goals ; A = ``."""
    return bool(_WIKI_TITLE.match(line)) and " ; " not in line


def split_plain(text: str) -> list[str]:
    """A user's text: on ``<|endoftext|>`` lines when it has any, else on blank lines."""
    return split_eos(text) if _EOS_SPLIT.search(text) else split_blank_lines(text)


# ----------------------------------------------------------------------------------------------
# local files


def _read_text(path: Path) -> str:
    """Read a UTF-8 text file (``.xz`` decompressed), rejecting empty, binary and non-UTF-8 files."""
    try:
        if path.suffix == ".xz":
            with lzma.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except lzma.LZMAError as exc:
        raise CorpusError(
            f"{path}: not a valid .xz file ({exc}); recompress it with `xz -9` or give the .txt"
        ) from None
    except OSError as exc:
        raise CorpusError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not raw.strip():
        raise CorpusError(f"{path}: the file is empty; give a text file with at least 2 documents")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise CorpusError(
            f"{path}: looks like a binary file (NUL byte at offset {nul}); give UTF-8 text (.txt)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start} cannot be "
            f"decoded); convert it, e.g. `iconv -f latin1 -t utf-8 {path.name}`"
        ) from None
    return text.removeprefix("\ufeff")


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".txt", ".txt.xz")))


def _load_path(path: Path) -> list[str]:
    if not path.exists():
        raise CorpusError(
            f"data source {str(path)!r} does not exist; use tinystories, shakespeare, wikitext2, "
            "hf:<name>[:<config>], or the path of a .txt file or a folder of .txt files"
        )
    if path.is_dir():
        files = _text_files(path)
        if not files:
            raise CorpusError(f"folder {path} holds no *.txt files; put the corpus in .txt files there")
        return [doc for f in files for doc in split_plain(_read_text(f))]
    return split_plain(_read_text(path))


# ----------------------------------------------------------------------------------------------
# Hugging Face data sets


def hub_unreachable(timeout: float = 3.0) -> bool:
    """True when the hub should not be contacted: offline mode is set or its host cannot be reached.

    ``datasets`` and ``transformers`` retry an unreachable hub for about 20 s before failing; a
    3-second TCP probe lets us go straight to the local cache instead. Behind a proxy the probe
    would be wrong, so it is skipped there.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return False
    except OSError:
        return True


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """Temporarily switch ``datasets``/``huggingface_hub`` to offline mode (cache only).

    Both libraries read the setting from module constants at call time, so patching them works even
    after import (setting the environment variable would not).
    """
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _parse_hf(source: str) -> tuple[str, str | None]:
    rest = source[len("hf:"):]
    name, _, config = rest.partition(":")
    if not name:
        raise CorpusError(
            f"data source {source!r}: give a data set after hf:, e.g. hf:roneneldan/TinyStories"
        )
    return name, (config or None)


def _load_hf(source: str, split: str, field: str, max_documents: int | None) -> list[str]:
    name, config = _parse_hf(source)
    local = Path(name).expanduser().exists()
    offline = not local and hub_unreachable()
    try:
        import datasets  # lazy: importing datasets takes about a second

        with _offline_mode() if offline else contextlib.nullcontext():
            ds = datasets.load_dataset(str(Path(name).expanduser()) if local else name, config, split=split)
    except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = (
            "the Hugging Face hub is unreachable or offline mode is set (HF_HUB_OFFLINE / "
            "HF_DATASETS_OFFLINE) and the data set is not in the local cache"
            if offline
            else "check the data set name, data.hf_split and the config"
        )
        raise CorpusError(
            f"data source {source!r}: cannot load split {split!r} ({type(exc).__name__}: {reason}); {where}. "
            "Remedies: use a local path (hf:/path/to/folder with train.jsonl, or a .txt file/folder), "
            "download the data set where the hub is reachable, or use a bundled corpus "
            "(tinystories, shakespeare, wikitext2)"
        ) from None
    if field not in ds.column_names:
        raise CorpusError(
            f"data source {source!r}: split {split!r} has no column {field!r}; set data.hf_text_field "
            f"to one of {ds.column_names}"
        )
    if "wikitext" in name.lower():
        # WikiText rows are lines, not articles: rebuild the text and cut it like the bundled file
        rows = _text_column(ds, source, field, None, strip=False)
        lines = [row if row.endswith("\n") else row + "\n" for row in rows]
        return split_wikitext("".join(lines))
    return _text_column(ds, source, field, max_documents, strip=True)


def _text_column(ds, source: str, field: str, max_documents: int | None, strip: bool) -> list[str]:
    """The non-empty strings of a column, reading batches only until ``max_documents`` are found."""
    values: list[str] = []
    for batch in ds.select_columns([field]).iter(batch_size=1000):
        for value in batch[field]:
            if not isinstance(value, str):
                raise CorpusError(
                    f"data source {source!r}: column {field!r} holds {type(value).__name__}, not text; "
                    "set data.hf_text_field to a text column"
                )
            if value.strip() or not strip:
                values.append(value.strip() if strip else value)
        if max_documents is not None and len(values) >= max_documents:
            break
    return values
