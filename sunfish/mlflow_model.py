"""A SunFish checkpoint as an MLflow pyfunc model, so MLflow's own tools can load and run it.

Why: MLflow users expect a registered model to be an MLflow Model they can open with
``mlflow.pyfunc.load_model("models:/sunfish-stage_3@champion")`` and call ``predict`` on, not a
folder of run artifacts only SunFish can read. The model's one artifact is the checkpoint folder
itself (``artifacts/checkpoint``: safetensors weights, config.json, tokenizer.json, and where the
checkpoint has them tokenizer_config.json and a diffusion model's generation_config.json), loaded
with SunFish's own loader (weights digest check included), so `sunfish sample models:/...` and
pyfunc read the same files and draw the same texts.

Loading needs the ``sunfish`` package importable (the model is SunFish's code plus these weights).
The pip requirements are written out because MLflow's inference of them loads the model in a
subprocess: measured on a tiny checkpoint, a log_model call took 3.4 to 5.9 s with it, 0.1 to 0.6 s
without.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd  # predict's type hint, which MLflow resolves in this module's globals

ARTIFACT = "checkpoint"  # the artifact name: the folder is <model>/artifacts/checkpoint
FILES = ("model.safetensors", "config.json", "tokenizer.json")
OPTIONAL_FILES = ("generation_config.json", "tokenizer_config.json")  # not the trainer state of a resumable one
# What predict's params may set (sample_from_checkpoint's keyword of the same name) and their types in
# the model signature; unset (None) means what `sunfish sample` uses (a diffusion checkpoint's own).
PARAMS = {"max_new_tokens": "long", "temperature": "double", "top_k": "long", "top_p": "double",
          "repetition_penalty": "double", "guidance_scale": "double", "guidance": "string", "candidates": "long",
          "seq_len": "long", "num_steps": "long", "scheduler": "string", "seed": "long"}
# Shown by the MLflow UI. Saved only: mlflow.pyfunc.log_model would run predict on it to check serving
# (seconds of sampling), save_model does not.
EXAMPLE = ["Once upon a time"]
# The distributions loading and sampling a checkpoint import (sunfish itself is not on a package index).
REQUIREMENTS = ("torch", "numpy", "safetensors", "tokenizers", "pydantic", "mlflow")


class SunFishModel(mlflow.pyfunc.PythonModel):
    """``predict(prompts)`` -> one generated text per prompt (an empty prompt: unconditional).

    The input is a list of strings, a string, or a DataFrame whose ``prompt`` column (else its first
    column) holds them. ``params`` may set any of :data:`PARAMS`; prompt i is drawn alone with
    ``seed + i`` (seed 0 unless given), so each text is the one `sunfish sample --prompt <it>
    --seed <seed + i>` prints (the samplers batch many texts of one prompt, not different prompts).
    """

    def load_context(self, context) -> None:
        from sunfish.training.checkpoint import load_checkpoint

        self._loaded = load_checkpoint(Path(context.artifacts[ARTIFACT]))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        from sunfish.sampling import sample_from_checkpoint

        settings = _settings(params)
        seed = int(settings.pop("seed", 0))
        texts = []
        for i, prompt in enumerate(_prompts(model_input)):
            out = sample_from_checkpoint(None, prompt=prompt or None, model_and_meta=self._loaded, seed=seed + i,
                                         **settings)
            texts.append(out[0]["text"])
        return texts


def _settings(params: Mapping[str, Any] | None) -> dict[str, Any]:
    unknown = sorted(set(params or {}) - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown params {', '.join(unknown)}; a SunFish model takes {', '.join(PARAMS)}")
    return {k: v for k, v in (params or {}).items() if v is not None}


def _prompts(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    columns = getattr(model_input, "columns", None)
    if columns is not None:  # a pandas DataFrame
        if len(columns) == 0:
            raise ValueError("an input DataFrame needs a column of prompts (named 'prompt', or its first column)")
        column = "prompt" if "prompt" in columns else columns[0]
        model_input = model_input[column].tolist()
    elif hasattr(model_input, "tolist"):  # a numpy array or pandas Series
        model_input = model_input.tolist()
    if not isinstance(model_input, (list, tuple)):
        raise ValueError(f"expected prompts as a list of strings, a string or a DataFrame, not {type(model_input).__name__}")
    bad = [type(p).__name__ for p in model_input if p is not None and not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings (or None for an unconditional sample), not {bad[0]}")
    return ["" if p is None else p for p in model_input]


def signature():
    """Prompts in, texts out, :data:`PARAMS` as params (MLflow passes only params its signature names)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec(name, kind, None) for name, kind in PARAMS.items()]))


def pip_requirements() -> list[str]:
    """The installed versions of :data:`REQUIREMENTS`, pinned as MLflow's own inference would pin them."""
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pinned.append(name)
    return pinned


@contextmanager
def staged_checkpoint(checkpoint: Path) -> Iterator[Path]:
    """The checkpoint's own files in a temporary folder (a milestone folder may hold others that do
    not belong in a shared model), hard-linked where the filesystem allows: checkpoint files are
    never modified in place, so a link is as safe as a copy."""
    missing = [f for f in FILES if not (checkpoint / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{checkpoint}: not a SunFish checkpoint (missing {', '.join(missing)})")
    tmp = Path(tempfile.mkdtemp(prefix="sunfish-model-"))
    try:
        folder = tmp / ARTIFACT
        folder.mkdir()
        for name in (*FILES, *OPTIONAL_FILES):
            if (checkpoint / name).is_file():
                try:
                    os.link(checkpoint / name, folder / name)
                except OSError:
                    shutil.copy2(checkpoint / name, folder / name)
        yield folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save(checkpoint: Path, path: Path, mlflow_model=None) -> None:
    """Write the MLflow Model of ``checkpoint`` to the new folder ``path``.

    The model is code (:mod:`sunfish.mlflow_entry`), not a pickle; its signature and requirements
    are given, so MLflow infers neither (inference would load and run the model). predict's input
    hint is a DataFrame, what pyfunc hands it under this signature: a list[str] hint would make
    MLflow replace the signature, and its params, with one inferred from the hint.
    """
    with staged_checkpoint(Path(checkpoint)) as folder:
        mlflow.pyfunc.save_model(
            path=str(path), python_model=str(Path(__file__).with_name("mlflow_entry.py")),
            artifacts={ARTIFACT: str(folder)}, pip_requirements=pip_requirements(), signature=signature(),
            input_example=EXAMPLE, mlflow_model=mlflow_model,
        )
