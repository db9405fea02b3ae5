"""Do SDEdit and DDIB bring other sites closer to the reference site, and at what cost in
structure? Fidelity table against paired ground truth plus the faithfulness curves.

On the synthetic benchmark (same synth and patient split as eval/cyclegan_fidelity.py):
train the quick diffusion priors on the train half (DDIB mode: one prior per site, each on
its own images; SDEdit uses the reference prior of the same run), harmonize the test
half with `apply_translator` (files in, files out) by identity, histogram matching, SDEdit,
DDIB and, given --cyclegan DIR, CycleGAN, and score every non-reference test image
against its reference rendering (SSIM / PSNR in model space, mean and 95% bootstrap CI,
per method and per site, paired differences to identity). Then the faithfulness knob on
a subset: SSIM to the truth (realism in the reference style, on the right anatomy) and
SSIM to the (polarity-corrected) input (structure kept) versus SDEdit t0, DDIM steps and
DDIB depth, and the DDIM inversion -> generation reconstruction error. CPU by default.

    python eval/diffusion_fidelity.py --out eval_out/diffusion_fidelity
    python eval/diffusion_fidelity.py --cyclegan eval_out/cyclegan_fidelity/cyclegan_run/model

Writes OUT/fidelity.csv (per image and method), OUT/curve.csv, OUT/fidelity.json
(summary, curves, timings, config), OUT/curve.png; prints the tables.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting stall each other 10-30x when the cores are shared
# (measured here: a 2-thread training step went from 0.26 s to 20 s next to another job);
# passive waiting costs nothing measurable alone. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
from pathlib import Path

import torch

from harmonize.configs import ConfigError, parse_override
from harmonize.evaluation.translator_fidelity import diffusion_fidelity, print_diffusion_tables

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval_out/diffusion_fidelity")
    p.add_argument("--config", default=str(ROOT / "configs/diffusion/quick.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cyclegan", default=None, help="a CycleGAN checkpoint to compare with "
                   "(trained on the same train split, e.g. by eval/cyclegan_fidelity.py)")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--per-site", type=int, default=80)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curve-images", type=int, default=8, help="test images per site for "
                   "the curves (0: no curves)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = diffusion_fidelity(
            args.out, config=args.config,
            overrides=dict(parse_override(s) for s in args.overrides), cyclegan=args.cyclegan,
            sites=args.sites, per_site=args.per_site, size=args.size, seed=args.seed,
            curve_images=args.curve_images, progress=not args.quiet)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    print_diffusion_tables(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
