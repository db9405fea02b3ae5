"""From a feature table (one row per image) to the numbers of a site-shift report.

`analyze` runs every statistic on one set of images; `compare` runs it on the same
images before and after harmonization and lists the change in each headline number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harmonize.radiomics.combat import combat_features, combat_fold_transform
from harmonize.radiomics.distance import pooled_scale, site_distances
from harmonize.radiomics.stats import (
    family_summary,
    per_feature_tests,
    site_predictability,
    usable_sites,
)

FEATURE_PREFIX = "original_"


def feature_columns(df: pd.DataFrame) -> list[str]:
    """Radiomics columns that vary and are finite everywhere (others carry no signal)."""
    cols = [c for c in df.columns if c.startswith(FEATURE_PREFIX)]
    values = df[cols].apply(pd.to_numeric, errors="coerce")
    finite = np.isfinite(values.to_numpy(float)).all(axis=0)
    varying = (values.max() - values.min()).to_numpy() > 0
    return [c for c, ok in zip(cols, finite & varying, strict=True) if ok]


@dataclass
class ShiftAnalysis:
    reference_site: str
    n_images: int
    sites: list[str]
    feature_cols: list[str]
    tests: pd.DataFrame
    families: pd.DataFrame
    predictability: dict
    distances: pd.DataFrame
    combat: dict
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The JSON-ready headline numbers."""
        p = self.predictability
        return {
            "n_images": self.n_images,
            "n_features": len(self.feature_cols),
            "sites": self.sites,
            "reference_site": self.reference_site,
            "site_auc": p["site_auc"],
            "site_balanced_accuracy": p["site_balanced_accuracy"],
            "chance_balanced_accuracy": p["chance_balanced_accuracy"],
            "chance_auc": p["chance_auc"],
            "shifted_feature_share": float(self.tests["significant"].mean())
            if len(self.tests) else float("nan"),
            "shift_by_family": {
                r["family"]: {"shifted_share": float(r["shifted_share"]),
                              "mean_epsilon_sq": float(r["mean_epsilon_sq"]),
                              "n_features": int(r["n_features"])}
                for r in self.families.to_dict("records")},
            "distances": {
                r["site"]: {"frd": r["frd"], "frd_ci95": [r["frd_lo"], r["frd_hi"]],
                            "mmd2": r["mmd2"], "mmd2_ci95": [r["mmd2_lo"], r["mmd2_hi"]],
                            "n": int(r["n"])}
                for r in self.distances.to_dict("records")},
            "combat_baseline": self.combat,
            "notes": self.notes,
        }


def analyze(features: pd.DataFrame, reference_site: str | None = None,
            feature_cols: list[str] | None = None, n_boot: int = 200,
            seed: int = 0, scale: tuple[np.ndarray, np.ndarray] | None = None) -> ShiftAnalysis:
    """Every statistic of the report; `scale` (feature mean, sd) fixes the units of the
    distances (a comparison passes the original set's, so both are in the same units)."""
    keep, notes = usable_sites(features)
    df = features[features["site"].isin(keep)].reset_index(drop=True)
    if len(keep) < 2:
        raise ValueError("a site-shift report needs at least 2 sites with 3 or more "
                         f"readable images each; have {dict(features['site'].value_counts())}")
    if reference_site is None:
        reference_site = str(df["site"].value_counts().idxmax())  # the largest site
    if reference_site not in keep:
        raise ValueError(f"reference site '{reference_site}' is not among the usable sites "
                         f"{keep}")
    cols = feature_cols if feature_cols is not None else feature_columns(df)
    tests = per_feature_tests(df, cols)
    predict = site_predictability(df, cols, seed=seed)
    combat_tests = per_feature_tests(combat_features(df, cols), cols)
    combat_pred = site_predictability(df, cols, seed=seed,
                                      fold_transform=combat_fold_transform(cols))
    combat = {"site_auc": combat_pred["site_auc"],
              "site_balanced_accuracy": combat_pred["site_balanced_accuracy"],
              "shifted_feature_share": float(combat_tests["significant"].mean()),
              "note": "ComBat (empirical Bayes, label as covariate) on the features "
                      "themselves: what statistical feature harmonization alone achieves. "
                      "Site prediction refits ComBat in each training fold; the shifted "
                      "share is in-sample."}
    return ShiftAnalysis(
        reference_site=reference_site, n_images=len(df), sites=keep, feature_cols=cols,
        tests=tests, families=family_summary(tests), predictability=predict,
        distances=site_distances(df, cols, reference_site, n_boot=n_boot, seed=seed,
                                 scale=scale),
        combat=combat, notes=notes)


HEADLINES = ["site_auc", "site_balanced_accuracy", "shifted_feature_share"]


def compare(before: pd.DataFrame, after: pd.DataFrame, reference_site: str | None = None,
            n_boot: int = 200, seed: int = 0) -> tuple[ShiftAnalysis, ShiftAnalysis, pd.DataFrame]:
    """Both analyses on the images present in both sets, and the change per number."""
    common = sorted(set(before["relpath"]) & set(after["relpath"]))
    if not common:
        raise ValueError("no image is present in both the original and the harmonized set "
                         "(the harmonized folder must mirror the original tree)")
    b = before[before["relpath"].isin(common)].sort_values("relpath").reset_index(drop=True)
    a = after[after["relpath"].isin(common)].sort_values("relpath").reset_index(drop=True)
    cols = [c for c in feature_columns(b) if c in set(feature_columns(a))]
    res_b = analyze(b, reference_site, cols, n_boot, seed)
    scale = pooled_scale(np.nan_to_num(b[cols].to_numpy(float)))
    res_a = analyze(a, res_b.reference_site, cols, n_boot, seed, scale=scale)
    sb, sa = res_b.summary(), res_a.summary()
    rows = [{"measure": k, "before": sb[k], "after": sa[k], "change": sa[k] - sb[k]}
            for k in HEADLINES]
    for site, d in sb["distances"].items():
        for k in ("frd", "mmd2"):
            after_v = sa["distances"].get(site, {}).get(k, float("nan"))
            rows.append({"measure": f"{k}[{site}]", "before": d[k], "after": after_v,
                         "change": after_v - d[k]})
    return res_b, res_a, pd.DataFrame(rows)
