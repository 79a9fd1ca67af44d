"""The copies of artifacts and checkpoints kept next to a fallback file for its replay, and their removal.

While its store is down, a run keeps a copy of each artifact it logs and of each checkpoint it was
to register under ``<fallback dir>/artifacts/<run>/<uuid>-<name>`` (see
:class:`sunfish.tracking.offline.FallbackWriter`): the originals may be gone or rebuilt by the time
``sunfish tracking sync`` runs. Once the sync is done with a record, its copy only takes space (a
checkpoint can be gigabytes), so :func:`remove_kept_copies` deletes it. Nothing here imports the
rest of :mod:`sunfish.tracking`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KEPT_DIR = "artifacts"  # next to the fallback files: <fallback dir>/artifacts/<run id or local id>/


def remove_kept_copies(path: Path, done: Iterable[dict[str, Any]],
                       pending: Iterable[dict[str, Any]] = ()) -> tuple[int, int]:
    """Delete the copies kept for the ``done`` records of fallback file ``path``; returns how many,
    and the bytes that freed on disk.

    ``done`` are the records of the archive (sent, refused as invalid, or skipped for good), which a
    sync never replays again; the copies of ``pending`` records (put back after a failed sync) stay,
    as the next sync needs them. Only paths inside a run's folder under ``<fallback dir>/artifacts/``
    are touched: a record may also name the original artifact (when no copy could be made), which
    is the user's. A run folder left empty goes too. A hard-linked file (a checkpoint's) frees space
    only when its original is gone as well, so such files are not counted as freed.
    """
    root = os.path.realpath(path.parent / KEPT_DIR)
    needed = {p for r in pending for p in _kept_paths(r)}
    removed, freed, folders = 0, 0, set()
    for record in done:
        for name in _kept_paths(record):
            inside = os.path.relpath(name, root).split(os.sep)
            if (name in needed or len(inside) < 2 or inside[0] in ("..", ".") or os.path.islink(name)
                    or not os.path.exists(name)):
                continue
            size = sum(st.st_size for st in _file_stats(name) if st.st_nlink == 1)
            try:
                shutil.rmtree(name) if os.path.isdir(name) else os.unlink(name)
            except OSError as exc:
                log.warning("%s: could not remove the kept copy %s (%s)", path, name, exc)
                continue
            removed, freed = removed + 1, freed + size
            folders.add(os.path.dirname(name))
    for folder in folders:
        try:
            os.rmdir(folder)  # only when empty: the copies of records still waiting stay
        except OSError:
            pass
    if removed:
        log.info("%s: removed %d kept cop%s of synced records, %.1f MB freed", path, removed,
                 "y" if removed == 1 else "ies", freed / 1e6)
    return removed, freed


def _kept_paths(record: dict[str, Any]) -> list[str]:
    """The kept copies a record names (resolved: the check against the kept folder must not be fooled
    by ``..`` or a symlinked parent)."""
    paths = [os.path.abspath(p) for p in (record.get("artifact"), (record.get("register") or {}).get("checkpoint"))
             if isinstance(p, str) and p]
    return [os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p)) for p in paths]


def _file_stats(path: str) -> list[os.stat_result]:
    if not os.path.isdir(path):
        return [os.lstat(path)]
    return [os.lstat(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files]
