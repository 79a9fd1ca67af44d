"""params.yaml validation: every bad key is named with its value; derived views are right."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sunfish.config import DEFAULT_PRESETS, MODEL_NAMES, Params, ParamsError, flatten, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    """Every key with its default (docs/params-reference.yaml), for the tests that change one."""
    return yaml.safe_load((ROOT / "docs" / "params-reference.yaml").read_text())


def test_committed_params_are_valid(raw):
    params = parse_params(raw)
    for model in MODEL_NAMES:
        t = params.training_for(model)
        assert t.milestones[-1] == t.max_steps
        assert all(m <= t.max_steps for m in t.milestones)


def _with(raw: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(raw)
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value
    return out


BAD = [
    ("train.lernig_rate", 0.1, "train.lernig_rate"),
    ("train.lr", -1.0, "train.lr"),
    ("train.lr", "fast", "train.lr"),
    ("staged.dropout", 1.5, "staged.dropout"),
    ("presets.tiny.n_head", 0, "presets.tiny.n_head"),
    ("presets.tiny.n_head", 3, "presets.tiny.n_head"),
    ("train.seq_len", 100000, "train.seq_len"),
    ("train.milestones", [10, 5000], "train.milestones"),
    ("sampling.guidance_scale", -2.0, "sampling.guidance_scale"),
    ("sampling.num_steps", 5000, "sampling.num_steps"),
    ("sampling.scheduler", "euler", "sampling.scheduler"),
    ("sampling.guidance", "logits", "sampling.guidance"),
    ("sampling.guidance_candidates", 0, "sampling.guidance_candidates"),
    ("staged.preset", "huge", "staged.preset"),
    ("staged.stage_1.milestones", [50, 500], "staged.stage_1.milestones"),
    ("tokenizer.vocab_size", 100, "tokenizer.vocab_size"),
]


@pytest.mark.parametrize("key,value,named", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_value_names_key(raw, key, value, named):
    with pytest.raises(ParamsError) as info:
        parse_params(_with(raw, key, value))
    assert named in str(info.value)


def test_unknown_key_suggests_the_right_one(raw):
    with pytest.raises(ParamsError) as info:
        parse_params(_with(raw, "train.warmup_step", 3))
    assert "did you mean 'warmup_steps'" in str(info.value)


def test_empty_and_invalid_yaml(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ParamsError, match="empty"):
        load_params(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [lr: 1\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_budget_overrides_and_scaled_milestones(raw):
    params = parse_params(_with(_with(raw, "staged.stage_2.max_steps", 40), "staged.stage_2.milestones", None))
    t = params.training_for("stage_2")
    assert t.max_steps == 40
    base = params.train
    assert t.milestones == sorted({max(1, round(m * 40 / base.max_steps)) for m in base.milestones})


def test_each_stage_draws_its_own_batch_stream_shared_with_its_control(raw):
    params = parse_params(raw)
    seed = params.train.seed
    assert params.training_for("stage_0").seed == seed and params.training_for("cfg").seed == seed
    for n in (1, 2, 3):  # not stage 0's stream: a stage must not replay the batches stage 0 began with
        assert params.training_for(f"stage_{n}").seed == params.training_for(f"control_{n}").seed == seed + 1000 * n


def test_flatten_gives_dotted_keys(raw):
    flat = flatten(parse_params(raw))
    assert flat["train.lr"] == raw["train"]["lr"]
    assert flat["sampling.guidance_scale"] == raw["sampling"]["guidance_scale"]


def test_importing_config_and_cli_does_not_import_torch():
    code = "import sys, sunfish.config, sunfish.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_section_written_in_part_keeps_the_defaults_of_the_keys_it_leaves_out():
    """params.yaml names a few keys: `stage_1: {max_steps: 50}` changes that key only, not the whole budget."""
    defaults = Params()
    p = parse_params({"staged": {"stage_1": {"max_steps": 50}, "stage_2": {}}, "cfg": {"budget": {"max_steps": 500}}})
    assert p.staged.stage_1.max_steps == 50
    assert p.staged.stage_1.lr == defaults.staged.stage_1.lr is not None  # not Budget()'s null
    assert p.staged.stage_1.warmup_steps == defaults.staged.stage_1.warmup_steps is not None
    assert p.staged.stage_2 == defaults.staged.stage_2
    assert p.cfg.budget.lr == defaults.cfg.budget.lr is not None and p.cfg.budget.max_steps == 500
    nested = parse_params({"eval": {"fluency": {"dev_prompts": 16}}})
    assert nested.eval.fluency.dev_prompts == 16 and nested.eval.fluency.test_prompts == defaults.eval.fluency.test_prompts
    assert nested.eval.prompts == defaults.eval.prompts


def test_presets_in_params_add_to_the_built_in_ones():
    mine = {"n_layer": 1, "n_head": 2, "d_model": 64, "d_ff": 128, "seq_len": 128}
    p = parse_params({"presets": {"mine": mine, "tiny": mine}, "staged": {"preset": "mine"}, "cfg": {"preset": "mine"}})
    assert set(DEFAULT_PRESETS) <= set(p.presets)
    assert p.presets["mine"].d_model == 64 and p.presets["tiny"].d_model == 64  # a built-in name is replaced
    assert p.presets["micro"] == Params().presets["micro"]


def test_a_sampler_key_under_cfg_says_where_it_moved():
    with pytest.raises(ParamsError) as exc:
        parse_params({"cfg": {"guidance_scale": 2.0}})
    assert exc.value.problems == ["cfg.guidance_scale: moved to sampling.guidance_scale (the diffusion sampler's "
                                  "settings have their own section)"]
