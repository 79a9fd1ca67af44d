"""The one table model of the report: each section builds its tables once, and ``html`` and
``markdown`` render them. Before, every table was written twice (once per format) and the two
copies drifted; a column added to one format was easily forgotten in the other.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Cell:
    """A table cell whose value reads the same in both formats.

    ``text`` is plain text: each renderer escapes it. ``strong`` and ``note`` (a muted aside after
    the text) show in both formats; ``css`` is HTML-only decoration. ``html`` and ``md`` are ready
    markup that replaces all of the above, for the few cells plain text cannot express (several
    samples in one cell, a verdict over its measured value, a link). A bare value in a row (not a
    Cell) is plain text, None reading as empty.
    """

    text: Any = ""
    strong: bool = False
    css: str = ""
    note: str = ""
    html: str | None = None
    md: str | None = None


@dataclass(frozen=True)
class Table:
    """A titled table with the note that explains it.

    Without rows a table says ``empty`` instead, when given; otherwise it renders its header
    alone, so that a section keeps its column names when nothing was recorded. ``num`` (column
    indices) and ``css`` only align and style the HTML; ``anchor`` is the HTML id of the title.
    """

    columns: Sequence[Any]
    rows: Sequence[Sequence[Any]]
    title: str = ""
    note: str = ""
    empty: str = ""
    css: str = ""
    num: Collection[int] = ()
    anchor: str = ""
