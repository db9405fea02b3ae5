"""Memorization check for generative models whose weights leave a site: is a generated or
translated image a copy of a training image?

Distance: 1 - Pearson correlation of 32x32 area thumbnails (0 = the same picture up to
brightness and contrast, 1 = unrelated, 2 = inverted). For each output we find its
nearest training image. The yardstick is how close genuinely new patients of the same
site come to the training set: the smallest nearest-training distance among held-out
images of that site. An output closer to a training image than half that distance is
flagged as a possible copy (the minimum itself would be beaten by chance: among
exchangeable new patients, 1 in m+1 beats the minimum of the other m; copies sit near 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from harmonize.data.polarity import thumbnail


def _standardized_thumbnails(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    t = np.stack([thumbnail(np.asarray(x, dtype=np.float32), size).ravel() for x in images])
    t = t - t.mean(1, keepdims=True)
    norm = np.linalg.norm(t, axis=1, keepdims=True)
    return t / np.where(norm > 0, norm, 1.0)


def nearest_training(outputs: Sequence[np.ndarray], training: Sequence[np.ndarray],
                     size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of each output's nearest training image (1 - correlation)."""
    if len(outputs) == 0 or len(training) == 0:
        raise ValueError("need at least one output and one training image")
    a = _standardized_thumbnails(outputs, size)
    b = _standardized_thumbnails(training, size)
    dist = 1.0 - a @ b.T
    idx = dist.argmin(1)
    return dist[np.arange(len(a)), idx], idx


def memorization_report(outputs: Sequence[np.ndarray], training: Sequence[np.ndarray],
                        held_out: Sequence[np.ndarray], size: int = 32) -> dict:
    """Share of outputs closer to a training image than any held-out image of the
    training site is (possible copies), with the distances behind it."""
    d_out, idx = nearest_training(outputs, training, size)
    d_new, _ = nearest_training(held_out, training, size)
    threshold = 0.5 * float(d_new.min())
    return {"n_outputs": len(d_out), "flagged": int((d_out < threshold).sum()),
            "flagged_share": float((d_out < threshold).mean()),
            "threshold": threshold, "new_patient_nearest_min": float(d_new.min()),
            "output_nearest_median": float(np.median(d_out)),
            "new_patient_nearest_median": float(np.median(d_new)),
            "nearest_index": idx.tolist()}
