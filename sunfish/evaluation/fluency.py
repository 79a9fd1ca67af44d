"""The "fluent and on topic" measure: one row per way of producing texts, with its cost.

Why this measure. A keyword-presence score is passed by copying the prompt's word into word
salad, and the prompt echoed back scores 100% on it. Here a sample counts only when it names the
prompt's target (``sunfish.data.prompts.adherent``) AND reads like real text to a judge that shares
nothing with the evaluated models (``sunfish.evaluation.ngram_judge``: a Kneser-Ney word model fit
on the train split, its threshold read off real held-out stories of the same length). Every model
row sits beside reference rows that say whether the measure can be trusted: real held-out text
(should mostly pass), the prompt echoed (must fail: it is on topic but not a story), shuffled real
words and random words (must fail). A measure whose trivial rows pass is broken, whatever it says
about a model.

Compute: each row carries its wall time and network rows per sample (a forward pass over k rows
counts k; guidance runs two rows per sample), so a quality gain bought with extra passes shows.
No torch here: rows take texts, the caller samples them.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

from sunfish.data.prompts import adherent
from sunfish.evaluation.ngram_judge import Calibration, NGramJudge, tokenize

__all__ = ["echo_text", "headline", "score_row", "shuffled_text", "wilson"]


def wilson(hits: int, n: int, z: float = 1.96) -> list[float | None]:
    """95% Wilson interval of a share: honest error bars for 64 samples."""
    if n == 0:
        return [None, None]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def echo_text(prompt: str, words: int) -> str:
    """The prompt said again and again up to ``words`` judge tokens: on topic by construction."""
    tokens = tokenize(prompt) or ["."]
    reps = -(-words // (len(tokens) + 1))
    return " ".join([prompt.strip().rstrip(".") + "."] * reps)


def shuffled_text(text: str, seed: int) -> str:
    """The words of a real text in random order: real vocabulary, no language."""
    tokens = tokenize(text)
    random.Random(seed).shuffle(tokens)
    return " ".join(tokens)


def score_row(
    name: str,
    texts: Sequence[str],
    targets: Sequence[Sequence[str]],
    judge: NGramJudge,
    calibration: Calibration,
    *,
    role: str,
    prompt_set: str,
    guidance_scale: float | None = None,
    seconds: float | None = None,
    forward_rows: int | None = None,
    tokens: int | None = None,
    examples: int = 3,
    prompts: Sequence[str] | None = None,
    samples_per_prompt: int = 1,
) -> dict:
    """One table row. ``role`` is "model" or "reference"; ``targets[i]`` the words sample i must name.

    ``seconds``/``forward_rows``/``tokens`` are totals over the row's texts (None: not generated,
    e.g. real text). ``tokens``: model tokens produced (the sampling speed is tokens / seconds).
    ``samples_per_prompt``: samples drawn for each text kept (k for a best-of-k row; its cost is in
    ``seconds`` and ``forward_rows`` already).
    """
    if len(texts) != len(targets):
        raise ValueError(f"{name}: {len(texts)} texts but {len(targets)} targets")
    n = len(texts)
    on_topic = [adherent(t, list(tg)) for t, tg in zip(texts, targets)]
    fluent, ppl = [], []
    for t in texts:
        tokens_ = tokenize(t)
        ok, p = calibration._fluent_tokens(tokens_, judge)
        fluent.append(ok)
        ppl.append(p)
    both = [a and b for a, b in zip(on_topic, fluent)]
    finite = [p for p in ppl if math.isfinite(p)]
    row = {
        "name": name, "role": role, "set": prompt_set, "guidance_scale": guidance_scale, "n": n,
        "samples_per_prompt": samples_per_prompt,
        "fluent_on_topic": sum(both) / n if n else None, "ci": wilson(sum(both), n),
        "on_topic": sum(on_topic) / n if n else None, "fluent": sum(fluent) / n if n else None,
        "judge_ppl_median": statistics.median(finite) if finite else None,
        "seconds_per_sample": None if seconds is None or not n else seconds / n,
        "forward_rows_per_sample": None if forward_rows is None or not n else forward_rows / n,
        "tokens_per_s": None if not seconds or tokens is None else tokens / seconds,
        "examples": [],
    }
    for i in range(min(examples, n)):
        row["examples"].append({"prompt": prompts[i] if prompts else None, "text": texts[i],
                                "on_topic": on_topic[i], "fluent": fluent[i],
                                "judge_ppl": ppl[i] if math.isfinite(ppl[i]) else None})
    return row


def headline(rows: list[dict], guidance_scale: float) -> dict:
    """The figures the issue's targets read, from the test rows (None where a row is missing)."""
    def find(name: str, w: float | None = None) -> dict:
        for r in rows:
            if r["name"] == name and r["set"] in ("test", "implied") and (w is None or r["guidance_scale"] == w):
                return r
        return {}

    at_w, at_0 = find("diffusion", guidance_scale), find("diffusion", 0.0)
    ar = find("AR stage 0")
    out = {
        "guidance_scale": guidance_scale,
        "fluent_on_topic": at_w.get("fluent_on_topic"),
        "fluent_on_topic_w0": at_0.get("fluent_on_topic"),
        "fluent_on_topic_w1": find("diffusion", 1.0).get("fluent_on_topic"),
        "fluent": at_w.get("fluent"),
        "ar_fluent": ar.get("fluent"),
        "implied_fluent_on_topic": find("diffusion (implied topic)", guidance_scale).get("fluent_on_topic"),
        "implied_fluent_on_topic_w0": find("diffusion (implied topic)", 0.0).get("fluent_on_topic"),
        "copy_off_fluent_on_topic": find("diffusion, copy head off", guidance_scale).get("fluent_on_topic"),
        "echo_fluent_on_topic": find("prompt echoed").get("fluent_on_topic"),
        "real_fluent_on_topic": find("real held-out text").get("fluent_on_topic"),
        "tokens_per_s": at_w.get("tokens_per_s"),
        "ar_tokens_per_s": ar.get("tokens_per_s"),
    }
    best = next((r for r in rows if r["set"] == "test" and r["name"].startswith("diffusion, best of ")), {})
    ar_best = next((r for r in rows if r["set"] == "test" and r["name"].startswith("AR stage 0, best of ")), {})
    out["best_of_k"] = best.get("samples_per_prompt")
    out["best_of_k_fluent_on_topic"] = best.get("fluent_on_topic")
    out["best_of_k_fluent"] = best.get("fluent")
    out["ar_best_of_k_fluent"] = ar_best.get("fluent")
    gain = None if out["fluent_on_topic"] is None or out["fluent_on_topic_w0"] is None else (
        out["fluent_on_topic"] - out["fluent_on_topic_w0"])
    out["gain_over_w0"] = gain
    out["fluent_gap_to_ar"] = None if out["fluent"] is None or out["ar_fluent"] is None else (
        out["ar_fluent"] - out["fluent"])
    out["speed_vs_ar"] = None if not out["tokens_per_s"] or not out["ar_tokens_per_s"] else (
        out["tokens_per_s"] / out["ar_tokens_per_s"])
    return out
