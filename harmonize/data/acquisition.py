"""Two acquisition differences MONAI has no transform for (used by
`harmonize.data.transforms.acquisition_augmentation`): quantum noise and collimation.
MONAI Randomizable transforms, so a Compose seeds them with the rest."""

from __future__ import annotations

import torch
from monai.transforms import RandomizableTransform


class RandQuantumNoise(RandomizableTransform):
    """Signal-dependent noise of a photon-counting detector: sd grows with sqrt(signal),
    sd_at_mid_grey (a range) at intensity 0.5."""

    def __init__(self, prob: float = 0.5, sd_at_mid_grey: tuple[float, float] = (0.005, 0.04)):
        super().__init__(prob)
        self.range = sd_at_mid_grey
        self.sd = self.range[0]

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.sd = self.R.uniform(*self.range)

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        x = torch.as_tensor(img).as_subclass(torch.Tensor)
        noise = torch.as_tensor(self.R.standard_normal(tuple(x.shape)), dtype=x.dtype)
        return x + noise * self.sd * torch.sqrt(x.clamp(0, 1) / 0.5)


class RandCollimation(RandomizableTransform):
    """Collimation / shutter borders: up to max_fraction of the side on each edge set to
    black or white, as different systems crop and mask the field differently."""

    def __init__(self, prob: float = 0.3, max_fraction: float = 0.08):
        super().__init__(prob)
        self.max_fraction = max_fraction
        self.edges, self.value = (0.0,) * 4, 0.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.edges = tuple(self.R.uniform(0, self.max_fraction, 4))
        self.value = float(self.R.choice([0.0, 1.0]))

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        x = torch.as_tensor(img).as_subclass(torch.Tensor).clone()
        h, w = x.shape[-2:]
        top, bottom, left, right = (int(f * n) for f, n in zip(self.edges, (h, h, w, w),
                                                                strict=True))
        x[..., :top, :] = self.value
        x[..., h - bottom:, :] = self.value
        x[..., :, :left] = self.value
        x[..., :, w - right:] = self.value
        return x
