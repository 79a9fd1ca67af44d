"""A real `mlflow server` on loopback: the team setup (artifacts proxied into --artifacts-destination),
and the MLflow UI as a user sees it in headless Chromium, with a screenshot kept for CI logs.

The screenshot goes to $SUNFISH_TEST_ARTIFACTS (default tests/artifacts/), which CI keeps.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

import pytest

from tests.test_tracking_async import Server, _free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ARTIFACTS = Path(os.environ.get("SUNFISH_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    srv = Server(tmp_path / "server", _free_port())
    (tmp_path / "server").mkdir()
    srv.start()
    yield srv
    srv.stop()


def _api(server: Server, path: str, body: dict | None = None) -> dict:
    """The REST API the UI's pages call: GET, or POST with a JSON body."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{server.uri}/api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_team_server_receives_params_metrics_and_artifacts(server, tmp_path, monkeypatch):
    """A stage run pointed at the server (MLFLOW_TRACKING_URI) logs into its store and its artifact
    destination, not into the project directory of the machine that trained."""
    from mlflow.tracking import MlflowClient

    from sunfish.tracking import stage_run

    project = tmp_path / "project"
    project.mkdir()
    (project / "note.txt").write_text("hello")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("DVC_EXP_NAME", "team-exp")
    with stage_run("evaluate", root=project, flat_params={"sampling.guidance_scale": 3.0}) as run:
        for step in range(1, 51):
            run.log_metrics({"cfg/val_bpb": 3.0 / step}, step)
        run.log_experiment_metrics({"cfg.best_val_bpb": 0.06})
        run.log_artifact(project / "note.txt", "checkpoints/cfg")
    store = MlflowClient(tracking_uri=f"sqlite:///{server.tmp / 'mlflow.db'}")
    got = store.get_run(run.run_id)
    assert got.data.params == {"sampling.guidance_scale": "3.0"} and got.info.status == "FINISHED"
    assert len(store.get_metric_history(run.run_id, "cfg/val_bpb")) == 50
    assert store.get_run(got.data.tags["mlflow.parentRunId"]).data.metrics == {"cfg.best_val_bpb": 0.06}
    assert [p.read_text() for p in (server.tmp / "artifacts").rglob("note.txt")] == ["hello"]
    assert not (project / "mlartifacts").exists() and not (project / "mlflow.db").exists()
    assert not (project / "state").exists()  # nothing fell back to local files


def test_mlflow_ui_lists_the_experiment_and_its_runs(server, monkeypatch):
    from tests.browser import dump_dom, png_is_blank, png_stats, screenshot
    from tests.test_compare import SWEEP, _evaluate

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    for name, values in SWEEP.items():
        _evaluate(server.tmp, name, *values)
    exp_id = _api(server, "experiments/get-by-name?experiment_name=sunfish")["experiment"]["experiment_id"]

    url = f"{server.uri}/#/experiments/{exp_id}/runs"
    dom = dump_dom(url)
    for text in ("sunfish", *SWEEP):  # the experiment and its parent runs (stage runs nest under them)
        assert text in dom, f"{text!r} not in the MLflow UI page; DOM ends {dom[-1500:]!r}"
    # 2 parents + their 5 stage runs (train_stage_0 and evaluate each, evaluate_fluency in exp-w7), as the
    # REST API the page calls says
    total = len(_api(server, "runs/search", {"experiment_ids": [exp_id], "max_results": 100})["runs"])
    assert total == 7
    assert re.search(rf"<strong>{total}</strong>\s*matching runs", dom), dom[-1500:]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = screenshot(url, ARTIFACTS / "mlflow_ui_runs.png", 1400, 900)
    assert not png_is_blank(shot), png_stats(shot)
    print(f"MLflow UI screenshot: {shot}")
