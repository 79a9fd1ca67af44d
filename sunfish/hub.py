"""Hugging Face model folders: export a checkpoint, load one back, push one to the hub.

People share and find small models on the Hugging Face Hub. A SunFish checkpoint is already most of
a hub folder (safetensors weights, a tokenizers file, tokenizer_config.json); an export adds what a
hub user expects to find: a model card (README.md with hub metadata: library, license, datasets,
tags), a config.json whose ``model_type`` transformers' AutoConfig resolves once this module is
imported, and the checkpoint's generation_config.json when it has one.

Nothing here touches the network unless asked: ``from_pretrained`` reads a local folder, and only
a hub id (``user/name``) goes through ``huggingface_hub.snapshot_download``; ``push_to_hub``
uploads only when given a hub id, and copies into a local folder otherwise (how the tests and
air-gapped machines use it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sunfish.training.checkpoint import CONFIG, WEIGHTS, CheckpointError, read_checkpoint_meta

__all__ = ["MODEL_TYPE", "CARD", "save_pretrained", "from_pretrained", "push_to_hub", "model_card",
           "register_auto_config"]

MODEL_TYPE = "sunfish"
CARD = "README.md"
# Files a checkpoint folder may hold that an export carries (optimizer state stays behind).
CARRIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
# The bundled corpora a card can name with their hub dataset and licence (data/corpora/*/README.md).
KNOWN_DATA = {
    "tinystories": {"dataset": "roneneldan/TinyStories", "license": "cdla-sharing-1.0"},
    "wikitext2": {"dataset": "Salesforce/wikitext", "license": "cc-by-sa-3.0"},
    "shakespeare": {"dataset": None, "license": "other"},
}
KIND_WORDS = {
    "staged": "a staged autoregressive transformer (semantic-matrix token representation)",
    "block_diffusion": "a block diffusion language model (autoregressive over blocks, masked diffusion "
                       "within a block, prompt as an unmasked prefix)",
    "diffusion": "a masked/continuous diffusion language model with a prompt encoder and cross-attention",
}


def _is_hub_id(target: str) -> bool:
    """``user/name`` with no such local path: a hub repository id."""
    parts = target.split("/")
    return len(parts) == 2 and all(parts) and not Path(target).exists() and not target.startswith((".", "~"))


def save_pretrained(checkpoint: str | Path, out_dir: str | Path, *, metrics: Mapping[str, Any] | None = None,
                    data: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``checkpoint`` (a checkpoint folder, or a model folder: its final/) as a hub folder.

    ``metrics`` (e.g. {"val_bpb": 1.31}) and ``data`` (e.g. {"source": ..., "license": ...}) go into
    the model card. Refuses to write into a non-empty folder unless ``overwrite``: an export never
    replaces what is there by accident. Returns the folder.
    """
    directory, meta = read_checkpoint_meta(checkpoint)
    out = Path(out_dir)
    if out.resolve() == directory.resolve():
        raise CheckpointError(f"{out}: export into a folder other than the checkpoint itself")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} is not empty; choose a new folder (or overwrite=True / --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside the target and moved into place: a failure halfway leaves no half-written export
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copyfile(directory / WEIGHTS, tmp / WEIGHTS)
        for name in CARRIED:
            if (directory / name).exists():
                shutil.copyfile(directory / name, tmp / name)
        exported = {**meta, "model_type": MODEL_TYPE, "architectures": [meta["kind"]]}
        (tmp / CONFIG).write_text(json.dumps(exported, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(model_card(meta, metrics=metrics, data=data, parameters=_count_parameters(tmp)),
                                encoding="utf-8")
        if out.exists():  # --overwrite: the export's files replace theirs, other files stay
            for f in tmp.iterdir():
                f.replace(out / f.name)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _count_parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(folder / WEIGHTS), framework="pt") as fh:
        for key in fh.keys():
            n = 1
            for dim in fh.get_slice(key).get_shape():
                n *= int(dim)
            total += n
    return total


def card_data(meta: Mapping[str, Any]) -> dict:
    """What the card says about the training data: the source the checkpoint recorded (training
    writes data.source into config.json), with its hub dataset and licence when it is a bundled
    corpus; "unknown" for a checkpoint that recorded none, rather than a guess."""
    source = (meta.get("data") or {}).get("source") if isinstance(meta.get("data"), dict) else None
    if not source:
        return {"source": "unknown (not recorded in this checkpoint)", "dataset": None, "license": "other"}
    return {"source": source, **KNOWN_DATA.get(str(source), {"dataset": None, "license": "other"})}


def model_card(meta: Mapping[str, Any], *, metrics: Mapping[str, Any] | None = None,
               data: Mapping[str, Any] | None = None, parameters: int | None = None) -> str:
    """The README.md of an exported folder: hub metadata, what the model is, how it was trained and
    measured, how to load it, and what it cannot do."""
    data = dict(data or card_data(meta))
    kind, name = meta.get("kind", "?"), meta.get("model_name", "model")
    train = meta.get("train") or {}
    tags = ["sunfish", "text-generation", "diffusion" if "diffusion" in kind else "autoregressive"]
    front = ["---", "library_name: sunfish", f"license: {data.get('license', 'other')}", "language:", "- en", "tags:",
             *[f"- {t}" for t in tags]]
    if data.get("dataset"):
        front += ["datasets:", f"- {data['dataset']}"]
    licence = data.get("license", "other")
    front.append("---")
    lines = [*front, "", f"# SunFish {name}", "",
             f"{name} is {KIND_WORDS.get(kind, kind)}, trained with the SunFish pipeline (DVC + MLflow), "
             f"saved at step {meta.get('step', '?')}"
             + (f", {parameters / 1e6:.1f}M parameters." if parameters else "."), ""]
    if train:
        shown = {k: train[k] for k in ("max_steps", "lr", "batch_size", "seq_len", "precision") if k in train}
        lines += ["## Training", "", "| setting | value |", "|---|---|",
                  *[f"| {k} | {v} |" for k, v in shown.items()], ""]
    lines += ["## Data", "", f"Trained on `{data['source']}`"
              + (f" ([{data['dataset']}](https://huggingface.co/datasets/{data['dataset']}))" if data.get("dataset")
                 else "") + (f", license {licence}." if licence != "other" else
                             ": check the licence of that data before you share the model."), ""]
    if metrics:
        lines += ["## Evaluation", "", "| figure | value |", "|---|---|",
                  *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()],
                  "", "Bits per byte are over held-out text; a diffusion model's figure is an upper bound (ELBO).", ""]
    lines += ["## Use", "", "```python", "from sunfish.hub import from_pretrained", "",
              'model, meta, tokenizer = from_pretrained("path/or/user-name")', "```", "",
              "or `sunfish sample <folder> --prompt \"Once upon a time\"` in a SunFish install.", "",
              "## Limitations", "",
              "A small research model trained for minutes on a CPU: it writes short children's-story-like "
              "English and knows little else. Do not use it for facts or for anything where the text matters.",
              ""]
    return "\n".join(lines)


def from_pretrained(name_or_path: str | Path, *, revision: str | None = None, device: str = "cpu"):
    """(model, meta, tokenizer) from an exported or checkpoint folder, or from a hub id (downloaded
    through huggingface_hub's cache; offline, only what that cache already holds)."""
    from sunfish.training.checkpoint import load_checkpoint, load_tokenizer_for

    target = str(name_or_path)
    if _is_hub_id(target):
        from huggingface_hub import snapshot_download

        try:
            target = snapshot_download(target, revision=revision)
        except Exception as exc:  # offline, unknown repo, no access: one line naming it
            raise CheckpointError(f"could not fetch {name_or_path!r} from the Hugging Face Hub "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    model, meta, directory = load_checkpoint(target, device=device)
    return model, meta, load_tokenizer_for(directory, meta)


def push_to_hub(folder: str | Path, target: str, *, token: str | None = None, private: bool = False,
                commit_message: str = "Upload SunFish model") -> str:
    """Upload an exported ``folder`` to the hub repository ``target`` (``user/name``; created when
    missing), or copy it into ``target`` when that is a local path. Returns where it went."""
    folder = Path(folder)
    if not (folder / CONFIG).exists() or not (folder / CARD).exists():
        raise CheckpointError(f"{folder}: not an exported folder (no {CONFIG} or {CARD}); run `sunfish export` first")
    if not _is_hub_id(target):
        dest = Path(target)
        shutil.copytree(folder, dest, dirs_exist_ok=True)
        return str(dest)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(target, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=target, commit_message=commit_message)
    return f"https://huggingface.co/{target}"


def register_auto_config() -> None:
    """Let ``transformers.AutoConfig`` read exported config.json files (model_type "sunfish")."""
    from transformers import AutoConfig, PretrainedConfig

    class SunfishConfig(PretrainedConfig):
        model_type = MODEL_TYPE

    try:
        AutoConfig.register(MODEL_TYPE, SunfishConfig)
    except ValueError:  # already registered in this process
        pass
