"""Command-line arguments for diffusion training, shared by `harmonize train diffusion` and
`recipes/train_diffusion.py`, so both run the same code with the same flags.

Flags override the config file; only flags actually given count.
"""

from __future__ import annotations

import argparse

from harmonize.configs import with_overrides
from harmonize.translators.diffusion.config import DiffusionConfig, load_config

EXAMPLE = ("harmonize train diffusion --config configs/diffusion/quick.yaml "
           "--data data/synth/manifest.csv --reference-site site_a --mode ddib --out runs/ddib")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", default=None,
                        help="YAML config, e.g. configs/diffusion/quick.yaml (default: built-in "
                             "defaults = the full-size model)")
    parser.add_argument("--data", default=None, help="manifest CSV (data.manifest)")
    parser.add_argument("--reference-site", default=None, help="data.reference_site")
    parser.add_argument("--mode", choices=["sdedit", "ddib"], default=None,
                        help="inference.mode: sdedit trains the reference site's prior only; "
                             "ddib one prior per site (each on its own images)")
    parser.add_argument("--site-conditioned", action="store_true",
                        help="one prior for all sites with the site as class label "
                             "(model.conditioning=site-conditioned)")
    parser.add_argument("--out", default=None, help="run folder (train.out); the checkpoint "
                        "goes to OUT/model")
    parser.add_argument("--steps", type=int, default=None, help="train.steps")
    parser.add_argument("--batch-size", type=int, default=None, help="train.batch_size")
    parser.add_argument("--seed", type=int, default=None, help="train.seed")
    parser.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"],
                        default=None, help="train.mixed_precision")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="any config value, e.g. --set "
                        "inference.sdedit_t0=0.4 (repeatable)")
    return parser


def config_from_args(args: argparse.Namespace) -> DiffusionConfig:
    overrides = {
        "data.manifest": args.data,
        "data.reference_site": args.reference_site,
        "inference.mode": args.mode,
        "model.conditioning": "site-conditioned" if args.site_conditioned else None,
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
    from accelerate import PartialState

    from harmonize.translators.diffusion.train import train_diffusion

    config = config_from_args(args)
    model_dir = train_diffusion(config)
    if PartialState().is_main_process:  # one line, not one per process
        print(f"saved diffusion translator ({config.inference.mode}) to {model_dir} "
              f"(apply: harmonize apply --model {model_dir} IN OUT)")
    return 0
