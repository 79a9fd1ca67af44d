"""The summary on top of the report: each model's best checkpoint, the measured checklist, the
judge that scored the samples, the headline component row and what to do next. A reader who
stops here should know whether the run worked."""

from __future__ import annotations

from typing import Any

from sunfish.report import html as H
from sunfish.report import markdown as M
from sunfish.report.access import as_dict, as_list, best_milestone, component_rows, models_of
from sunfish.report.fmt import DASH, fixed, pct, value, verdict
from sunfish.report.sections_components import components_table
from sunfish.report.table import Cell, Table

BOUND_NOTE = ("≤: the diffusion model's figures are its ELBO, an upper bound on its negative log-likelihood, "
              "over the opening of each validation text (train.seq_len tokens) given its prompt; the "
              "autoregressive figures are exact. The "
              "unconditional bound over whole documents, beside the AR model's exact figure on the same "
              "tokens, is in the fluency section.")


HALVES_NOTE = ("Chosen on dev data, reported on test data: the validation split is scored in two halves; "
               "the first half and samples drawn apart from the ones shown chose the best step, and every "
               "Val figure here is the second half's.")


def judge_text(judge: Any) -> str:
    j = as_dict(judge)
    cal = as_dict(j.get("calibration"))
    if not j.get("kind") or not cal:
        return "No judge: no sample was judged, so \"coherent sentences\" and \"word variety\" are n/a."
    real, shuffled, rand = as_dict(cal.get("real")), as_dict(cal.get("shuffled")), as_dict(cal.get("random_words"))
    return (f"Samples are judged by an order-{j.get('order')} {j.get('kind')} model fitted on {j.get('fit_on')}, "
            "independent of every model it judges. A sample is fluent when its perplexity is at most "
            f"{fixed(cal.get('threshold'), 1)} (the 90th percentile of real held-out texts of {cal.get('max_words')} "
            "words) and it is as varied as real text. Reference rows: real held-out text "
            f"{pct(real.get('fluent_share'))} fluent, its words shuffled {pct(shuffled.get('fluent_share'))}, "
            f"random words {pct(rand.get('fluent_share'))}.")


def _bound(model: dict, cell: str) -> str:
    """A likelihood cell, marked "≤ " when it is a diffusion model's bound rather than an exact figure."""
    return f"≤ {cell}" if as_dict(model).get("kind") == "diffusion" and cell != DASH else cell


def best_table(models: dict, names: list[str]) -> Table:
    rows: list[list[Any]] = []
    for name in names:
        model = as_dict(models.get(name))
        if not model:
            rows.append([Cell(name, strong=True), DASH, Cell("did not run", css="na")] + [DASH] * 5)
            continue
        best = as_dict(model.get("best"))
        m = best_milestone(model) or {}
        items = [as_dict(i) for i in as_list(model.get("checklist"))]
        measured = [i for i in items if i.get("passed") is not None]
        passed = [i for i in measured if i.get("passed") is True]
        unmeasured = len(items) - len(measured)
        rows.append([
            Cell(name, strong=True),
            model.get("kind") or DASH,
            model.get("description") or "",
            best.get("step") if best.get("step") is not None else m.get("step", DASH),
            _bound(model, fixed(m.get("val_loss"))),
            _bound(model, fixed(m.get("val_ppl"), 2)),
            _bound(model, fixed(m.get("val_bpb"))),
            Cell(f"{len(passed)}/{len(measured)}", note=f"({unmeasured} n/a)" if unmeasured > 0 else ""),
        ])
    columns = ["Model", "Kind", "Description", "Best step", "Val loss", "Val ppl", "Val bpb", "Checklist passed"]
    return Table(columns, rows, title="Best checkpoint per model", num=(3, 4, 5, 6), note=HALVES_NOTE)


def _rules(models: dict, names: list[str]) -> list[tuple[str, str]]:
    """(label, rule) of each best-checkpoint rule, naming its models when they do not all share one."""
    rules: dict[str, list[str]] = {}
    for name in names:
        rule = as_dict(as_dict(models.get(name)).get("best")).get("rule")
        if rule:
            rules.setdefault(str(rule), []).append(name)
    return [("Best-checkpoint rule" + ("" if len(rules) == 1 else f" ({', '.join(who)})"), rule)
            for rule, who in rules.items()]


def _checklist_items(models: dict, names: list[str]) -> list[tuple[str, str]]:
    """(item name, criterion) in order of first appearance across models."""
    seen: dict[str, str] = {}
    for name in names:
        for item in as_list(as_dict(models.get(name)).get("checklist")):
            item = as_dict(item)
            key = str(item.get("name", "?"))
            if key not in seen or not seen[key]:
                seen[key] = str(item.get("criterion") or "")
    return list(seen.items())


def _find_item(model: dict, name: str) -> dict | None:
    for item in as_list(model.get("checklist")):
        if isinstance(item, dict) and str(item.get("name", "?")) == name:
            return item
    return None


def _verdict_cell(item: dict) -> Cell:
    """The verdict over the value it was decided on, and the step it was measured at."""
    css, label = verdict(item.get("passed"))
    shown, step = "", ""
    if item.get("value") is not None:
        shown = value(item.get("value"))
        step = f"step {item.get('step')}" if item.get("step") is not None else ""
        if step and step in shown:  # the value already names its steps
            step = ""
    html = (f'<span class="{css}">{label}</span>' + (f"<br>{H.esc(shown)}" if shown else "")
            + (f'<br><span class="muted">{H.esc(step)}</span>' if step else ""))
    md = label + (f": {M.esc(shown)}" if shown else "") + (f" ({M.esc(step)})" if step else "")
    return Cell(label, html=html, md=md)


def checklist_table(models: dict, names: list[str]) -> Table:
    ran = [n for n in names if as_dict(models.get(n))]
    rows = []
    for item_name, criterion in _checklist_items(models, names):
        row: list[Any] = [Cell(item_name, strong=True), criterion]
        for n in ran:
            item = _find_item(as_dict(models.get(n)), item_name)
            row.append(Cell(DASH, css="na") if item is None else _verdict_cell(item))
        rows.append(row)
    return Table(["Item", "Criterion"] + ran, rows, title="Checklist (measured)", css="checklist",
                 empty="No checklist was computed.")


def _next_steps(s: dict) -> list[Any]:
    return [x for x in as_list(s.get("next_steps")) if x is not None]


def _has_diffusion(models: dict, names: list[str]) -> bool:
    return any(as_dict(models.get(n)).get("kind") == "diffusion" for n in names)


def to_html(s: dict) -> str:
    models, names = models_of(s)
    out = []
    if not names:
        out.append(H.muted("No model results in this summary."))
    else:
        out.append(H.table(best_table(models, names)))
        if _has_diffusion(models, names):
            out.append(H.muted(BOUND_NOTE))
        out += [H.rule(label, rule) for label, rule in _rules(models, names)]
        out.append(H.table(checklist_table(models, names)))
        out.append(H.rule("Judge", judge_text(s.get("judge")), anchor="judge"))
    if component_rows(s, True):
        out.append(H.table(components_table(component_rows(s, True), title="What each component adds")))
    out.append("<h3>What to do next</h3>")
    steps = _next_steps(s)
    if steps:
        out.append("<ol>" + "".join(f"<li>{H.esc(x)}</li>" for x in steps) + "</ol>")
    else:
        out.append(H.muted("No suggestions."))
    return H.section("summary", "Summary", out)


def to_markdown(s: dict) -> list[str]:
    models, names = models_of(s)
    out = ["## Summary", ""]
    if names:
        out += M.table(best_table(models, names))
        if _has_diffusion(models, names):
            out += [f"> {M.esc(BOUND_NOTE)}", ""]
        for label, rule in _rules(models, names):
            out += [f"> **{M.esc(label)}:** {M.esc(rule)}", ""]
        out += M.table(checklist_table(models, names))
        out += [f"> **Judge:** {M.esc(judge_text(s.get('judge')))}", ""]
    else:
        out += ["No model results in this summary.", ""]
    if component_rows(s, True):
        out += M.table(components_table(component_rows(s, True), title="What each component adds"))
    out += ["### What to do next", ""]
    out += [f"{i}. {M.esc(x)}" for i, x in enumerate(_next_steps(s), 1)] or ["No suggestions."]
    return out + [""]
