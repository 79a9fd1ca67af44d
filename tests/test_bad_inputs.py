"""Bad inputs, table-driven, through the real commands (`sunfish`, `python -m pipeline`): one clear
message, the right exit code, no traceback, and nothing from earlier runs touched.

Tables: PARAMS_CASES (params.yaml through `python -m pipeline validate`, a few also through
`python -m pipeline train-staged --stage 0`), CLI_CASES (checkpoints and flags of `sunfish sample`,
`eval-text`, `migrate`), CORPUS_CASES (`python -m pipeline prepare`), and hypothesis fuzzing of prompts.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main as stage_main
from sunfish.cli import main
from tests.ckpt_fixtures import build_checkpoints, make_format_0, tree_digest

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "docs" / "params-reference.yaml").read_text())  # every key, to mutate one


def _with(dotted: str, value) -> str:
    raw = copy.deepcopy(RAW)
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value
    return yaml.safe_dump(raw, sort_keys=False)


def _assert_clean_failure(result, exit_code: int = 2) -> str:
    """Exit code, a message, no traceback (click's runner keeps an escaped exception in .exception)."""
    out = result.output
    assert result.exit_code == exit_code, out
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out
    return out


# ----------------------------------------------------------------------------------------------
# params.yaml

# (case id, params.yaml contents, what the message must name). Every mutation leaves exactly one problem.
PARAMS_CASES = [
    # unknown keys
    ("unknown key", _with("train.lernig_rate", 0.1), "train.lernig_rate"),
    ("unknown section", _with("trian", {"lr": 0.1}), "trian"),
    ("unknown nested key", _with("staged.mu.fulll", True), "staged.mu.fulll"),
    # wrong types
    ("lr is text", _with("train.lr", "fast"), "train.lr"),
    ("lr is a boolean", _with("train.lr", True), "train.lr"),
    ("max_steps is fractional", _with("train.max_steps", 2.5), "train.max_steps"),
    ("milestones is text", _with("train.milestones", "24,48"), "train.milestones"),
    ("section is a list", _with("cfg", [1, 2]), "cfg"),
    # out of range
    ("negative lr", _with("train.lr", -1e-3), "train.lr"),
    ("negative stage lr", _with("staged.stage_2.lr", -6e-4), "staged.stage_2.lr"),
    ("dropout above 1", _with("staged.dropout", 1.5), "staged.dropout"),
    ("conditioning dropout above 1", _with("cfg.conditioning_dropout", 1.2), "cfg.conditioning_dropout"),
    ("zero heads", _with("presets.tiny.n_head", 0), "presets.tiny.n_head"),
    ("width not divisible by heads", _with("presets.tiny.n_head", 3), "presets.tiny.n_head"),
    ("zero preset vocabulary", _with("presets.tiny.vocab_size", 0), "presets.tiny.vocab_size"),
    ("seq_len beyond the model", _with("train.seq_len", 512), "train.seq_len"),
    ("sample length beyond the model", _with("eval.cfg_seq_len", 512), "eval.cfg_seq_len"),
    ("milestone beyond max_steps", _with("train.milestones", [24, 48, 2400]), "train.milestones"),
    ("stage milestone beyond its max_steps", _with("staged.stage_1.milestones", [30, 600]), "staged.stage_1.milestones"),
    ("cfg milestone beyond max_steps", _with("cfg.budget.milestones", [10, 9999]), "cfg.budget.milestones"),
    ("milestones not increasing", _with("train.milestones", [48, 24, 240]), "train.milestones"),
    ("warmup longer than the run", _with("train.warmup_steps", 3000), "train.warmup_steps"),
    ("stage warmup longer than the stage", _with("staged.stage_3.warmup_steps", 600), "staged.stage_3.warmup_steps"),
    ("negative guidance scale", _with("sampling.guidance_scale", -1.0), "sampling.guidance_scale"),
    ("negative guidance scale in eval", _with("eval.guidance_scales", [0.0, -3.0]), "eval.guidance_scales"),
    ("num_steps above timesteps", _with("sampling.num_steps", 5000), "sampling.num_steps"),
    ("unknown scheduler", _with("sampling.scheduler", "euler"), "sampling.scheduler"),
    ("unknown preset", _with("staged.preset", "huge"), "staged.preset"),
    # files that are not a params mapping at all: the message names the file
    ("empty file", "", "params.yaml"),
    ("comments only", "# nothing here\n", "params.yaml"),
    ("invalid YAML", "train: [lr: 1\n", "params.yaml"),
    ("top level is a list", "- train\n- lr\n", "params.yaml"),
    ("not UTF-8", b"train:\n  lr: 0.001 \xff\xfe\n", "params.yaml"),
]

# Milestones: training_for() keeps only milestones <= max_steps, but that filter is unreachable for
# a file that validates: train.milestones and every explicit staged.stage_N / cfg.budget milestone list
# are checked against their max_steps above (a typo like 2400 for 240 fails). The one intentional
# rewrite is a budget with its own max_steps and no milestones: train.milestones are *scaled* to it,
# not dropped (tests/test_config.py::test_budget_overrides_and_scaled_milestones).
TRAINING_STAGE_CASES = {"unknown key", "negative lr", "empty file", "milestone beyond max_steps"}


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A project directory with outputs and checkpoints of an earlier run (contents do not matter)."""
    files = {
        "models/stage_0/final/model.safetensors": b"\x00weights of an earlier run" * 10,
        "models/stage_0/final/config.json": b'{"format_version": 1}',
        "models/stage_0/step_24/model.safetensors": b"\x01milestone" * 10,
        "reports/metrics/stage_0.json": b'{"val_loss": 3.2}',
        "reports/report.md": b"# report\n",
        "state/stage_0/runs/abc/resume/step_50/trainer.pt": b"resume state",
        "data/prepared/meta.json": b"{}",
    }
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _outputs(root: Path) -> dict[str, str]:
    return tree_digest(root / "models", root / "reports", root / "state", root / "data")


def _write_params(root: Path, contents: str | bytes) -> None:
    path = root / "params.yaml"
    path.write_bytes(contents if isinstance(contents, bytes) else contents.encode("utf-8"))


def test_every_mutation_is_a_single_problem():
    """The table's premise: each case breaks one thing (so the message is about that key only)."""
    from sunfish.config import ParamsError, parse_params

    parse_params(RAW)  # the committed file is valid
    for case, contents, named in PARAMS_CASES:
        if named == "params.yaml":
            continue
        with pytest.raises(ParamsError) as info:
            parse_params(yaml.safe_load(contents))
        assert len(info.value.problems) == 1, (case, info.value.problems)


@pytest.mark.parametrize("case,contents,named", PARAMS_CASES, ids=[c[0] for c in PARAMS_CASES])
def test_bad_params_stop_validate_before_any_work(project, case, contents, named):
    _write_params(project, contents)
    before = _outputs(project)
    result = CliRunner().invoke(stage_main, ["validate"])
    out = _assert_clean_failure(result)
    assert out.count("error:") == 1 and named in out, out
    problems = [ln for ln in out.splitlines() if ln.startswith("  - ")]
    assert len(problems) == 1, out
    if named != "params.yaml":  # one line, led by the dotted key, saying what is wrong with it
        assert problems[0].startswith(f"  - {named}: "), out
    assert _outputs(project) == before
    assert not (project / "data" / "params.ok").exists()


@pytest.mark.parametrize("case", sorted(TRAINING_STAGE_CASES))
def test_bad_params_stop_a_training_stage_before_any_work(project, case):
    """The installed entry point in a real process, as `dvc repro` runs it."""
    contents, named = next((c, n) for k, c, n in PARAMS_CASES if k == case)
    _write_params(project, contents)
    before = _outputs(project)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train-staged", "--stage", "0"],
                          cwd=project, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert _outputs(project) == before


# ----------------------------------------------------------------------------------------------
# the command line: checkpoints of the wrong kind, missing files, conflicting flags


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    out = build_checkpoints(root)

    def variant(name: str, edit) -> None:
        target = root / name
        shutil.copytree(out["staged"], target)
        edit(target)
        out[name] = target

    def set_meta(**changes):
        def edit(d):
            meta = json.loads((d / "config.json").read_text())
            meta.update(changes)
            (d / "config.json").write_text(json.dumps(meta))
        return edit

    (root / "empty_dir").mkdir()
    out["empty_dir"] = root / "empty_dir"
    (root / "notes.txt").write_text("not a checkpoint")
    out["text_file"] = root / "notes.txt"
    (root / "text.txt").write_text("The dog liked to play in the park.\n")
    out["text"] = root / "text.txt"
    (root / "blank.txt").write_text("  \n")
    out["blank"] = root / "blank.txt"
    variant("garbled_config", lambda d: (d / "config.json").write_text("{not json"))
    variant("no_weights", lambda d: (d / "model.safetensors").unlink())
    variant("no_tokenizer", lambda d: (d / "tokenizer.json").unlink())
    variant("unknown_kind", set_meta(kind="gpt"))
    variant("newer_format", set_meta(format_version=7))
    variant("format_0", make_format_0)
    variant("other_architecture", set_meta(model_config={**json.loads(
        (out["staged"] / "config.json").read_text())["model_config"], "d_ff": 128}))
    variant("renamed_field", set_meta(model_config={**json.loads(
        (out["staged"] / "config.json").read_text())["model_config"], "n_layers": 1}))
    return out


# (case id, argv with {placeholders} for ckpts entries, exit code, what the message must say)
CLI_CASES = [
    # missing or wrong paths (a missing `sample` checkpoint: tests/test_cli.py)
    ("eval-text: missing checkpoint", ["eval-text", "{empty_dir}/nope", "{text}"], "checkpoint not found"),
    ("sample: a text file", ["sample", "{text_file}"], "is not a SunFish checkpoint"),
    ("sample: an empty directory", ["sample", "{empty_dir}"], "is not a SunFish checkpoint"),
    ("sample: config.json is not JSON", ["sample", "{garbled_config}"], "not a readable JSON"),
    ("sample: no weights", ["sample", "{no_weights}"], "missing weights file"),
    ("sample: no tokenizer", ["sample", "{no_tokenizer}"], "no tokenizer.json next to the weights"),
    ("sample: unknown model kind", ["sample", "{unknown_kind}"], "unknown model kind 'gpt'"),
    ("sample: newer format", ["sample", "{newer_format}"], "written by a newer SunFish"),
    ("sample: format 0", ["sample", "{format_0}"], "run `sunfish migrate"),
    ("sample: other architecture", ["sample", "{other_architecture}"], "shape mismatch"),
    ("sample: renamed config field", ["sample", "{renamed_field}"], "unknown StagedLMConfig keys ['n_layers']"),
    ("eval-text: missing text file", ["eval-text", "{staged}", "{empty_dir}/none.txt"], "no such text file"),
    ("eval-text: blank text file", ["eval-text", "{staged}", "{blank}"], "the file is empty"),
    # a flag for the other kind of model (--infill on a staged checkpoint: tests/test_cli.py)
    ("guidance scale on a stage", ["sample", "{staged}", "--guidance-scale", "3"], "--guidance-scale needs a diffusion"),
    ("diffusion flags on a stage", ["sample", "{staged}", "--num-steps", "4", "--scheduler", "ddpm"],
     "--num-steps, --scheduler need a diffusion"),
    ("seq-len on a stage", ["sample", "{staged}", "--seq-len", "8"], "holds an autoregressive stage"),
    ("guidance mode on a stage", ["sample", "{staged}", "--guidance", "token", "--candidates", "2"],
     "--candidates, --guidance need a diffusion"),
    ("unknown guidance mode", ["sample", "{diffusion}", "--guidance", "both"], "'both' is not one of"),
    ("max-new-tokens on diffusion", ["sample", "{diffusion}", "--max-new-tokens", "5"],
     "--max-new-tokens needs an autoregressive"),
    ("temperature on diffusion", ["sample", "{diffusion}", "--temperature", "0"], "--temperature needs an autoregressive"),
    # conflicting or impossible requests
    ("infill without a mask", ["sample", "{diffusion}", "--infill", "no span here"], "at least one [MASK]"),
    ("seq-len beyond the model", ["sample", "{diffusion}", "--seq-len", "999"], "exceeds the model's max_seq_len 16"),
    ("value out of range", ["sample", "{staged}", "--temperature", "-1"], "Invalid value for '--temperature'"),
    ("unknown option", ["sample", "{staged}", "--guidance-weight", "3"], "No such option"),
    ("migrate: missing checkpoint", ["migrate", "{empty_dir}/nope"], "checkpoint not found"),
    ("migrate: newer format", ["migrate", "{newer_format}"], "upgrades version 0 only"),
    ("migrate: output exists", ["migrate", "{format_0}", "--output", "{empty_dir}"], "already exists"),
]


@pytest.mark.parametrize("case,argv,expected", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_lines_exit_2_with_one_message(ckpts, case, argv, expected, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no params.yaml: the checkpoint alone decides
    args = [a.format(**{k: str(v) for k, v in ckpts.items()}) for a in argv]
    before = tree_digest(ckpts["format_0"], ckpts["staged"])
    result = CliRunner().invoke(main, args)
    out = _assert_clean_failure(result)
    assert expected in out, out
    assert out.count("Error") + out.count("error:") == 1, out
    assert tree_digest(ckpts["format_0"], ckpts["staged"]) == before


# ----------------------------------------------------------------------------------------------
# prompts: fuzzed through the encoder and the sampler of both model kinds

PROMPTS = st.one_of(
    st.text(max_size=80),  # any Unicode, including control characters
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x1F), max_size=30),  # control only
    st.text(alphabet=st.characters(codec=None, categories=("Cs", "Co", "Cn")), max_size=20),  # surrogates, unassigned
    st.text(alphabet=" \t\n\r\x0b\x0c", max_size=20),  # whitespace only
    st.text(alphabet="日本語✓€\U0001f600\u200b\ufeff", min_size=1, max_size=40),  # bytes the corpus never had
)
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def loaded(ckpts):
    from sunfish.training.checkpoint import load_checkpoint, load_tokenizer_for

    out = {}
    for kind in ("staged", "diffusion"):
        model, meta, directory = load_checkpoint(ckpts[kind])
        out[kind] = (model, meta, directory)
    out["tokenizer"] = load_tokenizer_for(out["staged"][2], out["staged"][1])
    return out


@FUZZ
@given(prompt=PROMPTS)
def test_prompt_encoder_never_crashes(loaded, prompt):
    from sunfish.sampling import clean_prompt

    tok = loaded["tokenizer"]
    ids, text = clean_prompt(prompt, tok, 12)
    if ids is None:
        assert text is None
        return
    assert 1 <= len(ids) <= 12 and all(0 <= i < tok.vocab_size for i in ids)
    assert all(ch in "\n\t" or ch.isprintable() for ch in text)  # control characters and surrogates are dropped
    assert text.encode("utf-8")  # always valid UTF-8


@FUZZ
@given(prompt=PROMPTS, seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["staged", "diffusion"]))
def test_sampling_any_prompt_is_deterministic_under_a_seed(loaded, prompt, seed, kind):
    from sunfish.sampling import sample_from_checkpoint

    def once():
        return sample_from_checkpoint(None, prompt=prompt, max_new_tokens=4, num_steps=2, seq_len=8,
                                      guidance_scale=3.0, seed=seed, model_and_meta=loaded[kind])

    first, second = once(), once()
    assert [r["text"] for r in first] == [r["text"] for r in second]
    assert isinstance(first[0]["text"], str)
    first[0]["text"].encode("utf-8")  # valid UTF-8 (raises on a lone surrogate); may be empty: an
    # untrained model's draw of dangling bytes decodes to nothing


@pytest.mark.parametrize("kind,limit,end", [("staged", 31, "last"), ("diffusion", 8, "first")])
def test_a_long_prompt_is_truncated_with_a_warning(loaded, kind, limit, end, caplog):
    from sunfish.sampling import sample_from_checkpoint

    prompt = "the dog liked to play in the park " * 40
    with caplog.at_level(logging.WARNING, logger="sunfish.sampling"):
        out = sample_from_checkpoint(None, prompt=prompt, max_new_tokens=2, num_steps=2, seq_len=8,
                                     model_and_meta=loaded[kind])
    assert f"keeping the {end} {limit}" in caplog.text
    tok = loaded["tokenizer"]
    encode = tok.encode_prompt if kind == "diffusion" else tok.encode  # how each model tokenises prompts
    assert len(encode(out[0]["prompt"])) <= limit
    kept = out[0]["prompt"].strip()
    # AR keeps the end it continues; the diffusion encoder keeps the start it was trained on
    assert prompt.rstrip().endswith(kept) if end == "last" else prompt.startswith(kept)


def test_a_prompt_of_undecodable_bytes_through_the_real_command(ckpts, loaded):
    """argv bytes that are not UTF-8 arrive as lone surrogates: dropped, then sampled unconditionally,
    giving what the same seed gives in-process."""
    from sunfish.sampling import sample_from_checkpoint

    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    argv = [sys.executable, "-m", "sunfish", "sample", str(ckpts["staged"]), "--max-new-tokens", "3",
            "--seed", "5", "--format", "json", "--prompt"]
    proc = subprocess.run([os.fsencode(a) for a in argv] + [b"\xff\xfe\x80"], capture_output=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    assert b"Traceback" not in proc.stderr
    row = json.loads(proc.stdout.decode("utf-8"))
    same = sample_from_checkpoint(None, prompt=os.fsdecode(b"\xff\xfe\x80"), max_new_tokens=3, seed=5,
                                  model_and_meta=loaded["staged"])
    assert row["prompt"] == "" and row["text"] == same[0]["text"]


# ----------------------------------------------------------------------------------------------
# corpora: `python -m pipeline prepare` names the file and leaves data/prepared alone

PREPARE_PARAMS = {
    "data": {"source": "SOURCE", "val_fraction": 0.3, "split": "tail"},
    "tokenizer": {"vocab_size": 300, "min_frequency": 1},
    "train": {"seq_len": 64},
    "staged": {"preset": "nano"}, "cfg": {"preset": "nano"},
    "tracking": {"enabled": False},
}
GOOD_TEXT = "\n\n".join(f"The dog number {i} liked to play in the park with a red ball." for i in range(40))

# (case id, {file name: bytes} to create, source relative to the project, what the message must say)
CORPUS_CASES = [
    ("empty file", {"c.txt": b""}, "c.txt", "the file is empty"),
    ("whitespace only", {"c.txt": b" \n\n\t\n"}, "c.txt", "the file is empty"),
    ("binary file", {"c.txt": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}, "c.txt", "looks like a binary file"),
    ("non-UTF-8 bytes", {"c.txt": "café au lait\n\nsecond".encode("latin-1")}, "c.txt", "not UTF-8 text"),
    ("one document", {"c.txt": b"a single story\nwith two lines"}, "c.txt", "has 1 document(s)"),
    ("smaller than one sequence", {"c.txt": b"A cat.\n\nA dog.\n\nA hen.\n\nA pig."}, "c.txt",
     "shorter than one training sequence"),
    ("corrupt xz", {"c.txt.xz": b"not xz at all"}, "c.txt.xz", "not a valid .xz file"),
    ("missing file", {}, "nothing.txt", "does not exist"),
    ("folder without text", {"folder/readme.md": b"# hi"}, "folder", "holds no *.txt files"),
    ("one bad file in a folder", {"folder/a.txt": GOOD_TEXT.encode(), "folder/b.txt": b"ok\x00binary"},
     "folder/b.txt", "looks like a binary file"),
]


@pytest.mark.parametrize("case,files,named,expected", CORPUS_CASES, ids=[c[0] for c in CORPUS_CASES])
def test_bad_corpora_stop_prepare_naming_the_file(tmp_path, monkeypatch, case, files, named, expected):
    for name, data in files.items():
        (tmp_path / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "corpus" / name).write_bytes(data)
    source = str(tmp_path / "corpus" / named.split("/")[0])
    params = copy.deepcopy(PREPARE_PARAMS)
    params["data"]["source"] = source
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "meta.json").write_text('{"from": "an earlier prepare"}')
    before = tree_digest(prepared)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(stage_main, ["prepare"])
    out = _assert_clean_failure(result)
    assert expected in out and named.split("/")[-1] in out, out
    assert out.count("error:") == 1
    assert tree_digest(prepared) == before
    assert not (tmp_path / "data" / "prepared.tmp").exists()


def test_a_good_corpus_prepares(tmp_path, monkeypatch):
    """The control for the table above: the same setup with a usable corpus succeeds."""
    (tmp_path / "c.txt").write_text(GOOD_TEXT)
    params = copy.deepcopy(PREPARE_PARAMS)
    params["data"]["source"] = str(tmp_path / "c.txt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(stage_main, ["prepare"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "data" / "prepared" / "meta.json").read_text())["splits"]["train"]["tokens"] >= 65


def test_long_prompts_keep_the_end_the_model_was_trained_on(loaded):
    """AR continues the end of its context; the diffusion prompt encoder was trained on the start."""
    from sunfish.sampling import clean_prompt

    tok = loaded["tokenizer"]
    text = " ".join(f"word{i}" for i in range(40))
    ids = tok.encode(text)
    last, _ = clean_prompt(text, tok, 8)
    first, _ = clean_prompt(text, tok, 8, keep="first")
    assert last == ids[-8:] and first == ids[:8] and first != last
