"""The Makefile's setup: the torch build is a variable, and an old Python is refused by name."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["make", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_torch_build_comes_from_the_named_index(tmp_path):
    venv = tmp_path / "venv"  # not built: -n only prints the commands
    default = _make("-n", "setup", f"VENV={venv}", f"PYTHON={sys.executable}").stdout
    chosen = _make("-n", "setup", f"VENV={venv}", f"PYTHON={sys.executable}",
                   "TORCH_INDEX=https://download.pytorch.org/whl/cpu").stdout
    torch_line = lambda out: next(line for line in out.splitlines() if '"torch==' in line)  # noqa: E731
    assert "--index-url" not in torch_line(default)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_line(chosen)


def test_an_old_python_is_refused_by_name(tmp_path):
    fake = tmp_path / "python3.10"
    fake.write_text(  # a Python that reports 3.10: runs the -c program with version_info replaced
        "#!/bin/sh\n"
        f'exec "{sys.executable}" -c "import sys; sys.version_info = (3, 10, 4, \'final\', 0); '
        'exec(compile(sys.argv[1], \'-c\', \'exec\'))" "$2"\n'
    )
    fake.chmod(0o755)
    old = _make("check-python", f"PYTHON={fake}")
    assert old.returncode != 0 and "needs Python 3.11 or newer" in old.stderr and "3.10" in old.stderr
    assert _make("check-python", f"PYTHON={sys.executable}").returncode == 0
