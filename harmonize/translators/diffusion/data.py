"""Training data for the diffusion priors: which rows train which model, read once up front.

Per-site conditioning trains one model per site, each on that site's images only (what
DDIB needs, and what a site can do without sharing a pixel); SDEdit needs only the
reference site's model, so only the reference site is read. Site-conditioned training
pools every site into one model with the site as class label.

Every image is read before the first step (an unreadable file stops the run at once),
scanned for inverted polarity like CycleGAN's data (inverted images are flipped for
training and at inference), resized to the training square (``data.scale: whole``) or
kept at native size for random crops (``crops``), and kept in memory up to
``data.cache_mb``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from harmonize.data.datasets import load_image_tensor
from harmonize.data.intensity import IntensityPolicy
from harmonize.training.data import (
    ImageCache,
    flipped_per_site,
    scan_images,
    select_training_rows,
)
from harmonize.translators.diffusion.config import DiffusionConfig

ALL_SITES = "*"  # model key of the one site-conditioned UNet


@dataclass
class TrainingSet:
    """What the loop needs to know about the data, decided once before training."""

    df: pd.DataFrame  # the rows trained on
    reference_site: str
    model_keys: list[str]  # one per UNet: a site name, or ALL_SITES
    groups: list[np.ndarray]  # row indices of df that train each model
    class_sites: list[str]  # site-conditioned: class index -> site; len = "unknown site"
    template: np.ndarray  # reference site's mean thumbnail (polarity guard)
    flipped: set[str]  # paths whose grey scale is inverted (flipped on load)
    policy: IntensityPolicy
    cache: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> (1, h, w) [0, 1]
    crops: bool = False  # random crops at native size instead of whole resized images

    def flipped_per_site(self) -> dict[str, int]:
        return flipped_per_site(self.df, self.flipped)


def prepare_training_set(config: DiffusionConfig, progress: bool = True) -> TrainingSet:
    """Select rows, read every image once (polarity scan, resize, cache), group by model."""
    per_site = config.model.conditioning == "per-site"
    df = select_training_rows(  # SDEdit with per-site priors needs the reference prior only
        config.data, reference_only=per_site and config.inference.mode == "sdedit",
        needs_others="DDIB and site-conditioned models need other sites (or use --mode "
        "sdedit)")
    ref = str(config.data.reference_site)
    policy = IntensityPolicy(mode=config.data.intensity, bits=config.data.bits)
    cache = ImageCache(config.data.cache_mb,
                       config.data.image_size if config.data.scale == "whole" else None)
    template, flipped = scan_images(df, policy, ref, config.data.polarity, progress, cache.keep)
    sites = df["site"].astype(str)
    class_sites = sorted(sites.unique())
    if per_site:
        keys = class_sites
        groups = [np.flatnonzero((sites == s).to_numpy()) for s in keys]
    else:
        keys, groups = [ALL_SITES], [np.arange(len(df))]
    return TrainingSet(df, ref, keys, groups, class_sites, template, flipped, policy, cache,
                       crops=config.data.scale == "crops")


class SiteBatches(Dataset):
    """Item i: one image for each model, in network space [-1, 1], shape (M, 1, S, S),
    with the site class index of each (M,).

    Model k's image is row i mod n_k of its own group, so a shuffled epoch over i gives
    every model a random batch of its own site only, and small sites are cycled to keep
    pace with large ones. The length is at least `min_length` (one batch of every
    process), so tiny sets still train. With crops, each is drawn with a generator seeded
    by (seed, epoch, index), the same whatever the worker or a resume.
    """

    def __init__(self, ts: TrainingSet, size: int, min_length: int = 1, seed: int = 0) -> None:
        self.ts = ts
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.length = max(max(len(g) for g in ts.groups), min_length)
        self.site_index = {s: i for i, s in enumerate(ts.class_sites)}
        self.paths = ts.df["path"].astype(str).tolist()
        self.sites = ts.df["site"].astype(str).tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def image(self, row: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """(1, S, S) in [0, 1], upright (inverted images flipped); a crop when training
        on crops (the centre one without a generator)."""
        path = self.paths[row]
        x = self.ts.cache.get(path)
        if x is None:
            x = load_image_tensor(path, None if self.ts.crops else self.size, self.ts.policy)
        if self.ts.crops:
            x = crop(x, self.size, rng)
        return 1.0 - x if path in self.ts.flipped else x

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        rows = [int(g[index % len(g)]) for g in self.ts.groups]
        return {"images": torch.stack([self.image(r, rng) * 2.0 - 1.0 for r in rows]),
                "labels": torch.tensor([self.site_index[self.sites[r]] for r in rows])}

    def first_per_site(self, limit: int = 6) -> tuple[torch.Tensor, list[str]]:
        """A fixed (N, 1, S, S) [0, 1] batch for the sample grids: the first image of each
        site (reference first), then the next ones in turn, up to `limit` images."""
        by_site: dict[str, list[int]] = {}
        for row, site in enumerate(self.sites):
            by_site.setdefault(site, []).append(row)
        order = [self.ts.reference_site] + [s for s in self.ts.class_sites
                                            if s != self.ts.reference_site]
        picked: list[int] = []
        for k in range(limit):
            picked += [by_site[s][k] for s in order if k < len(by_site[s])]
        picked = picked[:limit]
        return (torch.stack([self.image(r) for r in picked]),
                [self.sites[r] for r in picked])


def crop(x: torch.Tensor, size: int, rng: np.random.Generator | None) -> torch.Tensor:
    """A size x size crop of a (1, H, W) image (random, or central without rng);
    smaller images are reflection-padded first."""
    x = pad_to_at_least(x, size)
    h, w = x.shape[-2:]
    y0 = int(rng.integers(h - size + 1)) if rng is not None else (h - size) // 2
    x0 = int(rng.integers(w - size + 1)) if rng is not None else (w - size) // 2
    return x[:, y0:y0 + size, x0:x0 + size].contiguous()


def pad_to_at_least(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad a (C, H, W) image at the bottom/right to at least size x size (reflect, or
    replicate when the image is too small to reflect)."""
    h, w = x.shape[-2:]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x[None], (0, pw, 0, ph), mode=mode)[0]
    return x
