"""Torch datasets on small subsets of the real two-site chest X-rays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from harmonize.data.datasets import ImageDataset, UnpairedSiteDataset
from harmonize.data.io import read_image
from harmonize.data.manifest import load_manifest


@pytest.fixture(scope="module")
def subset(tb_cxr: Path) -> pd.DataFrame:
    """3 Montgomery + 5 Shenzhen images, both labels at each site."""
    df = load_manifest(tb_cxr / "manifest.csv")
    parts = [df[(df.site == "montgomery") & (df.label == "normal")].head(2),
             df[(df.site == "montgomery") & (df.label == "tb")].head(1),
             df[(df.site == "shenzhen") & (df.label == "normal")].head(2),
             df[(df.site == "shenzhen") & (df.label == "tb")].head(3)]
    return pd.concat(parts, ignore_index=True)


def test_image_dataset_items(subset: pd.DataFrame):
    ds = ImageDataset(subset, size=64)
    assert len(ds) == 8
    item = ds[2]
    assert item["image"].shape == (1, 64, 64) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["image"].std() > 0.05  # a real radiograph, not a blank
    assert item["label"] == 1 and item["site"] == "montgomery"  # row 2 is montgomery/tb
    assert item["path"] == subset["path"][2] and item["index"] == 2
    assert [ds[i]["label"] for i in range(8)] == [0, 0, 1, 0, 0, 1, 1, 1]


def test_native_size_follows_intensity_policy(subset: pd.DataFrame):
    item = ImageDataset(subset, size=None)[0]
    stored = read_image(subset["path"][0]).array  # 8-bit PNG: model value = stored / 255
    assert item["image"].shape == (1, *stored.shape)
    np.testing.assert_allclose(item["image"][0].numpy(), stored / 255.0, atol=1e-6)


def test_image_dataset_batches_and_unlabelled(subset: pd.DataFrame):
    ds = ImageDataset(subset.assign(label=""), size=32)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32)
    assert batch["label"].tolist() == [-1, -1, -1, -1]
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_resize_is_deterministic(subset: pd.DataFrame):
    ds = ImageDataset(subset, size=48)
    assert torch.equal(ds[5]["image"], ds[5]["image"])


def test_unpaired_site_dataset(subset: pd.DataFrame):
    ds = UnpairedSiteDataset(subset, reference_site="shenzhen", size=32, seed=0)
    assert len(ds) == 3  # one item per montgomery image
    assert ds.sites == ["montgomery", "shenzhen"]
    item = ds[1]
    assert item["source"].shape == (1, 32, 32) and item["reference"].shape == (1, 32, 32)
    assert item["source_site"] == "montgomery" and item["source_site_index"] == 0
    assert "/shenzhen/" in item["reference_path"] and "/montgomery/" in item["source_path"]
    pairs = [ds.reference_index(i) for i in range(3)]
    again = UnpairedSiteDataset(subset, "shenzhen", size=32, seed=0)
    assert [again.reference_index(i) for i in range(3)] == pairs
    assert torch.equal(again[1]["reference"], item["reference"])
    draws = {tuple(UnpairedSiteDataset(subset, "shenzhen", 32, seed=s).reference_index(i)
                   for i in range(3)) for s in range(6)}
    assert len(draws) > 1  # the seed matters
    by_epoch = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        by_epoch.add(tuple(ds.reference_index(i) for i in range(3)))
    assert len(by_epoch) > 1  # new partners per epoch
    with pytest.raises(IndexError):
        ds[3]


def test_unpaired_missing_reference_names_sites(subset: pd.DataFrame):
    with pytest.raises(ValueError, match=r"sites present: \['montgomery', 'shenzhen'\]"):
        UnpairedSiteDataset(subset, reference_site="boston", size=32)
    with pytest.raises(ValueError, match="at least one other site"):
        UnpairedSiteDataset(subset[subset.site == "shenzhen"], "shenzhen", size=32)
