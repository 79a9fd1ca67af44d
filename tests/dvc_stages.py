"""dvc.yaml's stages as DVC itself resolves them, for the tests that check what each stage tracks.

dvc.yaml writes the training stages 1..3 and their controls as two ``foreach`` families
(``train_stage`` and ``control_stage``), whose members DVC names ``train_stage@1`` .. and
``control_stage@1`` ..; ``${key}``, ``${item.*}`` and ``${staged.preset}`` (from params.yaml) are
filled in by DVC's own resolver (``dvc.parsing.DataResolver``, what ``dvc repro`` and ``dvc status``
load), never by hand, so a check sees exactly the stages DVC runs.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def load_spec(root: Path) -> dict:
    """dvc.yaml as written (families unexpanded)."""
    return yaml.safe_load((root / "dvc.yaml").read_text())


def resolved_stages(root: Path, spec: dict | None = None) -> dict[str, dict]:
    """{stage name: its definition with every family expanded and every ``${...}`` filled}, in the
    order DVC lists them; ``spec`` (default: ``root``'s dvc.yaml) lets a test resolve an edited copy.
    Each definition has dvc.yaml's own shape: ``cmd``, ``deps``, ``params``, ``outs``, ``metrics``..."""
    from dvc.parsing import DataResolver
    from dvc.repo import Repo

    if spec is None:
        spec = load_spec(root)
    with Repo(str(root)) as repo:
        return DataResolver(repo, str(root), spec).resolve()["stages"]


def entry_path(entry) -> str:
    """The path of a deps/outs/metrics entry (``path`` or ``{path: {options}}``)."""
    return next(iter(entry)) if isinstance(entry, dict) else entry


# `dvc exp show` has one column per params.yaml value (DVC reads the whole default params file), one
# per metric key, one per dependency path of any stage, plus Experiment and Created. The issue asks
# for a table a terminal can show: ecosystem checks hold it to EXP_SHOW_COLUMNS.
EXP_SHOW_COLUMNS = 60


def exp_show_columns(root: Path, metric_keys: int, params_raw: dict | None = None) -> dict[str, int]:
    """The columns `dvc exp show` prints for ``root``'s dvc.yaml and params.yaml (or ``params_raw``),
    given the number of distinct metric keys: {"base", "params", "metrics", "deps", "total"}."""
    from sunfish.config import flatten

    raw = params_raw if params_raw is not None else yaml.safe_load((root / "params.yaml").read_text())
    deps = {entry_path(d).rstrip("/") for stage in resolved_stages(root).values() for d in stage.get("deps", [])}
    counts = {"base": 2, "params": len(flatten(raw)), "metrics": metric_keys, "deps": len(deps)}
    counts["total"] = sum(counts.values())
    return counts
