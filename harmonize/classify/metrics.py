"""Binary classification metrics with bootstrap confidence intervals.

Used to judge a downstream classifier (e.g. TB vs normal) trained on harmonized vs plain
images: a single AUC on a few hundred test images is too noisy to compare models, so every
number comes with a percentile-bootstrap CI over test images, and two models scored on the
same images are compared with a paired bootstrap of their difference.

Conventions:

* a score ``p >= threshold`` is a positive prediction;
* undefined ratios (no positives, no predicted positives, one class only) are ``nan``,
  never a warning;
* bootstrap resampling is stratified by class: positives and negatives are resampled
  separately, each keeping its count. Every resample then holds both classes, so AUC is
  always defined, and class prevalence stays as observed (the usual choice for a fixed test
  set whose composition was chosen by design). The CIs are therefore slightly narrower than
  those of an unstratified bootstrap, which would also count prevalence as random;
* bootstrap AUC uses the Mann-Whitney statistic (ties count one half), which equals
  sklearn's ``roc_auc_score``; it is computed for all resamples at once from per-resample
  counts, without sorting, instead of calling sklearn ``n_boot`` times.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

METRICS = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1")
PAIRED_METRICS = ("auc", "accuracy")
# Bootstrap work is done in chunks of resamples holding at most this many array elements.
_CHUNK_ELEMENTS = 1 << 21


# ---------------------------------------------------------------- validation


def _check_labels(y_true: ArrayLike) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("y_true is empty")
    if y.dtype == bool:
        return y.astype(np.int8)
    if not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"y_true must be numeric 0/1 labels, got dtype {y.dtype}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        values = np.unique(y[bad])[:5].tolist()
        raise ValueError(f"y_true must contain only labels 0 and 1, found {values}")
    return y.astype(np.int8)


def _check_scores(p: ArrayLike, n: int, name: str = "p") -> np.ndarray:
    s = np.asarray(p)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {s.shape}")
    if s.shape[0] != n:
        raise ValueError(f"length mismatch: y_true has {n} labels, {name} has {s.shape[0]} scores")
    if not np.issubdtype(s.dtype, np.number) and s.dtype != bool:
        raise ValueError(f"{name} must be numeric scores, got dtype {s.dtype}")
    s = s.astype(np.float64)
    bad = ~np.isfinite(s)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} non-finite score(s) (NaN or inf), "
                         f"first at index {int(np.flatnonzero(bad)[0])}")
    return s


def _check_threshold(threshold: float) -> float:
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return float(threshold)


def _check_boot(n_boot: int, level: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


# ---------------------------------------------------------------- building blocks


def _from_counts(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray,
                 fn: np.ndarray) -> dict[str, np.ndarray]:
    """Threshold metrics from confusion counts (arrays broadcast), ``nan`` where undefined."""
    tp, fp, tn, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, tn, fn))

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        num, den = np.broadcast_arrays(num, den)
        out = np.full(num.shape, np.nan)
        np.divide(num, den, out=out, where=den > 0)
        return out

    return {
        "accuracy": ratio(tp + tn, tp + fp + tn + fn),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "precision": ratio(tp, tp + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def _chunk_size(n_boot: int, width: int) -> int:
    return int(max(1, min(n_boot, _CHUNK_ELEMENTS // max(width, 1))))


def _stratified_indices(rng: np.random.Generator, pos: np.ndarray, neg: np.ndarray,
                        rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` resamples: (rows, n_pos) indices drawn from pos, (rows, n_neg) from neg."""
    ip = pos[rng.integers(0, pos.size, size=(rows, pos.size))] if pos.size else \
        np.empty((rows, 0), dtype=np.intp)
    ineg = neg[rng.integers(0, neg.size, size=(rows, neg.size))] if neg.size else \
        np.empty((rows, 0), dtype=np.intp)
    return ip, ineg


def _resampled_auc(codes: np.ndarray, n_levels: int, idx_pos: np.ndarray,
                   idx_neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of each row of resampled indices.

    ``codes`` are the scores replaced by their rank among the distinct values (0..n_levels-1,
    ``np.unique(p, return_inverse=True)``), so ties are exact. Per row: count the negatives at
    each score level, then every positive scores (negatives strictly below) + 0.5 (negatives
    tied with it). O(rows * (n + n_levels)), no sort per resample.
    """
    rows, n1 = idx_pos.shape
    n0 = idx_neg.shape[1]
    if n1 == 0 or n0 == 0:
        return np.full(rows, np.nan)
    offsets = (np.arange(rows) * n_levels)[:, None]
    neg_counts = np.bincount((offsets + codes[idx_neg]).ravel(),
                             minlength=rows * n_levels).reshape(rows, n_levels)
    below = np.cumsum(neg_counts, axis=1) - neg_counts
    credit = below + 0.5 * neg_counts
    wins = np.take_along_axis(credit, codes[idx_pos], axis=1).sum(axis=1)
    return wins / (n1 * n0)


def _rank_auc(y_true: ArrayLike, p: ArrayLike) -> float:
    """Mann-Whitney AUC on the full sample (the bootstrap's formula, for checking)."""
    y = _check_labels(y_true)
    s = _check_scores(p, y.size)
    _, codes = np.unique(s, return_inverse=True)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    return float(_resampled_auc(codes, int(codes.max()) + 1, pos[None, :], neg[None, :])[0])


def _percentile_ci(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval over the finite values (resamples where the metric is undefined,
    e.g. precision with no predicted positive, are left out); ``nan`` if none is finite."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


# ---------------------------------------------------------------- public API


def binary_metrics(y_true: ArrayLike, p: ArrayLike, threshold: float = 0.5) -> dict:
    """Point metrics of scores ``p`` (higher = more likely positive) against 0/1 labels.

    Returns auc (``nan`` with one class only), accuracy, sensitivity (recall of positives),
    specificity, precision, f1 (each ``nan`` when its denominator is 0), n, n_positive.
    """
    y = _check_labels(y_true)
    s = _check_scores(p, y.size)
    thr = _check_threshold(threshold)
    pred = s >= thr
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    fn = int(np.sum(~pred & pos))
    tn = int(np.sum(~pred & ~pos))
    both = 0 < tp + fn < y.size
    from sklearn.metrics import roc_auc_score  # ~0.5 s to load: only where scores are made

    out: dict = {"auc": float(roc_auc_score(y, s)) if both else float("nan")}
    out.update({k: float(v) for k, v in _from_counts(tp, fp, tn, fn).items()})
    out["n"] = int(y.size)
    out["n_positive"] = tp + fn
    return out


def bootstrap_metrics(y_true: ArrayLike, p: ArrayLike, threshold: float = 0.5,
                      n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Every metric of :func:`binary_metrics` with a percentile-bootstrap CI.

    Keys: ``<name>`` (full-sample value), ``<name>_lo``, ``<name>_hi`` for name in
    auc, accuracy, sensitivity, specificity, precision, f1; plus n, n_positive, n_boot, level.
    Resampling is over images, stratified by class (see module docstring), so n_positive is
    the same in every resample. A resample where a metric is undefined (precision with no
    predicted positive) is left out of that metric's interval.
    """
    y = _check_labels(y_true)
    s = _check_scores(p, y.size)
    thr = _check_threshold(threshold)
    _check_boot(n_boot, level)
    point = binary_metrics(y, s, thr)

    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    pred = s >= thr
    uniq, codes = np.unique(s, return_inverse=True)
    n_levels = uniq.size
    rng = np.random.default_rng(seed)
    boot: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}
    chunk = _chunk_size(n_boot, y.size + n_levels)
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        ip, ineg = _stratified_indices(rng, pos, neg, rows)
        tp = pred[ip].sum(axis=1)
        fp = pred[ineg].sum(axis=1)
        counts = _from_counts(tp, fp, ineg.shape[1] - fp, ip.shape[1] - tp)
        boot["auc"].append(_resampled_auc(codes, n_levels, ip, ineg))
        for k, v in counts.items():
            boot[k].append(v)

    out: dict = {}
    for k in METRICS:
        lo, hi = _percentile_ci(np.concatenate(boot[k]), level)
        out[k], out[f"{k}_lo"], out[f"{k}_hi"] = point[k], lo, hi
    out.update(n=point["n"], n_positive=point["n_positive"], n_boot=int(n_boot),
               level=float(level))
    return out


def _average_precision_rows(pos_scores: np.ndarray, neg_scores: np.ndarray) -> np.ndarray:
    """Average precision of each row (one resample: its positives' and negatives'
    scores): the mean, over the positives in descending score order, of the precision
    at each (ties: negatives first, the conservative order)."""
    scores = np.concatenate([pos_scores, neg_scores], axis=1)
    is_pos = np.concatenate([np.ones_like(pos_scores, dtype=bool),
                             np.zeros_like(neg_scores, dtype=bool)], axis=1)
    # descending score; among equal scores negatives first (lexsort: last key primary)
    order = np.lexsort((is_pos, -scores), axis=1)
    ranked = np.take_along_axis(is_pos, order, axis=1)
    hits = np.cumsum(ranked, axis=1)
    precision = hits / np.arange(1, scores.shape[1] + 1)
    return (precision * ranked).sum(axis=1) / max(pos_scores.shape[1], 1)


def _sensitivity_at_rows(pos_scores: np.ndarray, neg_scores: np.ndarray,
                         specificity: float) -> np.ndarray:
    """Per row: the share of positives above the threshold that keeps `specificity` of
    the negatives at or below it."""
    threshold = np.quantile(neg_scores, specificity, axis=1, method="higher")
    return (pos_scores > threshold[:, None]).mean(axis=1)


def rare_class_metrics(y_true: ArrayLike, p: ArrayLike, specificity: float = 0.9,
                       n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """What matters beside AUC when positives are rare (about 20% here): average
    precision (`ap`; chance level is the prevalence) and sensitivity at `specificity`
    (`sens_at_spec`), each with a stratified percentile-bootstrap CI (`_lo`, `_hi`),
    all resamples at once. `p` of shape (models, n), e.g. one row per training seed:
    the mean over the models, each resample scoring every model."""
    y = _check_labels(y_true)
    if np.ndim(p) == 2:
        if len(p) == 1:
            return rare_class_metrics(y, np.asarray(p)[0], specificity, n_boot, level, seed)
        models = [_check_scores(row, y.size) for row in np.asarray(p)]
        return _mean_over_models(y, models, specificity, n_boot, level, seed)
    s = _check_scores(p, y.size)
    _check_boot(n_boot, level)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if not pos.size or not neg.size:
        nan = float("nan")
        return {k: nan for k in ("ap", "ap_lo", "ap_hi", "sens_at_spec", "sens_at_spec_lo",
                                 "sens_at_spec_hi")} | {"specificity_target": specificity}
    out = {"ap": float(_average_precision_rows(s[pos][None], s[neg][None])[0]),
           "sens_at_spec": float(_sensitivity_at_rows(s[pos][None], s[neg][None],
                                                      specificity)[0])}
    rng = np.random.default_rng(seed)
    boots: dict[str, list[np.ndarray]] = {"ap": [], "sens_at_spec": []}
    chunk = _chunk_size(n_boot, 4 * y.size)
    for start in range(0, n_boot, chunk):
        ip, ineg = _stratified_indices(rng, pos, neg, min(chunk, n_boot - start))
        boots["ap"].append(_average_precision_rows(s[ip], s[ineg]))
        boots["sens_at_spec"].append(_sensitivity_at_rows(s[ip], s[ineg], specificity))
    for k, values in boots.items():
        out[f"{k}_lo"], out[f"{k}_hi"] = _percentile_ci(np.concatenate(values), level)
    out["specificity_target"] = specificity
    return out


def _mean_over_models(y: np.ndarray, models: list[np.ndarray], specificity: float,
                      n_boot: int, level: float, seed: int) -> dict:
    """rare_class_metrics of several models' mean: the same resamples for every model."""
    _check_boot(n_boot, level)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if not pos.size or not neg.size:
        return rare_class_metrics(y, models[0], specificity, n_boot, level, seed)
    out = {"ap": float(np.mean([_average_precision_rows(s[pos][None], s[neg][None])[0]
                                for s in models])),
           "sens_at_spec": float(np.mean([_sensitivity_at_rows(
               s[pos][None], s[neg][None], specificity)[0] for s in models]))}
    rng = np.random.default_rng(seed)
    boots: dict[str, list[np.ndarray]] = {"ap": [], "sens_at_spec": []}
    chunk = _chunk_size(n_boot, 4 * y.size)
    for start in range(0, n_boot, chunk):
        ip, ineg = _stratified_indices(rng, pos, neg, min(chunk, n_boot - start))
        boots["ap"].append(np.mean([_average_precision_rows(s[ip], s[ineg])
                                    for s in models], axis=0))
        boots["sens_at_spec"].append(np.mean([_sensitivity_at_rows(s[ip], s[ineg],
                                                                   specificity)
                                              for s in models], axis=0))
    for k, values in boots.items():
        out[f"{k}_lo"], out[f"{k}_hi"] = _percentile_ci(np.concatenate(values), level)
    out["specificity_target"] = specificity
    return out


def paired_bootstrap_difference(y_true: ArrayLike, p_a: ArrayLike, p_b: ArrayLike,
                                metric: str = "auc", n_boot: int = 2000,
                                level: float = 0.95, seed: int = 0) -> dict:
    """Compare two models scored on the same test images: metric(a) - metric(b).

    Each resample draws one set of image indices (stratified by class) and scores both models
    on it, so the image-to-image variation they share cancels out. ``metric`` is "auc" or
    "accuracy" (threshold 0.5).

    Returns metric, a, b (full-sample values), diff (a - b, full sample), diff_lo, diff_hi
    (percentile interval of the bootstrap differences), p_value, n_boot, level.

    p_value is the two-sided bootstrap p of "no difference": ``2 * min(P(d <= 0), P(d >= 0))``
    over the bootstrap differences d, clipped to ``[1 / n_boot, 1]`` (a bootstrap cannot
    resolve p below 1/n_boot; identical models give d = 0 everywhere and p = 1). It is the
    smallest two-sided percentile-interval level at which 0 falls outside the interval, so it
    agrees with diff_lo/diff_hi: p < 1 - level about when 0 is outside them (up to quantile
    interpolation and ties).
    """
    if metric not in PAIRED_METRICS:
        raise ValueError(f"metric must be one of {PAIRED_METRICS}, got {metric!r}")
    y = _check_labels(y_true)
    sa = _check_scores(p_a, y.size, "p_a")
    sb = _check_scores(p_b, y.size, "p_b")
    _check_boot(n_boot, level)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if metric == "auc" and (pos.size == 0 or neg.size == 0):
        raise ValueError("metric 'auc' needs both classes in y_true, found only one")
    va = binary_metrics(y, sa)[metric]
    vb = binary_metrics(y, sb)[metric]

    rng = np.random.default_rng(seed)
    if metric == "auc":
        ua, ca = np.unique(sa, return_inverse=True)
        ub, cb = np.unique(sb, return_inverse=True)
        width = y.size + max(ua.size, ub.size)
    else:
        # correct[i]: +1 if only a is right on image i, -1 if only b, 0 otherwise.
        correct = ((sa >= 0.5) == (y == 1)).astype(np.int8) - ((sb >= 0.5) == (y == 1))
        width = y.size
    diffs = []
    chunk = _chunk_size(n_boot, width)
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        ip, ineg = _stratified_indices(rng, pos, neg, rows)
        if metric == "auc":
            d = (_resampled_auc(ca, ua.size, ip, ineg) - _resampled_auc(cb, ub.size, ip, ineg))
        else:
            d = (correct[ip].sum(axis=1) + correct[ineg].sum(axis=1)) / y.size
        diffs.append(d)
    d = np.concatenate(diffs)
    lo, hi = _percentile_ci(d, level)
    p_two = 2.0 * min(np.mean(d <= 0), np.mean(d >= 0))
    p_value = float(np.clip(p_two, 1.0 / n_boot, 1.0))
    return {"metric": metric, "a": va, "b": vb, "diff": va - vb, "diff_lo": lo, "diff_hi": hi,
            "p_value": p_value, "n_boot": int(n_boot), "level": float(level)}


def _auc_classes(y_true: ArrayLike, n_boot: int, level: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked labels and the indices of positives and negatives (AUC needs both)."""
    y = _check_labels(y_true)
    _check_boot(n_boot, level)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("AUC needs both classes in y_true, found only one")
    return y, pos, neg


def _coded_models(y: np.ndarray, scores: Sequence[ArrayLike], name: str
                  ) -> list[tuple[np.ndarray, int]]:
    """Each model's scores as rank codes and their number of levels (`_resampled_auc`)."""
    coded = []
    for k, p in enumerate(scores):
        u, c = np.unique(_check_scores(p, y.size, f"{name}[{k}]"), return_inverse=True)
        coded.append((c, u.size))
    return coded


def paired_bootstrap_mean_auc_difference(y_true: ArrayLike, p_a: Sequence[ArrayLike],
                                          p_b: Sequence[ArrayLike], n_boot: int = 2000,
                                          level: float = 0.95, seed: int = 0) -> dict:
    """Like :func:`paired_bootstrap_difference` for AUC, with several models per side
    scored on the same test images (e.g. one per training seed, paired seed by seed):
    the difference of the mean AUC over the models. Each resample of test images scores
    every model of both sides on it, so the CI covers test-image sampling of the
    seed-averaged gain (not seeds beyond those given). Returns a, b, diff, diff_lo,
    diff_hi, p_value, n_models, n_boot, level."""
    if len(p_a) != len(p_b) or not len(p_a):
        raise ValueError(f"need as many models on each side, got {len(p_a)} and {len(p_b)}")
    y, pos, neg = _auc_classes(y_true, n_boot, level)
    coded = _coded_models(y, p_a, "p_a") + _coded_models(y, p_b, "p_b")
    k = len(p_a)
    full = [_resampled_auc(c, n, pos[None, :], neg[None, :])[0] for c, n in coded]
    va, vb = float(np.mean(full[:k])), float(np.mean(full[k:]))
    rng = np.random.default_rng(seed)
    chunk = _chunk_size(n_boot, y.size + max(n for _, n in coded))
    diffs = []
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        ip, ineg = _stratified_indices(rng, pos, neg, rows)
        aucs = [_resampled_auc(c, n, ip, ineg) for c, n in coded]
        diffs.append(np.mean(aucs[:k], axis=0) - np.mean(aucs[k:], axis=0))
    d = np.concatenate(diffs)
    lo, hi = _percentile_ci(d, level)
    p_two = 2.0 * min(np.mean(d <= 0), np.mean(d >= 0))
    return {"a": va, "b": vb, "diff": va - vb, "diff_lo": lo, "diff_hi": hi,
            "p_value": float(np.clip(p_two, 1.0 / n_boot, 1.0)), "n_models": k,
            "n_boot": int(n_boot), "level": float(level)}


def bootstrap_mean_auc(y_true: ArrayLike, ps: Sequence[ArrayLike], n_boot: int = 2000,
                       level: float = 0.95, seed: int = 0) -> dict:
    """The mean AUC of several models scored on the same test images (e.g. one per
    training seed) with a stratified bootstrap CI: each resample of test images scores
    every model on it. Returns auc, auc_lo, auc_hi, n_models, n_boot, level."""
    if not len(ps):
        raise ValueError("need at least one model's scores")
    y, pos, neg = _auc_classes(y_true, n_boot, level)
    coded = _coded_models(y, ps, "ps")
    full = float(np.mean([_resampled_auc(c, n, pos[None, :], neg[None, :])[0]
                          for c, n in coded]))
    rng = np.random.default_rng(seed)
    chunk = _chunk_size(n_boot, y.size + max(n for _, n in coded))
    means = []
    for start in range(0, n_boot, chunk):
        ip, ineg = _stratified_indices(rng, pos, neg, min(chunk, n_boot - start))
        means.append(np.mean([_resampled_auc(c, n, ip, ineg) for c, n in coded], axis=0))
    lo, hi = _percentile_ci(np.concatenate(means), level)
    return {"auc": full, "auc_lo": lo, "auc_hi": hi, "n_models": len(ps),
            "n_boot": int(n_boot), "level": float(level)}


def roc_points(y_true: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve (fpr, tpr) from sklearn's ``roc_curve``; needs both classes."""
    y = _check_labels(y_true)
    s = _check_scores(p, y.size)
    if np.unique(y).size < 2:
        raise ValueError("ROC curve needs both classes in y_true, found only one")
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


def mean_over_seeds(df: pd.DataFrame, group_cols: str | Sequence[str], metric: str = "auc",
                    level: float = 0.95) -> pd.DataFrame:
    """Summarise a results table with one row per training seed.

    Per group: mean, std (sample std, ddof=1; ``nan`` for one seed), count (seeds with a
    non-missing value) and a t-based CI over seeds, ``mean -/+ t_{count-1} * std /
    sqrt(count)`` as ci_lo, ci_hi (``nan`` when count <= 1). Columns: group_cols, metric
    (the name summarised), mean, std, count, ci_lo, ci_hi. This CI reflects training-seed
    variation only, not test-set sampling (for that, see :func:`bootstrap_metrics`).
    """
    cols = [group_cols] if isinstance(group_cols, str) else list(group_cols)
    missing = [c for c in [*cols, metric] if c not in df.columns]
    if missing:
        raise ValueError(f"columns not in the results table: {missing}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = pd.to_numeric(df[metric], errors="raise").astype(np.float64)
    grouped = values.groupby([df[c] for c in cols], dropna=False, sort=True)
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    count = out["count"].to_numpy()
    std = out["std"].to_numpy(dtype=np.float64)
    mean = out["mean"].to_numpy(dtype=np.float64)
    half = np.full(len(out), np.nan)
    ok = count > 1
    from scipy import stats  # ~0.4 s to load: only for summaries

    t = stats.t.ppf(0.5 + level / 2.0, count[ok] - 1)
    half[ok] = t * std[ok] / np.sqrt(count[ok])
    out["ci_lo"] = mean - half
    out["ci_hi"] = mean + half
    out.insert(len(cols), "metric", metric)
    return out[[*cols, "metric", "mean", "std", "count", "ci_lo", "ci_hi"]]
