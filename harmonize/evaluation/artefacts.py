"""Unlabelled measures of what a translator did to real images, for model selection
and for the artefact hunt (eval/translator_artefacts.py). No labels, no paired truth:

- ``texture_excess``: high-frequency power of the translations over that of the
  reference site's own images, as a log ratio (0: the reference's texture; > 0: texture
  the reference does not have, what a GAN's artefacts add).
- ``spectrum_distance``: mean absolute difference of radially averaged log power
  spectra, translations vs reference images (how far the style still is).
- ``intensity_distance``: Wasserstein-1 distance of the intensity distributions,
  translations vs reference images (model space [0, 1]).
- ``structure``: local normalized cross-correlation of each input with its translation
  at half resolution (1: every edge kept; invariant to local brightness/contrast).
- ``structure_in_mask`` (with masks, e.g. lung masks): the same inside the anatomy only,
  where no fingerprint removal may act (markers and borders weigh heavily in
  ``structure``: their edges are the sharpest of a film).

``selection_score`` combines them into one number to minimize (see its docstring).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import wasserstein_distance

BANDS = 24
HIGH_BANDS = slice(BANDS // 2, BANDS)  # the upper half of the frequencies


def radial_log_spectrum(image: np.ndarray, bands: int = BANDS) -> np.ndarray:
    """log10 mean power in `bands` rings of radial frequency (Hann-windowed, mean removed)."""
    x = np.asarray(image, dtype=np.float64)
    x = x - x.mean()
    h, w = x.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fftshift(np.fft.fft2(x * window))) ** 2
    yy, xx = np.mgrid[:h, :w]
    radius = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))  # 1 = Nyquist
    ring = np.minimum((radius * bands).astype(int), bands)
    sums = np.bincount(ring.ravel(), power.ravel(), minlength=bands + 1)[:bands]
    counts = np.bincount(ring.ravel(), minlength=bands + 1)[:bands]
    return np.log10(sums / np.maximum(counts, 1) + 1e-12)


def mean_spectrum(images: Sequence[np.ndarray]) -> np.ndarray:
    return np.mean([radial_log_spectrum(i) for i in images], axis=0)


def structure_kept(source: np.ndarray, translated: np.ndarray, window: int = 7,
                   mask: np.ndarray | None = None) -> float:
    """Local normalized cross-correlation at half resolution, averaged with the source's
    local standard deviation as weight: flat background, where correlation is noise,
    counts little; an identical image scores 1. With `mask` (same shape, bool), only
    inside it."""
    import torch.nn.functional as F

    a = F.avg_pool2d(torch.as_tensor(np.asarray(source, np.float64))[None, None], 2)
    b = F.avg_pool2d(torch.as_tensor(np.asarray(translated, np.float64))[None, None], 2)
    pad = window // 2

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(t, (pad,) * 4, mode="reflect"), window, stride=1)

    ma, mb = mean(a), mean(b)
    var_a = (mean(a * a) - ma * ma).clamp_min(0)
    var_b = (mean(b * b) - mb * mb).clamp_min(0)
    ncc = (mean(a * b) - ma * mb) / torch.sqrt(var_a * var_b + 1e-12)
    weight = var_a.sqrt()
    if mask is not None:
        inside = torch.as_tensor(np.asarray(mask, np.float64))[None, None]
        weight = weight * (F.avg_pool2d(inside, 2) > 0.5)
    return float((ncc * weight).sum() / weight.sum().clamp_min(1e-12))


def artefact_scores(sources: Sequence[np.ndarray], translations: Sequence[np.ndarray],
                    references: Sequence[np.ndarray],
                    masks: Sequence[np.ndarray] | None = None) -> dict[str, float]:
    """The four measures for translations of `sources` against the reference site's own
    `references` (all 2-D, model space [0, 1], one size); with `masks` (one per source)
    also structure_in_mask."""
    if len(sources) != len(translations) or not len(sources) or not len(references):
        raise ValueError("need as many translations as sources, and reference images")
    s_tr, s_ref = mean_spectrum(translations), mean_spectrum(references)
    sample = np.random.default_rng(0)

    def pixels(images):  # a fixed subsample keeps W1 fast on many images
        flat = np.concatenate([np.ravel(i) for i in images])
        return sample.choice(flat, size=min(flat.size, 200_000), replace=False)

    scores = {
        "texture_excess": float(s_tr[HIGH_BANDS].mean() - s_ref[HIGH_BANDS].mean()),
        "spectrum_distance": float(np.abs(s_tr - s_ref).mean()),
        "intensity_distance": float(wasserstein_distance(pixels(translations),
                                                         pixels(references))),
        "structure": float(np.mean([structure_kept(s, t)
                                    for s, t in zip(sources, translations, strict=True)])),
    }
    if masks is not None:
        scores["structure_in_mask"] = float(np.mean([
            structure_kept(s, t, mask=m)
            for s, t, m in zip(sources, translations, masks, strict=True)]))
    return scores


def selection_score(scores: dict[str, float]) -> float:
    """Lower is better: the remaining style distance (spectrum, in log10 power) plus the
    texture the translator added beyond the reference's (only an excess counts) plus
    the structure lost, each on its natural scale (about 0-1 for the translators met so
    far). Chooses among checkpoints of one training without labels."""
    return (scores["spectrum_distance"] + max(scores["texture_excess"], 0.0)
            + 10 * scores["intensity_distance"] + (1.0 - scores["structure"]))
