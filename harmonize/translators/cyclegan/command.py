"""`harmonize train cyclegan|histogram-residual` and `recipes/train_cyclegan.py`: the shared
training flags (`harmonize.training.command`); neither kind has flags of its own. Both run
`train_cyclegan`: a config with a `landmarks` section trains the histogram-residual
translator (histogram matching, then a residual generator trained on its output)."""

from __future__ import annotations

import argparse

from harmonize.configs import ConfigError
from harmonize.training import command
from harmonize.translators.cyclegan.config import CycleGANConfig, load_config

EXAMPLE = ("harmonize train cyclegan --config configs/cyclegan/quick.yaml "
           "--data data/synth/manifest.csv --reference-site site_a --out runs/cg")
EXAMPLE_RESIDUAL = ("harmonize train histogram-residual --config "
                    "configs/histogram_residual/quick.yaml --data data/synth/manifest.csv "
                    "--reference-site site_a --out runs/hr")
# what `harmonize train histogram-residual` adds to a config without a landmarks section
RESIDUAL_DEFAULTS = {"landmarks.per": "image", "model.residual": "additive"}


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return command.add_common_arguments(parser, "cyclegan", "model.ngf=32")


def config_from_args(args: argparse.Namespace, kind: str = "cyclegan") -> CycleGANConfig:
    config = command.config_from_args(args, load_config)
    if kind == "histogram-residual" and config.landmarks is None:
        if args.config is not None:
            raise ConfigError(f"{args.config} has no landmarks section, so it trains a plain "
                              "CycleGAN: use configs/histogram_residual/quick.yaml, or "
                              "harmonize train cyclegan for this config")
        config = command.config_from_args(args, load_config, RESIDUAL_DEFAULTS)
    return config


def run_from_args(args: argparse.Namespace) -> int:
    """Validate, train, print where the checkpoint is; errors propagate as ValueError."""
    from harmonize.translators.cyclegan.train import train_cyclegan

    config = config_from_args(args, getattr(args, "kind", "cyclegan"))
    command.report_saved(config.kind, train_cyclegan(config))
    return 0
