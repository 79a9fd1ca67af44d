"""Checkpoints that live in MLflow: ``models:/``, ``runs:/`` and ``mlflow:`` references, downloaded once.

Why: an experiment's winner should be sampled after its DVC workspace is gone. The evaluate stage
logs each model's best checkpoint as the artifact directory ``checkpoints/<model>`` of its run and,
when its weights are new, as an MLflow logged model registered as ``sunfish-<model>``
(:mod:`sunfish.model_registry`). :func:`fetch_checkpoint` downloads the checkpoint folder once into
a cache directory and the usual loader (with its weights digest check) takes it from there.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sunfish.errors import CheckpointError

log = logging.getLogger(__name__)

MLFLOW_PREFIXES = ("runs:/", "mlflow:", "models:/")
CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def is_mlflow_reference(text: str | Path) -> bool:
    return str(text).startswith(MLFLOW_PREFIXES)


def checkpoint_cache_dir() -> Path:
    """$SUNFISH_CACHE/mlflow, else ~/.cache/sunfish/mlflow: downloaded checkpoints, keyed by the id of
    the run or logged model that holds them."""
    base = os.environ.get("SUNFISH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sunfish"
    return Path(base) / "mlflow"


def fetch_checkpoint(reference: str, *, uri: str, mlflow_experiment: str = "sunfish",
                     cache_dir: Path | None = None) -> Path:
    """The local directory of a checkpoint logged to MLflow, downloaded on first use.

    ``models:/sunfish-<model>@champion`` (or ``/<version>``) is a registered version (the evaluate
    stage registers each model's best checkpoint); ``runs:/<run_id>/<artifact path>`` names the
    artifact directory exactly (as the MLflow UI shows it); ``mlflow:<experiment>/<model>`` takes the best checkpoint of ``model`` from the latest
    evaluate run of that experiment (a DVC experiment name, a ``workspace@<commit>`` label, or the
    id of the parent or evaluate run).
    """
    if reference.startswith("models:/"):
        from sunfish.model_registry import resolve
        from sunfish.tracking import bound_http_retries, open_client

        _require_store(uri, reference)
        bound_http_retries()
        try:
            client = open_client(uri)
            found = resolve(client, reference)
            if found.model_id:  # a logged model: its folder of artifacts
                root = client.get_logged_model(found.model_id).artifact_location.rstrip("/")
                source = {"artifact_uri": f"{root}/{found.path}"}
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        except Exception as exc:
            raise CheckpointError(f"{reference}: not in the model registry at {uri} ({_first_line(exc)})") from exc
        if found.model_id:
            dest = (cache_dir or checkpoint_cache_dir()) / found.model_id / found.path
            return _cached(dest, reference) or _download(source, uri, dest, reference,
                                                         f"logged model {found.model_id}", found.path)
        run_id, artifact_path = found.run_id, found.path
    elif reference.startswith("runs:/"):
        run_id, _, artifact_path = reference[len("runs:/"):].partition("/")
        if not run_id or not artifact_path.strip("/"):
            raise CheckpointError(f"{reference}: expected runs:/<run_id>/checkpoints/<model>")
        artifact_path = artifact_path.strip("/")
    else:
        target, _, model = reference[len("mlflow:"):].rpartition("/")
        if not target or not model:
            raise CheckpointError(f"{reference}: expected mlflow:<experiment or run id>/<model>, e.g. mlflow:exp-1a2b/cfg")
        run_id = _evaluate_run_for(target, model, uri, mlflow_experiment)
        artifact_path = f"checkpoints/{model}"
    dest = (cache_dir or checkpoint_cache_dir()) / run_id / artifact_path
    return _cached(dest, reference) or _download({"run_id": run_id, "artifact_path": artifact_path}, uri, dest,
                                                 reference, f"run {run_id}", artifact_path)


def _cached(dest: Path, reference: str) -> Path | None:
    if all((dest / f).is_file() for f in CHECKPOINT_FILES):
        log.info("using %s downloaded before to %s", reference, dest)
        return dest
    return None


def _require_store(uri: str, reference: str) -> None:
    """Refuse a local store that does not exist: opening it would leave an empty mlflow.db (or
    mlruns/) behind in whatever folder the command ran from, and it could not hold the checkpoint."""
    from sunfish.tracking import missing_store

    gone = missing_store(uri)
    if gone is not None:
        raise CheckpointError(f"{reference}: no MLflow store at {gone}; run inside the project that logged it, "
                              "or name its store (--uri, MLFLOW_TRACKING_URI)")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _download(source: dict[str, Any], uri: str, dest: Path, reference: str, holder: str, path: str) -> Path:
    """Download the checkpoint folder ``source`` names (``run_id`` and ``artifact_path``, or an
    ``artifact_uri``) into a temporary sibling of ``dest``, then rename: an interrupted download is
    never mistaken for a complete checkpoint."""
    import mlflow.artifacts

    from sunfish.tracking import bound_http_retries

    _require_store(uri, reference)
    bound_http_retries()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stdout may be --format json
    try:
        listed = {Path(f.path).name for f in mlflow.artifacts.list_artifacts(**source, tracking_uri=uri)}
    except Exception as exc:
        raise CheckpointError(f"{reference}: MLflow at {uri} cannot list it ({exc})") from exc
    missing = [f for f in CHECKPOINT_FILES if f not in listed]
    if missing:
        raise CheckpointError(
            f"{reference}: {holder} has no checkpoint at {path} (missing {', '.join(missing)}); "
            "the evaluate stage logs checkpoints/<model> when eval.log_checkpoints is true")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            got = Path(mlflow.artifacts.download_artifacts(**source, dst_path=str(tmp), tracking_uri=uri))
        except Exception as exc:
            raise CheckpointError(f"{reference}: could not download it from MLflow at {uri} ({exc})") from exc
        if dest.exists():
            shutil.rmtree(dest)
        got.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("downloaded %s to %s", reference, dest)
    return dest


def _evaluate_run_for(target: str, model: str, uri: str, mlflow_experiment: str) -> str:
    """The run id whose checkpoints/<model> is the best checkpoint of experiment ``target``."""
    from sunfish.tracking import EXPERIMENT_TAG, PARENT_ID_TAG, PARENT_TAG, find_parents, open_client

    _require_store(uri, f"mlflow:{target}/{model}")
    client = open_client(uri)
    exp = client.get_experiment_by_name(mlflow_experiment)
    if exp is None:
        raise CheckpointError(f"no MLflow experiment {mlflow_experiment!r} in {uri}")
    best_tag = f"sunfish.best.{model}"
    try:
        run = client.get_run(target)
    except Exception:  # not a run id: an experiment label
        run = None
    if run is not None and best_tag in run.data.tags:
        return run.info.run_id
    if run is not None and run.data.tags.get(PARENT_TAG) == "true":
        parents = [run]
    else:
        parents = find_parents(client, [exp.experiment_id], label=target)
    if not parents:
        raise CheckpointError(f"mlflow:{target}/{model}: no experiment {target!r} in {uri} "
                              f"(`sunfish compare` lists them)")
    for parent in parents:  # newest first: the latest execution that evaluated this model
        found = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{PARENT_ID_TAG}` = '{parent.info.run_id}' and tags.`{best_tag}` != ''",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if found:
            return found[0].info.run_id
    raise CheckpointError(f"mlflow:{target}/{model}: experiment {parents[0].data.tags.get(EXPERIMENT_TAG, target)!r} "
                          f"has no evaluate run with a best checkpoint of {model!r}")
