"""Second-order image texture: radial power spectra and a model of fine-grained noise.

What an intensity mapping cannot change, and what radiomics texture features measure:
how sharp an image is and how its noise looks. Two tools, plain numpy:

- `radial_log_power`: the log power spectrum averaged over rings of equal spatial
  frequency (cycles per pixel, so images of any size compare), measured inside a
  region (tapered, so the region's edge adds no power of its own). `radial_gain` turns
  two spectra into the zero-phase filter that moves one onto the other, and
  `apply_radial_gain` applies it (mirrored padding, so the image border adds no edge).
- `NoiseModel`: the fine band of a site's images (the image minus its Gaussian blur)
  summarized by its spectrum and by its robust standard deviation as a function of the
  blurred intensity (quantum noise grows with the signal). `sample` draws a new fine band with
  those statistics for any image: replacing an image's own fine band by a sample gives
  it the reference site's noise texture, whatever its own dose and detector.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

N_BINS = 48  # rings from 0 to the corner frequency; ~1.5 px-1 wide at 128 px
N_LEVELS = 16  # intensity levels of the noise model
TAPER_SIGMA = 2.0  # px: soft region edges in the spectrum estimate


def _ring_index(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(ring of each rfft2 coefficient, its radial frequency scaled so the corner is 1)."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    r = np.sqrt(fx**2 + fy**2) / np.sqrt(0.5)
    return np.minimum((r * N_BINS).astype(int), N_BINS - 1), r


RING_CENTERS = (np.arange(N_BINS) + 0.5) / N_BINS


def radial_log_power(x: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Log mean power per ring (N_BINS values) of `x` inside `region` (bool, default the
    whole image), after removing the region's mean; a Hann window times the softened
    region weighs the pixels."""
    x = np.asarray(x, dtype=np.float64)
    w = np.outer(np.hanning(x.shape[0]), np.hanning(x.shape[1]))
    if region is not None:
        w = w * ndimage.gaussian_filter(region.astype(np.float64), TAPER_SIGMA)
    centred = (x - (x * w).sum() / max(w.sum(), 1e-12)) * w
    # per unit of window energy: the level is the texture's, whatever the image's size
    # or the region's area and place
    power = np.abs(np.fft.rfft2(centred)) ** 2 / max(float((w**2).sum()), 1e-12)
    rings, _ = _ring_index(x.shape)
    total = np.bincount(rings.ravel(), power.ravel(), N_BINS)
    count = np.bincount(rings.ravel(), minlength=N_BINS)
    return np.log(total / np.maximum(count, 1) + 1e-20)


def radial_gain(source: np.ndarray, target: np.ndarray, max_gain: float = 16.0,
                keep_rings: int = 2) -> np.ndarray:
    """Amplitude gain per ring that gives `source`'s spectrum `target`'s (both log
    powers), clipped to [1/max_gain, max_gain]; the lowest `keep_rings` rings (the
    anatomy's overall shape and the mean) keep gain 1."""
    gain = np.exp(0.5 * (np.asarray(target) - np.asarray(source)))
    gain = np.clip(gain, 1.0 / max_gain, max_gain)
    gain[:keep_rings] = 1.0
    return gain


def apply_radial_gain(x: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """Filter `x` by a per-ring amplitude gain (zero phase: nothing moves)."""
    x = np.asarray(x, dtype=np.float64)
    pad = max(x.shape) // 4
    padded = np.pad(x, pad, mode="reflect")
    _, r = _ring_index(padded.shape)
    mean = padded.mean()
    spectrum = np.fft.rfft2(padded - mean) * np.interp(r, RING_CENTERS, gain)
    y = np.fft.irfft2(spectrum, s=padded.shape) + mean
    return y[pad:-pad, pad:-pad].astype(np.float32)


def robust_std(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: the std of the noise, not of the sparse
    edges (ribs, borders) that also live in the fine band."""
    if values.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


class NoiseModel:
    """The fine band (image minus its Gaussian blur of `sigma` px) of a set of images:
    its ring spectrum and its standard deviation per level of the blurred intensity."""

    def __init__(self, sigma: float = 1.0) -> None:
        self.sigma = sigma

    def split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(coarse, fine): the blurred image and what the blur removed."""
        coarse = ndimage.gaussian_filter(np.asarray(x, dtype=np.float64), self.sigma)
        return coarse, x - coarse

    def fit(self, images: Iterable[tuple[np.ndarray, np.ndarray]]) -> NoiseModel:
        """From (image, region) pairs: the fine band inside each region."""
        spectra, levels, fines = [], [], []
        for x, region in images:
            coarse, fine = self.split(x)
            spectra.append(radial_log_power(fine, region))
            levels.append(coarse[region])
            fines.append(fine[region])
        if not spectra:
            raise ValueError("a noise model needs at least one image")
        level, fine = np.concatenate(levels), np.concatenate(fines)
        self.log_power_ = np.mean(spectra, axis=0)
        edges = np.quantile(level, np.linspace(0.0, 1.0, N_LEVELS + 1))
        which = np.clip(np.searchsorted(edges, level, side="right") - 1, 0, N_LEVELS - 1)
        filled = [k for k in range(N_LEVELS) if np.any(which == k)]  # ties leave levels empty
        self.levels_ = 0.5 * (edges[1:] + edges[:-1])[filled]
        self.std_ = np.array([robust_std(fine[which == k]) for k in filled])
        return self

    def sample(self, coarse: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A fine band for an image whose blurred version is `coarse`: Gaussian noise
        shaped to the model's spectrum, scaled to its std at each pixel's level."""
        white = rng.standard_normal(coarse.shape)
        _, r = _ring_index(coarse.shape)
        amplitude = np.interp(r, RING_CENTERS, np.exp(0.5 * self.log_power_))
        shaped = np.fft.irfft2(np.fft.rfft2(white) * amplitude, s=coarse.shape)
        shaped /= shaped.std() + 1e-12
        return shaped * np.interp(coarse, self.levels_, self.std_)

    def state(self) -> dict[str, np.ndarray]:
        return {"log_power": self.log_power_, "levels": self.levels_, "std": self.std_}

    def load_state(self, state: dict[str, np.ndarray]) -> NoiseModel:
        self.log_power_ = np.asarray(state["log_power"], dtype=np.float64)
        self.levels_ = np.asarray(state["levels"], dtype=np.float64)
        self.std_ = np.asarray(state["std"], dtype=np.float64)
        return self
