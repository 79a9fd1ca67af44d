"""End to end: the real `dvc repro` of the whole pipeline on a tiny profile, in a temporary git repo.

One run of the pipeline per test session (tests/e2e/conftest.py) serves every test here, each
module working on its own copy; the tests then check what a user
sees: outputs on disk, what MLflow holds, what a second `dvc repro` reruns, what a guidance-only
change reruns, that a params typo is refused with nothing lost, and that queued experiments log
into the main store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

# A profile small enough for CI (2 cores): every stage runs for real, briefly.
TINY = {
    "data.max_documents": 300,
    "tokenizer.vocab_size": 512,
    "staged.preset": "nano",
    "cfg.preset": "nano",
    "train.max_steps": 12,
    "train.milestones": [6, 12],
    "train.warmup_steps": 2,
    "train.batch_size": 4,
    "train.seq_len": 64,
    "train.eval_every": 6,
    "train.eval_batches": 2,
    "train.log_every": 3,
    "staged.stage_1": {"max_steps": 4, "milestones": [4], "lr": None, "warmup_steps": 1},
    "staged.stage_2": {"max_steps": 4, "milestones": [4], "lr": None, "warmup_steps": 1},
    "staged.stage_3": {"max_steps": 4, "milestones": [4], "lr": None, "warmup_steps": 1},
    "cfg.timesteps": 100,
    "sampling.num_steps": 8,
    "eval.max_eval_tokens": 2048,
    "eval.max_new_tokens": 8,
    "eval.guidance_scales": [0.0, 3.0],
    "eval.cfg_prompts": 4,
    "eval.cfg_seq_len": 32,
    "eval.fluency": {"dev_prompts": 8, "test_prompts": 8, "max_words": 16, "judge_order": 3, "dev_scales": [1.0],
                     "best_of_k": 2},
    "diagnose.memorize_steps": 150,
}


def set_dotted(tree: dict, key: str, value) -> None:
    node = tree
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def project_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e.pop("MLFLOW_TRACKING_URI", None)
    e.pop("DVC_ROOT", None)
    e.pop("PYTHONDONTWRITEBYTECODE", None)  # as a user runs it: Python writes __pycache__ beside the code deps
    e["SUNFISH_LOG_LEVEL"] = "WARNING"
    e["GIT_AUTHOR_NAME"] = e["GIT_COMMITTER_NAME"] = "sunfish-test"
    e["GIT_AUTHOR_EMAIL"] = e["GIT_COMMITTER_EMAIL"] = "test@example.invalid"
    return e


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def tree_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for base in paths:
        for f in sorted(p for p in base.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(base)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def tiny_repo(repo: Path) -> subprocess.CompletedProcess:
    """The project copied into ``repo`` with the TINY profile, committed, reproduced and committed
    again (as a user would, so experiments have a baseline); returns the `dvc repro` process."""
    for rel in project_files():
        dst = repo / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in TINY.items():
        set_dotted(params, key, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "tiny profile"], repo)
    start = time.perf_counter()
    proc = run(["dvc", "repro"], repo)
    print(f"tiny dvc repro: {time.perf_counter() - start:.0f}s")
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "tiny run"], repo)
    return proc


def copy_repo(src: Path, dst: Path) -> Path:
    """A copy of a reproduced repo (git, DVC cache, outputs, state, MLflow store) that is its own.

    The only absolute paths that matter are MLflow's artifact locations (file URIs, and a plain path
    for the Default experiment), which would send the copy's artifacts into the original: they are
    rewritten. DVC keys its state by the repo's path, so the copy rehashes its files once and finds
    them unchanged.
    """
    import sqlite3

    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    old, new = str(src.resolve()), str(dst.resolve())  # inside file:// URIs too
    with sqlite3.connect(dst / "mlflow.db") as db:
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    db.close()
    return dst


@pytest.fixture(scope="module")
def repo(tiny_baseline, tmp_path_factory) -> Path:
    return copy_repo(tiny_baseline, tmp_path_factory.mktemp("sunfish-e2e"))


def test_repro_writes_reports_metrics_and_checkpoints(repo):
    assert (repo / "reports" / "report.html").stat().st_size > 1000
    assert (repo / "reports" / "report.md").exists()
    models = ("stage_0", "stage_1", "stage_2", "stage_3", "control_1", "control_2", "control_3", "cfg")
    # DVC metrics: one figure a model and the diffusion model's headline; the records are reports
    assert sorted(p.stem for p in (repo / "reports" / "metrics").iterdir()) == sorted((*models, "fluency"))
    for name in (*models, "fluency"):
        figures = json.loads((repo / "reports" / "metrics" / f"{name}.json").read_text())
        assert all(isinstance(v, (int, float)) for v in figures.values()) and len(figures) <= 8, (name, figures)
        if name != "fluency":  # control_2 is not trained in k1.mode log: no figure
            assert list(figures) == ([] if name == "control_2" else [f"{name}.val_bpb"]), (name, figures)
    for record in ("prepare", "stage_0", "cfg"):
        assert (repo / "reports" / "stages" / f"{record}.json").exists(), record
    for model, steps in {"stage_0": [6, 12], "stage_3": [4], "control_3": [4], "cfg": [6, 12]}.items():
        for step in steps:
            assert (repo / "models" / model / f"step_{step}" / "model.safetensors").exists()
            assert (repo / "models" / model / f"step_{step}" / "config.json").exists()
    assert not (repo / "mlruns").exists()
    config = json.loads((repo / "models" / "stage_0" / "final" / "config.json").read_text())
    assert config["data"]["source"] == yaml.safe_load((repo / "params.yaml").read_text())["data"]["source"]
    # every milestone was chosen on the dev half and reports the other half (choose on dev, report on test)
    summary = json.loads((repo / "reports" / "milestones.json").read_text())
    for name, model in summary["models"].items():
        for m in model["milestones"]:
            assert m["selection"]["tokens"] > 0 and m["tokens"] < m["split_tokens"], (name, m["step"])
            assert "quality" in m["selection"], (name, m["step"])


def test_controls_train_the_previous_model_for_the_stage_budget(repo):
    import json

    for n in (1, 3):
        stage = json.loads((repo / "reports" / "stages" / f"stage_{n}.json").read_text())
        control = json.loads((repo / "reports" / "stages" / f"control_{n}.json").read_text())
        assert control["steps"] == stage["steps"] and control["milestones"] == stage["milestones"]
        assert control["seeds"] == stage["seeds"] == 3 and len(set(control["val_bpb_seeds"])) == 3
        config = json.loads((repo / "models" / f"control_{n}" / "final" / "config.json").read_text())
        assert config["model_config"]["stage"] == n - 1
    # staged.k1.mode: log changes no update, so control_2 would be stage_2: written, not trained
    assert [p.name for p in (repo / "models" / "control_2").iterdir()] == ["not_trained.json"]
    assert "attribution only (k1.mode: log)" in (repo / "reports" / "report.md").read_text()


def test_mlflow_holds_one_run_per_training_stage(repo):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sunfish")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    by_stage = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("dvc.stage"), []).append(r)
    for stage in ("train_stage_0", "train_stage@1", "train_stage@2", "train_stage@3", "control_stage@1",
                  "control_stage@3", "train_cfg_micro"):  # control_stage@2 trains nothing in k1.mode log
        assert len(by_stage.get(stage, [])) == 1, stage
        r = by_stage[stage][0]
        assert {"train/loss", "val/loss", "val/ppl", "val/bpb"} <= set(r.data.metrics), stage
        assert r.data.params["train.lr"]
        assert r.data.tags.get("git.commit") and r.data.tags.get("params.hash")
        assert int(r.data.tags["sunfish.threads"]) >= 1, stage  # the weights depend on the thread count
        assert r.info.status == "FINISHED"
        if stage == "train_stage@2":  # k1.mode log: one seed (no control to compare with), so no spread
            assert r.data.metrics["seeds/count"] == 1 and "seeds/val_bpb_std" not in r.data.metrics
        elif stage not in ("train_stage_0", "train_cfg_micro"):
            assert {"seeds/val_bpb_mean", "seeds/val_bpb_std", "seeds/count"} <= set(r.data.metrics), stage
    history = client.get_metric_history(by_stage["train_stage_0"][0].info.run_id, "train/loss")
    assert len(history) >= 4
    # one `dvc repro`, one parent run: every stage run of it is grouped under the same parent
    parents = {r.data.tags.get("mlflow.parentRunId") for stage, rs in by_stage.items() if stage for r in rs}
    assert len(parents) == 1 and None not in parents, parents
    # every model's best checkpoint is a registered version aliased champion; controls are yardsticks
    registered = {m.name for m in client.search_registered_models()}
    assert registered == {"sunfish-stage_0", "sunfish-stage_1", "sunfish-stage_2", "sunfish-stage_3", "sunfish-cfg"}
    champion = client.get_model_version_by_alias("sunfish-stage_3", "champion")
    assert champion.run_id == by_stage["evaluate"][0].info.run_id


def test_second_repro_reruns_nothing(repo):
    start = time.perf_counter()
    proc = run(["dvc", "repro"], repo)
    seconds = time.perf_counter() - start
    assert ran_stages(proc.stdout) == []
    print(f"no-op dvc repro: {seconds:.2f}s")


def _changed_after_editing(repo: Path, relative: str) -> set[str]:
    """The stages `dvc status` marks changed once ``relative`` is edited (the edit is undone after)."""
    path = repo / relative
    original = path.read_text()
    path.write_text(original + "\n# edited by a test\n")
    try:
        out = run(["dvc", "status", "--json"], repo).stdout
    finally:
        path.write_text(original)
    return set(json.loads(out or "{}"))


def test_editing_code_marks_exactly_the_stages_that_run_it(repo):
    """dvc.yaml's code deps: a model file reruns training, the report code reruns only the report."""
    model_edit = _changed_after_editing(repo, "sunfish/models/layers.py")
    training = {"train_stage_0", "train_stage@1", "train_stage@2", "train_stage@3", "control_stage@1",
                "control_stage@2", "control_stage@3", "train_cfg_micro"}
    assert training <= model_edit, model_edit
    assert _changed_after_editing(repo, "sunfish/report/svg.py") == {"report"}
    assert {"train_stage_0", "train_cfg_micro"} <= _changed_after_editing(repo, "sunfish/config/sections.py")
    assert run(["dvc", "status", "--json"], repo).stdout.strip() in ("", "{}")  # every edit undone


def test_params_typo_fails_naming_the_key_and_keeps_outputs(repo):
    before = tree_digest(repo / "models", repo / "reports")
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["train"]["lernig_rate_typo"] = 0.1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = run(["dvc", "repro"], repo, check=False)
        assert proc.returncode != 0
        assert "train.lernig_rate_typo" in proc.stdout + proc.stderr
        assert tree_digest(repo / "models", repo / "reports") == before
    finally:
        (repo / "params.yaml").write_text(original)
    run(["dvc", "repro"], repo)  # the stamp stage reruns; nothing downstream does


def test_fluency_rows_and_the_report_lead(repo):
    """The measure ran on the tiny profile: dev/test/implied rows, references that fail, the report leads with it."""
    data = json.loads((repo / "reports" / "fluency.json").read_text())
    rows = {(r["set"], r["name"], r["guidance_scale"]) for r in data["rows"]}
    assert {("test", "diffusion", 0.0), ("test", "diffusion", 1.0), ("test", "prompt echoed", None),
            ("test", "AR stage 0", None), ("test", "real held-out text", None)} <= rows
    assert any(s == "implied" for s, _, _ in rows) and any(s == "dev" for s, _, _ in rows)
    echo = next(r for r in data["rows"] if r["name"] == "prompt echoed")
    assert echo["on_topic"] == 1.0 and echo["fluent_on_topic"] == 0.0
    k = yaml.safe_load((repo / "params.yaml").read_text())["eval"]["fluency"]["best_of_k"]
    best = [r for r in data["rows"] if r["name"].startswith(("diffusion, best of", "AR stage 0, best of"))]
    assert k > 1 and len(best) == 2  # selection alone, for both families, at its cost
    assert all(r["samples_per_prompt"] == k and r["forward_rows_per_sample"] >= k for r in best)
    assert data["headline"]["best_of_k"] == k
    assert all(r["seconds_per_sample"] > 0 and r["forward_rows_per_sample"] > 0
               for r in data["rows"] if r["role"] == "model" or r["name"] == "AR stage 0")
    md = (repo / "reports" / "report.md").read_text()
    assert md.index("## Fluent and on topic") < md.index("## Summary")
    likelihood = data["likelihood"]  # every token of the validation documents
    assert likelihood["tokens"] > 0 and "whole validation documents" in likelihood["scope"]
    assert "≤ (ELBO, an upper bound)" in md


def test_block_reveal_benchmark_prints_speed_beside_quality(repo, capsys):
    from tests.bench_loader import load_benchmark

    bench = next(load_benchmark("bench_block_reveal"))
    out = bench.main(["--repo", str(repo), "--confidence", "none", "1e-6", "--num-steps", "32", "--threads", "1",
                      "--samples-per-prompt", "2"])
    one, every = out["rows"]
    assert one["parallel_confidence"] is None and every["parallel_confidence"] == 1e-6
    dev = json.loads((repo / "reports" / "fluency.json").read_text())["prompt_sets"]["dev"]
    assert one["n"] == every["n"] == 2 * dev  # two draws of every dev prompt pooled into a row
    assert sum(b["samples"] for b in one["on_topic_by_target_count"]) == one["n"]
    # every draw passes a threshold of 1e-6: a whole block is revealed in its first pass, so a sample
    # costs the prompt's pass and one pass a block; one token a step costs block_size passes a block
    from sunfish.config import load_params

    p = load_params(repo / "params.yaml")
    assert one["top_p"] == every["top_p"] == p.sampling.top_p  # without --top-p the rows sample at sampling.top_p
    size = p.cfg.block_size
    blocks = -(-32 // size)  # eval.cfg_seq_len of the tiny profile
    assert every["forward_rows_per_sample"] == blocks + 1 < one["forward_rows_per_sample"] == blocks * size + 1
    printed = capsys.readouterr().out
    assert out["ar"]["tokens_per_s"] > 0 and "x AR" in printed and "on topic by training pairs" in printed


def test_dvc_exp_show_prints_the_columns_the_layout_predicts(repo):
    """What `dvc exp show` prints is what tests/test_dvc_yaml.py counts for the committed files: a column
    a params.yaml value, a metric key and a dependency path (the tiny profile writes more params)."""
    from tests.dvc_stages import exp_show_columns

    header = run(["dvc", "exp", "show", "--md", "--no-pager"], repo).stdout.splitlines()[0]
    printed = [c.strip() for c in header.strip().strip("|").split("|")]
    keys = {(p.name, k) for p in (repo / "reports" / "metrics").glob("*.json") for k in json.loads(p.read_text())}
    counts = exp_show_columns(repo, len(keys))
    assert len(printed) == counts["total"], (counts, printed)
    assert {"sampling.guidance_scale", "train.lr", "fluency.fluent_on_topic", "stage_0.val_bpb"} <= set(printed), printed


def test_guidance_change_reruns_only_evaluate_and_report(repo):
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["sampling"]["guidance_scale"] = 3.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = run(["dvc", "repro"], repo)
        stages = ran_stages(proc.stdout)
        assert "evaluate" in stages and "report" in stages
        assert set(stages) <= {"validate", "evaluate", "evaluate_fluency", "report"}, stages
    finally:
        (repo / "params.yaml").write_text(original)
        run(["dvc", "repro"], repo)


def test_queued_experiments_land_in_the_main_store(repo):
    from mlflow.tracking import MlflowClient

    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "--allow-empty", "-m", "baseline"], repo)
    # a value other than the baseline's: an experiment equal to its baseline reruns (and logs) nothing
    scale = float(yaml.safe_load((repo / "params.yaml").read_text())["sampling"]["guidance_scale"]) + 1.0
    run(["dvc", "exp", "run", "--queue", "-n", "queued-guidance", "-S", f"sampling.guidance_scale={scale}"], repo)
    run(["dvc", "queue", "start", "-j", "1"], repo)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Success" in status, status
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sunfish")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`dvc.exp_name` = 'queued-guidance'")
    stages = {r.data.tags["dvc.stage"] for r in runs}
    assert {"evaluate", "report"} <= stages, stages
    assert not stages & {"train_stage_0", "train_cfg_micro"}, stages
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))


def _progress_step(repo: Path, model: str) -> int:
    import json

    try:
        return json.loads((repo / "state" / model / "progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def test_ctrl_c_then_repro_resumes_and_a_longer_run_continues(repo):
    """Train to 12, raise max_steps (continues from 12), Ctrl-C mid-run, `dvc repro` resumes."""
    import json
    import signal

    from mlflow.tracking import MlflowClient

    original = (repo / "params.yaml").read_text()
    before = json.loads((repo / "reports" / "stages" / "stage_0.json").read_text())
    params = yaml.safe_load(original)
    params["staged"]["stage_0"] = {"max_steps": 400, "milestones": [6, 12, 200, 400], "lr": None,
                                   "warmup_steps": None}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = subprocess.Popen(["dvc", "repro", "-s", "train_stage_0"], cwd=repo, env=env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while _progress_step(repo, "stage_0") < 60 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode != 0, output
        assert "Run the same command again" in output, output[-3000:]
        saved = sorted(int(p.name[5:]) for p in (repo / "state" / "stage_0" / "runs").glob("*/resume/step_*"))
        assert saved and 60 <= saved[-1] < 400, saved

        proc = run(["dvc", "repro", "-s", "train_stage_0"], repo)
        after = json.loads((repo / "reports" / "stages" / "stage_0.json").read_text())
        assert after["resumed_from_step"] == saved[-1] and after["steps"] == 400
        assert after["milestones"] == [6, 12, 200, 400]
        for step in (6, 12, 200, 400):  # the early milestones came back from state/, not retrained
            assert (repo / "models" / "stage_0" / f"step_{step}" / "model.safetensors").exists()
        assert after["mlflow_run_id"] == before["mlflow_run_id"]  # one MLflow run, continued
        client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
        steps = [m.step for m in client.get_metric_history(after["mlflow_run_id"], "train/loss")]
        assert max(steps) == 400 and min(steps) <= 3

        params["train"]["lr"] = params["train"]["lr"] / 2  # another setting: a fresh run, and why
        params["staged"]["stage_0"].update(max_steps=24, milestones=[12, 24])  # short: only the start matters
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        proc = run(["dvc", "repro", "-s", "train_stage_0"], repo, timeout=600)
        fresh = json.loads((repo / "reports" / "stages" / "stage_0.json").read_text())
        assert fresh["resumed_from_step"] == 0 and fresh["steps"] == 24
    finally:
        (repo / "params.yaml").write_text(original)
        run(["dvc", "checkout", "-f"], repo)
