"""The README's main job, small: synth -> fit -> apply -> report."""

from __future__ import annotations

import json

import pandas as pd

from harmonize.cli import main


def test_demo_writes_a_report_people_and_machines_can_read(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-q", "--out", str(out), "--sites", "3", "--per-site", "12",
                 "--size", "128"]) == 0
    assert "report:" in capsys.readouterr().out
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2  # one grid per non-reference site
    assert "http" not in html.split("<body>")[1]  # self-contained: nothing fetched
    summary = json.loads((out / "summary.json").read_text())
    assert summary["apply"]["errors"] == 0
    fid = summary["fidelity"]
    assert set(fid) == {"identity", "histogram-matching"}
    assert summary["reference_site"] not in fid["identity"]
    for site, e in fid["histogram-matching"].items():
        lo, hi = e["ssim"]["ci95"]
        assert lo <= e["ssim"]["mean"] <= hi
        assert e["ssim"]["mean"] > fid["identity"][site]["ssim"]["mean"]
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"site", "method", "ssim", "psnr"} <= set(metrics.columns)
    assert (out / "models" / "histogram-matching" / "model.safetensors").is_file()
    assert (out / "shift_report" / "report.html").is_file()
    assert 'href="shift_report/report.html"' in html
    assert set(summary["site_shift"]["site_auc"]) == {"before", "after"}


def test_synth_command_and_its_errors(tmp_path, capsys):
    assert main(["synth", "-q", str(tmp_path / "s"), "--sites", "2", "--per-site", "4",
                 "--size", "64", "--modality", "bonescan"]) == 0
    info = json.loads((tmp_path / "s" / "synth.json").read_text())
    assert info["modality"] == "bonescan" and info["n_images"] == 8
    assert main(["synth", "-q", str(tmp_path / "t"), "--sites", "0"]) == 1
    assert "harmonize: error:" in capsys.readouterr().err
