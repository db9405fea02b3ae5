"""Fingerprint removal as a translator of its own: collimation borders and burned-in
markers inpainted (`harmonize.data.fingerprints`), nothing else changed.

Usable alone (`harmonize apply --model fingerprints IN OUT`, no training) and before a
trained translator (the histogram-residual translator's ``fingerprints="remove"``, which
its training applies to every image as well). It has no reference site and no learned
state: every image, of any site, is cleaned the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from harmonize.data.fingerprints import remove_fingerprints
from harmonize.translators.base import FittedTranslator


class FingerprintRemoval(FittedTranslator):
    kind = "fingerprints"
    needs_fit = False

    def fit(self, images: Iterable[tuple[np.ndarray, str]], reference_site: str):
        self.reference_site_ = reference_site
        return self

    def transform(self, images: Sequence[np.ndarray], sites=None) -> list[np.ndarray]:
        return [remove_fingerprints(x)[0] for x in images]

    def save(self, directory, metadata=None):
        if self.reference_site_ is None:
            self.reference_site_ = "any"
        return super().save(directory, metadata)
