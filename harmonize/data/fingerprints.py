"""Site fingerprints of X-rays that no intensity mapping or texture model removes:
collimation borders and burned-in markers (side letters, text), found per image.

Found, in model space, on the image as stored (before any polarity flip):
- **borders**: runs of edge rows / columns that are flat (almost every pixel within `tol`
  of the row's median) at one of the image's two extremes: the shutters leave the detector
  unexposed (black) or, after an inverted export, white;
- **markers**: small groups of saturated pixels (within `tol` of the image's maximum)
  that step to the other extreme within a pixel, as printed glyphs do (on their black box
  or on the anatomy), in the outer band of the image, each under `max_marker` of its
  area; the box found covers the glyph and a 2-pixel rim.

Normalized by **inpainting, not cropping or masking**: a crop changes the image size (and
the pixel grid a reader or a mask relies on); a constant mask leaves an edge as telling
as the border it replaces. Borders are filled by mirroring the exposed field outwards,
markers by normalized convolution of their surroundings (a smooth fill from the pixels
around the box). What was filled is returned as a boolean mask and counted.

Where an ROI mask exists (`protect`: the manifest's `mask` column, e.g. the anatomy), no
pixel inside it is ever changed, even when it looks like a fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SIDES = ("top", "bottom", "left", "right")


@dataclass(frozen=True)
class Fingerprints:
    """What `find_fingerprints` found in one image."""

    border: tuple[int, int, int, int]  # top, bottom, left, right widths in pixels
    markers: tuple[tuple[int, int, int, int], ...]  # (y0, y1, x0, x1) boxes, end-exclusive
    filled: np.ndarray  # bool (H, W): every pixel the removal replaces

    @property
    def found(self) -> bool:
        return bool(self.filled.any())

    def summary(self) -> dict:
        """JSON-able counts for logs and reports."""
        return {**dict(zip(SIDES, self.border, strict=True)), "markers": len(self.markers),
                "filled_fraction": round(float(self.filled.mean()), 5)}


def find_fingerprints(x: np.ndarray, protect: np.ndarray | None = None, tol: float = 0.004,
                      max_border: float = 0.3, max_marker: float = 0.05,
                      band: float = 0.3) -> Fingerprints:
    """Borders and markers of a model-space (H, W) image; `protect` pixels are never
    included. `band`: markers are looked for within this fraction of an edge."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2D (H, W) image, got shape {x.shape}")
    h, w = x.shape
    lo, hi = float(x.min()), float(x.max())
    extreme = lambda v: abs(v - lo) <= tol or abs(v - hi) <= tol  # noqa: E731
    border = (_flat_run(x, extreme, tol, max_border),
              _flat_run(x[::-1], extreme, tol, max_border),
              _flat_run(x.T, extreme, tol, max_border),
              _flat_run(x.T[::-1], extreme, tol, max_border))
    filled = np.zeros((h, w), bool)
    top, bottom, left, right = border
    filled[:top], filled[h - bottom:], filled[:, :left], filled[:, w - right:] = (
        True, True, True, True)
    markers = _markers(x, filled, lo, hi, tol, max_marker, band)
    for y0, y1, x0, x1 in markers:
        filled[y0:y1, x0:x1] = True
    if protect is not None:
        filled &= ~np.asarray(protect, bool)
    return Fingerprints(border, tuple(markers), filled)


def remove_fingerprints(x: np.ndarray, protect: np.ndarray | None = None, **find_options
                        ) -> tuple[np.ndarray, Fingerprints]:
    """The image with its borders and markers inpainted (see the module docstring), and
    what was found. Pixels outside `found.filled` are returned unchanged, bit for bit."""
    x = np.asarray(x, dtype=np.float32)
    found = find_fingerprints(x, protect, **find_options)
    if not found.found:
        return x.copy(), found
    y = x
    if found.markers:  # first, so the mirrored field carries no marker into the border
        boxes = _boxes_mask(x.shape, found.markers)
        border = found.filled & ~boxes
        y = _fill_smooth(x, found.filled & boxes, border, found.markers)
    y = _mirror_border(y, found.border)
    return np.where(found.filled, y, x).astype(np.float32), found


# --- finding ------------------------------------------------------------------------------

def _flat_run(x: np.ndarray, extreme, tol: float, max_fraction: float) -> int:
    """How many leading rows of `x` are flat at an extreme value and end in a straight,
    sharp edge: the first row after them leaves the border value along most of its
    length (a shutter's edge), which air beside the body does not (its edge is curved)."""
    limit = int(max_fraction * x.shape[0])
    n, value = 0, None
    while n < limit:
        row = x[n]
        median = float(np.median(row))
        if not extreme(median) or np.mean(np.abs(row - median) <= tol) < 0.95:
            break
        n, value = n + 1, median
    if n == 0 or n >= x.shape[0]:
        return 0
    edge = np.mean(np.abs(x[n] - value) > 10 * tol)
    return n if edge >= 0.5 else 0


def _markers(x: np.ndarray, border: np.ndarray, lo: float, hi: float, tol: float,
             max_marker: float, band: float) -> list[tuple[int, int, int, int]]:
    """Boxes of burned-in glyphs near an edge: saturated pixels with a jump of at least half
    the image's range to a neighbour (printed text is a step from black to white within a
    pixel; saturated anatomy, e.g. a burnt-out lung apex, rises gradually), grouped by
    a 2-pixel dilation, each group small."""
    h, w = x.shape
    jump = np.zeros_like(x)
    for axis in (0, 1):
        d = np.abs(np.diff(x, axis=axis))
        lead = [(0, 0), (0, 0)]
        lead[axis] = (0, 1)
        trail = [(0, 0), (0, 0)]
        trail[axis] = (1, 0)
        jump = np.maximum(jump, np.maximum(np.pad(d, lead), np.pad(d, trail)))
    near_border = ndimage.binary_dilation(border, iterations=2) if border.any() else border
    extreme = (x >= hi - tol) | (x <= lo + tol)
    glyph = extreme & (jump >= 0.5 * (hi - lo)) & ~near_border
    labels, n = ndimage.label(ndimage.binary_dilation(glyph, iterations=2),
                              structure=np.ones((3, 3), bool))
    boxes = []
    for index, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        ys, xs = sl
        area = (ys.stop - ys.start) * (xs.stop - xs.start)
        n_bright = int((glyph[sl] & (x[sl] >= hi - tol) & (labels[sl] == index)).sum())
        if area > max_marker * h * w or n_bright < 6:
            continue
        cy, cx = (ys.start + ys.stop) / 2, (xs.start + xs.stop) / 2
        if min(cy, h - cy) < band * h or min(cx, w - cx) < band * w:
            boxes.append((ys.start, ys.stop, xs.start, xs.stop))
    return boxes


def _boxes_mask(shape: tuple[int, int], boxes) -> np.ndarray:
    m = np.zeros(shape, bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


# --- filling ------------------------------------------------------------------------------

def _mirror_border(x: np.ndarray, border: tuple[int, int, int, int]) -> np.ndarray:
    """The exposed field mirrored outwards over the borders (same size as `x`)."""
    top, bottom, left, right = border
    h, w = x.shape
    field = x[top:h - bottom, left:w - right]
    if field.size == 0:
        return x.copy()
    mode = "symmetric" if min(field.shape) > max(border) else "edge"
    return np.pad(field, ((top, bottom), (left, right)), mode=mode).astype(np.float32)


def _fill_smooth(x: np.ndarray, holes: np.ndarray, unknown: np.ndarray, boxes) -> np.ndarray:
    """Normalized convolution: each hole pixel gets the Gaussian-weighted mean of the
    known pixels around it (neither holes nor `unknown`, e.g. a border; sigma about half
    the largest box side)."""
    side = max(max(y1 - y0, x1 - x0) for y0, y1, x0, x1 in boxes)
    sigma = max(side / 2.0, 1.0)
    known = (~(holes | unknown)).astype(np.float32)
    num = ndimage.gaussian_filter(x * known, sigma, mode="reflect")
    den = ndimage.gaussian_filter(known, sigma, mode="reflect")
    out = x.copy()
    out[holes] = num[holes] / np.maximum(den[holes], 1e-6)
    return out
