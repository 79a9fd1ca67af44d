"""`sunfish status`: training progress read from disk, also while training runs elsewhere.

The training loop rewrites ``state/<model>/progress.json`` atomically at every log step (and
``state/<model>/seed_<seed>/progress.json`` for a staged model's extra seeds); this module only
reads those files, so it never disturbs a running job.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def read_status(root: Path, model: str | None = None) -> list[dict[str, Any]]:
    rows = []
    state = Path(root) / "state"
    if not state.is_dir():
        return rows
    paths = sorted(state.glob("*/progress.json")) + sorted(state.glob("*/seed_*/progress.json"))
    for path in sorted(paths, key=lambda p: (p.relative_to(state).parts[0], len(p.parts), p)):
        owner = path.parent.name if path.parent.parent == state else path.parent.parent.name
        if model and owner != model:
            continue
        try:
            rows.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return rows


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def format_status(rows: list[dict[str, Any]], now: float | None = None) -> str:
    now = now or time.time()
    lines = []
    for r in rows:
        step, target = r.get("step", 0), r.get("max_steps", 0)
        rate = r.get("steps_per_min") or 0.0
        remaining = target - step
        eta = 0.0 if remaining <= 0 else (remaining / rate * 60 if rate else None)
        upcoming = [m for m in r.get("milestones", []) if m > step]
        next_ms = upcoming[0] if upcoming else None
        eta_ms = None if next_ms is None else ((next_ms - step) / rate * 60 if rate else None)
        state = r.get("state", "running")
        if state == "not trained":
            lines.append(f"{r.get('model', '?')}: not trained  ({r.get('note') or 'nothing to train'})")
            continue
        if state == "running" and now - r.get("updated", now) > 600:
            state = "stalled?"
        resumed = f"  (resumed at step {r['resumed_from']})" if r.get("resumed_from") else ""
        lines.append(f"{r.get('model', '?')}: {state}  {_bar(step, target)}  step {step}/{target}{resumed}")
        if state == "interrupted":
            lines.append("  stopped with a resume checkpoint; `dvc repro` (or the same command) continues it")
        val = r.get("val_loss")
        lines.append(
            f"  loss {r.get('loss', float('nan')):.4f}"
            + (f"  val loss {val:.4f}" if val is not None else "")
            + f"  speed {rate:.1f} steps/min  ETA {_duration(eta)}"
        )
        reached = r.get("milestones_reached", [])
        lines.append(
            f"  milestones reached: {', '.join(map(str, reached)) or 'none'}"
            + (f"; next {next_ms} (ETA {_duration(eta_ms)})" if next_ms else "")
        )
    return "\n".join(lines)
