"""Site-shift statistics on feature tables with a known amount of site signal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harmonize.radiomics.combat import ComBat, combat_features
from harmonize.radiomics.distance import frechet_distance, mmd2, site_distances
from harmonize.radiomics.stats import (
    family_summary,
    per_feature_tests,
    site_predictability,
    usable_sites,
)

FEATURES = [f"original_{fam}_f{i}" for fam in ("firstorder", "glcm", "ngtdm") for i in range(6)]


def _table(shift: float, n_per_site: int = 40, seed: int = 0) -> pd.DataFrame:
    """Three sites; only first-order features carry `shift` times a site offset."""
    rng = np.random.default_rng(seed)
    rows = []
    for s, site in enumerate(("a", "b", "c")):
        for i in range(n_per_site):
            label = "tb" if rng.random() < 0.4 else "normal"
            values = rng.normal(size=len(FEATURES)) + (label == "tb") * 0.5
            values[:6] += shift * (s - 1)
            rows.append({"site": site, "label": label, "patient_id": f"{site}{i}",
                         **dict(zip(FEATURES, values, strict=True))})
    return pd.DataFrame(rows)


def test_shifted_sites_are_detected_and_the_shifted_family_named():
    df = _table(shift=2.0)
    tests = per_feature_tests(df, FEATURES)
    first = tests["family"] == "firstorder"
    assert tests.loc[first, "significant"].all()
    assert tests.loc[~first, "significant"].sum() <= 1  # FDR 5%: a false positive may occur
    assert family_summary(tests).iloc[0]["family"] == "firstorder"
    pred = site_predictability(df, FEATURES)
    assert pred["site_auc"] > 0.9 and pred["site_balanced_accuracy"] > 0.8


def test_no_shift_is_near_chance():
    df = _table(shift=0.0)
    tests = per_feature_tests(df, FEATURES)
    assert tests["significant"].mean() <= 0.1
    pred = site_predictability(df, FEATURES)
    assert pred["site_auc"] < 0.65
    assert pred["chance_balanced_accuracy"] == pytest.approx(1 / 3)


def test_effect_size_is_epsilon_squared():
    df = _table(shift=2.0)
    t = per_feature_tests(df, FEATURES).set_index("feature")
    assert t["epsilon_sq"].iloc[0] == pytest.approx(t["H"].iloc[0] / (len(df) - 1))
    assert 0 <= t["epsilon_sq"].min() and t["epsilon_sq"].max() <= 1


def test_distances_grow_with_the_shift_and_have_cis():
    near, far = _table(shift=0.0), _table(shift=4.0)
    d_near = site_distances(near, FEATURES, "b", n_boot=50).set_index("site")
    d_far = site_distances(far, FEATURES, "b", n_boot=50).set_index("site")
    for site in ("a", "c"):
        assert d_far.loc[site, "frd"] > 1.5 * d_near.loc[site, "frd"]
        assert d_far.loc[site, "mmd2"] > d_near.loc[site, "mmd2"]
        assert d_far.loc[site, "frd_lo"] > d_near.loc[site, "frd_hi"]  # separable CIs
        assert d_far.loc[site, "mmd2_lo"] < d_far.loc[site, "mmd2_hi"]
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 1.0) == pytest.approx(3.0, rel=1e-3)  # ||mu diff||^2
    assert abs(mmd2(a, rng.normal(size=(200, 3)))) < 0.02


def test_combat_removes_site_location_and_scale_but_keeps_the_label_effect():
    rng = np.random.default_rng(0)
    n = 300
    sites = rng.integers(0, 3, n)
    label = (rng.random(n) < np.array([0.2, 0.5, 0.8])[sites]).astype(float)
    x = (rng.normal(size=(n, 20)) * np.array([1.0, 2.0, 0.5])[sites, None]
         + 2.0 * label[:, None] + np.array([0.0, 3.0, -2.0])[sites, None])
    y = ComBat().fit_transform(x, sites, label[:, None])
    neg_means = [y[(sites == s) & (label == 0)].mean() for s in range(3)]
    assert np.ptp(neg_means) < 0.3  # sites were 5 apart
    effect = [y[(sites == s) & (label == 1)].mean() - y[(sites == s) & (label == 0)].mean()
              for s in range(3)]
    assert np.allclose(effect, 2.0, atol=0.4)
    resid_sd = [(y[sites == s] - 2 * label[sites == s, None]).std() for s in range(3)]
    assert np.ptp(resid_sd) < 0.2  # scales were 0.5..2
    df = combat_features(_table(shift=2.0), FEATURES)
    assert site_predictability(df, FEATURES)["site_auc"] < 0.7


def test_sites_with_too_few_images_are_named():
    df = pd.concat([_table(0.0).head(80), _table(0.0).tail(2).assign(site="tiny")])
    keep, notes = usable_sites(df)
    assert keep == ["a", "b"] and "tiny" in notes[0] and "2 image" in notes[0]
