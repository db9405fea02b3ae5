"""Does CycleGAN bring other sites closer to the reference site than histogram matching?

On the synthetic benchmark (paired reference renderings = ground truth): synthesize,
split by patient, train histogram matching and CycleGAN (a config, default quick; a
config with a `landmarks` section trains the histogram-residual translator instead, e.g.
configs/histogram_residual/quick.yaml) on the train half, harmonize the test half with
`apply_translator` (files in, files out, as a user would), and score every non-reference
test image against its reference rendering: SSIM and PSNR in model space, mean with 95%
bootstrap CIs, per method and per site, plus
the paired CycleGAN - histogram matching difference. CPU only by default.

    python eval/cyclegan_fidelity.py --out eval_out/cyclegan_fidelity
    python eval/cyclegan_fidelity.py --config configs/histogram_residual/quick.yaml \
        --sites 3 --seed 3 --out eval_out/hr_seed3
    python eval/cyclegan_fidelity.py --config configs/cyclegan/quick.yaml --set train.steps=500
    python eval/cyclegan_fidelity.py --config configs/histogram_residual/quick.yaml --sites 3 \
        --seed 10 --federated configs/federated/histogram-residual-quick.yaml \
        --set data.image_size=64 --set model.n_blocks=4 --set train.steps=300 \
        --set train.batch_size=2 --set train.select_fraction=0 --out eval_out/hr_fed_seed10

`--federated FEDCONFIG` also trains the federated form (Flower simulation, one node per
site, K local steps as FEDCONFIG says) on the same train half with the same translator
config and overrides (the source nodes' batch is the central batch over the source sites;
its rounds are the central steps), after a federated histogram release (the landmarks of
the histogram-residual kind; for every kind the reference thumbnail that lets the nodes
flip inverted exports, as central training does), and scores it as method `federated`.

Writes OUT/fidelity.csv (one row per image and method), OUT/fidelity.json (summary,
timings, config) and prints a table.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting stall each other 10-30x when the cores are shared;
# passive waiting costs nothing measurable alone. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
from pathlib import Path

import torch

from harmonize.configs import ConfigError, parse_override
from harmonize.evaluation.translator_fidelity import cyclegan_fidelity, print_cyclegan_table

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval_out/cyclegan_fidelity")
    p.add_argument("--config", default=str(ROOT / "configs/cyclegan/quick.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--per-site", type=int, default=80)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--federated", default=None, metavar="FEDCONFIG",
                   help="also train the federated form with this configs/federated/ file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = cyclegan_fidelity(
            args.out, config=args.config,
            overrides=dict(parse_override(s) for s in args.overrides), sites=args.sites,
            per_site=args.per_site, size=args.size, seed=args.seed, federated=args.federated,
            progress=not args.quiet)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    print_cyclegan_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
