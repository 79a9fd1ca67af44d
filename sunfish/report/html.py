"""HTML primitives of the report: the stylesheet, escaping and the table renderer.

The page must open from a file or an MLflow artifact without a network, so the stylesheet is
inline and nothing refers to an external resource.
"""

from __future__ import annotations

from html import escape
from typing import Any

from sunfish.report.table import Cell, Table

CSS = """
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
dl.card { display:grid; grid-template-columns:max-content 1fr; gap:6px 16px; background:var(--bg-alt); border:1px solid var(--line); border-radius:8px; padding:12px 16px; }
dl.card dt { font-weight:600; } dl.card dd { margin:0; }
details summary { cursor:pointer; color:#0b5cad; }
footer { margin-top:48px; color:var(--muted); font-size:.85rem; }
"""


def esc(x: Any) -> str:
    """Every text from the summary goes through here: samples are model output, not markup."""
    return escape("" if x is None else str(x), quote=True)


def muted(text: Any) -> str:
    return f'<p class="muted">{esc(text)}</p>'


def rule(label: str, text: Any, anchor: str = "") -> str:
    """A highlighted rule the reader should keep in mind while reading the tables around it."""
    id_attr = f' id="{esc(anchor)}"' if anchor else ""
    return f'<p class="rule"{id_attr}><strong>{esc(label)}:</strong> {esc(text)}</p>'


def section(anchor: str, title: str, parts: list[str]) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>' + "".join(parts) + "</section>"


def cell(c: Any) -> str:
    if not isinstance(c, Cell):
        return esc(c)
    if c.html is not None:
        return c.html
    out = esc(c.text)
    if c.strong:
        out = f"<strong>{out}</strong>"
    if c.css:
        out = f'<span class="{esc(c.css)}">{out}</span>'
    if c.note:
        out += f' <span class="muted">{esc(c.note)}</span>'
    return out


def table(t: Table) -> str:
    out = []
    if t.title:
        id_attr = f' id="{esc(t.anchor)}"' if t.anchor else ""
        out.append(f"<h3{id_attr}>{esc(t.title)}</h3>")
    if not t.rows and t.empty:
        return "".join(out) + muted(t.empty)
    nums = set(t.num)

    def tag(name: str, i: int, content: Any) -> str:
        attr = ' class="num"' if i in nums else ""
        return f"<{name}{attr}>{cell(content)}</{name}>"

    css = f' class="{t.css}"' if t.css else ""
    out.append(f'<div class="wrap"><table{css}><thead><tr>')
    out += [tag("th", i, h) for i, h in enumerate(t.columns)]
    out.append("</tr></thead><tbody>")
    for row in t.rows:
        out.append("<tr>" + "".join(tag("td", i, c) for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table></div>")
    if t.note:
        out.append(muted(t.note))
    return "".join(out)
