"""dvc.yaml and params.yaml stay in step: every param is tracked by a stage that uses it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sunfish.config import flatten, parse_params

ROOT = Path(__file__).resolve().parents[1]


def _tracked(dvc: dict, raw: dict) -> dict[str, set[str]]:
    out = {}
    for name, stage in dvc["stages"].items():
        keys = set()
        for entry in stage.get("params", []):
            entry = entry.replace("${staged.preset}", raw["staged"]["preset"]).replace("${cfg.preset}", raw["cfg"]["preset"])
            keys.add(entry)
        out[name] = keys
    return out


def _covered(key: str, tracked: set[str]) -> bool:
    return any(key == t or key.startswith(t + ".") for t in tracked)


def test_every_param_is_tracked_by_some_stage():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    tracked = _tracked(dvc, raw)
    everything = set().union(*tracked.values())
    # presets not chosen by the run do not change it, and tracking (where MLflow writes) is not a result
    ignored = ("presets.", "tracking.")
    active = {f"presets.{raw['staged']['preset']}", f"presets.{raw['cfg']['preset']}"}
    missing = [
        k for k in flatten(parse_params(raw))
        if not _covered(k, everything) and (not k.startswith(ignored) or any(k.startswith(a + ".") for a in active))
    ]
    assert not missing, f"params no stage tracks: {missing}"


@pytest.mark.parametrize("key", ["cfg.guidance_scale", "cfg.guidance", "cfg.guidance_candidates"])
def test_guidance_settings_are_not_training_inputs(key):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    tracked = _tracked(dvc, raw)
    users = {name for name, keys in tracked.items() if _covered(key, keys)}
    assert users == {"evaluate", "evaluate_fluency"}


def test_validate_stage_tracks_the_whole_file():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert "params.yaml" in dvc["stages"]["validate"]["deps"]
    assert "data/params.ok" in dvc["stages"]["prepare"]["deps"]


def test_each_control_stage_mirrors_its_training_stage():
    from sunfish.config import CONTROL_NAMES

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    order = list(stages)
    for control in CONTROL_NAMES:
        n = int(control.rsplit("_", 1)[1])
        stage = stages[f"control_stage_{n}"]
        trained = stages[f"train_stage_{n}"]
        assert stage["cmd"] == f"python -m pipeline train-control --stage {n}"
        assert order.index(f"control_stage_{n}") > order.index("train_stage_3")
        # the same starting weights, data and code as stage N ...
        assert set(stage["deps"]) == set(trained["deps"]) and f"models/stage_{n - 1}" in stage["deps"]
        # ... and stage N's budget, but not stage N's component settings
        assert f"staged.stage_{n}" in stage["params"] and "train" in stage["params"]
        assert "staged.seeds" in stage["params"] and "staged.seeds" in trained["params"]
        own = {1: "staged.temporal", 3: "staged.graph"}.get(n)
        assert own is None or own not in stage["params"]
        assert stage["outs"] == [f"models/{control}", {f"reports/curves/{control}": {"cache": False}},
                                 {f"reports/stages/{control}.json": {"cache": False}}]
        assert list(stage["metrics"][0]) == [f"reports/metrics/{control}.json"]
    assert "staged.k1" in stages["control_stage_3"]["params"]  # control_3 keeps stage 2's K-1
    # control_2 has no K-1, but k1.mode decides whether it is trained at all (log: it would equal stage_2)
    assert "staged.k1" in stages["control_stage_2"]["params"]


def test_training_stages_depend_on_the_code_they_run():
    """Editing the training settings, the runner or the data code must rerun training, or DVC's cache
    serves results of code that no longer exists."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    runner = {"sunfish/config", "sunfish/data", "sunfish/models", "sunfish/training", "pipeline/common.py",
              "pipeline/training.py"}
    for name, stage in stages.items():
        if name.startswith(("train_", "control_")):
            own = "pipeline/train_cfg.py" if name == "train_cfg_micro" else "pipeline/train_staged.py"
            assert runner | {own} <= set(stage["deps"]), (name, sorted(runner | {own} - set(stage["deps"])))
    for path in runner:
        assert (ROOT / path).exists(), path


def _stage_modules() -> dict[str, set[str]]:
    """{`python -m pipeline` command: the pipeline modules it runs}, read from pipeline/cli.py's AST
    (the modules each command imports) and closed over the imports among pipeline modules."""
    import ast

    from tests.test_house_rules import import_graph, project_modules

    modules = project_modules(ROOT, ["pipeline"])
    graph = import_graph(modules)
    runs = {}
    for node in ast.parse((ROOT / "pipeline" / "cli.py").read_text()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        names = [d.args[0].value for d in node.decorator_list
                 if isinstance(d, ast.Call) and getattr(d.func, "attr", None) == "command" and d.args]
        if names:
            runs[names[0]] = {n.module for n in ast.walk(node) if isinstance(n, ast.ImportFrom)
                              and (n.module or "").startswith("pipeline.")}
    closed = {}
    for command, todo in runs.items():
        seen: set[str] = set()
        todo = list(todo)
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(t for t in graph[m] if t in graph and t != "pipeline")
        closed[command] = seen
    return closed


def test_every_stage_runs_a_pipeline_command_and_depends_on_its_modules():
    """dvc.yaml calls `python -m pipeline <command>`; a stage's deps list every pipeline module that
    command runs (pipeline/cli.py, the dispatcher, aside: editing a help text must not retrain)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    modules = _stage_modules()
    assert set(modules) == {"validate", "prepare", "diagnose", "train-staged", "train-control", "train-cfg",
                            "evaluate", "evaluate-fluency", "report"}
    used = set()
    for name, stage in stages.items():
        words = stage["cmd"].split()
        assert words[:3] == ["python", "-m", "pipeline"] and words[3] in modules, (name, stage["cmd"])
        used.add(words[3])
        wanted = {m.replace(".", "/") + ".py" for m in modules[words[3]]}
        assert wanted <= set(stage["deps"]), (name, sorted(wanted - set(stage["deps"])))
    assert used == set(modules)  # every command is a stage


def test_dvc_parses_yaml_with_the_c_parser():
    """Every stage with params makes DVC parse params.yaml again; the pure-Python parser cost ~1.3 s
    of a no-op `dvc repro` (pyproject's ruamel.yaml.clib dependency is what this checks)."""
    from dvc.utils.serialize import parse_yaml
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None, "ruamel.yaml has no C parser: install ruamel.yaml.clib (a project dependency)"
    assert YAML(typ="safe").Parser is CParser
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    assert parse_yaml(text, "params.yaml") == yaml.safe_load(text)


def test_every_plot_names_its_x_and_y():
    """`dvc plots show` draws exactly the declared plots: none falls back to guessing its columns."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        for entry in stage.get("plots", []):
            (path, props), = entry.items() if isinstance(entry, dict) else ((entry, {}),)
            assert props.get("x") and props.get("y"), f"{name}: plot {path} has no x/y"
    for entry in spec.get("plots", []):
        (title, props), = entry.items()
        assert props.get("x") and props.get("y"), f"top-level plot {title} has no x/y"


def test_metrics_files_hold_few_numbers_and_the_records_are_reports():
    """`dvc exp show` compares the headline figures; a stage's whole record is a JSON report."""
    from pipeline.common import TRAINING_HEADLINE, numeric_subset

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in spec.items():
        for entry in stage.get("metrics", []):
            (path,) = entry
            assert path.startswith("reports/metrics/"), (name, path)
        if name.startswith(("train_stage_", "control_stage_")) or name == "train_cfg_micro":
            outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
            assert any(o.startswith("reports/stages/") for o in outs), name
    assert len(TRAINING_HEADLINE) <= 3
    assert numeric_subset({"a": 1.5, "b": "text", "c": None, "d": True, "e": float("nan")}, "abcde") == {"a": 1.5, "d": 1}
