"""Markdown primitives of the report: escaping, inline code and the table renderer.

The Markdown twin is read both raw (in a terminal, a diff) and rendered (on a forge), so text is
escaped only where Markdown or HTML would otherwise read it as syntax.
"""

from __future__ import annotations

import html
import re
from typing import Any

from sunfish.report.table import Cell, Table

# Markdown syntax characters; "_" only where it could open or close emphasis (not inside words,
# so that names such as stage_0 stay readable in the raw file).
_SPECIAL = re.compile(r"([\\`*\[\]|#~]|(?<!\w)_|_(?!\w))")


def esc(x: Any) -> str:
    """Text safe inside a Markdown table cell or paragraph: HTML and Markdown syntax neutralised."""
    text = "" if x is None else str(x)
    text = html.escape(text, quote=False)
    text = _SPECIAL.sub(r"\\\1", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("\n", "<br>")


def code(x: Any) -> str:
    """Inline code span for identifiers (run ids, URIs); backticks, pipes and newlines removed."""
    text = re.sub(r"[`|\r\n]", "", str(x))
    return f"`{text}`" if text else "–"


def cell(c: Any) -> str:
    if not isinstance(c, Cell):
        return esc(c)
    if c.md is not None:
        return c.md
    out = esc(c.text)
    if c.strong:
        out = f"**{out}**"
    if c.note:
        out += " " + esc(c.note)
    return out


def grid(columns: list[Any], rows: list[list[Any]]) -> str:
    header = [cell(h) for h in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) or " " for c in row) + " |" for row in rows]
    return "\n".join(lines)


def table(t: Table) -> list[str]:
    """The table as lines of the page, each block followed by a blank line."""
    out = [f"### {esc(t.title)}", ""] if t.title else []
    if not t.rows and t.empty:
        return out + [esc(t.empty), ""]
    out += [grid(list(t.columns), [list(r) for r in t.rows]), ""]
    if t.note:
        out += [esc(t.note), ""]
    return out
