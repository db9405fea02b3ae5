"""Plain augmentation: the standard geometric + intensity set that harmonization is
compared against (issue: "does harmonization beat plain augmentation?").

MONAI array transforms on one (1, H, W) image in model space ([0, 1]):
geometric - horizontal flip (p 0.5); affine (p 0.8): rotation +-10 deg, scale +-10%,
translation +-6% of the side, shear +-0.1, border padding;
intensity - gamma 0.7-1.5 (p 0.5), contrast scale +-15% (p 0.5), brightness shift
+-0.1 (p 0.5), Gaussian blur sigma 0.25-1 px (p 0.3), Gaussian noise sd 0.03 (p 0.5);
then clipped to [0, 1]. Every image gets a fresh draw; a seed makes the stream
reproducible (MONAI transforms keep their own RandomState).
"""

from __future__ import annotations

import numpy as np
import torch

AUGMENTATION_DOC = (
    "flip (p 0.5); affine (p 0.8): rotate +-10 deg, scale +-10%, translate +-6%, shear "
    "+-0.1; gamma 0.7-1.5, contrast +-15%, brightness +-0.1 (p 0.5 each); blur sigma "
    "0.25-1 px (p 0.3); Gaussian noise sd 0.03 (p 0.5)")


def plain_augmentation(image_size: int, seed: int = 0):
    """The augmentation pipeline for images of image_size x image_size pixels (a seeded
    MONAI Compose)."""
    # imported here: MONAI's transforms take ~1 s to load, which every federated node
    # process and CLI call that never augments would pay
    from monai import transforms as T

    shift = round(0.06 * image_size)
    aug = T.Compose([
        T.RandFlip(prob=0.5, spatial_axis=1),
        T.RandAffine(prob=0.8, rotate_range=np.deg2rad(10.0), scale_range=0.1,
                     translate_range=(shift, shift), shear_range=0.1, padding_mode="border"),
        T.RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5)),
        T.RandScaleIntensity(prob=0.5, factors=0.15),
        T.RandShiftIntensity(prob=0.5, offsets=0.1),
        T.RandGaussianSmooth(prob=0.3, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
        T.RandGaussianNoise(prob=0.5, std=0.03),
    ])
    aug.set_random_state(seed)
    return aug


def augment(aug, image: torch.Tensor) -> torch.Tensor:
    """Apply to one (1, H, W) tensor; returns a plain float32 tensor clipped to [0, 1]."""
    out = torch.as_tensor(aug(image)).as_subclass(torch.Tensor)
    return out.float().clamp_(0.0, 1.0)
