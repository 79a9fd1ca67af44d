"""Loss and perplexity curves of each model: plots in HTML; Markdown has no plots, so it gets the
validation points and a thinned training log as tables instead."""

from __future__ import annotations

import math
from typing import Any

from sunfish.report import html as H
from sunfish.report import markdown as M
from sunfish.report.access import as_dict, as_list, finite, models_of
from sunfish.report.fmt import count, duration, fixed, value
from sunfish.report.svg import line_chart
from sunfish.report.table import Table

_TRAIN_ROWS = 12  # about this many evenly spaced rows of the training log in Markdown


def _curves(s: dict) -> list[tuple[str, dict, list[dict], list[dict]]]:
    """(name, model, train rows, val rows) of each model that recorded a curve; rows as recorded."""
    models, names = models_of(s)
    out = []
    for name in names:
        model = as_dict(models.get(name))
        curves = as_dict(model.get("curves"))
        train, val = as_list(curves.get("train")), as_list(curves.get("val"))
        if model and (train or val):
            out.append((name, model, train, val))
    return out


def _facts(model: dict) -> str:
    facts = []
    if model.get("tokens_per_s") is not None:
        facts.append(f"throughput {count(model.get('tokens_per_s'))} tokens/s")
    if model.get("train_seconds") is not None:
        facts.append(f"training time {duration(model.get('train_seconds'))}")
    return " · ".join(facts)


def _points(rows: list, key: str) -> list[tuple[Any, Any]]:
    return [(r.get("step"), r.get(key)) for r in rows if isinstance(r, dict)]


def _ppl(loss: Any) -> float | None:
    v = finite(loss)
    return math.exp(v) if v is not None and v < 700 else None


def _charts(name: str, train: list, val: list) -> str:
    loss = line_chart({"train loss": _points(train, "loss"), "val loss": _points(val, "loss")},
                      title=f"{name}: loss", x_label="step", y_label="nats / token")
    val, train = [as_dict(r) for r in val], [as_dict(r) for r in train]
    val_ppl = [(r.get("step"), r.get("ppl") if r.get("ppl") is not None else _ppl(r.get("loss"))) for r in val]
    train_ppl = [(r.get("step"), _ppl(r.get("loss"))) for r in train]
    ppl = line_chart({"train ppl": train_ppl, "val ppl": val_ppl}, title=f"{name}: perplexity", x_label="step",
                     y_label="perplexity", log_y=True)
    return f'<div class="charts">{loss}{ppl}</div>'


def to_html(s: dict) -> str:
    out = []
    for name, model, train, val in _curves(s):
        out.append(f"<h3>{H.esc(name)}</h3>")
        if model.get("description"):
            out.append(H.muted(model.get("description")))
        out.append(_charts(name, train, val))
        if _facts(model):
            out.append(H.muted(_facts(model)))
    if not out:
        out.append(H.muted("No training curves were recorded."))
    return H.section("curves", "Loss and perplexity curves", out)


def _thinned(train: list[dict]) -> list[dict]:
    """Evenly spaced rows of the training log, always with the last one."""
    stride = max(1, math.ceil(len(train) / _TRAIN_ROWS))
    picked = train[::stride]
    if picked[-1] is not train[-1]:
        picked.append(train[-1])
    return picked


def to_markdown(s: dict) -> list[str]:
    out = ["## Loss and perplexity curves", ""]
    curves = _curves(s)
    for name, model, train, val in curves:
        train, val = [as_dict(r) for r in train], [as_dict(r) for r in val]
        out += [f"### {M.esc(name)}", ""]
        if _facts(model):
            out += [M.esc(_facts(model)), ""]
        if val:
            out += M.table(Table(["Step", "Val loss", "Val ppl", "Val bpb"],
                                 [[r.get("step"), fixed(r.get("loss")), fixed(r.get("ppl"), 2), fixed(r.get("bpb"))]
                                  for r in val]))
        if train:
            rows = [[r.get("step"), fixed(r.get("loss")), value(r.get("lr")), count(r.get("tokens_per_s"))]
                    for r in _thinned(train)]
            out += M.table(Table(["Step", "Train loss", "LR", "Tokens/s"], rows))
    if not curves:
        out += ["No training curves were recorded.", ""]
    return out
