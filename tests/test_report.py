"""The report renderer: a realistic summary renders to parseable HTML and Markdown with every part."""

from __future__ import annotations

import copy
import html
import math
import re
from html.parser import HTMLParser

import pytest

from sunfish.evaluation.checklist import BEST_RULE, best_checkpoint, checklist
from sunfish.evaluation.components import component_deltas
from sunfish.evaluation.judge import JUDGE_RULE
from sunfish.evaluation.text_quality import wilson_interval
from sunfish.report import render_html, render_markdown, write_report
from sunfish.report.svg import line_chart, nice_ticks

NASTY = 'Tom said "<script>alert(1)</script>" & left | ok\n# not a heading *bold* `code`'

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class StrictParser(HTMLParser):
    """Collects tags and checks that every non-void element is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: dict[str, int] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {self.stack[-3:]}")
            if tag in self.stack:
                while self.stack and self.stack.pop() != tag:
                    pass
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(doc: str) -> StrictParser:
    p = StrictParser()
    p.feed(doc)
    p.close()
    return p


def _curve(steps, start, end):
    return [start + (end - start) * (1 - math.exp(-3 * s / steps[-1])) for s in steps]


def _model(name: str, kind: str, final_loss: float, guidance: bool = False) -> dict:
    train_steps = list(range(10, 310, 10))
    train = [
        {"step": s, "loss": loss, "lr": 1e-3, "tokens_per_s": 2500.0}
        for s, loss in zip(train_steps, _curve(train_steps, 8.3, final_loss - 0.1))
    ]
    val = [
        {"step": s, "loss": loss, "ppl": math.exp(loss), "bpb": loss / math.log(2) / 3.9}
        for s, loss in zip([100, 200, 300], [final_loss + 0.8, final_loss + 0.2, final_loss])
    ]
    milestones = []
    for i, v in enumerate(val):
        step = v["step"]
        m = {
            "step": step,
            "checkpoint": f"models/{name}/step_{step}",
            "val_loss": v["loss"],
            "val_ppl": v["ppl"],
            "val_bpb": v["bpb"],
            "tokens": 40960,
            "samples": [
                {"prompt": "Once upon a time", "text": f"{name} s{step}: there was a little cat who liked to play."},
                {"prompt": "The capital of India is", "text": NASTY if (i == 2 and name == "stage_0") else f"a big city {step}"},
            ],
            "quality": {
                "real_word_share": (0.7, 0.85, 0.95)[i],
                "distinct_1": 0.5 + 0.05 * i,
                "distinct_2": 0.6 + 0.1 * i,
                "repetition_rate": 0.2 - 0.05 * i,
                "bigram_share": 0.4 + 0.15 * i,
                "judge_ppl": (140.0, 70.0, 42.5)[i],
                "fluent_share": (0.0, 1 / 3, 2 / 3)[i],
                "varied_share": 1.0,
            },
        }
        if guidance:
            rows = []
            for w, k in ((0.0, 1), (1.0, 3), (3.0, 5), (7.0, 6)):
                n = 8
                lo, hi = wilson_interval(k, n)
                rows.append(
                    {
                        "scale": w,
                        "adherence": k / n,
                        "n": n,
                        "ci": [lo, hi],
                        "quality": {"real_word_share": 0.9 - 0.02 * w, "distinct_2": 0.8 - 0.05 * w, "repetition_rate": 0.01 * w,
                                    "judge_ppl": 300.0 - 20 * w},
                        "samples": [
                            {"prompt": "a story about a dog", "text": f"the dog ran w={w}", "adherent": k > 2},
                            {"prompt": "", "text": f"null prompt sample w={w}", "adherent": False},
                        ],
                    }
                )
            m["guidance"] = rows
        milestones.append(m)
    best = best_checkpoint(milestones)
    return {
        "kind": kind,
        "description": f"{name} description",
        "curves": {"train": train, "val": val},
        "tokens_per_s": 2500.0,
        "train_seconds": 321.5,
        "milestones": milestones,
        "best": {"step": best, "rule": BEST_RULE},
        "checklist": checklist(milestones, kind=kind, step=milestones[-1]["step"], real_fluent_share=0.84),
        "is_control": name.startswith("control_"),
    }


def make_summary() -> dict:
    models = {
        "stage_0": _model("stage_0", "staged", 2.4),
        "stage_1": _model("stage_1", "staged", 2.1),
        "stage_2": _model("stage_2", "staged", 1.9),
        "stage_3": None,  # did not run
        "control_1": _model("control_1", "staged", 2.15),
        "cfg": _model("cfg", "diffusion", 3.2, guidance=True),
    }
    for i, m in enumerate(models["control_1"]["milestones"]):
        m["samples"] = [{"prompt": "Once upon a time", "text": f"CONTROL SAMPLE {i}"}]
    return {
        "title": "SunFish <test> report",
        "generated_at": "2024-05-01T12:00:00+00:00",
        "git_commit": "abc1234",
        "params": {"train.max_steps": 300, "train.lr": 0.001, "eval.prompts": ["Once upon a time"], "cfg.self_conditioning": False},
        "mlflow": {
            "tracking_uri": "sqlite:///mlflow.db",
            "experiment": "sunfish",
            "runs": {"prepare": "r0", "stage_0": "run_stage0_id", "cfg": "run_cfg_id"},
        },
        "data": {
            "source": "tinystories",
            "vocab_size": 4096,
            "splits": {
                "train": {"documents": 900, "bytes": 800000, "tokens": 205000, "bytes_per_token": 3.9},
                "val": {"documents": 100, "bytes": 90000, "tokens": 23000, "bytes_per_token": 3.91},
            },
            "pairs": {"train": 900, "val": 100},
        },
        "diagnose": {
            "status": "warn",
            "checks": [
                {"name": "initial loss", "status": "ok", "value": 8.31, "threshold": 0.25, "message": "close to ln(V)"},
                {"name": "memorize one batch", "status": "warn", "value": 0.4, "threshold": 0.1, "message": "slow <overfit>"},
            ],
        },
        "models": models,
        "judge": {"kind": "word-level interpolated Kneser-Ney", "order": 3, "fit_on": "900 train documents",
                  "rule": JUDGE_RULE,
                  "calibration": {"threshold": 37.25, "max_words": 40, "real": {"fluent_share": 0.84},
                                  "shuffled": {"fluent_share": 0.0}, "random_words": {"fluent_share": 0.0}}},
        "components": component_deltas(models),
        "stage_comparison": [
            {"model": "stage_0", "val_bpb": 0.89, "delta_bpb_vs_previous": None, "tokens_per_s": 2500.0},
            {"model": "stage_1", "val_bpb": 0.78, "delta_bpb_vs_previous": -0.11, "tokens_per_s": 2300.0},
            {"model": "control_1", "val_bpb": 0.80, "delta_bpb_vs_previous": -0.09, "tokens_per_s": 2400.0, "control": True},
        ],
        "next_steps": ["Train stage_3 longer", "Raise guidance scale <maybe>"],
    }


@pytest.fixture()
def summary() -> dict:
    return make_summary()


def test_html_has_every_part_and_parses(summary):
    doc = render_html(summary)
    p = parse(doc)
    assert not p.errors, p.errors[:5]
    assert p.stack == [], p.stack
    text = "".join(p.text)

    # self-contained: no external resources (links to an MLflow server are not resources)
    assert not re.search(r"""src\s*=\s*["']?(https?:)?//""", doc)
    assert "<link" not in doc and "<script" not in doc.replace("&lt;script", "")
    assert p.tags.get("style") == 1

    # plots: 2 per model with curves (5 models, the control included) + 3 guidance charts
    assert p.tags.get("svg", 0) == 5 * 2 + 3
    assert "polyline" in p.tags

    # summary on top: checklist with measured values, best checkpoint, rule, next steps
    assert doc.index('id="summary"') < doc.index('id="curves"')
    assert "Checklist" in text
    for item in ("loss below 2.0", "real words", "word variety", "phrases forming", "prompts have an effect", "coherent sentences"):
        assert item in text
    s2 = summary["models"]["stage_2"]
    loss_item = next(i for i in s2["checklist"] if i["name"] == "loss below 2.0")
    assert loss_item["passed"] is True
    assert f"{loss_item['value']:.4g}" in text
    assert BEST_RULE in text
    assert "Train stage_3 longer" in text and "Raise guidance scale <maybe>" in text
    assert "did not run" in text

    # samples per milestone: columns per step, rows per prompt, text escaped
    assert "step 100" in text and "step 200" in text and "step 300" in text
    assert "stage_1 s200: there was a little cat" in text
    assert NASTY.split("\n")[0] in text  # round-trips through the parser as text
    assert "<script>alert" not in doc

    # guidance curve and its table
    assert "prompt adherence" in text
    assert "guidance scale w" in text
    assert "w = 7" in text and "null prompt sample w=3.0" in text
    # the guidance bar's verdict under the table (adherence 6/8 at best: not met)
    assert "The bar (one guidance scale with adherence >= 80%" in text and "not met; nearest w = 7" in text

    # stage comparison, diagnose, data, mlflow
    assert "-0.110" in text
    assert "memorize one batch" in text and "slow <overfit>" in text
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in text
    assert "run_stage0_id" in text and "run_cfg_id" in text
    assert "tinystories" in text
    assert "train.max_steps" in text


def test_markdown_has_the_same_content(summary):
    md = render_markdown(summary)
    assert md.startswith("# SunFish &lt;test&gt; report")
    for needle in (
        "## Summary",
        "### Checklist (measured)",
        "loss below 2.0",
        "prompts have an effect",
        "## Loss and perplexity curves",
        "## Stage comparison",
        "## Prompt adherence vs guidance",
        "not met; nearest w = 7: adherence 75% (missed)",
        "## Samples per milestone",
        "## Diagnostics",
        "## MLflow runs",
        "mlflow ui --backend-store-uri sqlite:///mlflow.db",
        "run_stage0_id",
        "Train stage_3 longer",
        "step 300",
    ):
        assert needle in md, needle
    assert "<script>" not in md and "&lt;script&gt;" in md
    # table rows keep their column count although a sample contains "|" and a newline
    for block in re.findall(r"(?:^\|.*\|$\n?)+", md, flags=re.M):
        rows = [r for r in block.strip().split("\n")]
        counts = {len(re.findall(r"(?<!\\)\|", r)) for r in rows}
        assert len(counts) == 1, rows[:3]


def _variants(summary):
    """The summary with one key removed or set to None at a time (top level, model, milestone)."""
    yield {}
    yield {"models": None}
    yield {"models": {"stage_0": {}}}
    for key in list(summary):
        for replacement in (None, "garbage"):
            v = copy.deepcopy(summary)
            v[key] = replacement
            yield v
        v = copy.deepcopy(summary)
        del v[key]
        yield v
    for key in summary["models"]["cfg"]:
        v = copy.deepcopy(summary)
        v["models"]["cfg"][key] = None
        yield v
    for key in summary["models"]["cfg"]["milestones"][0]:
        v = copy.deepcopy(summary)
        for m in v["models"]["cfg"]["milestones"]:
            m[key] = None
        yield v
    for key in summary["models"]["cfg"]["milestones"][0]["guidance"][0]:
        v = copy.deepcopy(summary)
        for r in v["models"]["cfg"]["milestones"][-1]["guidance"]:
            r[key] = None
        yield v
    v = copy.deepcopy(summary)
    v["models"]["stage_0"]["curves"]["val"][0]["loss"] = float("nan")
    v["models"]["stage_0"]["curves"]["train"][0]["loss"] = float("inf")
    v["models"]["stage_0"]["milestones"][0]["step"] = None
    yield v


def test_partial_summaries_never_crash(summary):
    for v in _variants(summary):
        doc = render_html(v)
        p = parse(doc)
        assert not p.errors and not p.stack, (p.errors[:3], p.stack)
        assert isinstance(render_markdown(v), str)


def test_write_report(tmp_path, summary):
    html_path, md_path = write_report(summary, tmp_path / "out" / "report.html", tmp_path / "out" / "report.md")
    assert html_path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert "## Summary" in md_path.read_text(encoding="utf-8")


def test_line_chart_basics():
    svg = line_chart(
        {"train <loss>": [(0, 3.0), (10, 2.0), (20, 1.5)], "val": [(10, 2.2, 2.0, 2.4), (20, float("nan"))]},
        title='A & "B"',
        x_label="step",
        y_label="loss",
    )
    p = parse(svg)
    assert not p.errors and not p.stack
    assert p.tags["svg"] == 1 and p.tags["polyline"] == 1  # val has one finite point: marker only
    text = "".join(p.text)
    assert 'A & "B"' in text and "train <loss>" in text and "step" in text
    assert "<loss>" not in svg


def test_line_chart_log_and_empty():
    svg = line_chart({"ppl": [(1, 1000.0), (2, 100.0), (3, 10.0), (4, -1.0)]}, log_y=True, title="ppl")
    p = parse(svg)
    assert not p.errors
    labels = "".join(p.text)
    assert "10" in labels and "100" in labels and "1000" in labels
    empty = line_chart({"x": []}, title="nothing")
    assert "no data" in empty
    single = line_chart({"x": [(5, 5)]})
    assert "<circle" in single


def test_nice_ticks():
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(0, 300, target=6) == pytest.approx([0, 50, 100, 150, 200, 250, 300])
    t = nice_ticks(1.37, 8.3)
    assert t[0] >= 1.37 and t[-1] <= 8.3 and len(t) >= 3


def test_judge_components_and_controls(summary):
    doc = render_html(summary)
    text = "".join(parse(doc).text)
    summary_part = doc[doc.index('id="summary"') : doc.index('id="curves"')]
    # the judge is described with its calibration on real text and the trivial rows beside it
    judge_text = html.unescape(summary_part)
    assert "independent of every model it judges" in judge_text and "37.2" in judge_text
    assert "real held-out text 84% fluent" in judge_text and "shuffled 0%" in judge_text
    # the diffusion model's likelihood is marked as a bound, the AR figures are not
    best_rows = judge_text[judge_text.index("Best checkpoint per model"):]
    assert "≤ " in best_rows and "ELBO, an upper bound" in best_rows
    assert best_rows.count("≤ ") == 3  # loss, ppl and bpb of the one diffusion model
    coherent = next(i for i in summary["models"]["stage_2"]["checklist"] if i["name"] == "coherent sentences")
    assert coherent["value"] == 2 / 3 and coherent["passed"] is True and "84%" in coherent["criterion"]
    # what each component adds: in the summary (headline row) and under the stage comparison (every step)
    temporal = [r for r in summary["components"] if r["component"] == "TEMPORAL"]
    assert len(temporal) == 3 and temporal[-1]["final"]
    assert "What each component adds" in summary_part and f"{temporal[-1]['delta_bpb']:+.4f}" in summary_part
    comparison = doc[doc.index('id="comparison"') : doc.index('id="guidance"')]
    for row in temporal:
        assert f"{row['delta_bpb']:+.4f}" in comparison
    assert "not measured" in comparison  # K-1 and graph routing have no control here
    # controls: in the stage table and the curves, never as a sample section
    assert "control_1" in comparison and "(control)" in comparison
    assert "CONTROL SAMPLE" not in text
    # judge perplexity beside adherence at every guidance scale, and per milestone under the samples
    guidance = doc[doc.index('id="guidance"') : doc.index('id="samples"')]
    assert "judge perplexity" in guidance and "Judge ppl" in guidance and "160.0" in guidance  # w=7: 300 - 140
    assert "judge ppl" in doc[doc.index('id="samples"') :]
    md = render_markdown(summary)
    assert "### What each component adds" in md and "Judge ppl" in md and "Kneser-Ney" in md
    assert "CONTROL SAMPLE" not in md and "control_1 (control)" in md


def test_mlflow_run_links_only_for_a_server(summary):
    assert 'href="http' not in render_html(summary)  # sqlite store: ids only
    summary["mlflow"]["tracking_uri"] = "http://127.0.0.1:5000/"
    doc = render_html(summary)
    assert 'href="http://127.0.0.1:5000/#/runs/run_stage0_id"' in doc
    assert "(http://127.0.0.1:5000/#/runs/run_cfg_id)" in render_markdown(summary)


def test_next_steps_follow_the_measurements(summary):
    from pipeline.report import next_steps

    summary["components"] = [{"component": "K-1", "stage": "stage_2", "final": True, "verdict": "hurts", "delta_bpb": 0.05}]
    tips = " ".join(next_steps(summary))
    assert "K-1 made stage_2 worse than its control" in tips and "+0.0500" in tips
    assert "control_1: not yet met" not in tips  # controls are yardsticks, not models to improve
    assert "try dvc exp run" not in tips  # adherence alone (the copy head's doing) suggests nothing
    for m in summary["models"]["cfg"]["milestones"]:
        for g in m["guidance"]:  # fluent and on topic, on the dev prompts: w = 3 is best
            g["fluent_on_topic"] = {0.0: 0.0, 1.0: 0.25, 3.0: 0.5, 7.0: 0.125}[g["scale"]]
        m["guidance_test"] = [{**g, "fluent_on_topic": 1.0 if g["scale"] == 7.0 else 0.0} for g in m["guidance"]]
    tips = " ".join(next_steps(summary))
    assert "try dvc exp run -S sampling.guidance_scale=3" in tips and "(50%)" in tips  # chosen on dev, not test
    for m in summary["models"]["cfg"]["milestones"]:
        for g in m["guidance"]:
            g["fluent_on_topic"] = 0.0
    assert "No guidance scale made more samples fluent and on topic" in " ".join(next_steps(summary))


def test_the_report_opens_with_the_answer(summary):
    """The card: the best non-control AR model by held-out bpb, one of its samples, the diffusion
    model in one sentence; each line says what is missing instead of inventing a figure."""
    from sunfish.report import sections_headline

    summary["models"]["control_1"]["milestones"][-1]["val_bpb"] = 0.01  # a control never wins
    name, _, m = sections_headline.best_language_model(summary)
    assert name == "stage_2" and m["step"] == summary["models"]["stage_2"]["best"]["step"]
    summary["fluency"] = {"headline": {"guidance_scale": 1.0, "fluent_on_topic": 0.53, "fluent_on_topic_w0": 0.03,
                                       "real_fluent_on_topic": 0.86, "implied_fluent_on_topic": 0.02,
                                       "fluent": 0.75, "ar_fluent": 0.39},
                          "rows": [{"set": "test", "name": "diffusion", "n": 64}]}
    md = render_markdown(summary)
    card = md[md.index("## At a glance"):md.index("## Fluent and on topic")]
    assert "stage_2 at step" in card and "bits per byte on 40,960 held-out tokens" in card
    assert "**It writes:**" in card
    assert "53% of 64 held-out test prompts at guidance 1 (3% with the prompt dropped, 86% for the real stories)" in card
    assert "most likely of" not in card  # no best-of-k rows measured: no sentence about them
    summary["fluency"]["headline"].update(best_of_k=4, best_of_k_fluent_on_topic=0.7)
    card = render_markdown(summary)
    assert "Keeping its own most likely of 4 samples (k times the compute) gives 70%." in card
    assert md.index("## At a glance") < md.index("## Summary")
    html = render_html(summary)
    assert html.index('id="glance"') < html.index('id="fluency"')
    empty = sections_headline.lines({})
    assert empty[0][1].startswith("No autoregressive model") and "not measured" in empty[-1][1]


def test_diagnostics_show_warnings_and_failures_and_count_the_rest(summary):
    md = render_markdown(summary)
    diag = md[md.index("## Diagnostics"):]
    assert "memorize one batch" in diag and "initial loss" not in diag
    assert "1 more check passed" in diag
    for c in summary["diagnose"]["checks"]:
        c["status"] = "ok"
    assert "Every check passed (2)." in render_markdown(summary)


def test_the_best_checkpoint_table_says_it_reports_the_test_half(summary):
    assert "every Val figure here is the second half's" in render_markdown(summary)
