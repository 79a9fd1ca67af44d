"""The report as a terminal table.

A report of some seventy rows is read by a person deciding whether to start hours of training, so
the table groups the rows by scope (data, each model, pipeline), keeps passing rows to a line or
two, prints warnings and failures in full, and ends with the list of what to change.
"""

from __future__ import annotations

import textwrap
from typing import Any

from sunfish.diagnose.core import FAIL, OK, SEVERITY, WARN, plural


def _short(value: Any, width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, dict):
        text = ", ".join(f"{k}={_short(v, width)}" for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_short(v, width) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(report: dict, width: int = 120) -> str:
    """A readable terminal table grouped by scope (data, each model, pipeline): one line per check
    with its value and threshold, the message beside or under it (in full for warnings and failures),
    and a closing list of what to change."""
    checks = report.get("checks") or []
    counts = report.get("counts") or {s: sum(1 for c in checks if c.get("status") == s) for s in (OK, WARN, FAIL)}
    env = report.get("environment") or {}
    status = str(report.get("status", "?")).upper()
    head = (f"SunFish diagnose: {status}  ({counts.get(OK, 0)} ok, {counts.get(WARN, 0)} warn, {counts.get(FAIL, 0)} fail)"
            + (f" in {report['seconds']:.1f} s" if isinstance(report.get("seconds"), (int, float)) else "")
            + (f" on {env.get('device')}, {plural(env.get('threads'), 'thread')}, torch {env.get('torch')}" if env else ""))
    short_names = [str(c.get("name", "?")).split("/", 1)[-1] for c in checks]
    name_w = min(max((len(n) for n in short_names), default=10), 28)
    val_w, thr_w = 18, 24
    lead = 2 + 4 + 2
    lines = [head, "=" * min(width, len(head)),
             f"{'':2}{'':4}  {'CHECK':<{name_w}}  {'VALUE':<{val_w}}  {'THRESHOLD':<{thr_w}}  MESSAGE"]
    indent = " " * (lead + name_w + 2)
    marks = {OK: "ok", WARN: "WARN", FAIL: "FAIL"}
    scope = None
    for c, short in zip(checks, short_names):
        name = str(c.get("name", "?"))
        this_scope = name.split("/", 1)[0] if "/" in name else "general"
        if this_scope != scope:
            lines += ["", f"[{this_scope}]"]
            scope = this_scope
        st = c.get("status", "?")
        msg = " ".join(str(c.get("message") or "").split())
        row = (f"{'':2}{marks.get(st, st):<4}  {_short(short, name_w):<{name_w}}  {_short(c.get('value'), val_w):<{val_w}}  "
               f"{_short(c.get('threshold'), thr_w):<{thr_w}}  ")
        room = width - len(row)
        if len(msg) <= room:
            lines.append(row + msg)
            continue
        lines.append(row.rstrip())
        wrapped = textwrap.wrap(msg, width=width - len(indent))
        if st == OK and len(wrapped) > 2:
            wrapped = wrapped[:2]
            wrapped[-1] = wrapped[-1][: width - len(indent) - 1] + "…"
        lines += [indent + w for w in wrapped]
    bad = [c for c in checks if c.get("status") in (WARN, FAIL)]
    if bad:
        lines += ["", "What to change:"]
        for c in sorted(bad, key=lambda c: -SEVERITY.get(c.get("status"), 0)):
            lines += textwrap.wrap(f"[{str(c['status']).upper()}] {c['name']}: {c.get('message', '')}", width=width,
                                   initial_indent="  - ", subsequent_indent="    ")
    else:
        lines += ["", "Nothing to change: every check passed."]
    return "\n".join(lines)
