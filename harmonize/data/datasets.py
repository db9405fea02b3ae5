"""Torch datasets over a manifest: labelled images, and unpaired source/reference pairs.

Images go through the one intensity policy (`harmonize.data.intensity`), so a model sees
the same [0, 1] scale in training as `harmonize apply` gives it later. Training items are
clipped to [0, 1] (the percentile policy can leave a few values outside) and, when a size
is given, resized to size x size with an antialiased bilinear filter (aspect ratio not
kept: X-ray sets are usually near square; crop or pad beforehand if that matters).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.data.manifest import binary_targets


def load_image_tensor(
    path: str, size: int | None = None, policy: IntensityPolicy | None = None
) -> torch.Tensor:
    """Read one image as a float32 (1, H, W) tensor in [0, 1], resized to size x size."""
    policy = policy or IntensityPolicy()
    x, _ = policy.to_model(read_image(path))
    t = torch.from_numpy(np.clip(x, 0.0, 1.0, dtype=np.float32))[None]
    return resize_square(t, size) if size is not None else t


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a (C, H, W) tensor to (C, size, size); antialiased so downsizing keeps no aliasing."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    out = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)[0]
    return out.clamp_(0.0, 1.0)


def _check_size(size: int | None) -> None:
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"size={size!r}: expected a positive int (pixels) or None")


class ImageDataset(Dataset):
    """One item per manifest row: dict(image, label, site, path, index).

    image: float32 (1, S, S) in [0, 1] (original size when size is None, then batches
    need equal sizes). label: 1 positive, 0 negative, -1 unlabelled; the positive class is
    decided once on the whole df (or given), so subsets keep the same coding.
    index: the row's position in df (to join predictions back).
    """

    def __init__(
        self,
        df: pd.DataFrame,
        size: int | None,
        policy: IntensityPolicy | None = None,
        positive: str | None = None,
    ) -> None:
        _check_size(size)
        if len(df) == 0:
            raise ValueError("ImageDataset: the manifest has no rows")
        self.df = df.reset_index(drop=True)
        self.size = size
        self.policy = policy or IntensityPolicy()
        self.paths = self.df["path"].astype(str).tolist()
        self.sites = self.df["site"].astype(str).tolist()
        self.labels = binary_targets(self.df, positive=positive)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": load_image_tensor(self.paths[index], self.size, self.policy),
            "label": int(self.labels[index]),
            "site": self.sites[index],
            "path": self.paths[index],
            "index": int(index),
        }


class UnpairedSiteDataset(Dataset):
    """Unpaired translation data: each non-reference image with a random reference image.

    One epoch visits every source (non-reference) image once; its partner is drawn from
    the reference site with a generator seeded by (seed, epoch, index), so an item is
    the same whatever the worker or access order, and `set_epoch` gives new pairs per
    epoch. Item: dict(source, reference, source_site, source_site_index, source_path,
    reference_path). source_site_index indexes `sites` (sorted site names of df, the
    reference included, unless given), for site-conditioned models.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        reference_site: str,
        size: int | None,
        seed: int = 0,
        policy: IntensityPolicy | None = None,
        sites: Sequence[str] | None = None,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> None:
        _check_size(size)
        self.cache = cache if cache is not None else {}  # path -> decoded, resized tensor
        present = sorted(df["site"].astype(str).unique())
        site = df["site"].astype(str)
        if reference_site not in present:
            raise ValueError(f"reference site '{reference_site}' has no images; "
                             f"sites present: {present}")
        if len(present) < 2:
            raise ValueError(f"only the reference site '{reference_site}' is present; "
                             "unpaired training needs images from at least one other site")
        self.sites = list(sites) if sites is not None else present
        missing = [s for s in present if s not in self.sites]
        if missing:
            raise ValueError(f"sites {missing} are not in the given sites list {self.sites}")
        self.site_to_index = {s: i for i, s in enumerate(self.sites)}
        self.reference_site = reference_site
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.policy = policy or IntensityPolicy()
        is_ref = (site == reference_site).to_numpy()
        self.source_paths = df["path"].astype(str)[~is_ref].tolist()
        self.source_sites = site[~is_ref].tolist()
        self.reference_paths = df["path"].astype(str)[is_ref].tolist()

    def set_epoch(self, epoch: int) -> None:
        """Draw new reference partners for this epoch (reproducibly)."""
        self.epoch = int(epoch)

    def reference_index(self, index: int) -> int:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(rng.integers(len(self.reference_paths)))

    def __len__(self) -> int:
        return len(self.source_paths)

    def _load(self, path: str) -> torch.Tensor:
        if path in self.cache:
            return self.cache[path]
        return load_image_tensor(path, self.size, self.policy)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} source images")
        ref_path = self.reference_paths[self.reference_index(index)]
        source_site = self.source_sites[index]
        return {
            "source": self._load(self.source_paths[index]),
            "reference": self._load(ref_path),
            "source_site": source_site,
            "source_site_index": self.site_to_index[source_site],
            "source_path": self.source_paths[index],
            "reference_path": ref_path,
        }
