"""benchmarks/bench_train.py runs end to end in --quick mode (it prints figures; nothing is judged here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.timeout(60)
def test_quick_run_writes_every_row(bench, tmp_path, capsys):
    out = tmp_path / "bench" / "train.json"
    report = bench.main(["--quick", "--threads", "1", "--json", str(out)])

    data = json.loads(out.read_text())
    assert data["training"] == json.loads(json.dumps(report["training"]))
    rows = data["training"]
    assert {(r["name"], r["precision"], r["threads"]) for r in rows} == {
        (name, precision, 1)
        for name in ("stage0/nano", "cfg/nano", "gpt/nano")
        for precision in ("fp32", "bf16")
    }
    for r in rows:
        assert r["tokens_per_s"] > 0, r["name"]
        assert r["flops_per_token"] > 6 * r["matmul_parameters"]
        assert len(r["step_s"]) == 2
    assert {r["reference"] for r in rows if r["model"] != "gpt"} == {"gpt/nano"}
    assert set(data["matmul_peak_gflops"]["1"]) >= {"fp32", "bf16"}
    assert data["memory"] == []
    printed = capsys.readouterr().out
    assert "matmul peak" in printed and "stage0/nano" in printed and "vs GPT" in printed


def test_plain_gpt_counts_tied_head_once(bench):
    shape = bench.Shape(n_layer=2, n_head=2, d_model=32, d_ff=64, vocab_size=50, seq_len=16)
    model = bench.PlainGPT(shape)
    per_block = 4 * 32 * 32 + 2 * 32 * 64 + 2 * 32  # qkv + proj, MLP, two LayerNorm weights
    # wpe is a lookup table (excluded); wte is the tied head's matmul (counted once); ln_f
    assert bench.matmul_parameters(model) == 2 * per_block + 50 * 32 + 32
