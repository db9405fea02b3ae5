"""Patient-grouped, stratified splits; leave-one-site-out; site splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harmonize.data.manifest import load_manifest
from harmonize.data.splits import leave_one_site_out, patient_split, site_split


@pytest.fixture(scope="module")
def tb(tb_cxr: Path) -> pd.DataFrame:
    """The real 800-image two-site manifest (tb_cxr from conftest skips if absent)."""
    return load_manifest(tb_cxr / "manifest.csv", mask_column="lung_mask")


def _multi_image(n_patients: int = 60, seed: int = 0) -> pd.DataFrame:
    """Patients with 1-4 images each, at 3 sites, ~30% positive."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        site = "abc"[p % 3]
        label = "fracture" if rng.random() < 0.3 else "normal"
        for k in range(rng.integers(1, 5)):
            rows.append({"path": f"{site}/{p}_{k}.png", "site": site, "label": label,
                         "patient_id": f"{site}{p}"})
    return pd.DataFrame(rows)


def _no_overlap(df: pd.DataFrame) -> None:
    sides = df.groupby("patient_id")["split"].nunique()
    assert (sides == 1).all(), "a patient is on two sides"


def test_real_split_grouped_stratified_per_site(tb: pd.DataFrame):
    out = patient_split(tb, test_size=0.2, val_size=0.1, seed=3)
    assert out.index.equals(tb.index) and (out["path"] == tb["path"]).all()
    _no_overlap(out)
    share = out["split"].value_counts(normalize=True)
    assert share["test"] == pytest.approx(0.2, abs=0.02)
    assert share["val"] == pytest.approx(0.1, abs=0.02)
    overall_tb = (tb["label"] == "tb").mean()
    for part, rows in out.groupby("split"):
        assert (rows["label"] == "tb").mean() == pytest.approx(overall_tb, abs=0.03), part
    for site, rows in out.groupby("site"):  # each site keeps its share in test
        assert (rows["split"] == "test").mean() == pytest.approx(0.2, abs=0.03), site


def test_real_split_reproducible(tb: pd.DataFrame):
    a = patient_split(tb, seed=7)["split"]
    b = patient_split(tb, seed=7)["split"]
    c = patient_split(tb, seed=8)["split"]
    assert a.equals(b)
    assert not a.equals(c)


def test_multi_image_patients_stay_together():
    df = _multi_image()
    out = patient_split(df, test_size=0.25, val_size=0.15, seed=1)
    _no_overlap(out)
    assert set(out["split"]) == {"train", "val", "test"}
    assert "split" not in df.columns  # input untouched


def test_existing_split_column_is_overwritten():
    df = _multi_image().assign(split="test")
    out = patient_split(df, test_size=0.2, seed=0)
    assert (out["split"] == "train").mean() > 0.6


def test_unlabelled_and_tiny_sets_fall_back_to_grouping():
    df = _multi_image(30).assign(label="")
    out = patient_split(df, test_size=0.2, seed=0)
    _no_overlap(out)
    assert 0.05 < (out["split"] == "test").mean() < 0.4
    tiny = pd.DataFrame({"patient_id": list("abcde"), "site": "s",
                         "label": ["normal", "tb", "tb", "normal", "normal"], "path": "x"})
    out = patient_split(tiny, test_size=0.4, seed=0)
    assert (out["split"] == "test").sum() == 2


def test_not_stratified_option():
    out = patient_split(_multi_image(), test_size=0.2, stratify=False, seed=0)
    _no_overlap(out)
    assert out.groupby("patient_id").ngroups == 60


@pytest.mark.parametrize(("test_size", "val_size"), [(0, 0), (1, 0), (0.5, 0.5), (0.2, -0.1)])
def test_bad_sizes(test_size: float, val_size: float):
    with pytest.raises(ValueError):
        patient_split(_multi_image(), test_size=test_size, val_size=val_size)


def test_leave_one_site_out_real(tb: pd.DataFrame):
    folds = list(leave_one_site_out(tb))
    assert [f[0] for f in folds] == ["montgomery", "shenzhen"]
    for site, train, test in folds:
        assert set(test["site"]) == {site} and site not in set(train["site"])
        assert len(train) + len(test) == len(tb)
        assert not set(train["patient_id"]) & set(test["patient_id"])


def test_leave_one_site_out_errors():
    one = _multi_image().assign(site="a")
    with pytest.raises(ValueError, match="at least 2 sites"):
        list(leave_one_site_out(one))
    shared = _multi_image()
    shared.loc[shared.index[-1], "patient_id"] = shared["patient_id"].iloc[0]
    with pytest.raises(ValueError, match="more than one site"):
        list(leave_one_site_out(shared))


def test_site_split():
    df = _multi_image()
    train, test = site_split(df, ["a", "b"], "c")
    assert set(train["site"]) == {"a", "b"} and set(test["site"]) == {"c"}
    train, test = site_split(df, "a")  # test: all other sites
    assert set(test["site"]) == {"b", "c"}
    with pytest.raises(ValueError, match=r"available sites: \['a', 'b', 'c'\]"):
        site_split(df, "a", "zz")
    with pytest.raises(ValueError, match="both train and test"):
        site_split(df, ["a", "b"], ["b"])
    shared = df.copy()
    shared.loc[shared["site"] == "c", "patient_id"] = shared["patient_id"].iloc[0]
    with pytest.raises(ValueError, match="patient"):
        site_split(shared, "a", "c")
