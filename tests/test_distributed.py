"""DistributedDataParallel through torchrun: 2 CPU processes on gloo equal one process, stop and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
pytestmark = pytest.mark.slow


def _run(tmp_path: Path, name: str, *args: str, nproc: int = 1) -> dict:
    out = tmp_path / f"{name}.json"
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([*launcher, str(SCRIPT), str(out), *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    single = _run(tmp_path, "single", str(tmp_path / "s1"))
    ddp = _run(tmp_path, "ddp", str(tmp_path / "s2"), nproc=2)
    assert ddp["world_size"] == 2
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-4)
    assert ddp["val"] == pytest.approx(single["val"], rel=1e-4)
    assert ddp["checksum"] == pytest.approx(single["checksum"], rel=1e-5)
    assert single["losses"][-1] < single["losses"][0]  # it learned something: the comparison is not vacuous


def test_sigterm_on_one_rank_stops_both_and_the_state_resumes_on_one_process(tmp_path):
    single = _run(tmp_path, "single", str(tmp_path / "s1"))
    state = str(tmp_path / "shared")
    stopped = _run(tmp_path, "stopped", state, "--stop-at", "3", nproc=2)
    assert stopped["stopped"] in (3, 4)  # the step in flight when the signal landed finishes first
    resumed = _run(tmp_path, "resumed", state, "--resume")
    assert resumed["losses"] == pytest.approx(single["losses"], rel=1e-4)
    assert resumed["checksum"] == pytest.approx(single["checksum"], rel=1e-5)
