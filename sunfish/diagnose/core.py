"""The check record every diagnose check returns, and what the checks share.

Every check is a small function that returns one row or a few (``make_check``) and can be called on
its own with a model and a batch: the tests build deliberately broken models and data and call the
checks directly. Rows must survive ``json.dumps`` (the diagnose stage writes them to
reports/diagnose.json and MLflow), hence ``_plain``. A check that raises on a broken input must still
give a row, a ``fail`` carrying the exception's message (``guarded``), never a crash of the whole
diagnosis.

Check names are ``<scope>/<topic>``: ``data/...`` for the prepared data, ``<model>/...`` (stage_0,
stage_3, cfg) for a model, ``pipeline/eta`` and ``environment``.

The probes train copies of a model under the objective's own randomness (masks, noise, conditioning
dropout); ``seeded`` fixes the global RNG around them, so a probe is repeatable and leaves the
caller's RNG as it was.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

OK, WARN, FAIL = "ok", "warn", "fail"
SEVERITY = {OK: 0, WARN: 1, FAIL: 2}


def make_check(
    name: str,
    status: str,
    value: Any = None,
    threshold: Any = None,
    message: str = "",
    details: dict | None = None,
) -> dict:
    """One row of the report. ``value``/``threshold``: a number, a short string or a small dict."""
    if status not in SEVERITY:
        raise ValueError(f"status must be one of {list(SEVERITY)}, got {status!r}")
    check = {"name": name, "status": status, "value": _plain(value), "threshold": _plain(threshold), "message": message}
    if details:
        check["details"] = _plain(details)
    return check


def _plain(x: Any) -> Any:
    """JSON-safe copy: tensors and numpy scalars to Python numbers, non-finite floats to strings."""
    if isinstance(x, torch.Tensor):
        x = x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def worst(statuses: Iterable[str]) -> str:
    out = OK
    for s in statuses:
        if SEVERITY.get(s, 0) > SEVERITY[out]:
            out = s
    return out


def guarded(row_name: str, fn: Callable[..., dict | list[dict]], /, *args: Any, **kwargs: Any) -> list[dict]:
    """Run one check; an exception becomes a ``fail`` row named ``row_name`` with the exception's message."""
    started = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    except Exception as exc:  # a broken input must give a failing row, never a crash
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        out = [make_check(row_name, FAIL, None, None, f"the check raised {type(exc).__name__}: {text}"[:600])]
    out = out if isinstance(out, list) else [out]
    if out:
        out[0]["seconds"] = round(time.perf_counter() - started, 3)  # time of the whole call, on its first row
    return out


@contextlib.contextmanager
def seeded(seed: int):
    """Fixed global RNG inside (stochastic objectives draw from it), restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def component_of(model: nn.Module, name: str) -> str:
    fn = getattr(model, "component_of", None)
    if fn is None:
        return name.split(".")[0]
    try:
        return str(fn(name))
    except Exception:
        return "other"


def fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return str(s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def plural(n: Any, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def fmt_count(n: float) -> str:
    n = float(n)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"
