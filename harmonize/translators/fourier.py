"""Fourier-amplitude harmonization: swap the low-frequency amplitude spectrum.

After FDA (Yang & Soatto 2020), FedDG's amplitude-spectrum interpolation (Liu et al.
2021) and HarmoFL (Jiang et al. 2022). Site style (exposure, contrast, large-scale
shading) lives mostly in the amplitude of the lowest spatial frequencies; anatomy and
edges live mostly in the phase. So keep each image's phase and move the amplitude of
a small centred block of low frequencies (DC included) towards the reference site's.

Sites differ in image size, so everything is in cycles per image and the FFT is
normalised by the number of pixels (the DC term is then the mean intensity, whatever
the size). fit: resize every reference image to ``grid`` x ``grid`` (antialiased) and
average the amplitude of the block of half-width ``L = max(1, round(beta * grid))``
cycles per image. transform: per image, ``A <- (1 - strength) * A + strength * A_ref``
on that same block (``strength=1`` is FDA's replacement), keep the phase, inverse FFT,
real part. The change is additive, so outputs can leave [0, 1] (brightening a dark
site pushes its brightest anatomy above 1); nothing is clipped here, the intensity
policy clips on write. Amplitudes cannot undo an inverted grey scale, so with
``polarity="auto"`` images that anti-correlate with the reference site's mean
thumbnail are flipped first (see `polarity`). Images of the reference site pass
through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from harmonize.data import polarity as pol
from harmonize.translators.base import FittedTranslator


class FourierAmplitudeMatching(FittedTranslator):
    kind = "fourier"

    def __init__(self, beta: float = 0.01, strength: float = 1.0, grid: int = 256,
                 polarity: Literal["auto", "keep"] = "auto", policy=None) -> None:
        super().__init__(policy)
        self.beta = beta
        self.strength = strength
        self.grid = grid
        self.polarity = polarity

    def check_params(self) -> None:
        if not 0 < self.beta < 0.5:
            raise ValueError(f"beta={self.beta}: expected 0 < beta < 0.5 (fraction of the side)")
        if not 0 <= self.strength <= 1:
            raise ValueError(f"strength={self.strength}: expected 0..1")
        if self.polarity not in ("auto", "keep"):
            raise ValueError(f"polarity='{self.polarity}': use 'auto' or 'keep'")
        if 2 * self.half_width + 1 > self.grid:
            raise ValueError(f"grid={self.grid} is smaller than the {2 * self.half_width + 1}"
                             f"-wide low-frequency block (beta={self.beta})")

    @property
    def fit_uses_all_sites(self) -> bool:
        return False

    @property
    def half_width(self) -> int:
        """L: the block spans -L..L cycles per image along each axis."""
        return max(1, round(self.beta * self.grid))

    def fit(self, images: Iterable[tuple[np.ndarray, str]], reference_site: str):
        self.check_params()
        amplitudes, thumbs = [], []
        for image, site in images:
            if site != reference_site:
                continue
            thumbs.append(pol.thumbnail(image))
            x = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
            x = F.interpolate(x, size=(self.grid, self.grid), mode="bilinear",
                              align_corners=False, antialias=True)[0, 0]
            amplitudes.append(np.abs(self._block(_spectrum(x.numpy()))))
        if not amplitudes:
            raise ValueError(f"no images of the reference site '{reference_site}' to fit on")
        self.reference_amplitude_ = np.mean(amplitudes, axis=0)
        self.template_ = np.mean(thumbs, axis=0)
        self.reference_site_ = reference_site
        return self

    def _index(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Row/column indices of the centred block (DC in the middle) in an unshifted
        FFT: frequencies -L..L wrap around to the end of the array."""
        L = self.half_width
        if min(shape) < 2 * L + 1:
            raise ValueError(f"image of size {shape[0]}x{shape[1]} is too small for the "
                             f"{2 * L + 1}x{2 * L + 1} low-frequency block (beta={self.beta},"
                             f" grid={self.grid}): need at least {2 * L + 1} pixels a side")
        k = np.arange(-L, L + 1)
        return np.ix_(k % shape[0], k % shape[1])

    def _block(self, spectrum: np.ndarray) -> np.ndarray:
        return spectrum[self._index(spectrum.shape)]

    def transform(self, images: Sequence[np.ndarray], sites: Sequence[str | None] | None = None):
        self.check_fitted()
        out, todo, arrays, _ = self._split_batch(images, sites)
        for k, image in zip(todo, arrays, strict=True):
            index = self._index(image.shape)  # fails early on too small an image
            spectrum = _spectrum(image)  # already upright
            block = spectrum[index]
            amplitude = ((1 - self.strength) * np.abs(block)
                         + self.strength * self.reference_amplitude_)
            spectrum[index] = amplitude * np.exp(1j * np.angle(block))
            y = np.fft.ifft2(spectrum, norm="forward").real
            out[k] = y.astype(np.float32)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"reference_amplitude": torch.from_numpy(self.reference_amplitude_),
                "template": torch.from_numpy(self.template_)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], config: dict) -> None:
        self.reference_amplitude_ = tensors["reference_amplitude"].numpy()
        self.template_ = tensors["template"].numpy()


def _spectrum(x: np.ndarray) -> np.ndarray:
    """2-D FFT normalised by the pixel count (DC = mean), unshifted."""
    return np.fft.fft2(x, norm="forward")
