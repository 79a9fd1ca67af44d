"""The `sunfish` command's surface (issue 22): help for every option, --device, batched AR and diffusion
samples, the diffusion progress bar, unknown model names, no files left by a failing command, `sunfish export`."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from sunfish.cli import main
from sunfish.cli_support import KNOWN_MODELS
from sunfish.errors import CheckpointError
from tests.ckpt_fixtures import build_checkpoints, tree_digest


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return build_checkpoints(tmp_path_factory.mktemp("ckpts"))


def invoke(*args: str, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


# ------------------------------------------------------------------------------------------------
# help


def undocumented(group: click.Command, prefix: str = "sunfish") -> list[str]:
    """Every command without a docstring and every option without help, under ``group``."""
    missing = [] if (group.help or "").strip() else [prefix]
    for param in group.params:
        if isinstance(param, click.Option) and not (param.help or "").strip():
            missing.append(f"{prefix} {param.opts[-1]}")
    for name, command in getattr(group, "commands", {}).items():
        missing += undocumented(command, f"{prefix} {name}")
    return missing


def test_every_command_has_a_docstring_and_every_option_help():
    assert undocumented(main) == []
    assert {"sample", "status", "compare", "export", "eval-text", "config", "tracking"} <= set(main.commands)


def test_the_help_walk_finds_what_is_missing():
    @click.group()
    def top():
        """A group."""

    @top.command()
    @click.option("--quiet", is_flag=True)
    def sub(quiet):
        pass

    assert undocumented(top, "top") == ["top sub", "top sub --quiet"]


def test_known_models_are_the_configs():
    from sunfish.config import CONTROL_NAMES, EVALUATED_MODELS, MODEL_NAMES

    assert KNOWN_MODELS == (*MODEL_NAMES, *CONTROL_NAMES)
    assert set(KNOWN_MODELS) == set(EVALUATED_MODELS)


# ------------------------------------------------------------------------------------------------
# unknown model names


def test_status_of_an_unknown_model_names_the_known_ones(tmp_path):
    result = invoke("status", "stage_9", "--root", tmp_path)
    assert result.exit_code == 2
    assert "unknown model 'stage_9'; known models: stage_0, stage_1" in result.output
    assert "control_1" in result.output and "no training progress" not in result.output
    known = invoke("status", "stage_0", "--root", tmp_path)
    assert known.exit_code == 2 and "no training progress of stage_0" in known.output


def test_config_show_refuses_an_unknown_model_and_takes_a_control():
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    bad = invoke("config", "show", "--params", params, "--model", "stage_9")
    assert bad.exit_code == 2 and "stage_9" in bad.output
    ok = invoke("config", "show", "--params", params, "--model", "control_1", "--format", "json")
    assert ok.exit_code == 0, ok.output
    assert list(json.loads(ok.output)["resolved_training"]) == ["control_1"]


# ------------------------------------------------------------------------------------------------
# --device


def test_device_cpu_works(checkpoints, tmp_path):
    result = invoke("sample", checkpoints["staged"], "--device", "cpu", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    text = tmp_path / "t.txt"
    text.write_text("The dog liked to play in the park.\n")
    scored = invoke("eval-text", checkpoints["diffusion"], text, "--device", "cpu")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.output)["total"]["tokens"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["sample", "eval-text"])
def test_an_absent_device_is_refused_by_name(checkpoints, tmp_path, command):
    extra = [tmp_path / "none.txt"] if command == "eval-text" else []
    result = invoke(command, checkpoints["staged"], *extra, "--device", "cuda")
    assert result.exit_code == 2
    assert "--device cuda: no CUDA device" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("device", ["bogus", "cuda:x", "meta"])
def test_a_device_that_is_none_is_refused(checkpoints, device):
    result = invoke("sample", checkpoints["staged"], "--device", device)
    assert result.exit_code == 2 and f"--device {device}" in result.output.replace("'", "")


def test_the_device_reaches_the_loader(checkpoints, tmp_path, monkeypatch):
    import sunfish.training.checkpoint as ckpt

    seen = []

    def loader(path, *, expect_kind=None, device="cpu"):
        seen.append(device)
        raise CheckpointError("loader reached")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(ckpt, "load_checkpoint", loader)
    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    for args in (["sample", checkpoints["staged"], "--device", "cuda:1"], ["sample", checkpoints["diffusion"]],
                 ["eval-text", checkpoints["staged"], text, "--device", "cuda"]):
        result = invoke(*args)
        assert result.exit_code == 2 and "loader reached" in result.output, result.output
    assert seen == ["cuda:1", "cuda", "cuda"]
    over = invoke("sample", checkpoints["staged"], "--device", "cuda:2")
    assert over.exit_code == 2 and "2 CUDA device(s)" in over.output


# ------------------------------------------------------------------------------------------------
# batched AR samples, the diffusion progress bar


def test_ar_samples_are_one_batch_and_reproducible(checkpoints, monkeypatch):
    import sunfish.generation as generation

    calls = []
    real = generation.generate_many
    monkeypatch.setattr(generation, "generate_many", lambda *a, **k: calls.append(k["num_samples"]) or real(*a, **k))
    args = ["sample", checkpoints["staged"], "--num-samples", "4", "--max-new-tokens", "6", "--seed", "5",
            "--format", "json"]
    first, again = invoke(*args), invoke(*args)
    assert first.exit_code == 0, first.output
    assert calls == [4, 4]
    assert len(texts(first)) == 4 and texts(first) == texts(again)
    assert len(set(texts(first))) > 1, "four draws, not one repeated"
    assert texts(invoke(*args[:-3], "7", "--format", "json")) != texts(first)


def texts(result) -> list[str]:
    return [json.loads(line)["text"] for line in result.stdout.splitlines()]


def test_diffusion_progress_goes_to_stderr_and_json_stays_pure(checkpoints):
    args = ["sample", checkpoints["diffusion"], "--num-samples", "2", "--num-steps", "6", "--format", "json"]
    shown = invoke(*args, "--progress")
    assert shown.exit_code == 0, shown.output
    assert [json.loads(line)["model"] for line in shown.stdout.splitlines()] == ["cfg", "cfg"]
    assert "denoising" in shown.stderr and "denoising" not in shown.stdout
    hidden = invoke(*args, "--no-progress")
    assert hidden.exit_code == 0 and "denoising" not in hidden.stderr
    assert texts(hidden) == texts(shown), "the bar changes nothing about the samples"
    quiet = invoke(*args)  # default: only on a terminal, and the test runner's stderr is none
    assert quiet.exit_code == 0 and "denoising" not in quiet.stderr


def counted_diffusion_sampler(monkeypatch) -> list[dict]:
    """The diffusion sampler, recording each call's arguments (sunfish.sampling imports it per call;
    the module, not sunfish.diffusion's re-exported function of the same name)."""
    import importlib

    diffusion = importlib.import_module("sunfish.diffusion.sample")

    calls: list[dict] = []
    real = diffusion.sample
    monkeypatch.setattr(diffusion, "sample", lambda *a, **k: calls.append({"prompt": a[1], **k}) or real(*a, **k))
    return calls


@pytest.mark.parametrize("extra", [
    ["--prompt", "The dog", "--guidance", "sequence", "--guidance-scale", "2", "--candidates", "2"],
    ["--prompt", "The dog", "--guidance", "token", "--guidance-scale", "2"],
    ["--infill", "The dog [MASK] the ball"],
])
def test_diffusion_samples_are_one_batch_and_reproducible(checkpoints, monkeypatch, extra):
    calls = counted_diffusion_sampler(monkeypatch)
    args = ["sample", checkpoints["diffusion"], "--num-samples", "3", "--num-steps", "4", "--seq-len", "10",
            "--seed", "5", "--format", "json", *extra]
    first, again = invoke(*args), invoke(*args)
    assert first.exit_code == 0, first.output
    assert [c["num_samples"] for c in calls] == [3, 3], "three texts from one sampler call, not three calls"
    assert len(texts(first)) == 3 and texts(first) == texts(again)
    records = [json.loads(line) for line in first.stdout.splitlines()]
    assert len({r["seconds"] for r in records}) == 1 and records[0]["seconds"] >= 0, "the batch's time shared out"
    if "--candidates" in extra:
        assert calls[0]["guidance"] == "sequence" and calls[0]["candidates"] == 2


def test_one_diffusion_sample_is_what_a_seeded_sampler_call_draws(checkpoints, monkeypatch):
    """N = 1 draws exactly what the one-sample-at-a-time loop drew for sample 0: one sampler call
    with one prompt row and a generator seeded with --seed (this is that call, made directly)."""
    from sunfish.data.tokenizer import TextTokenizer
    from sunfish.diffusion.sample import sample as diffusion_sample
    from sunfish.sampling import sample_from_checkpoint
    from sunfish.training.checkpoint import load_checkpoint

    model, meta, directory = load_checkpoint(checkpoints["diffusion"])
    tok = TextTokenizer.load(directory / "tokenizer.json")
    prompt_ids = tok.encode_prompt("The dog")[: model.config.max_prompt_tokens]
    for guidance, k in (("sequence", 3), ("token", 4)):
        ids = diffusion_sample(model, [prompt_ids], num_samples=1, seq_len=10, num_steps=4, guidance_scale=2.0,
                               scheduler="ddim", eta=0.0, generator=torch.Generator().manual_seed(11), top_p=0.9,
                               guidance=guidance, candidates=k)[0].tolist()
        if tok.eos_id in ids:
            ids = ids[: ids.index(tok.eos_id)]
        expected = tok.decode([t for t in ids if t != tok.pad_id])
        got = sample_from_checkpoint(checkpoints["diffusion"], prompt="The dog", guidance_scale=2.0, seq_len=10,
                                     num_steps=4, scheduler="ddim", top_p=0.9, guidance=guidance, candidates=k,
                                     seed=11)
        assert [r["text"] for r in got] == [expected]


def test_the_bar_advances_over_the_steps_of_the_batch(checkpoints, monkeypatch):
    import sunfish.sampling as sampling

    seen: list[tuple[int, int]] = []

    class Recording(sampling._StepBar):
        def _move_to(self, position: int) -> None:
            super()._move_to(position)
            seen.append((self.bar.n, self.bar.total))

    monkeypatch.setattr(sampling, "_StepBar", Recording)
    out = sampling.sample_from_checkpoint(checkpoints["diffusion"], prompt="The dog", num_samples=3, seq_len=10,
                                          num_steps=5, guidance="token", progress=True)
    assert len(out) == 3
    assert [n for n, _ in seen][:5] == [1, 2, 3, 4, 5] and seen[-1] == (5, 5), "one pass of 5 steps for 3 texts"


def test_more_rows_than_a_batch_holds_are_drawn_in_a_few_batches(checkpoints, monkeypatch):
    """Sequence guidance holds candidates x samples rows: past MAX_SAMPLER_ROWS the texts come in
    several calls of one generator, each under the cap, and the bar spans them all."""
    import sunfish.sampling as sampling

    calls = counted_diffusion_sampler(monkeypatch)
    monkeypatch.setattr(sampling, "MAX_SAMPLER_ROWS", 4)
    kwargs = dict(prompt="The dog", num_samples=5, seq_len=10, num_steps=3, guidance="sequence", guidance_scale=2.0,
                  candidates=2, seed=3)
    out = sampling.sample_from_checkpoint(checkpoints["diffusion"], **kwargs)
    assert [c["num_samples"] for c in calls] == [2, 2, 1] and len(out) == 5
    assert [r["text"] for r in sampling.sample_from_checkpoint(checkpoints["diffusion"], **kwargs)] == \
        [r["text"] for r in out]


# ------------------------------------------------------------------------------------------------
# no files written by a failing command


@pytest.fixture
def outside_project(tmp_path, monkeypatch) -> Path:
    """An empty folder as the project root, with nothing pointing at a store elsewhere."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("SUNFISH_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_compare_outside_a_project_creates_no_store(outside_project):
    result = invoke("compare")
    assert result.exit_code == 2
    assert f"no MLflow store at {outside_project / 'mlflow.db'}" in result.output
    assert list(outside_project.iterdir()) == []
    for uri in (f"sqlite:///{outside_project / 'typo.db'}", str(outside_project / "mlruns")):
        result = invoke("compare", "--uri", uri)
        assert result.exit_code == 2 and "no MLflow store" in result.output
    assert list(outside_project.iterdir()) == []


def test_sample_from_mlflow_outside_a_project_creates_nothing(outside_project):
    for reference in ("models:/sunfish-stage_0@champion", "mlflow:exp-1/cfg", "runs:/0123abcd/checkpoints/cfg"):
        result = invoke("sample", reference)
        assert result.exit_code == 2 and "no MLflow store" in result.output, result.output
    assert list(outside_project.iterdir()) == []


def test_a_checkpoint_downloaded_before_needs_no_store(outside_project, checkpoints):
    import shutil

    cached = outside_project / "cache" / "mlflow" / "0123abcd" / "checkpoints" / "stage_0"
    shutil.copytree(checkpoints["staged"], cached)
    result = invoke("sample", "runs:/0123abcd/checkpoints/stage_0", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in outside_project.iterdir()) == ["cache"]


def test_sync_to_a_store_that_is_gone_creates_none_and_keeps_the_records(outside_project):
    fallback = outside_project / "state" / "mlflow_fallback" / "train_stage_0.jsonl"
    fallback.parent.mkdir(parents=True)
    gone = outside_project / "moved" / "mlflow.db"
    records = [{"run_id": "a" * 32, "time": 1.7e9, "uri": f"sqlite:///{gone}", "stage": "train_stage_0",
                "experiment": "sunfish", "metrics": [["train/loss", 2.5, 1, 1700000000000]]}]
    fallback.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = invoke("tracking", "sync")
    assert result.exit_code == 2
    assert f"no MLflow store at {gone}" in result.output and "Traceback" not in result.output
    assert not gone.parent.exists() and not (outside_project / "mlflow.db").exists()
    assert [json.loads(line) for line in fallback.read_text().splitlines()] == records
    assert sorted(p.name for p in fallback.parent.iterdir()) == ["train_stage_0.jsonl"]


# ------------------------------------------------------------------------------------------------
# sunfish export


def test_export_writes_a_hub_folder(checkpoints, tmp_path):
    out = tmp_path / "hub"
    result = invoke("export", checkpoints["staged"].parent, out)  # a model folder: its final/
    assert result.exit_code == 0, result.output
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["model_type"] == "sunfish"
    assert "## Evaluation" not in (out / "README.md").read_text(), "no project figures to show"


def test_export_refuses_a_non_empty_folder_and_writes_nothing(checkpoints, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree_digest(out)
    result = invoke("export", checkpoints["diffusion"], out)
    assert result.exit_code == 2 and "not empty" in result.output and "Traceback" not in result.output
    assert tree_digest(out) == before
    again = invoke("export", checkpoints["diffusion"], out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert (out / "README.md").exists() and (out / "notes.txt").read_text() == "mine"


def test_export_fills_the_card_from_the_projects_milestones_and_pushes_to_a_folder(tmp_path):
    made = build_checkpoints(tmp_path / "project" / "models")
    reports = tmp_path / "project" / "reports"
    reports.mkdir()
    (reports / "milestones.json").write_text(json.dumps({"models": {"stage_0": {
        "kind": "staged", "best": {"step": 3, "rule": "lowest"},
        "milestones": [{"step": 1, "val_bpb": 9.9, "val_loss": 9.9},
                       {"step": 3, "val_bpb": 2.345, "val_loss": 3.21, "quality": {"judge_ppl": 87.5}}]}}}))
    out, pushed = tmp_path / "export", tmp_path / "pushed"
    result = invoke("export", made["staged"], out, "--push-to", pushed)
    assert result.exit_code == 0, result.output
    assert "card figures from" in result.output and f"pushed to {pushed}" in result.output
    card = (out / "README.md").read_text()
    assert "| val_bpb | 2.345 |" in card and "| judge_ppl | 87.5 |" in card and "9.9" not in card
    assert (pushed / "README.md").read_text() == card
    other = invoke("export", made["diffusion"], tmp_path / "cfg")  # cfg has no entry: no figures
    assert other.exit_code == 0 and "## Evaluation" not in (tmp_path / "cfg" / "README.md").read_text()
