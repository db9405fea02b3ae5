"""Diffusion translator: SDEdit and DDIB with `diffusers` UNet priors.

Train with `train_diffusion(load_config(path, overrides))` (what `harmonize train
diffusion` and `accelerate launch recipes/train_diffusion.py` run); apply with
`harmonize.translators.load_translator(OUT / "model")`. The loops are in `sampling`.
"""

from harmonize.translators.diffusion.config import ConfigError, DiffusionConfig, load_config
from harmonize.translators.diffusion.translator import DiffusionTranslator

__all__ = ["ConfigError", "DiffusionConfig", "DiffusionTranslator", "load_config",
           "train_diffusion"]


def train_diffusion(config: DiffusionConfig):
    """Train (or resume) diffusion priors from a validated config; returns OUT/model."""
    from harmonize.translators.diffusion.train import train_diffusion as _train

    return _train(config)
