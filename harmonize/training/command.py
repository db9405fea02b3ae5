"""Command-line flags every translator training shares (`harmonize train cyclegan|diffusion`
and `recipes/train_*.py`), so the CLI and the `accelerate launch` recipes run the same code
with the same flags. Flags override the config file; only flags actually given count."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from harmonize.configs import with_overrides


def add_common_arguments(parser: argparse.ArgumentParser, kind: str,
                         set_example: str) -> argparse.ArgumentParser:
    """--config --data --reference-site --out --steps --batch-size --seed
    --mixed-precision --resume --set; `kind` names the configs/ folder."""
    parser.add_argument("--config", default=None,
                        help=f"YAML config, e.g. configs/{kind}/quick.yaml (default: built-in "
                             "defaults = the full-size model)")
    parser.add_argument("--data", default=None, help="manifest CSV (data.manifest)")
    parser.add_argument("--reference-site", default=None, help="data.reference_site")
    parser.add_argument("--out", default=None, help="run folder (train.out); the checkpoint "
                        "goes to OUT/model")
    parser.add_argument("--steps", type=int, default=None, help="train.steps")
    parser.add_argument("--batch-size", type=int, default=None, help="train.batch_size")
    parser.add_argument("--seed", type=int, default=None, help="train.seed")
    parser.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"],
                        default=None, help="train.mixed_precision (auto: bf16 where native)")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help=f"any config value, e.g. --set {set_example} "
                        "(repeatable)")
    return parser


def config_from_args(args: argparse.Namespace, load_config: Callable,
                     extra: dict[str, Any] | None = None):
    """The validated config: file, then the common flags and `extra` overrides, then --set."""
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
        **(extra or {}),
    }
    return load_config(args.config, with_overrides(overrides, args.overrides))


def report_saved(kind: str, model_dir) -> None:
    """One line on the main process (not one per process under accelerate launch)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"saved {kind} translator to {model_dir} "
              f"(apply: harmonize apply --model {model_dir} IN OUT)")
