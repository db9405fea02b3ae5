"""Train a CycleGAN translator: `accelerate launch recipes/train_cyclegan.py --config ...`.

The same code as `harmonize train cyclegan` (the flags are shared; `--kind cut` or
`--kind histogram-residual` for those configs); accelerate adds devices, processes and
mixed precision. Example:

    accelerate launch recipes/train_cyclegan.py --config configs/cyclegan/default.yaml \
        --data data/synth/manifest.csv --reference-site site_a --out runs/cg
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting stall each other 10-30x when the cores are shared;
# passive waiting costs nothing measurable alone. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys

from harmonize.recipe import recipe_main
from harmonize.translators.cyclegan.command import (
    EXAMPLE,
    KINDS,
    add_train_arguments,
    run_from_args,
)


def add_arguments(parser):
    parser.add_argument("--kind", choices=sorted(KINDS), default="cyclegan",
                        help="what the config trains (as `harmonize train KIND`)")
    return add_train_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    return recipe_main(__doc__, "train_cyclegan", add_arguments, run_from_args, EXAMPLE, argv)


if __name__ == "__main__":
    sys.exit(main())
