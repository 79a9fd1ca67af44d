"""The training report: one self-contained HTML page and its Markdown twin.

``render_html(summary)``, ``render_markdown(summary)`` and ``write_report(summary, html, md)``
take the summary dict the report stage assembles:

    {"title", "generated_at", "git_commit", "params": {dotted key: value},
     "mlflow": {"tracking_uri", "experiment", "runs": {stage: run_id}},
     "data": meta.json,
     "diagnose": {"status", "checks": [{"name", "status", "value", "threshold", "message"}]},
     "models": {name: {"kind", "description",
                       "curves": {"train": [{"step", "loss", "lr", "tokens_per_s"}],
                                  "val": [{"step", "loss", "ppl", "bpb"}]},
                       "tokens_per_s", "train_seconds",
                       "milestones": [{"step", "checkpoint", "val_loss", "val_ppl", "val_bpb", "tokens",
                                       "samples": [{"prompt", "text"}],
                                       "quality": {"real_word_share", "distinct_1", "distinct_2",
                                                   "repetition_rate", "bigram_share", "judge_ppl",
                                                   "fluent_share", "varied_share"},
                                       "guidance": [{"scale", "adherence", "fluent_on_topic", "n", "ci": [lo, hi],
                                                     "prompt_set", "samples_per_prompt", "seconds",
                                                     "quality": {...},
                                                     "samples": [{"prompt", "text", "adherent", "fluent"}]}],
                                       "guidance_test": [...] (best diffusion milestone: the reported curve)}],
                       "best": {"step", "rule"}, "is_control": bool,
                       "checklist": [{"name", "passed", "value", "criterion", "step"}]}},
     "judge": {"kind", "order", "identity", "fit_on", "seconds", "rule", "calibration"} (sunfish.evaluation.judge),
     "components": [{"component", "stage", "control", "step", "stage_bpb", "control_bpb", "delta_bpb",
                     "stage_seeds", "control_seeds", "se_bpb", "extra_steps_bpb", "extra_steps_measurable",
                     "basis", "verdict", "final", "text"}] (sunfish.evaluation.components),
     "stage_comparison": [{"model", "val_bpb", "delta_bpb_vs_previous", "tokens_per_s", "control"}],
     "next_steps": [str]}

Any key may be missing or None. Controls (control_N, or is_control) appear in the curves, the
stage comparison and the component table, never as a sample section. Run ids become links to the
MLflow UI when the tracking URI is an http(s) server. ``line_chart`` (sunfish.report.svg) is the SVG plot helper.
"""

from sunfish.report.render import render_html, render_markdown, write_report
from sunfish.report.svg import line_chart

__all__ = ["render_html", "render_markdown", "write_report", "line_chart"]
