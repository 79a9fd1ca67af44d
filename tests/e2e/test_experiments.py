"""End to end: DVC experiments and sweeps compared in DVC and in MLflow, and a DVC remote.

A copy of the session's tiny pipeline run (the TINY profile of test_pipeline.py) is the baseline; a queued
guidance sweep (1 and 3) runs on two workers at once, then the tests check what a user compares:
`dvc exp show`, `dvc exp diff`, `dvc plots diff`, `sunfish compare`, and the parent runs in the one
MLflow store. Which stages a learning-rate change reruns is checked with `dvc repro --dry` (a real
run would retrain: minutes of CI for what DVC's own graph already answers). The remote test pushes everything
to a local-directory DVC remote, deletes the cache and the outputs, and pulls them back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.dvc_stages import resolved_stages
from tests.e2e.test_pipeline import copy_repo, env, ran_stages, run, set_dotted, tree_digest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

MODELS = ("stage_0", "stage_1", "stage_2", "stage_3", "cfg")
HEADLINE = [f"{m}.best_val_bpb" for m in MODELS] + ["cfg.adherence", "cfg.checklist_passed"]  # MLflow parent runs
# what `dvc exp show` compares: the metrics files' keys
SHOWN = ["fluency.fluent_on_topic", "fluency.fluent_on_topic_w0", "fluency.fluent", "stage_0.val_bpb", "cfg.val_bpb"]
FLUENCY = [k for k in SHOWN if k.startswith("fluency.")]


SWEEP = (2, 3)  # guidance scales of the queued sweep; neither is the baseline's


def baseline_guidance(repo: Path) -> float:
    return float(yaml.safe_load((repo / "params.yaml").read_text())["sampling"]["guidance_scale"])


@pytest.fixture(scope="module")
def repo(tiny_baseline, tmp_path_factory) -> Path:
    return copy_repo(tiny_baseline, tmp_path_factory.mktemp("sunfish-exp"))


def wait_for_queue(repo: Path, timeout: float = 900) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], repo).stdout
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(3)
    raise AssertionError(f"queue still busy after {timeout} s:\n{status}")


def store(repo: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    return client, client.get_experiment_by_name("sunfish").experiment_id


@pytest.fixture(scope="module")
def sweep(repo) -> list[str]:
    """Queue a guidance sweep (a list), run it on two workers; the experiments' names.

    Every value differs from the baseline's (params.yaml's sampling.guidance_scale): an experiment equal to
    its baseline reruns no stage, so it logs nothing to MLflow (DVC shows it with the baseline's results).
    """
    start = time.perf_counter()
    assert SWEEP[0] != baseline_guidance(repo) != SWEEP[1]
    run(["dvc", "exp", "run", "--queue", "-S", f"sampling.guidance_scale={SWEEP[0]},{SWEEP[1]}"], repo)
    run(["dvc", "queue", "start", "-j", "2"], repo)
    status = wait_for_queue(repo)
    print(f"2 queued experiments on 2 workers: {time.perf_counter() - start:.0f}s")
    assert status.count("Success") == 2, status
    listed = run(["dvc", "exp", "ls", "--name-only"], repo).stdout.split()
    names = [n for n in listed if not n.endswith(":")]
    assert len(names) == 2, listed
    return names


def test_every_experiment_lands_grouped_in_the_one_store(repo, sweep):
    from sunfish.tracking import find_parents

    client, exp_id = store(repo)
    parents = {p.data.tags["sunfish.experiment"]: p for p in find_parents(client, [exp_id])}
    assert set(sweep) <= set(parents), (sweep, list(parents))
    guidance = {}
    for name in sweep:
        parent = parents[name]
        children = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        stages = {c.data.tags["dvc.stage"] for c in children}
        assert {c.data.tags["dvc.exp_name"] for c in children} == {name}
        assert {c.data.tags["sunfish.experiment"] for c in children} == {name}
        assert all(c.info.status == "FINISHED" for c in children) and parent.info.status == "FINISHED"
        assert stages <= {"validate", "evaluate", "evaluate_fluency", "report"} and "evaluate" in stages, stages
        guidance[parent.data.params["sampling.guidance_scale"]] = name
        assert set(HEADLINE) <= set(parent.data.metrics), sorted(parent.data.metrics)
        evaluate = next(c for c in children if c.data.tags["dvc.stage"] == "evaluate")
        for model in MODELS:  # every per-milestone value arrived, with two experiments writing at once
            steps = sorted(m.step for m in client.get_metric_history(evaluate.info.run_id, f"{model}/val_bpb"))
            assert steps == ([6, 12] if model in ("stage_0", "cfg") else [4]), (name, model, steps)
    assert set(guidance) == {f"{float(w)}" for w in SWEEP}, guidance
    assert not list((repo / "state" / "mlflow_fallback").glob("*.jsonl"))
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))


def _exp_show(repo: Path) -> dict[str, dict]:
    """{experiment name or rev: {"params": {...}, "metrics": {...}}} from `dvc exp show --json`."""
    out: dict[str, dict] = {}

    def visit(entry: dict) -> None:
        data = entry.get("data") or {}
        name = data.get("name") or entry.get("name") or data.get("rev") or entry.get("rev")
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        metrics = {}
        for result in (data.get("metrics") or {}).values():
            metrics.update((result or {}).get("data") or {})
        if name:
            out[name] = {"params": params, "metrics": metrics}
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                visit(rev)

    for entry in json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout):
        visit(entry)
    return out


def test_exp_show_has_the_key_metrics_and_swept_params(repo, sweep):
    shown = _exp_show(repo)
    client, exp_id = store(repo)
    for name in sweep:
        assert name in shown, list(shown)
        metrics, params = shown[name]["metrics"], shown[name]["params"]
        for key in SHOWN:
            assert metrics.get(key) is not None, (name, key, metrics)
        assert params["sampling"]["guidance_scale"] in SWEEP and params["train"]["lr"]
        parent = [p for p in client.search_runs([exp_id], filter_string=f"tags.`sunfish.experiment` = '{name}' "
                                                "and tags.`sunfish.parent` = 'true'")][0]
        for key in FLUENCY:  # MLflow and DVC agree, under the same names
            assert parent.data.metrics[key] == pytest.approx(metrics[key]), (name, key)
    table = run(["dvc", "exp", "show", "--no-pager", "--md"], repo).stdout
    for column in ("fluency.fluent_on_topic", "stage_0.val_bpb", "sampling.guidance_scale", "train.lr"):
        assert column in table, table[:2000]


def test_exp_diff_and_plots_diff_compare_two_experiments(repo, sweep):
    shown = _exp_show(repo)
    low, high = sorted(sweep, key=lambda n: shown[n]["params"]["sampling"]["guidance_scale"])
    diff = json.loads(run(["dvc", "exp", "diff", low, high, "--json"], repo).stdout)
    print(json.dumps(diff)[:1500])
    changed = diff["params"]["params.yaml"]
    assert set(changed) == {"sampling.guidance_scale"} and changed["sampling.guidance_scale"]["new"] == SWEEP[1], changed
    # metrics hold numbers only now (no run ids): on the tiny profile both scales can give the same
    # figures, and then DVC reports no metric change; whatever it reports comes from the metrics files
    assert set(diff.get("metrics") or {}) <= {"reports/metrics/fluency.json"}, diff  # training reran nothing
    out = repo.parent / "plots-diff"
    proc = run(["dvc", "plots", "diff", low, high, "-o", str(out)], repo)
    html = (out / "index.html").read_text()
    assert "Prompt adherence vs guidance scale" in html and low in html and high in html, proc.stdout


def test_compare_lists_the_sweep(repo, sweep):
    result = subprocess.run(["sunfish", "compare", "--format", "csv"], cwd=repo, env=env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    import csv
    import io

    rows = {r["experiment"]: r for r in csv.DictReader(io.StringIO(result.stdout))}
    assert set(sweep) <= set(rows)
    header = result.stdout.splitlines()[0].split(",")
    assert {"sampling.guidance_scale", "cfg.best_val_bpb", "cfg.adherence", "checklist"} <= set(header)
    assert {rows[n]["sampling.guidance_scale"] for n in sweep} == {f"{float(w)}" for w in SWEEP}
    table = subprocess.run(["sunfish", "compare", "--last", "2"], cwd=repo, env=env(), capture_output=True,
                           text=True, timeout=120).stdout
    print(table)
    assert all(name in table for name in sweep)


def _dry_run(repo: Path, key: str, value: float) -> set[str]:
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    set_dotted(params, key, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        return set(ran_stages(run(["dvc", "repro", "--dry"], repo).stdout))
    finally:
        (repo / "params.yaml").write_text(original)


def test_lr_change_reruns_the_training_stages_and_what_follows(repo):
    """`dvc repro --dry` names the stages a change invalidates by itself; what follows them is
    DVC's graph: evaluate depends on the models folder, which holds every training stage's output,
    and report on evaluate's outputs."""
    import networkx as nx
    from dvc.repo import Repo

    stages = resolved_stages(repo)  # the foreach families expanded: train_stage@1, ..., control_stage@3
    training = {name: spec["outs"][0] for name, spec in stages.items()
                if any(str(o).startswith("models/") for o in spec.get("outs", []))}
    assert len(training) >= 5, training
    assert "models" in stages["evaluate"]["deps"]
    with Repo(str(repo)) as dvc_repo:  # DVC links a folder dependency to every output inside it
        graph = dvc_repo.index.graph
        evaluate = next(s for s in graph.nodes if s.name == "evaluate")  # addressing is relative to the cwd
        assert set(training) <= {s.name for s in nx.descendants(graph, evaluate)}
    assert "reports/milestones.json" in stages["report"]["deps"]

    invalidated = _dry_run(repo, "train.lr", 1e-3)
    assert set(training) <= invalidated, invalidated
    assert "prepare" not in invalidated, invalidated
    invalidated = _dry_run(repo, "cfg.budget.lr", 5e-4)  # the diffusion model's own lr (1e-3 in params): only its training
    assert "train_cfg_micro" in invalidated and not invalidated & (set(training) - {"train_cfg_micro"}), invalidated


def test_remote_push_then_pull_restores_data_and_checkpoints(repo, tmp_path):
    remote = tmp_path / "dvc-remote"
    outs = [d for d in (repo / "models").iterdir() if d.is_dir()] + [repo / "data" / "prepared"]
    before = tree_digest(*outs)
    run(["dvc", "remote", "add", "-d", "--local", "shared", str(remote)], repo)
    try:
        run(["dvc", "push"], repo)
        assert any(remote.rglob("*")), "nothing pushed"
        shutil.rmtree(repo / ".dvc" / "cache")
        for out in outs:
            shutil.rmtree(out)
        run(["dvc", "pull"], repo)
        assert tree_digest(*outs) == before
        assert ran_stages(run(["dvc", "repro"], repo).stdout) == []
    finally:
        run(["dvc", "remote", "remove", "--local", "shared"], repo, check=False)
