"""Tolerant reading of the summary dict.

Any key of the summary may be missing, None or of the wrong type (a stage that did not run, a
hand-edited JSON file): these readers turn such values into empty ones, so that each section
renders what exists and never raises on a partial summary.
"""

from __future__ import annotations

import math
import re
from typing import Any

MODEL_ORDER = ("stage_0", "stage_1", "stage_2", "stage_3", "control_1", "control_2", "control_3", "cfg")


def as_dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else []


def num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def finite(x: Any) -> float | None:
    v = num(x)
    return v if v is not None and math.isfinite(v) else None


def integer(x: Any) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float) and math.isfinite(x) and x == int(x):
        return int(x)
    return None


def models_of(s: dict) -> tuple[dict, list[str]]:
    """The models and their names in pipeline order (unknown names last, sorted)."""
    models = as_dict(s.get("models"))
    known = [m for m in MODEL_ORDER if m in models]
    return models, known + sorted((str(m) for m in models if m not in MODEL_ORDER), key=str)


def is_control(name: str, model: dict) -> bool:
    """Controls are measured for the component table, not read: no sample sections for them."""
    return model.get("is_control") is True or str(name).startswith("control_")


def milestones(model: dict) -> list[dict]:
    ms = [m for m in as_list(model.get("milestones")) if isinstance(m, dict)]
    return sorted(ms, key=lambda m: (integer(m.get("step")) is None, integer(m.get("step")) or 0))


def best_milestone(model: dict) -> dict | None:
    ms = milestones(model)
    step = integer(as_dict(model.get("best")).get("step"))
    for m in ms:
        if step is not None and integer(m.get("step")) == step:
            return m
    return ms[-1] if ms else None


def guidance(m: dict | None, key: str = "guidance") -> list[dict]:
    rows = [r for r in as_list(as_dict(m).get(key)) if isinstance(r, dict) and finite(r.get("scale")) is not None]
    return sorted(rows, key=lambda r: finite(r.get("scale")))


def guided_milestone(model: dict) -> dict | None:
    """The milestone whose guidance sweep the report shows: the best one, else the latest swept."""
    best = best_milestone(model)
    if best is not None and guidance(best):
        return best
    swept = [m for m in milestones(model) if guidance(m)]
    return swept[-1] if swept else None


def reported(m: dict | None) -> list[dict]:
    """The curve a milestone reports: on the test prompts when it has one (dev prompts chose it)."""
    return guidance(m, "guidance_test") or guidance(m)


def set_label(rows: list[dict]) -> str:
    sets = {r.get("prompt_set") for r in rows} - {None}
    return " (test prompts; dev prompts chose the milestone)" if sets == {"test"} else ""


def step_label(m: dict) -> str:
    step = m.get("step")
    return f"step {step}" if step is not None else "step ?"


def component_rows(s: dict, final_only: bool) -> list[dict]:
    rows = [as_dict(r) for r in as_list(s.get("components")) if isinstance(r, dict)]
    return [r for r in rows if r.get("final")] if final_only else rows


def run_link(uri: Any, run_id: Any) -> str | None:
    """The MLflow UI address of a run when the tracking URI is a server (http/https), else None."""
    if not run_id or not isinstance(uri, str) or not re.match(r"https?://", uri):
        return None
    return f"{uri.rstrip('/')}/#/runs/{run_id}"
