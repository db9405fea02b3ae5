"""`harmonize shift-report` end to end on synthetic and real two-site data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from harmonize.cli import main
from harmonize.radiomics.shift_report import run_shift_report
from harmonize.synth import generate

FAST = {"workers": 1, "n_boot": 50, "progress": False}


@pytest.fixture(scope="module")
def synth_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("shift")
    for name, no_shift in (("shift", False), ("control", True)):
        generate(root / name, sites=3, per_site=15, size=96, seed=5, no_shift=no_shift,
                 progress=False)
    return root


def test_synthetic_sites_are_detected_and_the_no_shift_control_is_not(synth_pair, tmp_path):
    shifted = run_shift_report(synth_pair / "shift" / "manifest.csv", tmp_path / "a",
                               cache_dir=tmp_path / "cache", **FAST)
    control = run_shift_report(synth_pair / "control" / "manifest.csv", tmp_path / "b",
                               cache_dir=tmp_path / "cache", **FAST)
    assert shifted["site_auc"] > 0.9 and control["site_auc"] < 0.65
    assert shifted["shifted_feature_share"] > 0.5 > 0.1 > control["shifted_feature_share"]
    for out in (tmp_path / "a", tmp_path / "b"):
        summary = json.loads((out / "summary.json").read_text())
        for key in ("site_auc", "site_balanced_accuracy", "shifted_feature_share",
                    "n_images", "n_features", "distances"):
            assert key in summary
        assert summary["n_images"] == 45
        assert len(pd.read_csv(out / "features.csv")) == 45
        assert "data:image/png;base64," in (out / "report.html").read_text()
    d_shift = json.loads((tmp_path / "a" / "summary.json").read_text())["distances"]
    d_ctrl = json.loads((tmp_path / "b" / "summary.json").read_text())["distances"]
    for site in d_shift:
        assert d_shift[site]["frd_ci95"][0] > d_ctrl[site]["frd_ci95"][1]


def test_compare_measures_the_same_images_before_and_after(synth_pair, tmp_path):
    data = synth_pair / "shift" / "manifest.csv"
    assert main(["train", "histogram-matching", "-q", "--data", str(data),
                 "--reference-site", "site_a", "--out", str(tmp_path / "hm")]) == 0
    assert main(["apply", "-q", "--model", str(tmp_path / "hm"), str(data),
                 str(tmp_path / "harmonized")]) == 0
    s = run_shift_report(data, tmp_path / "r", compare_with=tmp_path / "harmonized",
                         cache_dir=tmp_path / "cache", reference_site="site_a", **FAST)
    change = {r["measure"]: r for r in s["change"]}
    assert {"site_auc", "site_balanced_accuracy", "shifted_feature_share"} <= set(change)
    info = json.loads((synth_pair / "shift" / "synth.json").read_text())
    inverted = [k for k, v in info["acquisition"].items() if v["inverted"]]
    for site in inverted:  # histogram matching with its polarity check fixes these most
        assert change[f"frd[{site}]"]["after"] < 0.5 * change[f"frd[{site}]"]["before"]
    assert (tmp_path / "r" / "features_harmonized.csv").is_file()
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Before / after harmonization" in html


def test_real_two_sites_are_shifted_and_the_families_named(tb_cxr, tmp_path):
    df = pd.read_csv(tb_cxr / "manifest.csv")
    sub = pd.concat([g[g["lung_mask"].notna()].head(20)
                     for _, g in df.groupby("site")])
    for col in ("path", "lung_mask"):
        sub[col] = [str(tb_cxr / p) for p in sub[col]]
    sub.to_csv(tmp_path / "m.csv", index=False)
    s = run_shift_report(tmp_path / "m.csv", tmp_path / "r", mask_column="lung_mask",
                         cache_dir=tmp_path / "cache", **FAST)
    assert s["site_auc"] > 0.9 and s["shifted_feature_share"] > 0.3
    families = s["shift_by_family"]
    assert {"firstorder", "glcm", "shape2D"} <= set(families)
    top = max(families, key=lambda f: families[f]["mean_epsilon_sq"])
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Which feature families carry the shift" in html and top in html


def test_bad_inputs_are_reported_and_the_rest_still_analysed(synth_pair, tmp_path):
    src = synth_pair / "shift"
    df = pd.read_csv(src / "manifest.csv")
    df = df[df["site"] != "site_c"].copy()
    # an all-zero image, a mask of the wrong size, and a site with only two images
    zero = tmp_path / "zero.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((96, 96), np.uint16)), str(zero))
    small_mask = tmp_path / "small_mask.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((50, 50), 255, np.uint8)), str(small_mask))
    df["path"] = [str(src / p) for p in df["path"]]
    df["mask"] = [str(src / p) for p in df["mask"]]
    df.iloc[0, df.columns.get_loc("path")] = str(zero)
    df.iloc[1, df.columns.get_loc("mask")] = str(small_mask)
    tiny = df.iloc[2:4].copy().assign(site="tiny", patient_id=["t1", "t2"])
    tiny["path"] = [shutil.copy(p, tmp_path / f"tiny{i}.png")
                    for i, p in enumerate(tiny["path"])]
    pd.concat([df, tiny]).to_csv(tmp_path / "m.csv", index=False)
    s = run_shift_report(tmp_path / "m.csv", tmp_path / "r", cache_dir=tmp_path / "cache",
                         **FAST)
    errors = pd.read_csv(tmp_path / "r" / "errors.csv")
    reasons = " | ".join(errors["error"])
    assert len(errors) == 2 and "constant image" in reasons and "size" in reasons
    assert any("tiny" in n and "2 image" in n for n in s["notes"])
    assert s["n_images"] == 28 and s["sites"] == ["site_a", "site_b"]
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Problems" in html and "zero.png" in html


def test_without_masks_a_perfect_harmonization_is_measured_as_one(synth_pair, tmp_path):
    """No manifest masks: the ROI is the body found on the harmonized copy, used for
    both sets. Here the harmonized copy is the paired truth (every patient as the
    reference site renders it), so after it no site may stand out; a body mask found on
    the originals (shutters, inverted exports) would carry the sites into "after"."""
    df = pd.read_csv(synth_pair / "shift" / "manifest.csv").drop(columns=["mask"])
    manifest = synth_pair / "shift" / "manifest_without_masks.csv"
    df.to_csv(manifest, index=False)
    truth = synth_pair / "shift" / "reference"
    s = run_shift_report(manifest, tmp_path / "r", compare_with=truth,
                         cache_dir=tmp_path / "cache", reference_site="site_a", **FAST)
    assert s["before"]["site_auc"] > 0.9
    assert s["after"]["site_auc"] < 0.75
    assert any("automatic body mask of their harmonized copy" in n for n in s["notes"])
    masks = sorted((tmp_path / "r" / "roi_masks").rglob("*.auto.png"))
    assert len(masks) == len(df)
    features = pd.read_csv(tmp_path / "r" / "features_harmonized.csv")
    assert set(features["mask_source"]) <= {"otsu", "border"}  # automatic, not "manifest"
    assert not [c for c in features.columns if "_shape2D_" in c and features[c].notna().any()]
