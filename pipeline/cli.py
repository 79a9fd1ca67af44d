"""`python -m pipeline <stage>`: the DVC stages, as dvc.yaml runs them.

Each command takes identifiers only (which stage, which model); every setting comes from
params.yaml, which DVC tracks. The library (sunfish/) never imports this package: the stage entry
points live here, beside the glue they run. Bad inputs end with one line and exit code 2, as in the
`sunfish` command (:func:`sunfish.cli.friendly_errors`).

Importing this module stays cheap (no torch, no mlflow): each command imports its stage when run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import click

from sunfish.cli import friendly_errors
from sunfish.logs import setup_logging

log = logging.getLogger("sunfish")


def relaunch_distributed(args: list[str]) -> None:
    """With train.nproc_per_node > 1, rerun this stage under torchrun (one process per device).

    ``args`` are this command's arguments (``["train-staged", "--stage", "0"]``): each process runs
    ``python -m pipeline <args>`` again, so DVC runs the same stage command either way and switching
    to DistributedDataParallel is a params.yaml change. Launched by torchrun already (WORLD_SIZE
    set), or with one process per node, nothing happens; otherwise this process exits with
    torchrun's exit code.
    """
    from sunfish.config import load_params

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    n = load_params(Path.cwd() / "params.yaml").train.nproc_per_node
    if n <= 1:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "pipeline", *args]
    log.info("relaunching under torchrun: %s", " ".join(cmd))
    sys.exit(subprocess.call(cmd))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """SunFish pipeline stages, as dvc.yaml runs them. Settings come from params.yaml only.

    Run the whole pipeline with `dvc repro`; a single stage with `dvc repro <stage>` (cached) or
    `python -m pipeline <command>` (always runs, from the project root).
    """
    setup_logging()


@main.command("validate")
@friendly_errors
def validate() -> None:
    """Validate all of params.yaml (fails naming the bad key)."""
    from pipeline.validate import run

    run()


@main.command("prepare")
@friendly_errors
def prepare() -> None:
    """Load the corpus, train the tokenizer, write token files and prompt/text pairs."""
    from pipeline.prepare import run

    run()


@main.command("diagnose")
@friendly_errors
def diagnose() -> None:
    """Check configuration, data, initialisation, gradient flow and memorisation before training."""
    from pipeline.diagnose import run

    run()


@main.command("train-staged")
@click.option("--stage", "stage_index", type=click.IntRange(0, 3), required=True, help="which stage, 0..3")
@friendly_errors
def train_staged(stage_index: int) -> None:
    """Train one stage of the staged autoregressive model.

    Resumes an interrupted run (or one whose max_steps grew) from state/stage_N/ when the other
    settings are unchanged; Ctrl-C or SIGTERM stops after the current step with a resume checkpoint.
    """
    relaunch_distributed(["train-staged", "--stage", str(stage_index)])
    from pipeline.train_staged import run

    run(stage_index)


@main.command("train-control")
@click.option("--stage", "stage_index", type=click.IntRange(1, 3), required=True,
              help="which stage's control, 1..3")
@friendly_errors
def train_control(stage_index: int) -> None:
    """Train control_N: stage N-1's model, from its final weights, for stage N's budget.

    The same batches and steps as stage N without its new component, so the report can tell what
    the component adds beyond the extra training. Resumes and stops like `train-staged` (state/control_N/).
    With staged.k1.mode: log, control_2 would equal stage_2 bit for bit: it is written as not trained.
    """
    relaunch_distributed(["train-control", "--stage", str(stage_index)])
    from pipeline.train_staged import run_control

    run_control(stage_index)


@main.command("train-cfg")
@friendly_errors
def train_cfg() -> None:
    """Train the prompt-conditioned diffusion model (classifier-free guidance).

    Resumes and stops like `train-staged` (state/cfg/).
    """
    relaunch_distributed(["train-cfg"])
    from pipeline.train_cfg import run

    run()


@main.command("evaluate")
@friendly_errors
def evaluate() -> None:
    """Score every milestone checkpoint and sample from it."""
    from pipeline.evaluate import run

    run()


@main.command("evaluate-fluency")
@friendly_errors
def evaluate_fluency() -> None:
    """Fluent and on topic: the diffusion model's samples on held-out dev/test prompts, judged by an
    independent n-gram model, beside real text, the prompt echoed and AR samples."""
    from pipeline.fluency import run

    run()


@main.command("report")
@friendly_errors
def report() -> None:
    """Render reports/report.html and reports/report.md."""
    from pipeline.report import run

    run()
