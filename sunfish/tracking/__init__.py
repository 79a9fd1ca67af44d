"""MLflow tracking: where the store lives, one run per executed stage, asynchronous fault-tolerant logging.

The modules, each importing only those listed before it (no import circles; mlflow is imported
only when a store is opened):

- :mod:`sunfish.tracking.store`: the store's location (:func:`tracking_uri`: ``MLFLOW_TRACKING_URI``,
  else ``tracking.uri`` of params.yaml, else a SQLite file at the repository root found from
  ``DVC_ROOT`` or git, also from a ``dvc exp run --queue`` workspace), opening a client, retrying
  on SQLite lock contention;
- :mod:`sunfish.tracking.kept`: the copies of artifacts and checkpoints kept for a replay, and
  their removal once it is done with them;
- :mod:`sunfish.tracking.offline`: the local fallback file (``state/mlflow_fallback/<stage>.jsonl``)
  that keeps the records a store could not take, and its replay (``sunfish tracking sync``);
- :mod:`sunfish.tracking.mlflow_async`: what StageRun relies on in MLflow's asynchronous logging
  beyond its public call (the futures of a batch, a store's queue, the order of exit hooks);
- :mod:`sunfish.tracking.runs`: :class:`StageRun`, one MLflow run logged through MLflow's own
  asynchronous logging, so logging never slows or stops training (a failed batch, seen in its
  future: one warning, and the run's records from there on go to the fallback file, in order);
- :mod:`sunfish.tracking.stage`: :func:`stage_run`, the run of one pipeline stage, grouped under
  a parent run per execution (DVC experiment or ``workspace@<commit>``).

This package re-exports their public names; import from ``sunfish.tracking``.
"""

from __future__ import annotations

from sunfish.tracking.offline import (
    FALLBACK_DIR,
    FallbackWriter,
    RegisterHandler,
    SyncError,
    SyncResult,
    append_records,
    fallback_files,
    project_root,
    sync_fallback,
    sync_file,
)
from sunfish.tracking.runs import MAX_METRICS_PER_CALL, StageRun
from sunfish.tracking.stage import (
    EXPERIMENT_TAG,
    PARENT_ID_TAG,
    PARENT_TAG,
    experiment_label,
    find_parents,
    stage_run,
)
from sunfish.tracking.store import (
    HTTP_DEFAULTS,
    LOCK_WAITS,
    QUEUE_WORKSPACE_MARKER,
    artifact_location,
    bound_http_retries,
    git_commit,
    is_lock_contention,
    is_rejection,
    local_store,
    main_repo_of,
    missing_store,
    open_client,
    params_hash,
    repo_root,
    side_file_lock,
    store_init_lock,
    tracking_uri,
    with_retry,
)

__all__ = [
    "EXPERIMENT_TAG", "FALLBACK_DIR", "FallbackWriter", "HTTP_DEFAULTS", "LOCK_WAITS", "MAX_METRICS_PER_CALL", "PARENT_ID_TAG",
    "PARENT_TAG", "QUEUE_WORKSPACE_MARKER", "RegisterHandler", "StageRun", "SyncError", "SyncResult", "append_records",
    "artifact_location", "bound_http_retries", "experiment_label", "fallback_files", "find_parents",
    "git_commit", "is_lock_contention", "is_rejection", "local_store", "main_repo_of", "missing_store", "open_client", "params_hash", "project_root", "repo_root", "side_file_lock",
    "stage_run", "store_init_lock", "sync_fallback", "sync_file", "tracking_uri", "with_retry",
]
