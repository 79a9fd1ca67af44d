"""One tiny `dvc repro` per test session: the end-to-end modules each work on a copy of it."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_baseline(tmp_path_factory) -> Path:
    """The project in a fresh git repo with the TINY profile, reproduced once and committed.

    Do not modify it: take a copy (tests.e2e.test_pipeline.copy_repo). The pipeline's fixed cost is
    about 8 s per stage (interpreter, torch and MLflow imports, DVC), so a second baseline would add
    minutes to the suite for nothing.
    """
    from tests.e2e.test_pipeline import tiny_repo

    repo = tmp_path_factory.mktemp("sunfish-tiny-baseline")
    proc = tiny_repo(repo)
    assert "Running stage 'report'" in proc.stdout
    return repo
