"""MLflow tracking: where the store lives, one run per executed stage, batched and fault-tolerant logging.

The store location has one definition, :func:`tracking_uri`. The default is a SQLite file at the
repository root, found from ``DVC_ROOT`` or git, never from the current directory: ``dvc exp run
--queue`` executes stages inside temporary copies under ``.dvc/tmp/exps/``, and a relative
``sqlite:///mlflow.db`` there would be deleted with the copy. ``MLFLOW_TRACKING_URI`` wins when set.

Logging must never stop training. Metrics are buffered and sent with ``log_batch``; a store that is
locked (two experiments writing SQLite at once) is retried, and one that is unreachable produces a
warning while every record is kept in a local JSONL file next to the stage outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

QUEUE_WORKSPACE_MARKER = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


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


def _with_retry(fn, *args, attempts: int = 8, **kwargs):
    """Retry on SQLite lock contention (two experiments writing one store at once)."""
    delay = 0.1
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # mlflow wraps sqlite errors in MlflowException
            text = str(exc).lower()
            if attempt == attempts - 1 or not ("locked" in text or "busy" in text):
                raise
            time.sleep(delay + random.random() * delay)
            delay = min(delay * 2, 2.0)
    return None


class StageRun:
    """One MLflow run for one executed pipeline stage.

    Metrics are buffered and flushed with ``log_batch``. Every call is guarded: on failure the
    record goes to ``fallback_path`` (JSONL) and a single warning is logged; training goes on.
    """

    def __init__(self, client: Any | None, run_id: str | None, fallback_path: Path, flush_every: int = 50):
        self.client = client
        self.run_id = run_id
        self.fallback_path = fallback_path
        self.flush_every = flush_every
        self._pending: list[Any] = []
        self._failed = client is None
        self.lost_to_fallback = 0

    # -- public API -------------------------------------------------------------------------------
    def log_params(self, flat: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._call("log_batch", params=items[i : i + 100], record={"params": dict(list(flat.items())[i : i + 100])})

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                continue
            self._pending.append(Metric(_metric_key(key), float(value), now, int(step)))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        self._call("log_batch", tags=items, record={"tags": {t.key: t.value for t in items}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._call("log_artifact", str(path), artifact_path=artifact_path, record={"artifact": str(path)})

    def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        for i in range(0, len(batch), 500):
            chunk = batch[i : i + 500]
            self._call(
                "log_batch",
                metrics=chunk,
                record={"metrics": [(m.key, m.value, m.step) for m in chunk]},
            )

    # -- internals --------------------------------------------------------------------------------
    def _call(self, method: str, *args, record: dict, **kwargs) -> None:
        if not self._failed:
            try:
                _with_retry(getattr(self.client, method), self.run_id, *args, **kwargs)
                return
            except Exception as exc:
                self._failed = True
                log.warning(
                    "MLflow logging failed (%s); continuing, records kept in %s", exc, self.fallback_path
                )
        self.lost_to_fallback += 1
        self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
        with self.fallback_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"run_id": self.run_id, "time": time.time(), **record}, default=str) + "\n")


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
    tags: Mapping[str, Any] | None = None,
    fallback_dir: Path | None = None,
) -> Iterator[StageRun]:
    """Open an MLflow run named after the stage, tagged for DVC; mark it FAILED if the stage raises."""
    fallback = (fallback_dir or root / "state" / "mlflow_fallback") / f"{stage}.jsonl"
    if not enabled:
        yield StageRun(None, None, fallback)
        return
    uri = tracking_uri(root, configured_uri)
    client = run_id = None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = _with_retry(client.get_experiment_by_name, experiment)
        if exp is None:
            try:
                exp_id = _with_retry(client.create_experiment, experiment, artifact_location=artifact_location(root))
            except Exception:  # created concurrently by another experiment
                exp_id = _with_retry(client.get_experiment_by_name, experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        all_tags = {
            "sunfish.stage": stage,
            "dvc.stage": stage,
            "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
            "dvc.exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV"),
            "git.commit": git_commit(root),
            "params.hash": params_hash(flat_params or {}),
            "mlflow.source.name": f"dvc stage {stage}",
            **(tags or {}),
        }
        run = _with_retry(
            client.create_run, exp_id, run_name=stage, tags={k: str(v) for k, v in all_tags.items() if v is not None}
        )
        run_id = run.info.run_id
        log.info("MLflow run %s (stage %s) in %s", run_id, stage, uri)
    except Exception as exc:
        log.warning("MLflow store %s unavailable (%s); records go to %s", uri, exc, fallback)
        client = None
    handle = StageRun(client, run_id, fallback)
    if flat_params:
        handle.log_params(flat_params)
    status = "FINISHED"
    try:
        yield handle
    except BaseException:
        status = "FAILED" if not isinstance(_current_exc(), KeyboardInterrupt) else "KILLED"
        raise
    finally:
        handle.flush()
        if handle.client is not None and not handle._failed:
            try:
                _with_retry(handle.client.set_terminated, run_id, status)
            except Exception as exc:
                log.warning("could not close MLflow run %s: %s", run_id, exc)


def _current_exc() -> BaseException | None:
    import sys

    return sys.exc_info()[1]
