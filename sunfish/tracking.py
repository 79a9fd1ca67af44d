"""MLflow tracking: where the store lives, one run per executed stage, asynchronous fault-tolerant logging.

The store location has one definition, :func:`tracking_uri`. The default is a SQLite file at the
repository root, found from ``DVC_ROOT`` or git, never from the current directory: ``dvc exp run
--queue`` executes stages inside temporary copies under ``.dvc/tmp/exps/``, and a relative
``sqlite:///mlflow.db`` there would be deleted with the copy. ``MLFLOW_TRACKING_URI`` wins when set.

Logging must never slow or stop training, so it is asynchronous: :meth:`StageRun.log_metrics` only
puts the values on a queue and returns. One daemon thread per run sends them with ``log_batch``
(at most 1000 metrics a call, when ~50 are pending or every ~2 s); params, tags, artifacts and the
run's end go through the same thread, in order. A SQLite store locked by another experiment is
retried with backoff. Any other failure (server down, timeout, HTTP 5xx after MLflow's own, here
bounded, retries) logs one warning naming the URI and the fallback file, and from then on every
record of the run is appended to ``<repo>/state/mlflow_fallback/<stage>.jsonl``; training goes on.
At the end of the stage a summary says how many metric records are only there; ``sunfish tracking
sync`` (:func:`sunfish.tracking_sync.sync_fallback`) replays them. Closing a run waits at most
``close_timeout`` (60 s) for the queue to drain, then writes what is left to the fallback file.

Stage runs of one pipeline execution are grouped under a parent run, so the MLflow UI compares
experiments side by side rather than dozens of stage runs. The parent is named after the DVC
experiment (``DVC_EXP_NAME``), or ``workspace@<commit>`` for a plain ``dvc repro`` (with ``+<hash>``
of params.yaml when it differs from the commit's). Every stage run carries ``mlflow.parentRunId``
and the tag ``sunfish.experiment``; the parent collects the params of its stages (same names as in
params.yaml) and the headline metrics (same names as in DVC's metrics files). A later execution
under the same name whose params disagree with the parent's gets a new parent. Finding or creating
the parent holds a lock file per store, so two queue workers never make two parents of one
experiment.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import numbers
import os
import queue
import random
import shutil
import subprocess
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sunfish.tracking_sync import append_records, open_client, side_file_lock, sync_fallback

__all__ = ["StageRun", "experiment_label", "repo_root", "stage_run", "sync_fallback", "tracking_uri"]

log = logging.getLogger(__name__)

QUEUE_WORKSPACE_MARKER = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep
MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit
# MLflow error codes meaning "this request is invalid" (e.g. a param changed on resume): the record
# is refused, the store is fine, so the run keeps logging to MLflow.
_REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}
PARENT_TAG = "sunfish.parent"  # "true" on the run that groups the stage runs of one execution
EXPERIMENT_TAG = "sunfish.experiment"  # the execution's label, on the parent and on every stage run
PARENT_ID_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
_CONTROL = ("flush", "stop")
# Runs not closed by stage_run (direct StageRun use): drained at interpreter exit.
_OPEN: weakref.WeakSet[StageRun] = weakref.WeakSet()


def repo_root(start: str | Path | None = None) -> Path:
    """The project root: DVC_ROOT, else the enclosing git/DVC checkout, else the start directory.

    Inside a DVC queue workspace (``<repo>/.dvc/tmp/exps/<tmp>/``) the main repository is returned,
    so every queued experiment writes to the one store the user browses.
    """
    candidate = os.environ.get("DVC_ROOT")
    path = Path(candidate) if candidate else None
    if path is None:
        here = Path(start or Path.cwd()).resolve()
        for parent in (here, *here.parents):
            if (parent / ".dvc").is_dir() or (parent / ".git").exists():
                path = parent
                break
        else:
            path = here
    return main_repo_of(path.resolve())


def main_repo_of(path: Path) -> Path:
    text = str(path) + os.sep
    if QUEUE_WORKSPACE_MARKER in text:
        return Path(text.split(QUEUE_WORKSPACE_MARKER, 1)[0])
    return path


def tracking_uri(root: Path, configured: str | None = None) -> str:
    """MLFLOW_TRACKING_URI, else tracking.uri from params, else sqlite:///<root>/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def artifact_location(root: Path) -> str:
    return (root / "mlartifacts").resolve().as_uri()


def params_hash(flat_params: Mapping[str, Any]) -> str:
    blob = json.dumps(dict(sorted(flat_params.items())), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _is_lock_contention(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


# Lock contention met by this process: {"retries": n, "seconds": waited}; reported when a stage ends.
LOCK_WAITS = {"retries": 0, "seconds": 0.0}


def _with_retry(fn, *args, attempts: int = 8, **kwargs):
    """Retry on SQLite lock contention (two experiments writing one store at once)."""
    delay = 0.1
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # mlflow wraps sqlite errors in MlflowException
            if attempt == attempts - 1 or not _is_lock_contention(exc):
                raise
            pause = delay + random.random() * delay
            LOCK_WAITS["retries"] += 1
            LOCK_WAITS["seconds"] += pause
            time.sleep(pause)
            delay = min(delay * 2, 2.0)
    return None


def _is_rejection(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in _REJECTED


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
            self._submit(("params", {str(k): _param_value(v) for k, v in flat.items()}))

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
                "%d records (params, tags, artifacts, run end) could not reach MLflow at %s; kept in %s; "
                "replay with `sunfish tracking sync`",
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
            if _is_rejection(error):
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
                _with_retry(client.log_batch, run_id, metrics=chunk, synchronous=True)
            return
        payload = unit[0][1]
        if kind == "params":
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in payload.items()]
            _with_retry(client.log_batch, run_id, params=params, synchronous=True)
        elif kind == "tags":
            from mlflow.entities import RunTag

            tags = [RunTag(k, v) for k, v in payload.items()]
            _with_retry(client.log_batch, run_id, tags=tags, synchronous=True)
        elif kind == "artifact":
            path, artifact_path = payload
            method = client.log_artifacts if Path(path).is_dir() else client.log_artifact
            _with_retry(method, run_id, path, artifact_path)
        elif kind == "end":
            status, end_time = payload
            _with_retry(client.set_terminated, run_id, status, end_time)
        elif kind == "parent_metrics":
            from mlflow.entities import Metric

            parent, items = payload
            metrics = [Metric(k, v, ts, step) for (k, v, ts, step) in items]
            _with_retry(client.log_batch, parent, metrics=metrics, synchronous=True)

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
        folder = self.fallback_path.parent / "artifacts" / (self.run_id or self.local_id)
        dest = folder / f"{uuid.uuid4().hex[:8]}-{path.name}"
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


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:6000]


def _metric_key(key: str) -> str:
    # MLflow keys allow letters, digits, _ - . space / ; keep ours (train/loss, val/bpb) as they are
    return "".join(c if (c.isalnum() or c in "_-. /") else "_" for c in key)


@contextmanager
def stage_run(
    stage: str,
    *,
    root: Path,
    experiment: str = "sunfish",
    configured_uri: str | None = None,
    enabled: bool = True,
    flat_params: Mapping[str, Any] | None = None,
    stage_params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    fallback_dir: Path | None = None,
    run_id: str | None = None,
    close_timeout: float = 60.0,
) -> Iterator[StageRun]:
    """Open an MLflow run named after the stage, tagged for DVC; mark it FAILED if the stage raises.

    ``flat_params`` are params.yaml values: logged on the stage run and on the execution's parent run,
    where a value that disagrees with the parent's starts a new parent. ``stage_params`` describe this
    stage only (which model stage it trains) and go on the stage run alone: stages of one execution
    differ in them, so they must not split the execution over several parents.
    ``run_id`` resumes that run (a resumed training stage continues its run) when the store has it;
    otherwise a new run is created. The store being unreachable never raises: records are kept in
    ``<fallback_dir>/<stage>.jsonl`` (default ``<root>/state/mlflow_fallback``).
    """
    fallback = (fallback_dir or root / "state" / "mlflow_fallback") / f"{stage}.jsonl"
    shared_params = dict(flat_params or {})
    flat_params = {**shared_params, **(stage_params or {})}
    if not enabled:
        yield StageRun(None, None, fallback, stage=stage, enabled=False)
        return
    uri = tracking_uri(root, configured_uri)
    commit = git_commit(root)
    label = experiment_label(commit)
    shared = {
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
        "dvc.exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV"),
        "git.commit": commit,
        EXPERIMENT_TAG: label,
    }
    all_tags = {
        "sunfish.stage": stage,
        "dvc.stage": stage,
        **shared,
        "params.hash": params_hash(flat_params or {}),
        "mlflow.source.name": f"dvc stage {stage}",
        **(tags or {}),
    }
    all_tags = {k: str(v) for k, v in all_tags.items() if v is not None}
    client = active_id = parent_id = None
    resumed = None
    known_params: dict[str, str] = {}
    try:
        client = open_client(uri)
        exp_id = _experiment_id(client, experiment, root, uri)
        parent_id = _parent_run(client, exp_id, uri, label, shared, shared_params)
        if parent_id:
            all_tags[PARENT_ID_TAG] = parent_id
        resumed = _reopen(client, run_id, uri) if run_id else None
        if resumed is not None:
            active_id, known_params = resumed.info.run_id, dict(resumed.data.params)
        else:
            run = _with_retry(client.create_run, exp_id, run_name=stage, tags=all_tags)
            active_id = run.info.run_id
        log.info("MLflow run %s (stage %s, experiment %s) in %s", active_id, stage, label, uri)
    except Exception as exc:
        log.warning("MLflow store %s unavailable (%s); training goes on, records go to %s",
                    uri, exc, fallback)
        client, active_id, parent_id = None, run_id, None  # a resumed run keeps its id for the replay
    handle = StageRun(client, active_id, fallback, uri=uri, stage=stage, experiment=experiment,
                      parent_id=parent_id)
    if client is None or resumed is not None:
        handle.set_tags(all_tags)  # what create_run would have set (refreshed on resume: commit, exp name)
    if flat_params:
        # params are immutable in MLflow: on resume send the new ones; a changed one (max_steps of an
        # extended run) is recorded as a tag params.changed.<key> = <new value>
        handle.log_params({k: v for k, v in flat_params.items() if k not in known_params})
        changed = {f"params.changed.{k}": _param_value(v) for k, v in flat_params.items()
                   if k in known_params and known_params[k] != _param_value(v)}
        if changed:
            handle.set_tags(changed)
    status, timeout = "FINISHED", close_timeout
    try:
        yield handle
    except KeyboardInterrupt:
        status, timeout = "KILLED", min(close_timeout, 10.0)
        raise
    except BaseException as exc:
        # a requested stop (TrainingInterrupted: SIGINT/SIGTERM with a resume checkpoint) is not a failure
        status = getattr(exc, "mlflow_status", "FAILED")
        raise
    finally:
        handle.close(status, timeout=timeout)
        if parent_id is not None and not handle._failed:
            _end_parent(client, parent_id, status)
        if LOCK_WAITS["retries"]:
            log.info("stage %s waited %.1f s for the SQLite store in %d retries (another writer held it)",
                     stage, LOCK_WAITS["seconds"], LOCK_WAITS["retries"])


def experiment_label(commit: str | None) -> str:
    """What groups the stage runs of one execution: the DVC experiment's name, else the commit.

    A plain ``dvc repro`` with a params.yaml that differs from the commit's gets ``+<hash>`` of
    the file, so two different workspace configurations never share a parent.
    """
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        return name
    label = f"workspace@{commit[:7]}" if commit else "workspace"
    params = Path.cwd() / "params.yaml"
    if commit and params.is_file() and _differs_from_head(params):
        label += "+" + hashlib.sha256(params.read_bytes()).hexdigest()[:7]
    return label


def _differs_from_head(path: Path) -> bool:
    try:
        out = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path.name], cwd=path.parent,
                             capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 1


@contextmanager
def _parent_lock(uri: str) -> Iterator[None]:
    """One process at a time finds-or-creates parent runs in a store (queue workers start together)."""
    with side_file_lock("sunfish-parent", uri):
        yield


def _parent_run(client: Any, exp_id: str, uri: str, label: str, tags: Mapping[str, Any],
                flat_params: Mapping[str, Any]) -> str | None:
    """The parent run of this execution (found or created), with this stage's params added.

    The newest parent of ``label`` is reused unless one of its params disagrees with this stage's
    (the same experiment name run again with other settings): then a new parent is started.
    A failure here leaves the stage run without a parent rather than stopping the stage.
    """
    from mlflow.entities import Param, RunTag

    wanted = {str(k): _param_value(v) for k, v in flat_params.items()}
    # not dvc.exp_name: filtering on it keeps meaning "the stage runs of experiment X"
    tags = {k: str(v) for k, v in tags.items() if v is not None and k != "dvc.exp_name"}
    try:
        with _parent_lock(uri):
            newest = find_parents(client, [exp_id], label=label, max_results=1)
            parent = newest[0] if newest else None
            if parent is not None and any(parent.data.params.get(k, v) != v for k, v in wanted.items()):
                log.info("experiment %s ran again with other params: a new parent run", label)
                parent = None
            if parent is None:
                parent_tags = {**tags, PARENT_TAG: "true",
                               "mlflow.source.name": "dvc pipeline"}
                parent = _with_retry(client.create_run, exp_id, run_name=label, tags=parent_tags)
                known: dict[str, str] = {}
            else:
                known = dict(parent.data.params)
                _with_retry(client.update_run, parent.info.run_id, "RUNNING")
            parent_id = parent.info.run_id
            new = [Param(k, v) for k, v in wanted.items() if k not in known]
            for i in range(0, len(new), 100):  # log_batch takes at most 100 params
                _with_retry(client.log_batch, parent_id, params=new[i : i + 100], synchronous=True)
            latest = {k: v for k, v in tags.items() if k != EXPERIMENT_TAG}
            if latest:  # the commit an experiment name was last run at
                _with_retry(client.log_batch, parent_id, tags=[RunTag(k, v) for k, v in latest.items()],
                            synchronous=True)
            return parent_id
    except Exception as exc:
        log.warning("could not find or create the parent MLflow run of %s (%s); the stage run is not grouped",
                    label, exc)
        return None


def find_parents(client: Any, experiment_ids: list[str], label: str | None = None,
                 max_results: int = 1000) -> list[Any]:
    """Parent runs, newest first; only those of ``label`` when given."""
    query = f"tags.`{PARENT_TAG}` = 'true'"
    if label is not None:
        query += f" and tags.`{EXPERIMENT_TAG}` = '{_quote(label)}'"
    return _with_retry(client.search_runs, experiment_ids, filter_string=query, max_results=max_results,
                       order_by=["attributes.start_time DESC"])


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _end_parent(client: Any, parent_id: str, status: str) -> None:
    """The parent's status follows its latest stage: FINISHED, FAILED or KILLED, with that end time."""
    try:
        _with_retry(client.set_terminated, parent_id, status, int(time.time() * 1000))
    except Exception as exc:
        log.warning("could not update the parent MLflow run %s (%s)", parent_id, exc)


def _reopen(client: Any, run_id: str, uri: str):
    """The run to continue, set RUNNING again; None when the store does not have it."""
    try:
        run = _with_retry(client.get_run, run_id)
    except Exception as exc:
        if getattr(exc, "error_code", None) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        run = None
    if run is None or run.info.lifecycle_stage != "active":
        log.info("MLflow run %s not found in %s; starting a new run", run_id, uri)
        return None
    _with_retry(client.update_run, run_id, "RUNNING")
    log.info("MLflow run %s resumed", run_id)
    return run


def _experiment_id(client: Any, experiment: str, root: Path, uri: str) -> str:
    """The experiment's id, created if new: with artifacts in <root>/mlartifacts for a local store;
    a tracking server chooses itself (its --artifacts-destination, shared by the team)."""
    exp = _with_retry(client.get_experiment_by_name, experiment)
    if exp is not None:
        return exp.experiment_id
    local = uri.startswith(("sqlite:", "file:", "/"))
    try:
        return _with_retry(client.create_experiment, experiment,
                           artifact_location=artifact_location(root) if local else None)
    except Exception:  # created concurrently by another experiment
        return _with_retry(client.get_experiment_by_name, experiment).experiment_id
