"""The `sunfish` command: the user commands (sample, status, compare, ...).

The DVC stages have their own entry point, `python -m pipeline <stage>` (pipeline/cli.py), which
reuses :func:`friendly_errors`; the library never imports the pipeline.

Importing this module must stay cheap (no torch, no mlflow): heavy imports happen inside commands,
so `sunfish --help` and params validation answer at once.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import sys
from pathlib import Path

import click

from sunfish.cli_support import (
    DEVICES,
    KNOWN_MODELS,
    check_model,
    existing_store,
    milestone_metrics,
    project_tracking,
    resolve_device,
)
from sunfish.errors import CheckpointError, CorpusError, NonFiniteLoss, TrainingInterrupted, UsageProblem

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _known_errors() -> tuple[type[BaseException], ...]:
    from sunfish.config import ParamsError

    return (ParamsError, CheckpointError, CorpusError, UsageProblem, FileNotFoundError)


def friendly_errors(fn):
    """Bad inputs (params, checkpoints, corpora) end with one clear message and exit code 2.

    A full disk (ENOSPC, EDQUOT) is not a bad input but needs no traceback either: one line naming
    what was being written, exit code 1.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            stopped = _training_stop(exc)
            if stopped is not None:
                click.echo(f"{'stopped' if stopped else 'error'}: {exc}", err=True)
                sys.exit(exc.exit_code if stopped else 1)
            if isinstance(exc, _known_errors()):
                click.echo(f"error: {exc}", err=True)
                sys.exit(EXIT_BAD_INPUT)
            if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                click.echo(f"error: {_disk_full_message(exc)}", err=True)
                sys.exit(EXIT_FAILED)
            raise

    return wrapper


def _disk_full_message(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    if exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return (f"{text}. Free some space (old runs under state/ and models/, `dvc gc`) and run the same command "
            "again: training resumes from the last complete checkpoint")


def _training_stop(exc: BaseException) -> bool | None:
    """True for a requested stop (SIGINT/SIGTERM), False for a diagnosed failure, None otherwise."""
    if isinstance(exc, TrainingInterrupted):
        return True
    if isinstance(exc, NonFiniteLoss):
        return False
    return None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sunfish")
def main() -> None:
    """SunFish: train, diagnose, sample and evaluate small language models.

    The pipeline runs through DVC (`dvc repro`); every stage is a `python -m pipeline ...` command.
    """


# ------------------------------------------------------------------------------------------------
# user commands


@main.group()
def config() -> None:
    """Inspect the configuration."""


PARAMS_HELP = "the params file to read"


@config.command("show")
@click.option("--params", "params_path", type=click.Path(path_type=Path), default="params.yaml", show_default=True,
              help=PARAMS_HELP)
@click.option("--model", type=click.Choice(KNOWN_MODELS), default=None,
              help="print the resolved training settings of this model only; default: of every trained model")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True,
              help="output format")
@friendly_errors
def config_show(params_path: Path, model: str | None, fmt: str) -> None:
    """Print the validated config with every default filled in."""
    import yaml

    from sunfish.config import MODEL_NAMES, load_params

    params = load_params(params_path)
    data = params.model_dump()
    models = [model] if model else list(MODEL_NAMES)
    data["resolved_training"] = {m: params.training_for(m).model_dump(exclude={"model"}) for m in models}
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)


@main.command()
@click.argument("checkpoint")
@click.option("--prompt", default=None, help="text to continue (AR) or condition on (diffusion); none = unconditional")
@click.option("--infill", default=None, help="diffusion only: text with [MASK] spans to fill, keeping the rest")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=60, show_default=True, help="AR only")
@click.option("--temperature", type=click.FloatRange(0.0, 10.0), default=0.8, show_default=True,
              help="AR sampling temperature; 0 = greedy")
@click.option("--top-k", type=click.IntRange(0), default=40, show_default=True, help="AR only; 0 = off")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="nucleus sampling mass; default: eval.top_p's default (AR), the checkpoint's (diffusion, "
                   "masked objective; 1 = exact)")
@click.option("--repetition-penalty", type=click.FloatRange(1.0, 10.0), default=1.1, show_default=True,
              help="AR only")
@click.option("--guidance-scale", type=click.FloatRange(0.0, 100.0), default=None,
              help="diffusion only; default: the checkpoint's")
@click.option("--guidance", type=click.Choice(["sequence", "token"]), default=None,
              help="diffusion only: sequence = resample whole conditional samples by their prompt information "
                   "(block diffusion, or a cross-attention checkpoint with the masked objective), token = CFG on "
                   "every position; default: the checkpoint's (block diffusion: token)")
@click.option("--candidates", type=click.IntRange(1, 64), default=None,
              help="diffusion only: conditional samples per prompt for --guidance sequence; default: the "
                   "checkpoint's")
@click.option("--num-samples", type=click.IntRange(1, 256), default=1, show_default=True,
              help="texts to draw, as one batch from one generator seeded with --seed (for N > 1 not the "
                   "texts of versions that drew sample i alone with --seed + i)")
@click.option("--seq-len", type=click.IntRange(1, 65536), default=None,
              help="diffusion only: sample length in tokens; default: the checkpoint's")
@click.option("--num-steps", type=click.IntRange(1, 100000), default=None,
              help="diffusion only: denoising steps in all (block diffusion: spread over the blocks, at most "
                   "block_size each); default: the checkpoint's")
@click.option("--scheduler", type=click.Choice(["ddim", "ddpm"]), default=None,
              help="diffusion only; default: the checkpoint's")
@click.option("--seed", type=int, default=0, show_default=True, help="random seed: the same seed, the same texts")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: the samples separated by ---; json: one JSON object per sample and line")
@click.option("--uri", "tracking", default=None,
              help="MLflow tracking URI for models:/, runs:/ and mlflow: checkpoints; default: MLFLOW_TRACKING_URI, "
                   "else tracking.uri of ./params.yaml, else the project's mlflow.db")
@click.option("--device", default="auto", show_default=True, help=f"where the model runs: {DEVICES}")
@click.option("--progress/--no-progress", default=None,
              help="a progress bar on stderr over the denoising steps of a diffusion checkpoint (AR sampling "
                   "has none); default: when stderr is a terminal")
@friendly_errors
def sample(checkpoint: str, prompt, infill, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
           guidance_scale, guidance, candidates, num_samples, seq_len, num_steps, scheduler, seed, fmt,
           tracking, device, progress) -> None:
    """Generate text from any SunFish checkpoint (a stage or the diffusion model).

    CHECKPOINT is a checkpoint directory (models/stage_3/final), its model.safetensors, or a model
    directory (models/stage_3, which uses final/). A checkpoint logged to MLflow by the evaluate
    stage works too: models:/sunfish-<model>@champion (the registered best checkpoint of the latest
    evaluate run; models:/<name>/<version> for an earlier one), runs:/<run_id>/checkpoints/<model>, or
    mlflow:<experiment>/<model> for the best checkpoint of an experiment (a name from `sunfish
    compare`); it is downloaded once into
    ~/.cache/sunfish/mlflow ($SUNFISH_CACHE/mlflow). Options marked "AR only" or "diffusion only"
    are refused (exit 2) for the other kind of checkpoint rather than silently ignored.

    A diffusion option left out takes "the checkpoint's" value: the checkpoint's
    generation_config.json (written from params.yaml's sampling section when it was trained), or for a
    checkpoint saved before that file existed, the default of the same sampling key in the schema. A
    params.yaml in the current directory is never read for them.
    """
    from sunfish.mlflow_checkpoints import fetch_checkpoint, is_mlflow_reference
    from sunfish.sampling import sample_from_checkpoint
    from sunfish.training.checkpoint import read_checkpoint_meta

    device = resolve_device(device)
    if is_mlflow_reference(checkpoint):
        uri, mlflow_experiment = project_tracking(tracking)
        checkpoint = fetch_checkpoint(checkpoint, uri=uri, mlflow_experiment=mlflow_experiment)
    checkpoint = Path(checkpoint)

    kind = read_checkpoint_meta(checkpoint)[1]["kind"]
    _check_flags_fit(click.get_current_context(), kind, checkpoint)
    if infill is not None and MASK_MARKER not in infill:
        raise UsageProblem(f"--infill needs at least one {MASK_MARKER} span to fill, e.g. "
                           f"'The dog {MASK_MARKER} the ball'; to condition on text use --prompt")
    results = sample_from_checkpoint(
        checkpoint, prompt=prompt, infill=infill, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, guidance_scale=guidance_scale,
        num_samples=num_samples, seq_len=seq_len, num_steps=num_steps, scheduler=scheduler, seed=seed,
        guidance=guidance, candidates=candidates, device=device, progress=progress,
    )
    for r in results:
        if fmt == "json":
            click.echo(json.dumps(r, ensure_ascii=False))
        else:
            click.echo(r["text"])
            if len(results) > 1:
                click.echo("---")


MASK_MARKER = "[MASK]"  # sunfish.sampling.MASK_MARKER (not imported: keeps the CLI import cheap)
AR_ONLY = ("max_new_tokens", "temperature", "top_k", "repetition_penalty")
DIFFUSION_ONLY = ("infill", "guidance_scale", "guidance", "candidates", "seq_len", "num_steps", "scheduler")


def _check_flags_fit(ctx: click.Context, kind: str, checkpoint: Path) -> None:
    """Refuse options given on the command line that the checkpoint's kind of model would ignore."""
    from click.core import ParameterSource

    given = {name for name in (*AR_ONLY, *DIFFUSION_ONLY)
             if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    wrong, needs = (given & set(DIFFUSION_ONLY), "a diffusion") if kind == "staged" else (
        given & set(AR_ONLY), "an autoregressive (staged)")
    if wrong:
        flags = ", ".join("--" + name.replace("_", "-") for name in sorted(wrong))
        holds = "an autoregressive stage" if kind == "staged" else f"a {kind!r} model"
        raise UsageProblem(f"{flags} need{'s' if len(wrong) == 1 else ''} {needs} checkpoint; "
                           f"{checkpoint} holds {holds}")


@main.command()
@click.option("--params", "params_path", type=click.Path(path_type=Path), default="params.yaml", show_default=True,
              help=PARAMS_HELP)
@click.option("--model", type=click.Choice(["stage_0", "stage_1", "stage_2", "stage_3", "cfg", "all"]),
              default="all", show_default=True, help="which model to diagnose")
@click.option("--preset", default=None, help="diagnose another preset than params.yaml's (e.g. micro)")
@click.option("--json", "as_json", is_flag=True, help="print the JSON report instead of the table")
@friendly_errors
def diagnose(params_path: Path, model: str, preset: str | None, as_json: bool) -> None:
    """Run the diagnose checks outside DVC (needs the prepared data of `dvc repro prepare`).

    Exits 1 on a failed check, or on a warning when diagnose.fail_on_warn is true (as the stage).
    """
    from sunfish.config import load_params
    from sunfish.diagnose import format_table, run_diagnostics
    from sunfish.logs import setup_logging

    setup_logging()
    overrides = {}
    if preset:
        overrides = {"staged.preset": preset, "cfg.preset": preset}
    params = load_params(params_path, overrides=overrides)
    prepared = params_path.resolve().parent / "data" / "prepared"
    models = None if model == "all" else [model]
    report = run_diagnostics(params, prepared, models=models)
    click.echo(json.dumps(report, indent=2) if as_json else format_table(report))
    if report["status"] == "fail" or (report["status"] == "warn" and params.diagnose.fail_on_warn):
        sys.exit(1)


@main.command()
@click.argument("model", required=False)
@click.option("--root", type=click.Path(path_type=Path, file_okay=False), default=".", show_default=True,
              help="the project folder whose state/ to read")
@friendly_errors
def status(model: str | None, root: Path) -> None:
    """Training progress from disk (works while training runs in another process).

    MODEL limits it to one model (stage_0 ... stage_3, cfg, control_N); a name that is no model is
    refused, so a typo is not mistaken for a model that has not started.
    """
    from sunfish.status import format_status, read_status

    if model is not None:
        check_model(model)
    rows = read_status(root, model)
    if not rows:
        which = f" of {model}" if model else ""
        raise UsageProblem(f"no training progress{which} found under {root.resolve() / 'state'} "
                           "(run `dvc repro` or a train stage first)")
    click.echo(format_status(rows))


@main.command("eval-text")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--seq-len", type=click.IntRange(8, 65536), default=None, help="window length; default: the model's")
@click.option("--seed", type=int, default=0, show_default=True, help="diffusion ELBO: noise draws")
@click.option("--device", default="auto", show_default=True, help=f"where the model runs: {DEVICES}")
@friendly_errors
def eval_text(checkpoint: Path, files: tuple[Path, ...], seq_len: int | None, seed: int, device: str) -> None:
    """Score text files with a checkpoint: loss, perplexity and bits per byte as JSON.

    For the diffusion model the figures are its ELBO bound (an upper bound on the true NLL).
    """
    from sunfish.evaluation.score_text import score_files

    device = resolve_device(device)
    click.echo(json.dumps(score_files(checkpoint, list(files), seq_len=seq_len, seed=seed, device=device), indent=2))


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="write the upgraded checkpoint here (a new directory) instead of in place")
@friendly_errors
def migrate(checkpoint: Path, output: Path | None) -> None:
    """Upgrade a checkpoint written by an older SunFish to the current format.

    CHECKPOINT is a checkpoint directory, its model.safetensors, or a model directory (uses final/).
    Format version 0 (a config.json without "format_version" and without the weights digest)
    becomes the current version: the weights are checked first (safetensors only, never a pickle;
    they must fit the architecture config.json describes), then their sha256 is recorded so that
    later damage is detected on load. The result is written atomically: to --output, or in place
    with the original kept as <dir>.bak.

    A checkpoint that is already current is left untouched (exit 0); one that cannot be migrated
    (damaged or pickled weights, another architecture, a newer or unknown format) is explained and
    nothing is written (exit 2).
    """
    from sunfish.training.checkpoint import FORMAT_VERSION, migrate_checkpoint

    status, directory, backup = migrate_checkpoint(checkpoint, output)
    if status == "current":
        click.echo(f"{directory}: already at checkpoint format version {FORMAT_VERSION} (current); nothing to do")
        return
    kept = f"; original kept in {backup}" if backup else ""
    click.echo(f"{directory}: migrated from format version 0 to {FORMAT_VERSION} (weights checked, sha256 "
               f"recorded){kept}")


@main.command()
@click.option("--uri", default=None,
              help="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else tracking.uri of ./params.yaml, "
                   "else the project's mlflow.db")
@click.option("--mlflow-experiment", default=None,
              help="MLflow experiment holding the runs; default: tracking.experiment (sunfish)")
@click.option("--experiment", "-e", "names", multiple=True,
              help="only experiments with this name; shell patterns work (-e 'sweep-*'); repeatable")
@click.option("--last", type=click.IntRange(1), default=None, help="only the newest N experiments")
@click.option("--param", "-p", "params", multiple=True,
              help="show this param as a column (repeatable); default: the params that differ between them")
@click.option("--model", "-m", "models", multiple=True,
              help="show best val bpb of this model (repeatable); default: every model evaluated")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True,
              help="output format")
@friendly_errors
def compare(uri, mlflow_experiment, names, last, params, models, fmt) -> None:
    """Experiments side by side, from MLflow: one row per `dvc exp run` (or plain `dvc repro`).

    Columns: the params that differ between the experiments listed (named as in params.yaml), the
    best validation bits per byte of each model, the diffusion model's prompt adherence at the
    configured guidance scale, its fluent-and-on-topic share on the test prompts, the checklist
    items passed, and the parent run's id (its stage runs
    are nested under it in the MLflow UI; --format json lists them).
    """
    from sunfish.compare import CompareError, format_rows, load_experiments

    tracking_at, default_experiment = project_tracking(uri)
    try:
        rows = load_experiments(existing_store(tracking_at), mlflow_experiment or default_experiment, names=names,
                                last=last)
    except CompareError as exc:
        raise UsageProblem(str(exc)) from exc
    for name in models:
        check_model(name, also={m for row in rows for m in row.models})
    if not rows and fmt == "table":
        wanted = f" matching {', '.join(names)}" if names else ""
        raise UsageProblem(f"no experiments{wanted} in {tracking_at} (run `dvc repro` or `dvc exp run` first)")
    text = format_rows(rows, fmt, params=list(params) or None, models=list(models) or None)
    click.echo(text, nl=not text.endswith("\n"))


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path, dir_okay=True, file_okay=False))
@click.option("--overwrite", is_flag=True, help="write into OUT_DIR even when it is not empty")
@click.option("--push-to", default=None,
              help="then upload the folder to this Hugging Face Hub repository (user/name, created when missing), "
                   "or copy it into this local folder")
@click.option("--token", default=None, help="Hugging Face token for --push-to; default: HF_TOKEN or the saved login")
@click.option("--private", is_flag=True, help="create the hub repository private (--push-to a hub id only)")
@friendly_errors
def export(checkpoint: Path, out_dir: Path, overwrite: bool, push_to: str | None, token: str | None,
           private: bool) -> None:
    """Write a checkpoint as a Hugging Face model folder (weights, tokenizer, config.json, model card).

    CHECKPOINT is a checkpoint directory, its model.safetensors, or a model directory (uses final/).
    Inside a project whose evaluate stage has run, the card lists that checkpoint's figures from
    reports/milestones.json (validation bits per byte and loss, judge perplexity); elsewhere it has
    no evaluation section. OUT_DIR must be new or empty unless --overwrite: an export never replaces
    files by accident. Load the folder with sunfish.hub.from_pretrained or `sunfish sample`.
    """
    from sunfish.hub import push_to_hub, save_pretrained
    from sunfish.training.checkpoint import read_checkpoint_meta

    directory, meta = read_checkpoint_meta(checkpoint)
    found = milestone_metrics(directory, meta)
    folder = save_pretrained(directory, out_dir, metrics=found[0] if found else None, overwrite=overwrite)
    source = f"; card figures from {found[1]}" if found else ""
    click.echo(f"{directory}: exported to {folder}{source}")
    if push_to:
        click.echo(f"{folder}: pushed to {push_to_hub(folder, push_to, token=token, private=private)}")


# ------------------------------------------------------------------------------------------------
# MLflow tracking


@main.group()
def tracking() -> None:
    """MLflow tracking: records kept locally while the store was unreachable."""


@tracking.command("sync")
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option("--uri", default=None,
              help="tracking URI to send to; default: the one each record failed to reach")
@friendly_errors
def tracking_sync(files: tuple[Path, ...], uri: str | None) -> None:
    """Replay fallback files into MLflow (default: state/mlflow_fallback/*.jsonl of this project).

    Each file sent completely is renamed to <name>.synced-<time>; records that could not be sent stay
    in the file, so the command can simply be run again. Records MLflow refuses as invalid are marked
    rejected in the renamed file and skipped; the artifact and checkpoint copies kept for the records
    sent are deleted. Model registrations that evaluate could not make while the store was down are
    replayed too (a version of sunfish-<model>, alias champion); weights already registered reuse
    their version.
    """
    from sunfish.model_registry import replay_registration
    from sunfish.tracking import SyncError, fallback_files, repo_root, sync_file

    if not files:
        root = repo_root()
        files = tuple(fallback_files(root))
        if not files:
            click.echo(f"nothing to sync: no fallback files in {root / 'state' / 'mlflow_fallback'}")
            return
    problems = []
    for path in files:
        try:
            result = sync_file(path, uri, register=replay_registration)
        except (SyncError, FileNotFoundError) as exc:
            problems.append(str(exc))
            continue
        where = ", ".join(sorted(result.uris)) or "MLflow"
        skipped = f", {result.skipped} skipped (see warnings)" if result.skipped else ""
        n = result.registrations
        registered = f", {n} model registration{'s' * (n != 1)}" if n else ""
        freed = (f"; {result.kept_removed} kept cop{'y' if result.kept_removed == 1 else 'ies'} removed "
                 f"({result.freed_bytes / 1e6:.1f} MB freed)" if result.kept_removed else "")
        click.echo(f"{path}: {result.records} records ({result.metrics} metric values{registered}) sent to {where}"
                   f"{skipped}; file moved to {result.moved_to.name}{freed}")
    if problems:
        raise UsageProblem("\n".join(problems))

if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    main()
