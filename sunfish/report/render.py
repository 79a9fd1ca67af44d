"""Render the pipeline summary as one self-contained HTML page and as Markdown.

The summary dict is described in sunfish/report/__init__.py. Any key may be missing or None (a
stage that did not run, no guidance sweep for the autoregressive models): each section renders
what exists and says what is missing, it never raises on a partial summary. All text coming from
the summary (samples in particular) is escaped.
"""

from __future__ import annotations

import html
import math
import re
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sunfish.evaluation.components import bpb_text
from sunfish.report.svg import line_chart

__all__ = ["render_html", "render_markdown", "write_report"]

_MODEL_ORDER = ("stage_0", "stage_1", "stage_2", "stage_3", "control_1", "control_2", "control_3", "cfg")
_QUALITY_ROWS = (
    ("real_word_share", "real words"),
    ("bigram_share", "bigram share"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("repetition_rate", "repetition"),
    ("judge_ppl", "judge ppl"),
)


# ----------------------------------------------------------------------------------------------
# tolerant access and formatting


def _d(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _l(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else []


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _finite(x: Any) -> float | None:
    v = _num(x)
    return v if v is not None and math.isfinite(v) else None


def _int(x: Any) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float) and math.isfinite(x) and x == int(x):
        return int(x)
    return None


def _f(x: Any, nd: int = 3) -> str:
    """Fixed decimals for numbers; a dash for anything missing."""
    v = _num(x)
    if v is None:
        return "–" if x is None else str(x)
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 1e5:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}"


def _count(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "–" if x is None else str(x)
    if not math.isfinite(v):
        return str(v)
    return f"{v:,.0f}" if v == int(v) else f"{v:,.1f}"


def _value(x: Any) -> str:
    """A checklist value or a parameter: numbers to 4 significant digits, dicts as k=v."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return ", ".join(f"{k}: {_value(v)}" for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in x) + "]"
    return str(x)


def _duration(seconds: Any) -> str:
    s = _finite(seconds)
    if s is None:
        return "–"
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _verdict(passed: Any) -> tuple[str, str]:
    """(css class, label) for a checklist result."""
    if passed is True:
        return "pass", "✓ pass"
    if passed is False:
        return "fail", "✗ fail"
    return "na", "– n/a"


def _model_names(models: dict) -> list[str]:
    known = [m for m in _MODEL_ORDER if m in models]
    return known + sorted((str(m) for m in models if m not in _MODEL_ORDER), key=str)


def _is_control(name: str, model: dict) -> bool:
    """Controls are measured for the component table, not read: no sample sections for them."""
    return model.get("is_control") is True or str(name).startswith("control_")


def _run_link(uri: Any, run_id: Any) -> str | None:
    """The MLflow UI address of a run when the tracking URI is a server (http/https), else None."""
    if not run_id or not isinstance(uri, str) or not re.match(r"https?://", uri):
        return None
    return f"{uri.rstrip('/')}/#/runs/{run_id}"


def _judge_text(judge: Any) -> str:
    j = _d(judge)
    cal = _d(j.get("calibration"))
    if not j.get("kind") or not cal:
        return "No judge: no sample was judged, so \"coherent sentences\" and \"word variety\" are n/a."
    real, shuffled, rand = _d(cal.get("real")), _d(cal.get("shuffled")), _d(cal.get("random_words"))
    return (f"Samples are judged by an order-{j.get('order')} {j.get('kind')} model fitted on {j.get('fit_on')}, "
            "independent of every model it judges. A sample is fluent when its perplexity is at most "
            f"{_f(cal.get('threshold'), 1)} (the 90th percentile of real held-out texts of {cal.get('max_words')} "
            "words) and it is as varied as real text. Reference rows: real held-out text "
            f"{_pct(real.get('fluent_share'))} fluent, its words shuffled {_pct(shuffled.get('fluent_share'))}, "
            f"random words {_pct(rand.get('fluent_share'))}.")


BOUND_NOTE = ("≤: the diffusion model's figures are its ELBO, an upper bound on its negative log-likelihood, "
              "over the opening of each validation text (train.seq_len tokens) given its prompt; the "
              "autoregressive figures are exact, over every validation token. The "
              "unconditional bound over whole documents, beside the AR model's exact figure on the same "
              "tokens, is in the fluency section.")


def _bound(model: dict, cell: str) -> str:
    """A likelihood cell, marked "≤ " when it is a diffusion model's bound rather than an exact figure."""
    return f"≤ {cell}" if _d(model).get("kind") == "diffusion" and cell != "–" else cell


def _pct(x: Any) -> str:
    v = _finite(x)
    return "–" if v is None else f"{v:.0%}"


def _component_rows(s: dict, final_only: bool) -> list[dict]:
    rows = [_d(r) for r in _l(s.get("components")) if isinstance(r, dict)]
    return [r for r in rows if r.get("final")] if final_only else rows


def _milestones(model: dict) -> list[dict]:
    ms = [m for m in _l(model.get("milestones")) if isinstance(m, dict)]
    return sorted(ms, key=lambda m: (_int(m.get("step")) is None, _int(m.get("step")) or 0))


def _best_milestone(model: dict) -> dict | None:
    ms = _milestones(model)
    step = _int(_d(model.get("best")).get("step"))
    for m in ms:
        if step is not None and _int(m.get("step")) == step:
            return m
    return ms[-1] if ms else None


def _guided_milestone(model: dict) -> dict | None:
    """The milestone whose guidance sweep the report shows: the best one, else the latest swept."""
    best = _best_milestone(model)
    if best is not None and _guidance(best):
        return best
    swept = [m for m in _milestones(model) if _guidance(m)]
    return swept[-1] if swept else None


def _guidance(m: dict | None, key: str = "guidance") -> list[dict]:
    rows = [r for r in _l(_d(m).get(key)) if isinstance(r, dict) and _finite(r.get("scale")) is not None]
    return sorted(rows, key=lambda r: _finite(r.get("scale")))


def _set_label(rows: list[dict]) -> str:
    sets = {r.get("prompt_set") for r in rows} - {None}
    return " (test prompts; dev prompts chose the milestone)" if sets == {"test"} else ""


def _reported(m: dict | None) -> list[dict]:
    """The curve a milestone reports: on the test prompts when it has one (dev prompts chose it)."""
    return _guidance(m, "guidance_test") or _guidance(m)


def _checklist_rows(models: dict, names: list[str]) -> list[tuple[str, str]]:
    """(item name, criterion) in order of first appearance across models."""
    seen: dict[str, str] = {}
    for name in names:
        for item in _l(_d(models.get(name)).get("checklist")):
            item = _d(item)
            key = str(item.get("name", "?"))
            if key not in seen or not seen[key]:
                seen[key] = str(item.get("criterion") or "")
    return list(seen.items())


def _find_item(model: dict, name: str) -> dict | None:
    for item in _l(model.get("checklist")):
        if isinstance(item, dict) and str(item.get("name", "?")) == name:
            return item
    return None


def _item_value(item: dict) -> tuple[str, str]:
    """(measured value text, "step N" text) of a checklist item; empty strings when absent."""
    if item.get("value") is None:
        return "", ""
    value = _value(item.get("value"))
    step = f"step {item.get('step')}" if item.get("step") is not None else ""
    if step and step in value:  # the value already names its steps
        step = ""
    return value, step


def _samples_by_prompt(milestones: list[dict], key: str = "samples") -> tuple[list[str], dict]:
    """Ordered prompts and {(prompt, step index): [text, ...]}."""
    prompts: list[str] = []
    cells: dict[tuple[str, int], list[dict]] = {}
    for i, m in enumerate(milestones):
        for s in _l(m.get(key)):
            if not isinstance(s, dict):
                continue
            prompt = "" if s.get("prompt") is None else str(s.get("prompt"))
            if prompt not in prompts:
                prompts.append(prompt)
            cells.setdefault((prompt, i), []).append(s)
    return prompts, cells


def _step_label(m: dict) -> str:
    step = m.get("step")
    return f"step {step}" if step is not None else "step ?"


def _loss_points(rows: Any, key: str) -> list[tuple[Any, Any]]:
    return [(r.get("step"), r.get(key)) for r in _l(rows) if isinstance(r, dict)]


# ----------------------------------------------------------------------------------------------
# HTML

_CSS = """
:root { --fg:#1d1d1f; --muted:#666; --line:#d9d9de; --bg-alt:#f6f6f8; --pass:#1a7f37; --fail:#c62828; --warn:#b26a00; }
* { box-sizing: border-box; }
body { margin:0; color:var(--fg); background:#fff; font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1180px; margin:0 auto; padding:24px 28px 64px; }
h1 { font-size:1.9rem; margin:0 0 4px; }
h2 { font-size:1.35rem; margin:40px 0 12px; padding-bottom:4px; border-bottom:2px solid var(--line); }
h3 { font-size:1.08rem; margin:24px 0 8px; }
p.meta, .muted { color:var(--muted); }
nav { margin:12px 0 0; font-size:.92rem; }
nav a { margin-right:14px; color:#0b5cad; text-decoration:none; }
nav a:hover { text-decoration:underline; }
table { border-collapse:collapse; margin:8px 0 16px; font-size:.9rem; }
th, td { border:1px solid var(--line); padding:5px 9px; text-align:left; vertical-align:top; }
th { background:var(--bg-alt); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tr:nth-child(even) td { background:#fcfcfd; }
.wrap { overflow-x:auto; }
.sample { white-space:pre-wrap; word-break:break-word; font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; min-width:220px; max-width:420px; }
.sample + .sample { border-top:1px dashed var(--line); margin-top:6px; padding-top:6px; }
.prompt { font-weight:600; }
.best { color:#0b5cad; font-weight:600; }
.pass { color:var(--pass); font-weight:600; }
.fail { color:var(--fail); font-weight:600; }
.na { color:var(--muted); }
.status-ok { color:var(--pass); font-weight:600; }
.status-warn { color:var(--warn); font-weight:600; }
.status-fail { color:var(--fail); font-weight:600; }
.charts { display:flex; flex-wrap:wrap; gap:16px; align-items:flex-start; }
.charts svg { max-width:100%; height:auto; border:1px solid var(--line); border-radius:4px; }
code, pre { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:.88rem; }
pre.cmd { background:var(--bg-alt); border:1px solid var(--line); padding:8px 12px; overflow-x:auto; }
.rule { background:var(--bg-alt); border-left:4px solid #0b5cad; padding:6px 12px; margin:8px 0; }
details summary { cursor:pointer; color:#0b5cad; }
footer { margin-top:48px; color:var(--muted); font-size:.85rem; }
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _table(header: list[str], rows: list[list[str]], *, cls: str = "", num_cols: Iterable[int] = ()) -> str:
    """An HTML table; header and cell strings are already HTML (escape before)."""
    nums = set(num_cols)

    def cell(tag: str, i: int, content: str) -> str:
        attr = ' class="num"' if i in nums else ""
        return f"<{tag}{attr}>{content}</{tag}>"

    table_attr = f' class="{cls}"' if cls else ""
    out = [f'<div class="wrap"><table{table_attr}><thead><tr>']
    out += [cell("th", i, h) for i, h in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _html_summary(s: dict, models: dict, names: list[str]) -> str:
    out = ['<section id="summary"><h2>Summary</h2>']
    if not names:
        out.append('<p class="muted">No model results in this summary.</p>')
    else:
        rows = []
        rules: dict[str, list[str]] = {}
        for name in names:
            model = _d(models.get(name))
            if not model:
                rows.append([f"<strong>{_e(name)}</strong>", "–", '<span class="na">did not run</span>'] + ["–"] * 5)
                continue
            best = _d(model.get("best"))
            m = _best_milestone(model) or {}
            items = [_d(i) for i in _l(model.get("checklist"))]
            measured = [i for i in items if i.get("passed") is not None]
            passed = [i for i in measured if i.get("passed") is True]
            rule = best.get("rule")
            if rule:
                rules.setdefault(str(rule), []).append(name)
            rows.append(
                [
                    f"<strong>{_e(name)}</strong>",
                    _e(model.get("kind") or "–"),
                    _e(model.get("description") or ""),
                    _e(best.get("step") if best.get("step") is not None else m.get("step", "–")),
                    _bound(model, _f(m.get("val_loss"))),
                    _bound(model, _f(m.get("val_ppl"), 2)),
                    _bound(model, _f(m.get("val_bpb"))),
                    f"{len(passed)}/{len(measured)}" + (f' <span class="muted">({len(items) - len(measured)} n/a)</span>' if len(items) > len(measured) else ""),
                ]
            )
        out.append("<h3>Best checkpoint per model</h3>")
        out.append(
            _table(
                ["Model", "Kind", "Description", "Best step", "Val loss", "Val ppl", "Val bpb", "Checklist passed"],
                rows,
                num_cols=(3, 4, 5, 6),
            )
        )
        if any(_d(models.get(n)).get("kind") == "diffusion" for n in names):
            out.append(f'<p class="muted">{_e(BOUND_NOTE)}</p>')
        for rule, who in rules.items():
            label = "Best-checkpoint rule" + ("" if len(rules) == 1 else f" ({', '.join(who)})")
            out.append(f'<p class="rule"><strong>{_e(label)}:</strong> {_e(rule)}</p>')

        items = _checklist_rows(models, names)
        out.append("<h3>Checklist (measured)</h3>")
        if items:
            ran = [n for n in names if _d(models.get(n))]
            header = ["Item", "Criterion"] + [_e(n) for n in ran]
            rows = []
            for item_name, criterion in items:
                row = [f"<strong>{_e(item_name)}</strong>", _e(criterion)]
                for n in ran:
                    item = _find_item(_d(models.get(n)), item_name)
                    if item is None:
                        row.append('<span class="na">–</span>')
                        continue
                    cls, label = _verdict(item.get("passed"))
                    value, step = _item_value(item)
                    value = f"<br>{_e(value)}" if value else ""
                    where = f'<br><span class="muted">{_e(step)}</span>' if step else ""
                    row.append(f'<span class="{cls}">{label}</span>{value}{where}')
                rows.append(row)
            out.append(_table(header, rows, cls="checklist"))
        else:
            out.append('<p class="muted">No checklist was computed.</p>')

    if names:
        out.append(f'<p class="rule" id="judge"><strong>Judge:</strong> {_e(_judge_text(s.get("judge")))}</p>')
    if _component_rows(s, True):
        out.append("<h3>What each component adds</h3>")
        out.append(_html_components_table(_component_rows(s, True)))
    steps = [x for x in _l(s.get("next_steps")) if x is not None]
    out.append("<h3>What to do next</h3>")
    if steps:
        out.append("<ol>" + "".join(f"<li>{_e(x)}</li>" for x in steps) + "</ol>")
    else:
        out.append('<p class="muted">No suggestions.</p>')
    out.append("</section>")
    return "".join(out)


def _html_curves(models: dict, names: list[str]) -> str:
    out = ['<section id="curves"><h2>Loss and perplexity curves</h2>']
    shown = 0
    for name in names:
        model = _d(models.get(name))
        curves = _d(model.get("curves"))
        train, val = curves.get("train"), curves.get("val")
        if not model or not (_l(train) or _l(val)):
            continue
        shown += 1
        out.append(f"<h3>{_e(name)}</h3>")
        if model.get("description"):
            out.append(f'<p class="muted">{_e(model.get("description"))}</p>')
        loss = line_chart(
            {"train loss": _loss_points(train, "loss"), "val loss": _loss_points(val, "loss")},
            title=f"{name}: loss",
            x_label="step",
            y_label="nats / token",
        )
        ppl_points = []
        for r in _l(val):
            r = _d(r)
            ppl = r.get("ppl")
            if ppl is None and _finite(r.get("loss")) is not None and r["loss"] < 700:
                ppl = math.exp(r["loss"])
            ppl_points.append((r.get("step"), ppl))
        train_ppl = []
        for r in _l(train):
            r = _d(r)
            v = _finite(r.get("loss"))
            train_ppl.append((r.get("step"), math.exp(v) if v is not None and v < 700 else None))
        ppl = line_chart(
            {"train ppl": train_ppl, "val ppl": ppl_points},
            title=f"{name}: perplexity",
            x_label="step",
            y_label="perplexity",
            log_y=True,
        )
        out.append(f'<div class="charts">{loss}{ppl}</div>')
        facts = []
        if model.get("tokens_per_s") is not None:
            facts.append(f"throughput {_count(model.get('tokens_per_s'))} tokens/s")
        if model.get("train_seconds") is not None:
            facts.append(f"training time {_duration(model.get('train_seconds'))}")
        if facts:
            out.append(f'<p class="muted">{_e(" · ".join(facts))}</p>')
    if not shown:
        out.append('<p class="muted">No training curves were recorded.</p>')
    out.append("</section>")
    return "".join(out)


_VERDICT_CLASS = {"helps": "pass", "hurts": "fail"}


COMPONENT_COLUMNS = ["Component", "Stage vs control", "Step", "Seeds", "Stage bpb", "Control bpb", "Δ bpb", "2 SE",
                     "Extra steps alone", "Verdict"]
_COMPONENT_NOTE = ("Δ = stage − control validation bits per byte (negative: the component helps). Seed rows: means over "
                   "staged.seeds runs from the same start (batch orders); a verdict needs |Δ| > 2 SE of the per-seed "
                   "differences and >= 0.001 bpb. "
                   "Milestone rows: one seed, whole split, no verdict. Extra steps alone: control − the previous stage.")


def _component_cells(
    r: dict, escape: Callable[[Any], str], strong: Callable[[str], str], verdict: Callable[[str], str]
) -> list[str]:
    """One component-table row; ``escape``/``strong``/``verdict`` give the HTML or Markdown form."""
    delta, se, extra = (_finite(r.get(k)) for k in ("delta_bpb", "se_bpb", "extra_steps_bpb"))
    moved = {True: " (beyond 2 SE)", False: " (within 2 SE)"}.get(r.get("extra_steps_measurable"), "")
    return [
        strong(escape(r.get("component", "?"))),
        escape(f"{r.get('stage', '?')} vs {r.get('control', '?')}"),
        escape(r.get("step") if r.get("step") is not None else "–"),
        escape(f"{r.get('stage_seeds', '–')} / {r.get('control_seeds', '–')}"),
        _f(r.get("stage_bpb"), 4),
        _f(r.get("control_bpb"), 4),
        "–" if delta is None else bpb_text(delta),
        "–" if se is None else bpb_text(2 * se)[1:],
        "–" if extra is None else escape(f"{extra:+.4f}{moved}"),
        verdict(str(r.get("verdict") or "–")),
    ]


def _html_components_table(rows: list[dict]) -> str:
    body = [_component_cells(r, _e, lambda x: f"<strong>{x}</strong>",
                             lambda v: f'<span class="{_VERDICT_CLASS.get(v, "na")}">{_e(v)}</span>') for r in rows]
    return _table(COMPONENT_COLUMNS, body, cls="components", num_cols=(2, 4, 5, 6, 7))


def _html_comparison(s: dict) -> str:
    rows = [_d(r) for r in _l(s.get("stage_comparison")) if isinstance(r, dict)]
    out = ['<section id="comparison"><h2>Stage comparison</h2>']
    if rows:
        body = []
        for r in rows:
            delta = _finite(r.get("delta_bpb_vs_previous"))
            dtxt = "–" if delta is None else f"{delta:+.3f}"
            model = _e(r.get("model", "?")) + (' <span class="muted">(control)</span>' if r.get("control") else "")
            body.append([model, _f(r.get("val_bpb")), dtxt, _count(r.get("tokens_per_s"))])
        out.append(_table(["Model", "Val bits/byte", "Δ bpb vs previous stage", "Tokens/s"], body, num_cols=(1, 2, 3)))
        out.append('<p class="muted">Lower bits per byte is better; a negative Δ means the model improved on the previous '
                   "stage. A control continues the previous stage for the same steps without the new component.</p>")
    else:
        out.append('<p class="muted">No stage comparison available.</p>')
    comps = _component_rows(s, False)
    out.append('<h3 id="components">What each component adds</h3>')
    if comps:
        out.append(_html_components_table(comps))
        out.append(f'<p class="muted">{_e(_COMPONENT_NOTE)}</p>')
    else:
        out.append('<p class="muted">No component comparison: the control models were not evaluated.</p>')
    out.append("</section>")
    return "".join(out)


def _bar_sentence(rows: list[dict]) -> str | None:
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


def _html_guidance(models: dict, names: list[str]) -> str:
    out = ['<section id="guidance"><h2>Prompt adherence vs guidance</h2>']
    shown = 0
    for name in names:
        model = _d(models.get(name))
        judged = _guided_milestone(model)
        if judged is None:
            continue
        shown += 1
        rows = _reported(judged)
        out.append(f"<h3>{_e(name)} — {_e(_step_label(judged))}{_e(_set_label(rows))}</h3>")
        adherence_series = {}
        for m in _milestones(model):
            g = _guidance(m)
            if not g:
                continue
            pts = []
            for r in g:
                ci = _l(r.get("ci"))
                if m is judged and len(ci) == 2:
                    pts.append((r.get("scale"), r.get("adherence"), ci[0], ci[1]))
                else:
                    pts.append((r.get("scale"), r.get("adherence")))
            adherence_series[f"adherence, {_step_label(m)}"] = pts
        chart_a = line_chart(
            adherence_series, title=f"{name}: prompt adherence", x_label="guidance scale w",
            y_label="share of samples following the prompt", y_min=0, y_max=1,
        )
        q_series = {
            "distinct-2": [(r.get("scale"), _d(r.get("quality")).get("distinct_2")) for r in rows],
            "real words": [(r.get("scale"), _d(r.get("quality")).get("real_word_share")) for r in rows],
            "repetition": [(r.get("scale"), _d(r.get("quality")).get("repetition_rate")) for r in rows],
        }
        chart_q = line_chart(
            q_series, title=f"{name}: sample quality ({_step_label(judged)})", x_label="guidance scale w",
            y_label="share", y_min=0, y_max=1,
        )
        charts = [chart_a, chart_q]
        judge_pts = [(r.get("scale"), _d(r.get("quality")).get("judge_ppl")) for r in rows]
        if any(_finite(v) is not None for _, v in judge_pts):
            charts.append(line_chart(
                {"judge ppl": judge_pts}, title=f"{name}: judge perplexity ({_step_label(judged)})",
                x_label="guidance scale w", y_label="perplexity under the judge", log_y=True,
            ))
        out.append(f'<div class="charts">{"".join(charts)}</div>')
        out.append('<p class="muted">Error bars: 95% Wilson interval of the adherence share. Judge perplexity: lower '
                   "means the samples read more like real text to the independent n-gram judge.</p>")
        body = []
        for r in rows:
            ci = _l(r.get("ci"))
            q = _d(r.get("quality"))
            body.append(
                [
                    _e(_value(r.get("scale"))),
                    _f(r.get("adherence")),
                    f"[{_f(ci[0])}, {_f(ci[1])}]" if len(ci) == 2 else "–",
                    _f(r.get("fluent_on_topic")),
                    _count(r.get("n")),
                    _count(r.get("samples_per_prompt")),
                    _f(q.get("distinct_2")),
                    _f(q.get("real_word_share")),
                    _f(q.get("repetition_rate")),
                    _f(q.get("judge_ppl"), 1),
                ]
            )
        out.append(
            _table(["Guidance w", "Adherence", "95% CI", "Fluent & on topic", "n", "Samples/prompt", "Distinct-2",
                    "Real words", "Repetition", "Judge ppl"], body, num_cols=range(10))
        )
        sentence = _bar_sentence(rows)
        if sentence:
            out.append(f'<p class="bar">{_e(sentence)}</p>')
        # samples per guidance scale: rows = prompts, columns = scales
        prompts: list[str] = []
        cells: dict[tuple[str, int], list[dict]] = {}
        for i, r in enumerate(rows):
            for smp in _l(r.get("samples")):
                if not isinstance(smp, dict):
                    continue
                p = "" if smp.get("prompt") is None else str(smp.get("prompt"))
                if p not in prompts:
                    prompts.append(p)
                cells.setdefault((p, i), []).append(smp)
        if prompts:
            header = ["Prompt"] + [f"w = {_e(_value(r.get('scale')))}" for r in rows]
            body = []
            for p in prompts:
                row = [f'<span class="prompt">{_e(p) or "<em>(null prompt)</em>"}</span>']
                for i in range(len(rows)):
                    row.append(_html_sample_cell(cells.get((p, i), []), adherence=True))
                body.append(row)
            out.append("<details><summary>Samples per guidance scale</summary>")
            out.append(_table(header, body, cls="samples"))
            out.append("</details>")
    if not shown:
        out.append('<p class="muted">No guidance sweep in this summary (only the diffusion model has one).</p>')
    out.append("</section>")
    return "".join(out)


def _html_sample_cell(samples: list[dict], adherence: bool = False) -> str:
    if not samples:
        return '<span class="na">–</span>'
    parts = []
    for smp in samples:
        mark = ""
        if adherence and smp.get("adherent") is not None:
            mark = '<span class="pass">✓ </span>' if smp.get("adherent") else '<span class="fail">✗ </span>'
        parts.append(f'<div class="sample">{mark}{_e(smp.get("text", ""))}</div>')
    return "".join(parts)


def _html_samples(models: dict, names: list[str]) -> str:
    out = ['<section id="samples"><h2>Samples per milestone</h2>']
    shown = 0
    for name in names:
        model = _d(models.get(name))
        if _is_control(name, model):
            continue
        ms = _milestones(model)
        prompts, cells = _samples_by_prompt(ms)
        if not ms:
            continue
        shown += 1
        best_step = _int(_d(model.get("best")).get("step"))
        out.append(f"<h3>{_e(name)}</h3>")
        header = ["Prompt"]
        for m in ms:
            cls = ' class="best"' if best_step is not None and _int(m.get("step")) == best_step else ""
            sub = f'<br><span class="muted">val loss {_f(m.get("val_loss"))}</span>'
            best = " ★ best" if cls else ""
            header.append(f"<span{cls}>{_e(_step_label(m))}{best}</span>{sub}")
        body = []
        for p in prompts:
            row = [f'<span class="prompt">{_e(p) or "<em>(no prompt)</em>"}</span>']
            for i in range(len(ms)):
                row.append(_html_sample_cell(cells.get((p, i), [])))
            body.append(row)
        for key, label in _QUALITY_ROWS:
            vals = [_d(m.get("quality")).get(key) for m in ms]
            if any(v is not None for v in vals):
                body.append([f'<span class="muted">{_e(label)}</span>'] + [_f(v) for v in vals])
        if not prompts:
            out.append('<p class="muted">No samples were recorded.</p>')
        out.append(_table(header, body, cls="samples"))
    if not shown:
        out.append('<p class="muted">No milestones in this summary.</p>')
    out.append("</section>")
    return "".join(out)


def _html_diagnose(s: dict) -> str:
    diag = _d(s.get("diagnose"))
    out = ['<section id="diagnose"><h2>Diagnostics</h2>']
    if not diag:
        out.append('<p class="muted">The diagnose stage did not run.</p></section>')
        return "".join(out)
    status = str(diag.get("status") or "unknown")
    out.append(f'<p>Overall status: <span class="status-{_e(status)}">{_e(status.upper())}</span></p>')
    rows = []
    for c in _l(diag.get("checks")):
        c = _d(c)
        st = str(c.get("status") or "?")
        rows.append(
            [
                _e(c.get("name", "?")),
                f'<span class="status-{_e(st)}">{_e(st)}</span>',
                _e(_value(c.get("value"))),
                _e(_value(c.get("threshold"))),
                _e(c.get("message") or ""),
            ]
        )
    if rows:
        out.append(_table(["Check", "Status", "Value", "Threshold", "Message"], rows))
    out.append("</section>")
    return "".join(out)


def _html_data(s: dict) -> str:
    data = _d(s.get("data"))
    out = ['<section id="data"><h2>Data</h2>']
    if not data:
        out.append('<p class="muted">No data description.</p></section>')
        return "".join(out)
    out.append(f"<p>Source: <code>{_e(data.get('source', '–'))}</code> · vocabulary {_count(data.get('vocab_size'))} tokens</p>")
    splits = _d(data.get("splits"))
    pairs = _d(data.get("pairs"))
    if splits:
        rows = []
        for split, info in splits.items():
            info = _d(info)
            rows.append(
                [
                    _e(split),
                    _count(info.get("documents")),
                    _count(info.get("bytes")),
                    _count(info.get("tokens")),
                    _f(info.get("bytes_per_token"), 2),
                    _count(pairs.get(split)),
                ]
            )
        out.append(_table(["Split", "Documents", "Bytes", "Tokens", "Bytes/token", "Prompt pairs"], rows, num_cols=range(1, 6)))
    out.append("</section>")
    return "".join(out)


def _mlflow_command(uri: Any) -> str:
    return f"mlflow ui --backend-store-uri {shlex.quote(str(uri))}" if uri else "mlflow ui"


def _html_mlflow(s: dict) -> str:
    ml = _d(s.get("mlflow"))
    out = ['<section id="mlflow"><h2>MLflow runs</h2>']
    if not ml:
        out.append('<p class="muted">Tracking was disabled or did not record runs.</p></section>')
        return "".join(out)
    out.append(f"<p>Tracking URI: <code>{_e(ml.get('tracking_uri') or '–')}</code> · experiment <code>{_e(ml.get('experiment') or '–')}</code></p>")
    out.append(f"<p>Open the UI:</p><pre class=\"cmd\">{_e(_mlflow_command(ml.get('tracking_uri')))}</pre>")
    runs = _d(ml.get("runs"))
    if runs:
        rows = []
        for k, v in runs.items():
            code = f"<code>{_e(v if v is not None else '–')}</code>"
            link = _run_link(ml.get("tracking_uri"), v)
            rows.append([_e(k), f'<a href="{_e(link)}">{code}</a>' if link else code])
        out.append(_table(["Stage", "Run id"], rows))
    out.append("</section>")
    return "".join(out)


def _html_params(s: dict) -> str:
    params = _d(s.get("params"))
    out = ['<section id="params"><h2>Parameters</h2>']
    if params:
        rows = [[f"<code>{_e(k)}</code>", _e(_value(params[k]))] for k in sorted(params, key=str)]
        out.append(f"<details><summary>{len(rows)} parameters</summary>{_table(['Key', 'Value'], rows)}</details>")
    else:
        out.append('<p class="muted">No parameters recorded.</p>')
    out.append("</section>")
    return "".join(out)


def _html_fluency(s: dict) -> str:
    from sunfish.report import fluency_section as fs

    fl = _d(s.get("fluency"))
    out = ['<section id="fluency"><h2>Fluent and on topic</h2>']
    if not fl.get("rows"):
        out.append('<p class="muted">No fluency measurement (stage fluency did not run).</p></section>')
        return "".join(out)
    out += [f"<p>{_e(t)}</p>" for t in fs.sentences(fl)]
    header, rows = fs.table(fl)
    out.append(_table([_e(h) for h in header], [[_e(c) for c in r] for r in rows], num_cols=range(2, len(header))))
    lk_header, lk_rows, lk_scope = fs.likelihood_table(fl)
    if lk_rows:
        out.append(f"<p>{_e(lk_scope)}</p>")
        out.append(_table([_e(h) for h in lk_header], [[_e(c) for c in r] for r in lk_rows], num_cols=range(2, 5)))
    ex = fs.examples(fl)
    if ex:
        out.append(_table(["row", "prompt", "sample"], [[_e(a), _e(b), _e(c)] for a, b, c in ex]))
    out.append("</section>")
    return "".join(out)


def render_html(summary: dict) -> str:
    """One self-contained HTML page (inline CSS and SVG, no external resources)."""
    s = _d(summary)
    models = _d(s.get("models"))
    names = _model_names(models)
    title = s.get("title") or "SunFish training report"
    meta = []
    if s.get("generated_at"):
        meta.append(f"generated {_e(s.get('generated_at'))}")
    if s.get("git_commit"):
        meta.append(f"commit <code>{_e(s.get('git_commit'))}</code>")
    if _d(s.get("data")).get("source"):
        meta.append(f"data <code>{_e(_d(s.get('data')).get('source'))}</code>")
    nav = [
        ("fluency", "Fluent and on topic"),
        ("summary", "Summary"),
        ("curves", "Curves"),
        ("comparison", "Stage comparison"),
        ("guidance", "Guidance"),
        ("samples", "Samples"),
        ("diagnose", "Diagnostics"),
        ("data", "Data"),
        ("mlflow", "MLflow"),
        ("params", "Parameters"),
    ]
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<header><h1>{_e(title)}</h1>",
        f'<p class="meta">{" · ".join(meta)}</p>' if meta else "",
        "<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in nav) + "</nav></header>",
    ]
    sections: list[Callable[[], str]] = [
        lambda: _html_fluency(s),
        lambda: _html_summary(s, models, names),
        lambda: _html_curves(models, names),
        lambda: _html_comparison(s),
        lambda: _html_guidance(models, names),
        lambda: _html_samples(models, names),
        lambda: _html_diagnose(s),
        lambda: _html_data(s),
        lambda: _html_mlflow(s),
        lambda: _html_params(s),
    ]
    body += [section() for section in sections]
    body.append(f"<footer>Generated by sunfish.report{(' · ' + _e(s.get('generated_at'))) if s.get('generated_at') else ''}</footer>")
    body.append("</main></body></html>\n")
    return "\n".join(x for x in body if x)


# ----------------------------------------------------------------------------------------------
# Markdown

# Markdown syntax characters; "_" only where it could open or close emphasis (not inside words,
# so that names such as stage_0 stay readable in the raw file).
_MD_SPECIAL = re.compile(r"([\\`*\[\]|#~]|(?<!\w)_|_(?!\w))")


def _m(x: Any) -> str:
    """Text safe inside a Markdown table cell or paragraph: HTML and Markdown syntax neutralised."""
    text = "" if x is None else str(x)
    text = html.escape(text, quote=False)
    text = _MD_SPECIAL.sub(r"\\\1", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("\n", "<br>")


def _code(x: Any) -> str:
    """Inline code span for identifiers (run ids, URIs); backticks, pipes and newlines removed."""
    text = re.sub(r"[`|\r\n]", "", str(x))
    return f"`{text}`" if text else "–"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c if c else " " for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_fluency(fl: dict) -> list[str]:
    from sunfish.report import fluency_section as fs

    out = ["## Fluent and on topic", ""]
    if not fl.get("rows"):
        return out + ["No fluency measurement (stage fluency did not run).", ""]
    for t in fs.sentences(fl):
        out += [_m(t), ""]
    header, rows = fs.table(fl)
    out += [_md_table([_m(h) for h in header], [[_m(c) for c in r] for r in rows]), ""]
    lk_header, lk_rows, lk_scope = fs.likelihood_table(fl)
    if lk_rows:
        out += [_m(lk_scope), "", _md_table([_m(h) for h in lk_header], [[_m(c) for c in r] for r in lk_rows]), ""]
    ex = fs.examples(fl)
    if ex:
        out += [_md_table(["row", "prompt", "sample"], [[_m(a), _m(b), _m(c)] for a, b, c in ex]), ""]
    return out


def render_markdown(summary: dict) -> str:
    """The same content as render_html, with tables instead of plots."""
    s = _d(summary)
    models = _d(s.get("models"))
    names = _model_names(models)
    out: list[str] = [f"# {_m(s.get('title') or 'SunFish training report')}", ""]
    meta = []
    if s.get("generated_at"):
        meta.append(f"generated {_m(s.get('generated_at'))}")
    if s.get("git_commit"):
        meta.append(f"commit {_code(s.get('git_commit'))}")
    if _d(s.get("data")).get("source"):
        meta.append(f"data {_m(_d(s.get('data')).get('source'))}")
    if meta:
        out += [" · ".join(meta), ""]

    out += _md_fluency(_d(s.get("fluency")))
    # summary
    out += ["## Summary", ""]
    if names:
        rows, rules = [], {}
        for name in names:
            model = _d(models.get(name))
            if not model:
                rows.append([f"**{_m(name)}**", "–", "did not run", "–", "–", "–", "–", "–"])
                continue
            best = _d(model.get("best"))
            m = _best_milestone(model) or {}
            items = [_d(i) for i in _l(model.get("checklist"))]
            measured = [i for i in items if i.get("passed") is not None]
            passed = [i for i in measured if i.get("passed") is True]
            if best.get("rule"):
                rules.setdefault(str(best["rule"]), []).append(name)
            rows.append(
                [
                    f"**{_m(name)}**",
                    _m(model.get("kind") or "–"),
                    _m(model.get("description") or ""),
                    _m(best.get("step") if best.get("step") is not None else m.get("step", "–")),
                    _bound(model, _f(m.get("val_loss"))),
                    _bound(model, _f(m.get("val_ppl"), 2)),
                    _bound(model, _f(m.get("val_bpb"))),
                    f"{len(passed)}/{len(measured)}" + (f" ({len(items) - len(measured)} n/a)" if len(items) > len(measured) else ""),
                ]
            )
        out += ["### Best checkpoint per model", ""]
        out += [_md_table(["Model", "Kind", "Description", "Best step", "Val loss", "Val ppl", "Val bpb", "Checklist passed"], rows), ""]
        if any(_d(models.get(n)).get("kind") == "diffusion" for n in names):
            out += [f"> {_m(BOUND_NOTE)}", ""]
        for rule, who in rules.items():
            label = "Best-checkpoint rule" + ("" if len(rules) == 1 else f" ({', '.join(who)})")
            out += [f"> **{_m(label)}:** {_m(rule)}", ""]
        items = _checklist_rows(models, names)
        out += ["### Checklist (measured)", ""]
        if items:
            ran = [n for n in names if _d(models.get(n))]
            rows = []
            for item_name, criterion in items:
                row = [f"**{_m(item_name)}**", _m(criterion)]
                for n in ran:
                    item = _find_item(_d(models.get(n)), item_name)
                    if item is None:
                        row.append("–")
                        continue
                    _, label = _verdict(item.get("passed"))
                    value, step = _item_value(item)
                    row.append(label + (f": {_m(value)}" if value else "") + (f" ({_m(step)})" if step else ""))
                rows.append(row)
            out += [_md_table(["Item", "Criterion"] + [_m(n) for n in ran], rows), ""]
        else:
            out += ["No checklist was computed.", ""]
        out += [f"> **Judge:** {_m(_judge_text(s.get('judge')))}", ""]
    else:
        out += ["No model results in this summary.", ""]
    if _component_rows(s, True):
        out += ["### What each component adds", "", _md_components_table(_component_rows(s, True)), ""]
    out += ["### What to do next", ""]
    steps = [x for x in _l(s.get("next_steps")) if x is not None]
    out += [f"{i}. {_m(x)}" for i, x in enumerate(steps, 1)] or ["No suggestions."]
    out.append("")

    # curves as tables
    out += ["## Loss and perplexity curves", ""]
    any_curve = False
    for name in names:
        model = _d(models.get(name))
        curves = _d(model.get("curves"))
        val = [_d(r) for r in _l(curves.get("val"))]
        train = [_d(r) for r in _l(curves.get("train"))]
        if not (val or train):
            continue
        any_curve = True
        out += [f"### {_m(name)}", ""]
        facts = []
        if model.get("tokens_per_s") is not None:
            facts.append(f"throughput {_count(model.get('tokens_per_s'))} tokens/s")
        if model.get("train_seconds") is not None:
            facts.append(f"training time {_duration(model.get('train_seconds'))}")
        if facts:
            out += [" · ".join(facts), ""]
        if val:
            out += [
                _md_table(
                    ["Step", "Val loss", "Val ppl", "Val bpb"],
                    [[_m(r.get("step")), _f(r.get("loss")), _f(r.get("ppl"), 2), _f(r.get("bpb"))] for r in val],
                ),
                "",
            ]
        if train:
            # at most ~12 evenly spaced rows of the training log, always with the last one
            stride = max(1, math.ceil(len(train) / 12))
            picked = train[::stride]
            if picked[-1] is not train[-1]:
                picked.append(train[-1])
            out += [
                _md_table(
                    ["Step", "Train loss", "LR", "Tokens/s"],
                    [[_m(r.get("step")), _f(r.get("loss")), _m(_value(r.get("lr"))), _count(r.get("tokens_per_s"))] for r in picked],
                ),
                "",
            ]
    if not any_curve:
        out += ["No training curves were recorded.", ""]

    # stage comparison
    out += ["## Stage comparison", ""]
    comp = [_d(r) for r in _l(s.get("stage_comparison")) if isinstance(r, dict)]
    if comp:
        rows = []
        for r in comp:
            delta = _finite(r.get("delta_bpb_vs_previous"))
            model = _m(r.get("model", "?")) + (" (control)" if r.get("control") else "")
            rows.append([model, _f(r.get("val_bpb")), "–" if delta is None else f"{delta:+.3f}", _count(r.get("tokens_per_s"))])
        out += [_md_table(["Model", "Val bits/byte", "Δ bpb vs previous stage", "Tokens/s"], rows), ""]
    else:
        out += ["No stage comparison available.", ""]
    out += ["### What each component adds", ""]
    if _component_rows(s, False):
        out += [_md_components_table(_component_rows(s, False)), "", _m(_COMPONENT_NOTE), ""]
    else:
        out += ["No component comparison: the control models were not evaluated.", ""]

    # guidance
    out += ["## Prompt adherence vs guidance", ""]
    shown = False
    for name in names:
        model = _d(models.get(name))
        judged = _guided_milestone(model)
        if judged is None:
            continue
        shown = True
        rows = _reported(judged)
        out += [f"### {_m(name)} — {_m(_step_label(judged))}{_m(_set_label(rows))}", ""]
        body = []
        for r in rows:
            ci = _l(r.get("ci"))
            q = _d(r.get("quality"))
            body.append(
                [
                    _m(_value(r.get("scale"))),
                    _f(r.get("adherence")),
                    f"[{_f(ci[0])}, {_f(ci[1])}]" if len(ci) == 2 else "–",
                    _f(r.get("fluent_on_topic")),
                    _count(r.get("n")),
                    _count(r.get("samples_per_prompt")),
                    _f(q.get("distinct_2")),
                    _f(q.get("real_word_share")),
                    _f(q.get("repetition_rate")),
                    _f(q.get("judge_ppl"), 1),
                ]
            )
        out += [_md_table(["Guidance w", "Adherence", "95% CI (Wilson)", "Fluent & on topic", "n", "Samples/prompt",
                           "Distinct-2", "Real words", "Repetition", "Judge ppl"], body), ""]
        sentence = _bar_sentence(rows)
        if sentence:
            out += [_m(sentence), ""]
        prompts: list[str] = []
        cells: dict[tuple[str, int], list[dict]] = {}
        for i, r in enumerate(rows):
            for smp in _l(r.get("samples")):
                if isinstance(smp, dict):
                    p = "" if smp.get("prompt") is None else str(smp.get("prompt"))
                    if p not in prompts:
                        prompts.append(p)
                    cells.setdefault((p, i), []).append(smp)
        if prompts:
            out += ["Samples per guidance scale (✓ = followed the prompt):", ""]
            header = ["Prompt"] + [f"w = {_m(_value(r.get('scale')))}" for r in rows]
            body = [[_m(p) or "*(null prompt)*"] + [_md_sample_cell(cells.get((p, i), []), True) for i in range(len(rows))] for p in prompts]
            out += [_md_table(header, body), ""]
    if not shown:
        out += ["No guidance sweep in this summary (only the diffusion model has one).", ""]

    # samples
    out += ["## Samples per milestone", ""]
    shown = False
    for name in names:
        model = _d(models.get(name))
        ms = _milestones(model)
        if not ms or _is_control(name, model):
            continue
        shown = True
        best_step = _int(_d(model.get("best")).get("step"))
        prompts, cells = _samples_by_prompt(ms)
        out += [f"### {_m(name)}", ""]
        header = ["Prompt"]
        for m in ms:
            star = " ★ best" if best_step is not None and _int(m.get("step")) == best_step else ""
            header.append(f"{_m(_step_label(m))}{star} (val loss {_f(m.get('val_loss'))})")
        body = [[_m(p) or "*(no prompt)*"] + [_md_sample_cell(cells.get((p, i), [])) for i in range(len(ms))] for p in prompts]
        for key, label in _QUALITY_ROWS:
            vals = [_d(m.get("quality")).get(key) for m in ms]
            if any(v is not None for v in vals):
                body.append([f"*{label}*"] + [_f(v) for v in vals])
        out += [_md_table(header, body), ""]
    if not shown:
        out += ["No milestones in this summary.", ""]

    # diagnose
    out += ["## Diagnostics", ""]
    diag = _d(s.get("diagnose"))
    if diag:
        out += [f"Overall status: **{_m(str(diag.get('status') or 'unknown').upper())}**", ""]
        rows = [
            [_m(_d(c).get("name", "?")), _m(_d(c).get("status", "?")), _m(_value(_d(c).get("value"))), _m(_value(_d(c).get("threshold"))), _m(_d(c).get("message") or "")]
            for c in _l(diag.get("checks"))
        ]
        if rows:
            out += [_md_table(["Check", "Status", "Value", "Threshold", "Message"], rows), ""]
    else:
        out += ["The diagnose stage did not run.", ""]

    # data
    out += ["## Data", ""]
    data = _d(s.get("data"))
    if data:
        out += [f"Source: {_m(data.get('source', '–'))} · vocabulary {_count(data.get('vocab_size'))} tokens", ""]
        splits, pairs = _d(data.get("splits")), _d(data.get("pairs"))
        if splits:
            rows = [
                [_m(k), _count(_d(v).get("documents")), _count(_d(v).get("bytes")), _count(_d(v).get("tokens")), _f(_d(v).get("bytes_per_token"), 2), _count(pairs.get(k))]
                for k, v in splits.items()
            ]
            out += [_md_table(["Split", "Documents", "Bytes", "Tokens", "Bytes/token", "Prompt pairs"], rows), ""]
    else:
        out += ["No data description.", ""]

    # mlflow
    out += ["## MLflow runs", ""]
    ml = _d(s.get("mlflow"))
    if ml:
        out += [f"Tracking URI: {_code(ml.get('tracking_uri') or '–')} · experiment {_code(ml.get('experiment') or '–')}", ""]
        out += ["Open the UI:", "", "```", _mlflow_command(ml.get("tracking_uri")), "```", ""]
        runs = _d(ml.get("runs"))
        if runs:
            rows = []
            for k, v in runs.items():
                link = _run_link(ml.get("tracking_uri"), v)
                cell = _code(v) if v is not None else "–"
                rows.append([_m(k), f"[{cell}]({link})" if link else cell])
            out += [_md_table(["Stage", "Run id"], rows), ""]
    else:
        out += ["Tracking was disabled or did not record runs.", ""]

    # params
    out += ["## Parameters", ""]
    params = _d(s.get("params"))
    if params:
        out += [_md_table(["Key", "Value"], [[_m(k), _m(_value(params[k]))] for k in sorted(params, key=str)]), ""]
    else:
        out += ["No parameters recorded.", ""]
    return "\n".join(out).rstrip() + "\n"


def _md_components_table(rows: list[dict]) -> str:
    return _md_table(COMPONENT_COLUMNS, [_component_cells(r, _m, lambda x: f"**{x}**", _m) for r in rows])


def _md_sample_cell(samples: list[dict], adherence: bool = False) -> str:
    if not samples:
        return "–"
    parts = []
    for smp in samples:
        mark = ""
        if adherence and smp.get("adherent") is not None:
            mark = "✓ " if smp.get("adherent") else "✗ "
        parts.append(mark + _m(smp.get("text", "")))
    return "<br>—<br>".join(parts)


def write_report(summary: dict, html_path: str | Path, md_path: str | Path) -> tuple[Path, Path]:
    """Render both formats and write them (UTF-8), creating parent folders; returns the paths."""
    html_path, md_path = Path(html_path), Path(md_path)
    for path, text in ((html_path, render_html(summary)), (md_path, render_markdown(summary))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return html_path, md_path
