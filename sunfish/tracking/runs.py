"""One MLflow run per executed stage, logged through MLflow's own asynchronous logging: :class:`StageRun`.

Logging must never slow or stop training, so :meth:`StageRun.log_metrics` (and params, tags) hands
the records to ``MlflowClient.log_batch(..., synchronous=False)`` and returns: MLflow's queue and
threads do the sending, and the run has no thread of its own. MLflow reports a failed batch only
through the futures of the ``RunOperations`` it returns, so a run keeps what it handed over until a
done-callback on those futures says how it went (:mod:`sunfish.tracking.mlflow_async`). One batch
of a run is in flight at a time; what is logged meanwhile waits and goes next, merged up to 1000
metrics, handed over by that callback. So MLflow receives a run's records in order although its
worker pool has ten threads, batches grow with the logging rate instead of by a timer, and the
records a failure sends to the fallback file are exactly those MLflow did not take.

Outcomes, judged in the callback: SQLite lock contention (another experiment writing the store) is
handed over again after a backoff; a record MLflow refuses as invalid is kept, marked ``rejected``,
and logging goes on; any other failure (server down, timeout, HTTP 5xx after MLflow's own, here
bounded, retries) logs one warning naming the URI and the fallback file, and from then on every
record of the run is appended, in order, to ``<repo>/state/mlflow_fallback/<stage>.jsonl``
(:mod:`sunfish.tracking.offline`, replayed by ``sunfish tracking sync``); training goes on.

Artifacts and the run's end are not on the training path: they are sent synchronously by
:meth:`StageRun.flush` / :meth:`StageRun.close`, after the records logged before them. Closing a
run waits at most ``close_timeout`` (60 s) for MLflow to confirm; what it has not confirmed by then
is written to the fallback file. Should the store take a batch later after all, the replay adds
nothing twice: MLflow keeps a metric (key, step, timestamp, value) once, and params and tags are set
to the values they already have. MLflow's queue belongs to the store object, which MLflow shares
per URI across the process: the last open run of a store shuts it down at close, and runs still
open when the interpreter exits are closed before MLflow's threads stop, so their records still
reach the store. A model registration the store could not take is kept in the fallback file too
(:meth:`StageRun.keep_registration`).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sunfish.tracking.mlflow_async import first_error, futures_of, install_process_hooks, shut_down_queue, store_of
from sunfish.tracking.offline import FallbackWriter
from sunfish.tracking.store import (
    LOCK_RETRY_ATTEMPTS,
    is_lock_contention,
    is_rejection,
    lock_retry_pause,
    with_retry,
)

log = logging.getLogger(__name__)

MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
_ASYNC = ("metrics", "params", "tags", "parent_metrics")  # handed to MLflow's queue; artifacts are not
# Runs not closed yet: closed at interpreter exit (held here, so that none is collected with records unsent).
_OPEN: set[StageRun] = set()


class StageRun:
    """One MLflow run for one executed pipeline stage, logged through MLflow's asynchronous logging.

    ``log_*`` never wait on the store (metrics get their timestamp here). On the first failure that
    is neither lock contention nor a rejection, one warning, and this and every later record goes to
    ``fallback_path`` (JSONL); there ``flush_every`` metric values, or ``flush_interval`` seconds,
    are gathered into one record before it is appended. ``client=None`` means the run could not be
    opened: records go straight to the fallback file under ``local_id``. ``enabled=False`` makes
    every call a no-op.
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
        self._fallback = FallbackWriter(self.fallback_path, run_id=run_id, uri=self.uri, stage=self.stage,
                                        experiment=experiment, local_id=self.local_id)
        self._failed = client is None
        # _lock guards the state below; _file_lock orders appends: it is taken while _lock is held,
        # so records claimed first are written first
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._file_lock = self._fallback.lock
        self._buffer: list[tuple[str, Any]] = []  # logged, not yet handed to MLflow (offline: not yet written)
        self._buffer_since = 0.0
        self._inflight: list[tuple[str, Any]] | None = None  # handed to MLflow, outcome not known yet
        self._attempt = 0  # lock-contention retries of the batch in flight
        self._deferred: list[tuple[str, Any]] = []  # artifacts, sent by flush() or close()
        self._handed_over = False  # MLflow's queue was used (so close may shut it down)
        self._closed = False
        self._abandoned = False  # close() stopped waiting: what MLflow still holds is in the fallback file
        self._late = False  # warned about logging after close
        if enabled:
            _OPEN.add(self)
            install_process_hooks(_close_open_runs, _open_run_ids)

    @property
    def lost_to_fallback(self) -> int:
        """JSONL records written to the fallback file."""
        return self._fallback.records

    @property
    def metrics_to_fallback(self) -> int:
        """Metric values among them (rejected ones aside)."""
        return self._fallback.metrics

    @property
    def rejected(self) -> int:
        """Records MLflow refused as invalid (kept in the fallback file too, not replayed)."""
        return self._fallback.rejected

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
        """Upload a file or folder at the next :meth:`flush` or at :meth:`close` (it must exist until then)."""
        if Path(path).exists():
            self._submit(("artifact", (str(path), artifact_path)))

    @property
    def offline(self) -> bool:
        """True once the run's records go to the fallback file (store unreachable, or never opened)."""
        return self._failed

    def keep_registration(self, *, model: str, step: int, weights_sha256: str, checkpoint: Path,
                          files: Iterable[str], alias: str) -> Path | None:
        """Keep a model registration the store could not take, for `sunfish tracking sync`.

        The run is flushed first, so the record lands after what was logged before it. The
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
        return self._fallback.keep_registration(model=model, step=step, weights_sha256=weights_sha256,
                                                checkpoint=Path(checkpoint), files=files, alias=alias)

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until MLflow has confirmed everything logged so far (offline: until it is in the
        fallback file), then upload the artifacts logged so far; False if the records were not
        confirmed within ``timeout`` seconds."""
        if not self.enabled:
            return True
        with self._lock:
            if self._closed:
                return self._inflight is None and not self._buffer
        self._pump(force=True)
        if not self._wait_idle(timeout):
            return False
        self._pump(force=True)  # offline: what was logged while we waited
        self._send_deferred()
        return True

    def close(self, status: str | None = "FINISHED", timeout: float = 60.0) -> None:
        """End the run (``status``; None leaves it as it is): wait at most ``timeout`` seconds for
        MLflow to confirm the records, keep what it has not in the fallback file, upload the
        artifacts, and warn if anything is only in the fallback file."""
        if not self.enabled:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        drained = False
        try:
            self._pump(force=True)
            drained = self._wait_idle(timeout)
        finally:  # also on Ctrl-C during the wait: keep what is left, then let the interrupt go on
            if not drained:
                self._give_up(timeout)
            self._pump(force=True)
            end = [("end", (status, int(time.time() * 1000)))] if status is not None else []
            self._send_deferred(end)
            _OPEN.discard(self)
            self._report()
            self._release_queue()

    # -- caller side ------------------------------------------------------------------------------
    def _submit(self, op: tuple[str, Any]) -> None:
        if not self.enabled:
            return
        with self._lock:
            if not self._closed:
                if op[0] not in _ASYNC:
                    self._deferred.append(op)
                    return
                if not self._buffer:
                    self._buffer_since = time.monotonic()
                self._buffer.append(op)
                late = False
            else:
                late = True
        if not late:
            self._pump()
            return
        if not self._late:
            self._late = True
            log.warning("%s logged to run %s after it was closed; kept in %s",
                        op[0], self.run_id, self.fallback_path)
        self._keep([op])

    def _wait_idle(self, timeout: float | None) -> bool:
        with self._idle:
            return self._idle.wait_for(
                lambda: self._abandoned or (self._inflight is None and (self._failed or not self._buffer)),
                timeout)

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

    # -- handing records to MLflow ----------------------------------------------------------------
    def _pump(self, force: bool = False) -> None:
        """Hand the oldest waiting records to MLflow unless a batch of this run is in flight (its
        done-callback pumps again); offline, append them to the fallback file when enough have
        gathered, or now when ``force``. Runs in the logging thread or in MLflow's, never blocks
        on the store."""
        while True:
            with self._lock:
                if self._inflight is not None or self._abandoned:
                    return
                if not self._buffer:
                    self._idle.notify_all()
                    return
                offline = self._failed
                if offline:
                    if not (force or self._offline_due()):
                        return
                    ops, self._buffer = self._buffer, []
                    self._file_lock.acquire()
                else:
                    ops = _next_unit(self._buffer)
                    del self._buffer[: len(ops)]
                    self._inflight, self._attempt = ops, 0
            if offline:
                try:
                    self._fallback.write(ops)
                finally:
                    self._file_lock.release()
                continue
            if not self._hand_over(ops):
                return

    def _offline_due(self) -> bool:
        metrics = sum(len(op[1]) for op in self._buffer if op[0] == "metrics")
        return (metrics >= self.flush_every or any(op[0] != "metrics" for op in self._buffer)
                or time.monotonic() - self._buffer_since >= self.flush_interval)

    def _hand_over(self, unit: list[tuple[str, Any]]) -> bool:
        """Give ``unit`` to MLflow's queue. True when its outcome is already settled (the caller goes
        on pumping); False when a done-callback will settle it, or a retry is scheduled."""
        try:
            operations = self._send_async(unit)
            self._handed_over = True
            futures = futures_of(operations)
        except Exception as exc:  # refused before queueing (a client that logs synchronously, shutdown)
            return self._settle(unit, exc)
        if all(f.done() for f in futures):
            return self._settle(unit, first_error(futures))
        left = [len(futures)]
        count_lock = threading.Lock()

        def done(_future) -> None:  # in MLflow's status-check thread (or here, if it just finished)
            with count_lock:
                left[0] -= 1
                if left[0]:
                    return
            try:
                if self._settle(unit, first_error(futures)):
                    self._pump()
            except Exception:  # never into MLflow's thread pool, where it would only be printed
                log.exception("MLflow logging of run %s: unexpected error", self.run_id)

        for future in futures:
            future.add_done_callback(done)
        return False

    def _send_async(self, unit: list[tuple[str, Any]]):
        from mlflow.entities import Metric, Param, RunTag

        kind, client = unit[0][0], self.client
        if kind == "metrics":
            metrics = [Metric(k, v, ts, step) for op in unit for (k, v, ts, step) in op[1]]
            return client.log_batch(self.run_id, metrics=metrics, synchronous=False)
        payload = unit[0][1]
        if kind == "params":
            return client.log_batch(self.run_id, params=[Param(k, v) for k, v in payload.items()],
                                    synchronous=False)
        if kind == "tags":
            return client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in payload.items()],
                                    synchronous=False)
        parent, items = payload  # parent_metrics
        return client.log_batch(parent, metrics=[Metric(k, v, ts, step) for (k, v, ts, step) in items],
                                synchronous=False)

    def _settle(self, unit: list[tuple[str, Any]], error: BaseException | None) -> bool:
        """The outcome of the batch in flight. True when it is done with (taken, kept as rejected,
        or kept in the fallback file with everything after it)."""
        with self._lock:
            if self._abandoned or self._inflight is not unit:  # close() kept it in the fallback file
                return False
            if error is None:
                self._inflight = None
                return True
            if is_lock_contention(error) and self._attempt < LOCK_RETRY_ATTEMPTS - 1:
                timer = threading.Timer(lock_retry_pause(self._attempt), self._retry, (unit,))
                timer.daemon = True
                self._attempt += 1
                timer.start()
                return False
            self._inflight = None
            rejected = is_rejection(error)
            if rejected:
                ops = unit
            else:
                first = not self._failed
                self._failed = True
                ops, self._buffer = unit + self._buffer, []
            self._file_lock.acquire()
        try:
            if rejected:  # the record is refused, the store is fine: keep logging to it
                log.warning("MLflow at %s rejected %s of run %s (%s); the record is kept in %s",
                            self.uri, unit[0][0], self.run_id, error, self.fallback_path)
                self._fallback.write(ops, rejected=str(error))
            else:
                if first:
                    log.warning(
                        "MLflow logging failed at %s (%s: %s); training goes on, and this and every later "
                        "record of run %s is kept in %s",
                        self.uri, type(error).__name__, error, self.run_id, self.fallback_path,
                    )
                self._fallback.write(ops)
        finally:
            self._file_lock.release()
        return True

    def _retry(self, unit: list[tuple[str, Any]]) -> None:
        with self._lock:
            if self._abandoned or self._inflight is not unit:
                return
        try:
            if self._hand_over(unit):
                self._pump()
        except Exception:
            log.exception("MLflow logging of run %s: unexpected error", self.run_id)

    def _give_up(self, timeout: float) -> None:
        with self._lock:
            self._abandoned = self._failed = True
            left = (self._inflight or []) + self._buffer
            self._inflight, self._buffer = None, []
            self._idle.notify_all()
            self._file_lock.acquire()
        try:
            if left:
                log.warning(
                    "MLflow at %s did not take the records of run %s within %g s; the %d records left are "
                    "kept in %s", self.uri, self.run_id, timeout, len(left), self.fallback_path,
                )
            self._fallback.write(left)
        finally:
            self._file_lock.release()

    # -- artifacts and the run's end (synchronous, after the records) -----------------------------
    def _send_deferred(self, extra: list[tuple[str, Any]] = ()) -> None:
        with self._lock:
            ops, self._deferred = self._deferred + list(extra), []
        for i, op in enumerate(ops):
            if self._failed:
                self._keep(ops[i:])
                return
            try:
                self._send_sync(op)
            except Exception as exc:
                if is_rejection(exc):
                    log.warning("MLflow at %s rejected %s of run %s (%s); the record is kept in %s",
                                self.uri, op[0], self.run_id, exc, self.fallback_path)
                    self._keep([op], rejected=str(exc))
                    continue
                with self._lock:
                    first, self._failed = not self._failed, True
                if first:
                    log.warning(
                        "MLflow logging failed at %s (%s: %s); training goes on, and this and every later "
                        "record of run %s is kept in %s",
                        self.uri, type(exc).__name__, exc, self.run_id, self.fallback_path,
                    )
                self._pump(force=True)  # records logged meanwhile go first
                self._keep(ops[i:])
                return

    def _send_sync(self, op: tuple[str, Any]) -> None:
        kind, payload = op
        if kind == "artifact":
            path, artifact_path = payload
            method = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
            with_retry(method, self.run_id, path, artifact_path)
        elif kind == "end":
            status, end_time = payload
            with_retry(self.client.set_terminated, self.run_id, status, end_time)

    def _release_queue(self) -> None:
        """Shut MLflow's queue of this store down when no other open run of this process uses it."""
        if not self._handed_over or self._abandoned:
            return  # nothing started, or a batch is stuck in it: shutting it down would wait for that
        store = store_of(self.client)
        if store is not None and not any(other is not self and store_of(other.client) is store
                                         for other in list(_OPEN)):
            shut_down_queue(store)

    def _keep(self, ops: list[tuple[str, Any]], rejected: str | None = None) -> None:
        with self._file_lock:
            self._fallback.write(ops, rejected)


def _next_unit(held: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The next batch: a run of metric ops merged up to 1000 values, or one other op."""
    if held[0][0] != "metrics":
        return held[:1]
    unit, count = [], 0
    for op in held:
        if op[0] != "metrics" or (unit and count + len(op[1]) > MAX_METRICS_PER_CALL):
            break
        unit.append(op)
        count += len(op[1])
    return unit


def _close_open_runs() -> None:
    for handle in list(_OPEN):
        try:
            handle.close(status=None, timeout=10.0)
        except Exception:  # at exit: the other runs still get closed
            log.exception("could not close MLflow run %s at exit", handle.run_id)


def _open_run_ids() -> set[str]:
    return {i for handle in list(_OPEN) for i in (handle.run_id, handle.parent_id) if i}


def param_value(value: Any) -> str:
    """A params.yaml value as MLflow shows it: as YAML/JSON writes it (null, true, [24, 48]), not as
    Python's repr (None, True); text stays unquoted."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]


def _metric_key(key: str) -> str:
    # MLflow keys allow letters, digits, _ - . space / ; keep ours (train/loss, val/bpb) as they are
    return "".join(c if (c.isalnum() or c in "_-. /") else "_" for c in key)
