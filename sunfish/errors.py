"""The errors a user sees: each one is answered by the `sunfish` command (and the pipeline stages)
with one line and an exit code instead of a traceback.

They live here, apart from the code that raises them, so that any module can raise or catch them
without importing the command line or a heavy subsystem (torch): importing this module is free.
``UsageProblem``, ``CheckpointError`` and ``CorpusError`` end a command with exit code 2;
``TrainingInterrupted`` (a requested stop) with 128 + the signal; ``NonFiniteLoss`` with 1.
``sunfish.config.ParamsError`` (exit 2) stays with the configuration it validates.
"""

from __future__ import annotations

import signal
from pathlib import Path

__all__ = ["CheckpointError", "CorpusError", "NonFiniteLoss", "TrainingInterrupted", "UsageProblem"]


class UsageProblem(ValueError):
    """A request that cannot be served as asked (conflicting flags, wrong model kind)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and why."""


class CorpusError(ValueError):
    """A corpus that cannot be loaded; the message names the file or source and the remedy."""


class NonFiniteLoss(RuntimeError):
    pass


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived: the step in flight finished and a resume checkpoint was written."""

    mlflow_status = "KILLED"

    def __init__(self, step: int, signum: int, checkpoint: Path | None):
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        where = f"resume state saved in {checkpoint}" if checkpoint else "no resume state (checkpoints disabled)"
        super().__init__(
            f"training stopped by {signal.Signals(signum).name} after step {step}; {where}. "
            "Run the same command again (or `dvc repro`) to continue from there."
        )

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)
