"""The best checkpoints as MLflow logged models in the model registry (issue 22), against a real local
store (SQLite in a temporary folder, filled through stage_run and register_models as evaluate does):
found by MLflow's own search, loadable and runnable with mlflow.pyfunc, resolvable by `sunfish sample
models:/...`, deduplicated by weights, and never the end of the stage when the registry fails."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from sunfish.cli import main
from sunfish.model_registry import CHECKPOINT_PATH, Located, register_best, register_models, resolve
from sunfish.tracking import stage_run, tracking_uri
from tests.ckpt_fixtures import build_checkpoints


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One evaluate run whose best checkpoints (an AR stage and the diffusion model) are registered;
    built once (a new SQLite store costs seconds)."""
    tmp = tmp_path_factory.mktemp("registry")
    ckpts = build_checkpoints(tmp / "models")
    root = tmp / "proj"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("DVC_EXP_NAME", "exp-registry")
        with stage_run("evaluate", root=root, flat_params={"eval.seed": 0}) as run:
            register_models(run, {"stage_0": {"best": {"step": 3, "checkpoint": str(ckpts["staged"])}},
                                  "cfg": {"best": {"step": 3, "checkpoint": str(ckpts["diffusion"])}},
                                  "control_1": {"is_control": True}}, Path("/"))
        env_after = os.environ.get("MLFLOW_TRACKING_URI")
    return {"root": root, "uri": tracking_uri(root), "run_id": run.run_id, "ckpts": ckpts, "env_after": env_after}


@pytest.fixture
def pyfunc_store(store, monkeypatch):
    """MLflow's module-level functions (pyfunc.load_model, search_logged_models) read the process's
    tracking URI: point it at the store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    return store


def test_each_best_checkpoint_is_a_logged_model_output_of_the_run(pyfunc_store):
    store = pyfunc_store
    client = MlflowClient(store["uri"])
    experiment = client.get_run(store["run_id"]).info.experiment_id
    found = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    by_name = {m.name: m for m in found}
    assert set(by_name) == {"stage_0", "cfg"}, "controls are yardsticks: not logged"
    for name, kind in (("stage_0", "staged"), ("cfg", "diffusion")):
        model = by_name[name]
        assert model.source_run_id == store["run_id"] and str(model.status).endswith("READY")
        assert model.model_type == f"sunfish-{kind}" and model.tags["sunfish.step"] == "3"
        version = client.get_model_version_by_alias(f"sunfish-{name}", "champion")
        assert version.source == f"models:/{model.model_id}" and version.run_id == store["run_id"]
        assert version.tags["sunfish.weights_sha256"] == model.tags["sunfish.weights_sha256"]
    outputs = client.get_run(store["run_id"]).outputs.model_outputs
    assert {o.model_id for o in outputs} == {m.model_id for m in found}
    assert store["env_after"] is None, "registering leaves the process's tracking URI as it found it"


def test_pyfunc_loads_the_registered_model_and_generates(pyfunc_store):
    from sunfish.sampling import sample_from_checkpoint

    staged = mlflow.pyfunc.load_model("models:/sunfish-stage_0@champion")
    texts = staged.predict(["Once upon a time"], params={"max_new_tokens": 5, "temperature": 0.0})
    assert isinstance(texts, list) and len(texts) == 1 and texts[0].startswith("Once upon a time")
    local = sample_from_checkpoint(pyfunc_store["ckpts"]["staged"], prompt="Once upon a time", max_new_tokens=5,
                                   temperature=0.0)
    assert texts == [local[0]["text"]], "pyfunc draws what sunfish sample draws"
    assert len(staged.predict(["Once upon a time"])[0]) > len("Once upon a time")  # no params: the CLI's defaults
    diffusion = mlflow.pyfunc.load_model("models:/sunfish-cfg/1")
    out = diffusion.predict(["The dog", "A cat"], params={"num_steps": 4, "seq_len": 8, "seed": 3})
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    import pandas as pd

    assert diffusion.predict(pd.DataFrame({"prompt": ["The dog", "A cat"]}),
                             params={"num_steps": 4, "seq_len": 8, "seed": 3}) == out


def test_resolve_finds_the_checkpoint_folder_inside_the_logged_model(store, tmp_path, monkeypatch):
    from sunfish.mlflow_checkpoints import fetch_checkpoint
    from sunfish.training.checkpoint import load_checkpoint

    client = MlflowClient(store["uri"])
    found = resolve(client, "models:/sunfish-stage_0@champion")
    assert found.model_id and found.model_id.startswith("m-") and found.path == CHECKPOINT_PATH
    folder = fetch_checkpoint("models:/sunfish-stage_0@champion", uri=store["uri"], cache_dir=tmp_path)
    assert folder == tmp_path / found.model_id / CHECKPOINT_PATH
    local = store["ckpts"]["staged"]
    assert (folder / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    model, meta, _ = load_checkpoint(folder)
    assert meta["model_name"] == "stage_0"
    diffusion = fetch_checkpoint("models:/sunfish-cfg@champion", uri=store["uri"], cache_dir=tmp_path)
    assert sorted(p.name for p in diffusion.iterdir()) == sorted(p.name for p in store["ckpts"]["diffusion"].iterdir())
    monkeypatch.setenv("SUNFISH_CACHE", str(tmp_path / "cache"))
    args = ["--prompt", "Once upon", "--max-new-tokens", "5", "--temperature", "0", "--format", "json"]
    runner = CliRunner()
    expected = json.loads(runner.invoke(main, ["sample", str(local), *args]).output)["text"]
    result = runner.invoke(main, ["sample", "models:/sunfish-stage_0@champion", "--uri", store["uri"], *args])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["text"] == expected


def test_unchanged_weights_reuse_the_version_and_log_nothing(store):
    client = MlflowClient(store["uri"])
    experiment = client.get_run(store["run_id"]).info.experiment_id
    before = len(client.search_logged_models([experiment]))
    version = client.get_model_version_by_alias("sunfish-stage_0", "champion")
    again = register_best(client, run_id=store["run_id"], model="stage_0", step=3, checkpoint=store["ckpts"]["staged"],
                          weights_sha256=version.tags["sunfish.weights_sha256"])
    assert again == str(version.version)
    assert len(client.search_logged_models([experiment])) == before


def test_versions_registered_before_logged_models_still_resolve(store):
    client = MlflowClient(store["uri"])
    client.create_registered_model("sunfish-old")
    old = client.create_model_version("sunfish-old", source=f"runs:/{store['run_id']}/checkpoints/old",
                                      run_id=store["run_id"])
    assert resolve(client, f"models:/sunfish-old/{old.version}") == Located(store["run_id"], None, "checkpoints/old")


def test_logging_infers_no_requirements(store, monkeypatch):
    """MLflow's requirement inference loads the model in a subprocess (seconds a model): the
    requirements are given, so it must never run."""
    import mlflow.models

    def refuse(*args, **kwargs):
        raise AssertionError("pip requirements were inferred")

    monkeypatch.setattr(mlflow.models, "infer_pip_requirements", refuse)
    elsewhere = f"sqlite:///{store['root'] / 'elsewhere.db'}"  # the process's URI names another store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    client = MlflowClient(store["uri"])
    version = register_best(client, run_id=store["run_id"], model="stage_1", weights_sha256="a-new-digest", step=5,
                            checkpoint=store["ckpts"]["staged"])
    assert client.get_model_version_by_alias("sunfish-stage_1", "champion").version == int(version)
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere and mlflow.get_tracking_uri() == elsewhere
    assert not (store["root"] / "elsewhere.db").exists()


def test_a_registry_failure_is_a_warning_not_the_stages_end(store, caplog, monkeypatch):
    import sunfish.model_registry as registry

    def broken(*args, **kwargs):
        raise RuntimeError("artifact store unreachable")

    monkeypatch.setattr(registry, "log_checkpoint_model", broken)

    class Run:  # what register_models reads of a StageRun
        enabled, client, run_id, uri = True, object(), store["run_id"], store["uri"]

    with caplog.at_level(logging.WARNING, logger="sunfish.model_registry"):
        register_models(Run(), {"stage_2": {"best": {"step": 1, "checkpoint": str(store["ckpts"]["staged"])}}},
                        Path("/"))
    assert "could not register the best checkpoints" in caplog.text and "artifact store unreachable" in caplog.text


def test_bad_predict_inputs_are_named():
    from sunfish.mlflow_model import _prompts, _settings

    assert _prompts("Once") == ["Once"] and _prompts(["a", None]) == ["a", ""]
    for bad, message in ((42, "not int"), ([1], "not int"), ({"prompt": "a"}, "not dict")):
        with pytest.raises(ValueError, match=message):
            _prompts(bad)
    with pytest.raises(ValueError, match="unknown params nope; a SunFish model takes max_new_tokens"):
        _settings({"nope": 1})
    assert _settings({"seed": None, "temperature": 0.0}) == {"temperature": 0.0}
