"""Command-line arguments shared by `harmonize train classifier` and
`accelerate launch recipes/train_classifier.py` (same code, same flags)."""

from __future__ import annotations

import argparse
import os

from harmonize.classify.config import load_config
from harmonize.configs import with_overrides

EXAMPLE = ("harmonize train classifier --config configs/classifier/quick.yaml "
           "--data data/synth/manifest.csv --out runs/clf")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", default=None,
                        help="YAML config, e.g. configs/classifier/quick.yaml")
    parser.add_argument("--data", default=None, help="manifest CSV (data.manifest)")
    parser.add_argument("--out", default=None, help="run folder (train.out); the checkpoint "
                        "goes to OUT/model")
    parser.add_argument("--arch", default=None, help="model.arch: cnn, resnet18, densenet121, "
                        "vit")
    parser.add_argument("--weights", default=None, help="local safetensors to start from")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs")
    parser.add_argument("--augment", nargs="?", const="plain", default=None,
                        choices=["plain", "acquisition"],
                        help="augmentation: plain (the default with the bare flag) or "
                        "acquisition (simulated X-ray system differences)")
    parser.add_argument("--seed", type=int, default=None, help="train.seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="any config value, e.g. --set "
                        "data.image_size=128 (repeatable)")
    return parser


def config_from_args(args: argparse.Namespace):
    overrides = {
        "data.manifest": args.data, "train.out": args.out, "model.arch": args.arch,
        "model.weights": args.weights, "train.epochs": args.epochs,
        "train.augment": args.augment, "train.seed": args.seed,
        "train.progress": False if getattr(args, "quiet", False) else None,
    }
    return load_config(args.config, with_overrides(overrides, args.overrides))


def run_from_args(args: argparse.Namespace) -> int:
    from harmonize.classify.train import train_classifier

    model_dir = train_classifier(config_from_args(args))
    if os.environ.get("RANK", "0") == "0":
        print(f"saved classifier to {model_dir}")
    return 0
