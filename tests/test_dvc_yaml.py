"""dvc.yaml and params.yaml stay in step: every param is tracked by a stage that uses it.

The checks read the stages as DVC resolves them (tests/dvc_stages.py): the foreach families
``train_stage`` and ``control_stage`` expanded into ``train_stage@1`` .. ``control_stage@3``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sunfish.config import CONTROL_NAMES, MODEL_NAMES, flatten, parse_params
from tests.dvc_stages import EXP_SHOW_COLUMNS, entry_path, exp_show_columns, load_spec, resolved_stages

ROOT = Path(__file__).resolve().parents[1]
RUNNER = {"sunfish/config", "sunfish/data", "sunfish/models", "sunfish/training", "pipeline"}


@pytest.fixture(scope="module")
def stages() -> dict[str, dict]:
    return resolved_stages(ROOT)


def _raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _tracked(stages: dict) -> dict[str, set[str]]:
    """{stage: the params.yaml keys it tracks} (``presets.${staged.preset}`` already filled in by DVC)."""
    return {name: {entry for entry in stage.get("params", []) if isinstance(entry, str)}
            for name, stage in stages.items()}


def _covered(key: str, tracked: set[str]) -> bool:
    return any(key == t or key.startswith(t + ".") for t in tracked)


def _untracked_params(stages: dict, raw: dict) -> list[str]:
    everything = set().union(*_tracked(stages).values())
    # presets not chosen by the run do not change it, and tracking (where MLflow writes) is not a result
    ignored = ("presets.", "tracking.")
    active = {f"presets.{raw['staged']['preset']}", f"presets.{raw['cfg']['preset']}"}
    return [
        k for k in flatten(parse_params(raw))
        if not _covered(k, everything) and (not k.startswith(ignored) or any(k.startswith(a + ".") for a in active))
    ]


def test_every_param_is_tracked_by_some_stage(stages):
    missing = _untracked_params(stages, _raw())
    assert not missing, f"params no stage tracks: {missing}"


@pytest.mark.parametrize("key", ["sampling.guidance_scale", "sampling.guidance", "sampling.top_p"])
def test_guidance_settings_are_not_training_inputs(stages, key):
    tracked = _tracked(stages)
    users = {name for name, keys in tracked.items() if _covered(key, keys)}
    assert users == {"evaluate", "evaluate_fluency"}


def _absent_tracked_params(stages: dict, raw: dict) -> list[tuple[str, str]]:
    """(stage, entry) for every tracked params entry that params.yaml does not write: DVC refuses to run
    a stage whose tracked key is missing from the file (params.yaml writes `{}` for a sub-section left
    at its defaults, so that the stages can track it)."""
    absent = []
    for name, keys in _tracked(stages).items():
        for key in sorted(keys):
            node = raw
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    absent.append((name, key))
                    break
                node = node[part]
    return absent


def test_every_tracked_param_is_written_in_params_yaml(stages):
    assert not _absent_tracked_params(stages, _raw())


def test_a_tracked_key_missing_from_params_yaml_is_found(stages):
    raw = _raw()
    del raw["staged"]["temporal"]
    assert _absent_tracked_params(stages, raw) == [("train_stage@1", "staged.temporal")]


def test_validate_stage_tracks_the_whole_file(stages):
    assert "params.yaml" in stages["validate"]["deps"]
    assert "data/params.ok" in stages["prepare"]["deps"]


def test_stages_1_to_3_and_their_controls_are_two_foreach_families(stages):
    """`dvc repro train_stage@2` runs stage 2; stage 0 (which starts from nothing) stays a plain stage."""
    spec = load_spec(ROOT)["stages"]
    for family in ("train_stage", "control_stage"):
        assert set(spec[family]) == {"foreach", "do"} and list(spec[family]["foreach"]) == [1, 2, 3], family
    assert "cmd" in spec["train_stage_0"]
    assert [n for n in stages if n.startswith(("train_stage", "control_stage"))] == [
        "train_stage_0", "train_stage@1", "train_stage@2", "train_stage@3",
        "control_stage@1", "control_stage@2", "control_stage@3"]
    _check_training_stages(stages)


def _check_training_stages(stages: dict) -> None:
    """Stage N (1..3) starts from stage N-1's model and tracks its own component, budget and seeds."""
    for n in (1, 2, 3):
        assert stages[f"train_stage@{n}"]["cmd"] == f"python -m pipeline train-staged --stage {n}"
        assert f"models/stage_{n - 1}" in stages[f"train_stage@{n}"]["deps"]
        assert entry_path(stages[f"train_stage@{n}"]["outs"][0]) == f"models/stage_{n}"
    own = {1: "staged.temporal", 2: "staged.k1", 3: "staged.graph"}
    for n, component in own.items():
        assert {component, f"staged.stage_{n}", "staged.seeds", "train"} == set(stages[f"train_stage@{n}"]["params"])


@pytest.mark.parametrize("edit", ["component", "start"])
def test_a_family_item_naming_the_wrong_input_is_found(edit):
    """A foreach item is where a member's own inputs are written: naming another stage's is caught."""
    spec = load_spec(ROOT)
    item = spec["stages"]["train_stage"]["foreach"][2]
    item[edit] = {"component": "staged.graph", "start": "models/stage_0"}[edit]
    with pytest.raises(AssertionError):
        _check_training_stages(resolved_stages(ROOT, spec))


def test_the_resolved_stages_are_the_ones_dvc_runs(stages):
    """DVC's index (what `dvc repro` and `dvc status` build) holds the same stages, commands and paths."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        index = {s.addressing: s for s in repo.index.stages}
        assert list(index) == list(stages)
        for name, stage in stages.items():
            got = index[name]
            assert got.cmd == stage["cmd"], name
            assert {d.def_path for d in got.deps if not hasattr(d, "params")} == set(stage.get("deps", [])), name
            assert {p for d in got.deps if hasattr(d, "params") for p in d.params} == set(_tracked({name: stage})[name])
            declared = {entry_path(o) for key in ("outs", "metrics", "plots") for o in stage.get(key, [])}
            assert {o.def_path for o in got.outs} == declared, name


def test_each_control_stage_mirrors_its_training_stage(stages):
    _check_controls(stages)


def _check_controls(stages: dict) -> None:
    from sunfish.config import CONTROL_NAMES

    order = list(stages)
    for control in CONTROL_NAMES:
        n = int(control.rsplit("_", 1)[1])
        stage = stages[f"control_stage@{n}"]
        trained = stages[f"train_stage@{n}"]
        assert stage["cmd"] == f"python -m pipeline train-control --stage {n}"
        assert order.index(f"control_stage@{n}") > order.index("train_stage@3")
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
    assert "staged.k1" in stages["control_stage@3"]["params"]  # control_3 keeps stage 2's K-1
    # control_2 has no K-1, but k1.mode decides whether it is trained at all (log: it would equal stage_2)
    assert "staged.k1" in stages["control_stage@2"]["params"]
    # control_1 runs stage 0's model: no component settings (its foreach item repeats its budget instead)
    assert set(stages["control_stage@1"]["params"]) == {"staged.stage_1", "staged.seeds", "train"}


def test_a_control_that_loses_the_training_stage_s_deps_is_found():
    """The mirror check compares family members: a dep dropped from control_stage's template breaks
    all three controls."""
    spec = load_spec(ROOT)
    spec["stages"]["control_stage"]["do"]["deps"].remove("data/prepared")
    stages = resolved_stages(ROOT, spec)
    with pytest.raises(AssertionError):
        _check_controls(stages)


def _missing_runner_deps(stages: dict) -> dict[str, list[str]]:
    """{training stage: the runner code it does not depend on}."""
    missing = {}
    for name, stage in stages.items():
        if name.startswith(("train_", "control_")) and not RUNNER <= set(stage["deps"]):
            missing[name] = sorted(RUNNER - set(stage["deps"]))
    return missing


def test_training_stages_depend_on_the_code_they_run(stages):
    """Editing the training settings, the runner or the data code must rerun training, or DVC's cache
    serves results of code that no longer exists."""
    assert sum(n.startswith(("train_", "control_")) for n in stages) == 8  # stage 0..3, controls 1..3, cfg
    assert not _missing_runner_deps(stages)
    for path in RUNNER:
        assert (ROOT / path).exists(), path


def test_a_runner_dep_missing_from_a_family_template_is_found():
    spec = load_spec(ROOT)
    spec["stages"]["train_stage"]["do"]["deps"].remove("sunfish/training")
    assert _missing_runner_deps(resolved_stages(ROOT, spec)) == {
        f"train_stage@{n}": ["sunfish/training"] for n in (1, 2, 3)}


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


def _module_problems(stages: dict, modules: dict[str, set[str]]) -> tuple[list, set[str]]:
    """([(stage, what is wrong)], the commands the stages run)."""
    problems, used = [], set()
    for name, stage in stages.items():
        words = stage["cmd"].split()
        if words[:3] != ["python", "-m", "pipeline"] or words[3] not in modules:
            problems.append((name, stage["cmd"]))
            continue
        used.add(words[3])
        wanted = {m.replace(".", "/") + ".py" for m in modules[words[3]]}
        missing = {w for w in wanted if not _covered_path(w, set(stage["deps"]))}
        if missing:
            problems.append((name, sorted(missing)))
    return problems, used


def _covered_path(path: str, deps: set[str]) -> bool:
    """``path`` is a dep, or lies in a folder that is one."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_stage_runs_a_pipeline_command_and_depends_on_its_modules(stages):
    """dvc.yaml calls `python -m pipeline <command>`; a stage's deps cover every pipeline module that
    command runs. They name the package (`pipeline`) rather than each module: one dependency column in
    `dvc exp show` instead of ten, at the price of a rerun when any pipeline module changes."""
    modules = _stage_modules()
    assert set(modules) == {"validate", "prepare", "diagnose", "train-staged", "train-control", "train-cfg",
                            "evaluate", "evaluate-fluency", "report"}
    problems, used = _module_problems(stages, modules)
    assert not problems
    assert used == set(modules)  # every command is a stage


def test_a_module_missing_from_a_family_member_is_found():
    """The import-graph check sees each family member: the control template without its runner module
    is reported for control_stage@1..3 (and nothing else)."""
    spec = load_spec(ROOT)
    spec["stages"]["control_stage"]["do"]["deps"].remove("pipeline")
    spec["stages"]["control_stage"]["do"]["deps"].append("pipeline/train_staged.py")
    problems, _ = _module_problems(resolved_stages(ROOT, spec), _stage_modules())
    assert [name for name, _ in problems] == [f"control_stage@{n}" for n in (1, 2, 3)]
    assert all("pipeline/training.py" in missing and "pipeline/train_staged.py" not in missing
               for _, missing in problems)


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


def test_every_plot_names_its_x_and_y(stages):
    """`dvc plots show` draws exactly the declared plots: none falls back to guessing its columns."""
    spec = load_spec(ROOT)
    for name, stage in stages.items():
        for entry in stage.get("plots", []):
            (path, props), = entry.items() if isinstance(entry, dict) else ((entry, {}),)
            assert props.get("x") and props.get("y"), f"{name}: plot {path} has no x/y"
    for entry in spec.get("plots", []):
        (title, props), = entry.items()
        assert props.get("x") and props.get("y"), f"top-level plot {title} has no x/y"


def test_metrics_files_hold_few_numbers_and_the_records_are_reports(stages):
    """`dvc exp show` compares the headline figures; a stage's whole record is a JSON report."""
    from pipeline.common import TRAINING_HEADLINE, numeric_subset

    for name, stage in stages.items():
        for entry in stage.get("metrics", []):
            (path,) = entry
            assert path.startswith("reports/metrics/"), (name, path)
        if name.startswith(("train_stage", "control_stage")) or name == "train_cfg_micro":
            outs = [entry_path(o) for o in stage["outs"]]
            assert any(o.startswith("reports/stages/") for o in outs), name
    assert len(TRAINING_HEADLINE) <= 3
    assert numeric_subset({"a": 1.5, "b": "text", "c": None, "d": True, "e": float("nan")}, "abcde") == {"a": 1.5, "d": 1}


def test_a_training_metric_is_named_after_its_model(tmp_path):
    """Metric keys unique across files are short columns in `dvc exp show` ("stage_0.val_bpb"); a
    key shared by several files would be shown as "reports/metrics/stage_0.json:val_bpb"."""
    import json

    from pipeline.common import TRAINING_HEADLINE, write_stage_record

    for name in ("stage_0", "cfg"):
        write_stage_record(tmp_path, name, {"val_bpb": 1.25, "train_seconds": 3.0, "model": name}, TRAINING_HEADLINE)
        assert json.loads((tmp_path / "metrics" / f"{name}.json").read_text()) == {f"{name}.val_bpb": 1.25}
        assert json.loads((tmp_path / "stages" / f"{name}.json").read_text())["train_seconds"] == 3.0
    write_stage_record(tmp_path, "prepare", {"tokens_train": 10})  # a record without a metrics file
    assert not (tmp_path / "metrics" / "prepare.json").exists()


def test_training_runs_are_named_after_their_dvc_stages(stages):
    """A training stage's MLflow run name and `dvc.stage` tag are its DVC stage's name (family members
    included), so `sunfish compare` and the MLflow UI name what `dvc repro <stage>` reruns."""
    from pipeline.train_staged import dvc_stage

    names = [dvc_stage(n) for n in range(4)] + [dvc_stage(n, control=True) for n in (1, 2, 3)]
    assert names == [n for n in stages if n.startswith(("train_stage", "control_stage"))]
    for n in range(4):
        assert stages[dvc_stage(n)]["cmd"].endswith(f"train-staged --stage {n}")
    for n in (1, 2, 3):
        assert stages[dvc_stage(n, control=True)]["cmd"].endswith(f"train-control --stage {n}")


def _metric_keys_at_most(stages: dict) -> int:
    """Metric keys the stages can write: each training stage its headline, evaluate_fluency its own."""
    from pipeline.common import TRAINING_HEADLINE
    from pipeline.fluency import FLUENCY_HEADLINE

    files = [next(iter(m)) for stage in stages.values() for m in stage.get("metrics", [])]
    assert set(files) == {f"reports/metrics/{n}.json" for n in (*MODEL_NAMES, *CONTROL_NAMES, "fluency")}, files
    return sum(len(FLUENCY_HEADLINE) if f.endswith("/fluency.json") else len(TRAINING_HEADLINE) for f in files)


def test_dvc_exp_show_fits(stages):
    """params.yaml names a few keys, the metrics files hold one figure a model plus the diffusion
    headline, and code deps name packages: `dvc exp show` stays within EXP_SHOW_COLUMNS columns.
    (tests/e2e/test_pipeline.py checks this count against what `dvc exp show` prints after a run.)"""
    counts = exp_show_columns(ROOT, _metric_keys_at_most(stages))
    assert counts["total"] <= EXP_SHOW_COLUMNS, counts


def test_a_params_yaml_that_lists_every_key_does_not_fit(stages):
    """The check has teeth: the full reference as params.yaml (the old layout) is far too wide."""
    full = yaml.safe_load((ROOT / "docs" / "params-reference.yaml").read_text())
    assert exp_show_columns(ROOT, _metric_keys_at_most(stages), full)["total"] > 2 * EXP_SHOW_COLUMNS


def test_bytecode_beside_the_code_deps_is_not_a_change():
    """Importing a module writes __pycache__/ into sunfish/ or pipeline/, folders the stages depend on:
    DVC must not see it, or the next stage's imports would mark every earlier stage changed."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        for folder in ("sunfish/config", "pipeline", "sunfish/models"):
            assert repo.dvcignore.is_ignored(repo.fs, str(ROOT / folder / "__pycache__" / "x.cpython-311.pyc"))
        assert not repo.dvcignore.is_ignored(repo.fs, str(ROOT / "pipeline" / "cli.py"))
