"""The stage run of a pipeline stage (:func:`stage_run`) and the parent run grouping an execution's stages.

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

import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sunfish.tracking.runs import StageRun, param_value
from sunfish.tracking.store import (
    LOCK_WAITS,
    artifact_location,
    git_commit,
    open_client,
    params_hash,
    side_file_lock,
    tracking_uri,
    with_retry,
)

log = logging.getLogger(__name__)

PARENT_TAG = "sunfish.parent"  # "true" on the run that groups the stage runs of one execution
EXPERIMENT_TAG = "sunfish.experiment"  # the execution's label, on the parent and on every stage run
PARENT_ID_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by


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
    system_metrics: bool = False,
) -> Iterator[StageRun]:
    """Open an MLflow run named after the stage, tagged for DVC; mark it FAILED if the stage raises.

    ``flat_params`` are params.yaml values: logged on the stage run and on the execution's parent run,
    where a value that disagrees with the parent's starts a new parent. ``stage_params`` describe this
    stage only (which model stage it trains) and go on the stage run alone: stages of one execution
    differ in them, so they must not split the execution over several parents.
    ``run_id`` resumes that run (a resumed training stage continues its run) when the store has it;
    otherwise a new run is created. The store being unreachable never raises: records are kept in
    ``<fallback_dir>/<stage>.jsonl`` (default ``<root>/state/mlflow_fallback``).
    ``system_metrics``: MLflow's own system-metrics monitor (CPU, memory, disk, network, GPU when
    there is one, as ``system/*``) samples the machine while the run is open; a training stage
    asks for it, so a slow run shows whether the machine was busy.
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
            run = with_retry(client.create_run, exp_id, run_name=stage, tags=all_tags)
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
        changed = {f"params.changed.{k}": param_value(v) for k, v in flat_params.items()
                   if k in known_params and known_params[k] != param_value(v)}
        if changed:
            handle.set_tags(changed)
    monitor = start_system_metrics(active_id, uri) if system_metrics and client is not None else None
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
        if monitor is not None:
            stop_system_metrics(monitor)
        handle.close(status, timeout=timeout)
        if parent_id is not None and not handle._failed:
            _end_parent(client, parent_id, status)
        if LOCK_WAITS["retries"]:
            log.info("stage %s waited %.1f s for the SQLite store in %d retries (another writer held it)",
                     stage, LOCK_WAITS["seconds"], LOCK_WAITS["retries"])


SYSTEM_METRICS_INTERVAL = 10.0  # seconds between samples of the system-metrics monitor


def start_system_metrics(run_id: str | None, uri: str, interval: float = SYSTEM_METRICS_INTERVAL):
    """MLflow's SystemMetricsMonitor on ``run_id``, started; None when it cannot run (no psutil, a
    store that refuses it): the figures are a convenience, never a reason to stop training."""
    if not run_id:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1,
                                       resume_logging=False, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as exc:
        log.warning("no system metrics for run %s (%s)", run_id, str(exc).splitlines()[0][:200] if str(exc) else exc)
        return None


def stop_system_metrics(monitor) -> None:
    try:
        monitor.finish()
    except Exception as exc:
        log.warning("system metrics monitor did not stop cleanly (%s)", exc)


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

    wanted = {str(k): param_value(v) for k, v in flat_params.items()}
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
                parent = with_retry(client.create_run, exp_id, run_name=label, tags=parent_tags)
                known: dict[str, str] = {}
            else:
                known = dict(parent.data.params)
                with_retry(client.update_run, parent.info.run_id, "RUNNING")
            parent_id = parent.info.run_id
            new = [Param(k, v) for k, v in wanted.items() if k not in known]
            for i in range(0, len(new), 100):  # log_batch takes at most 100 params
                with_retry(client.log_batch, parent_id, params=new[i : i + 100], synchronous=True)
            latest = {k: v for k, v in tags.items() if k != EXPERIMENT_TAG}
            if latest:  # the commit an experiment name was last run at
                with_retry(client.log_batch, parent_id, tags=[RunTag(k, v) for k, v in latest.items()],
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
    return with_retry(client.search_runs, experiment_ids, filter_string=query, max_results=max_results,
                       order_by=["attributes.start_time DESC"])


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _end_parent(client: Any, parent_id: str, status: str) -> None:
    """The parent's status follows its latest stage: FINISHED, FAILED or KILLED, with that end time."""
    try:
        with_retry(client.set_terminated, parent_id, status, int(time.time() * 1000))
    except Exception as exc:
        log.warning("could not update the parent MLflow run %s (%s)", parent_id, exc)


def _reopen(client: Any, run_id: str, uri: str):
    """The run to continue, set RUNNING again; None when the store does not have it."""
    try:
        run = with_retry(client.get_run, run_id)
    except Exception as exc:
        if getattr(exc, "error_code", None) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        run = None
    if run is None or run.info.lifecycle_stage != "active":
        log.info("MLflow run %s not found in %s; starting a new run", run_id, uri)
        return None
    with_retry(client.update_run, run_id, "RUNNING")
    log.info("MLflow run %s resumed", run_id)
    return run


def _experiment_id(client: Any, experiment: str, root: Path, uri: str) -> str:
    """The experiment's id, created if new: with artifacts in <root>/mlartifacts for a local store;
    a tracking server chooses itself (its --artifacts-destination, shared by the team)."""
    exp = with_retry(client.get_experiment_by_name, experiment)
    if exp is not None:
        return exp.experiment_id
    local = uri.startswith(("sqlite:", "file:", "/"))
    try:
        return with_retry(client.create_experiment, experiment,
                           artifact_location=artifact_location(root) if local else None)
    except Exception:  # created concurrently by another experiment
        return with_retry(client.get_experiment_by_name, experiment).experiment_id
