"""Train a downstream classifier: `accelerate launch recipes/train_classifier.py --config ...`.

The same code as `harmonize train classifier` (the flags are shared); accelerate adds
devices, processes and mixed precision. Example:

    accelerate launch recipes/train_classifier.py --config configs/classifier/quick.yaml \
        --data data/synth/manifest.csv --out runs/clf
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting stall each other 10-30x when the cores are shared;
# passive waiting costs nothing measurable alone. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys

from harmonize.classify.command import EXAMPLE, add_train_arguments, run_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"example:\n  {EXAMPLE}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"train_classifier: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
