"""The do-nothing translator: the baseline every harmonizer is compared with, and a
check that reading and writing alone change no pixel."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from harmonize.translators.base import FittedTranslator


class IdentityTranslator(FittedTranslator):
    kind = "identity"
    needs_fit = False

    def fit(self, images: Iterable[tuple[np.ndarray, str]], reference_site: str):
        self.reference_site_ = reference_site
        return self

    def transform(self, images: Sequence[np.ndarray], sites=None) -> list[np.ndarray]:
        return [np.asarray(x, dtype=np.float32) for x in images]

    def save(self, directory, metadata=None):
        if self.reference_site_ is None:
            self.reference_site_ = "any"
        return super().save(directory, metadata)
