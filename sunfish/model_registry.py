"""Each model's best checkpoint as an MLflow logged model in the model registry, with an alias that follows it.

Why: MLflow users look for models in the registry and open them with ``mlflow.pyfunc.load_model``,
not in a run's artifact folders. The evaluate stage logs every model's best checkpoint as run
artifacts (``checkpoints/<model>``); here it also becomes an MLflow logged model (a pyfunc whose
artifact is the checkpoint folder: :mod:`sunfish.mlflow_model`), output of the evaluate run, and a
version of the registered model ``sunfish-<model>`` that the alias ``champion`` points at. So
``sunfish sample models:/sunfish-stage_3@champion`` (or ``models:/<name>/<version>``) and
``mlflow.pyfunc.load_model("models:/sunfish-stage_3@champion")`` both load it, and the MLflow UI
shows which run and which weights each version came from. A rerun whose best checkpoint has the same
weights moves the alias to the version it already has instead of logging a copy. When the store is
down at that moment, the registration is kept in the run's fallback file, with a copy of the
checkpoint's files, and `sunfish tracking sync` registers it later (:func:`replay_registration`).

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
           "register_best", "register_models", "registered_name", "replay_registration", "resolve"]

log = logging.getLogger(__name__)

PREFIX = "sunfish-"
ALIAS = "champion"
WEIGHTS_TAG = "sunfish.weights_sha256"
PATH_TAG = "sunfish.artifact_path"
CHECKPOINT_PATH = "artifacts/checkpoint"  # the checkpoint folder inside a logged model's artifacts
_REFERENCE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
_LOGGED_MODEL = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)/?$")
FLUSH_TIMEOUT = 120.0  # seconds register_models waits for the run's queued records (checkpoint uploads) first


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
                  alias: str | None = ALIAS) -> str:
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
    if alias:
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
    tracking StageRun). When the store cannot be reached (the run's records already go to its
    fallback file, or registering fails other than by MLflow refusing the request as invalid), the
    registration is kept in the run's fallback file with a copy of the checkpoint's files
    (:meth:`sunfish.tracking.StageRun.keep_registration`), and `sunfish tracking sync` registers it
    (:func:`replay_registration`). Any failure here is a warning, never the stage's end (evaluation's
    figures stand without the registry)."""
    if not getattr(run, "enabled", False):
        return
    chosen = {name: model["best"] for name, model in models.items() if not model.get("is_control")}
    if not chosen:
        return
    from sunfish.evaluation.milestones import checkpoint_weights_id
    from sunfish.mlflow_model import FILES, OPTIONAL_FILES
    from sunfish.tracking import is_rejection, open_client

    run.flush(FLUSH_TIMEOUT)  # what the run logged goes first, and a store that failed meanwhile shows
    client, down = None, "its records go to the fallback file"
    if getattr(run, "client", None) is not None and not getattr(run, "offline", False) and run.run_id:
        try:
            client = open_client(run.uri)
        except Exception as exc:
            down = _first_line(exc)
    kept = []
    for name, best in chosen.items():
        try:
            checkpoint = root / best["checkpoint"]
            missing = [f for f in FILES if not (checkpoint / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{checkpoint}: not a SunFish checkpoint (missing {', '.join(missing)})")
            _, weights = checkpoint_weights_id(checkpoint)
        except Exception as exc:
            log.warning("not registering %s in the MLflow model registry: %s", name, _first_line(exc))
            continue
        if client is not None:
            try:
                version = register_best(client, run_id=run.run_id, model=name, weights_sha256=weights,
                                        step=best["step"], checkpoint=checkpoint)
                log.info("registered %s step %s as models:/%s@%s (version %s)", name, best["step"],
                         registered_name(name), ALIAS, version)
                continue
            except Exception as exc:
                if is_rejection(exc):  # the store is fine and refused it: sending it again cannot succeed
                    log.warning("MLflow at %s refused to register %s (%s); not registered", run.uri, name,
                                _first_line(exc))
                    continue
                client, down = None, _first_line(exc)  # the store is down: keep this one and the rest
        try:
            run.keep_registration(model=name, step=best["step"], weights_sha256=weights, checkpoint=checkpoint,
                                  files=(*FILES, *OPTIONAL_FILES), alias=ALIAS)
            kept.append(name)
        except Exception as exc:
            log.warning("could not register %s in the MLflow model registry at %s (%s), nor keep the registration "
                        "for `sunfish tracking sync` (%s); rerun evaluate to register it", name, run.uri, down,
                        _first_line(exc))
    if kept:
        log.warning("could not register the best checkpoints of %s in the MLflow model registry at %s (%s); "
                    "the registrations are kept in %s for `sunfish tracking sync` (the checkpoints are also logged "
                    "as run artifacts checkpoints/<model>)", ", ".join(kept), run.uri, down, run.fallback_path)


def replay_registration(client: Any, run_id: str, fields: Mapping[str, Any]) -> str | None:
    """Register what :func:`register_models` kept while the store was down: the handler `sunfish
    tracking sync` gives :func:`sunfish.tracking.sync_file` for "register" records. ``fields`` are
    the record's (model, step, weights_sha256, alias, and checkpoint: the kept copy); returns the
    version, or None (a warning says why) when the kept copy is not that checkpoint any more.
    Replaying twice adds nothing: :func:`register_best` reuses the version with these weights."""
    from sunfish.evaluation.milestones import checkpoint_weights_id
    from sunfish.mlflow_model import FILES

    model, checkpoint = str(fields["model"]), Path(fields["checkpoint"])
    missing = [f for f in FILES if not (checkpoint / f).is_file()]
    weights = None if missing else checkpoint_weights_id(checkpoint)[1]
    if weights != fields["weights_sha256"]:
        log.warning("the kept checkpoint %s of %s %s; its registration is skipped", checkpoint, model,
                    f"lacks {', '.join(missing)}" if missing else "holds other weights than the record names")
        return None
    alias = fields.get("alias") or ALIAS
    newer = _newer_holder(client, registered_name(model), alias, fields.get("kept_at"), weights)
    version = register_best(client, run_id=run_id, model=model, weights_sha256=weights, step=int(fields["step"]),
                            checkpoint=checkpoint, alias=None if newer else alias)
    if newer:
        log.info("registered %s step %s as version %s, kept while the store was down; %s stays on version %s, "
                 "registered after this one was kept", model, fields["step"], version, alias, newer)
    else:
        log.info("registered %s step %s as models:/%s@%s (version %s), kept while the store was down", model,
                 fields["step"], registered_name(model), alias, version)
    return version


def _newer_holder(client: Any, name: str, alias: str, kept_at: float | None, weights: str) -> str | None:
    """The version ``alias`` names when it holds other weights and was registered after ``kept_at``
    (a later evaluate reached the store first: a late replay must not move the alias back), else None."""
    if kept_at is None:
        return None
    try:
        current = client.get_model_version_by_alias(name, alias)
    except Exception:  # no such model or alias yet
        return None
    if (current.tags or {}).get(WEIGHTS_TAG) == weights:
        return None
    created = getattr(current, "creation_timestamp", None)
    return str(current.version) if created is not None and int(created) > float(kept_at) * 1000 else None


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
