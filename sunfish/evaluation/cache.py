"""A per-checkpoint cache of evaluation results, so a new milestone does not redo the old ones.

DVC deletes a stage's outputs before it reruns the stage, so evaluation results cannot live in
reports/: the cache sits outside every DVC output (``state/eval_cache/`` by default). Each entry is
one JSON file named by a digest of

- the checkpoint's ``weights_sha256`` (from its config.json, so the weights are identified without
  being read), and
- every setting that changes the result: the evaluation parameters, the diffusion sampling
  parameters, a digest of the validation data and the corpus the text measures use, the source of
  the code that computes the figures, and for judge figures the judge's identity.

Any change to one of them gives another file name, so a stale result can never be returned; old
files are simply no longer read. Writes are atomic (temporary file, rename): a killed evaluation
leaves either the whole entry or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["EvalCache", "digest", "file_digest", "source_digest"]

# Bump when the structure of a cached entry changes in a way the code digest does not capture.
CACHE_FORMAT = 1


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(*parts: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``parts``; dict key order does not matter."""
    return hashlib.sha256(_canonical([CACHE_FORMAT, *parts]).encode("utf-8")).hexdigest()


def file_digest(paths: Iterable[str | Path], chunk: int = 1 << 20) -> str:
    """One sha256 over the contents of ``paths`` (missing files count as absent, by name)."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        h.update(path.name.encode("utf-8") + b"\0")
        if not path.is_file():
            h.update(b"<missing>\0")
            continue
        with path.open("rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def source_digest(paths: Iterable[str | Path]) -> str:
    """Digest of the Python source under ``paths`` (files or folders), so a code change is a new key."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(p.rglob("*.py")))
        elif p.is_file():
            files.append(p)
    return file_digest(files)


class EvalCache:
    """JSON results under ``directory/<digest>.json``; ``hits`` and ``misses`` count lookups.

    ``directory=None`` disables the cache (every lookup misses, nothing is written).
    """

    def __init__(self, directory: str | Path | None):
        self.directory = Path(directory) if directory is not None else None
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.json"

    def get(self, key: str) -> Any | None:
        path = self.path(key)
        if path is None or not path.is_file():
            self.misses += 1
            return None
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:  # a damaged entry is recomputed, never trusted
            log.warning("ignoring unreadable evaluation cache entry %s (%s)", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: Any) -> None:
        path = self.path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(value, allow_nan=True, default=str))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, True) from the cache, or (compute(), False) after storing it."""
        value = self.get(key)
        if value is not None:
            return value, True
        value = compute()
        self.put(key, value)
        return value, False


def settings_digest(settings: Mapping[str, Any]) -> str:
    """Digest of a settings mapping (the part of a cache key that is not the weights)."""
    return digest(dict(settings))
