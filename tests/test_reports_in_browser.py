"""Reports as a reader sees them, in headless Chromium (harmonize.report.browser): the
checker finds what it must, and a federated run's report passes it. The demo, evaluate,
site-shift and study reports are checked where they are made (test_demo, test_tb_study)."""

from __future__ import annotations

import yaml
from report_checks import assert_reads_cleanly_in_a_browser

from harmonize.cli import main
from harmonize.report.browser import check_report, find_browser, problems
from harmonize.report.html import HtmlReport
from harmonize.synth import generate


def test_the_browser_check_finds_what_a_reader_would_hit(tmp_path):
    import pytest

    if find_browser() is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium)")
    good = HtmlReport("good")
    good.answer("All fine.")
    good.paragraph("text")
    clean = check_report(good.save(tmp_path / "good.html"))
    assert problems(clean) == [] and clean["answer"]
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!doctype html><html><body><h1>bad</h1>"
        '<div style="width:2000px">too wide</div>'
        '<img src="https://example.invalid/x.png">'
        '<img src="missing.png"><a href="nowhere.html">link</a>'
        "<script>console.error('boom')</script></body></html>")
    found = check_report(bad)
    assert found["errors"] and "boom" in " ".join(found["errors"])
    assert any("example.invalid" in u for u in found["external_requests"])
    assert found["too_wide"] and found["scroll_width"] > 1280
    assert len(found["broken_images"]) == 2
    assert found["missing_links"] and not found["answer"]
    assert len(problems(found)) == 6


def test_a_federated_run_report_reads_cleanly(tmp_path):
    data = tmp_path / "synth"
    generate(data, sites=3, per_site=12, size=32, seed=0, progress=False,
             prevalence=[0.5, 0.5, 0.5])
    config = tmp_path / "fed.yaml"
    config.write_text(yaml.safe_dump({
        "task": "classifier", "rounds": 2, "threads_per_node": 1,
        "classifier": {"model": {"arch": "cnn", "width": 4}, "image_size": 32,
                       "local_epochs": 1, "batch_size": 8}}))
    out = tmp_path / "run"
    assert main(["federated", "-q", "--config", str(config), "--data",
                 str(data / "manifest.csv"), "--out", str(out)]) == 0
    result = assert_reads_cleanly_in_a_browser(out / "report.html", "federated")
    assert result["images"] == 1 and "classifier" in result["title"]
