"""Corpus loading: the bundled corpora's boundaries, local files and folders, hf: sources, errors."""

from __future__ import annotations

import json
import lzma
import time
from pathlib import Path

import pytest

from sunfish.data.corpora import (
    BUILTIN_FILES,
    CorpusError,
    is_wikitext_title,
    load_documents,
    split_eos,
    split_wikitext,
)

CORPORA = Path(__file__).resolve().parents[1] / "data" / "corpora"


# ----------------------------------------------------------------------------------------------
# bundled corpora


HEAD, EXTRA = BUILTIN_FILES["tinystories"]


@pytest.fixture(scope="module")
def tinystories() -> list[str]:
    return load_documents("tinystories", CORPORA)


def test_tinystories_split_on_delimiter_lines(tinystories):
    docs = tinystories
    assert len(docs) == 2000 + 6017  # the two bundled files share no story
    assert len(set(docs)) == len(docs)
    assert docs[0].startswith("One day, a little girl named Lily found a needle in her room.")
    assert all(d == d.strip() and d for d in docs)
    assert not any("<|endoftext|>" in d for d in docs)


def test_tinystories_reads_the_head_file_then_the_extra_file(tinystories):
    head = split_eos(lzma.open(CORPORA / HEAD, "rt", encoding="utf-8").read())
    extra = split_eos(lzma.open(CORPORA / EXTRA, "rt", encoding="utf-8").read())
    assert (len(head), len(extra)) == (2000, 6017)
    assert tinystories == head + extra
    assert tinystories[2000].startswith("Lily was a princess who loved to jump.")
    assert load_documents("tinystories", CORPORA) == tinystories  # fixed order


def _fake_tinystories(root: Path, head: str | None, extra: str | None) -> Path:
    for name, text in ((HEAD, head), (EXTRA, extra)):
        if text is not None:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            with lzma.open(root / name, "wt", encoding="utf-8") as fh:
                fh.write(text)
    return root


def test_tinystories_drops_exact_duplicates_keeping_the_first(tmp_path):
    root = _fake_tinystories(
        tmp_path,
        "story a\n<|endoftext|>\n\nstory b\n<|endoftext|>\n",
        "\nstory c\n<|endoftext|>\n story a \n<|endoftext|>\n"
        "story b.\n<|endoftext|>\nstory c\n<|endoftext|>\n",
    )
    assert load_documents("tinystories", root) == ["story a", "story b", "story c", "story b."]
    assert load_documents("tinystories", root, max_documents=3) == ["story a", "story b", "story c"]


@pytest.mark.parametrize("missing", [HEAD, EXTRA])
def test_tinystories_missing_either_file_names_it(tmp_path, missing):
    text = "one\n<|endoftext|>\ntwo\n<|endoftext|>\n"
    root = _fake_tinystories(tmp_path, None if missing == HEAD else text, None if missing == EXTRA else text)
    with pytest.raises(CorpusError, match="tinystories.*not found") as info:
        load_documents("tinystories", root)
    assert str(root / missing) in str(info.value) and "git checkout -- data/corpora" in str(info.value)
    # also when the first file alone would give max_documents: every file is checked first
    with pytest.raises(CorpusError, match="not found"):
        load_documents("tinystories", root, max_documents=1)


def test_tinystories_loads_fast(tinystories):
    started = time.perf_counter()
    load_documents("tinystories", CORPORA)
    assert time.perf_counter() - started < 5  # about 0.3 s: decompressing 6.8 MB and splitting it


def test_shakespeare_speech_blocks():
    docs = load_documents("shakespeare", CORPORA)
    assert len(docs) == 7222
    assert docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    assert docs[1] == "All:\nSpeak, speak."
    assert all("\n\n" not in d and d.split("\n", 1)[0].endswith(":") for d in docs)


def test_wikitext_articles_titles_and_markers():
    docs = load_documents("wikitext2", CORPORA)
    assert len(docs) == 51
    titles = [d.split("\n", 1)[0] for d in docs]
    assert titles[0] == " = Valkyria Chronicles III = "
    assert titles[-1] == " = Mortimer Wheeler = "
    assert all(is_wikitext_title(t) for t in titles)
    # the table legends of the Columbus Blue Jackets article stay inside that article
    hockey = next(d for d in docs if d.startswith(" = 2011 – 12 Columbus Blue Jackets season = "))
    assert " = Goals ; A = " in hockey.split("\n")
    joined = "\n".join(docs)
    assert "@-@" not in joined and "@,@" not in joined and "@.@" not in joined
    assert "role-playing" in docs[0]


def test_wikitext_split_rules():
    first = " = A = \n body a \n = = Section = = \n more a \n = Goals ; A = "
    text = first + "\n = B = \n 1 @,@ 000 @-@ x 3 @.@ 5 \n"
    assert split_wikitext(text) == [first, " = B = \n 1,000-x 3.5 "]


def test_max_documents_keeps_the_first(tinystories):
    for n in (5, 2000, 2001, 3000):
        assert load_documents("tinystories", CORPORA, max_documents=n) == tinystories[:n]


def test_missing_bundled_file_names_path(tmp_path):
    with pytest.raises(CorpusError, match="tinystories.*not found"):
        load_documents("tinystories", tmp_path)


# ----------------------------------------------------------------------------------------------
# local paths


def test_txt_with_eos_lines(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("first story\nline two\n<|endoftext|>\n\nsecond\n\nstory\n<|endoftext|>\n", encoding="utf-8")
    assert load_documents(str(f), tmp_path) == ["first story\nline two", "second\n\nstory"]


def test_txt_with_blank_lines_and_xz(tmp_path):
    text = "para one\nstill one\n\n\npara two\n  \npara three\n"
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    with lzma.open(tmp_path / "c.txt.xz", "wt", encoding="utf-8") as fh:
        fh.write(text)
    expected = ["para one\nstill one", "para two", "para three"]
    assert load_documents(str(tmp_path / "c.txt"), tmp_path) == expected
    assert load_documents(str(tmp_path / "c.txt.xz"), tmp_path) == expected


def test_folder_reads_sorted_txt_files(tmp_path):
    (tmp_path / "b.txt").write_text("b1\n\nb2", encoding="utf-8")
    (tmp_path / "a.txt").write_text("a1\n<|endoftext|>\na2 <|endoftext|> inline\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_documents(str(tmp_path), tmp_path) == ["a1", "a2 <|endoftext|> inline", "b1", "b2"]


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"", r"empty"),
        (b"  \n\n ", r"empty"),
        (b"text\x00\x01binary", r"binary.*offset 4"),
        (b"caf\xe9 au lait\n\nsecond", r"not UTF-8.*0xe9 at offset 3"),
        (b"only one document\nwith two lines", r"1 document"),
    ],
)
def test_bad_files_raise_with_file_name(tmp_path, content, pattern):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(CorpusError, match=pattern) as info:
        load_documents(str(f), tmp_path)
    assert "bad.txt" in str(info.value) or "document" in str(info.value)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(CorpusError, match="does not exist.*tinystories"):
        load_documents(str(tmp_path / "nope.txt"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=r"no \*\.txt"):
        load_documents(str(tmp_path / "empty"), tmp_path)


def test_corrupt_xz(tmp_path):
    (tmp_path / "c.txt.xz").write_bytes(b"not xz at all")
    with pytest.raises(CorpusError, match="c.txt.xz.*xz"):
        load_documents(str(tmp_path / "c.txt.xz"), tmp_path)


def test_corpus_error_is_value_error():
    assert issubclass(CorpusError, ValueError)


# ----------------------------------------------------------------------------------------------
# hf: sources (local folders only; the hub is never contacted)


@pytest.fixture
def hf_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"text": f"story number {i}", "id": i} for i in range(5)] + [{"text": "   ", "id": 5}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def test_hf_local_folder(hf_folder, tmp_path):
    docs = load_documents(f"hf:{hf_folder}", tmp_path)
    assert docs == [f"story number {i}" for i in range(5)]  # the blank row is dropped
    two = load_documents(f"hf:{hf_folder}", tmp_path, max_documents=2)
    assert two == ["story number 0", "story number 1"]


def test_hf_wikitext_rows_become_articles(hf_folder, tmp_path):
    folder = tmp_path / "my-wikitext"
    folder.mkdir()
    rows = ["", " = First = \n", "", " Body one @-@ two . \n", " = = Part = = \n", " More . \n", " = Second = \n",
            " Body . \n"]
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    docs = load_documents(f"hf:{folder}", tmp_path)
    assert docs == [" = First = \n\n Body one-two . \n = = Part = = \n More . ", " = Second = \n Body . "]


def test_hf_bad_field_and_split(hf_folder, tmp_path):
    with pytest.raises(CorpusError, match=r"no column 'body'.*hf_text_field.*'text'"):
        load_documents(f"hf:{hf_folder}", tmp_path, hf_text_field="body")
    with pytest.raises(CorpusError, match=r"id.*not text"):
        load_documents(f"hf:{hf_folder}", tmp_path, hf_text_field="id")
    with pytest.raises(CorpusError, match=r"split 'validation'"):
        load_documents(f"hf:{hf_folder}", tmp_path, hf_split="validation")


def test_hf_unknown_dataset_offline_is_clear_and_fast(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = datasets.config.HF_HUB_OFFLINE
    started = time.perf_counter()
    with pytest.raises(CorpusError) as info:
        load_documents("hf:sunfish-test/no-such-dataset", tmp_path)
    assert time.perf_counter() - started < 10
    message = str(info.value)
    assert "sunfish-test/no-such-dataset" in message
    assert "HF_DATASETS_OFFLINE" in message and "local path" in message and "tinystories" in message
    assert datasets.config.HF_HUB_OFFLINE == before  # the temporary offline switch is undone


def test_hf_needs_a_name(tmp_path):
    with pytest.raises(CorpusError, match="after hf:"):
        load_documents("hf:", tmp_path)
