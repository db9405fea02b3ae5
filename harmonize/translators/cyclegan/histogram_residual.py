"""Histogram matching, then a learned residual: a translator that starts where histogram
matching ends.

transform, per image: collimation borders and burned-in markers inpainted first (with
``fingerprints="remove"``, `harmonize.data.fingerprints`), then the monotone landmark
mapping of `HistogramMatching` (per image or per site, polarity guard included), then a
ResNet generator that adds a correction, ``y = x_hm + r(x_hm)``, tiled at native
resolution like the CycleGAN. The generator's last layer starts at zero
(`ResnetGenerator(residual="additive")`), so the untrained translator *is* histogram
matching; training (the CycleGAN objective of `train.py` on the mapped images: adversarial
against the reference site, cycle through a site-conditioned reverse generator) adds only
what a mapping of intensities cannot: noise texture, sharpness, borders, markers. The
checkpoint holds both: landmarks and generator weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from harmonize.data.fingerprints import remove_fingerprints
from harmonize.translators.cyclegan.networks import init_weights
from harmonize.translators.cyclegan.translator import CycleGANTranslator
from harmonize.translators.histogram import HistogramMatching


class HistogramResidualTranslator(CycleGANTranslator):
    kind = "histogram-residual"
    # the generator's input is the landmark mapping's output, which the mapping's own
    # polarity guard made upright; checked again after the contrast change, an image with
    # a large dark field (real Montgomery films) anti-correlated and came out inverted
    inputs_upright = True

    def __init__(self, ngf: int = 64, n_blocks: int = 9, upsample: str = "nearest",
                 residual: bool | str = "additive", tile_size: int = 256,
                 tile_overlap: float = 0.25, batch_size: int = 8,
                 precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
                 polarity: Literal["auto", "keep"] = "auto", passthrough_reference: bool = True,
                 train_load_size: int | None = None, landmarks_per: str = "image",
                 n_quantiles: int = 256, fingerprints: Literal["keep", "remove"] = "keep",
                 device: str = "auto", policy=None) -> None:
        super().__init__(ngf=ngf, n_blocks=n_blocks, upsample=upsample, residual=residual,
                         tile_size=tile_size, tile_overlap=tile_overlap, batch_size=batch_size,
                         precision=precision, polarity=polarity,
                         passthrough_reference=passthrough_reference,
                         train_load_size=train_load_size, device=device, policy=policy)
        self.landmarks_per = landmarks_per
        self.n_quantiles = n_quantiles
        self.fingerprints = fingerprints

    def check_params(self) -> None:
        super().check_params()
        if self.residual != "additive":
            raise ValueError(f"residual={self.residual!r}: the histogram-residual translator "
                             "needs 'additive' (it starts at histogram matching)")
        if self.fingerprints not in ("keep", "remove"):
            raise ValueError(f"fingerprints='{self.fingerprints}': use 'keep' or 'remove'")
        self.landmark_mapping().check_params()

    def landmark_mapping(self) -> HistogramMatching:
        """An unfitted `HistogramMatching` with this translator's landmark settings."""
        return HistogramMatching(n_quantiles=self.n_quantiles, per=self.landmarks_per,
                                 polarity=self.polarity, policy=self.policy)

    def set_trained(self, generator, template: np.ndarray, reference_site: str,
                    landmarks: HistogramMatching | None = None) -> HistogramResidualTranslator:
        """Adopt a generator trained on `landmarks`' output (a fitted HistogramMatching)."""
        if landmarks is None or landmarks.reference_site_ != reference_site:
            raise ValueError("set_trained needs the HistogramMatching fitted for the same "
                             "reference site that the generator was trained after")
        self.landmarks_ = landmarks
        return super().set_trained(generator, template, reference_site)

    def at_start(self) -> HistogramResidualTranslator:
        """A copy whose generator is the untrained one (residual zero): what this
        translator was at step 0, i.e. fingerprint removal (if on) and histogram matching."""
        start = type(self)(**self.get_params())
        g = init_weights(start.build_generator())
        return start.set_trained(g, self.template_, self.reference_site_, self.landmarks_)

    def transform(self, images: Sequence[np.ndarray], sites: Sequence[str | None] | None = None
                  ) -> list[np.ndarray]:
        self.check_fitted()
        if self.fingerprints == "remove":  # every image, the reference site's too
            images = [remove_fingerprints(x)[0] for x in images]
        mapped = self.landmarks_.transform(images, sites)  # upright (polarity guard)
        return super().transform(mapped, sites)

    # --- persistence ----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().state_tensors()
        tensors.update({f"landmarks.{k}": v for k, v in self.landmarks_.state_tensors().items()})
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], config: dict) -> None:
        super().load_state_tensors(tensors, config)
        hm = self.landmark_mapping()
        hm.load_state_tensors({k.removeprefix("landmarks."): v for k, v in tensors.items()
                               if k.startswith("landmarks.")}, {})
        hm.reference_site_ = self.reference_site_
        self.landmarks_ = hm
