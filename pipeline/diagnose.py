"""DVC stage `diagnose`: catch a configuration that cannot train before hours are spent on it.

Runs :func:`sunfish.diagnose.run_diagnostics` for the default models (stage_0 in full, stage_3's
initialisation, gradient-flow and residual checks, cfg in full) on ``data/prepared``, writes
``reports/diagnose.json`` (the report and its MLflow run id), prints the table to the log and logs
every numeric check value as the metric ``diagnose/<check name>``, the status counts, and the JSON
and the table (written to ``state/diagnose/diagnose_table.txt``) as artifacts.

A failure (or a warning with ``diagnose.fail_on_warn``) exits non-zero after printing what to
change, and leaves no stamp, so training (which depends on ``data/diagnose.ok``) does not start.
Otherwise the stamp is written with constant content: a rerun that passes again leaves its hash,
and therefore the training stages, untouched.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.common import log, open_stage, write_json

STAMP_TEXT = "diagnosis passed\n"
TABLE_NAME = "diagnose_table.txt"


def report_metrics(report: dict) -> dict[str, float]:
    """Numeric check values as ``diagnose/<name>`` (dict values as ``diagnose/<name>/<key>``), plus counts."""
    metrics: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, bool):
            metrics[key] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(float(value)):
            metrics[key] = float(value)

    for check in report.get("checks", []):
        name, value = check.get("name"), check.get("value")
        if isinstance(value, dict):
            for k, v in value.items():
                put(f"diagnose/{name}/{k}", v)
        else:
            put(f"diagnose/{name}", value)
    counts = report.get("counts") or {}
    for status in ("ok", "warn", "fail"):
        metrics[f"diagnose/checks_{status}"] = float(counts.get(status, 0))
    metrics["diagnose/status"] = float({"ok": 0, "warn": 1, "fail": 2}.get(report.get("status"), 2))
    if isinstance(report.get("seconds"), (int, float)):
        metrics["diagnose/seconds"] = float(report["seconds"])
    return metrics


def write_table(root: Path, table: str) -> Path:
    """The terminal table as a text file for MLflow (under the git-ignored state/, not a DVC output)."""
    from sunfish.training.checkpoint import atomic_write_text

    path = root / "state" / "diagnose" / TABLE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, table + "\n")
    return path


def run() -> None:
    from sunfish.diagnose import format_table, run_diagnostics
    from sunfish.training.checkpoint import atomic_write_text

    ctx = open_stage("diagnose")
    p = ctx.params
    stamp = ctx.root / "data" / "diagnose.ok"
    out = ctx.reports / "diagnose.json"
    flat = {**ctx.flat_params("train", "staged", "cfg", "diagnose"),
            **{f"presets.{name}.{k}": v for name in {p.staged.preset, p.cfg.preset}
               for k, v in p.presets[name].model_dump().items()}}
    with ctx.tracking(flat) as run:
        report = run_diagnostics(p, ctx.prepared)
        report["mlflow_run_id"] = run.run_id
        write_json(out, report)
        table = format_table(report)
        log.info("diagnose (%s):\n%s", ", ".join(report["models"]), table)
        run.log_metrics(report_metrics(report))
        run.set_tags({"diagnose.status": report["status"]})
        run.log_artifact(out)
        run.log_artifact(write_table(ctx.root, table))
        blocked = report["status"] == "fail" or (report["status"] == "warn" and p.diagnose.fail_on_warn)
        if blocked:
            stamp.unlink(missing_ok=True)  # a stale stamp must not let training start
            bad = [c for c in report["checks"] if c["status"] == "fail" or (p.diagnose.fail_on_warn and c["status"] == "warn")]
            why = "failed" if report["status"] == "fail" else "warned and diagnose.fail_on_warn is true"
            lines = [f"diagnose {why}; training will not start. Change params.yaml as follows, then rerun `dvc repro`:"]
            lines += [f"  - {c['name']}: {c['message']}" for c in bad]
            log.error("\n".join(lines))
            raise SystemExit(1)
    atomic_write_text(stamp, STAMP_TEXT)
    log.info("diagnose %s in %.1f s: wrote %s", report["status"], report["seconds"], stamp)
