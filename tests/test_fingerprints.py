"""Fingerprint removal: collimation borders and burned-in markers found where the synthetic
acquisition put them, inpainted without touching anything else (an ROI mask above all),
and nothing found in a clean image; usable alone through `harmonize apply`."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from harmonize.apply import apply_translator
from harmonize.data.fingerprints import find_fingerprints, remove_fingerprints
from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.synth import generate
from harmonize.synth.acquisition import SiteAcquisition, render
from harmonize.synth.phantom import make_phantom
from harmonize.translators import load_translator


def _rendered(acq: SiteAcquisition, seed: int = 0, size: int = 128) -> np.ndarray:
    phantom = make_phantom("xray", size, True, np.random.default_rng(seed))
    values = render(phantom.ideal, phantom.finding, acq, np.random.default_rng(seed + 1))
    return (values / acq.max_value).astype(np.float32)


SHUTTERED = SiteAcquisition(photons=4000, border=(0.08, 0.0, 0.1, 0.0), marker="R",
                            marker_corner="tr", bits=12)


def test_borders_and_marker_found_and_inpainted():
    x = _rendered(SHUTTERED)
    found = find_fingerprints(x)
    top, bottom, left, right = found.border
    assert abs(top - 10) <= 2 and abs(left - 13) <= 2 and bottom == right == 0
    assert len(found.markers) == 1
    y0, y1, x0, x1 = found.markers[0]
    assert y0 < 30 and x1 > 100  # top right, inside the field
    y, again = remove_fingerprints(x)
    assert again.border == found.border
    # outside what was filled, every pixel is the input's, bit for bit
    np.testing.assert_array_equal(y[~found.filled], x[~found.filled])
    # no unexposed shutter and no saturated glyph left
    assert y[:top].min() > 0.02 and y[:, :left].min() > 0.02
    assert (y[y0:y1, x0:x1] >= x.max() - 1e-3).sum() == 0
    # the filled border continues the field (mirrored), no new edge at the shutter line
    assert abs(float(y[top - 1].mean()) - float(y[top].mean())) < 0.05


def test_a_clean_image_is_left_alone():
    x = _rendered(SiteAcquisition(photons=30000))  # the reference style: air beside the body
    y, found = remove_fingerprints(x)
    assert not found.found and found.border == (0, 0, 0, 0) and found.markers == ()
    np.testing.assert_array_equal(y, x)


def test_never_touches_the_protected_roi():
    x = _rendered(SHUTTERED)
    found = find_fingerprints(x)
    roi = np.zeros_like(x, dtype=bool)
    y0, y1, x0, x1 = found.markers[0]
    roi[: y1, x0 - 5:] = True  # a mask over the marker's corner, border included
    y, kept = remove_fingerprints(x, protect=roi)
    np.testing.assert_array_equal(y[roi], x[roi])
    assert not (kept.filled & roi).any() and kept.filled.any()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, sites=3, per_site=8, size=96, seed=3, progress=False)
    return out


def test_found_per_site_as_the_acquisition_made_them(synth):
    """seed 3: site_b is shuttered with an 'R' marker, site_c has a 'bars' marker and no
    shutters, the reference site_a neither."""
    df = pd.read_csv(synth / "manifest.csv")
    policy = IntensityPolicy()
    seen = {}
    for site, rows in df.groupby("site"):
        kinds = Counter()
        for path in rows["path"]:
            s = find_fingerprints(policy.to_model(read_image(synth / path))[0]).summary()
            kinds[(s["top"] > 0 and s["left"] > 0, s["markers"] > 0)] += 1
        seen[site] = dict(kinds)
    assert seen == {"site_a": {(False, False): 8}, "site_b": {(True, True): 8},
                    "site_c": {(False, True): 8}}


def test_apply_fingerprints_alone(synth, tmp_path):
    summary = apply_translator(load_translator("fingerprints"), synth / "site_b",
                               tmp_path / "out", progress=False)
    assert (summary.ok, summary.errors) == (8, 0)
    first = sorted((synth / "site_b").rglob("*.png"))[0]
    a = read_image(first)
    b = read_image(tmp_path / "out" / first.relative_to(synth / "site_b"))
    assert b.array.dtype == a.array.dtype and b.array.shape == a.array.shape
    assert (a.array == 0).mean() > 0.1 and (b.array == 0).mean() < 0.01
