"""Translators: every kind behind one fit/transform/save/load interface."""

from __future__ import annotations

from pathlib import Path

from harmonize.checkpoint import CheckpointError, checkpoint_kind
from harmonize.translators.base import NotFittedError, Translator
from harmonize.translators.cyclegan import CycleGANTranslator
from harmonize.translators.cyclegan.histogram_residual import HistogramResidualTranslator
from harmonize.translators.cyclegan.translator import CUTTranslator
from harmonize.translators.diffusion import DiffusionTranslator
from harmonize.translators.fingerprints import FingerprintRemoval
from harmonize.translators.fourier import FourierAmplitudeMatching
from harmonize.translators.histogram import HistogramMatching
from harmonize.translators.identity import IdentityTranslator
from harmonize.translators.texture import TextureMatching

TRANSLATORS: dict[str, type[Translator]] = {
    cls.kind: cls
    for cls in (IdentityTranslator, HistogramMatching, CycleGANTranslator, CUTTranslator,
                HistogramResidualTranslator, DiffusionTranslator, FourierAmplitudeMatching,
                FingerprintRemoval, TextureMatching)
}
BUILTIN_UNFITTED = {"identity", "fingerprints"}


def load_translator(spec: str | Path) -> Translator:
    """A checkpoint directory of any kind, or the name of a translator that needs no
    training ('identity')."""
    if str(spec) in BUILTIN_UNFITTED and not Path(spec).exists():
        return TRANSLATORS[str(spec)]()
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(
            f"{spec}: no such checkpoint directory (or built-in name: "
            f"{', '.join(sorted(BUILTIN_UNFITTED))})"
        )
    kind = checkpoint_kind(path)
    if kind not in TRANSLATORS:
        raise CheckpointError(f"{path}: unknown translator kind '{kind}'; "
                              f"this version knows {', '.join(sorted(TRANSLATORS))}")
    return TRANSLATORS[kind].load(path)


__all__ = ["TRANSLATORS", "Translator", "NotFittedError", "load_translator",
           "HistogramMatching", "IdentityTranslator", "CycleGANTranslator",
           "DiffusionTranslator", "FourierAmplitudeMatching", "HistogramResidualTranslator",
           "FingerprintRemoval", "CUTTranslator", "TextureMatching"]
