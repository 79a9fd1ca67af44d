"""Log lines of the commands and pipeline stages: one format, level from SUNFISH_LOG_LEVEL (INFO)."""

from __future__ import annotations

import logging
import os

NOISY = ("alembic", "mlflow", "urllib3", "filelock", "httpx", "git")


def setup_logging() -> None:
    level = os.environ.get("SUNFISH_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
