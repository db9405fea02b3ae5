"""The image type every reader returns and every writer takes, and its errors (shared by
`io` and its DICOM module, so neither needs the other's internals)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class ImageReadError(ValueError):
    """A file could not be read as a 2D image; the message names the file and a fix."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str = "") -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{path}: {problem}" + (f" ({fix})" if fix else ""))


class ImageWriteError(OSError):
    """An output could not be written; the message names the file."""


@dataclass
class MedicalImage:
    """A 2D image with everything needed to write a harmonized copy back.

    array: (H, W) modality values (DICOM rescale applied, MONOCHROME1 inverted).
    value_range: (lo, hi) the values the storage can hold, e.g. (0, 4095) for 12 bits.
    bits_stored: meaningful bits of the stored integers, None for float data.
    repairs: what the reader changed so that the file can be written back (a damaged
        header element trimmed, emptied or dropped; a missing UID made), one note each;
        batch apply logs them and DICOM outputs carry them in DerivationDescription.
    """

    array: np.ndarray
    path: Path
    format: str
    value_range: tuple[float, float]
    bits_stored: int | None
    spacing: tuple[float, float] | None = None
    modality: str | None = None
    header: dict[str, Any] = field(default_factory=dict, repr=False)
    repairs: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


def cast_to_storage(values: np.ndarray, dtype: np.dtype, value_range: tuple[float, float]):
    """Round (for integer storage), clip to the valid range and cast."""
    dtype = np.dtype(dtype)
    values = np.asarray(values, dtype=np.float64)
    if dtype.kind in "ui":
        values = np.rint(values)
    return np.clip(values, value_range[0], value_range[1]).astype(dtype)
