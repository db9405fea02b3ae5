"""Training data for CycleGAN: manifest rows checked against the config, polarity scan,
unpaired (source, reference) crops with a seeded order.

Everything here runs before the first step, so a missing site or an unreadable image
stops the run at once, not after an hour.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from harmonize.data.datasets import UnpairedSiteDataset, resize_square
from harmonize.data.fingerprints import remove_fingerprints
from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.data.splits import patient_split
from harmonize.training.data import (
    ImageCache,
    flipped_per_site,
    scan_images,
    select_training_rows,
)
from harmonize.translators.cyclegan.config import ConfigError, CycleGANConfig
from harmonize.translators.histogram import HistogramMatching


@dataclass
class TrainingSet:
    """What the loop needs to know about the data, decided once before training."""

    df: pd.DataFrame  # the rows trained on
    reference_site: str
    source_sites: list[str]  # non-reference sites, sorted: index = condition index
    template: np.ndarray  # reference site's mean thumbnail (polarity guard)
    flipped: set[str]  # source paths whose grey scale is inverted (flipped on load)
    policy: IntensityPolicy
    cache: dict[str, torch.Tensor] = field(default_factory=dict)  # decoded once, reused
    # histogram-residual: the landmark mapping applied to every source image first
    landmarks: HistogramMatching | None = None
    heldout: pd.DataFrame | None = None  # rows kept out of training for snapshot choice

    def flipped_per_site(self) -> dict[str, int]:
        return flipped_per_site(self.df, self.flipped)


def prepare_training_set(config: CycleGANConfig, progress: bool = True) -> TrainingSet:
    """Select rows, then read every image once: the reference template and which source
    images are inverted (also proves every file is readable before training starts)."""
    df = select_training_rows(config.data, needs_others="CycleGAN needs at least one "
                              "other site")
    ref = str(config.data.reference_site)
    heldout = None
    if config.train.select_fraction > 0:  # patients, not images, are held out
        held = held_out_rows(df, ref, config.train.select_fraction, config.train.seed)
        heldout = df[held].reset_index(drop=True)
        df = df[~held].reset_index(drop=True)
    policy = IntensityPolicy(mode=config.data.intensity, bits=config.data.bits)
    cache = ImageCache(config.data.cache_mb, config.data.load_size)
    template, flipped = scan_images(df, policy, ref, config.data.polarity, progress, cache.keep)
    sources = sorted(df["site"][df["site"] != ref].unique())
    landmarks = None
    if config.landmarks is not None:
        landmarks = fit_landmarks(df, ref, config, policy, cache)
    return TrainingSet(df, ref, sources, template, flipped, policy, cache, landmarks, heldout)


def held_out_rows(df: pd.DataFrame, reference_site: str, fraction: float,
                  seed: int) -> np.ndarray:
    """Patients kept out for the snapshot choice: `fraction` of them, stratified by site
    and label where it can; when that holds out no reference image or no other (a cohort
    of many hospitals, where one site is a small share), `fraction` of the reference
    site's patients and of the others', split apart."""
    is_ref = (df["site"].astype(str) == reference_site).to_numpy()
    held = (patient_split(df, test_size=fraction, seed=seed)["split"] == "test").to_numpy()
    if held[is_ref].any() and held[~is_ref].any():
        return held
    held = np.zeros(len(df), dtype=bool)
    for part in (is_ref, ~is_ref):
        if df.loc[part, "patient_id"].nunique() >= 2:
            split = patient_split(df[part], test_size=fraction, seed=seed)["split"]
            held[np.flatnonzero(part)[(split == "test").to_numpy()]] = True
    return held


def fit_landmarks(df: pd.DataFrame, reference_site: str, config: CycleGANConfig,
                  policy: IntensityPolicy, cache: dict[str, torch.Tensor]) -> HistogramMatching:
    """The histogram-residual translator's first stage, fitted on the training rows (the
    reference site's, plus every site's with ``per: site``), from the decoded-image cache
    where it holds them."""
    lm = config.landmarks
    if lm.checkpoint is not None:
        return load_landmarks(lm.checkpoint, reference_site, config.data.polarity)
    hm = HistogramMatching(n_quantiles=lm.n_quantiles, per=lm.per,
                           polarity=config.data.polarity, policy=policy)
    rows = df if hm.fit_uses_all_sites else df[df["site"] == reference_site]

    remove = config.data.fingerprints == "remove"
    images = ((remove_fingerprints(x)[0] if remove else x, site)
              for x, site in cached_images(rows, policy, cache))
    return hm.fit(images, reference_site)


def cached_images(rows: pd.DataFrame, policy: IntensityPolicy,
                  cache: dict[str, torch.Tensor]) -> Iterator[tuple[np.ndarray, str]]:
    """(model-space image, site) of each row, from the decoded-image cache where it holds
    the image (no second read of the file)."""
    for path, site in zip(rows["path"], rows["site"].astype(str), strict=True):
        x = cache[path][0].numpy() if path in cache else policy.to_model(read_image(path))[0]
        yield x, site


def load_landmarks(path, reference_site: str, polarity: str) -> HistogramMatching:
    """A saved histogram-matching checkpoint, checked to map onto `reference_site`."""
    from harmonize.checkpoint import CheckpointError, checkpoint_kind

    try:
        kind = checkpoint_kind(path)
        if kind != HistogramMatching.kind:
            raise ConfigError(f"landmarks.checkpoint {path}: a '{kind}' checkpoint; give a "
                              "histogram-matching one (harmonize train histogram-matching, "
                              "or the federated histogram task's OUT/model)")
        hm = HistogramMatching.load(path)
    except CheckpointError as err:
        raise ConfigError(f"landmarks.checkpoint: {err}") from None
    if hm.reference_site_ != reference_site:
        raise ConfigError(f"landmarks.checkpoint {path} maps onto '{hm.reference_site_}', "
                          f"not the reference site '{reference_site}'")
    hm.polarity = polarity
    return hm


class UnpairedCrops(Dataset):
    """(source, reference) pairs in network space [-1, 1], cropped to image_size.

    Wraps `UnpairedSiteDataset` (reference partner per item, resize to load_size),
    flips inverted sources (the polarity guard), and takes a random image_size crop of
    each, seeded by (seed, epoch, index) so workers and resumes see the same crops.
    Images smaller than the crop are reflection-padded.
    """

    def __init__(self, ts: TrainingSet, image_size: int, load_size: int | None,
                 seed: int, fingerprints: str = "keep") -> None:
        self.pairs = UnpairedSiteDataset(ts.df, ts.reference_site, size=load_size, seed=seed,
                                         policy=ts.policy, cache=ts.cache)
        self.flipped = ts.flipped
        self.landmarks = ts.landmarks
        self.remove = fingerprints == "remove"
        self.cached = ts.cache
        self.mapped: dict[str, torch.Tensor] = {}  # path -> image after the first stage
        self.site_index = {s: i for i, s in enumerate(ts.source_sites)}
        self.image_size = image_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.pairs.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        item = self.pairs[index]
        source = item["source"]
        if item["source_path"] in self.flipped:
            source = 1.0 - source
        source = self._first_stage(item["source_path"], source, item["source_site"])
        reference = self._first_stage(item["reference_path"], item["reference"], None)
        rng = np.random.default_rng([self.seed, self.epoch, index, 7])
        return {
            "source": self._crop(source, rng) * 2.0 - 1.0,
            "reference": self._crop(reference, rng) * 2.0 - 1.0,
            "site_index": self.site_index[item["source_site"]],
        }

    def _first_stage(self, path: str, x: torch.Tensor, source_site: str | None
                     ) -> torch.Tensor:
        """What the histogram-residual translator does before its generator, on the whole
        image: fingerprint removal (every image), then the landmark mapping (source images,
        upright); computed once per image (both are deterministic)."""
        if not self.remove and (self.landmarks is None or source_site is None):
            return x
        if path in self.mapped:
            return self.mapped[path]
        y = x[0].numpy()
        if self.remove:
            y = remove_fingerprints(y)[0]
        if self.landmarks is not None and source_site is not None:
            (y,) = self.landmarks.transform([y], [source_site])
        y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))[None]
        if path in self.cached:  # kept within the decoded-image cache's memory budget
            self.mapped[path] = y
        return y

    def _crop(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        s = self.image_size
        h, w = x.shape[-2:]
        if h < s or w < s:
            ph, pw = max(s - h, 0), max(s - w, 0)
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x[None], (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode=mode)[0]
            h, w = x.shape[-2:]
        y0 = int(rng.integers(h - s + 1))
        x0 = int(rng.integers(w - s + 1))
        return x[:, y0:y0 + s, x0:x0 + s].contiguous()


def sample_images(ts: TrainingSet, load_size: int | None) -> list[tuple[np.ndarray, str]]:
    """Whole images for the sample grid: the first of each source site, then one of the
    reference site (its translation should look unchanged), in model space."""
    picks = [ts.df[ts.df["site"] == s].iloc[0] for s in [*ts.source_sites, ts.reference_site]]
    out = []
    for row in picks:
        x, _ = ts.policy.to_model(read_image(row["path"]))
        if load_size is not None:
            x = resize_square(torch.from_numpy(np.clip(x, 0, 1))[None], load_size)[0].numpy()
        out.append((x.astype(np.float32), str(row["site"])))
    return out
