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
    assert [r["name"] for r in rows] == ["ar/kv-cache/b1", "ar/kv-cache/b2"] + [
        f"{o}/{s}/b{b}" for o in ("masked", "continuous") for s in ("ddim", "ddpm") for b in (1, 2)
    ]
    assert data["sampling"]["num_steps"] == 4 and data["sampling"]["seq_len"] == 16
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["seconds"] > 0, r["name"]
        assert r["judge_ppl"] is None  # untrained models are not judged
    ar = {r["batch"]: r["tokens_per_s"] for r in rows if r["objective"] == "autoregressive"}
    # batched the same way on both sides: each row against the AR row of its own batch size
    assert all(r["vs_ar"] == pytest.approx(r["tokens_per_s"] / ar[r["batch"]]) for r in rows)
    assert [r["name"] for r in report["training"]] == ["cfg/nano", "stage0/nano"]
    assert all(r["tokens_per_s"] > 0 for r in report["training"])
    printed = capsys.readouterr().out
    assert "ar/kv-cache/b2" in printed and "masked/ddpm/b2" in printed and "denoiser / AR stage 0" in printed


def test_trained_rows_are_judged_by_the_ngram_judge_not_a_model(bench, tmp_path):
    import random

    rng = random.Random(0)
    words = "the dog cat ran saw a big red ball and sun happy little girl boy park".split()
    story = lambda: " ".join(rng.choice(words) for _ in range(60)) + "."  # noqa: E731
    for split, n in (("train", 300), ("val", 120)):
        lines = [json.dumps({"prompt": "Write a story", "text": story(), "target": "dog", "template": "t"})
                 for _ in range(n)]
        (tmp_path / f"pairs_{split}.jsonl").write_text("\n".join(lines) + "\n")
    fluency = type("F", (), {"judge_order": 3, "max_words": 40})()
    judge = bench.fit_ngram_judge(tmp_path, fluency, seed=0)
    got = bench.judged(judge, [story(), "ball ball ball ball ball ball ball ball ball ball ball ball ball ball"])
    assert got["judge_ppl"] is not None and 0.0 <= got["fluent_share"] <= 0.5  # the loop is never fluent
    assert bench.fit_ngram_judge(tmp_path / "missing", fluency, seed=0) is None
    assert bench.judged(None, ["text"]) == {"judge_ppl": None, "fluent_share": None}
