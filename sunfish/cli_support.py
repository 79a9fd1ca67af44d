"""Checks and look-ups behind the `sunfish` command, apart from its option declarations.

sunfish/cli.py declares the commands; what they share (model names, the device, the tracking store,
the figures of an export's model card) lives here so the command module stays short. Importing this
module is as cheap as importing the command line: torch, mlflow and the config schema load inside
the functions that need them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sunfish.errors import UsageProblem

# sunfish.config's MODEL_NAMES + CONTROL_NAMES, spelled out so that declaring the options imports no
# schema; tests/test_cli_options.py fails when the two drift apart.
KNOWN_MODELS = ("stage_0", "stage_1", "stage_2", "stage_3", "cfg", "control_1", "control_2", "control_3")
DEVICES = "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps"


def check_model(name: str, also: tuple[str, ...] | set[str] = ()) -> str:
    """``name`` when it is a model of this project (or one of ``also``), else one line naming the known ones."""
    known = (*KNOWN_MODELS, *sorted(set(also) - set(KNOWN_MODELS)))
    if name not in known:
        raise UsageProblem(f"unknown model {name!r}; known models: {', '.join(known)}")
    return name


def resolve_device(name: str) -> str:
    """The torch device a ``--device`` value means on this machine; refuses one it does not have.

    A device that is not there would otherwise surface as a CUDA error deep in loading the weights.
    """
    import torch

    text = name.strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageProblem(f"--device {name!r} is not a device; use {DEVICES}") from None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageProblem(f"--device {name}: no CUDA device on this machine (torch {torch.__version__}); "
                               "use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageProblem(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return str(device)
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageProblem(f"--device {name}: no Apple MPS device on this machine; use --device cpu or auto")
        return "mps"
    raise UsageProblem(f"--device {name}: SunFish runs on cpu, cuda or mps, not {device.type}")


def project_tracking(uri: str | None) -> tuple[str, str]:
    """The MLflow store and experiment this project logs to (``uri`` first), as the stages find them."""
    from sunfish.tracking import repo_root, tracking_uri

    configured, experiment = None, "sunfish"
    if Path("params.yaml").exists():
        try:
            from sunfish.config import load_params

            t = load_params(Path("params.yaml")).tracking
            configured, experiment = t.uri, t.experiment
        except Exception:  # a broken params.yaml must not stop reading results
            pass
    return uri or tracking_uri(repo_root(), configured), experiment


def existing_store(uri: str) -> str:
    """``uri`` when its store exists (or is a server); a command that only reads must not create one."""
    from sunfish.tracking import missing_store

    gone = missing_store(uri)
    if gone is not None:
        raise UsageProblem(f"no MLflow store at {gone}: run the command inside a SunFish project that has run "
                           "the pipeline, or name the store with --uri (or MLFLOW_TRACKING_URI)")
    return uri


def milestone_metrics(directory: Path, meta: dict[str, Any]) -> tuple[dict[str, Any], Path] | None:
    """The evaluate stage's figures for this checkpoint (its model, its step) from the enclosing
    project's reports/milestones.json, for the model card; None outside a project or unevaluated."""
    start = Path(directory).resolve()
    found = next((p / "reports" / "milestones.json" for p in (start, *start.parents)
                  if (p / "reports" / "milestones.json").is_file()), None)
    if found is None:
        return None
    try:
        model = json.loads(found.read_text(encoding="utf-8"))["models"][meta.get("model_name")]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    entry = next((m for m in model.get("milestones") or [] if m.get("step") == meta.get("step")), None)
    if entry is None:
        return None
    quality = entry.get("quality") or {}
    figures = {"val_bpb": entry.get("val_bpb"), "val_loss": entry.get("val_loss"),
               "judge_ppl": quality.get("judge_ppl"), "fluent_share": quality.get("fluent_share"),
               "best_milestone_step": (model.get("best") or {}).get("step")}
    return {k: v for k, v in figures.items() if v is not None}, found
