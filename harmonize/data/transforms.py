"""The augmentations that harmonization is compared against.

Plain augmentation: the standard geometric + intensity set. MONAI array transforms on
one (1, H, W) image in model space ([0, 1]):
geometric - horizontal flip (p 0.5); affine (p 0.8): rotation +-10 deg, scale +-10%,
translation +-6% of the side, shear +-0.1, border padding;
intensity - gamma 0.7-1.5 (p 0.5), contrast scale +-15% (p 0.5), brightness shift
+-0.1 (p 0.5), Gaussian blur sigma 0.25-1 px (p 0.3), Gaussian noise sd 0.03 (p 0.5);
then clipped to [0, 1]. Every image gets a fresh draw; a seed makes the stream
reproducible (MONAI transforms keep their own RandomState).

Acquisition augmentation: the same geometry, then what differs between X-ray systems
(after the XM-pipeline, Eur Radiol Exp 2023): a random detector response (a monotone
piecewise-linear LUT), gamma, unsharp-mask processing strength, exposure-dependent
(quantum) noise, blur, collimation borders and burned-in markers / text blocks.
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

    aug = T.Compose([
        *_geometry(image_size),
        T.RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5)),
        T.RandScaleIntensity(prob=0.5, factors=0.15),
        T.RandShiftIntensity(prob=0.5, offsets=0.1),
        T.RandGaussianSmooth(prob=0.3, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
        T.RandGaussianNoise(prob=0.5, std=0.03),
    ])
    aug.set_random_state(seed)
    return aug


ACQUISITION_DOC = (
    "flip and affine as plain; detector LUT (random monotone curve, 6-10 points, p 0.5); "
    "gamma 0.6-1.6 (p 0.5); unsharp mask sigma 1-3 px at 256 px, strength 0.2-1.5 (p 0.5); "
    "quantum noise sd 0.005-0.04 at mid-grey, scaling with sqrt(signal) (p 0.5); blur "
    "sigma 0.25-1 px (p 0.3); collimation borders 0-8% per side, black or white (p 0.3); "
    "1-3 bright marker / text blocks (p 0.3)")


def _geometry(image_size: int) -> list:
    from monai import transforms as T

    shift = round(0.06 * image_size)
    return [T.RandFlip(prob=0.5, spatial_axis=1),
            T.RandAffine(prob=0.8, rotate_range=np.deg2rad(10.0), scale_range=0.1,
                         translate_range=(shift, shift), shear_range=0.1,
                         padding_mode="border")]


def acquisition_augmentation(image_size: int, seed: int = 0):
    """Geometry as plain augmentation, then simulated acquisition and processing
    differences between X-ray systems (a seeded MONAI Compose)."""
    from monai import transforms as T

    from harmonize.data.acquisition import RandCollimation, RandQuantumNoise

    scale = image_size / 256  # sigmas are given for 256 px images
    aug = T.Compose([
        *_geometry(image_size),
        T.RandHistogramShift(num_control_points=(6, 10), prob=0.5),
        T.RandAdjustContrast(prob=0.5, gamma=(0.6, 1.6)),
        T.RandGaussianSharpen(sigma1_x=(scale * 1, scale * 3), sigma1_y=(scale * 1, scale * 3),
                              sigma2_x=scale * 1, sigma2_y=scale * 1, alpha=(0.2, 1.5),
                              prob=0.5),
        RandQuantumNoise(prob=0.5, sd_at_mid_grey=(0.005, 0.04)),
        T.RandGaussianSmooth(prob=0.3, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
        RandCollimation(prob=0.3, max_fraction=0.08),
        T.RandCoarseDropout(holes=1, max_holes=3, spatial_size=max(2, image_size // 32),
                            max_spatial_size=(max(3, image_size // 16), max(4, image_size // 5)),
                            fill_value=(0.85, 1.0), prob=0.3),
    ])
    aug.set_random_state(seed)
    return aug


AUGMENTATIONS = {"plain": plain_augmentation, "acquisition": acquisition_augmentation}


def augment(aug, image: torch.Tensor) -> torch.Tensor:
    """Apply to one (1, H, W) tensor; returns a plain float32 tensor clipped to [0, 1]."""
    out = torch.as_tensor(aug(image)).as_subclass(torch.Tensor)
    return out.float().clamp_(0.0, 1.0)
