"""Histogram matching to a reference site (Nyul-Udupa style quantile landmarks).

fit: average, over the reference site's images, each image's intensity quantiles at
fixed levels; these are the reference landmarks. With ``per="site"`` it also averages
the quantiles of every other site.
transform: map each image's own quantiles (``per="image"``) or its site's averaged
quantiles (``per="site"``, falls back to per image for sites not seen in fit) onto the
reference landmarks, piecewise linearly. The map is monotonic: it changes contrast and
brightness, never structure. A monotonic map cannot undo an inverted grey scale, so with
``polarity="auto"`` images that anti-correlate with the reference site's mean image are
flipped first (see `polarity`). Images of the reference site pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch

from harmonize.data import polarity as pol
from harmonize.translators.base import FittedTranslator


class HistogramMatching(FittedTranslator):
    kind = "histogram-matching"

    def __init__(self, n_quantiles: int = 256, per: Literal["image", "site"] = "image",
                 polarity: Literal["auto", "keep"] = "auto", policy=None) -> None:
        super().__init__(policy)
        self.n_quantiles = n_quantiles
        self.per = per
        self.polarity = polarity

    def check_params(self) -> None:
        if self.n_quantiles < 3:
            raise ValueError(f"n_quantiles={self.n_quantiles}: need at least 3")
        if self.per not in ("image", "site"):
            raise ValueError(f"per='{self.per}': use 'image' or 'site'")
        if self.polarity not in ("auto", "keep"):
            raise ValueError(f"polarity='{self.polarity}': use 'auto' or 'keep'")

    @property
    def fit_uses_all_sites(self) -> bool:
        return self.per == "site"

    @property
    def levels(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.n_quantiles)

    def _quantiles(self, x: np.ndarray) -> np.ndarray:
        return np.quantile(np.asarray(x, dtype=np.float64).ravel(), self.levels)

    def fit(self, images: Iterable[tuple[np.ndarray, str]], reference_site: str):
        self.check_params()
        images = list(images) if self.per == "site" else images
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        thumbs = []
        for image, site in images:
            if site == reference_site:
                thumbs.append(pol.thumbnail(image))
                self._accumulate(sums, counts, site, image)
        if not counts:
            raise ValueError(f"no images of the reference site '{reference_site}' to fit on")
        self.template_ = np.mean(thumbs, axis=0)
        if self.per == "site":  # second pass: other sites, polarity-corrected like transform
            for image, site in images:
                if site != reference_site:
                    self._accumulate(sums, counts, site, self._upright(image))
        self.reference_quantiles_ = sums[reference_site] / counts[reference_site]
        self.site_quantiles_ = {s: sums[s] / counts[s] for s in sums if s != reference_site}
        self.reference_site_ = reference_site
        return self

    def _accumulate(self, sums: dict, counts: dict, site: str, image: np.ndarray) -> None:
        sums[site] = sums.get(site, 0.0) + self._quantiles(image)
        counts[site] = counts.get(site, 0) + 1

    def _upright(self, image: np.ndarray) -> np.ndarray:
        return pol.upright(image, self.template_, self.polarity)

    def transform(self, images: Sequence[np.ndarray], sites: Sequence[str | None] | None = None):
        self.check_fitted()
        out, todo, arrays, sites = self._split_batch(images, sites)
        for k, image in zip(todo, arrays, strict=True):  # already upright
            source = self.site_quantiles_.get(sites[k]) if self.per == "site" else None
            if source is None:
                source = self._quantiles(image)
            out[k] = _piecewise_map(image, source, self.reference_quantiles_)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"reference_quantiles": torch.from_numpy(self.reference_quantiles_),
                   "template": torch.from_numpy(self.template_)}
        for site, q in self.site_quantiles_.items():
            tensors[f"site_quantiles.{site}"] = torch.from_numpy(q)
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], config: dict) -> None:
        self.reference_quantiles_ = tensors["reference_quantiles"].numpy()
        self.template_ = tensors["template"].numpy()
        self.site_quantiles_ = {
            k.split(".", 1)[1]: v.numpy() for k, v in tensors.items()
            if k.startswith("site_quantiles.")
        }


def _piecewise_map(image: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Map source landmarks onto target landmarks; ties (flat histograms, e.g. a black
    border) are collapsed so np.interp sees increasing x."""
    src, first = np.unique(source, return_index=True)
    dst = target[first]
    if src.size == 1:  # a constant image: put it at the reference median
        return np.full_like(image, target[target.size // 2], dtype=np.float32)
    return np.interp(image, src, dst).astype(np.float32)
