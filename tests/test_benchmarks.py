"""benchmarks/bench_train.py runs end to end in --quick mode (it prints figures; nothing is judged here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.bench_loader import load_benchmark


@pytest.fixture(scope="module")
def bench():
    yield from load_benchmark("bench_train")


@pytest.mark.timeout(60)
def test_quick_run_writes_every_row(bench, tmp_path, capsys):
    out = tmp_path / "bench" / "train.json"
    report = bench.main(["--quick", "--threads", "1", "--json", str(out)])

    data = json.loads(out.read_text())
    assert data["training"] == json.loads(json.dumps(report["training"]))
    rows = data["training"]
    assert {(r["name"], r["precision"], r["threads"]) for r in rows} == {
        (name, precision, 1)
        for name in ("stage0/nano", "stage1/nano", "stage2/nano", "stage3/nano", "stage0-plain/nano", "cfg/nano",
                     "gpt/nano")
        for precision in ("fp32", "bf16")
    }
    for r in rows:
        assert r["tokens_per_s"] > 0, r["name"]
        assert r["flops_per_token"] > 6 * r["matmul_parameters"]
        assert len(r["step_s"]) == 2
    assert {r["reference"] for r in rows if r["model"] != "gpt"} == {"gpt/nano"}
    later = {r["name"]: r for r in rows if r["stage_reference"]}
    assert set(later) == {"stage1/nano", "stage2/nano", "stage3/nano", "stage0-plain/nano"}
    assert {r["stage_reference"] for r in later.values()} == {"stage0/nano"}
    # the rows really are different models: TEMPORAL adds parameters, plain stage 0 drops MU's
    params = {r["name"]: r["parameters"] for r in rows}
    assert params["stage1/nano"] > params["stage0/nano"] > params["stage0-plain/nano"]
    assert set(data["matmul_peak_gflops"]["1"]) >= {"fp32", "bf16"}
    assert data["memory"] == []
    printed = capsys.readouterr().out
    assert "matmul peak" in printed and "stage0/nano" in printed and "vs GPT" in printed and "vs stage0" in printed


def test_plain_gpt_counts_tied_head_once(bench):
    shape = bench.Shape(n_layer=2, n_head=2, d_model=32, d_ff=64, vocab_size=50, seq_len=16)
    model = bench.PlainGPT(shape)
    per_block = 4 * 32 * 32 + 2 * 32 * 64 + 2 * 32  # qkv + proj, MLP, two LayerNorm weights
    # wpe is a lookup table (excluded); wte is the tied head's matmul (counted once); ln_f
    assert bench.matmul_parameters(model) == 2 * per_block + 50 * 32 + 32


SHAKESPEARE = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_shakespeare.py"


@pytest.mark.timeout(120)
def test_shakespeare_benchmark_trains_and_scores_in_bits_per_byte(tmp_path, capsys):
    import math

    spec = importlib.util.spec_from_file_location("bench_shakespeare", SHAKESPEARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "shakespeare.json"
    report = module.main(["--seconds", "3", "--max-documents", "300", "--eval-tokens", "1500", "--threads", "1",
                          "--calibration-steps", "2", "--data", str(tmp_path / "data"), "--json", str(out)])

    assert json.loads(out.read_text())["val_bpb"] == report["val_bpb"]
    assert report["steps"] >= 1 and report["val_tokens"] >= 1500
    # it learned something: below the uniform guess over its vocabulary
    assert report["val_loss_per_token"] < math.log(report["config"]["vocab_size"])
    assert report["val_bpb"] == pytest.approx(report["val_loss_per_token"] / math.log(2) / report["bytes_per_token"])
    assert report["val_nats_per_char"] == pytest.approx(report["val_bpb"] * math.log(2))
    assert report["config"]["stage"] == 0
    printed = capsys.readouterr().out
    assert "bits per byte" in printed and "nanoGPT" in printed and "2.71" in printed


def test_block_reveal_splits_on_topic_by_how_often_the_word_is_a_training_target():
    bench = next(load_benchmark("bench_block_reveal"))
    counts = {"dog": 30, "cat": 7, "crop": 2}
    words = ["dog", "dog", "cat", "crop", "crop", "needle"]
    hits = [True, True, True, False, True, False]
    rows = bench.on_topic_by_target_count(words, hits, counts)
    assert rows == [{"pairs": "0", "samples": 1, "on_topic": 0.0},
                    {"pairs": "1-4", "samples": 2, "on_topic": 0.5},
                    {"pairs": "5-19", "samples": 1, "on_topic": 1.0},
                    {"pairs": "20+", "samples": 2, "on_topic": 1.0}]
    assert sum(r["samples"] for r in bench.on_topic_by_target_count(words, hits, {})) == len(words)
    with pytest.raises(ValueError, match="6 words but 5"):
        bench.on_topic_by_target_count(words, hits[:5], counts)


def test_block_reveal_distinct_2_reads_what_the_judge_reads_and_falls_for_samples_that_say_the_same():
    bench = next(load_benchmark("bench_block_reveal"))
    varied = ["the dog ran to the park", "a cat sat on a warm mat"]
    same = ["the dog ran to the park", "the dog ran to the park"]
    assert bench.distinct_2(varied, max_words=40) == 1.0
    assert bench.distinct_2(same, max_words=40) == 0.5
    # only the first max_words words count: the tails differ, the judged openings do not
    tails = ["the dog ran home", "the dog ran away"]
    assert bench.distinct_2(tails, max_words=3) == 0.5 < bench.distinct_2(tails, max_words=4)


def test_block_reveal_draft_acceptance_is_the_overlap_of_draft_and_conditional():
    from tests.test_block_diffusion import ar_model, block_model

    bench = next(load_benchmark("bench_block_reveal"))
    model = block_model(ar_model(), 2)
    prompt = torch.randint(2, 40, (4, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt, dtype=torch.bool)

    def rates(top_p, seed=0):
        return bench.draft_acceptance(model, prompt, mask, seq_len=12, top_p=top_p,
                                      generator=torch.Generator().manual_seed(seed))

    got = rates(0.9)
    assert got.shape == (6, 4) and bool(((got >= 0) & (got <= 1 + 1e-9)).all())
    torch.testing.assert_close(got, rates(0.9))  # seeded
    # a nucleus of one token: draft and conditional are one-hot, so a block either agrees or not
    greedy = rates(1e-9)
    assert set(greedy.flatten().round(decimals=6).tolist()) <= {0.0, 1.0}
    # the draft sees a [MASK] where the conditional sees the drawn token: a random network's two
    # distributions differ, so the overlap is below 1 (a draft equal to the conditional would give 1)
    assert float(got.mean()) < 0.99
    with pytest.raises(ValueError, match="blocks of 2"):
        bench.draft_acceptance(block_model(ar_model(), 4), prompt, mask, seq_len=12, top_p=0.9,
                               generator=torch.Generator())
