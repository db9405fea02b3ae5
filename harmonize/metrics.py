"""Fidelity metrics and confidence intervals.

SSIM and PSNR always get an explicit data_range (model space: 1.0): torchmetrics would
otherwise estimate it from the data, which misleads, worst on 16-bit images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)


def _as_batch(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    while t.ndim < 4:
        t = t.unsqueeze(0)
    return t


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Structural similarity of two (H, W) images in the same intensity space."""
    return float(structural_similarity_index_measure(_as_batch(a), _as_batch(b),
                                                     data_range=data_range))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    return float(peak_signal_noise_ratio(_as_batch(a), _as_batch(b), data_range=data_range))


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap CI of the mean."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(v.mean()), float(lo), float(hi)
