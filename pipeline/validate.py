"""DVC stage `validate`: fail the next `dvc repro` on any bad key anywhere in params.yaml.

DVC reruns a stage only when a param it tracks changes, so a misspelt key that no stage reads
would otherwise be ignored silently. This stage tracks the whole file; its output is a constant
stamp, so rerunning it never reruns anything downstream.
"""

from __future__ import annotations

from pipeline.common import open_stage


def run() -> None:
    ctx = open_stage("validate")
    stamp = ctx.root / "data" / "params.ok"
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text("params.yaml is valid\n", encoding="utf-8")
