"""The privacy sweep of eval/federated_privacy.py: the DP config sections, the settings'
task defaults, the translator summary (CI over images, share of the non-private gain),
one real federated histogram sweep at two epsilons, and the files and figures written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harmonize.evaluation.privacy_benchmark import (
    DELTA,
    PrivacySettings,
    label,
    plot_combined,
    privacy,
    run_privacy_benchmark,
    translator_summary,
    write_outputs,
)

CI = ["ssim", "ssim_lo", "ssim_hi"]


def test_privacy_sections_and_labels():
    assert privacy(math.inf) is None
    assert privacy(math.inf, {"patients_per_step": 4}) is None
    assert privacy(10.0) == {"mode": "patient-dp", "epsilon": 10.0, "delta": DELTA}
    assert privacy(3, {"patients_per_step": None}) == {
        "mode": "patient-dp", "epsilon": 3, "delta": 1e-5, "patients_per_step": None}
    assert [label(e) for e in (math.inf, 50.0, 10, 3.0, 0.5)] == ["inf", "50", "10", "3", "0.5"]
    assert label(float("inf")) == "inf"


def test_settings_defaults_follow_the_task(tmp_path: Path):
    ddib = PrivacySettings(task="ddib", out=str(tmp_path))
    assert (ddib.per_site, ddib.steps, ddib.runs) == (40, 200, tmp_path / "runs")
    assert ddib.epsilons == [math.inf, 50, 10, 3] and ddib.seeds == [0, 1, 2]
    assert ddib.size == 64 and isinstance(ddib.out, Path)
    cyclegan = PrivacySettings(task="cyclegan", out=tmp_path, runs=str(tmp_path / "r"))
    assert (cyclegan.per_site, cyclegan.steps, cyclegan.runs) == (40, 300, tmp_path / "r")
    classifier = PrivacySettings(task="classifier", out=tmp_path, per_site=12, steps=7)
    assert (classifier.per_site, classifier.steps) == (12, 7)
    assert PrivacySettings(task="classifier", out=tmp_path).per_site == 100
    with pytest.raises(ValueError, match="choose one of ddib, cyclegan, histogram"):
        PrivacySettings(task="cut", out=tmp_path)


def test_translator_summary_share_of_nonprivate_gain():
    rng = np.random.default_rng(0)
    paths = [f"site_b/{i}.png" for i in range(20)]
    ident = rng.uniform(0.3, 0.4, 20)
    per_method = {"identity": ident, "eps inf": ident + 0.4,
                  "eps 10": ident + 0.2 + rng.normal(0, 0.01, 20)}
    per = pd.concat([pd.DataFrame({"method": m, "seed": 0, "relpath": paths, "ssim": v})
                     for m, v in per_method.items()])
    results = pd.DataFrame({"epsilon": ["inf", "10"], "seed": 0,
                            "ssim": [per_method["eps inf"].mean(), per_method["eps 10"].mean()],
                            "noise_multiplier": [None, 0.5], "sample_rate": [None, 1.0],
                            "wall_s": [3.0, 4.0]})
    table = translator_summary(per, results, "federated histogram matching",
                               [math.inf, 10.0]).set_index("epsilon")
    assert list(table.index) == ["inf", "10"]
    assert table.loc["inf", "share_of_nonprivate_gain"] == pytest.approx(1.0)
    assert table.loc["10", "share_of_nonprivate_gain"] == pytest.approx(0.5, abs=0.05)
    assert table.loc["inf", "identity"] == pytest.approx(ident.mean())
    for eps in ("inf", "10"):
        assert table.loc[eps, "ssim_lo"] < table.loc[eps, "ssim"] < table.loc[eps, "ssim_hi"]
    assert np.isnan(table.loc["inf", "noise_multiplier"])
    assert table.loc["10", "noise_multiplier"] == 0.5 and table.loc["10", "wall_s"] == 4.0


@pytest.mark.slow  # two Flower simulations: ~25 s on 2 cores (patient DP itself is tested
# in the default suite: tests/test_patient_dp.py)
def test_histogram_sweep_with_and_without_dp(tmp_path: Path):
    """Federated histogram matching (Flower simulation) at epsilon inf and 10, one seed,
    on a tiny benchmark: the DP release changes the translation, the summary has its CIs,
    and every output file of the eval script is written."""
    settings = PrivacySettings(task="histogram", out=tmp_path, seeds=[0],
                               epsilons=[math.inf, 10.0], per_site=8, size=32)
    results, table = run_privacy_benchmark(settings)

    assert list(results["epsilon"]) == ["inf", "10"]
    nonprivate, dp = results.iloc[0], results.iloc[1]
    assert dp["ssim"] != nonprivate["ssim"]  # the landmarks carry Gaussian noise
    assert pd.isna(nonprivate["noise_multiplier"]) and pd.isna(nonprivate["spent_epsilon"])
    assert dp["noise_multiplier"] > 0 and 0 < dp["spent_epsilon"] <= 10.0 + 1e-6
    for run in ("hm8_s0", "hm8_dp10_s0"):
        assert (tmp_path / "runs" / run / "summary.json").is_file()

    assert list(table.columns) == [
        "method", "epsilon", *CI, "identity", "share_of_nonprivate_gain", "ssim_per_seed",
        "noise_multiplier", "sample_rate", "wall_s"]
    assert set(table["method"]) == {"federated histogram matching"}
    assert (table["ssim_lo"] <= table["ssim"]).all() and (table["ssim"] <= table["ssim_hi"]).all()
    assert table["share_of_nonprivate_gain"].iloc[0] == pytest.approx(1.0)
    assert table["ssim"].iloc[0] > table["identity"].iloc[0]  # matching helps without DP

    for name in ("results.csv", "summary.csv", "summary.md", "epsilon_quality.png",
                 "scores.csv", "per_image.csv"):
        assert (tmp_path / name).is_file(), name
    saved = pd.read_csv(tmp_path / "results.csv")
    assert list(saved.columns) == ["epsilon", "seed", "ssim", "spent_epsilon",
                                   "noise_multiplier", "sample_rate", "dp_steps", "wall_s"]
    per = pd.read_csv(tmp_path / "per_image.csv")
    assert set(per["method"]) == {"identity", "eps inf", "eps 10"}
    assert json.loads((tmp_path / "runs" / "hm8_dp10_s0" / "summary.json").read_text())


def test_outputs_and_the_combined_figure(tmp_path: Path):
    classifier = pd.DataFrame({
        "method": "federated CNN (GroupNorm)",
        "test": ["held-out patients"] * 2 + ["unseen site (site_d)"] * 2,
        "epsilon": ["inf", "10"] * 2, "auc": [0.9, 0.8, 0.7, 0.6],
        "auc_lo": [0.85, 0.7, 0.6, 0.5], "auc_hi": [0.95, 0.9, 0.8, 0.7],
        "auc_per_seed": ["0.900", "0.800", "0.700", "0.600"], "seconds": 5.0})
    results = pd.DataFrame({"epsilon": ["inf", "10"], "seed": 0, "test": "held-out patients",
                            "auc": [0.9, 0.8]})
    cls_dir, tr_dir = tmp_path / "cls", tmp_path / "tr"
    cls_dir.mkdir()
    write_outputs(cls_dir, "classifier", results, classifier)
    assert pd.read_csv(cls_dir / "results.csv").shape == (2, 4)
    saved = pd.read_csv(cls_dir / "summary.csv", dtype={"epsilon": str})
    assert list(saved.columns) == list(classifier.columns)
    assert list(saved["epsilon"]) == ["inf", "10"] * 2
    np.testing.assert_allclose(saved[["auc", "auc_lo", "auc_hi"]],
                               classifier[["auc", "auc_lo", "auc_hi"]])
    md = (cls_dir / "summary.md").read_text().splitlines()
    assert md[0].startswith("| method | test | epsilon | auc | auc_lo | auc_hi |")
    assert len(md) == 2 + len(classifier)
    assert Image.open(cls_dir / "epsilon_quality.png").size == (550, 374)

    translator = pd.DataFrame({"method": "federated histogram matching",
                               "epsilon": ["inf", "10"], "ssim": [0.7, 0.55],
                               "ssim_lo": [0.65, 0.5], "ssim_hi": [0.75, 0.6],
                               "identity": 0.32})
    tr_dir.mkdir()
    write_outputs(tr_dir, "histogram", translator.iloc[:, :2], translator)
    assert Image.open(tr_dir / "epsilon_quality.png").size == (550, 374)

    # epsilon read back from summary.csv as a number ("inf" -> inf): labelled again
    figure = tmp_path / "combined.png"
    plot_combined([tr_dir, cls_dir, tmp_path / "missing"], figure)
    assert Image.open(figure).size == (1045, 396)
