"""`harmonize train diffusion` and `recipes/train_diffusion.py`: the shared training flags
(`harmonize.training.command`) plus the diffusion mode and conditioning."""

from __future__ import annotations

import argparse

from harmonize.training import command
from harmonize.translators.diffusion.config import DiffusionConfig, load_config

EXAMPLE = ("harmonize train diffusion --config configs/diffusion/quick.yaml "
           "--data data/synth/manifest.csv --reference-site site_a --mode ddib --out runs/ddib")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    command.add_common_arguments(parser, "diffusion", "inference.sdedit_t0=0.4")
    parser.add_argument("--mode", choices=["sdedit", "ddib"], default=None,
                        help="inference.mode: sdedit trains the reference site's prior only; "
                             "ddib one prior per site (each on its own images)")
    parser.add_argument("--site-conditioned", action="store_true",
                        help="one prior for all sites with the site as class label "
                             "(model.conditioning=site-conditioned)")
    return parser


def config_from_args(args: argparse.Namespace) -> DiffusionConfig:
    return command.config_from_args(args, load_config, {
        "inference.mode": args.mode,
        "model.conditioning": "site-conditioned" if args.site_conditioned else None})


def run_from_args(args: argparse.Namespace) -> int:
    """Validate, train, print where the checkpoint is; errors propagate as ValueError."""
    from harmonize.translators.diffusion.train import train_diffusion

    config = config_from_args(args)
    command.report_saved(f"diffusion ({config.inference.mode})", train_diffusion(config))
    return 0
