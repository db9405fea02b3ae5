"""Detect images whose grey scale is inverted relative to the reference site.

Exports of X-rays sometimes come out inverted (bright air, MONOCHROME1 data saved as a
plain PNG). No monotonic intensity map can undo that, and a learned translator may
"fix" it inconsistently. The check: correlate a 32x32 thumbnail of the image with the
mean thumbnail of the reference site; a negative correlation means inverted. It relies
on the anatomy being roughly aligned (same projection, patient centred), which holds
for chest and whole-body views; it is reported, never silent.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

THUMB = 32


def thumbnail(x: np.ndarray, size: int = THUMB) -> np.ndarray:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="area")[0, 0].numpy()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def is_inverted(x: np.ndarray, template: np.ndarray) -> bool:
    return correlation(thumbnail(x, template.shape[0]), template) < 0


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
def inverted_flags(images: list[torch.Tensor], template: np.ndarray) -> list[bool]:
    """`is_inverted` for (1, H, W) tensors of any sizes, computed on their device (the
    correlation ignores any affine scaling, so network space [-1, 1] is fine)."""
    if not images:
        return []
    size = template.shape[0]
    t = torch.as_tensor(template, dtype=torch.float32, device=images[0].device).flatten()
    t = t - t.mean()
    thumbs = torch.stack([F.adaptive_avg_pool2d(x[:1].float(), size).flatten() for x in images])
    thumbs = thumbs - thumbs.mean(dim=1, keepdim=True)
    return ((thumbs @ t) < 0).tolist()
