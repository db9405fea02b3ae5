"""Radiomics features of one 2D image with pyradiomics (the unit of parallel work).

Each image is read, mapped to model space by the intensity policy (so 8-, 12- and
16-bit sites are comparable), given an ROI (manifest mask or automatic body mask, see
`masks`) and passed to pyradiomics as a single-slice (1, H, W) volume with
``force2D=True, force2Ddimension=0``. Why that route: a true 2D SimpleITK image with the
same force2D settings is silently wrong (pyradiomics then treats image rows as slices;
71 of 93 features differed when measured), while the single-slice volume and a plain 2D
image without force2D agree exactly (pinned in tests/test_radiomics_extract.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from harmonize.data.io import ImageReadError
from harmonize.radiomics.masks import ROIError, load_roi
from harmonize.radiomics.settings import FEATURE_CLASSES, RadiomicsSettings

FEATURE_PREFIX = "original_"
META_COLUMNS = ("mask_source", "roi_pixels", "height", "width")
CLASS_ORDER = (*FEATURE_CLASSES, "shape2D")

# (index, path, mask or None) in; (index, record or None, error or None) out
Item = tuple[int, str, str | None]
Result = tuple[int, dict | None, str | None]

_EXTRACTORS: dict[tuple[str, bool], object] = {}


def _extractor(settings: RadiomicsSettings, with_shape: bool):
    """A configured pyradiomics extractor, built once per process and settings."""
    key = (settings.digest(), with_shape)
    if key not in _EXTRACTORS:
        from radiomics import featureextractor

        logging.getLogger("radiomics").setLevel(logging.ERROR)  # per-image chatter
        ext = featureextractor.RadiomicsFeatureExtractor(
            binWidth=settings.bin_width, force2D=True, force2Ddimension=0,
            additionalInfo=False, label=1,
        )
        ext.disableAllFeatures()
        for name in settings.classes + (("shape2D",) if with_shape else ()):
            ext.enableFeatureClassByName(name)
        _EXTRACTORS[key] = ext
    return _EXTRACTORS[key]


def extract_image(path: str | os.PathLike, mask: str | os.PathLike | None,
                  settings: RadiomicsSettings) -> dict:
    """Features of one image; raises on any problem (see `extract_chunk` for records).

    Returns {"features": {name: float}, "mask_source", "roi_pixels", "height", "width"}.
    """
    x, roi = load_roi(path, mask, settings.policy, settings.auto_mask)
    with_shape = settings.shape2d and roi.source == "manifest"
    image = sitk.GetImageFromArray(x[None])  # (1, H, W): see the module docstring
    mask_img = sitk.GetImageFromArray(roi.mask[None].astype(np.uint8))
    values = _extractor(settings, with_shape).execute(image, mask_img, label=1)
    features = {k: float(v) for k, v in values.items() if k.startswith(FEATURE_PREFIX)}
    return {"features": features, "mask_source": roi.source, "roi_pixels": int(roi.mask.sum()),
            "height": int(x.shape[0]), "width": int(x.shape[1])}


def extract_chunk(items: Sequence[Item], settings: RadiomicsSettings,
                  single_thread: bool = False) -> list[Result]:
    """Features of several images, errors as messages: the unit of parallel work."""
    if single_thread:  # a worker is one of many on the machine: no nested threads
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    out: list[Result] = []
    for index, path, mask in items:
        try:
            out.append((index, extract_image(path, mask, settings), None))
        except (ImageReadError, ROIError) as err:
            out.append((index, None, str(err)))
        except Exception as err:  # pyradiomics' own checks (ROI too small, ...) and surprises
            out.append((index, None, f"{type(err).__name__}: {err}"))
    return out
