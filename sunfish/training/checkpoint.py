"""Checkpoints people can share: safetensors weights, JSON metadata, atomic writes, clear refusals.

A checkpoint is a directory ``<dir>/`` with ``model.safetensors``, ``config.json`` and
``tokenizer.json``, so ``sunfish sample <dir>`` needs nothing else; a diffusion checkpoint also
carries ``generation_config.json``, the sampling settings it is used with unless told otherwise
(:mod:`sunfish.config.generation`, :func:`read_generation_config`). Weights are only ever read with
safetensors (which cannot execute code); a file that is a pickle, truncated or damaged is refused
with a message naming it. safetensors has no checksum, so ``config.json`` records the sha256 of
``model.safetensors`` (``weights_sha256``) and loading verifies it: a flipped bit inside the tensor
data is reported as damage instead of producing a subtly wrong model. Directories are written to a
temporary sibling, fsynced and renamed, so an interrupted write never leaves a half checkpoint
under the final name.

Format versions: 1 (current) has ``format_version`` and, since this release, ``weights_sha256``
(a version-1 checkpoint without the digest still loads). Version 0 is the pre-release layout: a
``config.json`` with neither; ``sunfish migrate`` upgrades it (:func:`migrate_checkpoint`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sunfish.config.generation import GENERATION_CONFIG, GenerationConfig
from sunfish.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
DIGEST_KEY = "weights_sha256"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as fh:
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _dedup_shared(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """safetensors refuses tensors sharing memory (tied embeddings): keep one, record aliases."""
    seen: dict[tuple[int, int, tuple], str] = {}
    tensors: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen and tensor.numel() > 0:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, aliases


def save_checkpoint(
    directory: Path,
    model: Any,
    *,
    model_name: str,
    step: int,
    tokenizer_file: Path | None,
    extra: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
    generation_config: GenerationConfig | None = None,
) -> Path:
    """Write model weights + config (+ tokenizer, + ``extra_files`` writers) to ``directory`` atomically.

    ``generation_config``: the sampling defaults written as generation_config.json (diffusion models).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_temp_dir(directory, "tmp")
    try:
        _write_into(tmp, model, model_name=model_name, step=step, tokenizer_file=tokenizer_file,
                    extra=extra, extra_files=extra_files, generation_config=generation_config)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (disk full) leaves the old checkpoint alone
        if isinstance(exc, OSError) and exc.errno is not None:
            # name the checkpoint, not the hidden temporary file the error happened in
            reason = exc.strerror or os.strerror(exc.errno)
            kept = "its previous version is intact" if directory.exists() else "earlier checkpoints are untouched"
            raise OSError(exc.errno, f"{reason} while writing checkpoint {directory} ({kept})") from exc
        raise
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def _fresh_temp_dir(target: Path, tag: str) -> Path:
    """An empty hidden sibling of ``target`` for this process to build into, then rename over it."""
    tmp = target.with_name(f".{target.name}.{tag}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link where the filesystem allows: checkpoint files are never modified in place."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: Path, dst: Path) -> None:
    """Mirror a checkpoint directory without copying bytes where the filesystem allows (hard links).

    Checkpoints are never modified in place (every write is a new file renamed over), so a hard
    link is as safe as a copy; DVC deleting its output later only drops one name.
    """
    tmp = _fresh_temp_dir(dst, "tmp")
    for f in src.iterdir():
        if f.is_file():
            _link_or_copy(f, tmp / f.name)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _write_into(tmp: Path, model: Any, *, model_name: str, step: int, tokenizer_file: Path | None,
                extra: Mapping[str, Any] | None, extra_files: Mapping[str, Callable[[Path], None]] | None,
                generation_config: GenerationConfig | None = None) -> None:
    from safetensors.torch import save_file

    tensors, aliases = _dedup_shared(model.state_dict())
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "sunfish_format_version": str(FORMAT_VERSION)})
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": model.kind,
        "model_name": model_name,
        "step": int(step),
        "model_config": model.config.to_dict(),
        "tied_weights": aliases,
        "tokenizer": TOKENIZER if tokenizer_file else None,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **(extra or {}),
        DIGEST_KEY: sha256_file(tmp / WEIGHTS),
    }
    (tmp / CONFIG).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    if tokenizer_file:
        from sunfish.data.tokenizer import TextTokenizer

        shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
        config = model.config
        try:  # tokenizer_config.json: what transformers.AutoTokenizer needs to know eos and pad
            tok = TextTokenizer.load(tmp / TOKENIZER, eos_id=getattr(config, "eos_id", None),
                                     pad_id=getattr(config, "pad_id", None))
        except ValueError as exc:  # a tokenizer SunFish cannot read: the checkpoint is still written
            log.warning("no tokenizer_config.json in %s: %s", tmp.name, exc)
        else:
            tok.save_hf_config(tmp, getattr(config, "max_seq_len", None))
    if generation_config is not None:
        (tmp / GENERATION_CONFIG).write_text(generation_config.to_json(), encoding="utf-8")
    for name, write in (extra_files or {}).items():
        write(tmp / name)
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint directory, its model.safetensors, or a model directory (uses final/)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file():
        p = p.parent
    if not (p / CONFIG).exists() and (p / "final" / CONFIG).exists():
        p = p / "final"
    if not (p / CONFIG).exists():
        raise CheckpointError(f"{p} is not a SunFish checkpoint: no {CONFIG} (expected {WEIGHTS} + {CONFIG})")
    return p


def _version_problem(cfg_path: Path, meta: dict) -> str | None:
    """Why this SunFish cannot read a config.json's format version (None when it can)."""
    version = meta.get("format_version", 0)
    if version == FORMAT_VERSION and not isinstance(version, bool):
        return None
    if version == 0:
        return (f"{cfg_path}: checkpoint format version 0 (config.json has no format_version), this SunFish "
                f"reads version {FORMAT_VERSION}; run `sunfish migrate {cfg_path.parent}` to upgrade it "
                "(the original is kept as a .bak directory)")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        return (f"{cfg_path}: checkpoint format version {version} was written by a newer SunFish; this one reads "
                f"version {FORMAT_VERSION}: upgrade SunFish to use it")
    return (f"{cfg_path}: unknown checkpoint format version {version!r} (this SunFish reads {FORMAT_VERSION} and "
            "migrates 0); the file was not written by SunFish or was edited by hand")


def _read_config(directory: Path) -> dict:
    cfg_path = directory / CONFIG
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: not a readable JSON checkpoint config ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    return meta


def read_checkpoint_meta(path: str | Path) -> tuple[Path, dict]:
    directory = resolve_checkpoint_dir(path)
    cfg_path = directory / CONFIG
    meta = _read_config(directory)
    problem = _version_problem(cfg_path, meta)
    if problem:
        raise CheckpointError(problem)
    for key in ("kind", "model_config"):
        if key not in meta:
            raise CheckpointError(f"{cfg_path}: missing {key!r}")
    return directory, meta


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_weights(directory: Path, meta: Mapping[str, Any]) -> None:
    """Compare model.safetensors with the sha256 that config.json recorded when it was saved.

    safetensors checks its header but not the tensor bytes, so this is what catches a flipped bit,
    a partial copy or a file swapped in from another checkpoint. Checkpoints saved before the digest
    existed have none and are not checked.
    """
    expected = meta.get(DIGEST_KEY)
    if not expected:
        return
    file = Path(directory) / WEIGHTS
    if not file.exists():
        raise CheckpointError(f"{file}: missing weights file")
    actual = sha256_file(file)
    if actual != expected:
        raise CheckpointError(
            f"{file}: the file is damaged: its sha256 is {actual[:16]}..., but {CONFIG} recorded "
            f"{str(expected)[:16]}... when the checkpoint was saved (corrupted on disk or in transfer, or replaced). "
            "Copy the checkpoint again, or use an earlier one"
        )


def load_weights(file: Path) -> dict[str, Any]:
    """Read a safetensors file; anything else (a pickle, a truncated file) is refused, never executed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.exists():
        raise CheckpointError(f"{file}: missing weights file")
    if file.stat().st_size < 8:
        raise CheckpointError(f"{file}: file is empty or truncated ({file.stat().st_size} bytes)")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{file}: not a valid safetensors file ({exc}); SunFish never loads pickled weights"
        ) from None


def load_checkpoint(path: str | Path, *, expect_kind: str | None = None, device: str = "cpu"):
    """Build the model a checkpoint describes and load its weights; returns (model, meta, directory)."""
    from sunfish.models import build_model

    directory, meta = read_checkpoint_meta(path)
    if expect_kind and meta["kind"] != expect_kind:
        raise CheckpointError(
            f"{directory}: holds a {meta['kind']!r} model, but this command needs a {expect_kind!r} model"
        )
    try:
        model = build_model(meta["kind"], meta["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{directory / CONFIG}: cannot build the model it describes ({exc}); it was written for another "
            "model architecture than this SunFish builds: retrain, or use the SunFish release that wrote it"
        ) from None
    state = load_weights(directory / WEIGHTS)
    verify_weights(directory, meta)
    _check_fits(model, state, meta, directory)
    model.load_state_dict(state, strict=True)
    model.to(device)
    model.eval()
    return model, meta, directory


def _check_fits(model: Any, state: dict[str, Any], meta: Mapping[str, Any], directory: Path) -> None:
    """Weights must match the architecture config.json describes; say what differs when not."""
    for alias, source in (meta.get("tied_weights") or {}).items():
        if source in state:
            state[alias] = state[source]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            parts.append(f"shape mismatch: {'; '.join(wrong_shape[:3])}")
        raise CheckpointError(
            f"{directory / WEIGHTS}: weights do not match the architecture in {CONFIG}: " + "; ".join(parts)
            + f". The {CONFIG} describes another model than the one these weights were saved from: put back "
            "the config.json written with them (or retrain); `sunfish migrate` only upgrades the file format"
        )


def load_tokenizer_for(directory: Path, meta: dict):
    from sunfish.data.tokenizer import TextTokenizer

    name = meta.get("tokenizer") or TOKENIZER
    file = directory / name
    if not file.exists():
        raise CheckpointError(f"{directory}: no {name} next to the weights; the checkpoint cannot decode text")
    try:
        return TextTokenizer.load(file)
    except Exception as exc:
        raise CheckpointError(f"{file}: not a readable tokenizer ({exc})") from None


def read_generation_config(directory: Path | None) -> GenerationConfig:
    """The sampling defaults of the checkpoint in ``directory``: its generation_config.json.

    A checkpoint without one (saved before the file existed, or an autoregressive stage) gets the
    schema defaults of the same settings; never the settings of a params.yaml nearby. A file that is
    there but unreadable, or holds a value that is not allowed, is refused naming the file and key.
    """
    file = Path(directory) / GENERATION_CONFIG if directory is not None else None
    if file is None or not file.exists():
        return GenerationConfig()
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: not a readable JSON generation config ({exc}); delete it to sample "
                              "with the default settings") from None
    try:
        config, unknown = GenerationConfig.from_mapping(data, str(file))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if unknown:
        log.warning("%s: ignoring settings this SunFish does not know: %s", file, ", ".join(unknown))
    return config


def migrate_checkpoint(path: str | Path, output: str | Path | None = None) -> tuple[str, Path, Path | None]:
    """Upgrade a checkpoint to FORMAT_VERSION; returns (``"current"`` or ``"migrated"``, directory, backup).

    Version 0 -> 1 adds ``format_version`` and the weights digest, after checking that the weights are
    safetensors (a pickle is never converted: it could run code) and fit the architecture in
    config.json, so the digest never blesses a file that was already unusable. The result is built
    in a temporary sibling and renamed: into ``output`` (which must not exist), or over the original
    directory, which is kept as ``<dir>.bak``. Anything that cannot be migrated raises CheckpointError
    saying why, before anything is written.
    """
    from sunfish.models import build_model

    directory = resolve_checkpoint_dir(path)
    cfg_path = directory / CONFIG
    meta = _read_config(directory)
    version = meta.get("format_version", 0)
    if version == FORMAT_VERSION and not isinstance(version, bool):
        return "current", directory, None
    if version != 0:
        raise CheckpointError(f"{_version_problem(cfg_path, meta)}; `sunfish migrate` upgrades version 0 only")
    for key in ("kind", "model_config"):
        if key not in meta:
            raise CheckpointError(
                f"{cfg_path}: cannot migrate: no {key!r}; a SunFish checkpoint's config.json names its model "
                "kind and model_config, this one was not written by SunFish"
            )
    try:
        model = build_model(meta["kind"], meta["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{cfg_path}: cannot migrate: the model it describes cannot be built ({exc})") from None
    try:
        _check_fits(model, load_weights(directory / WEIGHTS), meta, directory)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot migrate: {exc}") from None

    target = Path(output) if output is not None else directory
    backup = None
    if target.resolve() == directory.resolve():
        target = directory
        backup = directory.with_name(directory.name + ".bak")
        if backup.exists():
            raise CheckpointError(f"cannot migrate in place: {backup} already exists; remove it or pass --output")
    elif target.exists():
        raise CheckpointError(f"--output {target} already exists; give a new directory")
    new_meta = {
        **meta,
        "format_version": FORMAT_VERSION,
        "migrated_from": 0,
        "migrated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        DIGEST_KEY: sha256_file(directory / WEIGHTS),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_temp_dir(target, "migrate")
    try:
        for f in directory.iterdir():
            if f.is_file() and f.name != CONFIG:
                _link_or_copy(f, tmp / f.name)
        (tmp / CONFIG).write_text(json.dumps(new_meta, indent=2, default=str), encoding="utf-8")
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        os.replace(directory, backup)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    return "migrated", target, backup


def list_milestones(model_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every milestone checkpoint under models/<model>/, sorted by step."""
    out = []
    if not model_dir.is_dir():
        return out
    for child in model_dir.iterdir():
        if child.name.startswith("step_") and (child / CONFIG).exists():
            try:
                out.append((int(child.name.split("_", 1)[1]), child))
            except ValueError:
                continue
    return sorted(out)
