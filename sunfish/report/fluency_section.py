"""The report's first section: the "fluent and on topic" table (reports/fluency.json).

``table`` and ``likelihood_table`` return plain cells (header, rows) so that tests can read the
figures without parsing markup; the section wraps them in the report's table model, which the
HTML and Markdown renderers escape their own way."""

from __future__ import annotations

from typing import Any

from sunfish.report import html as H
from sunfish.report import markdown as M
from sunfish.report.access import as_dict
from sunfish.report.table import Table

HEADER = ["row", "prompts", "w", "n", "fluent and on topic", "95% CI", "on topic", "fluent",
          "judge ppl (median)", "s / sample", "net rows / sample", "tokens / s"]


def _pct(x: Any) -> str:
    return "–" if not isinstance(x, (int, float)) else f"{100 * x:.0f}%"


def _num(x: Any, nd: int = 2) -> str:
    return "–" if not isinstance(x, (int, float)) else f"{x:.{nd}f}"


def table(fluency: dict) -> tuple[list[str], list[list[str]]]:
    """Rows in reading order: test model rows, implied, test references, then dev."""
    order = {"test": 0, "implied": 1, "dev": 3}
    rows = sorted(fluency.get("rows") or [], key=lambda r: (order.get(r.get("set"), 2) + (r.get("role") == "reference"),
                                                          r.get("guidance_scale") or 0))
    out = []
    for r in rows:
        ci = r.get("ci") or [None, None]
        out.append([
            r.get("name", ""), r.get("set", ""), "–" if r.get("guidance_scale") is None else f"{r['guidance_scale']:g}",
            str(r.get("n", "")), _pct(r.get("fluent_on_topic")), f"{_pct(ci[0])}–{_pct(ci[1])}",
            _pct(r.get("on_topic")), _pct(r.get("fluent")), _num(r.get("judge_ppl_median"), 1),
            _num(r.get("seconds_per_sample"), 3), _num(r.get("forward_rows_per_sample"), 1),
            _num(r.get("tokens_per_s"), 0),
        ])
    return HEADER, out


def sentences(fluency: dict) -> list[str]:
    """What the table says, in words, with the judge's own calibration figures."""
    h = fluency.get("headline") or {}
    cal = ((fluency.get("judge") or {}).get("calibration")) or {}
    out = []
    if h:
        out.append(
            f"At the default guidance w = {h.get('guidance_scale'):g}, {_pct(h.get('fluent_on_topic'))} of the "
            f"diffusion model's samples on the test prompts are fluent and on topic, against "
            f"{_pct(h.get('fluent_on_topic_w0'))} with the prompt dropped (w = 0) and "
            f"{_pct(h.get('real_fluent_on_topic'))} for the real held-out texts; the prompt echoed scores "
            f"{_pct(h.get('echo_fluent_on_topic'))}. Fluent share: diffusion {_pct(h.get('fluent'))}, "
            f"AR stage 0 {_pct(h.get('ar_fluent'))}. Implied-topic prompts (target word not in the prompt): "
            f"{_pct(h.get('implied_fluent_on_topic'))} (w = 0: {_pct(h.get('implied_fluent_on_topic_w0'))}). "
            f"The dev prompts' best scale was w = {h.get('dev_best_scale', 0):g}.")
    if cal:
        judge = fluency.get("judge") or {}
        out.append(
            f"Judge: {judge.get('kind', 'n-gram')} order {judge.get('order')}, fit on {judge.get('fit_on')}, "
            f"independent of every evaluated model. A text is fluent when its first {cal.get('max_words')} "
            f"judge tokens have perplexity <= {_num(cal.get('threshold'), 1)} (the 90th percentile of real "
            f"held-out texts) and a distinct-bigram ratio >= {_num(cal.get('min_distinct'), 2)}. On its "
            f"calibration texts: real {_pct((cal.get('real') or {}).get('fluent_share'))}, shuffled "
            f"{_pct((cal.get('shuffled') or {}).get('fluent_share'))}, random words "
            f"{_pct((cal.get('random_words') or {}).get('fluent_share'))} fluent.")
    return out


LIKELIHOOD_HEADER = ["model", "figure", "nats / token", "bits / byte", "ratio to AR"]


def likelihood_table(fluency: dict) -> tuple[list[str], list[list[str]], str]:
    """The block model's bounds beside the AR model's exact NLL on the same whole documents
    (header, rows, a sentence saying what was scored); no rows when it was not measured."""
    lk = fluency.get("likelihood") or {}
    if not isinstance(lk.get("ar_nats_per_token"), (int, float)):
        return LIKELIHOOD_HEADER, [], ""
    ar = lk["ar_nats_per_token"]
    rows = [
        ["AR stage 0", "exact NLL", _num(ar, 4), _num(lk.get("ar_bpb"), 4), "1.000"],
        ["block diffusion, no prompt", "≤ (ELBO, an upper bound)", _num(lk.get("uncond_nats_per_token"), 4),
         _num(lk.get("uncond_bpb"), 4), _num(lk.get("uncond_over_ar"), 3)],
        ["block diffusion, with the document's prompt", "≤ (ELBO, conditional)",
         _num(lk.get("cond_nats_per_token"), 4), _num(lk.get("cond_bpb"), 4), _num(lk.get("cond_over_ar"), 3)],
    ]
    scope = lk.get("scope") or "held-out texts"
    return LIKELIHOOD_HEADER, rows, f"Likelihood over {scope} ({lk.get('tokens', '?')} tokens)."


def examples(fluency: dict, per_row: int = 2) -> list[tuple[str, str, str]]:
    """(row label, prompt, text) of the first samples of the test model rows and the AR row."""
    out = []
    for r in fluency.get("rows") or []:
        if r.get("set") in ("test", "implied") and (r.get("role") == "model" or r.get("name") == "AR stage 0"):
            w = "" if r.get("guidance_scale") is None else f" w={r['guidance_scale']:g}"
            for e in (r.get("examples") or [])[:per_row]:
                verdict = ("fluent" if e.get("fluent") else "not fluent") + (", on topic" if e.get("on_topic") else "")
                out.append((f"{r['name']} ({r['set']}{w}; {verdict})", e.get("prompt") or "", e.get("text") or ""))
    return out


def _tables(fluency: dict) -> tuple[Table, str, Table | None, Table | None]:
    """(main table, likelihood scope, likelihood table, examples). The last two are None when the
    fluency stage did not measure them: the section leaves them out instead of showing bare headers."""
    header, rows = table(fluency)
    lk_header, lk_rows, scope = likelihood_table(fluency)
    ex = examples(fluency)
    return (Table(header, rows, num=range(2, len(header))), scope,
            Table(lk_header, lk_rows, num=range(2, 5)) if lk_rows else None,
            Table(["row", "prompt", "sample"], ex) if ex else None)


_TITLE = "Fluent and on topic"
_NOT_RUN = "No fluency measurement (stage fluency did not run)."


def to_html(s: dict) -> str:
    fl = as_dict(s.get("fluency"))
    if not fl.get("rows"):
        return H.section("fluency", _TITLE, [H.muted(_NOT_RUN)])
    main, scope, lk, ex = _tables(fl)
    out = [f"<p>{H.esc(t)}</p>" for t in sentences(fl)] + [H.table(main)]
    if lk is not None:
        out += [f"<p>{H.esc(scope)}</p>", H.table(lk)]
    if ex is not None:
        out.append(H.table(ex))
    return H.section("fluency", _TITLE, out)


def to_markdown(s: dict) -> list[str]:
    fl = as_dict(s.get("fluency"))
    out = [f"## {_TITLE}", ""]
    if not fl.get("rows"):
        return out + [_NOT_RUN, ""]
    main, scope, lk, ex = _tables(fl)
    for t in sentences(fl):
        out += [M.esc(t), ""]
    out += M.table(main)
    if lk is not None:
        out += [M.esc(scope), ""] + M.table(lk)
    if ex is not None:
        out += M.table(ex)
    return out
