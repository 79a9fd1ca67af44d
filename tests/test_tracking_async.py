"""Asynchronous MLflow logging: never blocks training, survives a dead server, loses no metric.

StageRun hands its records to MLflow's own asynchronous logging (``log_batch(synchronous=False)``).
The stand-in clients below keep that contract (records go to a thread, the outcome to a future);
the tests marked "real" use a SQLite store in tmp_path whose ``log_batch`` is slowed or broken at
the store level, so MLflow's queue, thread pools and futures are what StageRun really goes through.

Keep the top-level imports light: the two-process test re-imports this module in spawned children.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from sunfish.tracking import HTTP_DEFAULTS, StageRun, SyncError, bound_http_retries, stage_run, sync_fallback

SUMMARY = "metric records could not reach MLflow at"


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fallback_steps(path: Path, key: str | None = None) -> list[int]:
    return [m[2] for r in read_jsonl(path) for m in r.get("metrics", ()) if key in (None, m[0])]


def store_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


class RecordingClient:
    """Stands in for MlflowClient; ``release`` gates log_batch, ``entered`` says a call started.

    As MLflow does, ``synchronous=False`` runs the call on another thread and returns a
    ``RunOperations`` whose future holds the outcome; ``executor.shutdown()`` waits for it."""

    def __init__(self, block: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        self.entered = threading.Event()
        self.release = threading.Event()
        if not block:
            self.release.set()
        self.calls: list[tuple[str, object]] = []
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="fake-mlflow")

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=True):
        if not synchronous:
            from mlflow.utils.async_logging.run_operations import RunOperations

            future = self.executor.submit(self.log_batch, run_id, metrics, params, tags, True)
            return RunOperations([future])
        self.entered.set()
        self.release.wait(60)
        if metrics:
            self.calls.append(("metrics", [(m.key, m.step) for m in metrics]))
        if params:
            self.calls.append(("params", {p.key: p.value for p in params}))
        if tags:
            self.calls.append(("tags", {t.key: t.value for t in tags}))

    def set_terminated(self, run_id, status=None, end_time=None):
        self.calls.append(("end", status))


class BrokenClient:
    def log_batch(self, *a, **k):
        raise ConnectionError("server went away")

    def set_terminated(self, *a, **k):
        raise ConnectionError("server went away")


# -- a. the caller never waits on the store --------------------------------------------------------

def _run_together(procs, timeout: float = 180) -> None:
    """Start every process, wait for all, require success; never leave one running."""
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()

def test_log_metrics_returns_while_mlflow_is_blocked(tmp_path):
    client = RecordingClient(block=True)  # no log_batch can complete until release is set
    run = StageRun(client, "rid", tmp_path / "fb.jsonl", flush_every=5)
    returned = threading.Event()

    def train():
        for step in range(200):  # crosses flush_every many times
            run.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
            if step >= 5:
                run.log_metrics({"train/lr": 0.1}, step)
        run.log_params({"train.lr": 0.1})
        run.set_tags({"phase": "done"})
        returned.set()

    threading.Thread(target=train, daemon=True).start()
    try:
        assert client.entered.wait(30), "no batch was handed to MLflow"
        assert returned.wait(30), "log_metrics waited for the blocked log_batch"
        assert not client.release.is_set()  # so every call above returned while the store was stuck
    finally:
        client.release.set()
    assert run.flush(30)
    run.close()

    kinds = [kind for kind, _ in client.calls]
    assert kinds[-3:] == ["params", "tags", "end"]  # order preserved; pending metrics went first
    assert set(kinds[:-3]) == {"metrics"}
    sent = [item for kind, batch in client.calls if kind == "metrics" for item in batch]
    assert [s for k, s in sent if k == "train/loss"] == list(range(200))
    assert [s for k, s in sent if k == "train/lr"] == list(range(5, 200))
    assert max(len(batch) for kind, batch in client.calls if kind == "metrics") <= 1000
    assert not (tmp_path / "fb.jsonl").exists()
    assert run.lost_to_fallback == 0


def test_lock_contention_is_retried_not_sent_to_fallback(tmp_path):
    class LockedTwice(RecordingClient):
        failures = 2

        def log_batch(self, *a, **k):
            if self.failures:
                self.failures -= 1
                raise RuntimeError("(sqlite3.OperationalError) database is locked")
            return super().log_batch(*a, **k)  # its RunOperations: close() must wait for them

    client = LockedTwice()
    run = StageRun(client, "rid", tmp_path / "fb.jsonl", flush_every=2)
    for step in range(4):
        run.log_metrics({"x": step}, step)
    run.close()
    assert [s for kind, b in client.calls if kind == "metrics" for _, s in b] == [0, 1, 2, 3]
    assert not (tmp_path / "fb.jsonl").exists()


def test_close_gives_up_on_a_stuck_store_and_keeps_everything(tmp_path, caplog):
    client = RecordingClient(block=True)
    path = tmp_path / "fb.jsonl"
    run = StageRun(client, "rid", path, flush_every=1, uri="http://stuck")
    try:
        run.log_metrics({"x": 1.0}, 1)
        assert client.entered.wait(30)
        run.log_metrics({"x": 2.0}, 2)
        run.set_tags({"t": "v"})
        run.close(timeout=0.2)  # MLflow is stuck in log_batch: give up and keep it all locally
        lines_at_close = path.read_text()
    finally:
        client.release.set()
    client.executor.shutdown(wait=True)  # the stuck batch completes, and its callback runs
    assert path.read_text() == lines_at_close  # its late outcome wrote nothing twice
    records = read_jsonl(path)
    assert fallback_steps(path) == [1, 2]  # the batch in flight and the queued one
    assert {"t": "v"} in [r.get("tags") for r in records]
    assert records[-1]["status"] == "FINISHED"
    assert "did not take the records" in caplog.text
    assert f"2 {SUMMARY} http://stuck" in caplog.text


# -- MLflow's own asynchronous logging, on a real store -----------------------------------------------
class StoreGate:
    """Sits in ``SqlAlchemyStore.log_batch`` of one store, where MLflow's worker threads call it:
    holds each call while ``hold`` is set (until ``release``), raises what ``fail`` returns, and
    records (thread, metrics, params, tags) of every call."""

    def __init__(self):
        self.hold, self.release, self.entered = threading.Event(), threading.Event(), threading.Event()
        self.fail = None  # (metrics, params, tags) -> an exception to raise, or None
        self.calls: list[tuple[str, int, int, int]] = []


@pytest.fixture
def real_store(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from sunfish.tracking import open_client

    gate, uri = StoreGate(), f"sqlite:///{tmp_path / 'mlflow.db'}"
    real = SqlAlchemyStore.log_batch

    def log_batch(self, run_id, metrics, params, tags):
        if getattr(self, "db_uri", None) == uri:
            gate.calls.append((threading.current_thread().name, len(metrics), len(params), len(tags)))
            gate.entered.set()
            if gate.hold.is_set():
                gate.release.wait(60)
            error = gate.fail(metrics, params, tags) if gate.fail else None
            if error is not None:
                raise error
        return real(self, run_id, metrics, params, tags)

    # patched before the store exists: MLflow's queue binds the store's log_batch when it is made
    monkeypatch.setattr(SqlAlchemyStore, "log_batch", log_batch)
    client = open_client(uri)
    run_id = client.create_run(client.create_experiment("sunfish")).info.run_id
    yield SimpleNamespace(uri=uri, client=client, run_id=run_id, gate=gate,
                          fallback=tmp_path / "state" / "mlflow_fallback" / "train_stage_0.jsonl")
    gate.release.set()
    client._tracking_client.store.shut_down_async_logging()  # nothing of this test runs into the next


def _history(store, key: str) -> dict[int, float]:
    return {m.step: m.value for m in store.client.get_metric_history(store.run_id, key)}


def test_log_metrics_hands_records_to_mlflows_queue_and_never_waits(real_store, tmp_path):
    """(real) Every record goes through log_batch(synchronous=False); while MLflow's worker is held
    inside the store, logging goes on; what was logged meanwhile follows as one batch, in order."""
    from concurrent.futures import Future

    from mlflow.utils.async_logging.run_operations import RunOperations

    store, gate = real_store, real_store.gate
    handed = []
    log_batch = store.client.log_batch

    def spy(*args, **kwargs):
        result = log_batch(*args, **kwargs)
        handed.append((kwargs.get("synchronous", True), result))
        return result

    store.client.log_batch = spy
    gate.hold.set()
    run = StageRun(store.client, store.run_id, store.fallback, uri=store.uri)
    run.log_metrics({"train/loss": 1.0}, 0)
    assert gate.entered.wait(30), "no batch reached the store"
    started = time.perf_counter()
    for step in range(1, 300):
        run.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    run.set_tags({"phase": "done"})
    took = time.perf_counter() - started
    assert not gate.release.is_set()  # so all of the above returned while the store held the first batch
    assert took < 5, f"300 log calls took {took:.1f} s while the store was held"
    assert not run.flush(0.2)  # nothing is confirmed yet
    gate.release.set()
    assert run.flush(30)
    run.close()

    assert handed and all(sync is False for sync, _ in handed)
    assert all(isinstance(r, RunOperations) and r._operation_futures
               and all(isinstance(f, Future) for f in r._operation_futures) for _, r in handed)
    assert [c[1:] for c in gate.calls] == [(1, 0, 0), (299, 0, 0), (0, 0, 1)]
    assert all(c[0].startswith("MLflowBatchLoggingWorkerPool") for c in gate.calls)  # MLflow's threads
    assert _history(store, "train/loss") == {s: 1.0 / (s + 1) for s in range(300)}
    got = store.client.get_run(store.run_id)
    assert got.data.tags["phase"] == "done" and got.info.status == "FINISHED"
    assert not store.fallback.exists() and run.lost_to_fallback == 0


def test_a_store_failing_mid_run_keeps_the_rest_in_order_and_sync_replays_it(real_store, caplog):
    """(real) The store breaks inside MLflow's worker thread: one warning; from that record on,
    everything is in the fallback file in the order it was logged, none of it in the store; once
    the store works again, `sunfish tracking sync` puts every value where it belongs."""
    from mlflow.exceptions import MlflowException

    from sunfish.tracking import sync_file

    store = real_store
    run = StageRun(store.client, store.run_id, store.fallback, uri=store.uri, stage="train_stage_0")
    for step in range(50):
        run.log_metrics({"train/loss": 10.0 / (step + 1)}, step)
    assert run.flush(30) and not run.offline
    store.gate.fail = lambda *_: MlflowException("(sqlite3.OperationalError) disk I/O error")
    for step in range(50, 100):
        run.log_metrics({"train/loss": 10.0 / (step + 1)}, step)
        if step == 70:
            run.set_tags({"phase": "late"})
            run.log_params({"late.param": 7})
    run.close()

    assert run.offline
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name.startswith("sunfish")]
    assert sum("MLflow logging failed" in w for w in warnings) == 1
    assert store.uri in warnings[0] and str(store.fallback) in warnings[0] and "disk I/O error" in warnings[0]
    assert f"50 {SUMMARY} {store.uri}; kept in {store.fallback}" in caplog.text
    order = []
    for record in read_jsonl(store.fallback):
        assert record["run_id"] == store.run_id
        order += [m[2] for m in record.get("metrics", ())]
        order += [name for name in ("tags", "params", "status") if name in record]
    assert order == [*range(50, 71), "tags", "params", *range(71, 100), "status"]
    assert sorted(_history(store, "train/loss")) == list(range(50))  # nothing kept locally is in the store

    store.gate.fail = None  # the store works again
    result = sync_file(store.fallback)  # to the URI each record names
    assert result.metrics == 50 and not store.fallback.exists()
    assert _history(store, "train/loss") == {s: 10.0 / (s + 1) for s in range(100)}
    got = store.client.get_run(store.run_id)
    assert got.data.params["late.param"] == "7" and got.data.tags["phase"] == "late"
    assert got.info.status == "FINISHED"


def test_lock_contention_inside_mlflows_queue_is_sent_again(real_store):
    """(real) 'database is locked' raised in MLflow's worker comes back through the future: the
    batch is handed to MLflow again after a backoff, and nothing goes to the fallback file."""
    from mlflow.exceptions import MlflowException

    from sunfish.tracking import LOCK_WAITS
    from sunfish.tracking.mlflow_async import QUEUE_LOGGER

    store, locked = real_store, [2]

    def fail(*_):
        if locked[0]:
            locked[0] -= 1
            return MlflowException("(sqlite3.OperationalError) database is locked")
        return None

    store.gate.fail = fail
    retries = LOCK_WAITS["retries"]
    mlflow_log = logging.getLogger(QUEUE_LOGGER)  # MLflow's own logger: it does not propagate to caplog
    lines: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: lines.append(record.getMessage())
    mlflow_log.addHandler(handler)
    try:
        run = StageRun(store.client, store.run_id, store.fallback, uri=store.uri)
        for step in range(20):
            run.log_metrics({"x": float(step)}, step)
        mlflow_log.error("Run Id someone-else: Failed to log run data: Exception: x")
        run.close()
    finally:
        mlflow_log.removeHandler(handler)
    assert _history(store, "x") == {s: float(s) for s in range(20)}
    assert not run.offline and not store.fallback.exists()
    assert LOCK_WAITS["retries"] == retries + 2
    assert all(c[0].startswith("MLflowBatchLoggingWorkerPool") for c in store.gate.calls)
    # MLflow's ERROR line for each failed try is dropped for our run (nothing was lost), not for others
    assert lines == ["Run Id someone-else: Failed to log run data: Exception: x"]


def test_a_record_mlflow_rejects_is_kept_and_logging_goes_on(real_store, caplog):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    store = real_store
    store.gate.fail = lambda metrics, params, tags: (
        MlflowException("a made-up invalid param", error_code=INVALID_PARAMETER_VALUE) if params else None)
    run = StageRun(store.client, store.run_id, store.fallback, uri=store.uri)
    run.log_metrics({"x": 0.0}, 0)
    run.log_params({"p": 1})
    run.log_metrics({"x": 1.0}, 1)
    run.close()
    assert not run.offline and run.rejected == 1
    (record,) = read_jsonl(store.fallback)
    assert record["params"] == {"p": "1"} and "a made-up invalid param" in record["rejected"]
    assert _history(store, "x") == {0: 0.0, 1: 1.0}
    assert "rejected params" in caplog.text and SUMMARY not in caplog.text


def test_a_batch_the_store_takes_after_close_gave_up_is_not_doubled_by_the_replay(real_store):
    """(real) close() keeps what MLflow has not confirmed; the held batch may still land later.
    The replay then adds the rest and leaves the late one single (MLflow keeps a metric once)."""
    from sunfish.tracking import sync_file

    store = real_store
    store.gate.hold.set()
    run = StageRun(store.client, store.run_id, store.fallback, uri=store.uri)
    run.log_metrics({"x": 1.0}, 1)
    assert store.gate.entered.wait(30)
    run.log_metrics({"x": 2.0}, 2)
    run.close(timeout=0.2)
    assert fallback_steps(store.fallback) == [1, 2]
    store.gate.release.set()  # the held batch now reaches the store after all
    deadline = time.monotonic() + 30
    while not _history(store, "x") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _history(store, "x") == {1: 1.0}
    sync_file(store.fallback)
    assert sorted((m.step, m.value) for m in store.client.get_metric_history(store.run_id, "x")) == \
        [(1, 1.0), (2, 2.0)]


def test_closing_the_last_run_of_a_store_stops_mlflows_queue(real_store):
    """MLflow keeps one queue (a thread and two pools) per store object, shared by the process:
    it is shut down when the last open run of that store closes, not while another still logs."""
    store = real_store
    queue = store.client._tracking_client.store._async_logging_queue
    first = StageRun(store.client, store.run_id, store.fallback, uri=store.uri)
    second = StageRun(store.client, store.run_id, store.fallback, uri=store.uri)
    first.log_metrics({"x": 1.0}, 1)
    second.log_metrics({"y": 1.0}, 1)
    assert queue.is_active()
    first.close(status=None)
    assert queue.is_active()
    second.log_metrics({"y": 2.0}, 2)
    second.close(status=None)
    assert queue.is_idle() and not queue._batch_logging_thread.is_alive()
    assert _history(store, "x") == {1: 1.0} and _history(store, "y") == {1: 1.0, 2: 2.0}


def test_interpreter_exit_sends_what_an_unclosed_run_logged(tmp_path):
    """A run never closed (no stage_run around it) is closed at exit while MLflow's thread pools
    still take work: its records reach the store, none is left to the fallback file."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("sunfish")).info.run_id
    fallback = tmp_path / "fb.jsonl"
    script = (
        "from sunfish.tracking import StageRun, open_client\n"
        f"run = StageRun(open_client({uri!r}), {run_id!r}, {str(fallback)!r}, uri={uri!r})\n"
        "run.log_params({'p': 1})\n"
        "for step in range(2000):\n"
        "    run.log_metrics({'x': float(step)}, step)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert store_steps(uri, run_id, "x") == list(range(2000)), done.stderr[-3000:]
    assert client.get_run(run_id).data.params == {"p": "1"}
    assert not fallback.exists()
    assert client.get_run(run_id).info.status == "RUNNING"  # exit closes with status None


# -- failures: one warning, a local record, a summary --------------------------------------------
def test_summary_warning_names_uri_file_and_sync(tmp_path, caplog):
    path = tmp_path / "fb.jsonl"
    run = StageRun(BrokenClient(), "abc", path, flush_every=2, uri="http://tracking.example:5000")
    for step in range(1, 4):
        run.log_metrics({"train/loss": 1.0 / step}, step)
    run.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("MLflow logging failed" in w for w in warnings) == 1
    assert "http://tracking.example:5000" in warnings[0] and str(path) in warnings[0]
    assert warnings[-1] == (
        f"3 {SUMMARY} http://tracking.example:5000; kept in {path}; replay with `sunfish tracking sync`"
    )
    records = read_jsonl(path)
    assert fallback_steps(path) == [1, 2, 3]
    assert all(r["run_id"] == "abc" and isinstance(r["time"], float) for r in records)
    assert records[-1]["status"] == "FINISHED"


def test_http_retry_bounds_use_mlflow_names(monkeypatch):
    import mlflow.environment_variables as ev

    for name in HTTP_DEFAULTS:
        assert getattr(ev, name).name == name
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "33")
    bound_http_retries()
    assert ev.MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2
    assert ev.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
    assert ev.MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 33  # the user's setting wins


# -- resuming one run --------------------------------------------------------------------------------
def test_resume_continues_the_run(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    with stage_run("train", root=tmp_path, flat_params={"lr": 0.1}) as first:
        first.log_metrics({"loss": 3.0}, 1)
    changed = {"lr": 0.2, "extra": 1}
    with stage_run("train", root=tmp_path, run_id=first.run_id, flat_params=changed) as second:
        second.log_metrics({"loss": 2.0}, 2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert second.run_id == first.run_id
    run = MlflowClient(tracking_uri=uri).get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "extra": "1"}  # params are immutable in MLflow...
    assert run.data.tags["params.changed.lr"] == "0.2"  # ...so a changed one is recorded as a tag
    assert store_steps(uri, first.run_id, "loss") == [1, 2]
    assert "rejected" not in caplog.text and "MLflow logging failed" not in caplog.text
    assert not second.fallback_path.exists()

    caplog.clear()
    caplog.set_level(logging.INFO, logger="sunfish.tracking")
    with stage_run("train", root=tmp_path, run_id="0" * 32) as third:
        third.log_metrics({"loss": 1.0}, 3)
    assert third.run_id != "0" * 32
    assert f"MLflow run {'0' * 32} not found" in caplog.text
    assert store_steps(uri, third.run_id, "loss") == [3]


# -- replay ------------------------------------------------------------------------------------------
def test_store_down_from_the_start_replays_into_a_new_run(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    (tmp_path / "artifact.txt").write_text("hello")
    bad = f"sqlite:///{tmp_path / 'not-a-dir' / 'x' / 'mlflow.db'}"
    (tmp_path / "not-a-dir").write_text("a file where the store's folder should be")
    with stage_run("prepare", root=tmp_path, configured_uri=bad, flat_params={"n": 5}) as run:
        run.log_metrics({"docs": 10.0})
        run.log_artifact(tmp_path / "artifact.txt")
    assert run.run_id is None and "unavailable" in caplog.text
    (tmp_path / "artifact.txt").unlink()  # e.g. a DVC queue workspace that is gone: a copy was kept

    good = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert sync_fallback(run.fallback_path, uri=good) == 5  # tags, params, metrics, artifact, end
    client = MlflowClient(tracking_uri=good)
    (replayed,) = client.search_runs([client.get_experiment_by_name("sunfish").experiment_id])
    assert replayed.data.params == {"n": "5"}
    assert replayed.data.metrics == {"docs": 10.0}
    assert replayed.data.tags["dvc.stage"] == "prepare"
    assert replayed.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(replayed.info.run_id)][0].endswith("artifact.txt")
    assert not run.fallback_path.exists()
    assert not (run.fallback_path.parent / "artifacts" / run.local_id).exists(), "the kept copy is removed"


def test_failed_sync_puts_records_back(tmp_path):
    path = tmp_path / "train.jsonl"
    run = StageRun(BrokenClient(), "abc", path, flush_every=1)
    run.log_metrics({"x": 1.0}, 1)
    run.close()
    before = read_jsonl(path)
    (tmp_path / "blocker").write_text("")
    with pytest.raises(SyncError, match="back in"):
        sync_fallback(path, uri=f"sqlite:///{tmp_path / 'blocker' / 'mlflow.db'}")
    assert read_jsonl(path) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("train.jsonl.")] == []


def test_interrupted_replay_resumes_into_the_same_new_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import sunfish.tracking.offline as ts

    path = tmp_path / "state" / "mlflow_fallback" / "prepare.jsonl"
    run = StageRun(None, None, path, flush_every=1, uri="http://127.0.0.1:9", experiment="sunfish")
    for step in range(3):
        run.log_metrics({"x": float(step)}, step)
        run.flush()
    run.close()
    assert len(read_jsonl(path)) == 4  # three metric records and the run's end

    real_replay, calls = ts._Replayer.replay, []

    def flaky(self, record):
        calls.append(record)
        if len(calls) == 2:
            raise ConnectionError("store went away mid-sync")
        return real_replay(self, record)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(ts._Replayer, "replay", flaky)
    with pytest.raises(SyncError, match="sent 1 of 4"):
        sync_fallback(path, uri=uri)
    monkeypatch.setattr(ts._Replayer, "replay", real_replay)
    assert sync_fallback(path, uri=uri) == 3
    client = MlflowClient(tracking_uri=uri)
    (replayed,) = client.search_runs([client.get_experiment_by_name("sunfish").experiment_id])
    assert store_steps(uri, replayed.info.run_id, "x") == [0, 1, 2]
    assert replayed.info.status == "FINISHED"
    assert len(list(path.parent.glob("prepare.jsonl.synced-*"))) == 2


def _store_with_a_run(tmp_path):
    from sunfish.tracking import open_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = open_client(uri)
    experiment = client.create_experiment("sunfish", artifact_location=(tmp_path / "mlartifacts").as_uri())
    return uri, client, client.create_run(experiment).info.run_id


def test_a_param_mlflow_rejects_at_sync_is_marked_and_never_blocks_a_later_sync(tmp_path, caplog):
    """A kept param whose value differs from the one the run holds (MLflow refuses to change it): the
    sync sends the metrics after it, marks the param rejected in the archive, and the next sync of a
    new file is not blocked by it (before: SyncError, the param put back, every later sync failing)."""
    from sunfish.tracking import sync_file

    uri, client, run_id = _store_with_a_run(tmp_path)
    client.log_param(run_id, "lr", "0.1")
    fallback = tmp_path / "state" / "mlflow_fallback" / "train_stage_0.jsonl"
    run = StageRun(None, run_id, fallback, uri=uri, flush_every=1)
    run.log_params({"lr": 0.2})
    for step in (1, 2):
        run.log_metrics({"loss": 1.0 / step}, step)
        run.flush()
    run.close()

    result = sync_file(fallback)
    assert (result.records, result.metrics, result.skipped) == (3, 2, 1)  # two metric records, the end
    assert store_steps(uri, run_id, "loss") == [1, 2] and client.get_run(run_id).data.params == {"lr": "0.1"}
    (refused,) = [r for r in read_jsonl(result.moved_to) if "rejected" in r]
    assert refused["params"] == {"lr": "0.2"} and "params lr" in refused["rejected"]
    assert "Changing param values is not allowed" in refused["rejected"]
    assert "MLflow rejected params lr of run" in caplog.text

    run = StageRun(None, run_id, fallback, uri=uri)  # the next sync: a new file
    run.log_metrics({"loss": 0.25}, 3)
    run.close(status=None)
    result = sync_file(fallback)
    assert (result.records, result.skipped) == (1, 0) and store_steps(uri, run_id, "loss") == [1, 2, 3]


def test_only_the_refused_part_of_a_record_is_marked(tmp_path):
    """One record holding metrics and params, one param of which MLflow refuses: the metrics and the
    other param are sent, and the refused param is moved into a record of its own, marked rejected,
    which a replay of the archive skips without asking MLflow again."""
    from sunfish.tracking import append_records, sync_file

    uri, client, run_id = _store_with_a_run(tmp_path)
    client.log_param(run_id, "lr", "0.1")
    fallback = tmp_path / "state" / "mlflow_fallback" / "train_stage_0.jsonl"
    record = {"run_id": run_id, "time": 1.0, "uri": uri, "stage": "train_stage_0",
              "params": {"lr": "0.3", "batch": "8"}, "metrics": [["acc", 0.5, 1, 1000], ["loss", 2.0, 1, 1000]]}
    append_records(fallback, [record])

    result = sync_file(fallback)
    assert (result.records, result.metrics, result.skipped) == (1, 2, 1)
    got = client.get_run(run_id).data
    assert got.params == {"lr": "0.1", "batch": "8"} and got.metrics == {"acc": 0.5, "loss": 2.0}
    sent, refused = read_jsonl(result.moved_to)
    assert sent == {**record, "params": {"batch": "8"}}
    assert refused["params"] == {"lr": "0.3"} and "metrics" not in refused and refused["run_id"] == run_id
    assert "params lr" in refused["rejected"]

    result.moved_to.rename(fallback)  # the archive replayed: the refused part is not sent again
    result = sync_file(fallback)
    assert (result.records, result.skipped) == (1, 1)


def test_a_store_failing_at_sync_is_no_rejection_and_keeps_everything(real_store):
    """(real) MLflow fails with an error that is not a refusal (disk I/O): the sync stops with
    SyncError and every record goes back with its kept copy, nothing marked; once the store works,
    the next sync sends it all and removes the copy."""
    from mlflow.exceptions import MlflowException

    from sunfish.tracking import sync_file

    store = real_store
    experiment = store.client.create_experiment("kept", artifact_location=(store.fallback.parents[2] / "a").as_uri())
    run_id = store.client.create_run(experiment).info.run_id
    (store.fallback.parents[2] / "notes.txt").write_text("notes")
    run = StageRun(None, run_id, store.fallback, uri=store.uri, flush_every=1)
    run.log_metrics({"x": 1.0}, 1)
    run.log_params({"p": 1})
    run.log_artifact(store.fallback.parents[2] / "notes.txt")
    run.close()
    before = read_jsonl(store.fallback)
    (copy,) = (store.fallback.parent / "artifacts" / run_id).iterdir()

    store.gate.fail = lambda *_: MlflowException("(sqlite3.OperationalError) disk I/O error")
    with pytest.raises(SyncError, match="disk I/O error"):
        sync_file(store.fallback)
    assert read_jsonl(store.fallback) == before and copy.read_text() == "notes"

    store.gate.fail = None
    result = sync_file(store.fallback)
    assert (result.records, result.skipped, result.kept_removed) == (4, 0, 1) and not copy.parent.exists()
    assert store.client.get_run(run_id).data.params == {"p": "1"}


def test_sync_removes_the_copies_it_is_done_with_and_nothing_else(tmp_path, caplog):
    """The copy kept for an artifact is removed once sent, with its emptied run folder, and the
    bytes freed are logged; a record naming the user's own file (no copy could be made), a run
    folder itself, or a path leaving the kept folder, and another run's copies, are left alone."""
    from sunfish.tracking import append_records, sync_file

    uri, client, run_id = _store_with_a_run(tmp_path)
    fallback = tmp_path / "state" / "mlflow_fallback" / "train_stage_0.jsonl"
    (tmp_path / "weights.bin").write_bytes(b"w" * 200_000)
    run = StageRun(None, run_id, fallback, uri=uri)
    run.log_artifact(tmp_path / "weights.bin")
    run.close(status=None)
    kept_root = fallback.parent / "artifacts"
    (copy,) = (kept_root / run_id).iterdir()
    other = kept_root / "other-run" / "1234-notes.txt"
    other.parent.mkdir()
    other.write_text("another run's")
    (tmp_path / "mine.txt").write_text("the user's")
    base = {"run_id": run_id, "time": 1.0, "uri": uri}
    append_records(fallback, [{**base, "artifact": str(tmp_path / "mine.txt")},
                              {**base, "artifact": str(other.parent)},
                              {**base, "artifact": str(kept_root / run_id / ".." / ".." / ".." / ".." / "mine.txt")}])

    with caplog.at_level(logging.INFO, logger="sunfish.tracking"):
        result = sync_file(fallback)
    assert (result.records, result.kept_removed, result.freed_bytes) == (4, 1, 200_000)
    assert not copy.exists() and not copy.parent.exists()
    assert (tmp_path / "weights.bin").stat().st_size == 200_000 and (tmp_path / "mine.txt").read_text() == "the user's"
    assert other.read_text() == "another run's"
    assert "removed 1 kept copy of synced records, 0.2 MB freed" in caplog.text


def test_cli_sync(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from sunfish.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("sunfish")).info.run_id
    fallback = tmp_path / "state" / "mlflow_fallback" / "train_stage_0.jsonl"
    run = StageRun(BrokenClient(), run_id, fallback, flush_every=2, uri="http://127.0.0.1:9")
    for step in range(1, 6):
        run.log_metrics({"train/loss": 1.0 / step}, step)
    run.close()

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(main, ["tracking", "sync", "--uri", uri])  # default: the project's files
    assert result.exit_code == 0, result.output
    assert "5 metric values" in result.output and "synced-" in result.output
    assert store_steps(uri, run_id, "train/loss") == [1, 2, 3, 4, 5]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not fallback.exists() and len(list(fallback.parent.glob("train_stage_0.jsonl.synced-*"))) == 1

    result = runner.invoke(main, ["tracking", "sync"])
    assert result.exit_code == 0 and "nothing to sync" in result.output

    result = runner.invoke(main, ["tracking", "sync", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2
    assert "error: no fallback file" in result.output and "Traceback" not in result.output


# -- b. a real server that goes away -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, port: int):
        self.tmp, self.port = tmp, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        log_file = (self.tmp / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.tmp / 'mlflow.db'}",
             "--artifacts-destination", str(self.tmp / "artifacts"), "--workers", "1"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,  # own group: kill it all
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.tmp / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        tail = (self.tmp / "server.log").read_text()[-3000:]
        raise AssertionError(f"mlflow server did not come up within {timeout} s: {tail}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(20)
        try:  # workers left behind in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    server = Server(tmp_path, _free_port())
    yield server
    server.stop()


@pytest.mark.slow
def test_real_server_going_down_loses_nothing(tmp_path, mlflow_server, caplog):
    from mlflow.tracking import MlflowClient

    n = 100
    mlflow_server.start()
    fallback_dir = tmp_path / "fallback"
    with stage_run("train_stage_0", root=tmp_path, configured_uri=mlflow_server.uri,
                   fallback_dir=fallback_dir) as run:
        for step in range(1, n + 1):
            run.log_metrics({"train/loss": 10.0 / step}, step)
        assert run.flush(60)
        mlflow_server.stop()
        for step in range(n + 1, 2 * n + 1):
            run.log_metrics({"train/loss": 10.0 / step}, step)
    fallback = fallback_dir / "train_stage_0.jsonl"
    assert f"MLflow logging failed at {mlflow_server.uri}" in caplog.text
    assert f"{n} {SUMMARY} {mlflow_server.uri}; kept in {fallback}" in caplog.text

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert store_steps(store, run.run_id, "train/loss") == list(range(1, n + 1))
    assert fallback_steps(fallback) == list(range(n + 1, 2 * n + 1))
    assert MlflowClient(tracking_uri=store).get_run(run.run_id).info.status == "RUNNING"

    kept = len(read_jsonl(fallback))
    mlflow_server.start()  # same store, same port: the records' own URI is the target
    assert sync_fallback(fallback) == kept
    mlflow_server.stop()
    assert store_steps(store, run.run_id, "train/loss") == list(range(1, 2 * n + 1))
    assert MlflowClient(tracking_uri=store).get_run(run.run_id).info.status == "FINISHED"
    assert not fallback.exists()


# -- c. two experiments writing one SQLite store at once ---------------------------------------------
def _write_metrics(root: str, barrier, out: str, count: int) -> None:
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from sunfish.tracking import stage_run

    barrier.wait(120)
    with stage_run("train_stage_0", root=Path(root), flat_params={"pid": os.getpid()}) as run:
        for step in range(count):
            run.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    from sunfish.tracking import LOCK_WAITS

    Path(out).write_text(json.dumps({"run_id": run.run_id, "fallback": run.lost_to_fallback, **LOCK_WAITS}))


@pytest.mark.slow
def test_two_processes_write_one_sqlite_store(tmp_path):
    from mlflow.tracking import MlflowClient

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_write_metrics, args=(str(tmp_path), barrier, str(o), 300)) for o in outs]
    _run_together(procs)
    results = [json.loads(o.read_text()) for o in outs]
    print("SQLite lock retries per writer:", [(r["retries"], round(r["seconds"], 2)) for r in results])
    assert [r["fallback"] for r in results] == [0, 0]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for r in results:
        assert len(client.get_metric_history(r["run_id"], "train/loss")) == 300
    assert not (tmp_path / "state" / "mlflow_fallback").exists()


def _open_stage(root: str, barrier, out: str, stage: str, count: int) -> None:
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["DVC_EXP_NAME"] = "sweep-1"
    import sunfish.tracking.stage  # stage_run looks find_parents up there
    from sunfish.tracking import stage_run

    search = sunfish.tracking.stage.find_parents

    def slow_search(*args, **kwargs):
        # all three search at the same instant when nothing serialises them (here the barrier times
        # out for the lock holder while the others wait for the lock), then widen the window
        # between "no parent yet" and "create one"
        try:
            barrier.wait(4)
        except threading.BrokenBarrierError:
            pass
        found = search(*args, **kwargs)
        time.sleep(0.3)
        return found

    sunfish.tracking.stage.find_parents = slow_search
    barrier.wait(120)
    with stage_run(stage, root=Path(root), flat_params={"sampling.guidance_scale": 3.0}) as run:
        for step in range(count):
            run.log_metrics({"val/bpb": 1.0 / (step + 1)}, step)
        run.log_experiment_metrics({f"{stage}.best_val_bpb": 1.0})
    Path(out).write_text(json.dumps({"run_id": run.run_id, "fallback": run.lost_to_fallback}))


@pytest.mark.slow
def test_workers_starting_together_make_one_parent(tmp_path):
    """Three processes of one experiment open their stage runs at the same instant: one parent."""
    from mlflow.tracking import MlflowClient

    from sunfish.tracking import find_parents

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("sunfish")  # the store exists: nothing serialises the workers but the lock
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    outs = [tmp_path / f"out{i}.json" for i in range(3)]
    procs = [ctx.Process(target=_open_stage, args=(str(tmp_path), barrier, str(o), f"s{i}", 200))
             for i, o in enumerate(outs)]
    _run_together(procs)
    parents = find_parents(client, [client.get_experiment_by_name("sunfish").experiment_id])
    assert len(parents) == 1
    assert parents[0].data.metrics == {"s0.best_val_bpb": 1.0, "s1.best_val_bpb": 1.0, "s2.best_val_bpb": 1.0}
    for o in outs:
        r = json.loads(o.read_text())
        assert r["fallback"] == 0
        assert client.get_run(r["run_id"]).data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert len(client.get_metric_history(r["run_id"], "val/bpb")) == 200
