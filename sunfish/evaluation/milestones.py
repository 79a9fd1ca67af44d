"""Evaluating milestone checkpoints: the incremental loop, the judge's figures, the best milestone's
guidance curve, and the summary that milestones.json and the DVC metrics are made of.

Why here and not in the evaluate stage: these are the rules of what is compared with what (choose
on dev, report on test; one curve per best milestone; cached per checkpoint), and they are tested
with fakes, without DVC or MLflow. The evaluate stage (pipeline/evaluate.py) only wires them to
the prepared data, the cache folder and the tracking run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sunfish.config import CONTROL_NAMES
from sunfish.models import is_diffusion

log = logging.getLogger(__name__)

__all__ = ["progress_scales", "checkpoint_weights_id", "evaluate_milestones", "judge_entries", "complete_sweeps",
           "show_chosen_scale", "closest", "halving_batch_size", "scoring_autocast", "summarise"]


def progress_scales(guidance_scale: float) -> list[float]:
    """The guidance scales swept at every milestone: unconditional, conditional and the chosen w."""
    return sorted({0.0, 1.0, float(guidance_scale)})


def checkpoint_weights_id(directory: Path) -> tuple[dict, str]:
    """(config.json, the weights' sha256): the digest config.json records, else the file's own."""
    from sunfish.training.checkpoint import DIGEST_KEY, WEIGHTS, read_checkpoint_meta, sha256_file

    _, meta = read_checkpoint_meta(directory)
    return meta, meta.get(DIGEST_KEY) or sha256_file(directory / WEIGHTS)


def evaluate_milestones(
    models_dir: Path,
    names: tuple[str, ...] | list[str],
    settings_for: Callable[[str], Mapping[str, Any]],
    cache,
    compute: Callable[[str, int, Path, dict], dict],
    root: Path | None = None,
) -> dict[str, list[dict]]:
    """{model: [entry per milestone]}, computing only the checkpoints the cache does not hold.

    The key of a checkpoint is digest(weights sha256, kind, settings_for(kind)); ``compute(name,
    step, directory, meta)`` returns the figures of one checkpoint. Entries get "step",
    "checkpoint", "kind", "cache_key" and "cached" (True when reused).
    """
    from sunfish.evaluation.cache import digest
    from sunfish.training.checkpoint import list_milestones

    out: dict[str, list[dict]] = {}
    for name in names:
        milestones = list_milestones(models_dir / name)
        if not milestones:
            log.info("no milestone checkpoints under %s", models_dir / name)
            continue
        entries = []
        for step, directory in milestones:
            meta, weights = checkpoint_weights_id(directory)
            kind = meta["kind"]
            key = digest("checkpoint", weights, kind, dict(settings_for(kind)))
            entry, cached = cache.get_or_compute(key, functools.partial(compute, name, step, directory, meta))
            where = directory.relative_to(root) if root is not None and directory.is_relative_to(root) else directory
            entry.update({"step": step, "checkpoint": str(where), "kind": kind, "cache_key": key, "cached": cached})
            if cached:
                log.info("%s step %d: cached (val bpb %.4f)", name, step, entry.get("val_bpb", float("nan")))
            entries.append(entry)
        out[name] = entries
    return out


def judge_entries(evaluated: Mapping[str, list[dict]], judge_texts: Callable[[list[str]], dict]) -> None:
    """Add the judge's figures to each entry's quality and to each guidance row.

    ``judge_texts(texts)`` returns {"judge_ppl", "fluent_share", "fluent": [bool per text]} (see
    sunfish.evaluation.judge.judge_samples). Autoregressive samples are judged as the whole text a
    reader sees (prompt and continuation). A guidance row also gets "fluent_on_topic": the share of
    its samples that name their target AND are fluent, which the copy head alone cannot pass.
    """
    def judged(quality: dict, texts: list[str]) -> list[bool]:
        got = judge_texts(texts)
        quality.update({k: got[k] for k in ("judge_ppl", "fluent_share", "varied_share")})
        return got["fluent"]

    for entries in evaluated.values():
        for entry in entries:
            rows = [*entry.get("guidance", []), *entry.get("guidance_test", [])]
            for g in rows:
                fluent = judged(g.setdefault("quality", {}), [s["text"] for s in g.get("samples", [])])
                both = [f and bool(s.get("adherent")) for f, s in zip(fluent, g.get("samples", []))]
                for s_, f in zip(g.get("samples", []), fluent):
                    s_["fluent"] = f
                g["fluent_on_topic"] = sum(both) / len(both) if both else None
            if not entry.get("guidance"):
                judged(entry.setdefault("quality", {}), [s.get("text", "") for s in entry.get("samples", [])])


def complete_sweeps(
    evaluated: Mapping[str, list[dict]],
    scales: list[float],
    cache,
    sweep: Callable[[dict, list[float]], list[dict]],
) -> int:
    """Give the best milestone of every diffusion model its reported curve: every one of ``scales``
    on the test prompts, as ``guidance_test`` (its ``guidance`` rows, on the dev prompts, chose it).

    ``sweep(entry, scales)`` samples the test prompts of one entry; the result is cached under the
    entry's key plus the scales. Returns how many entries gained a curve.
    """
    from sunfish.evaluation.cache import digest
    from sunfish.evaluation.checklist import best_checkpoint

    completed = 0
    for entries in evaluated.values():
        if not entries or not is_diffusion(entries[0].get("kind", "")):
            continue
        step = best_checkpoint(entries)
        entry = next((e for e in entries if e["step"] == step), entries[-1])
        wanted = sorted({float(w) for w in scales})
        key = digest("test-sweep", entry["cache_key"], wanted)
        rows, _ = cache.get_or_compute(key, functools.partial(sweep, entry, wanted))
        entry["guidance_test"] = sorted(rows, key=lambda g: g["scale"])
        completed += 1
    return completed


def show_chosen_scale(entries: list[dict], scale: float) -> None:
    """A diffusion milestone's samples, quality and adherence are those of the guidance row at
    ``scale`` (sampling.guidance_scale): what choosing the best milestone and the checklist read."""
    for e in entries:
        at_w = closest(e.get("guidance") or [], scale)
        if at_w:
            e["samples"] = [{"prompt": s["prompt"], "text": s["text"]} for s in at_w["samples"]]
            e["quality"] = dict(at_w["quality"])
            e.setdefault("selection", {})["quality"] = dict(at_w["quality"])  # dev prompts choose
            e["adherence"] = at_w["adherence"]
            e["adherence_scale"] = at_w["scale"]


def closest(sweep: list[dict], scale: float) -> dict:
    return min(sweep, key=lambda g: (abs(g["scale"] - scale), g["scale"])) if sweep else {}


def halving_batch_size(rows: int, batch_size: int) -> int:
    """The scoring batch size: train.batch_size, smaller when needed so that ``rows`` make at least two
    batches (the dev and test halves of split_halves; the pooled figures do not depend on it)."""
    return max(1, min(batch_size, -(-rows // 2)))


def scoring_autocast(precision: str):
    """The autocast context of the likelihood passes: the training precision (train.precision), so a
    CPU with native bf16 scores in bf16 as it trained (about 1.5x faster, losses equal to about 4e-5
    nats). Sampling never runs under it: its draws stay those of float32 weights and float64 draws."""
    import torch

    from sunfish.training.loop import autocast_dtype

    amp = autocast_dtype(precision, torch.device("cpu"))
    return torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None), str(amp)


def summarise(evaluated: dict[str, list[dict]], params, judge: dict | None) -> tuple[dict, dict]:
    """milestones.json's "models" and the flat DVC metrics, from the judged entries."""
    from sunfish.evaluation.checklist import best_entry, checklist_for
    from sunfish.evaluation.guidance_bar import guidance_bar

    p = params
    models: dict = {}
    metrics: dict = {}
    for name, entries in evaluated.items():
        kind = "diffusion" if is_diffusion(entries[0]["kind"]) else "staged"
        if kind == "diffusion":
            show_chosen_scale(entries, p.sampling.guidance_scale)
        best = best_entry(entries)
        best_m = next((e for e in entries if e["step"] == best["step"]), entries[-1])
        quality = best_m.get("quality") or {}
        if kind == "diffusion" and best_m.get("guidance_test"):  # report the test prompts' row at w
            quality = closest(best_m["guidance_test"], p.sampling.guidance_scale).get("quality") or quality
            best_m = {**best_m, "quality": quality}
        real = ((judge or {}).get("calibration") or {}).get("real") or {}
        items = checklist_for([best_m if e["step"] == best_m["step"] else e for e in entries], kind,
                              step=best["step"], real_fluent_share=real.get("fluent_share"),
                              guidance_scale=p.sampling.guidance_scale)
        models[name] = {"kind": kind, "milestones": entries, "best": {**best, "checkpoint": best_m["checkpoint"]},
                        "checklist": items, "is_control": name in CONTROL_NAMES}
        measured = [i for i in items if i["passed"] is not None]
        passed = sum(1 for i in measured if i["passed"])
        flat = {"best_step": best["step"], "best_val_bpb": best_m["val_bpb"], "best_val_loss": best_m["val_loss"],
                "final_val_bpb": entries[-1]["val_bpb"], "checklist": f"{passed}/{len(measured)}",
                "checklist_passed": passed, "checklist_measured": len(measured),
                "judge_ppl": quality.get("judge_ppl"), "fluent_share": quality.get("fluent_share")}
        if kind == "diffusion":
            reported = best_m.get("guidance_test") or best_m["guidance"]
            at_w, at_0 = closest(reported, p.sampling.guidance_scale), closest(reported, 0.0)
            flat["adherence"] = at_w.get("adherence")
            flat["adherence_scale"] = at_w.get("scale")
            flat["adherence_w0"] = at_0.get("adherence")
            flat["fluent_on_topic"] = at_w.get("fluent_on_topic")
            flat["fluent_on_topic_w0"] = at_0.get("fluent_on_topic")
            bar = guidance_bar(reported)
            models[name]["guidance_bar"] = bar
            if bar is not None:  # the bar's verdict as numbers: 1 met, 0 not met, absent when unmeasured
                flat["guidance_bar_met"] = None if bar["met"] is None else int(bar["met"])
                flat["guidance_bar_scale"] = bar["scale"]
                flat["guidance_bar_judge_ratio"] = bar["judge_ratio"]
        for key, value in flat.items():
            metrics[f"{name}.{key}"] = value
    return models, metrics
