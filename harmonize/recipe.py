"""The body every `accelerate launch recipes/train_*.py` script shares: parse the same
flags as `harmonize train <kind>`, run, print errors on one line with exit code 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from harmonize.training.process_exit import end_process


def recipe_main(doc: str, name: str, add_arguments: Callable, run: Callable,
                example: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"example:\n  {example}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        code = run(args)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"{name}: error: {' '.join(str(err).split())}", file=sys.stderr)
        code = 1
    return end_process(code)  # under torchrun: os._exit, skipping Python's finalization
