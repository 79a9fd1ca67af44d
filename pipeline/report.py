"""DVC stage `report`: one self-contained HTML file and a Markdown twin, logged to MLflow."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

from pipeline.common import log, open_stage
from pipeline.train_staged import DESCRIPTIONS
from sunfish.config import CONTROL_NAMES, EVALUATED_MODELS, STAGED_MODELS
from sunfish.evaluation.components import NOT_MEASURED_ONE_SEED, component_deltas, read_runs
from sunfish.tracking import git_commit, repo_root, tracking_uri


def _read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return default


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as fh:
        rows = []
        for row in csv.DictReader(fh):
            rows.append({k: _num(v) for k, v in row.items()})
        return rows


def _num(v: str):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v if v != "" else None
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def build_summary(ctx) -> dict:
    reports = ctx.reports
    milestones = _read_json(reports / "milestones.json", {"models": {}})
    root = repo_root(ctx.root)
    summary = {
        "title": ctx.params.report.title,
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(ctx.root),
        "params": ctx.flat_params(),
        "mlflow": {"tracking_uri": tracking_uri(root, ctx.params.tracking.uri), "experiment": ctx.params.tracking.experiment,
                   "runs": {}},
        "data": _read_json(ctx.prepared / "meta.json", {}),
        "diagnose": _read_json(reports / "diagnose.json", {}),
        "models": {},
        "stage_comparison": [],
        # the seeds' figures live in the training metrics, which evaluate does not read
        "components": component_deltas(milestones.get("models") or {}, read_runs(reports / "stages")),
        "judge": milestones.get("judge"),
        "fluency": _read_json(reports / "fluency.json", {}),
        "next_steps": [],
    }
    prep = _read_json(reports / "stages" / "prepare.json", {})
    summary["mlflow"]["runs"]["prepare"] = prep.get("mlflow_run_id")
    summary["mlflow"]["runs"]["evaluate"] = milestones.get("mlflow_run_id")
    previous_bpb = None
    for name in EVALUATED_MODELS:
        train_metrics = _read_json(reports / "stages" / f"{name}.json", {})
        evaluated = milestones.get("models", {}).get(name, {})
        if (not train_metrics and not evaluated) or train_metrics.get("trained") is False:
            continue  # a control not trained (identical to its stage) is explained in the component table
        summary["mlflow"]["runs"][name] = train_metrics.get("mlflow_run_id")
        entry = {
            "kind": "diffusion" if name == "cfg" else "staged",
            "description": train_metrics.get("description") or DESCRIPTIONS.get(int(name[-1]), "") if name in STAGED_MODELS
            else train_metrics.get("description", ""),
            "curves": {"train": _read_csv(reports / "curves" / name / "train.csv"),
                       "val": _read_csv(reports / "curves" / name / "val.csv")},
            "tokens_per_s": train_metrics.get("tokens_per_s"),
            "train_seconds": train_metrics.get("train_seconds"),
            **evaluated,
        }
        summary["models"][name] = entry
        final_bpb = (evaluated.get("milestones") or [{}])[-1].get("val_bpb", train_metrics.get("val_bpb"))
        if name in STAGED_MODELS:
            summary["stage_comparison"].append({
                "model": name, "val_bpb": final_bpb,
                "delta_bpb_vs_previous": None if previous_bpb is None or final_bpb is None else final_bpb - previous_bpb,
                "tokens_per_s": train_metrics.get("tokens_per_s"),
            })
            previous_bpb = final_bpb
        elif name in CONTROL_NAMES:
            # a control continues stage N-1 without stage N's component: compare it with stage N-1
            before = f"stage_{int(name[-1]) - 1}"
            prev = next((r["val_bpb"] for r in summary["stage_comparison"] if r["model"] == before), None)
            summary["stage_comparison"].append({
                "model": name, "val_bpb": final_bpb, "control": True,
                "delta_bpb_vs_previous": None if prev is None or final_bpb is None else final_bpb - prev,
                "tokens_per_s": train_metrics.get("tokens_per_s"),
            })
    order = {m: i for i, m in enumerate(("stage_0", "stage_1", "control_1", "stage_2", "control_2", "stage_3", "control_3"))}
    summary["stage_comparison"].sort(key=lambda r: order.get(r["model"], len(order)))
    summary["next_steps"] = next_steps(summary)
    return summary


def next_steps(summary: dict) -> list[str]:
    """Plain advice derived from the measurements."""
    tips = []
    diag = summary.get("diagnose") or {}
    if diag.get("status") in ("warn", "fail"):
        bad = [c["name"] for c in diag.get("checks", []) if c.get("status") != "ok"]
        tips.append(f"Diagnose flagged: {', '.join(bad)}. See the diagnose table below.")
    for name, m in summary["models"].items():
        if not isinstance(m, dict) or m.get("is_control") or name in CONTROL_NAMES:
            continue
        failed = [c["name"] for c in m.get("checklist", []) if c.get("passed") is False]
        if failed:
            tips.append(f"{name}: not yet met: {', '.join(failed)}. Train longer "
                        f"(dvc exp run -S train.max_steps=...) or use a larger preset.")
    for row in summary.get("components") or []:
        if row.get("final") and row.get("verdict") == "hurts":
            tips.append(f"{row['component']} made {row['stage']} worse than its control at equal steps "
                        f"({row['delta_bpb']:+.4f} bpb): check its settings before training it longer.")
        elif row.get("final") and row.get("verdict") == NOT_MEASURED_ONE_SEED:
            tips.append(f"{row['component']}: one seed gives no verdict; set staged.seeds >= 2 (dvc exp run -S "
                        "staged.seeds=3) to measure the noise floor.")
        elif row.get("final") and row.get("extra_steps_measurable") is False:
            tips.append(f"{row['component']}: {row['stage']}'s extra steps alone did not move validation bpb beyond "
                        f"the seeds' noise, so the component had no room to show an effect: raise "
                        f"staged.{row['stage']}.max_steps.")
    cfg = summary["models"].get("cfg")
    if cfg and cfg.get("milestones"):
        best_step = (cfg.get("best") or {}).get("step")
        judged = next((m for m in cfg["milestones"] if m.get("step") == best_step), cfg["milestones"][-1])
        # chosen on the dev prompts' rows: the test curve is for reporting, not for choosing
        sweep = [g for g in judged.get("guidance") or [] if g.get("fluent_on_topic") is not None]
        if sweep:
            best = max(sweep, key=lambda g: (g["fluent_on_topic"], -g["scale"]))
            unguided = min(sweep, key=lambda g: g["scale"])
            if best["fluent_on_topic"] > unguided["fluent_on_topic"]:
                tips.append(f"Most samples fluent and on topic on the dev prompts ({best['fluent_on_topic']:.0%}) at "
                            f"guidance {best['scale']:g} (vs {unguided['fluent_on_topic']:.0%} at "
                            f"{unguided['scale']:g}); try dvc exp run -S sampling.guidance_scale={best['scale']:g}.")
            else:
                tips.append("No guidance scale made more samples fluent and on topic than the unguided ones yet: "
                            "train the diffusion model longer (-S ++cfg.budget.max_steps=...) before tuning "
                            "sampling.guidance_scale.")
    if not tips:
        tips.append("Every checklist item passed: scale up with -S staged.preset=micro and a longer run.")
    return tips


def run() -> None:
    from sunfish.report.render import write_report

    ctx = open_stage("report")
    html_path, md_path = ctx.reports / "report.html", ctx.reports / "report.md"
    with ctx.tracking(ctx.flat_params("report")) as run:
        summary = build_summary(ctx)
        summary["mlflow"]["runs"]["report"] = run.run_id
        write_report(summary, html_path, md_path)
        run.log_artifact(html_path)
        run.log_artifact(md_path)
        log.info("wrote %s and %s", html_path, md_path)
