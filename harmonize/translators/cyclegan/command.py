"""Command-line arguments for CycleGAN training, shared by `harmonize train cyclegan` and
`recipes/train_cyclegan.py`, so both run the same code with the same flags.

Flags override the config file; only flags actually given count.
"""

from __future__ import annotations

import argparse
import os

from harmonize.configs import with_overrides
from harmonize.translators.cyclegan.config import load_config

EXAMPLE = ("harmonize train cyclegan --config configs/cyclegan/quick.yaml "
           "--data data/synth/manifest.csv --reference-site site_a --out runs/cg")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", default=None,
                        help="YAML config, e.g. configs/cyclegan/quick.yaml (default: built-in "
                             "defaults = the reference architecture)")
    parser.add_argument("--data", default=None, help="manifest CSV (data.manifest)")
    parser.add_argument("--reference-site", default=None, help="data.reference_site")
    parser.add_argument("--out", default=None, help="run folder (train.out); the checkpoint "
                        "goes to OUT/model")
    parser.add_argument("--steps", type=int, default=None, help="train.steps")
    parser.add_argument("--batch-size", type=int, default=None, help="train.batch_size")
    parser.add_argument("--seed", type=int, default=None, help="train.seed")
    parser.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"],
                        default=None, help="train.mixed_precision")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="any config value, e.g. --set model.ngf=32 "
                        "(repeatable)")
    return parser


def config_from_args(args: argparse.Namespace):
    overrides = {
        "data.manifest": args.data,
        "data.reference_site": args.reference_site,
        "train.out": args.out,
        "train.steps": args.steps,
        "train.batch_size": args.batch_size,
        "train.seed": args.seed,
        "train.mixed_precision": args.mixed_precision,
        "train.resume": True if args.resume else None,
        "train.progress": False if getattr(args, "quiet", False) else None,
    }
    return load_config(args.config, with_overrides(overrides, args.overrides))


def run_from_args(args: argparse.Namespace) -> int:
    """Validate, train, print where the checkpoint is; errors propagate as ValueError."""
    from harmonize.translators.cyclegan.train import train_cyclegan

    config = config_from_args(args)
    model_dir = train_cyclegan(config)
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        print(f"saved cyclegan translator to {model_dir} "
              f"(apply: harmonize apply --model {model_dir} IN OUT)")
    return 0
