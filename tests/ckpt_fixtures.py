"""Tiny real checkpoints (staged and diffusion) and a fake project tree, shared by the reliability tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sunfish.data.tokenizer import train_bpe
from sunfish.models.denoiser import DiffusionConfig, DiffusionLM
from sunfish.models.staged import StagedLM, StagedLMConfig
from sunfish.training.checkpoint import DIGEST_KEY, save_checkpoint

TEXT = ["Once upon a time there was a little dog. The dog liked to play in the park with a red ball."] * 8


def make_tokenizer(directory: Path) -> Path:
    tok = train_bpe(TEXT, vocab_size=300, min_frequency=1)
    path = directory / "tokenizer.json"
    tok.save(path)
    return path


def staged_model(vocab: int, seq: int = 32) -> StagedLM:
    torch.manual_seed(0)
    return StagedLM(StagedLMConfig(vocab_size=vocab, n_layer=1, n_head=2, d_model=32, d_ff=64, max_seq_len=seq))


def diffusion_model(vocab: int, seq: int = 16) -> DiffusionLM:
    torch.manual_seed(0)
    return DiffusionLM(DiffusionConfig(vocab_size=vocab, n_layer=1, n_head=2, d_model=32, d_ff=64, max_seq_len=seq,
                                       prompt_encoder_layers=1, max_prompt_tokens=8, timesteps=20))


def build_checkpoints(directory: Path) -> dict[str, Path]:
    """{"tokenizer", "staged", "diffusion"}: a tokenizer file and a final checkpoint of each kind."""
    from sunfish.data.tokenizer import TextTokenizer

    tok_file = make_tokenizer(directory)
    vocab = TextTokenizer.load(tok_file).vocab_size
    staged = save_checkpoint(directory / "stage_0" / "final", staged_model(vocab), model_name="stage_0", step=3,
                             tokenizer_file=tok_file)
    diffusion = save_checkpoint(directory / "cfg" / "final", diffusion_model(vocab), model_name="cfg", step=3,
                                tokenizer_file=tok_file)
    return {"tokenizer": tok_file, "staged": staged, "diffusion": diffusion}


def make_format_0(checkpoint: Path) -> Path:
    """Turn a checkpoint into format version 0: config.json without format_version and weights digest."""
    cfg = checkpoint / "config.json"
    meta = json.loads(cfg.read_text())
    meta.pop("format_version")
    meta.pop(DIGEST_KEY)
    cfg.write_text(json.dumps(meta, indent=2))
    return checkpoint


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (relative path -> digest): what "untouched" means."""
    out = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = "(absent)"
            continue
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def flip_bit_in_tensor_data(file: Path) -> None:
    """Flip one bit in the middle of the tensor bytes (past the JSON header): safetensors has no checksum."""
    data = bytearray(file.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    position = header + (len(data) - header) // 2
    data[position] ^= 0x10
    file.write_bytes(bytes(data))
