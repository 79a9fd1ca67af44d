"""Every default has one home: the schema (sunfish.config.sections), written out in docs/params-reference.yaml.

The reference lists every setting with its default and params.yaml names a few of them; both must say
what the schema says, so that a key left out of params.yaml, a section built in code (``TrainConfig()``)
and the two files never disagree. A setting that legitimately differs for one model is an override
(staged.stage_N, cfg.budget), and its default is that override.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, Field

from sunfish.config import Params, Section, flatten

ROOT = Path(__file__).resolve().parents[1]
ABSENT = object()


def default_mismatches(schema: type[BaseModel], raw: dict[str, Any]) -> list[str]:
    """One line per key of ``raw`` whose (validated) value is not the default of the same field."""
    given = flatten(raw)
    validated = flatten(schema.model_validate(raw))
    defaults = flatten(schema())
    problems = []
    for key in given:
        value, default = validated.get(key, ABSENT), defaults.get(key, ABSENT)
        if default is ABSENT:
            problems.append(f"{key}: set to {value!r}, but the schema has no default for it")
        elif value != default or type(value) is not type(default):
            problems.append(f"{key}: params.yaml says {value!r}, the schema default is {default!r}")
    return problems


def unlisted_settings(schema: type[BaseModel], raw: dict[str, Any], free: tuple[str, ...] = ()) -> list[str]:
    """Schema settings that ``raw`` leaves out (keys under a ``free`` prefix are optional)."""
    given = flatten(raw)
    return sorted(k for k in flatten(schema()) if k not in given and not k.startswith(free))


REFERENCE = ROOT / "docs" / "params-reference.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", [REFERENCE, ROOT / "params.yaml"], ids=["reference", "params.yaml"])
def test_the_committed_files_set_the_schema_defaults(path):
    problems = default_mismatches(Params, yaml.safe_load(path.read_text(encoding="utf-8")))
    assert not problems, f"{path.name} and the schema defaults disagree:\n" + "\n".join(problems)


def test_the_reference_lists_every_setting(raw):
    # presets: a shape may leave out vocab_size (null = the tokenizer's); every other key is written out
    missing = unlisted_settings(Params, raw, free=("presets.",))
    assert not missing, f"settings docs/params-reference.yaml leaves out (add them with their default): {missing}"


def test_params_yaml_means_the_reference():
    """The few keys params.yaml names, and the defaults of the rest, are the whole reference file."""
    slim = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert len(flatten(slim)) < len(flatten(Params())) / 4  # it names a few keys, not all of them
    assert Params.model_validate(slim) == Params.model_validate(yaml.safe_load(REFERENCE.read_text(encoding="utf-8")))


# ----------------------------------------------------------------------------------------------
# the check itself catches a disagreement and names the key


class _Inner(Section):
    lr: float = 1e-3
    steps: int = Field(300, ge=1)
    scales: list[float] = Field(default_factory=lambda: [0.0, 1.0])


class _Fake(Section):
    name: str = "x"
    inner: _Inner = _Inner()


def test_a_mismatch_is_reported_with_its_key():
    agreeing = {"name": "x", "inner": {"lr": 1e-3, "steps": 300, "scales": [0.0, 1.0]}}
    assert default_mismatches(_Fake, agreeing) == []
    wrong = {"name": "x", "inner": {"lr": 2e-3, "steps": 300, "scales": [0.0, 1.0]}}
    assert default_mismatches(_Fake, wrong) == ["inner.lr: params.yaml says 0.002, the schema default is 0.001"]
    listed = default_mismatches(_Fake, {"inner": {"scales": [0.0, 1.0, 3.0]}})
    assert len(listed) == 1 and listed[0].startswith("inner.scales: ")


def test_a_left_out_setting_is_reported():
    assert unlisted_settings(_Fake, {"name": "x", "inner": {"lr": 1e-3, "scales": [0.0]}}) == ["inner.steps"]


def test_a_committed_value_that_differs_from_the_schema_fails(raw):
    """Mutation: the reference with one value changed (train.max_steps) is caught, by that key only."""
    mutated = yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))
    mutated["train"]["max_steps"] = raw["train"]["max_steps"] + 60
    mutated["train"]["milestones"] = [*raw["train"]["milestones"][:-1], mutated["train"]["max_steps"]]
    problems = default_mismatches(Params, mutated)
    assert [p.split(":")[0] for p in problems] == ["train.max_steps", "train.milestones"]
