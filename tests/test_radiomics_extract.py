"""Radiomics extraction on real chest X-rays (tb_cxr_2site, with lung masks) and small
arrays: the 2D route through pyradiomics, ROI masks, bin width, cache, parallel runs
(processes and Ray) and per-image error records."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.data.manifest import load_manifest
from harmonize.radiomics import (
    FEATURE_CLASSES,
    RadiomicsSettings,
    auto_mask,
    choose_bin_width,
    extract_features,
    extract_image,
)
from harmonize.radiomics import image_features as extract_mod
from harmonize.radiomics.cache import cache_key
from harmonize.radiomics.extract import feature_columns
from harmonize.radiomics.masks import ROIError, load_roi

TB_CXR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tb_cxr_2site"
BIN_WIDTH = 1 / 64  # model space; a fixed value keeps these tests independent of the rule


@pytest.fixture(scope="module")
def cxr() -> pd.DataFrame:
    """Six real chest X-rays with lung masks, three per site."""
    if not (TB_CXR / "manifest.csv").is_file():
        pytest.skip(f"real data not found at {TB_CXR}")
    df = load_manifest(TB_CXR / "manifest.csv", mask_column="lung_mask")
    df = df[df["mask"] != ""]
    return df.groupby("site").head(3).reset_index(drop=True)


@pytest.fixture(scope="module")
def settings() -> RadiomicsSettings:
    return RadiomicsSettings(bin_width=BIN_WIDTH)


def families(names) -> set[str]:
    return {n.split("_")[1] for n in names}


def png(path: Path, array: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


# --- the 2D route through pyradiomics -----------------------------------------------


def test_feature_names_cover_six_classes_and_shape_only_with_a_mask(cxr, settings):
    row = cxr.iloc[0]
    with_mask = extract_image(row.path, row["mask"], settings)
    auto = extract_image(row.path, None, settings)
    assert families(with_mask["features"]) == set(FEATURE_CLASSES) | {"shape2D"}
    assert families(auto["features"]) == set(FEATURE_CLASSES)
    assert with_mask["mask_source"] == "manifest" and auto["mask_source"] == "otsu"
    assert np.isfinite(list(auto["features"].values())).all()


def test_single_slice_with_force2d_equals_plain_2d_and_true_2d_with_force2d_is_wrong(cxr):
    """Why extraction passes (1, H, W) with force2D: it equals pyradiomics on a plain 2D
    image; a true 2D image with force2D (dimension 0) treats rows as slices instead."""
    from radiomics import featureextractor

    row = cxr.iloc[0]
    settings = RadiomicsSettings(bin_width=BIN_WIDTH, shape2d=False)
    ours = extract_image(row.path, row["mask"], settings)["features"]
    x, roi = load_roi(row.path, row["mask"], settings.policy)
    image, mask = sitk.GetImageFromArray(x), sitk.GetImageFromArray(roi.mask.astype(np.uint8))

    def pyradiomics_2d(force2d: bool) -> dict[str, float]:
        logging.getLogger("radiomics").setLevel(logging.ERROR)
        ext = featureextractor.RadiomicsFeatureExtractor(
            binWidth=BIN_WIDTH, force2D=force2d, force2Ddimension=0, additionalInfo=False)
        ext.disableAllFeatures()
        for name in FEATURE_CLASSES:
            ext.enableFeatureClassByName(name)
        return {k: float(v) for k, v in ext.execute(image, mask).items()}

    plain = pyradiomics_2d(force2d=False)
    assert plain.keys() == ours.keys()
    np.testing.assert_allclose([ours[k] for k in plain], list(plain.values()), rtol=1e-10)
    wrong = pyradiomics_2d(force2d=True)
    differ = [k for k in plain if not np.isclose(plain[k], wrong[k], rtol=1e-6)]
    assert len(differ) > 40  # 71 of 93 measured: the texture classes


# --- ROI ----------------------------------------------------------------------------


def test_auto_mask_covers_the_body_not_the_background_on_a_real_xray():
    """MCUCXR_0004: a Montgomery film with a black collimation band over its lower 40%,
    very dark lungs and burned-in markers."""
    name = "montgomery/normal/MCUCXR_0004_0.png"
    if not (TB_CXR / name).is_file():
        pytest.skip(f"{name} not found")
    x, _ = IntensityPolicy().to_model(read_image(TB_CXR / name))
    lungs = read_image(TB_CXR / "masks" / name).array > 0
    roi = auto_mask(x)
    background = x <= 0.02
    assert roi.source == "otsu"
    assert (roi.mask & lungs).sum() / lungs.sum() > 0.97  # lungs are inside the body
    assert background.mean() > 0.3
    assert (roi.mask & background).sum() / background.sum() < 0.02
    assert 0.35 < roi.mask.mean() < 0.75


def test_auto_mask_strips_constant_borders_and_falls_back_when_otsu_has_nothing():
    yy, xx = np.mgrid[:128, :128]
    body = (yy - 70) ** 2 + (xx - 64) ** 2 < 40**2
    x = np.where(body, 0.6, 0.1) + np.random.default_rng(0).normal(0, 0.01, (128, 128))
    x[:16] = 1.0  # a white collimation band: bright, but not body
    roi = auto_mask(x.astype(np.float32))
    assert roi.source == "otsu" and not roi.mask[:16].any()
    assert (roi.mask == body).mean() > 0.98
    flat = np.random.default_rng(1).normal(0.2, 0.002, (128, 128)).astype(np.float32)
    flat[60:64, 60:64] = 1.0  # the only bright thing is a speck: below min_area
    fallback = auto_mask(flat)
    assert fallback.source == "border" and fallback.mask.all()
    with pytest.raises(ROIError, match="constant image"):
        auto_mask(np.full((32, 32), 0.5, np.float32))


# --- bin width and settings ---------------------------------------------------------


def test_bin_width_is_pooled_roi_percentile_range_over_64(cxr):
    choice = choose_bin_width(cxr, n_bins=64)
    pooled = []  # lung ROIs are smaller than pixels_per_image: every ROI pixel counts
    for row in cxr.itertuples():
        x, roi = load_roi(row.path, row.mask, IntensityPolicy())
        pooled.append(x[roi.mask])
    lo, hi = np.percentile(np.concatenate(pooled), [0.5, 99.5])
    assert choice.n_images == len(cxr) and choice.n_failed == 0
    assert choice.width == pytest.approx((hi - lo) / 64)
    assert "/ 64" in choice.describe()
    settings = RadiomicsSettings(bin_width=choice.width, bin_choice=choice)
    summary = settings.report_dict()
    assert summary["bin_width"] == choice.width and "/ 64" in summary["bin_width_rule"]
    assert summary["feature_classes"][:6] == list(FEATURE_CLASSES)


def test_settings_round_trip_and_digest(tmp_path, cxr):
    settings = RadiomicsSettings.from_data(cxr.iloc[:2])
    loaded = RadiomicsSettings.load(settings.save(tmp_path / "radiomics.json"))
    assert loaded == settings and loaded.bin_choice == settings.bin_choice
    assert loaded.digest() == settings.digest()
    other = RadiomicsSettings(bin_width=settings.bin_width * 2)
    assert other.digest() != settings.digest()
    with pytest.raises(ValueError, match="unknown"):
        RadiomicsSettings(bin_width=0.01, classes=("glcm", "shape2D"))


# --- extract_features: errors, cache, parallel ---------------------------------------


def test_bad_images_become_error_records_and_the_rest_get_features(tmp_path, cxr, settings):
    good = cxr.iloc[:2]
    small_mask = png(tmp_path / "small_mask.png", np.full((100, 80), 255, np.uint8))
    zeros = png(tmp_path / "zeros.png", np.zeros((64, 64), np.uint8))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    bad = pd.DataFrame({
        "path": [good.path.iloc[0], str(zeros), str(broken)],
        "site": ["x", "y", "y"],
        "mask": [str(small_mask), "", ""],
    })
    df = pd.concat([good[["path", "site", "mask"]], bad], ignore_index=True)
    features, errors = extract_features(df, settings, workers=1, use_cache=False,
                                        progress=False)
    assert features["path"].tolist() == good.path.tolist()
    assert errors["path"].tolist() == bad.path.tolist()
    messages = errors.set_index("path")["error"]
    assert "80x100" in messages[good.path.iloc[0]] and "not resized" in messages[
        good.path.iloc[0]]
    assert "constant image" in messages[str(zeros)]
    assert "broken.png" in messages[str(broken)]
    assert set(errors.columns) == {"path", "site", "mask", "error"}


def test_cache_hit_returns_identical_values_without_recomputing(tmp_path, cxr, settings,
                                                                monkeypatch):
    df = cxr.iloc[:3]
    first, _ = extract_features(df, settings, workers=1, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.rglob("*.json"))) == 3
    calls = []
    real = extract_mod.extract_image

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_mod, "extract_image", counting)
    again, _ = extract_features(df, settings, workers=1, cache_dir=tmp_path, progress=False)
    assert calls == []
    pd.testing.assert_frame_equal(first, again, check_exact=True)
    # a new image, or new settings, are computed; the cached ones are not
    extract_features(cxr.iloc[:4], settings, workers=1, cache_dir=tmp_path, progress=False)
    assert calls == [cxr.path.iloc[3]]
    calls.clear()
    wider = RadiomicsSettings(bin_width=2 * BIN_WIDTH)
    extract_features(df, wider, workers=1, cache_dir=tmp_path, progress=False)
    assert len(calls) == 3
    key = cache_key(df.path.iloc[0], df["mask"].iloc[0], settings.digest())
    assert key != cache_key(df.path.iloc[0], None, settings.digest())


def test_two_workers_equal_one_worker(cxr, settings):
    df = cxr.iloc[[0, 1, 3, 4]].copy()
    df.loc[df.index[1], "mask"] = ""  # one automatic mask among manifest masks
    one, _ = extract_features(df, settings, workers=1, use_cache=False, progress=False)
    threads = sitk.ProcessObject_GetGlobalDefaultNumberOfThreads()
    two, errors = extract_features(df, settings, workers=2, use_cache=False, progress=False,
                                   chunk_size=1)
    assert errors.empty
    # this process extracted chunks too, single-threaded; its SimpleITK setting is back
    assert sitk.ProcessObject_GetGlobalDefaultNumberOfThreads() == threads
    pd.testing.assert_frame_equal(one, two, check_exact=True)
    assert one["path"].tolist() == df.path.tolist()
    assert one["mask_source"].tolist() == ["manifest", "otsu", "manifest", "manifest"]
    shape = [c for c in feature_columns(one) if "_shape2D_" in c]
    assert shape and one.loc[1, shape].isna().all()  # no shape2D for an automatic mask
    assert one.drop(columns=shape).notna().all().all()
    roi = RadiomicsSettings(bin_width=BIN_WIDTH).report_dict(one)["roi"]
    assert roi == "manifest mask for 3 images, automatic body mask (Otsu) for 1 images"


@pytest.mark.skipif(os.environ.get("HARMONIZE_SKIP_RAY") == "1", reason="HARMONIZE_SKIP_RAY=1")
def test_ray_local_equals_local_processes(cxr, settings):
    """The cluster path, on a private local Ray (about 5 s to start on 2 cores)."""
    ray = pytest.importorskip("ray")
    df = cxr.iloc[:4]
    local, _ = extract_features(df, settings, workers=1, use_cache=False, progress=False)
    try:
        on_ray, errors = extract_features(df, settings, workers=2, use_cache=False,
                                          progress=False, ray_address="local", chunk_size=2)
    except (RuntimeError, ConnectionError, TimeoutError) as err:
        if ray.is_initialized():
            raise
        pytest.skip(f"Ray could not start here: {err}")
    assert not ray.is_initialized()  # a Ray it started is shut down again
    assert errors.empty
    pd.testing.assert_frame_equal(local, on_ray, check_exact=True)
