"""Radiomics site-shift analysis.

- `settings`: what decides a feature value; the data-driven fixed bin width.
- `masks`: ROI from the manifest, or an automatic body mask.
- `extract`: pyradiomics features per image, in parallel (processes or Ray), cached.
- `stats`, `distance`, `combat`: how different the sites are, and ComBat.

The extraction API is re-exported here: ``from harmonize.radiomics import
extract_features, RadiomicsSettings``. (`extract.feature_columns` lists every feature
column; `analysis.feature_columns` only those finite and varying, for statistics.)
"""

from harmonize.radiomics.extract import extract_features
from harmonize.radiomics.image_features import extract_image
from harmonize.radiomics.masks import AutoMaskParams, ROIError, auto_mask
from harmonize.radiomics.settings import (
    FEATURE_CLASSES,
    BinWidth,
    RadiomicsSettings,
    choose_bin_width,
)

__all__ = [
    "FEATURE_CLASSES",
    "AutoMaskParams",
    "BinWidth",
    "ROIError",
    "RadiomicsSettings",
    "auto_mask",
    "choose_bin_width",
    "extract_features",
    "extract_image",
]
