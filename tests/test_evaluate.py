"""`harmonize evaluate` end to end on a tiny synthetic benchmark, and its audit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from harmonize.cli import main
from harmonize.configs import ConfigError, dump_config
from harmonize.evaluation.audit import finding_contrast, findings_exaggerated, outside_share
from harmonize.evaluation.config import load_eval_config
from harmonize.synth import make_phantom

REQUIRED = ["regime", "translator", "classifier", "protocol", "test_site", "seed", "auc",
            "auc_lo", "auc_hi", "accuracy", "sensitivity", "specificity", "f1"]


def tiny_config(tmp_path, **extra) -> str:
    config = {
        "data": {"synth": {"sites": 3, "per_site": 24, "size": 64, "seed": 0,
                           "prevalence": [0.5, 0.75, 0.5], "finding_scale": 2.5},
                 "image_size": 32, "internal_test_size": 0.3},
        "translators": [{"name": "histogram-matching"}, {"name": "fourier"}],
        "classifiers": [{"arch": "cnn", "width": 8}],
        "protocols": [{"kind": "external", "train_sites": ["site_a", "site_b"],
                       "test_site": "site_c"}],
        "seeds": [0],
        "train": {"epochs": 2, "batch_size": 16, "progress": False},
        "bootstrap": 200,
        "audit": {"gradcam_images": 2},
        **extra,
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    out = tmp / "run"
    assert main(["evaluate", "-q", "--config", tiny_config(tmp), "--out", str(out)]) == 0
    return tmp, out


def test_results_have_one_row_per_cell_with_cis_and_gains(evaluated):
    _, out = evaluated
    r = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""])
    assert REQUIRED == [c for c in r.columns if c in REQUIRED]
    # raw, augment, 2 x harmonized, 2 x harmonized+augment; each scored on site_c and
    # on held-out patients of the training sites
    assert len(r) == 6 * 2
    assert set(r["protocol"]) == {"external", "internal"}
    assert set(r.loc[r["protocol"] == "external", "test_site"]) == {"site_c"}
    assert set(r["translator"].fillna("")) == {"", "histogram-matching", "fourier"}
    assert (r["auc_lo"] <= r["auc"]).all() and (r["auc"] <= r["auc_hi"]).all()
    # the gain is measured against the (only) augmentation run
    assert set(r["baseline"]) == {"augment"}
    aug = r["regime"] == "augment"
    assert r.loc[aug, "gain_auc"].isna().all()
    assert r.loc[~aug, "gain_p"].between(0, 1).all()
    assert set(r.loc[r["regime"].str.startswith("harmonized"), "reference"]) == {"fixed"}
    assert (r.loc[r["protocol"] == "external", "n"] == 24).all()
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == r["n"].sum()


def test_report_is_self_contained_and_audit_reaches_the_apply_log(evaluated):
    _, out = evaluated
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3  # AUC plot, ROC, image grid
    assert "http" not in html.split("<body>")[1]
    assert "Hallucination audit" in html and "results.csv" in html
    assert (out / "results.md").read_text().startswith("# Downstream evaluation")
    audit = pd.read_csv(out / "audit" / "summary.csv")
    assert list(audit["translator"]) == ["raw", "histogram-matching", "fourier"]
    assert (audit["flip_rate_before_after"].iloc[0]) == 0  # raw vs raw: nothing moves
    assert audit["finding_contrast_ratio"].notna().all()
    log = pd.read_csv(out / "translators" / "fourier" / "images" / "apply_log.csv")
    assert {"p_before", "p_after", "risk", "risk_reason"} <= set(log.columns)
    assert log["p_after"].notna().sum() == audit["n"].iloc[0]


def test_same_config_and_seed_give_the_same_numbers(evaluated):
    tmp, out = evaluated
    again = tmp / "again"
    assert main(["evaluate", "-q", "--config", tiny_config(tmp), "--out", str(again)]) == 0
    a = pd.read_csv(out / "results.csv")
    b = pd.read_csv(again / "results.csv")
    pd.testing.assert_frame_equal(a, b)


def test_test_time_harmonization_scores_the_untouched_raw_models(tmp_path):
    """reference: both. Under train, the raw / augmented models are scored on the unseen
    site's images translated to the training site (site_b, not the fixed reference site_a):
    with the identity translator their predictions are exactly the raw-image ones."""
    out = tmp_path / "run"
    config = tiny_config(
        tmp_path, translators=[{"name": "identity"}, {"name": "histogram-matching"}],
        regimes=["raw", "augment", "acquisition", "harmonized", "harmonized+augment"],
        protocols=[{"kind": "external", "train_sites": ["site_b"], "test_site": "site_c",
                    "reference": "both"}])
    assert main(["evaluate", "-q", "--config", config, "--out", str(out)]) == 0
    r = pd.read_csv(out / "results.csv", keep_default_na=False)
    test_time = r[r["reference"] == "train"]
    # 2 regimes x 2 translators, external site only (the training site is not translated)
    assert len(test_time) == 4 and set(test_time["protocol"]) == {"external"}
    assert set(test_time["reference_site"]) == {"site_b"}
    assert set(r.loc[r["reference"] == "fixed", "reference_site"]) == {"site_a"}
    p = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    ext = p[p["protocol"] == "external"]

    def scores(regime, translator="", reference=""):
        g = ext[(ext["regime"] == regime) & (ext["translator"] == translator)
                & (ext["reference"] == reference)]
        return g.sort_values("row")["p"].to_numpy()

    np.testing.assert_array_equal(scores("harmonized", "identity", "train"), scores("raw"))
    np.testing.assert_array_equal(scores("harmonized+augment", "identity", "train"),
                                  scores("augment"))
    # a real translation changes what the same model sees
    assert not np.allclose(scores("harmonized", "histogram-matching", "train"), scores("raw"))
    # the copy for test time maps to site_b: site_b passes unchanged, site_c does not
    from harmonize.data.io import read_image
    from harmonize.data.manifest import load_manifest

    m = load_manifest(out / "translators" / "histogram-matching-to-site_b" / "manifest.csv")
    assert (out / "translators" / "histogram-matching" / "manifest.csv").is_file()
    raw = load_manifest(out / "data" / "manifest.csv")  # the same rows in the same order
    b, c = (int(np.flatnonzero(m["site"] == s)[0]) for s in ("site_b", "site_c"))
    assert np.array_equal(read_image(m["path"][b]).array, read_image(raw["path"][b]).array)
    assert not np.array_equal(read_image(m["path"][c]).array,
                              read_image(raw["path"][c]).array)
    # gains against the stronger augmentation, with the in-site gap
    assert set(r["baseline"]) <= {"augment", "acquisition"} and r["baseline"].nunique() <= 2
    table = pd.read_csv(out / "summary_table.csv", keep_default_na=False, na_values=[""])
    ext_rows = table[table["protocol"] == "external"]
    assert ext_rows["in_site_auc"].notna().all()
    harmonized = ext_rows[ext_rows["regime"].str.startswith("harmonized")]
    assert harmonized[["gain", "gain_lo", "gain_hi"]].notna().all().all()
    assert (harmonized["gain_lo"] <= harmonized["gain"] + 1e-9).all()


def test_regimes_are_values_written_back_by_name(tmp_path):
    config = load_eval_config(tiny_config(tmp_path, regimes=[
        "raw", "acquisition", "harmonized", "harmonized+acquisition"]))
    assert [r.augment for r in config.regimes] == ["none", "acquisition", "none",
                                                    "acquisition"]
    assert [r.is_baseline for r in config.regimes] == [False, True, False, False]
    assert config.regimes[3].test_time_model == "acquisition"
    dump_config(config, tmp_path / "resolved.yaml")  # what a run writes beside its results
    assert load_eval_config(tmp_path / "resolved.yaml").regimes == config.regimes
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["regimes"][3] == (
        "harmonized+acquisition")


def test_config_mistakes_are_named_before_training(tmp_path):
    with pytest.raises(ConfigError, match="test_site"):
        load_eval_config(tiny_config(tmp_path, protocols=[{"kind": "external",
                                                           "train_sites": ["site_a"]}]))
    with pytest.raises(ConfigError, match="need at least one translator"):
        load_eval_config(tiny_config(tmp_path, translators=[]))
    with pytest.raises(ConfigError, match="include 'augment' or 'acquisition'"):
        load_eval_config(tiny_config(tmp_path, regimes=["raw"]))
    with pytest.raises(ConfigError, match="unknown regime 'harmonised'"):
        load_eval_config(tiny_config(tmp_path, regimes=["augment", "harmonised"]))
    with pytest.raises(ConfigError, match="regimes are repeated"):
        load_eval_config(tiny_config(tmp_path, regimes=["augment", "harmonized", "augment"]))
    with pytest.raises(ConfigError, match=r"add \['raw'\] to regimes"):
        load_eval_config(tiny_config(tmp_path, regimes=["augment", "harmonized"], protocols=[
            {"kind": "external", "train_sites": ["site_a"], "test_site": "site_c",
             "reference": "train"}]))
    with pytest.raises(ConfigError, match="reference_site site_c must be one of the training"):
        load_eval_config(tiny_config(tmp_path, protocols=[
            {"kind": "external", "train_sites": ["site_a", "site_b"], "test_site": "site_c",
             "reference": "train", "reference_site": "site_c"}]))
    assert main(["evaluate", "-q", "--config", tiny_config(
        tmp_path, translators=[{"name": "magic"}]), "--out", str(tmp_path / "o")]) == 1
    assert main(["evaluate", "-q", "--config", tiny_config(
        tmp_path, translators=[{"name": "cg", "kind": "cyclegan"}]),
        "--out", str(tmp_path / "o")]) == 1
    from harmonize.evaluation.config import TranslatorSpec
    from harmonize.evaluation.harmonized_sets import check_specs

    with pytest.raises(ConfigError, match="'hm': federated needs kind cyclegan or diffusion"):
        check_specs([TranslatorSpec(name="hm", kind="histogram-matching", federated=True)])


def test_finding_contrast_ignores_style_but_sees_an_erased_finding():
    ph = make_phantom("xray", 128, True, np.random.default_rng(0), finding_scale=2.0)
    x = ph.ideal / ph.ideal.max()
    c = finding_contrast(x, ph.finding, ph.roi)
    assert c > 0.05  # 0.13 ROI sd for this nodule (measured)
    # a global gain and offset (pure style) leaves it unchanged
    assert finding_contrast(0.3 + 0.5 * x, ph.finding, ph.roi) == pytest.approx(c, rel=1e-4)
    # painting the finding over with its surroundings erases it
    erased = x.copy()
    from scipy import ndimage

    ring = ndimage.binary_dilation(ph.finding, iterations=3) & ~ph.finding
    erased[ph.finding] = x[ring].mean()
    assert abs(finding_contrast(erased, ph.finding, ph.roi)) < 0.1 * c


def test_restoring_a_blurred_finding_is_not_exaggerating_it():
    """Contrast x3 against a blurred input that held a third of the truth's contrast is a
    restoration; x3 against both input and truth is an exaggeration; without a truth,
    more than doubling the input's contrast counts."""
    ratio = np.array([3.0, 3.0, 3.0, 1.5])
    vs_truth = np.array([1.0, 3.0, np.nan, 4.0])
    np.testing.assert_array_equal(findings_exaggerated(ratio, vs_truth, 2.0),
                                  [False, True, True, False])


def test_gradcam_share_outside_roi():
    maps = np.zeros((2, 4, 4))
    maps[0, :2] = 1.0  # all mass in the top half
    roi = np.zeros((2, 4, 4), bool)
    roi[:, 2:] = True
    share = outside_share(maps, roi)
    assert share[0] == 1.0 and np.isnan(share[1])  # an all-zero map has no share


def test_a_rerun_reuses_a_finished_identical_translator_training_only(tmp_path):
    from harmonize.configs import dump_config
    from harmonize.evaluation.harmonized_sets import _finished_same_run
    from harmonize.translators.cyclegan.config import load_config

    run = tmp_path / "run"
    config = load_config(None, {"train.out": str(run), "train.steps": 10})
    assert not _finished_same_run(run, config)  # nothing there
    (run / "model").mkdir(parents=True)
    dump_config(config, run / "config.yaml")
    assert not _finished_same_run(run, config)  # unfinished: no weights
    (run / "model" / "model.safetensors").write_bytes(b"x")
    assert _finished_same_run(run, config)
    config.train.progress = False  # showing a progress bar is not a different training
    assert _finished_same_run(run, config)
    assert not _finished_same_run(run, load_config(None, {"train.out": str(run),
                                                          "train.steps": 11}))


def test_gradcam_highlights_what_drives_the_logit():
    """The map sits where the only structure of the image drives the logit."""
    import torch

    from harmonize.classify.networks import Classifier
    from harmonize.evaluation.audit import gradcam_maps

    torch.manual_seed(0)
    model = Classifier("cnn", 32, width=4).eval()
    with torch.no_grad():  # all weights positive: the logit grows with every activation
        for p in model.parameters():
            p.abs_()
    x = torch.zeros(1, 1, 32, 32)
    x[..., :8, :8] = 1.0  # the only structure in the image
    cam = gradcam_maps(model, x)[0]
    assert cam.shape == (32, 32) and cam.min() >= 0 and cam.max() == 1
    assert cam[:8, :8].mean() > 0.9 and cam[16:, 16:].mean() < 0.1  # 0.99 / 0.05 measured


def test_harmonized_copy_of_a_manifest_kept_away_from_its_images(synth3, tmp_path):
    """A manifest in another folder than its images (a derived one, beside a run): the
    harmonized manifest names the files apply wrote (the study's split_nodes case)."""
    from harmonize.data.manifest import load_manifest, save_manifest
    from harmonize.evaluation.config import TranslatorSpec
    from harmonize.evaluation.harmonized_sets import harmonize_dataset

    df = load_manifest(synth3 / "manifest.csv")
    elsewhere = tmp_path / "run" / "data" / "manifest.csv"
    elsewhere.parent.mkdir(parents=True)
    save_manifest(df, elsewhere)
    df = load_manifest(elsewhere)
    assert df["relpath"].str.startswith("_outside").all()
    hs = harmonize_dataset(TranslatorSpec(name="histogram-matching"), elsewhere, df,
                           "site_a", tmp_path / "hm", progress=False)
    written = load_manifest(tmp_path / "hm" / "manifest.csv")
    assert len(written) == len(df) and all(Path(p).is_file() for p in written["path"])
    assert hs.folder == tmp_path / "hm" / "images"


def test_finding_contrast_audit_counts_what_a_translator_did_to_every_finding(synth3, tmp_path):
    """Without a classifier, on the benchmark's files: the paired truth as the
    "translation" restores every finding (contrast = the truth's); painting the findings
    over erases every one of them."""
    from scipy import ndimage

    from harmonize.data.intensity import IntensityPolicy
    from harmonize.data.io import read_image, write_image
    from harmonize.data.manifest import load_manifest
    from harmonize.evaluation.audit import finding_contrast_audit

    df = load_manifest(synth3 / "manifest.csv")
    df = df[df["site"] != "site_a"]
    truth = finding_contrast_audit(df, synth3, lambda rec: synth3 / rec["reference_path"])
    n_findings = int((df["label"] == "finding").sum())
    assert truth["n"] == n_findings > 0
    assert truth["finding_contrast_vs_truth"] == pytest.approx(1.0)
    assert truth["findings_exaggerated"] == 0.0

    policy = IntensityPolicy()
    for rec in df[df["label"] == "finding"].to_dict("records"):
        image = read_image(synth3 / rec["reference_path"])
        x, params = policy.to_model(image)
        finding = read_image(synth3 / rec["finding_mask"]).array > 0
        ring = ndimage.binary_dilation(finding, iterations=3) & ~finding
        x[finding] = x[ring].mean()
        write_image(image, policy.from_model(x, params), tmp_path / rec["relpath"])
    painted = finding_contrast_audit(df[df["label"] == "finding"], synth3,
                                     lambda rec: tmp_path / rec["relpath"])
    assert painted["n"] == n_findings
    assert painted["findings_erased"] > 0.9
    assert abs(painted["finding_contrast_vs_truth"]) < 0.1
