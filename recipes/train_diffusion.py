"""Train diffusion priors for SDEdit / DDIB: `accelerate launch recipes/train_diffusion.py`.

The same code as `harmonize train diffusion` (the flags are shared); accelerate adds
devices, processes and mixed precision. Example:

    accelerate launch recipes/train_diffusion.py --config configs/diffusion/default.yaml \
        --data data/synth/manifest.csv --reference-site site_a --mode ddib --out runs/ddib
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting stall each other 10-30x when the cores are
# shared; passive waiting costs nothing measurable alone. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys

from harmonize.recipe import recipe_main
from harmonize.translators.diffusion.command import EXAMPLE, add_train_arguments, run_from_args


def main(argv: list[str] | None = None) -> int:
    return recipe_main(__doc__, "train_diffusion", add_train_arguments, run_from_args, EXAMPLE,
                       argv)


if __name__ == "__main__":
    sys.exit(main())
