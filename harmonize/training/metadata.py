"""What every checkpoint's metadata.json says about the data it was trained on."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from harmonize.checkpoint import file_sha256
from harmonize.data.intensity import IntensityPolicy


def training_metadata(df: pd.DataFrame, reference_site: str, manifest_path: str | os.PathLike,
                      policy: IntensityPolicy, image_size: int | None = None) -> dict:
    """Reference site, training sites with image counts, image size, intensity policy and
    the training manifest's path and SHA-256 (the checkpoint contract)."""
    counts = df["site"].value_counts().sort_index()
    return {
        "reference_site": reference_site,
        "training_sites": {str(s): int(n) for s, n in counts.items()},
        "image_size": image_size,
        "intensity_policy": policy.to_dict(),
        "training_manifest": str(Path(manifest_path).resolve()),
        "training_manifest_sha256": file_sha256(manifest_path),
    }
