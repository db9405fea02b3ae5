"""CycleGAN translator: networks, config, the training loop and tiled inference.

Train with `train_cyclegan(load_config(path, overrides))` (what `harmonize train cyclegan`
and `accelerate launch recipes/train_cyclegan.py` run); apply with
`harmonize.translators.load_translator(OUT / "model")`.
"""

from harmonize.translators.cyclegan.config import (
    ConfigError,
    CycleGANConfig,
    load_config,
)
from harmonize.translators.cyclegan.translator import CycleGANTranslator

__all__ = ["ConfigError", "CycleGANConfig", "CycleGANTranslator", "load_config",
           "train_cyclegan"]


def train_cyclegan(config: CycleGANConfig):
    """Train (or resume) a CycleGAN from a validated config; returns OUT/model."""
    from harmonize.translators.cyclegan.train import train_cyclegan as _train

    return _train(config)
