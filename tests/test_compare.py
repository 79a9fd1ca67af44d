"""`sunfish compare` and `sunfish sample` from MLflow, over a SQLite store the tests fill the way the
pipeline does (stage_run with DVC_EXP_NAME, headline metrics on the parent, checkpoints as artifacts)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sunfish.cli import main
from sunfish.compare import changed_params, format_rows, load_experiments
from sunfish.tracking import stage_run, tracking_uri

SWEEP = {  # experiment -> (guidance, stage_0 bpb, cfg bpb, adherence, checklist passed)
    "exp-w1": (1.0, 2.50, 3.10, 0.25, 3),
    "exp-w7": (7.0, 2.50, 3.10, 0.75, 4),
}


def _evaluate(root: Path, name: str, guidance: float, bpb0: float, bpb_cfg: float, adherence: float, passed: int,
              checkpoint: Path | None = None) -> str:
    import os

    os.environ["DVC_EXP_NAME"] = name
    try:
        with stage_run("train_stage_0", root=root, flat_params={"train.lr": 0.002, "train.seed": 1337}):
            pass
        flat = {"eval.seed": 0, "sampling.guidance_scale": guidance}
        with stage_run("evaluate", root=root, flat_params=flat) as run:
            run.log_experiment_metrics({
                "stage_0.best_val_bpb": bpb0, "stage_0.checklist_passed": passed, "stage_0.checklist_measured": 5,
                "cfg.best_val_bpb": bpb_cfg, "cfg.adherence": adherence, "cfg.checklist_passed": 1,
                "cfg.checklist_measured": 2, "stage_0.checklist": f"{passed}/5",
            })
            if checkpoint is not None:
                run.set_tags({"sunfish.best.stage_0": 3})
                for f in ("model.safetensors", "config.json", "tokenizer.json"):
                    run.log_artifact(checkpoint / f, "checkpoints/stage_0")
                from sunfish.model_registry import register_models

                register_models(run, {"stage_0": {"best": {"step": 3, "checkpoint": str(checkpoint)}},
                                      "control_1": {"is_control": True}}, Path("/"))
        if name == "exp-w7":  # evaluate_fluency puts its headline on the parent run; exp-w1 has none
            with stage_run("evaluate_fluency", root=root, flat_params=flat) as fluency:
                fluency.log_experiment_metrics({"fluency.fluent_on_topic": 0.625})
        return run.run_id
    finally:
        del os.environ["DVC_EXP_NAME"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, str]:
    """Two experiments of a guidance sweep; filled once (a new SQLite store costs seconds)."""
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for name, values in SWEEP.items():
            _evaluate(root, name, *values)
    return root, tracking_uri(root)


def test_rows_hold_the_swept_params_and_headline_metrics(store):
    root, uri = store
    rows = load_experiments(uri)
    assert [r.name for r in rows] == ["exp-w7", "exp-w1"]  # newest first
    assert changed_params(rows) == ["sampling.guidance_scale"]
    w7 = rows[0]
    assert w7.params["train.lr"] == "0.002" and w7.params["sampling.guidance_scale"] == "7.0"
    assert w7.best_bpb("stage_0") == 2.5 and w7.adherence == 0.75 and w7.checklist == (5, 7)
    assert set(w7.stage_runs) == {"train_stage_0", "evaluate", "evaluate_fluency"}
    assert w7.fluent_on_topic == 0.625 and rows[1].fluent_on_topic is None
    assert w7.status == "FINISHED" and w7.commit is None  # tmp_path is no git repo


def test_table_csv_and_json(store):
    _, uri = store
    rows = load_experiments(uri)
    table = format_rows(rows, "table").splitlines()
    assert table[0].split() == ["experiment", "sampling.guidance_scale", "bpb", "stage_0", "bpb", "cfg", "adherence",
                                "fluent+topic", "checklist", "status", "run"]
    assert table[2].split()[:8] == ["exp-w7", "7.0", "2.5000", "3.1000", "0.7500", "0.6250", "5/7", "FINISHED"]
    assert table[3].split()[:8] == ["exp-w1", "1.0", "2.5000", "3.1000", "0.2500", "-", "4/7", "FINISHED"]
    records = list(csv.DictReader(io.StringIO(format_rows(rows, "csv"))))
    assert records[1]["experiment"] == "exp-w1" and records[1]["cfg.adherence"] == "0.25"
    assert records[0]["fluency.fluent_on_topic"] == "0.625" and records[1]["fluency.fluent_on_topic"] == ""
    assert records[1]["sampling.guidance_scale"] == "1.0" and records[1]["run_id"] == rows[1].run_id
    data = json.loads(format_rows(rows, "json", params=["train.lr"]))
    assert data[0]["changed_params"] == {"train.lr": "0.002"}
    assert data[0]["metrics"]["cfg.best_val_bpb"] == 3.1 and "stage_0.checklist" not in data[0]["metrics"]
    assert data[0]["stage_runs"]["evaluate"] == rows[0].stage_runs["evaluate"]


def test_cli_filters_and_formats(store, monkeypatch):
    root, uri = store
    monkeypatch.chdir(root)
    runner = CliRunner()
    result = runner.invoke(main, ["compare", "--uri", uri, "-e", "exp-w1"])
    assert result.exit_code == 0, result.output
    assert "exp-w1" in result.output and "exp-w7" not in result.output
    result = runner.invoke(main, ["compare", "--uri", uri, "--last", "1", "--format", "json"])
    assert [r["name"] for r in json.loads(result.output)] == ["exp-w7"]
    result = runner.invoke(main, ["compare", "--uri", uri, "-e", "exp-w*", "-m", "cfg", "-p", "train.lr",
                                  "--format", "csv"])
    header = result.output.splitlines()[0].split(",")
    assert header[:3] == ["experiment", "train.lr", "cfg.best_val_bpb"] and "stage_0.best_val_bpb" not in header
    result = runner.invoke(main, ["compare", "--uri", uri, "-e", "nope-*"])
    assert result.exit_code == 2 and "error: no experiments matching nope-*" in result.output
    result = runner.invoke(main, ["compare", "--uri", uri, "--mlflow-experiment", "other"])
    assert result.exit_code == 2 and "no MLflow experiment 'other'" in result.output


def test_cli_refuses_an_unknown_model_name(store, monkeypatch):
    """-m takes the project's model names (and any an experiment in the store has): a typo is an
    error, not an empty column."""
    root, uri = store
    monkeypatch.chdir(root)
    result = CliRunner().invoke(main, ["compare", "--uri", uri, "-m", "stage_9"])
    assert result.exit_code == 2
    assert "unknown model 'stage_9'; known models: stage_0," in result.output and "control_3" in result.output
    result = CliRunner().invoke(main, ["compare", "--uri", uri, "-m", "control_2", "--format", "csv"])
    assert result.exit_code == 0, result.output


def test_default_store_is_the_projects(store, monkeypatch):
    root, _ = store
    (root / ".git").mkdir(exist_ok=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    result = CliRunner().invoke(main, ["compare", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 3


# -- loading the best checkpoint back from MLflow ---------------------------------------------------
@pytest.fixture
def logged_checkpoint(tmp_path, monkeypatch):
    from tests.ckpt_fixtures import build_checkpoints

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SUNFISH_CACHE", str(tmp_path / "cache"))
    ckpts = build_checkpoints(tmp_path / "models")
    root = tmp_path / "proj"
    run_id = _evaluate(root, "exp-best", 3.0, 2.0, 3.0, 0.5, 3, checkpoint=ckpts["staged"])
    return root, tracking_uri(root), run_id, ckpts["staged"]


def test_sample_from_a_run_artifact_and_from_an_experiment_name(logged_checkpoint, tmp_path):
    root, uri, run_id, local = logged_checkpoint
    runner = CliRunner()
    args = ["--prompt", "Once upon", "--max-new-tokens", "5", "--temperature", "0", "--format", "json"]
    expected = runner.invoke(main, ["sample", str(local), *args])
    assert expected.exit_code == 0, expected.output
    by_run = runner.invoke(main, ["sample", f"runs:/{run_id}/checkpoints/stage_0", "--uri", uri, *args])
    assert by_run.exit_code == 0, by_run.output
    assert json.loads(by_run.output)["text"] == json.loads(expected.output)["text"]
    cached = tmp_path / "cache" / "mlflow" / run_id / "checkpoints" / "stage_0"
    assert (cached / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    by_name = runner.invoke(main, ["sample", "mlflow:exp-best/stage_0", "--uri", uri, *args])
    assert by_name.exit_code == 0, by_name.output
    assert json.loads(by_name.output)["text"] == json.loads(expected.output)["text"]


def test_the_best_checkpoint_is_a_registered_model_with_an_alias(logged_checkpoint, tmp_path):
    from mlflow import MlflowClient

    from sunfish.model_registry import register_best

    root, uri, run_id, local = logged_checkpoint
    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version_by_alias("sunfish-stage_0", "champion")
    assert version.run_id == run_id and str(version.version) == "1"
    assert [m.name for m in client.search_registered_models()] == ["sunfish-stage_0"]  # controls are not registered
    runner = CliRunner()
    args = ["--prompt", "Once upon", "--max-new-tokens", "5", "--temperature", "0", "--format", "json"]
    expected = json.loads(runner.invoke(main, ["sample", str(local), *args]).output)["text"]
    for ref in ("models:/sunfish-stage_0@champion", "models:/sunfish-stage_0/1"):
        result = runner.invoke(main, ["sample", ref, "--uri", uri, *args])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["text"] == expected
    # the same weights again: the alias stays on the version that holds them, no copy is added
    sha = json.loads((local / "config.json").read_text()).get("weights_sha256") or version.tags["sunfish.weights_sha256"]
    assert register_best(client, run_id=run_id, model="stage_0", weights_sha256=sha, step=3, checkpoint=local) == "1"
    assert register_best(client, run_id=run_id, model="stage_0", weights_sha256="other", step=4,
                         checkpoint=local) == "2"
    assert str(client.get_model_version_by_alias("sunfish-stage_0", "champion").version) == "2"
    for ref, message in {"models:/sunfish-nope@champion": "not in the model registry",
                         "models:/sunfish-stage_0": "expected models:/<name>@<alias>"}.items():
        result = runner.invoke(main, ["sample", ref, "--uri", uri])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_cached_download_is_reused_and_damage_is_caught(logged_checkpoint, tmp_path):
    from sunfish.mlflow_checkpoints import fetch_checkpoint

    root, uri, run_id, _ = logged_checkpoint
    first = fetch_checkpoint(f"runs:/{run_id}/checkpoints/stage_0", uri=uri)
    (first / "model.safetensors").write_bytes(b"damaged")
    result = CliRunner().invoke(main, ["sample", f"runs:/{run_id}/checkpoints/stage_0", "--uri", uri])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


def test_bad_mlflow_references_are_one_line_errors(logged_checkpoint):
    root, uri, run_id, _ = logged_checkpoint
    runner = CliRunner()
    cases = {
        f"runs:/{run_id}/checkpoints/cfg": "has no checkpoint at checkpoints/cfg",
        "mlflow:no-such-exp/stage_0": "no experiment 'no-such-exp'",
        "mlflow:exp-best/cfg": "has no evaluate run with a best checkpoint of 'cfg'",
        "mlflow:stage_0": "expected mlflow:<experiment or run id>/<model>",
        "runs:/": "expected runs:/<run_id>/checkpoints/<model>",
    }
    for ref, message in cases.items():
        result = runner.invoke(main, ["sample", ref, "--uri", uri])
        assert result.exit_code == 2, (ref, result.output)
        assert message in result.output and "Traceback" not in result.output, (ref, result.output)
