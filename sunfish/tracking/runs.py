"""One MLflow run per executed stage, logged from a background thread: :class:`StageRun`.

Logging must never slow or stop training, so it is asynchronous: :meth:`StageRun.log_metrics` only
puts the values on a queue and returns. One daemon thread per run sends them with ``log_batch``
(at most 1000 metrics a call, when ~50 are pending or every ~2 s); params, tags, artifacts and the
run's end go through the same thread, in order. A SQLite store locked by another experiment is
retried with backoff. Any other failure (server down, timeout, HTTP 5xx after MLflow's own, here
bounded, retries) logs one warning naming the URI and the fallback file, and from then on every
record of the run is appended to ``<repo>/state/mlflow_fallback/<stage>.jsonl``
(:mod:`sunfish.tracking.offline`); training goes on. Closing a run waits at most ``close_timeout``
(60 s) for the queue to drain, then writes what is left to the fallback file. A model registration
the store could not take is kept there too (:meth:`StageRun.keep_registration`), for the sync to
register later.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import numbers
import os
import queue
import shutil
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sunfish.tracking.offline import append_records
from sunfish.tracking.store import is_rejection, with_retry

log = logging.getLogger(__name__)

MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
_CONTROL = ("flush", "stop")
# Runs not closed by stage_run (direct StageRun use): drained at interpreter exit.
_OPEN: weakref.WeakSet[StageRun] = weakref.WeakSet()


class StageRun:
    """One MLflow run for one executed pipeline stage, logged from a background thread.

    ``log_*`` only enqueue (metrics get their timestamp here); the worker batches and sends. On the
    first failure that is not lock contention the worker warns once and writes this and every later
    record to ``fallback_path`` (JSONL). ``client=None`` means the run could not be opened: records
    go straight to the fallback file under ``local_id``. ``enabled=False`` makes every call a no-op.
    """

    def __init__(
        self,
        client: Any | None,
        run_id: str | None,
        fallback_path: Path,
        flush_every: int = 50,
        *,
        flush_interval: float = 2.0,
        uri: str | None = None,
        stage: str | None = None,
        experiment: str | None = None,
        enabled: bool = True,
        parent_id: str | None = None,
    ):
        self.client = client
        self.run_id = run_id
        self.fallback_path = Path(fallback_path)
        self.flush_every = max(1, int(flush_every))
        self.flush_interval = flush_interval
        self.uri = uri or "(unknown URI)"
        self.stage = stage or self.fallback_path.stem
        self.experiment = experiment
        self.enabled = enabled
        self.parent_id = parent_id
        self.local_id = None if run_id else uuid.uuid4().hex
        self.lost_to_fallback = 0  # JSONL records written to the fallback file
        self.metrics_to_fallback = 0  # metric values among them
        self.rejected = 0  # records MLflow refused as invalid (kept in the fallback file too)
        self._failed = client is None
        self._lock = threading.Lock()  # guards _held, _closed, _abandoned and the queue hand-off
        self._file_lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._held: list[tuple[str, Any]] = []  # taken from the queue, not yet sent or written
        self._held_since = 0.0
        self._closed = False
        self._abandoned = False
        self._late = False  # warned about logging after close
        self._worker: threading.Thread | None = None
        if enabled:
            self._worker = threading.Thread(target=self._work, name=f"mlflow-{self.stage}", daemon=True)
            self._worker.start()
            _OPEN.add(self)

    # -- public API (never waits on the store) ----------------------------------------------------
    def log_params(self, flat: Mapping[str, Any]) -> None:
        if flat:
            self._submit(("params", {str(k): param_value(v) for k, v in flat.items()}))

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            if not isinstance(value, numbers.Real):  # None, strings, tensors: not metrics
                continue
            value = float(value)
            if math.isfinite(value):
                items.append((_metric_key(key), value, now, int(step)))
        if items:
            self._submit(("metrics", items))

    def log_experiment_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Headline figures (named as in DVC's metrics files, e.g. ``cfg.best_val_bpb``) on this run
        and on the parent run, where the MLflow UI compares experiments side by side. Non-numeric
        values (``"3/5"``) are skipped, as DVC skips them in plots."""
        if not self.enabled:
            return
        clean = {k: v for k, v in metrics.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}
        self.log_metrics(clean, 0)
        if self.parent_id is None:
            return
        now = int(time.time() * 1000)
        items = [(_metric_key(k), float(v), now, 0) for k, v in clean.items() if math.isfinite(float(v))]
        if items:
            self._submit(("parent_metrics", (self.parent_id, items)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = {str(k): str(v) for k, v in tags.items() if v is not None}
        if items:
            self._submit(("tags", items))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._submit(("artifact", (str(path), artifact_path)))

    @property
    def offline(self) -> bool:
        """True once the run's records go to the fallback file (store unreachable, or never opened)."""
        return self._failed

    def keep_registration(self, *, model: str, step: int, weights_sha256: str, checkpoint: Path,
                          files: Iterable[str], alias: str) -> Path | None:
        """Keep a model registration the store could not take, for `sunfish tracking sync`.

        The run's queue is flushed first, so the record lands after what was logged before it. The
        checkpoint's ``files`` (those present) are hard-linked, or copied where linking fails, into
        a folder next to the fallback file (``artifacts/<run id>/``): the checkpoint folder itself
        may be replaced by a later ``dvc repro`` before the sync, while its files are never
        modified in place. Then a ``register`` record naming that folder is appended to the
        fallback file. Returns the kept folder (None when the run is disabled); raises OSError when
        the copy or the record could not be written.
        """
        if not self.enabled:
            return None
        self.flush()
        checkpoint = Path(checkpoint)
        folder = self._kept_folder() / f"{uuid.uuid4().hex[:8]}-{model}-{checkpoint.name}"
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
        record = self._record(register={"model": model, "step": int(step), "weights_sha256": weights_sha256,
                                        "alias": alias, "checkpoint": str(folder), "source": str(checkpoint),
                                        "kept_at": time.time()})
        with self._file_lock:
            try:
                append_records(self.fallback_path, [record])
            except OSError:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            self.lost_to_fallback += 1
        return folder

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Send everything logged so far; False if that did not finish within ``timeout`` seconds."""
        if not self.enabled:
            return True
        done = threading.Event()
        with self._lock:
            if self._closed:
                return not self._worker.is_alive()
            self._queue.put(("flush", done))
        return done.wait(timeout)

    def close(self, status: str | None = "FINISHED", timeout: float = 60.0) -> None:
        """End the run (``status``; None leaves it as it is): drain for at most ``timeout`` seconds,
        then keep whatever is left in the fallback file, and warn if anything is only there."""
        if not self.enabled:
            return
        with self._lock:
            if self._closed:
                return
            if status is not None:
                self._queue.put(("end", (status, int(time.time() * 1000))))
            self._queue.put(("stop", None))
            self._closed = True
        try:
            self._worker.join(timeout)
        finally:  # also on Ctrl-C during the wait: keep what is left, then let the interrupt go on
            if self._worker.is_alive():
                self._give_up(timeout)
            _OPEN.discard(self)
            self._report()

    def _give_up(self, timeout: float) -> None:
        with self._lock:
            self._abandoned = True
            left = self._held + _drain(self._queue)
            self._held = []
        left = [op for op in left if op[0] not in _CONTROL]
        log.warning(
            "MLflow at %s did not take the records of run %s within %g s; the %d records left are kept in %s",
            self.uri, self.run_id, timeout, len(left), self.fallback_path,
        )
        self._write_fallback(left)

    # -- caller side ------------------------------------------------------------------------------
    def _submit(self, op: tuple[str, Any]) -> None:
        if not self.enabled:
            return
        with self._lock:
            if not self._closed:
                self._queue.put(op)
                return
        if not self._late:
            self._late = True
            log.warning("%s logged to run %s after it was closed; kept in %s",
                        op[0], self.run_id, self.fallback_path)
        self._write_fallback([op])

    def _report(self) -> None:
        if self.metrics_to_fallback:
            log.warning(
                "%d metric records could not reach MLflow at %s; kept in %s; "
                "replay with `sunfish tracking sync`",
                self.metrics_to_fallback, self.uri, self.fallback_path,
            )
        elif self.lost_to_fallback > self.rejected:
            log.warning(
                "%d records (params, tags, artifacts, model registrations, run end) could not reach MLflow at %s; "
                "kept in %s; replay with `sunfish tracking sync`",
                self.lost_to_fallback - self.rejected, self.uri, self.fallback_path,
            )

    # -- worker thread ----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                wait = None
                if self._held:
                    wait = max(0.0, self._held_since + self.flush_interval - time.monotonic())
            try:
                op = self._queue.get(timeout=wait)
            except queue.Empty:
                self._send_held()
                if self._abandoned:
                    return
                continue
            kind = op[0]
            with self._lock:
                orphan = self._abandoned
                if not orphan and kind not in _CONTROL:
                    if not self._held:
                        self._held_since = time.monotonic()
                    self._held.append(op)
            if orphan:  # close() gave up on us while we were taking this one
                if kind == "flush":
                    op[1].set()
                elif kind != "stop":
                    self._write_fallback([op])
                return
            if kind != "metrics" or self._held_metrics() >= self.flush_every:
                self._send_held()
            if self._abandoned:  # close() took over what was left while we were stuck in a call
                return
            if kind == "flush":
                op[1].set()
            elif kind == "stop":
                return

    def _held_metrics(self) -> int:
        with self._lock:
            return sum(len(op[1]) for op in self._held if op[0] == "metrics")

    def _send_held(self) -> None:
        """Send the held ops in order: runs of metric ops merged up to 1000 values, others one by one."""
        while True:
            with self._lock:
                if self._abandoned or not self._held:
                    return
                unit = _next_unit(self._held)
                failed = self._failed
                if failed:  # claim before writing, so close() cannot write them a second time
                    del self._held[: len(unit)]
            if failed:
                self._write_fallback(unit)
                continue
            error = None
            try:
                self._send(unit)
            except Exception as exc:
                error = exc
            with self._lock:
                if self._abandoned:  # close() has written them to the fallback file already
                    return
                del self._held[: len(unit)]
            if error is None:
                continue
            if is_rejection(error):  # the record is refused, the store is fine: keep logging to it
                log.warning("MLflow at %s rejected %s of run %s (%s); the record is kept in %s",
                            self.uri, unit[0][0], self.run_id, error, self.fallback_path)
                self._write_fallback(unit, rejected=str(error))
                continue
            self._failed = True
            log.warning(
                "MLflow logging failed at %s (%s: %s); training goes on, and this and every later record "
                "of run %s is kept in %s",
                self.uri, type(error).__name__, error, self.run_id, self.fallback_path,
            )
            self._write_fallback(unit)

    def _send(self, unit: list[tuple[str, Any]]) -> None:
        kind = unit[0][0]
        client, run_id = self.client, self.run_id
        if kind == "metrics":
            from mlflow.entities import Metric

            metrics = [Metric(k, v, ts, step) for op in unit for (k, v, ts, step) in op[1]]
            for i in range(0, len(metrics), MAX_METRICS_PER_CALL):
                chunk = metrics[i : i + MAX_METRICS_PER_CALL]
                with_retry(client.log_batch, run_id, metrics=chunk, synchronous=True)
            return
        payload = unit[0][1]
        if kind == "params":
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in payload.items()]
            with_retry(client.log_batch, run_id, params=params, synchronous=True)
        elif kind == "tags":
            from mlflow.entities import RunTag

            tags = [RunTag(k, v) for k, v in payload.items()]
            with_retry(client.log_batch, run_id, tags=tags, synchronous=True)
        elif kind == "artifact":
            path, artifact_path = payload
            method = client.log_artifacts if Path(path).is_dir() else client.log_artifact
            with_retry(method, run_id, path, artifact_path)
        elif kind == "end":
            status, end_time = payload
            with_retry(client.set_terminated, run_id, status, end_time)
        elif kind == "parent_metrics":
            from mlflow.entities import Metric

            parent, items = payload
            metrics = [Metric(k, v, ts, step) for (k, v, ts, step) in items]
            with_retry(client.log_batch, parent, metrics=metrics, synchronous=True)

    # -- fallback file ----------------------------------------------------------------------------
    def _write_fallback(self, ops: list[tuple[str, Any]], rejected: str | None = None) -> None:
        records: list[dict[str, Any]] = []
        metrics: list[list[Any]] = []
        n_metrics = 0
        for op in ops:
            if op[0] == "metrics":
                metrics.extend([k, v, step, ts] for (k, v, ts, step) in op[1])
                continue
            if metrics:
                records.append(self._record(metrics=metrics))
                n_metrics, metrics = n_metrics + len(metrics), []
            records.append(self._record(**self._fields(op)))
            if op[0] == "parent_metrics":
                n_metrics += len(op[1][1])
        if metrics:
            records.append(self._record(metrics=metrics))
            n_metrics += len(metrics)
        if not records:
            return
        if rejected:
            for r in records:
                r["rejected"] = rejected
        with self._file_lock:
            try:
                append_records(self.fallback_path, records)
            except OSError as exc:  # the last resort failed too: say so loudly, never raise into training
                log.error("could not keep %d MLflow records in %s (%s); they are lost: %s",
                          len(records), self.fallback_path, exc, records)
                return
            self.lost_to_fallback += len(records)
            if rejected:
                self.rejected += len(records)
            else:
                self.metrics_to_fallback += n_metrics

    def _record(self, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = {
            "run_id": self.run_id, "time": time.time(), "uri": self.uri, "stage": self.stage,
        }
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
        dest = self._kept_folder() / f"{uuid.uuid4().hex[:8]}-{path.name}"
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

    def _kept_folder(self) -> Path:
        return self.fallback_path.parent / "artifacts" / (self.run_id or self.local_id)


def _next_unit(held: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    if held[0][0] != "metrics":
        return held[:1]
    unit, count = [], 0
    for op in held:
        if op[0] != "metrics" or (unit and count + len(op[1]) > MAX_METRICS_PER_CALL):
            break
        unit.append(op)
        count += len(op[1])
    return unit


def _drain(q: queue.SimpleQueue) -> list[tuple[str, Any]]:
    out = []
    while True:
        try:
            op = q.get_nowait()
        except queue.Empty:
            return out
        if op[0] == "flush":
            op[1].set()
        out.append(op)


@atexit.register
def _close_open_runs() -> None:
    for handle in list(_OPEN):
        handle.close(status=None, timeout=10.0)


def param_value(value: Any) -> str:
    """A params.yaml value as MLflow shows it: as YAML/JSON writes it (null, true, [24, 48]), not as
    Python's repr (None, True); text stays unquoted."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]


def _metric_key(key: str) -> str:
    # MLflow keys allow letters, digits, _ - . space / ; keep ours (train/loss, val/bpb) as they are
    return "".join(c if (c.isalnum() or c in "_-. /") else "_" for c in key)
