"""How different are the sites? Per-feature tests and site predictability.

- Kruskal-Wallis per feature across sites (no normality assumption; radiomics features
  are skewed), with epsilon-squared effect size E2 = H / (n - 1) (Tomczak & Tomczak
  2014) and Benjamini-Hochberg FDR across features.
- Site predictability: a patient-grouped, cross-validated logistic regression predicts
  the site from standardized features; balanced accuracy (chance = 1 / n_sites) and
  one-vs-rest macro AUC (chance = 0.5). Lower after harmonization = less site signal.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

MIN_IMAGES_PER_SITE = 3


def feature_family(name: str) -> str:
    """'original_glcm_Contrast' -> 'glcm'."""
    parts = name.split("_")
    return parts[1] if len(parts) >= 3 else parts[0]


def usable_sites(df: pd.DataFrame, site_col: str = "site") -> tuple[list[str], list[str]]:
    """Sites with enough images for statistics, and messages about the others."""
    counts = df[site_col].value_counts()
    keep = sorted(counts[counts >= MIN_IMAGES_PER_SITE].index)
    notes = [f"site '{s}' has {n} image(s) (< {MIN_IMAGES_PER_SITE}); left out of the "
             "statistics" for s, n in counts.items() if n < MIN_IMAGES_PER_SITE]
    return keep, notes


def per_feature_tests(df: pd.DataFrame, feature_cols: list[str], site_col: str = "site",
                      alpha: float = 0.05) -> pd.DataFrame:
    """One row per feature: H, p, BH q, epsilon squared, significant, median per site."""
    sites = sorted(df[site_col].unique())
    groups = {s: df.loc[df[site_col] == s, feature_cols] for s in sites}
    n = len(df)
    rows = []
    for col in feature_cols:
        samples = [groups[s][col].to_numpy(dtype=float) for s in sites]
        if len(sites) < 2 or np.ptp(np.concatenate(samples)) == 0:
            h, p = 0.0, 1.0  # constant feature: no evidence of a difference
        else:
            h, p = stats.kruskal(*samples)
        row = {"feature": col, "family": feature_family(col), "H": float(h), "p": float(p),
               "epsilon_sq": float(h) / (n - 1) if n > 1 else 0.0}
        row.update({f"median[{s}]": float(np.median(v)) for s, v in zip(sites, samples,
                                                                         strict=True)})
        rows.append(row)
    out = pd.DataFrame(rows)
    out["q"] = stats.false_discovery_control(out["p"].to_numpy()) if len(out) else []
    out["significant"] = out["q"] < alpha
    return out.sort_values("epsilon_sq", ascending=False).reset_index(drop=True)


def family_summary(tests: pd.DataFrame) -> pd.DataFrame:
    """Which feature families carry the shift: share significant and mean effect size."""
    g = tests.groupby("family")
    return pd.DataFrame({
        "n_features": g.size(),
        "shifted_share": g["significant"].mean(),
        "mean_epsilon_sq": g["epsilon_sq"].mean(),
    }).sort_values("mean_epsilon_sq", ascending=False).reset_index()


FoldTransform = Callable[[pd.DataFrame, pd.DataFrame], tuple[np.ndarray, np.ndarray]]


def site_predictability(df: pd.DataFrame, feature_cols: list[str], site_col: str = "site",
                        group_col: str = "patient_id", folds: int = 5, seed: int = 0,
                        fold_transform: FoldTransform | None = None) -> dict:
    """Out-of-fold site prediction from features, grouped by patient. `fold_transform`
    (train rows, test rows) -> (x_train, x_test) lets a feature harmonizer such as ComBat
    be fitted inside each training fold, so it is judged out of sample."""
    sites = sorted(df[site_col].unique())
    y = df[site_col].map({s: i for i, s in enumerate(sites)}).to_numpy()
    x = np.nan_to_num(df[feature_cols].to_numpy(dtype=float))
    folds = min(folds, int(np.bincount(y).min()))
    if len(sites) < 2 or folds < 2:
        return {"site_auc": float("nan"), "site_balanced_accuracy": float("nan"),
                "chance_balanced_accuracy": 1 / max(len(sites), 1), "chance_auc": 0.5,
                "note": "needs at least 2 sites with 2 images each"}
    if group_col in df and df[group_col].nunique() < len(df):
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        splits = splitter.split(x, y, groups=df[group_col].to_numpy())
    else:
        splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y)
    proba = np.zeros((len(y), len(sites)))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on near-constant features
        for train, test in splits:
            x_train, x_test = x[train], x[test]
            if fold_transform is not None:
                x_train, x_test = fold_transform(df.iloc[train], df.iloc[test])
            model.fit(x_train, y[train])
            proba[np.ix_(test, model[-1].classes_)] = model.predict_proba(x_test)
    if len(sites) == 2:
        auc = roc_auc_score(y, proba[:, 1])
    else:
        auc = roc_auc_score(y, proba, multi_class="ovr", average="macro")
    return {"site_auc": float(auc),
            "site_balanced_accuracy": float(balanced_accuracy_score(y, proba.argmax(1))),
            "chance_balanced_accuracy": 1 / len(sites), "chance_auc": 0.5,
            "cv_folds": folds, "classifier": "standardized L2 logistic regression (C=0.1)"}
