"""What the run was made of: the diagnose checks, the data, the MLflow runs and the parameters,
at the end of the report for whoever needs to reproduce or question a figure above."""

from __future__ import annotations

import shlex
from typing import Any

from sunfish.report import html as H
from sunfish.report import markdown as M
from sunfish.report.access import as_dict, as_list, run_link
from sunfish.report.fmt import DASH, count, fixed, value
from sunfish.report.table import Cell, Table


def _checks_table(diag: dict) -> Table:
    """The checks that need a reader: warnings and failures. Passed checks are counted in the
    note (reports/diagnose.json and `sunfish diagnose` list every one)."""
    rows, passed = [], 0
    for c in (as_dict(c) for c in as_list(diag.get("checks"))):
        status = str(c.get("status") or "?")
        if status == "ok":
            passed += 1
            continue
        rows.append([c.get("name", "?"), Cell(status, css=f"status-{status}"), value(c.get("value")),
                     value(c.get("threshold")), c.get("message") or ""])
    note = (f"{passed} more check{'s' if passed != 1 else ''} passed (every check: reports/diagnose.json, "
            "`sunfish diagnose`).") if passed else ""
    return Table(["Check", "Status", "Value", "Threshold", "Message"], rows, note=note,
                 empty=f"Every check passed ({passed}).")


def diagnose_html(s: dict) -> str:
    diag = as_dict(s.get("diagnose"))
    if not diag:
        return H.section("diagnose", "Diagnostics", [H.muted("The diagnose stage did not run.")])
    status = str(diag.get("status") or "unknown")
    out = [f'<p>Overall status: <span class="status-{H.esc(status)}">{H.esc(status.upper())}</span></p>']
    checks = _checks_table(diag)
    if as_list(diag.get("checks")):
        out.append(H.table(checks))
    return H.section("diagnose", "Diagnostics", out)


def diagnose_markdown(s: dict) -> list[str]:
    diag = as_dict(s.get("diagnose"))
    if not diag:
        return ["## Diagnostics", "", "The diagnose stage did not run.", ""]
    out = ["## Diagnostics", "", f"Overall status: **{M.esc(str(diag.get('status') or 'unknown').upper())}**", ""]
    checks = _checks_table(diag)
    return out + (M.table(checks) if as_list(diag.get("checks")) else [])


def _splits_table(data: dict) -> Table:
    pairs = as_dict(data.get("pairs"))
    rows = [[split, count(info.get("documents")), count(info.get("bytes")), count(info.get("tokens")),
             fixed(info.get("bytes_per_token"), 2), count(pairs.get(split))]
            for split, info in ((k, as_dict(v)) for k, v in as_dict(data.get("splits")).items())]
    return Table(["Split", "Documents", "Bytes", "Tokens", "Bytes/token", "Prompt pairs"], rows, num=range(1, 6))


def data_html(s: dict) -> str:
    data = as_dict(s.get("data"))
    if not data:
        return H.section("data", "Data", [H.muted("No data description.")])
    out = [f"<p>Source: <code>{H.esc(data.get('source', DASH))}</code> · "
           f"vocabulary {count(data.get('vocab_size'))} tokens</p>"]
    splits = _splits_table(data)
    if splits.rows:
        out.append(H.table(splits))
    return H.section("data", "Data", out)


def data_markdown(s: dict) -> list[str]:
    data = as_dict(s.get("data"))
    if not data:
        return ["## Data", "", "No data description.", ""]
    out = ["## Data", "",
           f"Source: {M.esc(data.get('source', DASH))} · vocabulary {count(data.get('vocab_size'))} tokens", ""]
    splits = _splits_table(data)
    return out + (M.table(splits) if splits.rows else [])


def _mlflow_command(uri: Any) -> str:
    return f"mlflow ui --backend-store-uri {shlex.quote(str(uri))}" if uri else "mlflow ui"


def _run_cell(uri: Any, run_id: Any) -> Cell:
    """A run id as code, linked to the MLflow UI when the tracking URI is a server."""
    link = run_link(uri, run_id)
    html = f"<code>{H.esc(run_id if run_id is not None else DASH)}</code>"
    md = M.code(run_id) if run_id is not None else DASH
    if link:
        html, md = f'<a href="{H.esc(link)}">{html}</a>', f"[{md}]({link})"
    return Cell(run_id, html=html, md=md)


def _runs_table(ml: dict) -> Table:
    uri = ml.get("tracking_uri")
    rows = [[stage, _run_cell(uri, run_id)] for stage, run_id in as_dict(ml.get("runs")).items()]
    return Table(["Stage", "Run id"], rows)


def mlflow_html(s: dict) -> str:
    ml = as_dict(s.get("mlflow"))
    if not ml:
        return H.section("mlflow", "MLflow runs", [H.muted("Tracking was disabled or did not record runs.")])
    out = [f"<p>Tracking URI: <code>{H.esc(ml.get('tracking_uri') or DASH)}</code> · experiment "
           f"<code>{H.esc(ml.get('experiment') or DASH)}</code></p>",
           f"<p>Open the UI:</p><pre class=\"cmd\">{H.esc(_mlflow_command(ml.get('tracking_uri')))}</pre>"]
    runs = _runs_table(ml)
    if runs.rows:
        out.append(H.table(runs))
    return H.section("mlflow", "MLflow runs", out)


def mlflow_markdown(s: dict) -> list[str]:
    ml = as_dict(s.get("mlflow"))
    if not ml:
        return ["## MLflow runs", "", "Tracking was disabled or did not record runs.", ""]
    out = ["## MLflow runs", "",
           f"Tracking URI: {M.code(ml.get('tracking_uri') or DASH)} · "
           f"experiment {M.code(ml.get('experiment') or DASH)}", "",
           "Open the UI:", "", "```", _mlflow_command(ml.get("tracking_uri")), "```", ""]
    runs = _runs_table(ml)
    return out + (M.table(runs) if runs.rows else [])


def _params_table(params: dict) -> Table:
    return Table(["Key", "Value"], [[Cell(k, html=f"<code>{H.esc(k)}</code>"), value(params[k])]
                                    for k in sorted(params, key=str)])


def params_html(s: dict) -> str:
    params = as_dict(s.get("params"))
    if not params:
        return H.section("params", "Parameters", [H.muted("No parameters recorded.")])
    table = H.table(_params_table(params))
    return H.section("params", "Parameters", [f"<details><summary>{len(params)} parameters</summary>{table}</details>"])


def params_markdown(s: dict) -> list[str]:
    params = as_dict(s.get("params"))
    return ["## Parameters", ""] + (M.table(_params_table(params)) if params else ["No parameters recorded.", ""])
