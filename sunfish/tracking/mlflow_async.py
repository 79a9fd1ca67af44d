"""MLflow's asynchronous logging, as :class:`sunfish.tracking.runs.StageRun` relies on it.

``MlflowClient.log_batch(..., synchronous=False)`` puts the batch on a queue owned by the store
object (one per tracking URI in a process: MLflow caches stores), which a thread of MLflow's
hands to a pool of ten workers; a second pool resolves the ``RunOperations`` futures it returns.
What StageRun needs beyond that public call is gathered here, each piece with the reason it is
needed, so an MLflow upgrade that moves them shows in one place (and in
``tests/test_tracking_async.py``, which checks each against the installed MLflow):

- the outcome of a batch: the futures of ``RunOperations`` (``_operation_futures``; its public
  ``wait()`` blocks, and a failure reaches nobody who does not look);
- releasing a store's queue when the process's last run on it closes, so its threads do not
  outlive the run (MLflow would otherwise keep them until exit, and join them there);
- closing open runs at interpreter exit before ``concurrent.futures`` stops MLflow's pools, so what
  they logged still reaches the store;
- MLflow's own ERROR line for each failed batch, dropped for runs whose outcome StageRun reports
  itself (a batch sent again on lock contention was not lost).

With ``MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS`` set, MLflow merges queued batches of one run into
one call and sets a failure on the first of them only; StageRun keeps one batch of a run in flight,
so there is never a second one of its own to merge and hide a failure in.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

QUEUE_LOGGER = "mlflow.utils.async_logging.async_logging_queue"  # where MLflow logs a failed batch


def futures_of(operations: Any) -> list[Any]:
    """The futures of what ``log_batch(synchronous=False)`` returned (none for a client that logged
    synchronously and returned None). Raises when MLflow no longer exposes them: better every
    record in the fallback file than records whose failure nobody sees."""
    if operations is None:
        return []
    futures = getattr(operations, "_operation_futures", None)
    if futures is None:
        raise RuntimeError(f"log_batch(synchronous=False) returned {type(operations).__name__} without "
                           "_operation_futures; SunFish cannot tell whether MLflow took the records")
    return list(futures)


def first_error(futures: Iterable[Any]) -> BaseException | None:
    """The first failure among finished futures; None when they all succeeded."""
    for future in futures:
        error = RuntimeError("MLflow cancelled the batch") if future.cancelled() else future.exception()
        if error is not None:
            return error
    return None


def store_of(client: Any) -> Any:
    """The store object behind an MlflowClient, which owns the async queue (None for stand-ins, or a
    store that cannot be made)."""
    try:
        store = getattr(getattr(client, "_tracking_client", None), "store", None)
    except Exception:
        return None
    return store if hasattr(store, "shut_down_async_logging") else None


def shut_down_queue(store: Any) -> None:
    """Stop a store's queue and its threads (the next async call starts them again). Takes up to a
    second, the queue thread's poll interval; waits for batches still in the pool, so call it only
    when none is stuck there."""
    try:
        store.shut_down_async_logging()
    except Exception as exc:
        log.debug("MLflow's async logging queue did not shut down cleanly (%s)", exc)


class _ReportedElsewhere(logging.Filter):
    """Drops MLflow's "Run Id <id>: Failed to log run data" for the runs ``owned()`` names."""

    def __init__(self, owned: Callable[[], set[str]]):
        super().__init__()
        self.owned = owned

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith("Run Id ") or "Failed to log run data" not in text:
            return True
        return text[len("Run Id "):].split(":", 1)[0] not in self.owned()


_installed = threading.Lock()
_done = False


def install_process_hooks(close_open_runs: Callable[[], None], owned_run_ids: Callable[[], set[str]]) -> None:
    """Once per process: ``close_open_runs`` at interpreter exit, and the filter on MLflow's log.

    ``concurrent.futures`` stops its pools in a ``threading`` exit hook, which runs before
    ``atexit`` hooks; those hooks run last-registered first, so ours, registered after importing
    ``concurrent.futures.thread``, runs while MLflow's pools still take work. The ``atexit`` hook is
    the last resort (no such hook in this Python, or a run opened during shutdown): what cannot be
    sent by then goes to the fallback file.
    """
    global _done
    with _installed:
        if _done:
            return
        _done = True
        import concurrent.futures.thread  # noqa: F401  (registers its own exit hook first)

        logging.getLogger(QUEUE_LOGGER).addFilter(_ReportedElsewhere(owned_run_ids))
        atexit.register(close_open_runs)
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            try:
                register(close_open_runs)
            except RuntimeError:  # the interpreter is already shutting down
                pass
