"""`harmonize train cyclegan|cut|histogram-residual` and `recipes/train_cyclegan.py`: the
shared training flags (`harmonize.training.command`); no kind has flags of its own. All run
`train_cyclegan`: a config with a `landmarks` section trains the histogram-residual
translator (histogram matching, then a residual generator trained on its output), one
with `loss.objective: patchnce` CUT (`train_cut`)."""

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
EXAMPLE_CUT = ("harmonize train cut --config configs/cut/quick.yaml --data "
               "data/synth/manifest.csv --reference-site site_a --out runs/cut")
KINDS = {
    "cyclegan": "CycleGAN: any site -> reference site (accelerate)",
    "histogram-residual": "histogram matching, then a residual generator trained "
                          "adversarially on its output (starts at histogram matching)",
    "cut": "CUT: one generator, adversarial + PatchNCE (no cycle)",
}
EXAMPLES = {"cyclegan": EXAMPLE, "histogram-residual": EXAMPLE_RESIDUAL, "cut": EXAMPLE_CUT}
# what `harmonize train KIND` without --config adds to the built-in defaults
KIND_DEFAULTS = {"histogram-residual": {"landmarks.per": "image", "model.residual": "additive"},
                 "cut": {"loss.objective": "patchnce"}}
CONFIG_HINT = {"histogram-residual": "configs/histogram_residual/quick.yaml",
               "cut": "configs/cut/quick.yaml", "cyclegan": "configs/cyclegan/quick.yaml"}


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return command.add_common_arguments(parser, "cyclegan", "model.ngf=32")


def config_from_args(args: argparse.Namespace, kind: str = "cyclegan") -> CycleGANConfig:
    """The validated config, which must train `kind` (a histogram-residual config may use
    either objective)."""
    if args.config is None and kind in KIND_DEFAULTS:
        config = command.config_from_args(args, load_config, KIND_DEFAULTS[kind])
    else:
        config = command.config_from_args(args, load_config)
    if config.kind != kind:
        what = {"histogram-residual": "has no landmarks section",
                "cut": "has loss.objective: cycle"}.get(kind, f"trains {config.kind}")
        raise ConfigError(f"{args.config} {what}, so it trains {config.kind}, not {kind}: use "
                          f"{CONFIG_HINT[kind]}, or harmonize train {config.kind} for this "
                          "config")
    return config


def run_from_args(args: argparse.Namespace) -> int:
    """Validate, train, print where the checkpoint is; errors propagate as ValueError."""
    from harmonize.translators.cyclegan.train import train_cyclegan

    config = config_from_args(args, getattr(args, "kind", "cyclegan"))
    command.report_saved(config.kind, train_cyclegan(config))
    return 0
