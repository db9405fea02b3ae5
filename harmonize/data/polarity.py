"""Detect images whose grey scale is inverted relative to the reference site.

Exports of X-rays sometimes come out inverted (bright air, MONOCHROME1 data saved as a
plain PNG). No monotonic intensity map can undo that, and a learned translator may
"fix" it inconsistently. The check: correlate a 32x32 thumbnail of the image with the
mean thumbnail of the reference site; a negative correlation means inverted. It relies
on the anatomy being roughly aligned (same projection, patient centred), which holds
for chest and whole-body views; it is reported, never silent. Flat bands along the edges
(collimator shutters, a detector larger than the patient) are left out of the
correlation: a black band over a third of a chest film anti-correlates with the
reference's bright abdomen and flipped upright images before (real Montgomery films).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

THUMB = 32


def thumbnail(x: np.ndarray, size: int = THUMB) -> np.ndarray:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="area")[0, 0].numpy()


def correlation(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """Pearson correlation of two images, over the pixels `where` is true (all if None)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if where is not None:
        a, b = a[where], b[where]
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def exposed_field(thumb: np.ndarray, tol: float = 0.02, max_fraction: float = 0.5
                  ) -> np.ndarray:
    """Pixels of a thumbnail outside flat edge bands: edge rows (columns) with no contrast
    at the thumbnail's darkest or brightest value, peeled from each side up to
    `max_fraction` of the image."""
    t = np.asarray(thumb, np.float64)
    lo, hi = t.min(), t.max()
    keep = np.ones(t.shape, bool)
    span = max(hi - lo, 1e-12)

    def flat(line: np.ndarray) -> bool:
        return (line.max() - line.min() <= tol * span
                and min(abs(line.mean() - lo), abs(line.mean() - hi)) <= tol * span)

    for axis in (0, 1):
        n = t.shape[axis]
        for order in (range(n), range(n - 1, -1, -1)):
            for k, i in enumerate(order):
                line = t[i] if axis == 0 else t[:, i]
                if k >= max_fraction * n or not flat(line):
                    break
                if axis == 0:
                    keep[i] = False
                else:
                    keep[:, i] = False
    return keep if keep.any() else np.ones(t.shape, bool)


def is_inverted(x: np.ndarray, template: np.ndarray) -> bool:
    thumb = thumbnail(x, template.shape[0])
    return correlation(thumb, template, exposed_field(thumb)) < 0


def invert(x: np.ndarray) -> np.ndarray:
    """Flip the grey scale within the model-space window."""
    return (1.0 - np.asarray(x, dtype=np.float32)).astype(np.float32)


def upright(x: np.ndarray, template: np.ndarray, mode: str = "auto") -> np.ndarray:
    """The image, flipped when mode is "auto" and it anti-correlates with the template."""
    if mode == "auto" and is_inverted(x, template):
        return invert(x)
    return x


@torch.no_grad()
def inverted_share(real: torch.Tensor, fake: torch.Tensor, size: int = THUMB) -> torch.Tensor:
    """Share of a (B, C, H, W) batch whose translation anti-correlates with its input
    (should be 0), as a tensor on the batch's device: training logs it without a host
    sync per step. Same thumbnails and correlation as `is_inverted`."""
    a = F.adaptive_avg_pool2d(real[:, :1].float(), size).flatten(1)
    b = F.adaptive_avg_pool2d(fake[:, :1].float(), size).flatten(1)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return ((a * b).sum(dim=1) < 0).float().mean()


@torch.no_grad()
def flipped_flags(inputs: list[torch.Tensor], outputs: list[torch.Tensor],
                  size: int = THUMB) -> list[bool]:
    """Per (1, H, W) input / translation pair of any size: does the translation
    anti-correlate with its input (the check `inverted_share` logs in training), computed
    on their device with one host sync."""
    if not inputs:
        return []
    a = torch.stack([F.adaptive_avg_pool2d(x[:1].float(), size).flatten() for x in inputs])
    b = torch.stack([F.adaptive_avg_pool2d(y[:1].float(), size).flatten() for y in outputs])
    a = a.to(b.device)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return ((a * b).sum(dim=1) < 0).tolist()
