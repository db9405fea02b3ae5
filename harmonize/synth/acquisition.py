"""Per-site acquisition models: how one hospital turns the same anatomy into pixels.

A :class:`SiteAcquisition` holds everything that makes sites look different while the
patient is the same: dose (quantum noise), detector blur and sampling, the response
curve, post-processing, polarity, gain/offset, collimation borders, a burned-in marker
(a classic shortcut for classifiers) and the stored bit depth. :func:`render` applies it
to a phantom's ideal map. Site 0 of :func:`default_sites` is the clean reference style.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from harmonize.synth.phantom import MODALITIES

RESPONSES = ("linear", "gamma", "log", "sigmoid")
MARKERS = ("none", "L", "R", "bars")
CORNERS = ("tl", "tr", "bl", "br")
MU_SCALE = 4.0  # X-ray: line integral mapped to full scale (dense trunk ~ 3.5)
ACTIVITY_SCALE = 2.0  # bone scan: activity mapped to full scale (normal bone ~ 1)

_GLYPHS = {
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
    "bars": ["11011010110110101"] * 5 + ["00000000000000000", "10101110111010101"],
}


@dataclass(frozen=True)
class SiteAcquisition:
    """One site's imaging chain, from photons to stored pixels (all plain, JSON-able values).

    ``photons``: X-ray quanta per output pixel for the unattenuated beam, or bone-scan
    counts per pixel at activity 1; lower means noisier. ``psf_sigma`` and
    ``unsharp_sigma`` are in output pixels. ``resolution`` < 1 samples the detector
    coarser and upsamples at export. ``response_param`` is the gamma exponent, log
    strength or sigmoid slope of ``response``. ``unsharp_amount`` < 0 smooths.
    ``border`` is the collimated (black) fraction of each side: top, bottom, left, right.
    """

    modality: str = "xray"
    photons: float = 30000.0
    read_noise: float = 0.0
    psf_sigma: float = 0.5
    resolution: float = 1.0
    response: str = "linear"
    response_param: float = 1.0
    unsharp_amount: float = 0.0
    unsharp_sigma: float = 2.0
    inverted: bool = False
    gain: float = 0.9
    offset: float = 0.05
    bits: int = 16
    border: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    marker: str = "none"
    marker_corner: str = "tl"
    marker_size: float = 0.08
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        checks = {
            "modality": self.modality in MODALITIES,
            "response": self.response in RESPONSES,
            "marker": self.marker in MARKERS,
            "marker_corner": self.marker_corner in CORNERS,
            "bits": 8 <= self.bits <= 16,
            "resolution": 0.1 <= self.resolution <= 1.0,
            "photons": self.photons > 0,
            "border": len(self.border) == 4 and all(0 <= b < 0.3 for b in self.border),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid SiteAcquisition field(s) {bad}: {self}")

    @property
    def max_value(self) -> int:
        """Largest stored value, ``2**bits - 1`` (e.g. 4095 for a 12-bit site)."""
        return 2**self.bits - 1

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for synth.json (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["border"] = list(self.border)
        return out


def reference_acquisition(modality: str = "xray") -> SiteAcquisition:
    """The clean, well-exposed 16-bit style every site is translated to by default."""
    if modality == "bonescan":
        return SiteAcquisition(modality="bonescan", photons=150.0, psf_sigma=1.0, gain=0.95,
                               offset=0.02, notes="reference: high-count, 16-bit, hot = bright")
    return SiteAcquisition(modality="xray", notes="reference: high-dose DR, 16-bit, bone = bright")


# Distinct site archetypes (jittered per seed); site 0 is always the reference.
_XRAY_SITES: list[dict[str, Any]] = [
    dict(photons=4000, read_noise=2.0, psf_sigma=1.2, resolution=0.6, response="gamma",
         response_param=0.7, unsharp_amount=1.0, unsharp_sigma=3.0, gain=0.85, offset=0.08,
         bits=12, border=(0.06, 0.05, 0.07, 0.07), marker="R", marker_corner="tr",
         notes="older CR: 12-bit, coarse, edge-enhanced, shuttered"),
    dict(photons=12000, psf_sigma=0.7, response="sigmoid", response_param=6.0,
         unsharp_amount=0.6, unsharp_sigma=2.0, inverted=True, gain=1.0, offset=0.0, bits=14,
         marker="bars", marker_corner="bl", notes="DR with MONOCHROME1 export, 14-bit"),
    dict(photons=2500, psf_sigma=1.8, resolution=0.5, response="log", response_param=8.0,
         gain=0.7, offset=0.15, bits=10, border=(0.10, 0.03, 0.04, 0.12), marker="L",
         marker_corner="tl", notes="digitized film: 10-bit, blurry, fogged"),
    dict(photons=1500, read_noise=3.0, psf_sigma=1.0, resolution=0.75, response="gamma",
         response_param=1.4, unsharp_amount=1.5, unsharp_sigma=1.5, inverted=True, gain=1.0,
         offset=0.0, bits=12, border=(0.03, 0.03, 0.03, 0.03), marker="R", marker_corner="tl",
         notes="portable low-dose, inverted, 12-bit"),
    dict(photons=50000, psf_sigma=0.4, response="sigmoid", response_param=4.0,
         unsharp_amount=2.0, unsharp_sigma=6.0, gain=0.8, offset=0.1, bits=16, marker="L",
         marker_corner="br", notes="high-end DR with strong local-contrast processing"),
]
_BONE_SITES: list[dict[str, Any]] = [
    dict(photons=40, psf_sigma=1.8, resolution=0.5, inverted=True, gain=1.0, offset=0.0,
         bits=12, marker="bars", marker_corner="tr", notes="older camera, 128 matrix, inverted"),
    dict(photons=80, psf_sigma=1.2, response="gamma", response_param=0.6, unsharp_amount=-0.5,
         unsharp_sigma=1.5, gain=0.9, offset=0.05, bits=16, border=(0.04, 0.04, 0.04, 0.04),
         marker="R", marker_corner="tl", notes="gamma-boosted display, smoothed"),
    dict(photons=25, psf_sigma=2.2, resolution=0.5, response="log", response_param=10.0,
         inverted=True, gain=0.8, offset=0.1, bits=10, marker="L", marker_corner="tr",
         notes="low-count, log display, 10-bit, inverted"),
    dict(photons=200, psf_sigma=0.9, response="sigmoid", response_param=8.0, gain=1.0,
         offset=0.0, bits=14, border=(0.05, 0.05, 0.10, 0.10), marker="bars",
         marker_corner="bl", notes="high-count, saturating display, 14-bit"),
]


def default_sites(
    n: int, modality: str = "xray", rng_or_seed: np.random.Generator | int = 0,
    no_shift: bool = False,
) -> list[SiteAcquisition]:
    """``n`` clearly distinct site models; site 0 is :func:`reference_acquisition`.

    The first sites come from hand-made archetypes (jittered by the seed); beyond those,
    parameters are drawn from wide ranges. ``no_shift=True`` gives every site the
    reference model: the negative control in which only patients differ between sites.
    """
    if n < 1:
        raise ValueError(f"need at least one site, got {n}")
    rng = np.random.default_rng(rng_or_seed)
    ref = reference_acquisition(modality)
    if no_shift:
        return [ref] * n
    archetypes = _BONE_SITES if modality == "bonescan" else _XRAY_SITES
    sites = [ref]
    for k in range(1, n):
        if k - 1 < len(archetypes):
            params = dict(archetypes[k - 1])
            for key in ("photons", "psf_sigma", "response_param", "unsharp_amount"):
                if key in params:
                    params[key] = round(float(params[key]) * rng.uniform(0.9, 1.1), 4)
        else:
            params = _random_site(modality, rng)
        sites.append(SiteAcquisition(modality=modality, **params))
    return sites


def _random_site(modality: str, rng: np.random.Generator) -> dict[str, Any]:
    """Parameters for sites beyond the archetypes: broad, seeded, still plausible."""
    u = rng.uniform
    photons = 10 ** (u(1.3, 2.4) if modality == "bonescan" else u(3.0, 4.6))
    border = tuple(round(float(b), 3) for b in (u(0, 0.1, 4) * (u() < 0.6)))
    return dict(
        photons=round(float(photons), 1), read_noise=round(u(0, 3), 2),
        psf_sigma=round(u(0.4, 2.2), 2), resolution=float(rng.choice([0.5, 0.6, 0.75, 1.0])),
        response=str(rng.choice(RESPONSES)), response_param=round(u(0.6, 8.0), 2),
        unsharp_amount=round(u(-0.5, 2.0), 2), unsharp_sigma=round(u(1.5, 6.0), 2),
        inverted=bool(u() < 0.4), gain=round(u(0.7, 1.0), 3), offset=round(u(0.0, 0.15), 3),
        bits=int(rng.choice([10, 12, 14, 16])), border=border,
        marker=str(rng.choice(MARKERS)), marker_corner=str(rng.choice(CORNERS)),
        notes="random site",
    )


def render(
    ideal: np.ndarray, finding_mask: np.ndarray | None, acq: SiteAcquisition,
    rng: np.random.Generator,
) -> np.ndarray:
    """Image ``ideal`` as site ``acq`` would: returns uint16 values in ``0 .. 2**bits - 1``.

    Order follows the physical chain: sampling, quanta and noise, blur, response curve,
    post-processing, export resampling, polarity, gain/offset, collimation, marker,
    quantization. ``rng`` draws the noise and the per-exam jitter of border and marker;
    the same ``rng`` state gives the same image. The marker never covers the finding.
    """
    if ideal.ndim != 2 or ideal.shape[0] != ideal.shape[1]:
        raise ValueError(f"ideal map must be a square 2D array, got shape {ideal.shape}")
    size = ideal.shape[0]
    native = max(int(round(size * acq.resolution)), 8)
    scale = native / size
    x = ideal.astype(np.float64)
    if native != size:
        x = ndimage.gaussian_filter(x, 0.5 / scale)
        x = ndimage.zoom(x, scale, order=1, grid_mode=True, mode="nearest")
    quanta = acq.photons / scale**2  # a coarser pixel collects more quanta

    if acq.modality == "xray":
        counts = rng.poisson(quanta * np.exp(-x)).astype(np.float64)
        counts += acq.read_noise * rng.standard_normal(counts.shape)
        counts = ndimage.gaussian_filter(counts, acq.psf_sigma * scale)  # scintillator spread
        signal = np.log(quanta / np.maximum(counts, 0.5)) / MU_SCALE
    else:
        expected = ndimage.gaussian_filter(quanta * x, acq.psf_sigma * scale)  # collimator
        counts = rng.poisson(expected).astype(np.float64)
        counts += acq.read_noise * rng.standard_normal(counts.shape)
        signal = counts / (quanta * ACTIVITY_SCALE)

    v = _response(np.clip(signal, 0.0, 1.0), acq.response, acq.response_param)
    if acq.unsharp_amount:
        v = v + acq.unsharp_amount * (v - ndimage.gaussian_filter(v, acq.unsharp_sigma * scale))
    if native != size:
        v = ndimage.zoom(v, size / native, order=3, grid_mode=True, mode="nearest")
    if acq.inverted:
        v = 1.0 - v
    v = np.clip(acq.offset + acq.gain * v, 0.0, 1.0)

    top, bottom, left, right = _border_pixels(acq.border, size, rng)
    v[:top], v[size - bottom:], v[:, :left], v[:, size - right:] = 0.0, 0.0, 0.0, 0.0
    if acq.marker != "none":
        _burn_marker(v, acq, (top, bottom, left, right), finding_mask, rng)
    return np.rint(v * acq.max_value).astype(np.uint16)


def _response(s: np.ndarray, kind: str, p: float) -> np.ndarray:
    """Detector / display response curve mapping [0, 1] onto [0, 1]."""
    if kind == "gamma":
        return s**p
    if kind == "log":
        return np.log1p(p * s) / np.log1p(p)
    if kind == "sigmoid":
        lo, hi = 1 / (1 + np.exp(p / 2)), 1 / (1 + np.exp(-p / 2))
        return (1 / (1 + np.exp(-p * (s - 0.5))) - lo) / (hi - lo)
    return s


def _border_pixels(
    border: tuple[float, float, float, float], size: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Collimation widths in pixels; each exam's shutter lands a little differently."""
    jitter = rng.uniform(-0.01, 0.01, 4)
    widths = [int(round(max(b + j, 0.0) * size)) if b > 0 else 0
              for b, j in zip(border, jitter, strict=True)]
    return widths[0], widths[1], widths[2], widths[3]


def _burn_marker(
    v: np.ndarray, acq: SiteAcquisition, border: tuple[int, int, int, int],
    finding_mask: np.ndarray | None, rng: np.random.Generator,
) -> None:
    """Burn a white glyph on a black box into a corner, inside the collimated field."""
    size = v.shape[0]
    glyph = np.array([[c == "1" for c in row] for row in _GLYPHS[acq.marker]])
    cell = max(int(round(acq.marker_size * size / glyph.shape[0])), 1)
    glyph = np.kron(glyph, np.ones((cell, cell), bool))
    box = np.pad(glyph, cell)
    bh, bw = box.shape
    margin = int(0.02 * size) + int(rng.integers(0, 3))
    top, bottom, left, right = border
    flip = {"t": "b", "b": "t", "l": "r", "r": "l"}
    c = acq.marker_corner
    for corner in (c, c[0] + flip[c[1]], flip[c[0]] + c[1], flip[c[0]] + flip[c[1]]):
        y0 = top + margin if corner[0] == "t" else size - bottom - margin - bh
        x0 = left + margin if corner[1] == "l" else size - right - margin - bw
        y0, x0 = min(max(y0, 0), size - bh), min(max(x0, 0), size - bw)
        if finding_mask is None or not finding_mask[y0:y0 + bh, x0:x0 + bw].any():
            v[y0:y0 + bh, x0:x0 + bw] = np.where(box, 1.0, 0.0)
            return
