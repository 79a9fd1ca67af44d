"""Resume checkpoints: everything needed to continue a run as if it had never stopped.

A resume checkpoint is a normal checkpoint directory (safetensors weights + config.json) with one
more file, ``trainer.pt``: optimizer state, the CPU/CUDA RNG states of every rank, the data
sampler's generator state, the step reached and the curves so far. It holds only tensors and plain
containers, so it loads with ``torch.load(weights_only=True)`` and cannot run code.

Whether a saved state may be continued is decided by a *fingerprint*: the model configuration,
every training setting that changes the trajectory, and identities of the data and of the starting
weights. ``max_steps`` and ``milestones`` are left out on purpose: "train to 10K, then continue to
20K" is a resume (the cosine schedule is recomputed for the new target). Anything else that differs
starts a fresh run, and the reason names the setting and both values.

A process killed at any moment (``kill -9``, power loss) never leaves a damaged directory under a
``step_<N>`` name: checkpoints are written to a hidden temporary and renamed, and old ones are
renamed to a hidden name before they are deleted. :meth:`ResumeCheckpoints.find` also checks the
weights against their recorded sha256 and falls back to the previous checkpoint when the newest is
damaged, and sweeps the hidden leftovers of processes that no longer run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sunfish.config import ResolvedTraining
from sunfish.training.checkpoint import (
    CONFIG,
    WEIGHTS,
    CheckpointError,
    load_weights,
    save_checkpoint,
    verify_weights,
)

log = logging.getLogger(__name__)

TRAINER_FILE = "trainer.pt"
RESUME_FORMAT = 1
# hidden siblings a writer leaves behind when killed: .step_N.tmp-PID (being written),
# .step_N.old-PID (being replaced), .step_N.del-PID (being deleted)
_LEFTOVER = re.compile(r"^\.step_\d+\.(?:tmp|old|del)-(\d+)$")
# settings that do not change what the model learns from the steps already taken
NOT_IN_FINGERPRINT = frozenset({
    "model", "max_steps", "milestones", "eval_every", "eval_batches", "log_every", "threads", "device",
    "compile", "checkpoint_every", "keep_checkpoints", "resume", "max_nonfinite_steps", "nproc_per_node",
})


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file (identity of the data or of the weights a run starts from)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def fingerprint(model_config: dict[str, Any], tcfg: ResolvedTraining, **identities: str) -> dict[str, str]:
    fp = {f"model.{k}": json.dumps(v, sort_keys=True) for k, v in sorted(model_config.items())}
    fp.update({f"train.{k}": json.dumps(v) for k, v in tcfg.model_dump().items() if k not in NOT_IN_FINGERPRINT})
    fp.update({k: str(v) for k, v in identities.items()})
    return fp


def differences(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "(absent)"), current.get(key, "(absent)")
        if a != b:
            out.append(f"{key}: {a} -> {b}")
    return out


@dataclass
class ResumePoint:
    directory: Path
    step: int
    state: dict[str, Any]


class ResumeCheckpoints:
    """The rolling set of resume checkpoints of one model under ``directory`` (step_<N>/ each)."""

    def __init__(self, directory: Path, *, keep: int, fingerprint: dict[str, str], model_name: str,
                 tokenizer_file: Path | None = None):
        self.directory = Path(directory)
        self.keep = max(1, keep)
        self.fingerprint = fingerprint
        self.model_name = model_name
        self.tokenizer_file = tokenizer_file

    def steps(self) -> list[tuple[int, Path]]:
        out = []
        if self.directory.is_dir():
            for child in self.directory.iterdir():
                if child.is_dir() and child.name.startswith("step_") and (child / TRAINER_FILE).exists():
                    try:
                        out.append((int(child.name[5:]), child))
                    except ValueError:
                        continue
        return sorted(out)

    def save(self, model: torch.nn.Module, state: dict[str, Any], step: int, extra: dict | None = None) -> Path:
        state = {**state, "format": RESUME_FORMAT, "fingerprint": self.fingerprint, "step": int(step)}
        target = save_checkpoint(
            self.directory / f"step_{step}", model, model_name=self.model_name, step=step,
            tokenizer_file=self.tokenizer_file, extra={"resume": True, **(extra or {})},
            extra_files={TRAINER_FILE: lambda path: torch.save(state, path)},
        )
        for _, old in self.steps()[: -self.keep]:
            _remove_dir(old)
        return target

    def sweep(self) -> list[Path]:
        """Delete the hidden temporaries of writers that were killed (their process is gone)."""
        removed = []
        if not self.directory.is_dir():
            return removed
        for child in self.directory.iterdir():
            match = _LEFTOVER.match(child.name)
            if match and child.is_dir() and not _pid_alive(int(match.group(1))):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
        return removed

    def find(self, max_steps: int) -> tuple[ResumePoint | None, str]:
        """The newest usable state, or None and the reason a fresh run starts."""
        for leftover in self.sweep():
            log.info("removed %s, left by an interrupted checkpoint write", leftover)
        candidates = self.steps()
        if not candidates:
            return None, "no resume checkpoint"
        for step, directory in reversed(candidates):
            try:
                state = torch.load(directory / TRAINER_FILE, map_location="cpu", weights_only=True)
            except Exception as exc:  # damaged or foreign file: try the previous one
                log.warning("skipping unreadable resume checkpoint %s: %s", directory / TRAINER_FILE, exc)
                continue
            try:
                if not (directory / WEIGHTS).is_file():
                    raise CheckpointError(f"{directory / WEIGHTS}: missing weights file")
                verify_weights(directory, _read_meta(directory))
            except CheckpointError as exc:
                log.warning("skipping damaged resume checkpoint %s: %s", directory, exc)
                continue
            if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
                log.warning("skipping %s: resume format %r, expected %d", directory, state.get("format")
                            if isinstance(state, dict) else None, RESUME_FORMAT)
                continue
            diff = differences(state.get("fingerprint", {}), self.fingerprint)
            if diff:
                return None, f"the saved state at step {step} was trained differently ({'; '.join(diff[:4])})"
            if step > max_steps:
                return None, f"the saved state is at step {step}, beyond max_steps={max_steps}"
            return ResumePoint(directory, step, state), f"resuming from step {step} ({directory})"
        return None, "every resume checkpoint was unreadable"

    def load_weights_into(self, model: torch.nn.Module, point: ResumePoint) -> None:
        state = load_weights(point.directory / WEIGHTS)
        meta = _read_meta(point.directory)
        verify_weights(point.directory, meta)
        for alias, source in (meta.get("tied_weights") or {}).items():
            if source in state:
                state[alias] = state[source]
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{point.directory}: weights do not fit the model ({str(exc)[:300]})") from None

    def clear(self) -> None:
        _remove_dir(self.directory)
        parent = self.directory.parent
        if parent.is_dir():  # what an earlier clear() that was killed left behind
            for child in parent.glob(f".{self.directory.name}.del-*"):
                pid = child.name.rsplit("-", 1)[-1]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    shutil.rmtree(child, ignore_errors=True)


def _read_meta(directory: Path) -> dict:
    try:
        meta = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory / CONFIG}: not a readable checkpoint config ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{directory / CONFIG}: expected a JSON object")
    return meta


def _remove_dir(path: Path) -> None:
    """Delete a directory so that no half-deleted tree is ever seen under its name: rename, then delete."""
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.del-{os.getpid()}")
    try:
        os.replace(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def fingerprint_id(fp: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


class RunStates:
    """``state/<model>/runs/<fingerprint id>/``: resume checkpoints and milestone mirrors per setting.

    Keyed by fingerprint so that an experiment with another learning rate never overwrites the
    state of the baseline: going back to the baseline and raising max_steps still resumes it.
    """

    FINGERPRINT = "fingerprint.json"

    def __init__(self, root: Path, keep_runs: int = 3):
        self.root = Path(root)
        self.keep_runs = keep_runs

    def run_dir(self, fp: dict[str, str]) -> Path:
        path = self.root / fingerprint_id(fp)
        path.mkdir(parents=True, exist_ok=True)
        (path / self.FINGERPRINT).write_text(json.dumps(fp, indent=1, sort_keys=True), encoding="utf-8")
        return path

    def others(self, fp: dict[str, str]) -> list[Path]:
        if not self.root.is_dir():
            return []
        mine = fingerprint_id(fp)
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name != mine and (p / self.FINGERPRINT).exists()]
        return sorted(found, key=lambda p: (p / self.FINGERPRINT).stat().st_mtime, reverse=True)

    def why_fresh(self, fp: dict[str, str]) -> str:
        """Name what differs from the most recent other run of this model, if there is one."""
        for other in self.others(fp):
            try:
                saved = json.loads((other / self.FINGERPRINT).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            diff = differences(saved, fp)
            return f"settings differ from the previous run ({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''})"
        return "no earlier run of this model"

    def prune(self, fp: dict[str, str]) -> None:
        for stale in self.others(fp)[max(0, self.keep_runs - 1):]:
            shutil.rmtree(stale, ignore_errors=True)
