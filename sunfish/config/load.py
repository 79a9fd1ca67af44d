"""Reading params.yaml: parse, validate, and report every bad key with its value and what is allowed."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sunfish.config.base import ParamsError
from sunfish.config.params import Params
from sunfish.config.sections import ModelPreset, SamplingConfig


def _describe(err: dict[str, Any], raw: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        if len(err["loc"]) == 2 and err["loc"][0] == "cfg" and err["loc"][1] in SamplingConfig.model_fields:
            return f"{loc}: moved to sampling.{err['loc'][1]} (the diffusion sampler's settings have their own section)"
        parent = err["loc"][:-1]
        allowed = _allowed_keys(parent)
        close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{loc}: unknown key (allowed here: {', '.join(allowed)}){hint}"
    if kind == "missing":
        return f"{loc}: required key is missing"
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{loc}: {shown} is invalid: {err['msg']}"


def _allowed_keys(path: tuple) -> list[str]:
    model: Any = Params
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            if model is Params or not hasattr(model, "model_fields"):
                model = ModelPreset  # a preset name inside presets.<name>
                continue
            return []
        ann = field.annotation
        origin = getattr(ann, "__origin__", None)
        if origin is dict:
            model = ann.__args__[1]
        else:
            model = ann
    return sorted(getattr(model, "model_fields", {}))


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate a mapping; raise ParamsError naming every bad key."""
    if raw is None:
        raise ParamsError(source, ["the file is empty; it must be a mapping of sections (data, train, ...)"])
    if not isinstance(raw, dict):
        raise ParamsError(source, [f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(source, [_describe(e, raw) for e in exc.errors()]) from None
    problems = params.consistency_problems()
    if problems:
        raise ParamsError(source, problems)
    return params


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; ``overrides`` maps dotted keys to values (CLI -S style)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(str(path), ["file not found"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(str(path), [f"not valid YAML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ParamsError(str(path), [f"not UTF-8 text: {exc}"]) from None
    for key, value in (overrides or {}).items():
        raw = _set_dotted(raw if isinstance(raw, dict) else {}, key, value)
    return parse_params(raw, str(path))


def _set_dotted(raw: dict, key: str, value: Any) -> dict:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return raw


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of nested params, as DVC and MLflow show them."""
    out: dict[str, Any] = {}
    if isinstance(tree, BaseModel):
        tree = tree.model_dump()
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = tree
    return out
