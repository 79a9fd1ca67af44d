"""The local fallback of MLflow logging: its JSONL format, safe appends, and replay (`sunfish tracking sync`).

When the tracking store cannot be reached, :class:`sunfish.tracking.runs.StageRun` appends every record
(through :class:`FallbackWriter`) to ``<repo>/state/mlflow_fallback/<stage>.jsonl``, one JSON object
per line::

    {"run_id": "...", "time": 1700000000.0, "uri": "http://...", "stage": "train_stage_0",
     "experiment": "sunfish", "metrics": [["train/loss", 2.31, 120, 1700000000123], ...]}

Each metric is ``[key, value, step, timestamp_ms]`` (the timestamp is when it was logged, so a
replay is idempotent: MLflow drops a metric it already holds). Other records carry ``params``,
``tags``, ``artifact`` (a copy kept next to the file, original path in ``source``), ``status``
with ``end_time`` (the run's end) or ``register``: a model registration the store could not take
(``model``, ``step``, ``weights_sha256``, ``alias``, and ``checkpoint``, a copy of the checkpoint's
files kept next to the file; see :meth:`sunfish.tracking.runs.StageRun.keep_registration`). A run
that could not even be created has ``run_id: null`` and a ``local_id``; :func:`sync_fallback`
creates one run per local id. Records that MLflow refused as invalid (``rejected``, with its reason;
when a run logs them, or at a sync: then only the refused part) are kept for reference and not
replayed. Once a sync is done with a record, the copy it kept is deleted
(:func:`sunfish.tracking.kept.remove_kept_copies`).

Registering is the model registry's business (:mod:`sunfish.model_registry`, which imports this
package), so the replay of ``register`` records is a handler passed in: ``sync_file(path,
register=...)``; `sunfish tracking sync` passes :func:`sunfish.model_registry.replay_registration`.

Several processes may append to one file (queued experiments of the same stage): appends take an
``flock`` and write each batch with one ``write``; replay renames the file away under that lock
first, so nothing appended during a sync is lost.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sunfish.tracking.kept import KEPT_DIR, remove_kept_copies
from sunfish.tracking.store import (
    artifact_location,
    bound_http_retries,
    fcntl,
    is_rejection,
    missing_store,
    open_client,
    repo_root,
    tracking_uri,
    with_retry,
)

log = logging.getLogger(__name__)

FALLBACK_DIR = Path("state") / "mlflow_fallback"

# Replays a "register" record: (client, run id, the record's "register" fields) -> the registered
# version, or None when the record is to be skipped (the handler says why).
RegisterHandler = Callable[[Any, str, dict[str, Any]], str | None]


class SyncError(RuntimeError):
    """A fallback file could not be replayed (completely)."""


# -- writing --------------------------------------------------------------------------------------
def append_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records as JSON lines, atomically with respect to other writers and to a sync."""
    data = "".join(json.dumps(r, default=str) + "\n" for r in records).encode()
    if not data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(20):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            if not _same_file(fd, path):  # a sync renamed it away while we waited: reopen
                continue
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            return
        finally:
            os.close(fd)  # also releases the lock
    raise OSError(f"could not append to {path}: it keeps being replaced")


class FallbackWriter:
    """Appends the records of one run to its fallback file, in the format above, and counts them.

    Records come as :class:`sunfish.tracking.runs.StageRun` holds them, ``(kind, payload)``:
    ``metrics`` [(key, value, timestamp_ms, step), ...] (consecutive ones become one record),
    ``params`` / ``tags`` (dicts), ``parent_metrics`` (parent run id, metrics: written under the
    parent's id), ``artifact`` (path, artifact_path: a copy is kept next to the file), ``end``
    (status, end_time). Callers hold :attr:`lock` around :meth:`write`, so that records claimed
    first are written first.
    """

    def __init__(self, path: Path, *, run_id: str | None, uri: str, stage: str,
                 experiment: str | None = None, local_id: str | None = None):
        self.path = Path(path)
        self.run_id, self.uri, self.stage = run_id, uri, stage
        self.experiment, self.local_id = experiment, local_id
        self.lock = threading.Lock()
        self.records = 0  # JSONL records written
        self.metrics = 0  # metric values among them (rejected ones aside)
        self.rejected = 0  # records MLflow refused as invalid

    def write(self, ops: list[tuple[str, Any]], rejected: str | None = None) -> None:
        """Append ``ops`` (marked ``rejected`` with MLflow's reason when given). Never raises: a
        file that cannot be written is logged as an error with the records it would have held."""
        records: list[dict[str, Any]] = []
        metrics: list[list[Any]] = []
        n_metrics = 0
        for op in ops:
            if op[0] == "metrics":
                metrics.extend([k, v, step, ts] for (k, v, ts, step) in op[1])
                continue
            if metrics:
                records.append(self.record(metrics=metrics))
                n_metrics, metrics = n_metrics + len(metrics), []
            records.append(self.record(**self._fields(op)))
            if op[0] == "parent_metrics":
                n_metrics += len(op[1][1])
        if metrics:
            records.append(self.record(metrics=metrics))
            n_metrics += len(metrics)
        if not records:
            return
        if rejected:
            for r in records:
                r["rejected"] = rejected
        try:
            append_records(self.path, records)
        except OSError as exc:  # the last resort failed too: say so loudly, never raise into training
            log.error("could not keep %d MLflow records in %s (%s); they are lost: %s",
                      len(records), self.path, exc, records)
            return
        self.records += len(records)
        if rejected:
            self.rejected += len(records)
        else:
            self.metrics += n_metrics

    def keep_registration(self, *, model: str, step: int, weights_sha256: str, checkpoint: Path,
                          files: Iterable[str], alias: str) -> Path:
        """Link (or copy) the checkpoint's ``files`` into :meth:`kept_folder` and append a ``register``
        record naming that copy (see :meth:`sunfish.tracking.runs.StageRun.keep_registration`)."""
        folder = self.kept_folder() / f"{uuid.uuid4().hex[:8]}-{model}-{checkpoint.name}"
        try:
            folder.mkdir(parents=True)
            for name in files:
                if (checkpoint / name).is_file():
                    try:
                        os.link(checkpoint / name, folder / name)
                    except OSError:
                        shutil.copy2(checkpoint / name, folder / name)
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        record = self.record(register={"model": model, "step": int(step), "weights_sha256": weights_sha256,
                                       "alias": alias, "checkpoint": str(folder), "source": str(checkpoint),
                                       "kept_at": time.time()})
        with self.lock:
            try:
                append_records(self.path, [record])
            except OSError:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            self.records += 1
        return folder

    def record(self, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = {"run_id": self.run_id, "time": time.time(), "uri": self.uri, "stage": self.stage}
        if self.experiment:
            record["experiment"] = self.experiment
        if self.local_id:
            record["local_id"] = self.local_id
        record.update(fields)
        return record

    def _fields(self, op: tuple[str, Any]) -> dict[str, Any]:
        kind, payload = op
        if kind == "params":
            return {"params": payload}
        if kind == "tags":
            return {"tags": payload}
        if kind == "end":
            return {"status": payload[0], "end_time": payload[1]}
        if kind == "parent_metrics":  # replayed into the parent run by `sunfish tracking sync`
            parent, items = payload
            return {"run_id": parent, "metrics": [[k, v, step, ts] for (k, v, ts, step) in items]}
        path, artifact_path = payload
        return {"artifact": self._keep_artifact(Path(path)), "source": path, "artifact_path": artifact_path}

    def _keep_artifact(self, path: Path) -> str:
        """Copy an artifact next to the fallback file: its original may live in a DVC queue
        workspace that is deleted when the experiment ends."""
        dest = self.kept_folder() / f"{uuid.uuid4().hex[:8]}-{path.name}"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, dest)
            else:
                shutil.copy2(path, dest)
        except OSError as exc:
            log.warning("could not keep a copy of artifact %s (%s); recording its path only", path, exc)
            return str(path)
        return str(dest)

    def kept_folder(self) -> Path:
        """Where copies of this run's artifacts and checkpoints are kept for the replay."""
        return self.path.parent / KEPT_DIR / (self.run_id or self.local_id)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def fallback_files(root: Path) -> list[Path]:
    return sorted((root / FALLBACK_DIR).glob("*.jsonl"))


def project_root(fallback_file: Path) -> Path:
    """The project a fallback file belongs to: ``<root>/state/mlflow_fallback/<stage>.jsonl``."""
    folder = fallback_file.resolve().parent
    if folder.parts[-2:] == FALLBACK_DIR.parts:
        return folder.parent.parent
    return repo_root(folder)


# -- replay ---------------------------------------------------------------------------------------
@dataclass
class SyncResult:
    path: Path
    records: int = 0  # JSONL records sent
    metrics: int = 0  # metric values among them
    skipped: int = 0  # rejected (before or now; a refused part counts too), unreadable, or copy gone
    registrations: int = 0  # "register" records among those sent: model versions registered
    kept_removed: int = 0  # kept artifact and checkpoint copies deleted once their records were done
    freed_bytes: int = 0  # disk space that freed (hard links to files still in place aside)
    uris: set[str] = field(default_factory=set)
    moved_to: Path | None = None


def sync_fallback(path: str | Path, uri: str | None = None, register: RegisterHandler | None = None) -> int:
    """Re-send a fallback file's records to their runs; returns how many records were sent.

    ``uri`` overrides the tracking URI recorded with each record. ``register`` replays the file's
    model registrations (see :data:`RegisterHandler`); a file that holds one needs it. On success
    the file is renamed to ``<name>.synced-<timestamp>``. What MLflow refuses as invalid is marked
    ``rejected`` there and skipped (see :meth:`_Replayer.replay`); a store that fails stops the sync:
    the records not yet sent go back into ``path`` with their kept copies and :class:`SyncError` is
    raised; running it again resumes. The copies kept for the records archived are deleted.
    """
    return sync_file(Path(path), uri, register=register).records


def sync_file(path: Path, uri: str | None = None, register: RegisterHandler | None = None) -> SyncResult:
    if not path.is_file():
        raise FileNotFoundError(f"no fallback file {path}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = path.with_name(f"{path.name}.syncing-{stamp}")
    lines = _take(path, work)
    result = SyncResult(path)
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash mid-write
            log.warning("%s:%d is not a JSON record; skipped", path, number)
            result.skipped += 1

    if register is None and any(r.get("register") and not r.get("rejected") for r in records):
        append_records(path, records)
        work.unlink()
        raise SyncError(
            f"{path} holds model registrations, and no register handler was given to replay them "
            "(sync_file(..., register=sunfish.model_registry.replay_registration), which `sunfish tracking "
            f"sync` passes); nothing was sent, the records are back in {path}"
        )
    bound_http_retries()
    replayer = _Replayer(uri, path, register)
    done: list[dict[str, Any]] = []  # the archive's records: sent, refused (marked) or skipped for good
    for i, record in enumerate(records):
        try:
            sent = replayer.replay(record)
        except Exception as exc:
            replayer.name_created_runs(records[i:])  # a second sync must not create them again
            append_records(path, records[i:])
            where = ""
            if i:
                _rewrite(work, done)
                where = f"; the {i} sent are in {_archive(work, path, stamp)}"
                remove_kept_copies(path, done, pending=records[i:])
            else:
                work.unlink()
            raise SyncError(
                f"{path}: sent {i} of {len(records)} records to {replayer.last_uri}, then failed: {exc}. "
                f"The rest are back in {path}{where}; run `sunfish tracking sync` again when the store is up"
            ) from exc
        done.append(record)
        if sent:
            result.records += 1
            result.metrics += len(record.get("metrics") or ())
            result.registrations += bool(record.get("register"))
        else:
            result.skipped += 1
        if replayer.refused is not None:  # the part MLflow refused, after the part it took
            done.append(replayer.refused)
            result.skipped += 1
    if replayer.rejected:  # the archive says which were refused, as the run's own file does
        _rewrite(work, done)
    result.uris = replayer.uris
    result.moved_to = _archive(work, path, stamp)
    result.kept_removed, result.freed_bytes = remove_kept_copies(path, done)
    return result


def _take(path: Path, work: Path) -> list[str]:
    """Rename ``path`` to ``work`` under the writers' lock and return its lines."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(path, work)
        with os.fdopen(os.dup(fd), "r", encoding="utf-8", errors="replace") as fh:
            return fh.read().splitlines()
    finally:
        os.close(fd)


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, default=str) + "\n" for r in records), encoding="utf-8")


def _archive(work: Path, path: Path, stamp: str) -> Path:
    target = path.with_name(f"{path.name}.synced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.synced-{stamp}-{n}")
    os.replace(work, target)
    return target


# the fields of a record that make up one part of it, sent (or refused) as a whole
_FIELDS = {"artifact": ("artifact", "source", "artifact_path"), "status": ("status", "end_time"),
           "register": ("register",)}
# MLflow's limits of one log_batch call (mlflow.utils.validation): values per call, by kind
_BATCH = {"metrics": 1000, "params": 100, "tags": 100}


def _send(client, run_id: str, kind: str, items: list[Any]) -> None:
    for i in range(0, len(items), _BATCH[kind]):
        with_retry(client.log_batch, run_id, **{kind: items[i : i + _BATCH[kind]]}, synchronous=True)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


class _Replayer:
    def __init__(self, uri: str | None, path: Path, register: RegisterHandler | None = None):
        self.uri = uri
        self.path = path
        self.register = register
        self.rejected = 0  # records MLflow refused (some of) during this sync (marked "rejected")
        self.refused: dict[str, Any] | None = None  # the refused part of the record just replayed, if not all
        self.clients: dict[str, Any] = {}
        self.created: dict[tuple[str, str], str] = {}  # (uri, local_id) -> run id made by this sync
        self.uris: set[str] = set()
        self.last_uri: str | None = uri

    def client(self, uri: str):
        if uri not in self.clients:
            self.clients[uri] = open_client(uri)
        return self.clients[uri]

    def target_uri(self, record: dict[str, Any]) -> str:
        if self.uri:
            return self.uri
        if record.get("uri"):
            return record["uri"]
        return tracking_uri(project_root(self.path))

    def replay(self, record: dict[str, Any]) -> bool:
        """Send one record; False when nothing of it was sent (refused now or before, artifact gone).

        Each kind of data in the record (metrics, params, tags, artifact, end, registration) is sent
        on its own, and a batch MLflow refuses as invalid is sent again key by key: a refusal is
        about one key (a param whose value changed, a bad name), and its neighbours must not be lost
        with it. Only what MLflow refused is marked ``rejected``: the whole record when nothing of it
        was taken, else the refused part is moved into a record of its own (:attr:`refused`, kept
        after this one in the archive), so the archive says exactly what never reached MLflow. The
        record is changed only once everything was tried: when the store fails midway, it goes back
        whole, and sending its accepted part again adds nothing.
        """
        from mlflow.entities import Metric, Param, RunTag

        self.refused = None
        if record.get("rejected"):
            return False
        uri = self.last_uri = self.target_uri(record)
        gone = missing_store(uri) if record.get("run_id") and uri not in self.clients else None
        if gone is not None:  # opening it would create an empty store, which cannot hold the run
            raise SyncError(f"no MLflow store at {gone}, where run {record['run_id']} was logged; pass --uri "
                            "to name the store that holds it")
        client = self.client(uri)
        run_id = record.get("run_id") or self._created_run(client, uri, record)
        self.uris.add(uri)
        refused: dict[str, set[str]] = {}  # kind -> refused keys (empty: the whole part)
        reasons: dict[str, list[str]] = {}  # MLflow's reason -> what it refused
        sent = False
        default_ts = int(float(record.get("time") or time.time()) * 1000)
        batches = (
            ("metrics", [Metric(m[0], float(m[1]), int(m[3]) if len(m) > 3 else default_ts, int(m[2]))
                         for m in record.get("metrics") or ()]),
            ("params", [Param(k, str(v)) for k, v in (record.get("params") or {}).items()]),
            ("tags", [RunTag(k, str(v)) for k, v in (record.get("tags") or {}).items()]),
        )
        for kind, items in batches:
            if items:
                keys = self._log_batch(client, run_id, kind, items, reasons)
                if keys:
                    refused[kind] = keys
                sent |= len(keys) < len({i.key for i in items})
        if record.get("artifact"):
            local = Path(record["artifact"])
            if not local.exists():
                log.warning("%s: artifact %s no longer exists; skipped", self.path, local)
            else:
                method = client.log_artifacts if local.is_dir() else client.log_artifact
                sent |= self._whole("artifact", refused, reasons, with_retry, method, run_id, str(local),
                                    record.get("artifact_path"))
        if record.get("status"):
            sent |= self._whole("status", refused, reasons, with_retry, client.set_terminated, run_id,
                                record["status"], record.get("end_time"))
        if record.get("register"):
            sent |= self._whole("register", refused, reasons, self._register, client, run_id, record,
                                label=f"the registration of model {record['register'].get('model')}")
        if refused:
            self._mark_refused(record, run_id, refused, reasons, whole=not sent)
        return sent

    def _log_batch(self, client, run_id: str, kind: str, items: list[Any], reasons: dict[str, list[str]]) -> set[str]:
        """Log ``items`` (metrics, params or tags); returns the keys MLflow refused as invalid."""
        try:
            _send(client, run_id, kind, items)
            return set()
        except Exception as exc:
            if not is_rejection(exc):
                raise
        by_key: dict[str, list[Any]] = {}
        for item in items:
            by_key.setdefault(item.key, []).append(item)
        refused = set()
        for key, group in by_key.items():
            try:
                _send(client, run_id, kind, group)
            except Exception as exc:
                if not is_rejection(exc):
                    raise
                refused.add(key)
                reasons.setdefault(_first_line(exc), []).append(f"{kind} {key}")
        return refused

    @staticmethod
    def _whole(kind: str, refused: dict[str, set[str]], reasons: dict[str, list[str]], fn, *args,
               label: str | None = None) -> bool:
        """``fn(*args)``; False when it returns False (skipped) or MLflow refuses it as invalid."""
        try:
            return fn(*args) is not False
        except Exception as exc:
            if not is_rejection(exc):
                raise
            refused[kind] = set()
            reasons.setdefault(_first_line(exc), []).append(label or kind)
            return False

    def _mark_refused(self, record: dict[str, Any], run_id: str, refused: dict[str, set[str]],
                      reasons: dict[str, list[str]], whole: bool) -> None:
        """Refused as invalid: sending it again cannot succeed, so it must not block every later sync."""
        reason = "; ".join(f"{text} ({', '.join(what)})" for text, what in reasons.items())
        self.rejected += 1
        log.warning("%s: MLflow rejected %s of run %s (%s); skipped, kept in the archive", self.path,
                    ", ".join(w for what in reasons.values() for w in what), run_id, reason)
        if whole:
            record["rejected"] = reason
            return
        part = {k: record[k] for k in ("time", "uri", "stage", "experiment", "local_id") if k in record}
        part.update(run_id=run_id, rejected=reason)
        for kind, keys in refused.items():
            if kind == "metrics":
                part[kind] = [m for m in record[kind] if m[0] in keys]
                record[kind] = [m for m in record[kind] if m[0] not in keys]
            elif kind in ("params", "tags"):
                part[kind] = {k: v for k, v in record[kind].items() if k in keys}
                record[kind] = {k: v for k, v in record[kind].items() if k not in keys}
            else:
                for name in _FIELDS[kind]:
                    if name in record:
                        part[name] = record.pop(name)
        self.refused = part

    def _register(self, client, run_id: str, record: dict[str, Any]) -> bool:
        fields = record["register"]
        if not Path(fields.get("checkpoint") or "").is_dir():
            log.warning("%s: the kept checkpoint %s of model %s no longer exists; its registration is skipped",
                        self.path, fields.get("checkpoint"), fields.get("model"))
            return False
        if self.register is None:  # sync_file checks first; a caller of replay() alone may not have
            raise SyncError(f"{self.path}: a model registration needs a register handler to be replayed")
        return self.register(client, run_id, fields) is not None

    def name_created_runs(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            key = (self.target_uri(record), record.get("local_id") or f"{self.path.name}:unknown")
            if not record.get("run_id") and key in self.created:
                record["run_id"] = self.created[key]

    def _created_run(self, client, uri: str, record: dict[str, Any]) -> str:
        """The run for records whose stage could not create one (store down from the start)."""
        local_id = record.get("local_id") or f"{self.path.name}:unknown"
        key = (uri, local_id)
        if key not in self.created:
            name = record.get("experiment") or "sunfish"
            exp = with_retry(client.get_experiment_by_name, name)
            if exp is not None:
                exp_id = exp.experiment_id
            else:
                location = artifact_location(project_root(self.path))
                exp_id = with_retry(client.create_experiment, name, artifact_location=location)
            stage = record.get("stage") or self.path.stem
            tags = {"sunfish.stage": stage, "dvc.stage": stage, "sunfish.replayed_from": self.path.name,
                    "sunfish.local_id": local_id}
            start = int(float(record.get("time") or time.time()) * 1000)
            run = with_retry(client.create_run, exp_id, start_time=start, run_name=stage, tags=tags)
            self.created[key] = run.info.run_id
            log.info("created MLflow run %s for %s (its stage could not reach the store)",
                     run.info.run_id, local_id)
        return self.created[key]
