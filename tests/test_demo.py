"""The README's main job, small: synth -> fit -> apply -> report."""

from __future__ import annotations

import contextlib
import io
import json

import pandas as pd
import pytest
from report_checks import assert_reads_cleanly_in_a_browser

from harmonize.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["demo", "--quick", "-q", "--out", str(out), "--sites", "3",
                     "--per-site", "24", "--size", "64"]) == 0
    return out, stdout.getvalue()


def test_quick_demo_writes_a_report_people_and_machines_can_read(quick_demo):
    out, printed = quick_demo
    assert "AUC on unseen site_c" in printed and "report:" in printed
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2  # one grid per non-reference site
    assert "http" not in html.split("<body>")[1]  # self-contained: nothing fetched
    for link in ("evaluate/report.html", "evaluate/shift_report/histogram-matching/report.html",
                 "evaluate/shift_report/fourier/report.html",
                 "evaluate/shift_report/texture-matching/report.html"):
        assert f'href="{link}"' in html and (out / link).is_file()
    results = pd.read_csv(out / "results.csv")
    assert {"regime", "translator", "auc", "auc_lo", "auc_hi", "gain_auc"} <= set(
        results.columns)
    assert set(results["regime"]) == {"raw", "augment", "harmonized", "harmonized+augment"}
    summary = json.loads((out / "summary.json").read_text())
    fid = summary["fidelity"]
    assert set(fid) == {"identity", "histogram-matching", "fourier", "texture-matching"}
    assert summary["reference_site"] not in fid["identity"]
    for site, e in fid["histogram-matching"].items():
        lo, hi = e["ssim"]["ci95"]
        assert lo <= e["ssim"]["mean"] <= hi
        assert e["ssim"]["mean"] > fid["identity"][site]["ssim"]["mean"]
    assert set(summary["site_shift"]["histogram-matching"]["site_auc"]) == {"before", "after"}
    # texture matching is the translator that moves the radiomics shift (measured: 17% of
    # features shifted after it, 84% after histogram matching)
    shifted = {t: summary["site_shift"][t]["shifted_feature_share"]["after"]
               for t in ("histogram-matching", "texture-matching")}
    assert shifted["texture-matching"] < 0.5 * shifted["histogram-matching"], shifted
    assert (out / "evaluate" / "audit" / "summary.csv").is_file()


def test_demo_evaluate_and_site_shift_reports_read_cleanly_in_a_browser(quick_demo):
    out, _ = quick_demo
    demo = assert_reads_cleanly_in_a_browser(out / "report.html", "demo")
    assert demo["title"].startswith("harmonize demo (quick run)")
    evaluate = assert_reads_cleanly_in_a_browser(out / "evaluate" / "report.html", "evaluate")
    assert evaluate["images"] >= 3  # AUC plot, ROC, before/after + Grad-CAM grid
    shift = assert_reads_cleanly_in_a_browser(
        out / "evaluate" / "shift_report" / "fourier" / "report.html", "shift_report")
    assert "harmonized by fourier" in shift["title"]


def test_synth_command_and_its_errors(tmp_path, capsys):
    assert main(["synth", "-q", str(tmp_path / "s"), "--sites", "2", "--per-site", "4",
                 "--size", "64", "--modality", "bonescan"]) == 0
    info = json.loads((tmp_path / "s" / "synth.json").read_text())
    assert info["modality"] == "bonescan" and info["n_images"] == 8
    assert main(["synth", "-q", str(tmp_path / "t"), "--sites", "0"]) == 1
    assert "harmonize: error:" in capsys.readouterr().err
