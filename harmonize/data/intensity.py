"""The one intensity policy between stored values and model space.

Model space is float32 with 0 = the bottom and 1 = the top of a window [lo, hi]:

- ``bit-depth`` (X-rays and other calibrated integer data): the window is the storage
  range, e.g. [0, 4095] for 12 bits stored, so intensities keep their absolute meaning
  across images and sites (exposure differences stay visible to the translator).
- ``percentile`` (float data, nuclear-medicine counts, whose scale is arbitrary per
  image): the window is the image's own [p_low, p_high] percentiles; values beyond it
  fall outside [0, 1] rather than being clipped, so the mapping stays invertible.
- ``auto`` picks ``percentile`` for float arrays and DICOM modality NM/PT, else
  ``bit-depth``.

`from_model` is the exact inverse of `to_model` (up to rounding to the stored integer
type) and clips to what the storage can hold, so a harmonized 12-bit image is written
back as 12-bit data in the original range.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from harmonize.data.io import MedicalImage, cast_to_storage

COUNT_MODALITIES = {"NM", "PT"}


@dataclass(frozen=True)
class IntensityParams:
    """Per-image window, needed to map a model output back to stored values."""

    lo: float
    hi: float
    storage_range: tuple[float, float]
    dtype: str


@dataclass(frozen=True)
class IntensityPolicy:
    mode: Literal["auto", "bit-depth", "percentile"] = "auto"
    bits: int | None = None  # force a bit depth for bit-depth mode (e.g. 12-bit in PNG16)
    percentiles: tuple[float, float] = (0.0, 99.9)

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "bit-depth", "percentile"):
            raise ValueError(f"intensity mode '{self.mode}': use auto, bit-depth or percentile")
        if self.bits is not None and not 1 <= self.bits <= 32:
            raise ValueError(f"intensity bits={self.bits}: expected 1..32")
        p_lo, p_hi = self.percentiles
        if not 0 <= p_lo < p_hi <= 100:
            raise ValueError(
                f"intensity percentiles {self.percentiles}: need 0 <= low < high <= 100"
            )

    def resolved_mode(self, image: MedicalImage) -> str:
        if self.mode != "auto":
            return self.mode
        if image.array.dtype.kind == "f" or (image.modality or "").upper() in COUNT_MODALITIES:
            return "percentile"
        return "bit-depth"

    def window(self, image: MedicalImage) -> tuple[float, float]:
        if self.resolved_mode(image) == "percentile":
            lo, hi = np.percentile(image.array, self.percentiles)
        elif self.bits is not None:
            lo, hi = 0.0, float(2**self.bits - 1)
        else:
            lo, hi = image.value_range
        if hi <= lo:  # a constant image: any non-empty window inverts it exactly
            hi = lo + 1.0
        return float(lo), float(hi)

    def to_model(self, image: MedicalImage) -> tuple[np.ndarray, IntensityParams]:
        lo, hi = self.window(image)
        x = (image.array.astype(np.float64) - lo) / (hi - lo)
        if self.bits is not None:
            storage = (0.0, float(2**self.bits - 1))
        elif image.array.dtype.kind == "f" and image.format != "dicom":
            storage = (-np.inf, np.inf)  # float files hold any value: nothing to clip
        else:
            storage = image.value_range
        params = IntensityParams(lo, hi, tuple(storage), str(image.array.dtype))
        return x.astype(np.float32), params

    def from_model(self, x: np.ndarray, params: IntensityParams) -> np.ndarray:
        values = np.asarray(x, dtype=np.float64) * (params.hi - params.lo) + params.lo
        return cast_to_storage(values, np.dtype(params.dtype), params.storage_range)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> IntensityPolicy:
        d = dict(d or {})
        if "percentiles" in d:
            d["percentiles"] = tuple(d["percentiles"])
        return cls(**d)
