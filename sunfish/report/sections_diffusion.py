"""Prompt adherence against the guidance scale of the diffusion model.

Guidance trades fluency for adherence, so adherence is never shown alone: the sample quality and
the judge's perplexity sit beside it at every scale, and the guidance bar says in a sentence
whether one scale reaches both.
"""

from __future__ import annotations

from typing import Any

from sunfish.report import html as H
from sunfish.report import markdown as M
from sunfish.report.access import (as_dict, as_list, finite, guidance, guided_milestone, milestones, models_of, reported,
                                   set_label, step_label)
from sunfish.report.fmt import DASH, count, fixed, value
from sunfish.report.sections_samples import prompt_cell, sample_cell, samples_by_prompt
from sunfish.report.svg import line_chart
from sunfish.report.table import Cell, Table

_CHART_NOTE = ("Error bars: 95% Wilson interval of the adherence share. Judge perplexity: lower "
               "means the samples read more like real text to the independent n-gram judge.")


def bar_sentence(rows: list[dict]) -> str | None:
    """The guidance bar's verdict on one curve, in a sentence (sunfish.evaluation.guidance_bar)."""
    from sunfish.evaluation.guidance_bar import guidance_bar

    bar = guidance_bar(rows)
    if bar is None:
        return None
    word = {True: "met", False: "missed", None: "not measured"}
    marks = bar["marks"]
    gain = "–" if bar["gain"] is None else f"{bar['gain'] * 100:+.0f} points"
    ratio = "not compared" if bar["judge_ratio"] is None else f"{bar['judge_ratio']:.2f}x guidance 0's"
    detail = (f"w = {bar['scale']:g}: adherence {bar['adherence']:.0%} ({word[marks['adherence']]}), "
              f"{gain} over guidance 0 ({word[marks['gain']]}), judge perplexity {ratio} "
              f"({word[marks['fluency']]})")
    verdict = {True: f"met at {detail}", False: f"not met; nearest {detail}",
               None: f"not measured; best {detail}"}[bar["met"]]
    return f"The bar ({bar['rule']}): {verdict}."


def _swept(s: dict) -> list[tuple[str, dict, dict, list[dict]]]:
    """(name, model, the milestone shown, its reported curve) of each model with a guidance sweep."""
    models, names = models_of(s)
    out = []
    for name in names:
        model = as_dict(models.get(name))
        judged = guided_milestone(model)
        if judged is not None:
            out.append((name, model, judged, reported(judged)))
    return out


def _heading(name: str, judged: dict, rows: list[dict]) -> str:
    return f"{name} — {step_label(judged)}{set_label(rows)}"


def _ci(r: dict) -> Any:
    ci = as_list(r.get("ci"))
    text = f"[{fixed(ci[0])}, {fixed(ci[1])}]" if len(ci) == 2 else DASH
    return Cell(text, md=text)  # numbers only: the brackets need no Markdown escape


def _curve_table(rows: list[dict]) -> Table:
    body = []
    for r in rows:
        q = as_dict(r.get("quality"))
        body.append([value(r.get("scale")), fixed(r.get("adherence")), _ci(r), fixed(r.get("fluent_on_topic")),
                     count(r.get("n")), count(r.get("samples_per_prompt")), fixed(q.get("distinct_2")),
                     fixed(q.get("real_word_share")), fixed(q.get("repetition_rate")), fixed(q.get("judge_ppl"), 1)])
    # "& " starts no entity, so the raw Markdown keeps it unescaped and readable
    columns = ["Guidance w", "Adherence", Cell("95% CI", md="95% CI (Wilson)"),
               Cell("Fluent & on topic", md="Fluent & on topic"), "n", "Samples/prompt", "Distinct-2", "Real words",
               "Repetition", "Judge ppl"]
    return Table(columns, body, num=range(10))


def _samples_table(rows: list[dict]) -> Table | None:
    """Prompts against guidance scales; None when the sweep kept no samples."""
    prompts, cells = samples_by_prompt(rows)
    if not prompts:
        return None
    columns = ["Prompt"] + [f"w = {value(r.get('scale'))}" for r in rows]
    body = [[prompt_cell(p, "(null prompt)")] + [sample_cell(cells.get((p, i), []), adherence=True)
                                                 for i in range(len(rows))] for p in prompts]
    return Table(columns, body, css="samples")


def _charts(name: str, model: dict, judged: dict, rows: list[dict]) -> str:
    adherence = {}
    for m in milestones(model):
        pts = []
        for r in guidance(m):
            ci = as_list(r.get("ci"))
            if m is judged and len(ci) == 2:
                pts.append((r.get("scale"), r.get("adherence"), ci[0], ci[1]))
            else:
                pts.append((r.get("scale"), r.get("adherence")))
        if pts:
            adherence[f"adherence, {step_label(m)}"] = pts
    step = step_label(judged)
    charts = [
        line_chart(adherence, title=f"{name}: prompt adherence", x_label="guidance scale w",
                   y_label="share of samples following the prompt", y_min=0, y_max=1),
        line_chart({label: [(r.get("scale"), as_dict(r.get("quality")).get(key)) for r in rows]
                    for key, label in (("distinct_2", "distinct-2"), ("real_word_share", "real words"),
                                       ("repetition_rate", "repetition"))},
                   title=f"{name}: sample quality ({step})", x_label="guidance scale w", y_label="share",
                   y_min=0, y_max=1),
    ]
    judge = [(r.get("scale"), as_dict(r.get("quality")).get("judge_ppl")) for r in rows]
    if any(finite(v) is not None for _, v in judge):
        charts.append(line_chart({"judge ppl": judge}, title=f"{name}: judge perplexity ({step})",
                                 x_label="guidance scale w", y_label="perplexity under the judge", log_y=True))
    return f'<div class="charts">{"".join(charts)}</div>'


def to_html(s: dict) -> str:
    out = []
    for name, model, judged, rows in _swept(s):
        out.append(f"<h3>{H.esc(_heading(name, judged, rows))}</h3>")
        out += [_charts(name, model, judged, rows), H.muted(_CHART_NOTE), H.table(_curve_table(rows))]
        sentence = bar_sentence(rows)
        if sentence:
            out.append(f'<p class="bar">{H.esc(sentence)}</p>')
        samples = _samples_table(rows)
        if samples is not None:
            out.append(f"<details><summary>Samples per guidance scale</summary>{H.table(samples)}</details>")
    if not out:
        out.append(H.muted("No guidance sweep in this summary (only the diffusion model has one)."))
    return H.section("guidance", "Prompt adherence vs guidance", out)


def to_markdown(s: dict) -> list[str]:
    out = ["## Prompt adherence vs guidance", ""]
    swept = _swept(s)
    for name, _, judged, rows in swept:
        out += [f"### {M.esc(_heading(name, judged, rows))}", ""] + M.table(_curve_table(rows))
        sentence = bar_sentence(rows)
        if sentence:
            out += [M.esc(sentence), ""]
        samples = _samples_table(rows)
        if samples is not None:
            out += ["Samples per guidance scale (✓ = followed the prompt):", ""] + M.table(samples)
    if not swept:
        out += ["No guidance sweep in this summary (only the diffusion model has one).", ""]
    return out
