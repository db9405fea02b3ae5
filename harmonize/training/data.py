"""What every translator training does to its data before the first step: select the
manifest rows (checked against the config), then read every image once (an unreadable
file stops the run at once, naming it, not after an hour), building the reference site's
mean thumbnail and finding the source images whose grey scale is inverted."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from harmonize.configs import ConfigError
from harmonize.data import polarity as pol
from harmonize.data.datasets import resize_square
from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.data.manifest import select_rows as select_manifest_rows


def select_training_rows(data, reference_only: bool = False,
                         needs_others: str = "training needs at least one other site"
                         ) -> pd.DataFrame:
    """Rows of `data.manifest` (a `TranslatorDataConfig`) to train on; with
    `reference_only` just the reference site's. Raises ConfigError naming what is wrong."""
    df, present, where = select_manifest_rows(data.manifest, data.sites, data.split)
    wanted = data.sites if data.sites is not None else present
    ref = data.reference_site
    if ref not in wanted:
        hint = "add it to data.sites" if ref in present else f"sites present: {', '.join(present)}"
        raise ConfigError(f"data.reference_site '{ref}' is not among the training sites of "
                          f"{where}; {hint}")
    if reference_only:
        wanted = [ref]
    elif len(wanted) < 2:
        raise ConfigError(f"only the reference site '{ref}' to train on; {needs_others}")
    return df[df["site"].astype(str).isin(wanted)].reset_index(drop=True)


def scan_images(df: pd.DataFrame, policy: IntensityPolicy, reference_site: str,
                polarity: str, progress: bool = True,
                keep: Callable[[str, np.ndarray], None] | None = None
                ) -> tuple[np.ndarray, set[str]]:
    """Read every row once: returns (reference template, inverted source paths); `keep`
    sees each (path, model-space image), e.g. to cache it."""
    thumbs: dict[str, np.ndarray] = {}
    rows = df["manifest_row"] if "manifest_row" in df else range(1, len(df) + 1)
    for row, path in tqdm(list(zip(rows, df["path"], strict=True)), desc="scan images",
                          unit="img", disable=not progress):
        try:
            x, _ = policy.to_model(read_image(path))
        except Exception as err:  # noqa: BLE001 - one message naming the file and row
            raise ConfigError(f"manifest row {row}: {path} cannot be read for training: "
                              f"{' '.join(str(err).split())}; fix or remove that row") from None
        thumbs[path] = pol.thumbnail(x)
        if keep is not None:
            keep(path, x)
    is_ref = (df["site"].astype(str) == reference_site).to_numpy()
    template = np.mean([thumbs[p] for p in df["path"][is_ref]], axis=0).astype(np.float32)
    flipped: set[str] = set()
    if polarity == "auto":
        flipped = {p for p in df["path"][~is_ref] if pol.correlation(thumbs[p], template) < 0}
    return template, flipped


class ImageCache(dict):
    """path -> (1, h, w) float32 tensor in [0, 1] (resized to `size` x `size` when given),
    as `load_image_tensor` would read it, kept up to a memory budget: training then
    decodes each image once, not once per item per epoch. Pass `keep` to `scan_images`."""

    def __init__(self, budget_mb: int, size: int | None = None) -> None:
        super().__init__()
        self.budget = budget_mb * 2**20
        self.size = size

    def keep(self, path: str, x: np.ndarray) -> None:
        t = torch.from_numpy(np.clip(x, 0.0, 1.0, dtype=np.float32))[None]
        t = resize_square(t, self.size) if self.size is not None else t
        if t.numel() * 4 <= self.budget:
            self[path] = t
            self.budget -= t.numel() * 4


def flipped_per_site(df: pd.DataFrame, flipped: set[str]) -> dict[str, int]:
    """How many images of each site were found inverted (for the checkpoint metadata)."""
    rows = df[df["path"].isin(flipped)]
    return {str(s): int(n) for s, n in rows["site"].value_counts().sort_index().items()}
