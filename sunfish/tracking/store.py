"""Where the MLflow store lives, and safe access to it (shared by the rest of sunfish.tracking).

The store location has one definition, :func:`tracking_uri`. The default is a SQLite file at the
repository root, found from ``DVC_ROOT`` or git, never from the current directory: ``dvc exp run
--queue`` executes stages inside temporary copies under ``.dvc/tmp/exps/``, and a relative
``sqlite:///mlflow.db`` there would be deleted with the copy. ``MLFLOW_TRACKING_URI`` wins when set.

Opening a client (:func:`open_client`) bounds MLflow's HTTP retries and serialises the creation of a
new SQLite store; :func:`with_retry` retries a call on SQLite lock contention (two experiments
writing one store at once), with the classification and backoff (:func:`is_lock_contention`,
:func:`lock_retry_pause`) that the asynchronous logger of :mod:`sunfish.tracking.runs` shares.
Nothing here imports mlflow until a client is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:  # POSIX; elsewhere the side-file locks are no-ops (one writer per store in practice)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

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


def local_store(uri: str) -> Path | None:
    """The file or folder a local store URI names: ``sqlite:///<file>``, ``file:<folder>`` or a bare
    path (None for a server, or an in-memory database)."""
    if uri.startswith("sqlite:"):
        name = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
        return Path(os.path.abspath(name)) if name and name != ":memory:" else None
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(os.path.abspath(unquote(urlparse(uri).path)))
    if "://" in uri or ":" in uri.split("/", 1)[0]:
        return None
    return Path(os.path.abspath(uri))


def missing_store(uri: str) -> Path | None:
    """The local store ``uri`` names when it does not exist yet, else None.

    Opening a store creates it (SQLite makes the file on connect, MLflow its tables and an mlruns
    folder), so a command that only reads checks this first: a mistyped path or a command run
    outside the project must fail without leaving an empty store behind.
    """
    path = local_store(uri)
    return path if path is not None and not path.exists() else None


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


# MLflow error codes meaning "this request is invalid" (e.g. a param changed on resume): the record
# is refused, the store is fine, so sending it again can never succeed.
REJECTED_CODES = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST"})


def is_rejection(exc: BaseException) -> bool:
    """MLflow refused the request as invalid (not: the store could not be reached)."""
    return getattr(exc, "error_code", None) in REJECTED_CODES


def is_lock_contention(exc: BaseException) -> bool:
    """SQLite refused the write because another writer holds the database: worth sending again."""
    text = str(exc).lower()
    return "locked" in text or "busy" in text



# Lock contention met by this process: {"retries": n, "seconds": waited}; reported when a stage ends.
LOCK_WAITS = {"retries": 0, "seconds": 0.0}
LOCK_RETRY_ATTEMPTS = 8  # tries of one call in all, the first included


def lock_retry_pause(attempt: int) -> float:
    """Seconds to wait before try ``attempt + 1`` (0-based ``attempt`` just failed): 0.1 s doubling up
    to 2 s, plus up to as much again at random so that two writers do not retry in step; counted in
    :data:`LOCK_WAITS`."""
    delay = min(0.1 * 2**attempt, 2.0)
    pause = delay + random.random() * delay
    LOCK_WAITS["retries"] += 1
    LOCK_WAITS["seconds"] += pause
    return pause


def with_retry(fn, *args, attempts: int = LOCK_RETRY_ATTEMPTS, **kwargs):
    """Retry on SQLite lock contention (two experiments writing one store at once)."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # mlflow wraps sqlite errors in MlflowException
            if attempt == attempts - 1 or not is_lock_contention(exc):
                raise
            time.sleep(lock_retry_pause(attempt))
    return None


# Bounded MLflow HTTP retries: a dead server costs seconds, not MLflow's default minutes
# (7 retries, backoff factor 2, 120 s timeout). MLflow reads these at every request
# (mlflow.utils.rest_utils.http_request), so setting them before the first call is enough.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def bound_http_retries() -> None:
    """Apply :data:`HTTP_DEFAULTS` unless the user set these variables."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


@contextmanager
def store_init_lock(uri: str) -> Iterator[None]:
    """Serialise opening a SQLite store across processes.

    MLflow creates a new store's tables when the first client opens it; two experiments starting at
    once would both try ("table experiments already exists"). The lock is a side file in the temp
    directory, never the database itself (closing any descriptor of the database would drop
    SQLite's own POSIX locks in this process).
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = os.path.abspath(uri[len("sqlite:///") :].split("?", 1)[0])
    with side_file_lock("sunfish-mlflow", db):
        yield


@contextmanager
def side_file_lock(prefix: str, key: str) -> Iterator[None]:
    """An exclusive flock on ``<tmp>/<prefix>-<sha1(key)>.lock``, held for the block (no-op off POSIX)."""
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    name = f"{prefix}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.lock"
    fd = os.open(os.path.join(tempfile.gettempdir(), name), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def open_client(uri: str):
    """An MlflowClient for ``uri`` (creating a new SQLite store safely)."""
    bound_http_retries()
    from mlflow.tracking import MlflowClient

    with store_init_lock(uri):
        return MlflowClient(tracking_uri=uri)
