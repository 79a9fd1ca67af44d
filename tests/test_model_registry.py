"""The best checkpoints as MLflow logged models in the model registry (issue 22), against a real local
store (SQLite in a temporary folder, filled through stage_run and register_models as evaluate does):
found by MLflow's own search, loadable and runnable with mlflow.pyfunc, resolvable by `sunfish sample
models:/...`, deduplicated by weights, and never the end of the stage when the registry fails. A
registration the store could not take is kept in the evaluate run's fallback file and made by
`sunfish tracking sync`."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from sunfish.cli import main
from sunfish.evaluation.milestones import checkpoint_weights_id
from sunfish.mlflow_model import FILES, OPTIONAL_FILES
from sunfish.model_registry import (
    ALIAS,
    CHECKPOINT_PATH,
    WEIGHTS_TAG,
    Located,
    register_best,
    register_models,
    registered_name,
    replay_registration,
    resolve,
)
from sunfish.tracking import StageRun, stage_run, sync_file, tracking_uri
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


def test_a_registry_failure_is_a_warning_not_the_stages_end(store, tmp_path, caplog, monkeypatch):
    """The store failing mid-registration keeps the registration for `sunfish tracking sync`; MLflow
    refusing it as invalid does not (sending it again could never succeed). Neither raises."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    import sunfish.model_registry as registry

    errors = [ConnectionError("artifact store unreachable")]

    def broken(*args, **kwargs):
        raise errors[0]

    monkeypatch.setattr(registry, "log_checkpoint_model", broken)
    fallback = tmp_path / "evaluate.jsonl"
    run = StageRun(MlflowClient(store["uri"]), store["run_id"], fallback, uri=store["uri"])
    models = {"stage_2": {"best": {"step": 1, "checkpoint": str(store["ckpts"]["staged"])}}}
    with caplog.at_level(logging.WARNING, logger="sunfish.model_registry"):
        register_models(run, models, Path("/"))
    assert "could not register the best checkpoints of stage_2" in caplog.text
    assert "artifact store unreachable" in caplog.text and "for `sunfish tracking sync`" in caplog.text
    records = read_jsonl(fallback)
    assert [r["register"]["model"] for r in records] == ["stage_2"] and records[0]["run_id"] == store["run_id"]

    caplog.clear()
    errors[0] = MlflowException("a made-up invalid request", error_code=INVALID_PARAMETER_VALUE)
    with caplog.at_level(logging.WARNING, logger="sunfish.model_registry"):
        register_models(run, models, Path("/"))
    assert "refused to register stage_2" in caplog.text and "a made-up invalid request" in caplog.text
    assert read_jsonl(fallback) == records, "a refused registration is not kept for a sync"
    run.close(status=None)


# -- registrations the store missed, replayed by `sunfish tracking sync` -----------------------------

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _champion(client: MlflowClient, model: str):
    try:
        return client.get_model_version_by_alias(registered_name(model), ALIAS)
    except MlflowException:
        return None


def _evaluate_with_the_store_down(root: Path, checkpoint: Path, caplog, artifact: Path | None = None) -> StageRun:
    """What the evaluate stage does (stage_run, then register_models) with an unreachable store."""
    (root / "not-a-dir").write_text("a file where the store's folder should be")
    bad = f"sqlite:///{root / 'not-a-dir' / 'x' / 'mlflow.db'}"
    with caplog.at_level(logging.WARNING), stage_run("evaluate", root=root, configured_uri=bad) as run:
        assert run.client is None and run.offline
        if artifact is not None:
            run.log_artifact(artifact)
        register_models(run, {"stage_0": {"best": {"step": 3, "checkpoint": str(checkpoint.relative_to(root))}},
                              "control_1": {"is_control": True}}, root)
    return run


def check_the_missed_registration_is_replayed(tmp_path: Path, monkeypatch, caplog) -> None:
    """(a) The store is down at evaluate time; once it is back, `sunfish tracking sync` registers
    the best checkpoint: the champion alias resolves to a version with its weights digest."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "proj"
    checkpoint = build_checkpoints(root / "models")["staged"]
    weights = checkpoint_weights_id(checkpoint)[1]
    run = _evaluate_with_the_store_down(root, checkpoint, caplog)
    kept_root = run.fallback_path.parent / "artifacts"
    kept_files = {p: p.read_bytes() for p in kept_root.rglob("*") if p.is_file()}  # the sync removes them

    good = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(root))
    result = CliRunner().invoke(main, ["tracking", "sync", "--uri", good])
    assert result.exit_code == 0, result.output
    client = MlflowClient(good)
    version = _champion(client, "stage_0")
    assert version is not None, "no champion registered by the sync"
    assert version.tags[WEIGHTS_TAG] == weights and version.tags["sunfish.step"] == "3"
    (replayed,) = client.search_runs([client.get_experiment_by_name("sunfish").experiment_id])
    assert version.run_id == replayed.info.run_id and replayed.data.tags["sunfish.local_id"] == run.local_id
    assert "1 model registration)" in result.output, result.output

    assert "could not register the best checkpoints of stage_0" in caplog.text
    assert f"kept in {run.fallback_path} for `sunfish tracking sync`" in caplog.text
    (archive,) = run.fallback_path.parent.glob("evaluate.jsonl.synced-*")
    records = read_jsonl(archive)
    kinds = [next(k for k in ("register", "tags", "params", "status") if k in r) for r in records]
    assert kinds == ["tags", "register", "status"], "after the run's queued records, before its end"
    fields = records[1]["register"]
    assert fields == {"model": "stage_0", "step": 3, "weights_sha256": weights, "alias": ALIAS,
                      "checkpoint": fields["checkpoint"], "source": str(checkpoint), "kept_at": fields["kept_at"]}
    assert records[1]["time"] - 5 < fields["kept_at"] <= records[1]["time"]
    kept = Path(fields["checkpoint"])
    assert kept.parent == kept_root / run.local_id
    own = sorted(f for f in (*FILES, *OPTIONAL_FILES) if (checkpoint / f).is_file())
    assert sorted(p.name for p in kept_files if p.parent == kept) == own
    assert all(kept_files[kept / f] == (checkpoint / f).read_bytes() for f in own)
    assert not kept.parent.exists(), "the sync is done with the kept copy: it is removed"


def test_a_registration_the_store_missed_is_replayed_by_sync(tmp_path, monkeypatch, caplog):
    check_the_missed_registration_is_replayed(tmp_path, monkeypatch, caplog)


def test_the_replay_check_fails_when_no_register_record_is_kept(tmp_path, monkeypatch, caplog):
    """(e) Mutation: the check above notices a registration that is not kept."""
    monkeypatch.setattr(StageRun, "keep_registration", lambda self, **fields: None)
    with pytest.raises(AssertionError, match="no champion registered by the sync"):
        check_the_missed_registration_is_replayed(tmp_path, monkeypatch, caplog)


def test_the_kept_copy_is_registered_once_however_often_it_is_replayed(tmp_path, monkeypatch):
    """(b) models/<model> is rebuilt between evaluate and the sync: the version holds the weights
    evaluate saw (the kept copy). (c) Two records of the same weights, and the same file replayed
    again, make one version. A registration MLflow refuses is marked and skipped, not retried forever."""
    import torch

    import sunfish.model_registry as registry
    from sunfish.data.tokenizer import TextTokenizer
    from sunfish.mlflow_checkpoints import fetch_checkpoint
    from sunfish.training.checkpoint import save_checkpoint
    from tests.ckpt_fixtures import staged_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ckpts = build_checkpoints(tmp_path / "models")
    checkpoint = ckpts["staged"]
    original = (checkpoint / "model.safetensors").read_bytes()
    weights = checkpoint_weights_id(checkpoint)[1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sunfish", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id

    real = registry.log_checkpoint_model

    def store_goes_away(*args, **kwargs):
        raise ConnectionError("the store went away")

    monkeypatch.setattr(registry, "log_checkpoint_model", store_goes_away)
    fallback = tmp_path / "state" / "mlflow_fallback" / "evaluate.jsonl"
    run = StageRun(MlflowClient(uri), run_id, fallback, uri=uri)
    models = {"stage_0": {"best": {"step": 3, "checkpoint": str(checkpoint)}}}
    register_models(run, models, Path("/"))
    register_models(run, models, Path("/"))  # a second evaluate of the same weights
    run.close(status=None)
    monkeypatch.setattr(registry, "log_checkpoint_model", real)
    assert [r["register"]["weights_sha256"] for r in read_jsonl(fallback)] == [weights, weights]

    model = staged_model(TextTokenizer.load(ckpts["tokenizer"]).vocab_size)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(checkpoint, model, model_name="stage_0", step=9, tokenizer_file=ckpts["tokenizer"])
    assert checkpoint_weights_id(checkpoint)[1] != weights  # `dvc repro` replaced the checkpoint

    kept_root = fallback.parent / "artifacts"
    shutil.copytree(kept_root, tmp_path / "kept-before-sync")  # the sync removes the copies it sent
    result = sync_file(fallback, uri, register=replay_registration)
    assert (result.records, result.registrations, result.skipped) == (2, 2, 0)
    assert not any(kept_root.iterdir())
    version = _champion(client, "stage_0")
    assert version.tags[WEIGHTS_TAG] == weights and version.run_id == run_id
    folder = fetch_checkpoint(f"models:/{registered_name('stage_0')}@{ALIAS}", uri=uri, cache_dir=tmp_path / "cache")
    assert (folder / "model.safetensors").read_bytes() == original
    assert len(client.search_model_versions(f"name='{registered_name('stage_0')}'")) == 1
    assert len(client.search_logged_models([experiment])) == 1

    result.moved_to.rename(fallback)  # the same file replayed again, with its copies (a sync that failed late)
    shutil.rmtree(kept_root)
    shutil.copytree(tmp_path / "kept-before-sync", kept_root)
    assert sync_file(fallback, uri, register=replay_registration).registrations == 2
    assert len(client.search_model_versions(f"name='{registered_name('stage_0')}'")) == 1
    assert len(client.search_logged_models([experiment])) == 1
    assert _champion(client, "stage_0").version == version.version

    run = StageRun(None, run_id, fallback, uri=uri)  # an alias MLflow reserves: refused at the sync
    run.keep_registration(model="stage_0", step=3, weights_sha256=weights, checkpoint=folder, files=FILES,
                          alias="latest")
    run.close(status=None)
    result = sync_file(fallback, uri, register=replay_registration)
    assert (result.records, result.registrations, result.skipped) == (0, 0, 1) and not fallback.exists()
    (record,) = read_jsonl(result.moved_to)
    assert "reserved" in record["rejected"]
    assert not any(kept_root.iterdir()), "a registration refused for good needs its copy no more"
    result.moved_to.rename(fallback)  # marked: a later sync skips it without asking MLflow again
    assert sync_file(fallback, uri, register=replay_registration).skipped == 1


def test_a_late_replay_does_not_move_the_alias_off_a_newer_champion(tmp_path, monkeypatch):
    """A registration kept while the store was down, replayed after a later evaluate registered
    other weights: the kept one becomes a version, and champion stays on the newer weights."""
    import torch

    from sunfish.data.tokenizer import TextTokenizer
    from sunfish.training.checkpoint import save_checkpoint
    from tests.ckpt_fixtures import staged_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ckpts = build_checkpoints(tmp_path / "models")
    old = ckpts["staged"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sunfish", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    fallback = tmp_path / "state" / "mlflow_fallback" / "evaluate.jsonl"
    run = StageRun(None, run_id, fallback, uri=uri)
    run.keep_registration(model="stage_0", step=3, weights_sha256=checkpoint_weights_id(old)[1], checkpoint=old,
                          files=FILES, alias=ALIAS)
    run.close(status=None)

    new = tmp_path / "models" / "newer"
    model = staged_model(TextTokenizer.load(ckpts["tokenizer"]).vocab_size)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(new, model, model_name="stage_0", step=9, tokenizer_file=ckpts["tokenizer"])
    newer = register_best(client, run_id=run_id, model="stage_0", weights_sha256=checkpoint_weights_id(new)[1],
                          step=9, checkpoint=new)

    assert sync_file(fallback, uri, register=replay_registration).registrations == 1
    versions = client.search_model_versions(f"name='{registered_name('stage_0')}'")
    assert sorted(v.tags[WEIGHTS_TAG] for v in versions) == sorted(checkpoint_weights_id(c)[1] for c in (old, new))
    assert str(_champion(client, "stage_0").version) == newer, "a late replay moved champion back to older weights"


def test_sync_without_a_register_handler_puts_everything_back(tmp_path, monkeypatch):
    """(d) The library's sync_file is given no handler for a file holding a registration: a clear
    SyncError, nothing sent (not even the store opened), the file as it was."""
    from sunfish.tracking import SyncError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    checkpoint = build_checkpoints(tmp_path / "models")["staged"]
    fallback = tmp_path / "state" / "mlflow_fallback" / "evaluate.jsonl"
    run = StageRun(None, None, fallback, uri="http://127.0.0.1:9")
    run.log_metrics({"stage_0/val_bpb": 1.5}, 3)
    register_models(run, {"stage_0": {"best": {"step": 3, "checkpoint": str(checkpoint)}}}, Path("/"))
    run.close()
    before = read_jsonl(fallback)
    assert [next(k for k in ("metrics", "register", "status") if k in r) for r in before] == [
        "metrics", "register", "status"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(SyncError, match="no register handler was given"):
        sync_file(fallback, uri)
    assert read_jsonl(fallback) == before
    assert [p.name for p in fallback.parent.iterdir() if p.name.startswith("evaluate.jsonl.")] == []
    assert not (tmp_path / "mlflow.db").exists()
    assert Path(before[1]["register"]["checkpoint"]).is_dir()


def _report_and_registration_kept(tmp_path, monkeypatch, caplog):
    """A project whose evaluate ran with the store down: a report and a registration kept offline.
    Returns the project root, the checkpoint, the report, the run and the folder of the kept copies."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "proj"
    checkpoint = build_checkpoints(root / "models")["staged"]
    report = root / "report.md"
    report.write_text("# results\n")
    run = _evaluate_with_the_store_down(root, checkpoint, caplog, artifact=report)
    return root, checkpoint, report, run, run.fallback_path.parent / "artifacts" / run.local_id


def test_a_synced_registration_frees_its_kept_copies_and_the_model_still_loads(tmp_path, monkeypatch, caplog):
    """(f) The store is down at evaluate, which logs a report and registers a checkpoint: both are
    copied under state/mlflow_fallback/artifacts/<run>/. Once the sync has sent them the copies and
    their run folder are gone (the originals stay), and the registered model loads from MLflow."""
    root, checkpoint, report, run, kept = _report_and_registration_kept(tmp_path, monkeypatch, caplog)
    assert len(list(kept.iterdir())) == 2, "the report's copy and the checkpoint's"

    good = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(root))
    result = CliRunner().invoke(main, ["tracking", "sync", "--uri", good])
    assert result.exit_code == 0, result.output
    assert "1 model registration)" in result.output and "2 kept copies removed" in result.output
    assert not kept.exists()
    assert report.read_text() == "# results\n" and all((checkpoint / f).is_file() for f in FILES)
    client = MlflowClient(good)
    (replayed,) = client.search_runs([client.get_experiment_by_name("sunfish").experiment_id])
    assert [a.path for a in client.list_artifacts(replayed.info.run_id) if a.path.endswith("report.md")]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", good)
    model = mlflow.pyfunc.load_model(f"models:/{registered_name('stage_0')}@{ALIAS}")
    (text,) = model.predict(["Once upon a time"], params={"max_new_tokens": 3, "temperature": 0.0})
    assert text.startswith("Once upon a time")


def test_a_failed_sync_keeps_the_copies_its_records_still_need(tmp_path, monkeypatch, caplog):
    """(g) The store fails at the registration, after the report was sent: the registration goes
    back into the file with its kept checkpoint (the report's copy, sent, is removed), and the next
    sync registers it from that copy and removes it."""
    import sunfish.model_registry as registry

    root, checkpoint, report, run, kept = _report_and_registration_kept(tmp_path, monkeypatch, caplog)

    def store_goes_away(*args, **kwargs):
        raise ConnectionError("the store went away")

    real = registry.log_checkpoint_model
    monkeypatch.setattr(registry, "log_checkpoint_model", store_goes_away)
    good = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(root))
    result = CliRunner().invoke(main, ["tracking", "sync", "--uri", good])
    assert result.exit_code == 2 and "the store went away" in result.output, result.output
    back = read_jsonl(run.fallback_path)
    assert [next(k for k in ("register", "status") if k in r) for r in back] == ["register", "status"]
    copy = Path(back[0]["register"]["checkpoint"])
    assert list(kept.iterdir()) == [copy], "only the copy of the record sent is removed"
    own = sorted(f for f in (*FILES, *OPTIONAL_FILES) if (checkpoint / f).is_file())
    assert sorted(p.name for p in copy.iterdir()) == own

    monkeypatch.setattr(registry, "log_checkpoint_model", real)
    result = CliRunner().invoke(main, ["tracking", "sync", "--uri", good])
    assert result.exit_code == 0, result.output
    assert "1 model registration)" in result.output and "1 kept copy removed" in result.output
    version = _champion(MlflowClient(good), "stage_0")
    assert version is not None and version.tags[WEIGHTS_TAG] == checkpoint_weights_id(checkpoint)[1]
    assert not kept.exists()


def test_bad_predict_inputs_are_named():
    from sunfish.mlflow_model import _prompts, _settings

    assert _prompts("Once") == ["Once"] and _prompts(["a", None]) == ["a", ""]
    for bad, message in ((42, "not int"), ([1], "not int"), ({"prompt": "a"}, "not dict")):
        with pytest.raises(ValueError, match=message):
            _prompts(bad)
    with pytest.raises(ValueError, match="unknown params nope; a SunFish model takes max_new_tokens"):
        _settings({"nope": 1})
    assert _settings({"seed": None, "temperature": 0.0}) == {"temperature": 0.0}
