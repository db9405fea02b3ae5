"""Per-image feature cache, so a rerun only computes what is new.

Key = sha256 over the image file's bytes, the mask file's bytes (or "auto") and the
settings digest (bin width, classes, intensity policy, auto-mask parameters,
pyradiomics version). Content, not path or mtime: a moved folder still hits, an
edited image or a new pyradiomics misses. One small JSON file per key under
``<cache_dir>/<key[:2]>/<key>.json``, written to a temporary file and renamed into
place, so readers never see half a record and an interrupted run keeps what it
finished. Errors are not cached: they are cheap to find again and may be transient.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from harmonize.radiomics.masks import mask_source

CACHE_ENV = "HARMONIZE_RADIOMICS_CACHE"


def default_cache_dir() -> Path:
    """$HARMONIZE_RADIOMICS_CACHE, else $XDG_CACHE_HOME/harmonize/radiomics, else
    ~/.cache/harmonize/radiomics."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "harmonize" / "radiomics"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_key(image: str | os.PathLike, mask: str | os.PathLike | None,
              settings_digest: str) -> str:
    """The key of one image's features; raises OSError when a file cannot be read."""
    mask_part = file_sha256(mask) if mask else "auto"
    if mask and mask_source(mask) != "manifest":  # a saved automatic ROI: no shape2D
        mask_part += f":{mask_source(mask)}"
    blob = f"image:{file_sha256(image)}|mask:{mask_part}|settings:{settings_digest}"
    return hashlib.sha256(blob.encode()).hexdigest()


class FeatureCache:
    """JSON records by key in a folder; a missing or corrupt file is a miss."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()

    def _file(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self._file(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, record: dict) -> None:
        target = self._file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".partial", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(record, fh)  # NaN kept as NaN (Python's json reads it back)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
