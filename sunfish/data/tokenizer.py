"""Byte-level BPE tokenizer: one small wrapper over ``tokenizers.Tokenizer`` used by every model.

Byte-level BPE never needs an unknown token: any Unicode text is a byte string, every byte is in
the initial alphabet, so ``decode(encode(text)) == text`` always holds (there is no normaliser and
no prefix space). The original SunFish clipped GPT-2 ids into an 8192-word embedding, merging every
rare token into one; training BPE to the model's vocabulary size removes that failure.

Special tokens: ``<|endoftext|>`` (id 0) ends every document and is the eos; ``<|pad|>`` (id 1)
pads pair batches. The saved ``tokenizer.json`` is the plain Hugging Face format, so
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)`` loads it and encodes identically.
"""

from __future__ import annotations

import json

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # what transformers reads for the special tokens
MAX_VOCAB = 65535  # token ids are stored as uint16; the config caps vocab_size at the same value
# names other tokenizers use for their eos / pad, tried in order when a tokenizer.json is loaded
_EOS_NAMES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
_PAD_NAMES = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")


class TextTokenizer:
    """Text <-> token ids with known ``eos_id`` and ``pad_id`` (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, eos_id: int | None = None, pad_id: int | None = None):
        self.tokenizer = tokenizer
        self.eos_id = _find_special(tokenizer, _EOS_NAMES, "eos") if eos_id is None else int(eos_id)
        if pad_id is None:
            pad_id = _find_special(tokenizer, _PAD_NAMES, None)
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        if self.vocab_size > MAX_VOCAB:
            raise ValueError(
                f"tokenizer vocabulary has {self.vocab_size} entries; token files store uint16 ids, "
                f"so at most {MAX_VOCAB} are allowed; pick a tokenizer with a smaller vocabulary or use "
                "tokenizer.kind: bpe"
            )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, prompt: str) -> list[int]:
        """A diffusion prompt's ids: tokenised after a space, as its words would be inside a text.

        Byte-level BPE gives a word a different token at the start of a string ("cobweb" -> c ob w
        eb) than after a space (" cobweb" -> " co" b w eb, as in the stories). The denoiser's copy
        head can only copy tokens the text uses, so a bare topic must get the in-text tokens. An
        empty prompt stays empty (the null prompt).
        """
        return self.encode_prompt_batch([prompt])[0]

    def encode_prompt_batch(self, prompts: Sequence[str]) -> list[list[int]]:
        spaced = [" " + p.lstrip() if p.strip() else "" for p in prompts]
        return self.encode_batch(spaced)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (the Rust side runs them in parallel)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text; keeps ``<|endoftext|>`` etc. unless ``skip_special_tokens`` (exact round trip).

        A sampled sequence can hold half of a multi-byte character (a model that drew one byte token
        of a curly quote but not the other); the byte-level decoder renders those bytes as U+FFFD.
        Such dangling bytes are dropped instead: the text a reader sees has no replacement marks
        that no training text contained, while the bytes of valid text (a real U+FFFD included)
        decode exactly as before.
        """
        ids = [int(i) for i in ids]
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if "\ufffd" not in text or not isinstance(self.tokenizer.decoder, decoders.ByteLevel):
            return text
        return self._decode_bytes(ids, skip_special_tokens)

    def _decode_bytes(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Byte-level decoding by hand: the tokens' bytes joined, invalid UTF-8 sequences dropped."""
        table = _unicode_to_byte()
        added = self.tokenizer.get_added_tokens_decoder()
        out = bytearray()
        for i in ids:
            if i in added:
                if not (skip_special_tokens and added[i].special):
                    out += added[i].content.encode("utf-8")
                continue
            token = self.tokenizer.id_to_token(i)
            if token is not None:
                out += bytes(table[c] for c in token if c in table)
        return out.decode("utf-8", errors="ignore")

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))

    def hf_config(self, model_max_length: int | None = None) -> dict:
        """The tokenizer_config.json that lets ``transformers.AutoTokenizer`` load this tokenizer.json
        with its eos and pad tokens (without it they come back None)."""
        eos, pad = self.tokenizer.id_to_token(self.eos_id), self.tokenizer.id_to_token(self.pad_id)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
                  "pad_token": pad, "add_prefix_space": False, "clean_up_tokenization_spaces": False}
        if model_max_length:
            config["model_max_length"] = int(model_max_length)
        return config

    def save_hf_config(self, directory: str | Path, model_max_length: int | None = None) -> Path:
        """Write tokenizer_config.json into ``directory`` (beside its tokenizer.json); returns its path."""
        path = Path(directory) / HF_TOKENIZER_CONFIG
        path.write_text(json.dumps(self.hf_config(model_max_length), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path, eos_id: int | None = None, pad_id: int | None = None) -> TextTokenizer:
        """Load a tokenizer.json; eos/pad are found by token name unless given (meta.json has them)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {path} not found; run the prepare stage (dvc repro prepare)"
            )
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception for malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json ({exc})") from None
        return cls(tokenizer, eos_id, pad_id)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"


def _unicode_to_byte() -> dict[str, int]:
    """The byte-level alphabet's character -> byte (GPT-2's table: printable bytes map to themselves,
    the rest to the characters from U+0100 on, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _find_special(tokenizer: Tokenizer, names: Sequence[str], role: str | None) -> int | None:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    if role is None:
        return None
    raise ValueError(
        f"the tokenizer has none of the {role} tokens {list(names)}; pass {role}_id explicitly"
    )


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE on ``texts`` (deterministic for the same input and settings).

    ``vocab_size`` counts the 2 special tokens and the 256 byte symbols; a small corpus may stop
    short of it (no pair left with ``min_frequency``), so read ``vocab_size`` back from the result.
    """
    if not 258 < vocab_size <= MAX_VOCAB:
        raise ValueError(
            f"vocab_size {vocab_size} must be in 259..{MAX_VOCAB} (256 bytes + 2 specials + merges)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    result = TextTokenizer(tokenizer)
    assert (result.eos_id, result.pad_id) == (0, 1), "special tokens must come first"
    log.info("trained byte-level BPE: %d tokens (asked %d)", result.vocab_size, vocab_size)
    return result


def from_pretrained(name_or_path: str) -> TextTokenizer:
    """A pretrained tokenizer (hub name or local folder) through ``transformers.AutoTokenizer``.

    Only fast (Rust-backed) tokenizers with ids below 65536 are accepted; pad falls back to eos
    (as for GPT-2). When the hub is unreachable only the local cache is consulted, so an offline
    machine fails in a second with a clear message instead of retrying for half a minute.
    """
    from sunfish.data.corpora import hub_unreachable

    local = Path(name_or_path).expanduser().exists()
    offline = not local and hub_unreachable()
    try:
        from transformers import AutoTokenizer  # lazy: transformers takes seconds to import

        hf_tok = AutoTokenizer.from_pretrained(
            str(Path(name_or_path).expanduser()) if local else name_or_path, local_files_only=offline
        )
    except Exception as exc:  # OSError, ValueError, EnvironmentError, ... depending on the failure
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "the hub is unreachable or offline mode is set and it is not cached; " if offline else ""
        raise ValueError(
            f"tokenizer.pretrained {name_or_path!r} cannot be loaded ({type(exc).__name__}: {reason}); "
            f"{where}give a local folder holding tokenizer.json (save_pretrained), download it where the hub "
            "is reachable, or use tokenizer.kind: bpe (trained on the corpus, no download)"
        ) from None
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"tokenizer.pretrained {name_or_path!r} has no fast (tokenizers) backend; pick a fast tokenizer"
        )
    eos_id = hf_tok.eos_token_id
    if eos_id is None:
        raise ValueError(f"tokenizer.pretrained {name_or_path!r} defines no eos token; pick one that does")
    pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else eos_id
    return TextTokenizer(backend, eos_id=eos_id, pad_id=pad_id)
