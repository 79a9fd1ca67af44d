"""Experiments side by side from MLflow: the data behind `sunfish compare`.

Each pipeline execution (a DVC experiment, or a plain ``dvc repro`` of a commit) is one parent run
in MLflow (see :mod:`sunfish.tracking`); its params are those of the stages that ran, named as in
params.yaml, and its metrics the figures of the evaluate stage (named as in the ``metrics`` of
reports/milestones.json) and evaluate_fluency's headline (as in reports/metrics/fluency.json). A sweep varies a few params, so the table shows only the params whose
values differ between the experiments listed: that is what a reader compares.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["ExperimentRow", "changed_params", "format_rows", "load_experiments"]

FORMATS = ("table", "json", "csv")
BPB = ".best_val_bpb"
FLUENT_ON_TOPIC = "fluency.fluent_on_topic"


class CompareError(ValueError):
    """The store cannot answer the question asked (no such MLflow experiment, nothing matched)."""


@dataclass
class ExperimentRow:
    name: str
    run_id: str
    status: str
    started: str  # ISO 8601, UTC
    commit: str | None
    params: dict[str, str]
    metrics: dict[str, float]
    stage_runs: dict[str, str] = field(default_factory=dict)  # stage -> run id (the latest of each)

    @property
    def models(self) -> list[str]:
        return [k[: -len(BPB)] for k in self.metrics if k.endswith(BPB)]

    def best_bpb(self, model: str) -> float | None:
        return self.metrics.get(model + BPB)

    @property
    def adherence(self) -> float | None:
        return self.metrics.get("cfg.adherence")

    @property
    def fluent_on_topic(self) -> float | None:
        """The diffusion model's headline (evaluate_fluency, test prompts): None where that stage did not run."""
        return self.metrics.get(FLUENT_ON_TOPIC)

    @property
    def checklist(self) -> tuple[int, int] | None:
        """Checklist items passed / measured, over every model evaluated."""
        passed = [v for k, v in self.metrics.items() if k.endswith(".checklist_passed")]
        measured = [v for k, v in self.metrics.items() if k.endswith(".checklist_measured")]
        if not measured:
            return None
        return int(sum(passed)), int(sum(measured))


def load_experiments(
    uri: str,
    mlflow_experiment: str = "sunfish",
    *,
    names: Sequence[str] = (),
    last: int | None = None,
) -> list[ExperimentRow]:
    """The parent runs of ``mlflow_experiment``, newest first.

    ``names``: keep experiments whose name matches one of these shell patterns (``sweep-*``);
    ``last``: keep the newest N after that filter.
    """
    from sunfish.tracking import PARENT_ID_TAG, find_parents, open_client

    client = open_client(uri)
    exp = client.get_experiment_by_name(mlflow_experiment)
    if exp is None:
        raise CompareError(f"no MLflow experiment {mlflow_experiment!r} in {uri} (run the pipeline first)")
    parents = [p for p in find_parents(client, [exp.experiment_id]) if _matches(_name(p), names)]
    if last is not None:
        parents = parents[:last]
    rows = []
    for p in parents:
        children = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{PARENT_ID_TAG}` = '{p.info.run_id}'",
            order_by=["attributes.start_time ASC"], max_results=1000,
        )
        stages = {}
        for child in children:  # ascending: a stage run again keeps its latest run
            stages[child.data.tags.get("dvc.stage", child.info.run_name)] = child.info.run_id
        rows.append(ExperimentRow(
            name=_name(p), run_id=p.info.run_id, status=p.info.status,
            started=datetime.fromtimestamp(p.info.start_time / 1000, tz=UTC).isoformat(timespec="seconds"),
            commit=p.data.tags.get("git.commit"), params=dict(p.data.params), metrics=dict(p.data.metrics),
            stage_runs=stages,
        ))
    return rows


def _name(run: Any) -> str:
    from sunfish.tracking import EXPERIMENT_TAG

    return run.data.tags.get(EXPERIMENT_TAG) or run.info.run_name or run.info.run_id


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def changed_params(rows: Sequence[ExperimentRow]) -> list[str]:
    """Params with more than one value among the experiments that logged them.

    An experiment that only reran evaluate has no training params: a param it lacks is not a change.
    """
    values: dict[str, set[str]] = {}
    for row in rows:
        for key, value in row.params.items():
            values.setdefault(key, set()).add(value)
    return sorted(k for k, v in values.items() if len(v) > 1)


def _model_order(rows: Iterable[ExperimentRow]) -> list[str]:
    order = ["stage_0", "stage_1", "stage_2", "stage_3", "control_1", "control_2", "control_3", "cfg"]
    seen = {m for r in rows for m in r.models}
    return [m for m in order if m in seen] + sorted(seen - set(order))


def _records(rows: Sequence[ExperimentRow], params: Sequence[str], models: Sequence[str]) -> list[dict]:
    out = []
    for r in rows:
        check = r.checklist
        out.append({
            "experiment": r.name,
            **{k: r.params.get(k) for k in params},
            **{f"{m}{BPB}": r.best_bpb(m) for m in models},
            "cfg.adherence": r.adherence,
            FLUENT_ON_TOPIC: r.fluent_on_topic,
            "checklist": f"{check[0]}/{check[1]}" if check else None,
            "status": r.status,
            "run_id": r.run_id,
        })
    return out


def format_rows(
    rows: Sequence[ExperimentRow],
    fmt: str = "table",
    *,
    params: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
) -> str:
    """``table`` for the terminal, ``csv`` (one row per experiment) or ``json`` (everything, with the
    stage run ids). ``params``: the param columns (default: those that differ between the rows)."""
    if fmt not in FORMATS:
        raise CompareError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    params = list(params) if params is not None else changed_params(rows)
    models = list(models) if models is not None else _model_order(rows)
    if fmt == "json":
        return json.dumps([{**asdict(r), "changed_params": {k: r.params.get(k) for k in params}} for r in rows],
                          indent=2)
    records = _records(rows, params, models)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]) if records else ["experiment"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue()
    return _table(records, params, models)


def _table(records: list[dict], params: Sequence[str], models: Sequence[str]) -> str:
    if not records:
        return "no experiments"
    headers = {"experiment": "experiment", **{k: k for k in params},
               **{f"{m}{BPB}": f"bpb {m}" for m in models},
               "cfg.adherence": "adherence", FLUENT_ON_TOPIC: "fluent+topic", "checklist": "checklist", "status": "status", "run_id": "run"}
    cells = [[_cell(key, rec[key]) for key in headers] for rec in records]
    titles = list(headers.values())
    widths = [max(len(t), *(len(row[i]) for row in cells)) for i, t in enumerate(titles)]
    numeric = [key not in ("experiment", "status", "run_id", "checklist") and key not in params for key in headers]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(titles), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    if params:
        out.append("")
        out.append("params shown: those that differ between these experiments")
    return "\n".join(out)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "run_id":
        return str(value)[:12]
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
