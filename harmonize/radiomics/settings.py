"""What decides a radiomics feature value, and the data-driven bin width.

Texture features depend on how intensities are binned. A fixed bin *width* (IBSI
"fixed bin size") keeps a grey level meaning the same intensity in every image, so
sites can be compared; a fixed bin *count* would rescale each image to its own range
and hide exactly the exposure differences a site-shift report is after. The width is
chosen once from the data (`choose_bin_width`: pooled ROI intensities in model space,
(p99.5 - p0.5) / 64) and then kept in `RadiomicsSettings`, which is saved beside a
report so that a harmonized copy is extracted with the same settings (before/after
comparability). Every setting that changes a value is part of `RadiomicsSettings.digest`
and so of each cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from harmonize.data.intensity import IntensityPolicy
from harmonize.radiomics.masks import AutoMaskParams, load_roi

FEATURE_CLASSES = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
# bump when harmonize's own preprocessing changes feature values: old cache entries die
PIPELINE_VERSION = 1


@dataclass(frozen=True)
class BinWidth:
    """How a bin width was chosen from data, for the report to print."""

    width: float
    lo: float  # pooled low percentile of ROI intensities (model space)
    hi: float
    n_bins: int
    percentiles: tuple[float, float]
    n_images: int  # images that contributed
    n_failed: int  # sampled images that could not be read or masked

    def describe(self) -> str:
        p_lo, p_hi = self.percentiles
        return (f"fixed bin width {self.width:.6g} (model space) = (p{p_hi:g} {self.hi:.4g} - "
                f"p{p_lo:g} {self.lo:.4g}) / {self.n_bins}, pooled over the ROI pixels of "
                f"{self.n_images} images")


@dataclass(frozen=True)
class RadiomicsSettings:
    """Everything that decides feature values; `digest()` goes into every cache key.

    bin_width: fixed bin width in model space (0..1 = the intensity policy's window).
    classes: pyradiomics feature classes computed for every image.
    shape2d: also compute shape2D for images whose ROI comes from the manifest (an
        automatic body mask's shape says nothing about anatomy). Units are pixels.
    bin_choice: how bin_width was chosen (informational, not part of the digest).
    """

    bin_width: float
    classes: tuple[str, ...] = FEATURE_CLASSES
    shape2d: bool = True
    policy: IntensityPolicy = field(default_factory=IntensityPolicy)
    auto_mask: AutoMaskParams = field(default_factory=AutoMaskParams)
    bin_choice: BinWidth | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.bin_width) and self.bin_width > 0):
            raise ValueError(f"bin_width={self.bin_width}: expected a positive number")
        unknown = [c for c in self.classes if c not in FEATURE_CLASSES]
        if unknown:
            raise ValueError(f"feature classes {unknown} unknown; choose from "
                             f"{', '.join(FEATURE_CLASSES)} (shape2D: use shape2d=True)")
        if not self.classes:
            raise ValueError("no feature classes: choose from " + ", ".join(FEATURE_CLASSES))
        object.__setattr__(self, "classes", tuple(self.classes))

    @classmethod
    def from_data(cls, images: pd.DataFrame | Sequence[str | os.PathLike], n_bins: int = 64,
                  policy: IntensityPolicy | None = None, auto_mask: AutoMaskParams | None = None,
                  progress: bool = False, **kwargs) -> RadiomicsSettings:
        """Settings whose bin width is chosen from `images` (see `choose_bin_width`)."""
        policy = policy or IntensityPolicy()
        auto_mask = auto_mask or AutoMaskParams()
        choice = choose_bin_width(images, n_bins=n_bins, policy=policy, auto_mask=auto_mask,
                                  progress=progress)
        return cls(bin_width=choice.width, policy=policy, auto_mask=auto_mask,
                   bin_choice=choice, **kwargs)

    def to_dict(self) -> dict:
        return {
            "bin_width": self.bin_width,
            "classes": list(self.classes),
            "shape2d": self.shape2d,
            "policy": self.policy.to_dict(),
            "auto_mask": self.auto_mask.to_dict(),
            "bin_choice": None if self.bin_choice is None else asdict(self.bin_choice),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RadiomicsSettings:
        choice = d.get("bin_choice")
        if choice is not None:
            choice = BinWidth(**{**choice, "percentiles": tuple(choice["percentiles"])})
        return cls(
            bin_width=float(d["bin_width"]),
            classes=tuple(d.get("classes", FEATURE_CLASSES)),
            shape2d=bool(d.get("shape2d", True)),
            policy=IntensityPolicy.from_dict(d.get("policy")),
            auto_mask=AutoMaskParams(**d.get("auto_mask", {})),
            bin_choice=choice,
        )

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RadiomicsSettings:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def report_dict(self, features: pd.DataFrame | None = None) -> dict:
        """Plain values for a report's summary.json and text (keys the report reads:
        bin_width, feature_classes, pyradiomics_version, roi); `features` from
        `extract_features` adds how many images had which kind of ROI."""
        from radiomics import __version__ as pyradiomics_version

        classes = list(self.classes) + (["shape2D (manifest masks only)"] if self.shape2d
                                        else [])
        return {
            "bin_width": self.bin_width,
            "bin_width_rule": (self.bin_choice.describe() if self.bin_choice
                               else "fixed bin width given explicitly"),
            "feature_classes": classes,
            "pyradiomics_version": pyradiomics_version,
            "intensity_policy": self.policy.to_dict(),
            "auto_mask": self.auto_mask.to_dict(),
            "roi": roi_summary(features) if features is not None else
            "manifest mask where given, else an automatic body mask",
            "settings_digest": self.digest(),
        }

    def digest(self) -> str:
        """sha256 of everything that changes a value, incl. the pyradiomics version."""
        from radiomics import __version__ as pyradiomics_version

        d = self.to_dict()
        d.pop("bin_choice")
        d["bin_width"] = repr(float(self.bin_width))  # exact, not rounded by JSON
        d["pyradiomics"] = pyradiomics_version
        d["pipeline"] = PIPELINE_VERSION
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def roi_summary(features: pd.DataFrame) -> str:
    """'manifest mask for 560 images, automatic body mask for 96 (...)' from mask_source."""
    counts = features["mask_source"].value_counts() if len(features) else pd.Series(dtype=int)
    parts = []
    if counts.get("manifest", 0):
        parts.append(f"manifest mask for {counts['manifest']} images")
    auto = int(counts.get("otsu", 0) + counts.get("border", 0))
    if auto:
        detail = (f" ({counts['border']} of them the whole frame inside constant borders, "
                  "as Otsu found no body)") if counts.get("border", 0) else ""
        parts.append(f"automatic body mask (Otsu) for {auto} images{detail}")
    return ", ".join(parts) or "no images"


def choose_bin_width(
    images: pd.DataFrame | Sequence[str | os.PathLike],
    n_bins: int = 64,
    policy: IntensityPolicy | None = None,
    auto_mask: AutoMaskParams | None = None,
    max_images: int = 200,
    pixels_per_image: int = 20_000,
    percentiles: tuple[float, float] = (0.5, 99.5),
    seed: int = 0,
    progress: bool = False,
) -> BinWidth:
    """Fixed bin width = (pooled p99.5 - p0.5 of ROI intensities) / n_bins.

    The ROI is the one extraction uses (manifest mask, else the automatic body mask).
    Up to `max_images` images are sampled, balanced across sites (seeded round robin),
    and each adds at most `pixels_per_image` random ROI pixels, so neither a big site
    nor a big image dominates. The percentiles ignore outliers (burned-in text, hot
    pixels). An image then spans about n_bins grey levels if its ROI covers the pooled
    range, fewer if it is darker or flatter: that difference is the signal.
    """
    policy = policy or IntensityPolicy()
    auto_mask = auto_mask or AutoMaskParams()
    rows = _sample_rows(images, max_images, seed)
    rng = np.random.default_rng(seed)
    pooled: list[np.ndarray] = []
    failures: list[str] = []
    for path, mask in tqdm(rows, desc="bin width", unit="img", disable=not progress):
        try:
            x, roi = load_roi(path, mask, policy, auto_mask)
        except Exception as err:  # unreadable or maskless images are reported by extraction
            failures.append(f"{path}: {err}")
            continue
        values = x[roi.mask]
        if values.size > pixels_per_image:
            values = rng.choice(values, pixels_per_image, replace=False)
        pooled.append(values.astype(np.float64))
    if not pooled:
        detail = f"; first: {failures[0]}" if failures else ""
        raise ValueError(f"no usable image to choose a bin width from ({len(rows)} tried){detail}")
    lo, hi = np.percentile(np.concatenate(pooled), percentiles)
    if not hi > lo:
        raise ValueError(f"ROI intensities are constant across {len(pooled)} images "
                         f"(p{percentiles[0]:g} = p{percentiles[1]:g} = {lo:g}); "
                         "pass an explicit bin_width")
    return BinWidth(width=float(hi - lo) / n_bins, lo=float(lo), hi=float(hi), n_bins=n_bins,
                    percentiles=tuple(percentiles), n_images=len(pooled),
                    n_failed=len(failures))


def _sample_rows(images: pd.DataFrame | Sequence[str | os.PathLike], max_images: int,
                 seed: int) -> list[tuple[str, str | None]]:
    """(path, mask) pairs: all of them, or a seeded sample balanced across sites."""
    if isinstance(images, pd.DataFrame):
        masks = images["mask"] if "mask" in images.columns else [None] * len(images)
        sites = images["site"] if "site" in images.columns else [""] * len(images)
        rows = [(str(p), m if isinstance(m, str) and m else None, str(s))
                for p, m, s in zip(images["path"], masks, sites, strict=True)]
    else:
        rows = [(str(p), None, "") for p in images]
    if len(rows) <= max_images:
        return [(p, m) for p, m, _ in rows]
    order = np.random.default_rng(seed).permutation(len(rows))
    by_site: dict[str, list[int]] = {}
    for i in order:
        by_site.setdefault(rows[i][2], []).append(int(i))
    picked: list[int] = []
    queues = [list(reversed(q)) for _, q in sorted(by_site.items())]
    while len(picked) < max_images:
        for q in queues:
            if q and len(picked) < max_images:
                picked.append(q.pop())
    return [rows[i][:2] for i in sorted(picked)]
