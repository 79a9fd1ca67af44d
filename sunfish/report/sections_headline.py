"""The card at the top of the report: the answer before the tables.

Someone who waited an hour for a CPU run wants to know, in four lines, which model is best, how
good it is on text it never saw, what it writes, and whether the prompt-conditioned diffusion model
works. Every figure here is one the sections below show in full, with their reference rows.
"""

from __future__ import annotations

from sunfish.report import html as H
from sunfish.report import markdown as M
from sunfish.report.access import as_dict, as_list, best_milestone, finite, is_control, models_of
from sunfish.report.fmt import pct

__all__ = ["best_language_model", "diffusion_sentence", "lines", "to_html", "to_markdown"]

SAMPLE_CHARS = 320


def best_language_model(s: dict) -> tuple[str, dict, dict] | None:
    """(name, model, best milestone) of the autoregressive model with the lowest held-out bpb."""
    models, names = models_of(s)
    best = None
    for name in names:
        model = as_dict(models.get(name))
        if model.get("kind") != "staged" or is_control(name, model):
            continue
        m = best_milestone(model)
        bpb = finite(as_dict(m).get("val_bpb"))
        if bpb is not None and (best is None or bpb < best[0]):
            best = (bpb, name, model, m)
    return None if best is None else best[1:]


def _sample(m: dict) -> str | None:
    for x in as_list(m.get("samples")):
        text = str(as_dict(x).get("text") or "").strip()
        if text:
            return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS].rsplit(" ", 1)[0] + " …"
    return None


def diffusion_sentence(s: dict) -> str:
    """The diffusion model's status in one sentence, from the fluency stage's test rows."""
    h = as_dict(as_dict(s.get("fluency")).get("headline"))
    if not h or h.get("fluent_on_topic") is None:
        return "The diffusion model was not measured in this run (no evaluate_fluency results)."
    n = next((r.get("n") for r in as_list(as_dict(s.get("fluency")).get("rows"))
              if as_dict(r).get("set") == "test" and as_dict(r).get("name") == "diffusion"), None)
    prompts = f"{n} held-out test prompts" if n else "the held-out test prompts"
    w = h.get("guidance_scale")
    if not isinstance(w, (int, float)):
        return "The diffusion model's guidance scale is missing from the results."
    k = h.get("best_of_k")
    selection = (f" Keeping its own most likely of {k} samples (k times the compute) gives "
                 f"{pct(h.get('best_of_k_fluent_on_topic'))}." if k and h.get("best_of_k_fluent_on_topic") is not None
                 else "")
    return (f"The diffusion model writes fluent, on-topic text for {pct(h.get('fluent_on_topic'))} of "
            f"{prompts} at guidance {w:g} ({pct(h.get('fluent_on_topic_w0'))} with the prompt dropped, "
            f"{pct(h.get('real_fluent_on_topic'))} for the real stories); when the topic is only implied "
            f"it manages {pct(h.get('implied_fluent_on_topic'))}, and its samples are fluent "
            f"{pct(h.get('fluent'))} of the time against {pct(h.get('ar_fluent'))} for stage 0.{selection}")


def lines(s: dict) -> list[tuple[str, str]]:
    """(label, text) of the card."""
    out: list[tuple[str, str]] = []
    found = best_language_model(s)
    if found is None:
        out.append(("Best model", "No autoregressive model was evaluated in this run."))
    else:
        name, _, m = found
        tokens = m.get("tokens")
        scope = f"{int(tokens):,} held-out tokens" if isinstance(tokens, (int, float)) else "held-out text"
        out.append(("Best model", f"{name} at step {m.get('step')}: {float(m['val_bpb']):.3f} bits per byte on "
                                  f"{scope} (lower is better; the test half of the validation split)."))
        sample = _sample(m)
        if sample:
            out.append(("It writes", sample))
    out.append(("Diffusion model", diffusion_sentence(s)))
    return out


def to_html(s: dict) -> str:
    items = "".join(f"<dt>{H.esc(label)}</dt><dd>{H.esc(text)}</dd>" for label, text in lines(s))
    return H.section("glance", "At a glance", [f'<dl class="card">{items}</dl>'])


def to_markdown(s: dict) -> list[str]:
    out = ["## At a glance", ""]
    for label, text in lines(s):
        out += [f"- **{M.esc(label)}:** {M.esc(text)}"]
    return out + [""]


