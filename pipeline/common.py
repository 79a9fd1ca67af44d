"""What every DVC stage does first: find the repo, validate all of params.yaml, set up logging.

Stages read only identifiers from the command line (which stage, which model); every
hyperparameter comes from params.yaml so DVC tracks it.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sunfish.config import Params, flatten, load_params
from sunfish.logs import setup_logging
from sunfish.tracking import repo_root

log = logging.getLogger("sunfish.pipeline")


@dataclass
class StageContext:
    name: str
    root: Path
    params: Params

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def corpora(self) -> Path:
        return self.root / "data" / "corpora"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def flat_params(self, *sections: str) -> dict[str, Any]:
        dumped = self.params.model_dump()
        if sections:
            dumped = {k: v for k, v in dumped.items() if k in sections}
        return flatten(dumped)

    def tracking(self, flat_params: dict[str, Any] | None = None, run_id: str | None = None,
                 stage_params: dict[str, Any] | None = None, system_metrics: bool = False, **tags: Any):
        from sunfish.tracking import stage_run  # imports mlflow lazily, only for stages that log

        t = self.params.tracking
        return stage_run(
            self.name,
            root=repo_root(self.root),
            experiment=t.experiment,
            configured_uri=t.uri,
            enabled=t.enabled,
            flat_params=flat_params,
            stage_params=stage_params,
            tags=tags,
            run_id=run_id,
            system_metrics=system_metrics,
        )


def open_stage(name: str, params_path: str | Path | None = None) -> StageContext:
    """Validate the whole params file before any work (raises ParamsError naming the key)."""
    setup_logging()
    # Outputs are relative to where DVC runs the stage (the workspace: a temporary copy for
    # `dvc exp run --queue`, whose DVC_ROOT still names the main repository); MLflow goes to
    # the main repository (sunfish.tracking.repo_root).
    root = Path.cwd().resolve()
    if params_path is None:
        params_path = root / "params.yaml"
    params = load_params(params_path)
    # MLflow and artifacts go to the main repository, also from a `dvc exp run --queue` copy.
    log.info("stage %s in %s", name, root)
    return StageContext(name=name, root=root, params=params)


# The figure a training stage puts in its DVC metrics file (reports/metrics/<model>.json): one number
# a model, so that `dvc exp show` and `dvc metrics diff` compare what matters in a table that fits.
# Everything a stage records is in its JSON report reports/stages/<name>.json, which is not a metrics
# file; the only other metrics file is evaluate_fluency's (the diffusion model's headline).
TRAINING_HEADLINE = ("val_bpb",)


def write_stage_record(reports: Path, name: str, record: dict, headline: tuple[str, ...] = ()) -> None:
    """reports/stages/<name>.json (the whole record) and, for a ``headline``, reports/metrics/<name>.json:
    its numeric values, named ``<name>.<key>`` (``stage_0.val_bpb``) so that each is one short, unique
    column in `dvc exp show` rather than ``reports/metrics/stage_0.json:val_bpb``."""
    write_json(reports / "stages" / f"{name}.json", record)
    if headline:
        write_json(reports / "metrics" / f"{name}.json",
                   {f"{name}.{k}": v for k, v in numeric_subset(record, headline).items()})


def numeric_subset(record: dict, keys) -> dict:
    """``record``'s values for ``keys`` that are numbers (bools as 0/1); others are left out."""
    out = {}
    for key in keys:
        value = record.get(key)
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (int, float)) and value == value:
            out[key] = value
    return out


def write_json(path: Path, data: Any) -> None:
    from sunfish.training.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})
