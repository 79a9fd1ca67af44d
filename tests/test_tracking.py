"""MLflow store location and fault-tolerant logging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sunfish.tracking import StageRun, main_repo_of, repo_root, stage_run, tracking_uri


def test_queue_workspace_maps_to_main_repo(tmp_path, monkeypatch):
    main = tmp_path / "proj"
    queued = main / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    queued.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(queued))
    assert repo_root() == main.resolve()
    assert main_repo_of(main) == main


def test_root_from_git_not_cwd(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(sub)
    assert repo_root() == tmp_path.resolve()


def test_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri(tmp_path, "http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere.db")
    assert tracking_uri(tmp_path, "http://127.0.0.1:5000") == "sqlite:////elsewhere.db"


def test_stage_run_logs_to_sqlite_at_root(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    with stage_run("train_stage_0", root=tmp_path, flat_params={"train.lr": 0.001}) as run:
        for step in range(1, 121):
            run.log_metrics({"train/loss": 5.0 / step}, step)
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("sunfish")
    got = client.get_run(run.run_id)
    assert got.data.params["train.lr"] == "0.001"
    assert got.data.tags["dvc.stage"] == "train_stage_0"
    assert got.data.tags["dvc.exp_name"] == "exp-test"
    assert got.info.status == "FINISHED"
    assert len(client.get_metric_history(run.run_id, "train/loss")) == 120
    assert exp.artifact_location.startswith("file://")
    assert not (Path.cwd() / "mlruns").exists()


def test_failed_stage_marks_run_failed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RuntimeError):
        with stage_run("evaluate", root=tmp_path) as run:
            raise RuntimeError("boom")
    assert MlflowClient(tracking_uri=tracking_uri(tmp_path)).get_run(run.run_id).info.status == "FAILED"


class _BrokenClient:
    def log_batch(self, *a, **k):
        raise ConnectionError("server went away")


def test_unreachable_store_keeps_records_locally(tmp_path, caplog):
    run = StageRun(_BrokenClient(), "abc", tmp_path / "fallback.jsonl", flush_every=2)
    run.log_metrics({"train/loss": 1.0}, 1)
    run.log_metrics({"train/loss": 0.5}, 2)
    run.log_metrics({"train/loss": 0.25}, 3)
    run.flush()
    lines = [json.loads(line) for line in (tmp_path / "fallback.jsonl").read_text().splitlines()]
    steps = [m[2] for line in lines for m in line["metrics"]]
    assert steps == [1, 2, 3]
    assert "MLflow logging failed" in caplog.text
