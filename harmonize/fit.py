"""Fit a classical translator on the images a manifest lists and save a checkpoint
with the metadata the checkpoint contract asks for."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.radiomics.masks import ROIError, optional_mask
from harmonize.rerun import replacing_checkpoint
from harmonize.training.metadata import training_metadata
from harmonize.translators.base import Translator


def check_reference_site(df: pd.DataFrame, reference_site: str, source: str = "manifest") -> None:
    sites = sorted(df["site"].unique())
    if reference_site not in sites:
        raise ValueError(f"{source}: reference site '{reference_site}' not found; "
                         f"sites present: {', '.join(sites)}")


def model_space_images(df: pd.DataFrame, policy: IntensityPolicy, progress: bool = True,
                       desc: str = "read") -> Iterator[tuple[np.ndarray, str]]:
    """(model-space image, site) for each manifest row, in order."""
    for path, site in tqdm(list(zip(df["path"], df["site"], strict=True)), desc=desc,
                           unit="img", disable=not progress):
        x, _ = policy.to_model(read_image(path))
        yield x, site


def model_space_images_with_masks(df: pd.DataFrame, policy: IntensityPolicy,
                                  progress: bool = True, desc: str = "read"
                                  ) -> Iterator[tuple[np.ndarray, str, np.ndarray | None]]:
    """(model-space image, site, ROI mask or None) for each manifest row: the `mask`
    column's file where the row has one. A row whose mask is unusable (empty, another
    size) is left out, with a warning naming the files and the fix."""
    masks = df["mask"] if "mask" in df.columns else [None] * len(df)
    for (x, site), mask, path in zip(model_space_images(df, policy, progress, desc), masks,
                                     df["path"], strict=True):
        try:
            yield x, site, optional_mask(mask, x.shape)
        except ROIError as err:
            warnings.warn(f"{path}: left out of fit: {err}", stacklevel=2)


def fit_and_save(translator: Translator, df: pd.DataFrame, manifest_path: str | os.PathLike,
                 reference_site: str, out: str | os.PathLike, progress: bool = True) -> Path:
    """Fit on the manifest rows (all sites; each kind uses what it needs) and save."""
    check_reference_site(df, reference_site, str(manifest_path))
    rows = df if translator.fit_uses_all_sites else df[df["site"] == reference_site]
    read = model_space_images_with_masks if translator.uses_masks else model_space_images
    translator.fit(read(rows, translator.policy, progress, f"fit {translator.kind}"),
                   reference_site)
    meta = training_metadata(rows, reference_site, manifest_path, translator.policy)
    replacing_checkpoint(Path(out), translator.kind, reference_site)
    return translator.save(out, meta)
