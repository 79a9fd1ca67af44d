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
    run.close()  # not left for the interpreter's exit, which would report it on the test run's output


# -- grouping: one parent run per pipeline execution ------------------------------------------------
def _client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(root))


def _parents(root: Path) -> list:
    from sunfish.tracking import find_parents

    client = _client(root)
    return find_parents(client, [client.get_experiment_by_name("sunfish").experiment_id])


def test_stage_runs_of_one_experiment_share_a_parent_with_their_params(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    with stage_run("train_stage_0", root=tmp_path, flat_params={"train.lr": 0.001}) as train:
        train.log_metrics({"train/loss": 1.0}, 1)
    with stage_run("evaluate", root=tmp_path, flat_params={"sampling.guidance_scale": 3.0}) as ev:
        ev.log_experiment_metrics({"cfg.best_val_bpb": 2.5, "cfg.adherence": 0.75, "cfg.checklist": "3/5"})
    monkeypatch.setenv("DVC_EXP_NAME", "exp-b")
    with stage_run("evaluate", root=tmp_path, flat_params={"sampling.guidance_scale": 7.0}) as other:
        pass

    client = _client(tmp_path)
    parents = {p.data.tags["sunfish.experiment"]: p for p in _parents(tmp_path)}
    assert set(parents) == {"exp-a", "exp-b"}
    a = parents["exp-a"]
    assert a.info.run_name == "exp-a" and a.info.status == "FINISHED"
    assert a.data.params == {"train.lr": "0.001", "sampling.guidance_scale": "3.0"}
    assert a.data.metrics == {"cfg.best_val_bpb": 2.5, "cfg.adherence": 0.75}
    for child in (train, ev):
        tags = client.get_run(child.run_id).data.tags
        assert tags["mlflow.parentRunId"] == a.info.run_id
        assert tags["sunfish.experiment"] == "exp-a"
    assert client.get_run(ev.run_id).data.metrics["cfg.adherence"] == 0.75
    assert client.get_run(other.run_id).data.tags["mlflow.parentRunId"] == parents["exp-b"].info.run_id


def test_same_name_with_other_params_gets_a_new_parent_and_failure_shows(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    with stage_run("evaluate", root=tmp_path, flat_params={"sampling.guidance_scale": 3.0}):
        pass
    with pytest.raises(RuntimeError):
        with stage_run("evaluate", root=tmp_path, flat_params={"sampling.guidance_scale": 5.0}):
            raise RuntimeError("boom")
    parents = _parents(tmp_path)  # newest first
    assert [p.data.params["sampling.guidance_scale"] for p in parents] == ["5.0", "3.0"]
    assert [p.info.status for p in parents] == ["FAILED", "FINISHED"]


def test_workspace_label_is_the_commit_plus_a_hash_of_changed_params(tmp_path, monkeypatch):
    import subprocess

    from sunfish.tracking import experiment_label, git_commit

    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e.invalid", "PATH": __import__("os").environ["PATH"]}
    (tmp_path / "params.yaml").write_text("cfg: {guidance_scale: 7.0}\n")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env=env)
    monkeypatch.chdir(tmp_path)
    commit = git_commit(tmp_path)
    assert experiment_label(commit) == f"workspace@{commit[:7]}"
    (tmp_path / "params.yaml").write_text("cfg: {guidance_scale: 3.0}\n")
    changed = experiment_label(commit)
    assert changed.startswith(f"workspace@{commit[:7]}+") and len(changed) == len(commit[:7]) + 18
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-tree")
    assert experiment_label(commit) == "bushy-tree"


def test_stage_only_params_do_not_split_an_execution_over_parents(tmp_path, monkeypatch):
    """Stage 1 trains model stage 1 and stage 2 model stage 2: one execution, one parent."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    runs = []
    for n in (0, 1, 2):
        with stage_run(f"train_stage_{n}", root=tmp_path, flat_params={"train.lr": 0.002},
                       stage_params={"model.stage": n}) as run:
            runs.append(run)
    parents = _parents(tmp_path)
    assert len(parents) == 1
    assert parents[0].data.params == {"train.lr": "0.002"}
    client = _client(tmp_path)
    for n, run in enumerate(runs):
        got = client.get_run(run.run_id).data
        assert got.params == {"train.lr": "0.002", "model.stage": str(n)}
        assert got.tags["mlflow.parentRunId"] == parents[0].info.run_id


def test_params_are_logged_as_yaml_writes_them_not_as_python_reprs(tmp_path, monkeypatch):
    from sunfish.tracking.runs import param_value

    assert [param_value(v) for v in (None, True, 0.001, 240, [24, 48], "ddim")] == \
        ["null", "true", "0.001", "240", "[24, 48]", "ddim"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with stage_run("prepare", root=tmp_path, flat_params={"data.max_documents": None, "train.compile": False}) as run:
        pass
    got = _client(tmp_path).get_run(run.run_id).data.params
    assert got["data.max_documents"] == "null" and got["train.compile"] == "false"


def test_training_runs_carry_mlflow_system_metrics(tmp_path, monkeypatch):
    import time

    import sunfish.tracking.stage as stage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(stage, "SYSTEM_METRICS_INTERVAL", 0.2)
    monkeypatch.setattr(stage.start_system_metrics, "__defaults__", (0.2,))
    with stage_run("train_stage_0", root=tmp_path, system_metrics=True) as run:
        time.sleep(1.5)
    with stage_run("evaluate", root=tmp_path) as other:
        time.sleep(0.5)
    client = _client(tmp_path)
    assert any(k.startswith("system/cpu_utilization") for k in client.get_run(run.run_id).data.metrics)
    assert not any(k.startswith("system/") for k in client.get_run(other.run_id).data.metrics)
