"""Classifier metrics: point values, rank AUC = sklearn, bootstrap CIs, paired test, seeds."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from harmonize.classify.metrics import (
    METRICS,
    _rank_auc,
    _resampled_auc,
    _stratified_indices,
    binary_metrics,
    bootstrap_metrics,
    mean_over_seeds,
    paired_bootstrap_difference,
    roc_points,
)


def _scores(n: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n // 2 negatives then positives, scores = sigmoid(separation * (y - 0.5) + noise)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) >= n // 2).astype(int)
    z = separation * (y - 0.5) + rng.normal(size=n)
    return y, 1.0 / (1.0 + np.exp(-z))


def test_perfect_classifier():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    m = binary_metrics(y, p)
    for k in METRICS:
        assert m[k] == 1.0, k
    assert m["n"] == 5 and m["n_positive"] == 2
    b = bootstrap_metrics(y, p, n_boot=200)
    assert b["auc"] == b["auc_lo"] == b["auc_hi"] == 1.0
    assert b["accuracy_lo"] == 1.0


def test_counts_by_hand_and_threshold_inclusive():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.5, 0.2, 0.6, 0.1, 0.0, 0.3])  # 0.5 >= threshold: predicted positive
    m = binary_metrics(y, p)
    # tp=2 fn=1 fp=1 tn=3
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(4 / 6)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))


def test_undefined_metrics_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])  # nothing predicted positive
        assert math.isnan(m["precision"]) and m["sensitivity"] == 0.0
        one = binary_metrics([0, 0, 0], [0.1, 0.7, 0.2])
        assert math.isnan(one["auc"]) and math.isnan(one["sensitivity"])
        b = bootstrap_metrics([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], n_boot=50)
        assert math.isnan(b["precision"]) and math.isnan(b["precision_lo"])


def test_random_scores_auc_near_half_and_ci_covers_it():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=400)
    p = rng.random(400)
    b = bootstrap_metrics(y, p, n_boot=1000, seed=3)
    assert abs(b["auc"] - 0.5) < 0.08
    assert b["auc_lo"] < 0.5 < b["auc_hi"]


def test_rank_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=300)
    p = np.round(rng.random(300) + 0.3 * y, 1)  # few distinct values: many ties across classes
    assert np.unique(p).size < 20
    assert _rank_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert _rank_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    y2, p2 = _scores(101, 1.0, 5)
    assert _rank_auc(y2, p2) == pytest.approx(roc_auc_score(y2, p2), abs=1e-12)


def test_resampled_auc_equals_sklearn_on_each_resample():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=80)
    p = np.round(rng.random(80) + 0.4 * y, 1)
    _, codes = np.unique(p, return_inverse=True)
    ip, ineg = _stratified_indices(rng, np.flatnonzero(y == 1), np.flatnonzero(y == 0), 20)
    fast = _resampled_auc(codes, int(codes.max()) + 1, ip, ineg)
    labels = np.r_[np.ones(ip.shape[1]), np.zeros(ineg.shape[1])]
    ref = [roc_auc_score(labels, np.r_[p[ip[i]], p[ineg[i]]]) for i in range(20)]
    np.testing.assert_allclose(fast, ref, atol=1e-12)


def test_ci_contains_point_and_narrows_with_4x_samples():
    widths = {}
    for n in (100, 400):
        y, p = _scores(n, 1.5, seed=n)
        b = bootstrap_metrics(y, p, n_boot=1000, seed=0)
        for k in METRICS:
            assert b[f"{k}_lo"] <= b[k] <= b[f"{k}_hi"], (n, k)
        assert b["n"] == n and b["n_positive"] == n // 2 and b["n_boot"] == 1000
        widths[n] = {k: b[f"{k}_hi"] - b[f"{k}_lo"] for k in METRICS}
    for k in METRICS:  # ~1/sqrt(n): half as wide, allow slack
        assert widths[400][k] < 0.75 * widths[100][k], k


def test_bootstrap_is_reproducible():
    y, p = _scores(120, 1.0, seed=7)
    a = bootstrap_metrics(y, p, n_boot=300, seed=11)
    assert a == bootstrap_metrics(y, p, n_boot=300, seed=11)
    assert a != bootstrap_metrics(y, p, n_boot=300, seed=12)
    pa = paired_bootstrap_difference(y, p, p[::-1].copy(), n_boot=300, seed=4)
    assert pa == paired_bootstrap_difference(y, p, p[::-1].copy(), n_boot=300, seed=4)


def test_paired_identical_models():
    y, p = _scores(100, 1.0, seed=8)
    for metric in ("auc", "accuracy"):
        r = paired_bootstrap_difference(y, p, p.copy(), metric=metric, n_boot=500)
        assert r["diff"] == 0.0 and r["diff_lo"] == 0.0 and r["diff_hi"] == 0.0
        assert r["p_value"] == 1.0 and r["n_boot"] == 500


def test_paired_clearly_better_model():
    rng = np.random.default_rng(9)
    y = np.repeat([0, 1], 100)
    noise = rng.normal(size=200)
    better = 1.0 / (1.0 + np.exp(-(2.5 * (y - 0.5) + noise)))
    worse = 1.0 / (1.0 + np.exp(-(0.5 * (y - 0.5) + noise + rng.normal(size=200))))
    for metric in ("auc", "accuracy"):
        r = paired_bootstrap_difference(y, better, worse, metric=metric, n_boot=2000)
        assert r["diff"] > 0 and r["diff_lo"] > 0 and r["p_value"] < 0.05, metric
        assert r["diff"] == pytest.approx(r["a"] - r["b"])
        assert r["a"] == pytest.approx(binary_metrics(y, better)[metric])
    swapped = paired_bootstrap_difference(y, worse, better, n_boot=2000)
    assert swapped["diff_hi"] < 0 and swapped["p_value"] < 0.05


def test_seed_averaged_paired_gain():
    from harmonize.classify.metrics import paired_bootstrap_mean_auc_difference as mean_diff

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    good = [y + rng.normal(0, 1.0, 300) for _ in range(3)]
    poor = [y + rng.normal(0, 1.6, 300) for _ in range(3)]
    # one model per side: exactly the single-model paired bootstrap
    one = mean_diff(y, good[:1], poor[:1], n_boot=500, seed=4)
    ref = paired_bootstrap_difference(y, good[0], poor[0], n_boot=500, seed=4)
    assert [one[k] for k in ("diff", "diff_lo", "diff_hi", "p_value")] == pytest.approx(
        [ref[k] for k in ("diff", "diff_lo", "diff_hi", "p_value")])
    d = mean_diff(y, good, poor, n_boot=500)
    aucs = [binary_metrics(y, p)["auc"] for p in good + poor]
    assert d["diff"] == pytest.approx(np.mean(aucs[:3]) - np.mean(aucs[3:]))
    assert 0 < d["diff_lo"] < d["diff"] < d["diff_hi"] and d["p_value"] < 0.01
    with pytest.raises(ValueError, match="as many models"):
        mean_diff(y, good, poor[:2])


def test_roc_points():
    y = np.array([0, 0, 1, 1])
    fpr, tpr = roc_points(y, [0.1, 0.4, 0.35, 0.8])
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    with pytest.raises(ValueError, match="both classes"):
        roc_points([1, 1], [0.2, 0.3])


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [
        ([0, 1, 1], [0.1, 0.9], "length mismatch"),
        ([0, 1, 2], [0.1, 0.9, 0.5], "only labels 0 and 1"),
        ([0, 1, 1], [0.1, np.nan, 0.5], "non-finite"),
        ([0, 1, 1], [0.1, np.inf, 0.5], "non-finite"),
        ([], [], "empty"),
    ],
)
def test_bad_input_raises(y, p, match):
    for fn in (binary_metrics, bootstrap_metrics, roc_points):
        with pytest.raises(ValueError, match=match):
            fn(y, p)
    with pytest.raises(ValueError, match=match):
        paired_bootstrap_difference(y, p, p)


def test_bad_options_raise():
    y, p = [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]
    with pytest.raises(ValueError, match="p_b"):
        paired_bootstrap_difference(y, p, p[:3])
    with pytest.raises(ValueError, match="metric"):
        paired_bootstrap_difference(y, p, p, metric="f1")
    with pytest.raises(ValueError, match="both classes"):
        paired_bootstrap_difference([1, 1], [0.2, 0.3], [0.3, 0.2])
    with pytest.raises(ValueError, match="level"):
        bootstrap_metrics(y, p, level=95)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_metrics(y, p, n_boot=0)


def test_mean_over_seeds_by_hand():
    df = pd.DataFrame({
        "site": ["A", "A", "A", "B", "B", "C"],
        "aug": ["h", "h", "h", "h", "h", "h"],
        "seed": [0, 1, 2, 0, 1, 0],
        "auc": [0.80, 0.82, 0.84, 0.70, np.nan, 0.9],
    })
    out = mean_over_seeds(df, ["site", "aug"], "auc")
    assert list(out.columns) == ["site", "aug", "metric", "mean", "std", "count", "ci_lo",
                                 "ci_hi"]
    a = out.set_index("site").loc["A"]
    assert a["mean"] == pytest.approx(0.82)
    assert a["std"] == pytest.approx(0.02)  # sqrt((0.02^2 + 0 + 0.02^2) / 2)
    assert a["count"] == 3
    half = stats.t.ppf(0.975, 2) * 0.02 / np.sqrt(3)  # t_{0.975, 2} = 4.303
    assert half == pytest.approx(4.302653 * 0.02 / np.sqrt(3), rel=1e-6)
    assert a["ci_lo"] == pytest.approx(0.82 - half) and a["ci_hi"] == pytest.approx(0.82 + half)
    for site in ("B", "C"):  # one usable seed each: no spread, no CI
        row = out.set_index("site").loc[site]
        assert row["count"] == 1 and math.isnan(row["std"]) and math.isnan(row["ci_lo"])
    assert out.set_index("site").loc["B", "mean"] == pytest.approx(0.70)
    single = mean_over_seeds(df, "site")
    assert list(single["site"]) == ["A", "B", "C"]
    with pytest.raises(ValueError, match="missing_col"):
        mean_over_seeds(df, "site", "missing_col")


def test_bootstrap_mean_auc_over_seeds_matches_sklearn_and_narrows():
    from harmonize.classify.metrics import bootstrap_mean_auc

    rng = np.random.default_rng(3)
    y = np.r_[np.ones(40), np.zeros(160)].astype(int)  # 20% positives
    ps = [y * 0.8 + rng.normal(0, 0.6, y.size) for _ in range(3)]
    m = bootstrap_mean_auc(y, ps, n_boot=1000)
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(y, p) for p in ps]))
    assert m["auc_lo"] < m["auc"] < m["auc_hi"] and m["n_models"] == 3
    one = bootstrap_mean_auc(y, ps[:1], n_boot=1000)
    # averaging seeds removes their own noise: the interval of the mean is no wider
    assert (m["auc_hi"] - m["auc_lo"]) <= (one["auc_hi"] - one["auc_lo"]) + 0.01
    with pytest.raises(ValueError, match="both classes"):
        bootstrap_mean_auc(np.ones(5, int), [np.arange(5.0)])


def test_rare_class_metrics_of_several_seeds_are_their_mean():
    from sklearn.metrics import average_precision_score

    from harmonize.classify.metrics import rare_class_metrics

    rng = np.random.default_rng(4)
    y = np.r_[np.ones(30), np.zeros(120)].astype(int)
    ps = np.stack([y * 0.9 + rng.normal(0, 0.5, y.size) for _ in range(3)])
    m = rare_class_metrics(y, ps, n_boot=500)
    assert m["ap"] == pytest.approx(np.mean([average_precision_score(y, p) for p in ps]))
    singles = [rare_class_metrics(y, p, n_boot=500) for p in ps]
    assert m["sens_at_spec"] == pytest.approx(np.mean([r["sens_at_spec"] for r in singles]))
    assert m["ap_lo"] < m["ap"] < m["ap_hi"]
    assert rare_class_metrics(y, ps[:1], n_boot=500) == singles[0]  # one row: one model
