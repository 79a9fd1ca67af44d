"""report.html as a user sees it: rendered by headless Chromium from a realistic summary.

No pipeline run is needed: the summary is the one tests/test_report.py checks field by field.
Here the question is whether a browser shows it: the screenshot is not blank and the plot lines
are drawn in their colours, the DOM after load holds every plot, the samples and a checklist with
measured values. A missing Chromium fails the test (see tests/browser.py).
"""

from __future__ import annotations

import re
from html import unescape

import pytest

from sunfish.report import write_report
from sunfish.report.svg import PALETTE
from tests.browser import colour_share, dump_dom, png_is_blank, png_stats, screenshot
from tests.test_report import make_summary

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    summary = make_summary()
    html_path, _ = write_report(summary, out / "report.html", out / "report.md")
    return summary, html_path


def test_blank_detector_tells_an_empty_page_from_a_report(tmp_path, report):
    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body></body></html>", encoding="utf-8")
    assert png_is_blank(screenshot(empty, tmp_path / "empty.png", 800, 600))
    _, html_path = report
    shot = screenshot(html_path, tmp_path / "top.png", 1280, 1000)
    assert not png_is_blank(shot), png_stats(shot)


def test_report_renders_plots_samples_and_measured_checklist(tmp_path, report):
    summary, html_path = report
    shot = screenshot(html_path, tmp_path / "report.png", 1280, 9000)
    stats = png_stats(shot)
    assert not png_is_blank(shot), stats
    # the plot lines are drawn: the first two series colours (train/val, adherence) cover visible area
    assert colour_share(shot, PALETTE[0]) > 5e-4 and colour_share(shot, PALETTE[1]) > 5e-4, stats

    dom = dump_dom(html_path)
    # every plot survived parsing: 2 per model with curves (5) + 3 guidance charts, each with lines
    assert dom.count("<svg") == 13
    assert dom.count("<polyline") >= 13
    # samples per milestone, side by side (one column per step), controls not among them
    samples = dom[dom.index('id="samples"') :]
    assert "stage_1 s200: there was a little cat who liked to play." in unescape(samples)
    assert all(f"step {s}" in samples for s in (100, 200, 300))
    assert "CONTROL SAMPLE" not in dom
    # the checklist shows a verdict and the measured value for each model
    table = re.search(r'<table class="checklist">(.*?)</table>', dom, re.S).group(1)
    rows = {re.sub(r"<[^>]+>", "", r.split("</td>")[0]).strip(): r for r in re.findall(r"<tr>(.*?)</tr>", table, re.S)}
    for item in ("loss below 2.0", "real words", "coherent sentences"):
        assert item in rows, list(rows)
    loss = next(i for i in summary["models"]["stage_2"]["checklist"] if i["name"] == "loss below 2.0")
    assert f"{loss['value']:.4g}" in rows["loss below 2.0"] and "pass" in rows["loss below 2.0"]
    assert "0.6667" in rows["coherent sentences"]  # share of stage_2's best samples the judge calls fluent
    assert "What each component adds" in dom and "TEMPORAL" in dom
