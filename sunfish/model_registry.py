"""Each model's best checkpoint in the MLflow model registry, with an alias that follows it.

Why: MLflow users look for models in the registry, not in a run's artifact folders. The evaluate
stage logs every model's best checkpoint as run artifacts (``checkpoints/<model>``); here that
folder becomes a version of the registered model ``sunfish-<model>`` and the alias ``champion``
points at it, so ``sunfish sample models:/sunfish-stage_3@champion`` (or ``models:/<name>/<version>``)
loads it, and the MLflow UI shows which run and which weights each version came from. A rerun whose
best checkpoint has the same weights moves the alias to the version it already has instead of
adding a copy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ALIAS", "PREFIX", "WEIGHTS_TAG", "parse_reference", "register_best", "register_models", "registered_name",
           "resolve"]

log = logging.getLogger(__name__)

PREFIX = "sunfish-"
ALIAS = "champion"
WEIGHTS_TAG = "sunfish.weights_sha256"
PATH_TAG = "sunfish.artifact_path"
_REFERENCE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def registered_name(model: str) -> str:
    return f"{PREFIX}{model}"


def _missing(exc: BaseException) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower()


def register_best(client: Any, *, run_id: str, model: str, weights_sha256: str, step: int,
                  artifact_path: str | None = None, alias: str = ALIAS) -> str:
    """Make ``runs:/<run_id>/<artifact_path>`` (default ``checkpoints/<model>``) the version of
    ``sunfish-<model>`` that ``alias`` names; returns that version. A version with the same weights
    digest is reused, so rerunning evaluate on unchanged weights adds nothing."""
    from mlflow.exceptions import MlflowException

    name = registered_name(model)
    artifact_path = artifact_path or f"checkpoints/{model}"
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
        created = client.create_model_version(
            name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
            tags={WEIGHTS_TAG: weights_sha256, PATH_TAG: artifact_path, "sunfish.step": str(step)},
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


def resolve(client: Any, reference: str) -> tuple[str, str]:
    """(run id, artifact path) of the checkpoint a ``models:/`` reference names."""
    name, alias, version = parse_reference(reference)
    v = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    path = (v.tags or {}).get(PATH_TAG)
    if not path and isinstance(v.source, str) and v.source.startswith(f"runs:/{v.run_id}/"):
        path = v.source[len(f"runs:/{v.run_id}/"):]
    if not v.run_id or not path:
        raise ValueError(f"{reference}: version {v.version} of {name} does not point at a SunFish checkpoint "
                         f"(source {v.source})")
    return v.run_id, path


def register_models(run, models: Mapping[str, dict], root: Path) -> None:
    """Each model's best checkpoint (controls aside: they are yardsticks) as a version of the
    registered model sunfish-<model>, aliased champion, for an evaluate ``run`` (a tracking StageRun). Needs the store:
    when it is down the checkpoints still go to the fallback file, and this says what was skipped."""
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
            _, weights = checkpoint_weights_id(root / best["checkpoint"])
            version = register_best(client, run_id=run.run_id, model=name, weights_sha256=weights, step=best["step"])
            log.info("registered %s step %s as models:/%s@%s (version %s)", name, best["step"],
                     registered_name(name), ALIAS, version)
    except Exception as exc:  # the registry is a convenience: evaluation's figures stand without it
        log.warning("could not register the best checkpoints in the MLflow model registry at %s (%s); "
                    "they are logged as run artifacts checkpoints/<model>", run.uri, str(exc).splitlines()[0][:200])
