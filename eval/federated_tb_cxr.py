"""Federated vs central translators on two real hospitals (Montgomery -> Shenzhen chest
X-rays, ../shared/data/tb_cxr_2site), where no paired truth exists.

Trains, on a patient split (75% train per site): central CycleGAN and the federated
CycleGAN at K = 1 (two nodes: Montgomery, Shenzhen = reference), central per-site DDIB
and federated DDIB with local priors, all as in eval/federated_translators.py. Then on
the held-out Montgomery patients:

- agreement with central: SSIM of the federated output to the central output of the
  same family (1 = the federation reproduces central), beside identity's SSIM to it;
- style: a site classifier (logistic regression on 64-bin intensity histograms, trained
  on the raw training images of both sites) scores translated Montgomery against
  held-out Shenzhen: AUC 0.5 = indistinguishable from Shenzhen, 1 = still Montgomery;
- structure: SSIM of output to input (what a translator may not erase);
- memorization of the outputs against Shenzhen's training images.

The experiment lives in `harmonize.evaluation.federated_translator_benchmark`.

    python eval/federated_tb_cxr.py --out eval_out/federated_tb_cxr

Writes OUT/results.csv, OUT/results.md, OUT/grid.png.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from harmonize.evaluation.federated_translator_benchmark import (  # noqa: E402
    TB_CXR_DATA,
    TbCxrSettings,
    run_tb_cxr,
)
from harmonize.evaluation.report import markdown_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="eval_out/federated_tb_cxr")
    ap.add_argument("--data", default=str(TB_CXR_DATA))
    ap.add_argument("--reference-site", default="shenzhen")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cyclegan-steps", type=int, default=300)
    ap.add_argument("--ddib-steps", type=int, default=200)
    ap.add_argument("--size", type=int, default=128, help="CycleGAN crop size")
    ap.add_argument("--parallel-nodes", type=int, default=2)
    args = ap.parse_args()
    settings = TbCxrSettings(
        out=Path(args.out), data=Path(args.data), reference_site=args.reference_site,
        seed=args.seed, cyclegan_steps=args.cyclegan_steps, ddib_steps=args.ddib_steps,
        size=args.size, parallel_nodes=args.parallel_nodes)
    torch.set_num_threads(2)
    table = run_tb_cxr(settings)
    print(markdown_table(table))


if __name__ == "__main__":
    main()
