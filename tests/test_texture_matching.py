"""Texture matching: ring spectra, the reference noise model, and the translator that
gives every site the reference site's ROI histogram, sharpness and noise texture."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from harmonize.apply import apply_translator
from harmonize.data.manifest import load_manifest
from harmonize.data.texture import NoiseModel, apply_radial_gain, radial_gain, radial_log_power
from harmonize.fit import fit_and_save, model_space_images_with_masks
from harmonize.radiomics.masks import ROIError
from harmonize.translators import HistogramMatching, TextureMatching, load_translator
from harmonize.translators.identity import IdentityTranslator
from harmonize.translators.texture import monotone_map


def test_radial_gain_gives_a_blurred_image_the_sharp_spectrum():
    rng = np.random.default_rng(0)
    sharp = ndimage.gaussian_filter(rng.standard_normal((96, 96)), 0.6)
    blurred = ndimage.gaussian_filter(sharp, 1.2)
    target, before = radial_log_power(sharp), radial_log_power(blurred)
    restored = apply_radial_gain(blurred, radial_gain(before, target, max_gain=1e3))
    after = radial_log_power(restored)
    rings = slice(2, 30)  # where the blurred image still holds signal
    assert np.abs(after - target)[rings].mean() < 0.25
    assert np.abs(before - target)[rings].mean() > 2.0


def test_spectrum_level_is_the_texture_s_whatever_the_size_or_region():
    """Sites with other detector sizes, or lung masks off the centre, must not read as
    sharper or noisier: the same white noise gives the same ring spectrum."""
    rng = np.random.default_rng(3)
    large = rng.standard_normal((128, 128))
    small = np.mean([radial_log_power(rng.standard_normal((64, 64))) for _ in range(4)], 0)
    off_centre = np.zeros((128, 128), dtype=bool)
    off_centre[10:60, 60:120] = True
    rings = slice(6, 40)  # the lowest rings of a 64 px image sit in the window's main lobe
    whole = radial_log_power(large)[rings]
    # no offset (before the fix: +1.39 for the size, +3.18 for the region); what is left
    # is the scatter of a noise image's estimate
    assert abs((small[rings] - whole).mean()) < 0.1
    assert abs((radial_log_power(large, off_centre)[rings] - whole).mean()) < 0.1


def test_radial_gain_keeps_the_lowest_rings_and_clips():
    gain = radial_gain(np.zeros(48), np.full(48, 10.0), max_gain=4.0, keep_rings=2)
    assert np.all(gain[:2] == 1.0) and np.allclose(gain[2:], 4.0)


def test_noise_model_draws_noise_that_grows_with_the_signal_like_the_reference():
    rng = np.random.default_rng(1)
    ramp = np.tile(np.linspace(0.1, 0.9, 128), (128, 1))
    region = np.ones(ramp.shape, dtype=bool)
    images = [(ramp + 0.05 * ramp * rng.standard_normal(ramp.shape), region) for _ in range(4)]
    model = NoiseModel(sigma=1.0).fit(images)
    assert model.std_[-1] > 3 * model.std_[0]  # quantum-like: noisier where brighter
    coarse, _ = model.split(images[0][0])
    drawn = model.sample(coarse, np.random.default_rng(2))
    _, fine = model.split(images[0][0])
    for cols in (slice(4, 30), slice(98, 124)):  # dark and bright ends
        assert drawn[:, cols].std() == pytest.approx(fine[:, cols].std(), rel=0.2)


def test_the_roi_mapping_continues_linearly_beyond_the_roi_range():
    """A lung mask holds only part of the film's range: what lies beyond it (mediastinum,
    abdomen, air) must keep its structure, not be flattened to the end landmarks."""
    source, target = np.linspace(0.2, 0.6, 9), np.linspace(0.1, 0.9, 9)  # slope 2
    x = np.array([0.0, 0.1, 0.4, 0.7, 0.8])
    np.testing.assert_allclose(monotone_map(x, source, target), [-0.3, -0.1, 0.5, 1.1, 1.3],
                               atol=1e-6)


@pytest.fixture(scope="module")
def four_sites(tmp_path_factory):
    """The demo's benchmark in small: 4 sites x 24 at 64 px, with anatomy masks."""
    from harmonize.synth import generate

    out = tmp_path_factory.mktemp("texture") / "synth"
    generate(out, sites=4, per_site=24, size=64, seed=0, progress=False,
             prevalence=[0.5, 0.5, 0.5, 0.5], finding_scale=2.5)
    return out / "manifest.csv"


@pytest.fixture(scope="module")
def fitted(four_sites, tmp_path_factory):
    out = tmp_path_factory.mktemp("texture_model")
    df = load_manifest(four_sites)
    tm = fit_and_save(TextureMatching(fingerprints="everywhere"), df, four_sites, "site_a",
                      out / "tm", progress=False)
    hm = fit_and_save(HistogramMatching(), df, four_sites, "site_a", out / "hm",
                      progress=False)
    return load_translator(tm), load_translator(hm)


def _rows(manifest):
    df = load_manifest(manifest)
    return list(model_space_images_with_masks(df, IdentityTranslator().policy, False)), df


def _fine_std(x: np.ndarray, region: np.ndarray) -> float:
    return float((x - ndimage.gaussian_filter(x, 1.0))[region].std())


def test_every_site_gets_the_reference_noise_level_and_roi_histogram(four_sites, fitted):
    tm, hm = fitted
    rows, df = _rows(four_sites)
    images, sites, masks = zip(*rows, strict=True)
    matched = tm.transform(images, sites, masks=masks)
    mapped = hm.transform(images, sites)
    raw_ref = np.median([_fine_std(x, m) for x, s, m in rows if s == "site_a"])
    median_q = {}
    for site in sorted(set(sites)):
        k = [i for i, s in enumerate(sites) if s == site]
        after = np.median([_fine_std(matched[i], masks[i]) for i in k])
        with_hm = np.median([_fine_std(mapped[i], masks[i]) for i in k])
        assert after == pytest.approx(raw_ref, rel=0.35), site
        if site != "site_a":  # histogram matching leaves each site's noise as it was
            assert abs(np.log(with_hm / raw_ref)) > abs(np.log(after / raw_ref)), site
        median_q[site] = np.mean([np.quantile(matched[i][masks[i]], [0.1, 0.5, 0.9])
                                  for i in k], axis=0)
    for site, q in median_q.items():
        assert np.abs(q - median_q["site_a"]).max() < 0.03, site


def test_same_image_same_output_after_save_and_load(four_sites, fitted, tmp_path):
    tm, _ = fitted
    rows, _ = _rows(four_sites)
    x, site, mask = rows[30]
    first = tm.transform([x], [site], masks=[mask])[0]
    tm.save(tmp_path / "again")
    again = load_translator(tmp_path / "again").transform([x], [site], masks=[mask])[0]
    np.testing.assert_array_equal(first, again)
    in_batch = tm.transform([rows[31][0], x], [rows[31][1], site],
                            masks=[rows[31][2], mask])[1]
    np.testing.assert_array_equal(first, in_batch)  # the noise is the image's own
    # a checkpoint from before the targets were stored apart loads with the same output
    older = {k: v for k, v in tm.state_tensors().items() if not k.startswith("target_")}
    old = TextureMatching(fingerprints="everywhere", policy=tm.policy)
    old.reference_site_ = "site_a"
    old.load_state_tensors(older, {})
    np.testing.assert_array_equal(old.transform([x], [site], masks=[mask])[0], first)
    reseeded = copy.deepcopy(tm).set_params(seed=1)
    assert not np.array_equal(reseeded.transform([x], [site], masks=[mask])[0], first)
    # the reference site is matched too (its texture resampled), yet stays close to itself
    ref, _, ref_mask = rows[0]
    out = tm.transform([ref], ["site_a"], masks=[ref_mask])[0]
    assert not np.array_equal(out, ref)
    assert np.corrcoef(out[ref_mask], ref[ref_mask])[0, 1] > 0.95


def test_unseen_site_and_no_mask_still_work(four_sites, fitted):
    tm, _ = fitted
    rows, _ = _rows(four_sites)
    x = rows[40][0]
    y = tm.transform([x], ["a_new_hospital"])[0]  # own quantiles and spectrum, auto mask
    assert y.shape == x.shape and np.isfinite(y).all()


def test_bad_masks_and_parameters_are_named(four_sites, fitted):
    tm, _ = fitted
    x = _rows(four_sites)[0][0][0]
    with pytest.raises(ROIError, match="export the mask at the image's size"):
        tm.transform([x], ["site_a"], masks=[np.ones((10, 10), dtype=bool)])
    with pytest.raises(ValueError, match="noise='blue'"):
        TextureMatching(noise="blue").check_params()


def test_apply_hands_the_manifest_masks_to_translators_that_use_them(four_sites, tmp_path):
    seen = []

    class MaskRecorder(IdentityTranslator):
        uses_masks = True

        def transform(self, images, sites=None, masks=None):
            seen.extend(masks)
            return [np.asarray(x) for x in images]

    apply_translator(MaskRecorder(), four_sites, tmp_path / "out", progress=False)
    df = pd.read_csv(four_sites)
    assert len(seen) == len(df)
    assert all(m is not None and m.dtype == bool and m.shape == (64, 64) for m in seen)


def test_a_mask_of_another_size_is_logged_as_the_data_problem_it_is(four_sites, fitted,
                                                                   tmp_path):
    from PIL import Image

    tm, _ = fitted
    df = pd.read_csv(four_sites).head(3)
    wrong = tmp_path / "wrong_mask.png"
    Image.fromarray(np.full((10, 10), 255, dtype=np.uint8)).save(wrong)
    df["path"] = [str(four_sites.parent / p) for p in df["path"]]
    df["mask"] = [str(four_sites.parent / m) for m in df["mask"]]
    df.loc[1, "mask"] = str(wrong)
    df.to_csv(tmp_path / "manifest.csv", index=False)
    summary = apply_translator(tm, tmp_path / "manifest.csv", tmp_path / "out", progress=False)
    log = pd.read_csv(summary.log_path)
    assert summary.ok == 2 and summary.errors == 1
    assert "ROI mask" in log.loc[log["status"] == "error", "reason"].iloc[0]
    assert "export the mask at the image's size" in log.loc[log["status"] == "error",
                                                            "reason"].iloc[0]


def test_a_mask_column_with_a_folder_input_is_refused(four_sites, tmp_path):
    with pytest.raises(ValueError, match="needs a manifest as input"):
        apply_translator(IdentityTranslator(), four_sites.parent / "site_b", tmp_path / "out",
                         progress=False, mask_column="mask")


def test_radiomics_shift_falls_far_below_histogram_matching(four_sites, fitted, tmp_path):
    """What the translator is for: radiomics features in the ROI stop telling the sites
    apart (measured by the shift report's effect sizes, per feature family)."""
    from harmonize.radiomics.shift_report import run_shift_report

    tm, hm = fitted
    shifts = {}
    for name, model in (("texture", tm), ("hm", hm)):
        apply_translator(model, four_sites, tmp_path / name, progress=False)
        s = run_shift_report(four_sites, tmp_path / f"report_{name}",
                             compare_with=tmp_path / name, reference_site="site_a",
                             progress=False, workers=1)
        families = s["after"]["shift_by_family"]
        shifts[name] = np.mean([families[f]["mean_epsilon_sq"] for f in
                                ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")])
    assert shifts["texture"] < 0.5 * shifts["hm"], shifts


def test_sharpen_only_never_softens_a_site():
    """`spectrum: sharpen` raises rings where a site is weaker than the reference and
    leaves the others: an edge-enhanced site (more power than the reference everywhere)
    passes step 3 unchanged, where the two-way filter softens it."""
    x = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    region = np.ones_like(x, dtype=bool)
    stronger, weaker = np.full(48, -5.0), np.full(48, -12.0)
    out = {}
    for spectrum in ("sharpen", "site"):
        tm = TextureMatching(spectrum=spectrum, noise="keep")
        tm.target_log_power_ = np.full(48, -8.0)
        rng = np.random.default_rng(0)
        out[spectrum] = (tm._textured(x, region, stronger, rng),
                         tm._textured(x, region, weaker, rng))
    np.testing.assert_allclose(out["sharpen"][0], x, atol=1e-5)
    assert out["site"][0].std() < 0.5 * x.std()
    np.testing.assert_allclose(out["sharpen"][1], out["site"][1], atol=1e-6)  # sharpening


def test_federated_texture_matching_equals_central_and_sends_only_the_reference(
        four_sites, fitted, tmp_path):
    """The reference node releases its targets; each node fits its own site at home.
    Every node's translator gives exactly the central translator's output."""
    from harmonize.federated.config import FederatedConfig
    from harmonize.federated.texture_task import TextureTask

    tm, _ = fitted
    cfg = FederatedConfig(task="texture", reference_site="site_a", manifest=four_sites,
                          rounds=1, out=tmp_path, texture={"fingerprints": "everywhere"})
    task = TextureTask(cfg)
    df = load_manifest(four_sites)
    nodes = {site: rows.reset_index(drop=True) for site, rows in df.groupby("site")}
    sent, _, metrics = task.train({}, None, nodes["site_b"], {})
    assert sent == {} and metrics["is_reference"] == 0.0  # a source node sends nothing
    release, _, metrics = task.train({}, None, nodes["site_a"], {})
    assert metrics["is_reference"] == 1.0
    assert not any("site_b" in key or "site_c" in key for key in release)
    for rows in nodes.values():
        model = load_translator(task.finish(release, rows))
        images, sites, masks = zip(*model_space_images_with_masks(
            rows, model.policy, progress=False), strict=True)
        for a, b in zip(model.transform(images, sites, masks=masks),
                        tm.transform(images, sites, masks=masks), strict=True):
            np.testing.assert_array_equal(a, b)


def test_federated_texture_config_refuses_what_it_cannot_do(four_sites):
    from pydantic import ValidationError

    from harmonize.federated.config import FederatedConfig

    good = {"task": "texture", "reference_site": "site_a", "manifest": four_sites, "rounds": 1}
    FederatedConfig(**good)
    FederatedConfig(**good, privacy={"mode": "patient-dp", "epsilon": 10})
    for bad in ({"rounds": 3}, {"evaluate": False},
                {"privacy": {"mode": "node-dp", "noise_multiplier": 1.0}}):
        with pytest.raises(ValidationError, match="task texture"):
            FederatedConfig(**{**good, **bad})


def test_private_texture_release_is_bounded_per_patient_and_close_to_central(
        four_sites, fitted, tmp_path):
    """patient-dp: each patient's vector stays in the public box the noise is calibrated
    to; only the compact reference targets travel; with a huge epsilon (almost no noise)
    every node's translator, the reference node's fitted at home too, stays close to
    central fitting; with epsilon 10 and 24 reference patients the noise is real."""
    from harmonize.federated import texture_dp
    from harmonize.federated.config import FederatedConfig
    from harmonize.federated.patient_dp import patient_index
    from harmonize.federated.texture_task import TextureTask

    tm, _ = fitted
    df = load_manifest(four_sites)
    nodes = {site: rows.reset_index(drop=True) for site, rows in df.groupby("site")}
    ref = nodes["site_a"]
    images = list(model_space_images_with_masks(ref, tm.policy, progress=False))
    vectors = texture_dp.patient_vectors(TextureMatching(fingerprints="everywhere"), images,
                                         patient_index(ref)[0])
    start = 0
    for _, size in texture_dp.BLOCKS:
        block = vectors[:, start:start + size]
        assert block.min() >= 0 and block.max() <= np.sqrt(texture_dp.QUANTILES / size) + 1e-12
        start += size
    assert texture_dp.DIAMETER == pytest.approx(np.sqrt(6 * 16))
    patients = len(vectors)
    emptied = [(x, site, np.zeros_like(mask)) if k == 0 else (x, site, mask)
               for k, (x, site, mask) in enumerate(images)]
    with pytest.warns(UserWarning, match="reference image 0 left out"):
        fewer = texture_dp.patient_vectors(TextureMatching(fingerprints="everywhere"),
                                           emptied, patient_index(ref)[0])
    assert len(fewer) == patients - 1  # one image per patient here: that patient is out

    def run(epsilon: float) -> tuple[dict, float]:
        cfg = FederatedConfig(task="texture", reference_site="site_a", manifest=four_sites,
                              rounds=1, out=tmp_path / f"eps{epsilon:g}",
                              texture={"fingerprints": "everywhere"},
                              privacy={"mode": "patient-dp", "epsilon": epsilon,
                                       "delta": 1e-3})
        task = TextureTask(cfg)
        release, _, metrics = task.train({}, None, ref, {})
        assert metrics["epsilon"] == pytest.approx(epsilon, rel=0.01)
        assert sorted(k for k in release if not k.startswith("noise.")) == [
            "target_log_power", "target_quantiles", "template"]
        gaps = []
        for rows in nodes.values():
            model = load_translator(task.finish(release, rows))
            assert set(model.site_quantiles_) == set(rows["site"])  # fitted at home
            imgs, sites, masks = zip(*model_space_images_with_masks(
                rows, model.policy, progress=False), strict=True)
            gaps += [np.abs(a - b).mean() for a, b in zip(
                model.transform(imgs, sites, masks=masks),
                tm.transform(imgs, sites, masks=masks), strict=True)]
        return metrics, float(np.mean(gaps))

    _, nearly_exact = run(1e6)
    _, private = run(10.0)
    assert nearly_exact < 0.015  # measured 0.007; the translation itself moves ~0.15
    assert private > 3 * nearly_exact


@pytest.mark.slow
def test_federated_texture_run_with_flower_fits_each_node_like_central(four_sites, tmp_path):
    """`harmonize federated --config configs/federated/texture.yaml`, end to end with
    Flower's simulation (about 25 s): each node's translator at OUT/nodes/NODE/model equals
    central fitting on the same training rows."""
    from pathlib import Path

    from harmonize.cli import main

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "fed"
    assert main(["federated", "--config", str(root / "configs/federated/texture.yaml"),
                 "--data", str(four_sites), "--reference-site", "site_a", "--out", str(out),
                 "--set", "texture.fingerprints=everywhere", "-q"]) == 0
    df = load_manifest(out / "manifest.csv")
    train = df[df["split"] == "train"]
    central = TextureMatching(fingerprints="everywhere").fit(
        model_space_images_with_masks(train, IdentityTranslator().policy, False), "site_a")
    for site in ("site_b", "site_c"):
        node = load_translator(out / "nodes" / site / "model")
        rows = df[df["site"] == site]
        images, sites, masks = zip(*model_space_images_with_masks(rows, node.policy, False),
                                   strict=True)
        for a, b in zip(node.transform(images, sites, masks=masks),
                        central.transform(images, sites, masks=masks), strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_held_out_benchmark_scores_both_spectrum_modes_against_histogram_matching(
        tmp_path):
    """eval/texture_matching_heldout.py on a tiny benchmark: one row per method with SSIM,
    its CI, the paired difference to histogram matching and the finding audit."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "eval" / "texture_matching_heldout.py"
    spec = importlib.util.spec_from_file_location("texture_matching_heldout", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "heldout"
    assert module.main(["--out", str(out), "--seeds", "1", "--per-site", "12",
                        "--size", "48"]) == 0
    table = pd.read_csv(out / "summary.csv").set_index("method")
    assert list(table.index) == ["identity", "histogram-matching", "texture-matching-site",
                                 "texture-matching-sharpen"]
    assert (table["ssim_lo"] <= table["ssim"]).all() and (table["ssim"] <= table["ssim_hi"]).all()
    assert table.loc["identity", "ssim"] < table.loc["histogram-matching", "ssim"]
    assert np.isnan(table.loc["histogram-matching", "ssim_minus_hm"])
    for mode in ("site", "sharpen"):  # each harmonized file was scored against HM's
        assert not np.isnan(table.loc[f"texture-matching-{mode}", "ssim_minus_hm"])
    assert (table["findings"] > 0).all() and table["erased"].between(0, 1).all()
    assert table.loc["identity", "erased"] == 0  # the input against itself
    assert json.loads((out / "summary.json").read_text())["size"] == 48
