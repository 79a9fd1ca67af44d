"""Samples per milestone: what each model wrote at each checkpoint, with the quality measures
under them, so that a reader can check the numbers against the text. Also the sample cells the
guidance section reuses."""

from __future__ import annotations

from typing import Any

from sunfish.report import html as H
from sunfish.report import markdown as M
from sunfish.report.access import as_dict, as_list, integer, is_control, milestones, models_of, step_label
from sunfish.report.fmt import DASH, fixed
from sunfish.report.table import Cell, Table

QUALITY_ROWS = (
    ("real_word_share", "real words"),
    ("bigram_share", "bigram share"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("repetition_rate", "repetition"),
    ("judge_ppl", "judge ppl"),
)


def samples_by_prompt(groups: list[dict]) -> tuple[list[str], dict[tuple[str, int], list[dict]]]:
    """Ordered prompts and {(prompt, group index): [sample, ...]}: a table of prompts against the
    groups (milestones, guidance scales) that sampled them."""
    prompts: list[str] = []
    cells: dict[tuple[str, int], list[dict]] = {}
    for i, group in enumerate(groups):
        for s in as_list(group.get("samples")):
            if not isinstance(s, dict):
                continue
            prompt = "" if s.get("prompt") is None else str(s.get("prompt"))
            if prompt not in prompts:
                prompts.append(prompt)
            cells.setdefault((prompt, i), []).append(s)
    return prompts, cells


def prompt_cell(prompt: str, missing: str) -> Cell:
    """The prompt, or ``missing`` in italics for the samples drawn without one."""
    if prompt:
        return Cell(prompt, css="prompt")
    return Cell(missing, html=f'<span class="prompt"><em>{H.esc(missing)}</em></span>', md=f"*{M.esc(missing)}*")


def sample_cell(samples: list[dict], adherence: bool = False) -> Cell:
    """Several samples in one cell; with ``adherence``, each marked by whether it followed its prompt."""
    if not samples:
        return Cell(DASH, css="na")
    html, md = [], []
    for smp in samples:
        css, mark = "", ""
        if adherence and smp.get("adherent") is not None:
            css, mark = ("pass", "✓ ") if smp.get("adherent") else ("fail", "✗ ")
        text = smp.get("text", "")
        mark_html = f'<span class="{css}">{mark}</span>' if mark else ""
        html.append(f'<div class="sample">{mark_html}{H.esc(text)}</div>')
        md.append(mark + M.esc(text))
    plain = "\n".join("" if smp.get("text") is None else str(smp.get("text")) for smp in samples)
    return Cell(plain, html="".join(html), md="<br>—<br>".join(md))


def _step_head(m: dict, best: bool) -> Cell:
    star = " ★ best" if best else ""
    loss = f"val loss {fixed(m.get('val_loss'))}"
    css = ' class="best"' if best else ""
    return Cell(f"{step_label(m)}{star}",
                html=f'<span{css}>{H.esc(step_label(m))}{star}</span><br><span class="muted">{H.esc(loss)}</span>',
                md=f"{M.esc(step_label(m))}{star} ({M.esc(loss)})")


def _model_table(model: dict, ms: list[dict]) -> tuple[Table, bool]:
    """The samples of one model, prompts against milestones, and whether any sample was recorded."""
    best_step = integer(as_dict(model.get("best")).get("step"))
    prompts, cells = samples_by_prompt(ms)
    best = [best_step is not None and integer(m.get("step")) == best_step for m in ms]
    columns: list[Any] = ["Prompt"] + [_step_head(m, b) for m, b in zip(ms, best)]
    rows: list[list[Any]] = [[prompt_cell(p, "(no prompt)")] + [sample_cell(cells.get((p, i), [])) for i in range(len(ms))]
                             for p in prompts]
    for key, label in QUALITY_ROWS:
        vals = [as_dict(m.get("quality")).get(key) for m in ms]
        if any(v is not None for v in vals):
            rows.append([Cell(label, css="muted", md=f"*{M.esc(label)}*")] + [fixed(v) for v in vals])
    return Table(columns, rows, css="samples"), bool(prompts)


def _sampled(s: dict) -> list[tuple[str, dict, list[dict]]]:
    """(name, model, milestones) of each model read for its samples (controls are not)."""
    models, names = models_of(s)
    out = []
    for name in names:
        model = as_dict(models.get(name))
        ms = milestones(model)
        if ms and not is_control(name, model):
            out.append((name, model, ms))
    return out


def to_html(s: dict) -> str:
    out = []
    for name, model, ms in _sampled(s):
        table, any_sample = _model_table(model, ms)
        out.append(f"<h3>{H.esc(name)}</h3>")
        if not any_sample:
            out.append(H.muted("No samples were recorded."))
        out.append(H.table(table))
    if not out:
        out.append(H.muted("No milestones in this summary."))
    return H.section("samples", "Samples per milestone", out)


def to_markdown(s: dict) -> list[str]:
    out = ["## Samples per milestone", ""]
    sampled = _sampled(s)
    for name, model, ms in sampled:
        out += [f"### {M.esc(name)}", ""] + M.table(_model_table(model, ms)[0])
    if not sampled:
        out += ["No milestones in this summary.", ""]
    return out
