"""Patient-grouped splits: random, leave-one-site-out, and train-on-X/test-on-Y.

A patient's images never land on both sides of a split (images of one patient are near
duplicates; leaking them inflates every score). Random splits are stratified by site and
label where the data allow, so each site keeps its share and its prevalence in every part.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

MAX_FOLDS = 20  # a split fraction is taken as m of k stratified folds, k <= MAX_FOLDS
FRACTION_TOLERANCE = 0.025  # how far m/k may be from the asked fraction


def patient_split(
    df: pd.DataFrame,
    test_size: float = 0.2,
    val_size: float = 0.0,
    seed: int = 0,
    stratify: bool = True,
) -> pd.DataFrame:
    """Return a copy of `df` with a ``split`` column of train/val/test (overwritten if present).

    Sizes are fractions of patients (= of images when each patient has one image).
    Stratification, best first: by site and label, by label, by site; the first whose
    every class has enough patients for the folds is used (StratifiedGroupKFold, taking
    m of k folds so that m/k is within 0.025 of the asked size). Otherwise, e.g. for a
    tiny set or size, an unstratified GroupShuffleSplit. The same df and seed give the
    same split.
    """
    if not 0 < test_size < 1:
        raise ValueError(f"test_size={test_size}: expected a fraction in (0, 1)")
    if not 0 <= val_size < 1 or test_size + val_size >= 1:
        raise ValueError(f"val_size={val_size}: expected 0 <= val_size < 1 - test_size")
    _require(df, ("patient_id", "site", "label"))
    n_patients = df["patient_id"].nunique()
    parts = 2 + (val_size > 0)
    if n_patients < parts:
        raise ValueError(f"{n_patients} patient(s): need at least {parts} for "
                         "train/test" + ("/val" if val_size > 0 else ""))
    out = df.copy()
    split = np.full(len(df), "train", dtype=object)
    is_test = _pick(df, test_size, seed, stratify)
    split[is_test] = "test"
    if val_size > 0:
        rest = np.flatnonzero(~is_test)
        is_val = _pick(df.iloc[rest], val_size / (1 - test_size), seed, stratify)
        split[rest[is_val]] = "val"
    out["split"] = pd.Series(split, index=df.index, dtype=str)
    return out


def _pick(df: pd.DataFrame, fraction: float, seed: int, stratify: bool) -> np.ndarray:
    """Boolean mask of the rows whose patients make up `fraction` of the patients."""
    groups = df["patient_id"].astype(str).to_numpy()
    x = np.zeros(len(df))
    for y in _strata(df) if stratify else []:
        for k, m in _fold_choices(fraction):
            if _min_groups_per_class(y, groups) < k:
                continue
            cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            chosen = np.zeros(len(df), dtype=bool)
            for fold, (_, idx) in enumerate(cv.split(x, y, groups)):
                if fold < m:
                    chosen[idx] = True
            return chosen
    gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    _, idx = next(gss.split(x, groups=groups))
    chosen = np.zeros(len(df), dtype=bool)
    chosen[idx] = True
    return chosen


def _strata(df: pd.DataFrame) -> list[np.ndarray]:
    """Candidate class vectors, best first; labels only when the data are labelled."""
    site = df["site"].astype(str).to_numpy()
    label = df["label"].astype(str).to_numpy()
    labelled = bool((label != "").all())
    out = []
    if labelled:
        out.append(np.char.add(np.char.add(site.astype(str), "\x1f"), label.astype(str)))
        out.append(label)
    if len(set(site)) > 1:
        out.append(site)
    return out


def _fold_choices(fraction: float) -> list[tuple[int, int]]:
    """(k, m) with m/k close to `fraction`, closest first, fewer folds first on ties."""
    choices = [
        (abs(m / k - fraction), k, m)
        for k in range(2, MAX_FOLDS + 1)
        for m in range(1, k)
        if abs(m / k - fraction) <= FRACTION_TOLERANCE
    ]
    return [(k, m) for _, k, m in sorted(choices)]


def _min_groups_per_class(y: np.ndarray, groups: np.ndarray) -> int:
    pairs = pd.DataFrame({"y": y, "g": groups}).drop_duplicates()
    return int(pairs.groupby("y")["g"].nunique().min())


def leave_one_site_out(df: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """Yield (test_site, train, test) once per site, sites in sorted order.

    Raises if fewer than two sites, or if a patient appears at two sites (the held-out
    site would not be unseen).
    """
    _require(df, ("site", "patient_id"))
    sites = sorted(df["site"].astype(str).unique())
    if len(sites) < 2:
        raise ValueError(f"leave-one-site-out needs at least 2 sites; found {sites}")
    _check_patients_single_site(df)
    for site in sites:
        held_out = (df["site"] == site).to_numpy()
        yield site, df[~held_out].copy(), df[held_out].copy()


def site_split(
    df: pd.DataFrame,
    train_sites: str | Iterable[str],
    test_sites: str | Iterable[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split into (train, test) by site: "train on sites X, test on site Y".

    test_sites None means every site not in train_sites. Sites in neither list are left
    out. Raises for an unknown site (naming the available ones), a site on both sides,
    or a patient on both sides.
    """
    _require(df, ("site", "patient_id"))
    available = sorted(df["site"].astype(str).unique())
    train = _as_list(train_sites)
    test = [s for s in available if s not in train] if test_sites is None else _as_list(
        test_sites)
    unknown = [s for s in train + test if s not in available]
    if unknown:
        raise ValueError(f"unknown site(s) {unknown}; available sites: {available}")
    if not train or not test:
        raise ValueError(f"need at least one train and one test site (train={train}, "
                         f"test={test}); available sites: {available}")
    both = sorted(set(train) & set(test))
    if both:
        raise ValueError(f"site(s) {both} are both train and test sites")
    train_df = df[df["site"].isin(train)].copy()
    test_df = df[df["site"].isin(test)].copy()
    shared = sorted(set(train_df["patient_id"]) & set(test_df["patient_id"]))
    if shared:
        raise ValueError(
            f"{len(shared)} patient(s) appear in both train sites {train} and test sites "
            f"{test} (e.g. {shared[:5]}); give each patient one site or drop the duplicates"
        )
    return train_df, test_df


def _check_patients_single_site(df: pd.DataFrame) -> None:
    n_sites = df.groupby("patient_id")["site"].nunique()
    multi = sorted(n_sites[n_sites > 1].index.astype(str))
    if multi:
        raise ValueError(
            f"{len(multi)} patient(s) appear at more than one site (e.g. {multi[:5]}); "
            "give each patient one site or drop the duplicates"
        )


def _as_list(sites: str | Iterable[str]) -> list[str]:
    return [sites] if isinstance(sites, str) else [str(s) for s in sites]


def _require(df: pd.DataFrame, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"manifest has no column(s) {missing}; columns are {list(df.columns)}")
    if df.empty:
        raise ValueError("manifest is empty")
