"""Control stages (control_1..3): stage N-1's model, trained from stage N-1's final weights for
stage N's exact budget on stage N's batches, so stage_N minus control_N is the component's effect."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from sunfish.config import CONTROL_NAMES, DataConfig, TokenizerConfig, load_params
from sunfish.data.prepare import prepare_corpus

CORPORA = Path(__file__).resolve().parents[1] / "data" / "corpora"
ROOT = Path(__file__).resolve().parents[1]

STEPS = {"stage_0": 6, "stage_1": 4, "stage_2": 3}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny repository layout (params.yaml + data/prepared) in which the stages run for real."""
    root = tmp_path_factory.mktemp("controls")
    prepare_corpus(DataConfig(source="tinystories", max_documents=60), TokenizerConfig(vocab_size=300),
                   root / "data" / "prepared", CORPORA)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["staged"]["preset"] = "nano"
    params["cfg"]["preset"] = "nano"  # the block diffusion model is the stage-0 network
    params["train"].update(max_steps=6, milestones=[3, 6], warmup_steps=1, batch_size=2, seq_len=32,
                           eval_every=3, eval_batches=1, log_every=1, threads=1, precision="fp32",
                           checkpoint_every=50)
    for name in ("stage_1", "stage_2", "stage_3"):
        params["staged"][name] = {"max_steps": STEPS.get(name, 3), "milestones": None, "lr": 1e-3,
                                  "warmup_steps": 1}
    params["staged"]["k1"]["mode"] = "log"
    params["tracking"]["enabled"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def trained(workspace):
    from pipeline.train_staged import run, run_control

    mp = pytest.MonkeyPatch()
    mp.chdir(workspace)
    try:
        run(0)
        run(1)
        run_control(1)
        run(2)
        run_control(2)
    finally:
        mp.undo()
    return workspace


def _metrics(root: Path, name: str) -> dict:
    return json.loads((root / "reports" / "stages" / f"{name}.json").read_text())


def _config(root: Path, name: str) -> dict:
    return json.loads((root / "models" / name / "final" / "config.json").read_text())


def _curve(root: Path, name: str) -> list[str]:
    return (root / "reports" / "curves" / name / "train.csv").read_text().splitlines()


def test_control_budget_is_the_stage_budget():
    params = load_params(ROOT / "params.yaml")
    for control in CONTROL_NAMES:
        stage = control.replace("control_", "stage_")
        assert params.training_for(control).model_dump() == {**params.training_for(stage).model_dump(),
                                                                "model": control}
    with pytest.raises(KeyError, match="control_0"):
        params.training_for("control_0")


@pytest.mark.timeout(120)
def test_control_keeps_the_previous_model_and_matches_the_stage_budget(trained):
    for n in (1,):  # control_2 is not trained in k1.mode log (test below)
        stage, control = _metrics(trained, f"stage_{n}"), _metrics(trained, f"control_{n}")
        assert control["steps"] == stage["steps"] == STEPS[f"stage_{n}"]
        # the training-time figure says how many validation tokens it covers (a sample, not the split)
        val = (trained / "reports" / "curves" / f"stage_{n}" / "val.csv").read_text().splitlines()
        assert val[0].split(",")[-1] == "bpb" and "tokens" in val[0].split(",")
        assert stage["val_tokens"] == int(val[-1].split(",")[val[0].split(",").index("tokens")]) > 0
        assert control["milestones"] == stage["milestones"]
        config = _config(trained, f"control_{n}")["model_config"]
        assert config["stage"] == n - 1
        assert _config(trained, f"control_{n}")["model_name"] == f"control_{n}"
        # it starts exactly where stage N starts: the previous stage's final weights
        assert control["warm_start/initial_loss"] == pytest.approx(stage["warm_start/previous_loss"], abs=1e-5)
        for step in control["milestones"]:
            assert (trained / "models" / f"control_{n}" / f"step_{step}" / "model.safetensors").exists()
    weights = load_file(trained / "models" / "control_1" / "final" / "model.safetensors")
    assert not any(k.startswith("temporal") for k in weights)  # no TEMPORAL branch in control_1


@pytest.mark.timeout(120)
def test_control_sees_the_same_batches_as_its_stage(trained):
    # stage 1 starts at stage 0's function (zero TEMPORAL table), so with the same batches its first
    # training loss is control_1's to float precision
    first_stage = _curve(trained, "stage_1")[1].split(",")
    first_control = _curve(trained, "control_1")[1].split(",")
    assert first_stage[0] == first_control[0] == "1"
    assert float(first_stage[1]) == pytest.approx(float(first_control[1]), abs=1e-4)


@pytest.mark.timeout(120)
def test_seed_runs_record_distinct_final_figures(trained):
    from sunfish.training.checkpoint import list_milestones

    # stage_2 under k1.mode log trains one seed: no verdict needs its spread (its control is not trained)
    assert _metrics(trained, "stage_2")["val_bpb_seeds"] == [_metrics(trained, "stage_2")["val_bpb"]]
    for name in ("stage_1", "control_1"):
        m = _metrics(trained, name)
        seeds = m["val_bpb_seeds"]
        assert m["seeds"] == len(seeds) == 3 and m["seed_values"] == [2337, 2338, 2339]
        assert seeds[0] == m["val_bpb"]  # the main run, the one saved and continued, comes first
        assert len(set(seeds)) == 3, seeds  # other batch orders: a reused seed would repeat a figure
        assert m["val_bpb_mean"] == pytest.approx(sum(seeds) / 3)
        assert m["val_bpb_std"] == pytest.approx(statistics.stdev(seeds)) and m["val_bpb_std"] > 0
        # the extra seeds save nothing: only the main run's milestones and final checkpoint
        model_dir = trained / "models" / name
        assert sorted(p.name for p in model_dir.iterdir()) == sorted([*(f"step_{s}" for s in m["milestones"]), "final"])
        assert [s for s, _ in list_milestones(model_dir)] == m["milestones"]
        progress = json.loads((trained / "state" / name / "seed_2339" / "progress.json").read_text())
        assert progress["state"] == "finished" and progress["step"] == m["steps"]


@pytest.mark.timeout(120)
def test_k1_log_mode_control_2_is_not_trained(trained):
    from sunfish.evaluation.components import component_deltas, read_runs
    from sunfish.status import format_status, read_status
    from sunfish.training.checkpoint import list_milestones

    out = trained / "models" / "control_2"
    assert [p.name for p in out.iterdir()] == ["not_trained.json"]  # no weights, no checkpoints
    note = json.loads((out / "not_trained.json").read_text())
    assert note["trained"] is False and "identical to stage_2 by construction" in note["reason"]
    assert "staged.k1.mode=log" in note["reason"]
    assert list_milestones(out) == []  # evaluate's loop finds nothing to score, so control_2 is skipped
    metrics = _metrics(trained, "control_2")
    assert metrics["trained"] is False and "val_bpb" not in metrics and "val_bpb_seeds" not in metrics
    assert _curve(trained, "control_2") == ["step,loss,lr,tokens_per_s,grad_norm"]  # DVC's plots folder exists
    # every output dvc.yaml declares is written, the metrics file too: with no figure in it
    assert json.loads((trained / "reports" / "metrics" / "control_2.json").read_text()) == {}
    k1 = [r for r in component_deltas({}, read_runs(trained / "reports" / "stages")) if r["component"] == "K-1"]
    assert len(k1) == 1 and k1[0]["verdict"] == "attribution only (k1.mode: log)"
    assert "identical to its control by construction, not trained twice" in k1[0]["text"]
    status = format_status(read_status(trained))
    assert "control_2: not trained" in status and "stage_1 seed 2338: finished" in status
    assert "control_2" in format_status(read_status(trained, "control_2"))


@pytest.mark.timeout(120)
def test_k1_scale_mode_control_2_trains(trained, tmp_path, monkeypatch):
    from pipeline.train_staged import run_control

    root = tmp_path / "scale"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("mlruns", "*.db"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["staged"]["k1"]["mode"] = "scale"
    params["staged"]["seeds"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(root)
    run_control(2)
    out = root / "models" / "control_2"
    assert not (out / "not_trained.json").exists()
    assert (out / "final" / "model.safetensors").exists()
    metrics = _metrics(root, "control_2")
    assert metrics["steps"] == STEPS["stage_2"] and metrics["seeds"] == 2 and len(set(metrics["val_bpb_seeds"])) == 2
    assert _config(root, "control_2")["model_config"]["stage"] == 1


@pytest.mark.timeout(120)
def test_only_controls_whose_previous_stage_has_k1_apply_it(trained, monkeypatch):
    import sunfish.training.k1 as k1
    from pipeline.train_staged import run_control

    calls = []
    real = k1.make_k1_hook
    monkeypatch.setattr(k1, "make_k1_hook", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    monkeypatch.chdir(trained)
    run_control(2)  # stage 1's model: no K-1
    assert calls == []
    run_control(3)  # stage 2's model: K-1 as stage 2 has it, no graph routing
    assert calls == [("log", 0.9)]
    config = _config(trained, "control_3")["model_config"]
    assert config["stage"] == 2
    assert not any("graph" in k for k in load_file(trained / "models" / "control_3" / "final" / "model.safetensors"))
