"""`harmonize train cyclegan` and `recipes/train_cyclegan.py`: the shared training flags
(`harmonize.training.command`); CycleGAN has no flags of its own."""

from __future__ import annotations

import argparse

from harmonize.training import command
from harmonize.translators.cyclegan.config import CycleGANConfig, load_config

EXAMPLE = ("harmonize train cyclegan --config configs/cyclegan/quick.yaml "
           "--data data/synth/manifest.csv --reference-site site_a --out runs/cg")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return command.add_common_arguments(parser, "cyclegan", "model.ngf=32")


def config_from_args(args: argparse.Namespace) -> CycleGANConfig:
    return command.config_from_args(args, load_config)


def run_from_args(args: argparse.Namespace) -> int:
    """Validate, train, print where the checkpoint is; errors propagate as ValueError."""
    from harmonize.translators.cyclegan.train import train_cyclegan

    command.report_saved("cyclegan", train_cyclegan(config_from_args(args)))
    return 0
