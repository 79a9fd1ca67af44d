"""Byte-level BPE: special ids, exact round trip, determinism, file format, pretrained loading."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models

from sunfish.data.corpora import load_documents
from sunfish.data.tokenizer import TextTokenizer, from_pretrained, train_bpe

CORPORA = Path(__file__).resolve().parents[1] / "data" / "corpora"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return load_documents("tinystories", CORPORA, max_documents=200)


@pytest.fixture(scope="module")
def tok(texts) -> TextTokenizer:
    return train_bpe(texts, vocab_size=600, min_frequency=2)


def test_special_tokens_and_vocab(tok):
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    assert tok.tokenizer.id_to_token(0) == "<|endoftext|>" and tok.tokenizer.id_to_token(1) == "<|pad|>"
    assert tok.vocab_size == 600
    assert tok.encode("<|endoftext|>") == [0]
    # the corpus is compressed: a story costs far fewer tokens than bytes
    story = "Once upon a time, there was a little girl named Lily."
    assert len(tok.encode(story)) < len(story.encode()) / 2


@settings(max_examples=150, deadline=None, database=None)
@given(st.text(max_size=200))
def test_round_trip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    "text",
    ["", " leading space", "tabs\tand\nnewlines\r\n", "日本語と emoji 🐟🐠", "a<|endoftext|>b <|pad|>",
     "\x00\x7f\ud7ff"],
)
def test_round_trip_edge_cases(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_unseen_bytes_are_still_encodable(tok):
    ids = tok.encode("ẞ€")
    assert ids and max(ids) < tok.vocab_size


def test_decode_can_drop_special_tokens(tok):
    ids = tok.encode("hi") + [tok.eos_id, tok.pad_id]
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.decode(ids) == "hi<|endoftext|><|pad|>"


def test_encode_batch_matches_encode(tok, texts):
    assert tok.encode_batch(texts[:5]) == [tok.encode(t) for t in texts[:5]]


def test_training_is_deterministic(texts, tok):
    again = train_bpe(texts, vocab_size=600, min_frequency=2)
    assert again.tokenizer.to_str() == tok.tokenizer.to_str()


def test_small_corpus_stops_short_of_vocab_size():
    small = train_bpe(["ab ab ab", "cd cd"], vocab_size=5000, min_frequency=2)
    assert 258 <= small.vocab_size < 5000


def test_bad_vocab_size():
    with pytest.raises(ValueError, match="vocab_size 70000"):
        train_bpe(["a b"], vocab_size=70000, min_frequency=1)


def test_save_load_and_transformers_agree(tok, texts, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = TextTokenizer.load(path)
    assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id) == (tok.vocab_size, 0, 1)
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in texts[:20] + ["héllo 🐟 <|endoftext|>"]:
        assert fast.encode(text, add_special_tokens=False) == tok.encode(text) == loaded.encode(text)
        assert fast.decode(tok.encode(text)) == text


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare"):
        TextTokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        TextTokenizer.load(tmp_path / "bad.json")


def test_rejects_vocabulary_beyond_uint16():
    vocab = {f"w{i}": i for i in range(65536)}
    big = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    with pytest.raises(ValueError, match="uint16"):
        TextTokenizer(big, eos_id=0, pad_id=0)


def test_from_pretrained_local_folder(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok.tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(tmp_path / "pre")
    loaded = from_pretrained(str(tmp_path / "pre"))
    assert loaded.eos_id == 0 and loaded.pad_id == 0  # no pad token: pad falls back to eos
    assert loaded.encode("Once upon a time") == tok.encode("Once upon a time")


def test_from_pretrained_offline_unknown_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"sunfish-test/no-such-tokenizer.*tokenizer.kind: bpe"):
        from_pretrained("sunfish-test/no-such-tokenizer")


def test_training_is_deterministic_across_processes(tok):
    """The Rust trainer uses hash maps seeded per process; the merges must not depend on them."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from sunfish.data.corpora import load_documents; "
        "from sunfish.data.tokenizer import train_bpe; "
        f"d = load_documents('tinystories', Path({str(CORPORA)!r}), max_documents=200); "
        "sys.stdout.write(train_bpe(d, vocab_size=600, min_frequency=2).tokenizer.to_str())"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout == tok.tokenizer.to_str()


def test_prompts_are_tokenised_as_their_words_appear_inside_a_text(tok):
    # a bare topic gets the tokens the stories use for the word, so the copy head can copy them
    assert tok.encode_prompt("dog") == tok.encode(" dog")
    assert tok.encode_prompt("  Write about dogs") == tok.encode(" Write about dogs")
    assert tok.encode_prompt("") == [] and tok.encode_prompt("   ") == []  # still the null prompt
    assert tok.encode_prompt_batch(["dog", ""]) == [tok.encode(" dog"), []]


def test_autotokenizer_loads_eos_and_pad_from_a_checkpoint(tok, texts, tmp_path):
    """A checkpoint folder is a Hugging Face tokenizer folder: AutoTokenizer finds eos and pad."""
    import warnings

    from transformers import AutoTokenizer

    from sunfish.training.checkpoint import save_checkpoint
    from tests.ckpt_fixtures import staged_model

    tok.save(tmp_path / "tokenizer.json")
    out = save_checkpoint(tmp_path / "ckpt", staged_model(tok.vocab_size, seq=32), model_name="stage_0", step=1,
                          tokenizer_file=tmp_path / "tokenizer.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoTokenizer.from_pretrained(str(out))
    assert (hf.eos_token, hf.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_id, tok.pad_id) == (0, 1)
    assert hf.model_max_length == 32
    for text in texts[:10] + ["héllo 🐟"]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text
    # without the config file the special tokens are unknown to transformers: the file is what does it
    (out / "tokenizer_config.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert AutoTokenizer.from_pretrained(str(out)).eos_token is None


def test_decode_drops_dangling_bytes_of_a_half_drawn_character_only():
    from sunfish.data.tokenizer import train_bpe

    tok = train_bpe(["plain ascii stories about a dog and a cat"] * 20, vocab_size=300, min_frequency=1)
    text = "a \u201cdog\u201d \U0001F600 cat"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # valid text: exact round trip
    quote = tok.encode("\u201c")
    assert len(quote) > 1  # a rare character is several byte tokens here
    half = tok.encode("a ") + quote[:1] + tok.encode("dog")
    assert tok.tokenizer.decode(half) != "a dog" and "\ufffd" in tok.tokenizer.decode(half)
    assert tok.decode(half) == "a dog"  # the dangling byte is dropped, no U+FFFD
    real = tok.encode("a \ufffd b")
    assert tok.decode(real) == "a \ufffd b"  # a real replacement character survives
    assert tok.decode(half + [tok.eos_id]) == "a dog<|endoftext|>"
    assert tok.decode(half + [tok.eos_id], skip_special_tokens=True) == "a dog"
