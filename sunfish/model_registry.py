"""Each model's best checkpoint as an MLflow logged model in the model registry, with an alias that follows it.

Why: MLflow users look for models in the registry and open them with ``mlflow.pyfunc.load_model``,
not in a run's artifact folders. The evaluate stage logs every model's best checkpoint as run
artifacts (``checkpoints/<model>``); here it also becomes an MLflow logged model (a pyfunc whose
artifact is the checkpoint folder: :mod:`sunfish.mlflow_model`), output of the evaluate run, and a
version of the registered model ``sunfish-<model>`` that the alias ``champion`` points at. So
``sunfish sample models:/sunfish-stage_3@champion`` (or ``models:/<name>/<version>``) and
``mlflow.pyfunc.load_model("models:/sunfish-stage_3@champion")`` both load it, and the MLflow UI
shows which run and which weights each version came from. A rerun whose best checkpoint has the same
weights moves the alias to the version it already has instead of logging a copy.

Versions registered before logged models point at the run artifacts (``runs:/<run>/checkpoints/<model>``);
:func:`resolve` still finds those.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["ALIAS", "CHECKPOINT_PATH", "PREFIX", "WEIGHTS_TAG", "Located", "log_checkpoint_model", "parse_reference",
           "register_best", "register_models", "registered_name", "resolve"]

log = logging.getLogger(__name__)

PREFIX = "sunfish-"
ALIAS = "champion"
WEIGHTS_TAG = "sunfish.weights_sha256"
PATH_TAG = "sunfish.artifact_path"
CHECKPOINT_PATH = "artifacts/checkpoint"  # the checkpoint folder inside a logged model's artifacts
_REFERENCE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
_LOGGED_MODEL = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)/?$")


class Located(NamedTuple):
    """Where a registered version's checkpoint folder is: ``path`` inside the logged model
    ``model_id``, or (a version registered before logged models) inside the artifacts of ``run_id``."""

    run_id: str | None
    model_id: str | None
    path: str


def registered_name(model: str) -> str:
    return f"{PREFIX}{model}"


def _missing(exc: BaseException) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower()


def log_checkpoint_model(client: Any, checkpoint: Path, *, run_id: str, model: str, weights_sha256: str,
                         step: int) -> str:
    """Log ``checkpoint`` as an MLflow logged model, output of run ``run_id``; returns its model id.

    What ``mlflow.pyfunc.log_model`` does, through ``client``: that function logs to the process's
    active run and tracking URI, while SunFish names its store and run explicitly (the evaluate run
    is held by a :class:`sunfish.tracking.StageRun`; resuming it as the active run would end it).
    """
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    from sunfish import mlflow_model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in the stage's log
    kind = _checkpoint_kind(checkpoint)
    logged = client.create_logged_model(
        client.get_run(run_id).info.experiment_id, name=model, source_run_id=run_id, model_type=f"sunfish-{kind}",
        tags={WEIGHTS_TAG: weights_sha256, "sunfish.step": str(step), "sunfish.model": model},
    )
    try:
        with tempfile.TemporaryDirectory(prefix="sunfish-mlflow-") as tmp:
            local = Path(tmp) / "model"
            mlflow_model.save(checkpoint, local, mlflow_model=Model(
                artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                model_id=logged.model_id))
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    except BaseException:
        try:  # the UI shows it as failed rather than pending forever; the store may be what failed
            client.finalize_logged_model(logged.model_id, "FAILED")
        except Exception:
            log.debug("could not mark logged model %s as failed", logged.model_id, exc_info=True)
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id


def _checkpoint_kind(checkpoint: Path) -> str:
    from sunfish.training.checkpoint import read_checkpoint_meta

    return str(read_checkpoint_meta(checkpoint)[1].get("kind", "unknown"))


@contextmanager
def _process_tracking_uri(uri: str | None) -> Iterator[None]:
    """MLflow's SQL model registry looks the logged model of a ``models:/<model_id>`` source up
    through the process-wide tracking URI, not the client's (a TODO in MLflow's
    store/model_registry/sqlalchemy_store.py); point that at the client's store for the call.
    ``set_tracking_uri`` also sets MLFLOW_TRACKING_URI (and kept it equal to any URI set before),
    so unsetting it and restoring that variable gives back the URI the process resolved before."""
    import mlflow

    if not uri:
        yield
        return
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def register_best(client: Any, *, run_id: str, model: str, weights_sha256: str, step: int, checkpoint: Path,
                  alias: str = ALIAS) -> str:
    """Make the checkpoint the version of ``sunfish-<model>`` that ``alias`` names; returns that
    version. A version with the same weights digest is reused (nothing is logged), so rerunning
    evaluate on unchanged weights adds nothing; new weights are logged as a logged model first
    (:func:`log_checkpoint_model`) and registered from it."""
    from mlflow.exceptions import MlflowException

    name = registered_name(model)
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not _missing(exc):
            raise
        client.create_registered_model(name, description=f"SunFish {model}: the best milestone checkpoint of each "
                                                          "evaluate run (sunfish sample models:/" f"{name}@{alias})")
    same = [v for v in client.search_model_versions(f"name='{name}'")
            if (v.tags or {}).get(WEIGHTS_TAG) == weights_sha256]
    if same:
        version = str(max(int(v.version) for v in same))
    else:
        model_id = log_checkpoint_model(client, Path(checkpoint), run_id=run_id, model=model,
                                        weights_sha256=weights_sha256, step=step)
        with _process_tracking_uri(getattr(client, "tracking_uri", None)):
            created = client.create_model_version(
                name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
                tags={WEIGHTS_TAG: weights_sha256, PATH_TAG: CHECKPOINT_PATH, "sunfish.step": str(step)},
                description=f"{model} step {step}")
        version = str(created.version)
    client.set_registered_model_alias(name, alias, version)
    return version


def parse_reference(reference: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    m = _REFERENCE.match(reference)
    if not m:
        raise ValueError(f"{reference}: expected models:/<name>@<alias> or models:/<name>/<version>, "
                         f"e.g. models:/{registered_name('stage_3')}@{ALIAS}")
    return m["name"], m["alias"], m["version"]


def resolve(client: Any, reference: str) -> Located:
    """Where the checkpoint a ``models:/`` reference names lives (see :class:`Located`)."""
    name, alias, version = parse_reference(reference)
    v = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    source = v.source if isinstance(v.source, str) else ""
    logged = _LOGGED_MODEL.match(source)
    model_id = getattr(v, "model_id", None) or (logged["model_id"] if logged else None)
    path = (v.tags or {}).get(PATH_TAG)
    if model_id:
        return Located(v.run_id, model_id, path or CHECKPOINT_PATH)
    if not path and source.startswith(f"runs:/{v.run_id}/"):
        path = source[len(f"runs:/{v.run_id}/"):]
    if not v.run_id or not path:
        raise ValueError(f"{reference}: version {v.version} of {name} does not point at a SunFish checkpoint "
                         f"(source {v.source})")
    return Located(v.run_id, None, path)


def register_models(run, models: Mapping[str, dict], root: Path) -> None:
    """Each model's best checkpoint (controls aside: they are yardsticks) as a logged model and a
    version of the registered model sunfish-<model>, aliased champion, for an evaluate ``run`` (a
    tracking StageRun). Needs the store: when it is down the checkpoints still go to the fallback
    file as run artifacts, and this says what was skipped; any failure here is a warning, never the
    stage's end (evaluation's figures stand without the registry)."""
    if not getattr(run, "enabled", False) or getattr(run, "client", None) is None or not run.run_id:
        return
    from sunfish.evaluation.milestones import checkpoint_weights_id
    from sunfish.tracking import open_client

    try:
        client = open_client(run.uri)
        for name, model in models.items():
            if model.get("is_control"):
                continue
            best = model["best"]
            checkpoint = root / best["checkpoint"]
            _, weights = checkpoint_weights_id(checkpoint)
            version = register_best(client, run_id=run.run_id, model=name, weights_sha256=weights, step=best["step"],
                                    checkpoint=checkpoint)
            log.info("registered %s step %s as models:/%s@%s (version %s)", name, best["step"],
                     registered_name(name), ALIAS, version)
    except Exception as exc:  # the registry is a convenience: evaluation's figures stand without it
        log.warning("could not register the best checkpoints in the MLflow model registry at %s (%s); "
                    "they are logged as run artifacts checkpoints/<model>", run.uri, str(exc).splitlines()[0][:200])
