"""benchmarks/bench_sampling.py runs end to end in --quick mode (it prints figures; nothing is judged here)."""

from __future__ import annotations

import json

import pytest

from tests.bench_loader import load_benchmark


@pytest.fixture(scope="module")
def bench():
    yield from load_benchmark("bench_sampling")


@pytest.mark.timeout(60)
def test_quick_run_measures_every_sampler_and_both_trainings(bench, tmp_path, capsys):
    out = tmp_path / "bench" / "sampling.json"
    report = bench.main(["--quick", "--json", str(out)])

    data = json.loads(out.read_text())
    rows = data["sampling"]["rows"]
    assert [r["name"] for r in rows] == ["ar/kv-cache"] + [
        f"{o}/{s}/b{b}" for o in ("masked", "continuous") for s in ("ddim", "ddpm") for b in (1, 2)
    ]
    assert data["sampling"]["num_steps"] == 4 and data["sampling"]["seq_len"] == 16
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["seconds"] > 0, r["name"]
        assert r["judge_ppl"] is None  # untrained models are not judged
    assert all(r["vs_ar"] == pytest.approx(r["tokens_per_s"] / rows[0]["tokens_per_s"]) for r in rows[1:])
    assert [r["name"] for r in report["training"]] == ["cfg/nano", "stage0/nano"]
    assert all(r["tokens_per_s"] > 0 for r in report["training"])
    printed = capsys.readouterr().out
    assert "ar/kv-cache" in printed and "masked/ddpm/b2" in printed and "denoiser / AR stage 0" in printed
