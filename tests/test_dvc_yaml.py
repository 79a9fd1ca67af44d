"""dvc.yaml and params.yaml stay in step: every param is tracked by a stage that uses it."""

from __future__ import annotations

from pathlib import Path

import yaml

from sunfish.config import flatten, parse_params

ROOT = Path(__file__).resolve().parents[1]


def _tracked(dvc: dict, raw: dict) -> dict[str, set[str]]:
    out = {}
    for name, stage in dvc["stages"].items():
        keys = set()
        for entry in stage.get("params", []):
            entry = entry.replace("${staged.preset}", raw["staged"]["preset"]).replace("${cfg.preset}", raw["cfg"]["preset"])
            keys.add(entry)
        out[name] = keys
    return out


def _covered(key: str, tracked: set[str]) -> bool:
    return any(key == t or key.startswith(t + ".") for t in tracked)


def test_every_param_is_tracked_by_some_stage():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    tracked = _tracked(dvc, raw)
    everything = set().union(*tracked.values())
    # presets not chosen by the run do not change it, and tracking (where MLflow writes) is not a result
    ignored = ("presets.", "tracking.")
    active = {f"presets.{raw['staged']['preset']}", f"presets.{raw['cfg']['preset']}"}
    missing = [
        k for k in flatten(parse_params(raw))
        if not _covered(k, everything) and (not k.startswith(ignored) or any(k.startswith(a + ".") for a in active))
    ]
    assert not missing, f"params no stage tracks: {missing}"


def test_guidance_scale_is_not_a_training_input():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    tracked = _tracked(dvc, raw)
    users = {name for name, keys in tracked.items() if _covered("cfg.guidance_scale", keys)}
    assert users == {"evaluate"}


def test_validate_stage_tracks_the_whole_file():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert "params.yaml" in dvc["stages"]["validate"]["deps"]
    assert "data/params.ok" in dvc["stages"]["prepare"]["deps"]
