"""The whole diagnosis on a tiny corpus: ``run_diagnostics`` passes a healthy setup and fails broken
data, the ``diagnose`` stage (fail / warn with and without ``diagnose.fail_on_warn``) and the
``sunfish diagnose`` command.
"""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from sunfish import diagnose as dg
from sunfish.config import Params, parse_params
from sunfish.diagnose.core import make_check
from sunfish.diagnose.data_checks import sequences_in
from tests.diagnose.helpers import by_name

NOUNS = ["cat", "dog", "bird", "ball", "tree", "boat", "cake", "fish", "hat", "star", "frog", "kite"]
NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max"]
VERBS = ["saw", "liked", "found", "lost", "drew", "wanted", "painted", "hid"]
ADJS = ["red", "big", "small", "happy", "old", "shiny", "blue", "soft"]


def _story(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(5, 9)):
        out.append(f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(ADJS)} {rng.choice(NOUNS)} "
                   f"near a {rng.choice(NOUNS)}.")
    return "Once upon a time, " + " ".join(out)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from sunfish.data.prepare import prepare_corpus

    root = tmp_path_factory.mktemp("diag")
    rng = random.Random(0)
    corpus = root / "stories.txt"
    corpus.write_text("\n\n".join(_story(rng) for _ in range(400)) + "\n", encoding="utf-8")
    raw = {
        "data": {"source": str(corpus), "val_fraction": 0.2},
        "tokenizer": {"vocab_size": 300},
        "presets": {"t": {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "seq_len": 32}},
        "train": {"lr": 3e-3, "warmup_steps": 5, "max_steps": 60, "milestones": [30, 60], "batch_size": 8,
                  "grad_accum_steps": 4, "seq_len": 32, "threads": 1},
        "staged": {"preset": "t", "temporal": {"dim": 8}, "graph": {"window": 4, "top_k": 2, "shortcuts": 2},
                   **{f"stage_{k}": {"max_steps": 10, "milestones": [10]} for k in (1, 2, 3)}},
        "cfg": {"preset": "t", "max_prompt_tokens": 8, "prompt_encoder_layers": 1},
        "eval": {"cfg_seq_len": 32},
        "diagnose": {"memorize_steps": 200},
        "tracking": {"enabled": False},
    }
    params = parse_params(raw)
    prepared = root / "data" / "prepared"
    prepare_corpus(params.data, params.tokenizer, prepared, root)
    return root, raw, params, prepared


def test_healthy_tiny_setup_passes_every_check(tiny_setup):
    _, _, params, prepared = tiny_setup
    report = dg.run_diagnostics(params, prepared)
    bad = [(c["name"], c["status"], c["message"]) for c in report["checks"] if c["status"] != "ok"]
    assert report["status"] == "ok", bad
    names = {c["name"] for c in report["checks"]}
    per_model = ("config_heads", "config_seq_len", "config_milestones", "config_effective_batch", "config_vocab",
                 "config_memory_fit", "size_vs_data", "init_logits", "init_loss", "gradient_nan", "gradient_flow",
                 "gradient_vanishing", "gradient_exploding", "residual_branches", "residual_gain", "memorisation",
                 "lr_schedule", "speed", "eta", "peak_memory")
    for expected in ("environment", "data/load", "data/splits", "data/val_split", "data/batch_content",
                     "data/special_tokens", "data/tokenizer_roundtrip", "data/unknown_tokens", "data/val_overlap",
                     "data/pairs", *(f"stage_0/{c}" for c in per_model), *(f"cfg/{c}" for c in per_model),
                     "stage_3/config_graph", "stage_3/gradient_flow", "stage_3/residual_gain",
                     "cfg/prompt_encoder", "cfg/noise_schedule_snr", "cfg/conditioning_dropout",
                     "cfg/conditioning_effect", "pipeline/eta"):
        assert expected in names, expected
    assert "stage_3/memorisation" not in names  # stage 3: forward/backward and residual probes only
    rows = by_name(report["checks"])
    assert rows["stage_0/residual_gain"]["value"] == pytest.approx(1.0, abs=1e-3)
    assert rows["cfg/residual_gain"]["value"] == pytest.approx(1.0, abs=1e-3)
    splits = rows["data/splits"]
    assert splits["value"]["train_sequences"] == sequences_in(splits["value"]["train_tokens"], 32)
    assert splits["details"]["sequences_drawn"] == 8 * 4 * 60  # batch x accumulation x max_steps
    assert set(rows["stage_0/eta"]["details"]) == {"30", "60"}  # an ETA for every milestone
    assert {"device", "threads", "torch"} <= set(report["environment"])
    for c in report["checks"]:
        assert set(c) >= {"name", "status", "value", "threshold", "message"}
    json.dumps(report)  # JSON-safe
    table = dg.format_table(report)
    assert "stage_0" in table and "memorisation" in table and "Nothing to change" in table


def test_all_zero_token_file_fails_the_run(tiny_setup, tmp_path):
    _, _, params, prepared = tiny_setup
    broken = tmp_path / "prepared"
    shutil.copytree(prepared, broken)
    n = (broken / "train.bin").stat().st_size // 2
    np.zeros(n, dtype=np.uint16).tofile(broken / "train.bin")
    report = dg.run_diagnostics(params, broken, models=["stage_0"])
    rows = by_name(report["checks"])
    assert report["status"] == "fail"
    assert rows["data/batch_content"]["status"] == "fail"
    assert rows["data/special_tokens"]["status"] == "fail"
    assert "What to change" in dg.format_table(report)


def test_missing_data_and_mismatched_vocabulary_do_not_crash(tiny_setup, tmp_path):
    _, raw, params, prepared = tiny_setup
    report = dg.run_diagnostics(params, tmp_path / "nothing", models=["stage_0", "cfg"])
    assert report["status"] == "fail" and by_name(report["checks"])["data/load"]["status"] == "fail"
    small_vocab = Params.model_validate({**raw, "presets": {"t": {**raw["presets"]["t"], "vocab_size": 100}}})
    report = dg.run_diagnostics(small_vocab, prepared, models=["stage_0"])
    rows = by_name(report["checks"])
    assert rows["stage_0/config_vocab"]["status"] == "fail"
    assert report["status"] == "fail"


def test_preset_too_large_for_memory_fails_before_building(tiny_setup):
    _, raw, _, prepared = tiny_setup
    giant = {"n_layer": 96, "n_head": 96, "d_model": 12288, "d_ff": 49152, "seq_len": 32}  # ~175B parameters
    params = Params.model_validate({**raw, "presets": {"t": giant}})
    report = dg.run_diagnostics(params, prepared, models=["stage_0", "cfg"])
    rows = by_name(report["checks"])
    for model in ("stage_0", "cfg"):
        fit = rows[f"{model}/config_memory_fit"]
        assert fit["status"] == "fail", fit["message"]
        assert fit["value"] > 1e6 and fit["details"]["optimizer"] == pytest.approx(2 * fit["details"]["weights"])
        assert "train.batch_size" in fit["message"] and "smaller preset" in fit["message"]
        assert f"{model}/init_loss" not in rows  # nothing was built or trained
    assert report["status"] == "fail" and report["seconds"] < 60


def test_diagnose_stage_writes_report_and_stamp(tiny_setup, monkeypatch):
    import yaml

    from pipeline import diagnose as stage

    root, raw, params, prepared = tiny_setup
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(root)
    monkeypatch.setattr(dg, "run_diagnostics", lambda p, d, models=None: _canned(p, d, "ok"))
    stage.run()
    stamp = root / "data" / "diagnose.ok"
    assert stamp.read_text(encoding="utf-8") == stage.STAMP_TEXT
    report = json.loads((root / "reports" / "diagnose.json").read_text(encoding="utf-8"))
    assert report["status"] == "ok" and "mlflow_run_id" in report
    metrics = stage.report_metrics(report)
    assert metrics["diagnose/stage_0/memorisation"] == 12.0 and metrics["diagnose/checks_fail"] == 0.0

    assert "memorisation" in (root / "state" / "diagnose" / stage.TABLE_NAME).read_text()  # the table, for MLflow

    monkeypatch.setattr(dg, "run_diagnostics", lambda p, d, models=None: _canned(p, d, "fail"))
    with pytest.raises(SystemExit) as exc:
        stage.run()
    assert exc.value.code == 1 and not stamp.exists()
    assert json.loads((root / "reports" / "diagnose.json").read_text())["status"] == "fail"


@pytest.mark.parametrize("fail_on_warn", [False, True])
def test_diagnose_stage_warnings_stop_it_only_when_params_say_so(tiny_setup, monkeypatch, caplog, fail_on_warn):
    import yaml

    from pipeline import diagnose as stage

    root, raw, _, _ = tiny_setup
    raw = {**raw, "diagnose": {**raw["diagnose"], "fail_on_warn": fail_on_warn}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(root)
    monkeypatch.setattr(dg, "run_diagnostics", lambda p, d, models=None: _canned(p, d, "warn"))
    stamp = root / "data" / "diagnose.ok"
    stamp.unlink(missing_ok=True)
    caplog.set_level("INFO")
    if fail_on_warn:
        with pytest.raises(SystemExit) as exc:
            stage.run()
        assert exc.value.code == 1 and not stamp.exists()
        assert "diagnose.fail_on_warn is true; training will not start" in caplog.text
        assert "stage_0/residual_gain: remove the 0.1 scale" in caplog.text  # the remedy, printed
    else:
        stage.run()
        assert stamp.exists()
    assert json.loads((root / "reports" / "diagnose.json").read_text())["status"] == "warn"


def test_failing_stage_prints_the_remedy(tiny_setup, monkeypatch, caplog):
    import yaml

    from pipeline import diagnose as stage

    root, raw, _, _ = tiny_setup
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(root)
    monkeypatch.setattr(dg, "run_diagnostics", lambda p, d, models=None: _canned(p, d, "fail"))
    caplog.set_level("INFO")
    with pytest.raises(SystemExit):
        stage.run()
    assert "diagnose failed; training will not start" in caplog.text
    assert "stage_0/gradient_flow: 3 tensors get no gradient; remove the .detach()" in caplog.text


def test_cli_diagnose_runs_the_same_checks_for_a_chosen_stage_and_preset(tiny_setup):
    import yaml
    from click.testing import CliRunner

    from sunfish.cli import main

    root, raw, _, _ = tiny_setup
    presets = {**raw["presets"], "t2": {**raw["presets"]["t"], "n_layer": 1}}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({**raw, "presets": presets}), encoding="utf-8")
    result = CliRunner().invoke(main, ["diagnose", "--params", str(path), "--model", "stage_1", "--preset", "t2",
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the log goes to stderr
    assert report["status"] == "ok" and report["models"] == ["stage_1"]
    rows = by_name(report["checks"])
    assert rows["stage_1/memorisation"]["status"] == "ok"  # explicitly asked: every check, not the light ones
    assert rows["stage_1/size_vs_data"]["details"]["params_temporal"] > 0
    assert rows["stage_1/residual_gain"]["details"].keys() == {"blocks.0"}  # the t2 preset: one layer
    result = CliRunner().invoke(main, ["diagnose", "--params", str(path), "--model", "stage_0"])
    assert result.exit_code == 0 and "SunFish diagnose: OK" in result.output and "[stage_0]" in result.output


def _canned(params, prepared, status: str) -> dict:
    checks = [make_check("stage_0/memorisation", "ok", 12, "loss < 0.1", "fine")]
    if status == "fail":
        checks.append(make_check("stage_0/gradient_flow", "fail", 3, "0",
                                    "3 tensors get no gradient; remove the .detach()"))
    if status == "warn":
        checks.append(make_check("stage_0/residual_gain", "warn", 0.1, ">= 0.5", "remove the 0.1 scale"))
    counts = {"ok": 1, "warn": int(status == "warn"), "fail": int(status == "fail")}
    return {"status": status, "counts": counts, "checks": checks,
            "environment": {"device": "cpu"}, "models": ["stage_0"], "seconds": 0.1}
