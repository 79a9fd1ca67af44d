"""A diffusion checkpoint carries its sampling defaults (generation_config.json); `sunfish sample` uses
them, or the schema defaults for a checkpoint without one, and never a params.yaml in the current
directory. Command-line flags still win."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sunfish.cli import main
from sunfish.config import GENERATION_CONFIG, EvalConfig, GenerationConfig, SamplingConfig, load_params
from sunfish.training.checkpoint import read_generation_config, save_checkpoint
from tests.ckpt_fixtures import diffusion_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
OWN = GenerationConfig(guidance_scale=2.5, guidance="token", guidance_candidates=2, num_steps=3,
                       scheduler="ddpm", top_p=0.8, seq_len=10)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from sunfish.data.tokenizer import TextTokenizer

    tmp = tmp_path_factory.mktemp("gen")
    tok_file = make_tokenizer(tmp)
    vocab = TextTokenizer.load(tok_file).vocab_size
    own = save_checkpoint(tmp / "own" / "final", diffusion_model(vocab), model_name="cfg", step=3,
                          tokenizer_file=tok_file, generation_config=OWN)
    old = save_checkpoint(tmp / "old" / "final", diffusion_model(vocab), model_name="cfg", step=3,
                          tokenizer_file=tok_file)
    return {"own": own, "old": old}


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """A current directory holding a params.yaml whose sampling settings differ from everything."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["sampling"].update(guidance_scale=9.0, num_steps=7, scheduler="ddim", top_p=0.5, guidance_candidates=5)
    raw["eval"]["cfg_seq_len"] = 9  # params.yaml writes eval as {}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def sampler_calls(monkeypatch) -> list[dict]:
    """The keyword arguments each call of the diffusion sampler got (it still samples)."""
    import importlib

    module = importlib.import_module("sunfish.diffusion.sample")  # the package exports a function of that name
    calls, real = [], module.sample

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "sample", spy)
    return calls


def sample(*args: str) -> dict:
    result = CliRunner().invoke(main, ["sample", *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_saving_with_settings_writes_them_beside_config_json(checkpoints):
    written = json.loads((checkpoints["own"] / GENERATION_CONFIG).read_text(encoding="utf-8"))
    assert written == {"format_version": 1, **OWN.model_dump()}
    assert written["guidance_scale"] == 2.5
    assert not (checkpoints["old"] / GENERATION_CONFIG).exists()  # nothing given, nothing written


def test_sample_uses_the_checkpoints_own_settings_not_the_cwd_params(checkpoints, elsewhere, sampler_calls):
    row = sample(str(checkpoints["own"]), "--prompt", "the dog")
    assert (row["guidance_scale"], row["num_steps"], row["scheduler"]) == (2.5, 3, "ddpm")
    (call,) = sampler_calls
    assert (call["seq_len"], call["top_p"], call["candidates"], call["guidance"]) == (10, 0.8, 2, "token")


def test_a_checkpoint_without_the_file_samples_with_the_schema_defaults(checkpoints, elsewhere, sampler_calls):
    assert read_generation_config(checkpoints["old"]) == GenerationConfig()
    row = sample(str(checkpoints["old"]), "--prompt", "the dog")
    cfg = SamplingConfig()
    assert (row["guidance_scale"], row["num_steps"], row["scheduler"]) == (
        cfg.guidance_scale, cfg.num_steps, cfg.scheduler)
    assert row["guidance_scale"] != 9.0  # the params.yaml of the current directory is not read
    (call,) = sampler_calls
    assert (call["top_p"], call["candidates"], call["guidance"]) == (cfg.top_p, cfg.guidance_candidates, cfg.guidance)
    assert call["seq_len"] == min(EvalConfig().cfg_seq_len, 16)  # the fixture model's max_seq_len is 16


def test_flags_override_the_checkpoints_settings(checkpoints, elsewhere):
    row = sample(str(checkpoints["own"]), "--prompt", "the dog", "--guidance-scale", "0", "--num-steps", "2",
                 "--scheduler", "ddim")
    assert (row["guidance_scale"], row["num_steps"], row["scheduler"]) == (0.0, 2, "ddim")


def test_generation_settings_have_one_home():
    """Each field is the params field it is named after: same default, same allowed range."""
    defaults = GenerationConfig()
    for key, value in defaults.model_dump().items():
        source = EvalConfig.model_fields["cfg_seq_len"] if key == "seq_len" else SamplingConfig.model_fields[key]
        assert value == source.default, key
        assert GenerationConfig.model_fields[key].metadata == source.metadata, key
    # the committed params.yaml writes the schema defaults into every new checkpoint
    assert GenerationConfig.from_params(load_params(ROOT / "params.yaml")) == defaults


@pytest.mark.parametrize("content,named", [
    ('{"guidance_scale": -1}', "guidance_scale"),
    ('{"scheduler": "euler"}', "scheduler"),
    ('{"format_version": 2}', "format_version"),
    ("not json", "not a readable JSON"),
])
def test_a_bad_generation_config_is_refused_naming_the_key(checkpoints, tmp_path, content, named):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoints["old"], copy)
    (copy / GENERATION_CONFIG).write_text(content, encoding="utf-8")
    result = CliRunner().invoke(main, ["sample", str(copy), "--prompt", "the dog"])
    assert result.exit_code == 2, result.output
    assert named in result.output and GENERATION_CONFIG in result.output


def test_unknown_settings_are_ignored_and_missing_ones_take_the_defaults(tmp_path, caplog):
    (tmp_path / GENERATION_CONFIG).write_text('{"guidance_scale": 3.0, "from_the_future": 1}', encoding="utf-8")
    got = read_generation_config(tmp_path)
    assert got == GenerationConfig(guidance_scale=3.0)
    assert "from_the_future" in caplog.text
