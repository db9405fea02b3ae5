"""Federated vs central downstream classifier on the synthetic benchmark.

4 sites (one node each), patient split (25% held out per site). Central: the classifier
trained on all training images pooled, for rounds x local_epochs epochs with a constant
learning rate, with the same per-step code (`run_epochs`). Federated: FedAvg, FedProx
and FedBN over the 4 nodes for the same rounds x local_epochs, and FedAvg of the CNN
with GroupNorm (`fedavg-gn`, compared with a central GroupNorm CNN). Every final global
model is scored on the same held-out images of all sites: pooled AUC (one score scale
across sites, what a single threshold at several hospitals needs) with 95% bootstrap CI
and the paired AUC difference to central, and the mean of the per-site AUCs (ranking
within each site, what Flower's federated evaluation reports). Every BatchNorm model is
also scored with site statistics ("+ site BN", AdaBN): each site recomputes the BN
statistics on its own unlabelled training images before predicting, as a federated
model was trained (every node's batches normalized by its own site's statistics).
The experiment lives in `harmonize.evaluation.federated_classifier_benchmark`.

    python eval/federated_classifier.py --out eval_out/federated_classifier

Writes OUT/results.csv, OUT/results.md and prints the table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from harmonize.evaluation.federated_benchmark import CONFIGS  # noqa: E402
from harmonize.evaluation.federated_classifier_benchmark import (  # noqa: E402
    ClassifierSettings,
    run_classifier_benchmark,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="eval_out/federated_classifier")
    ap.add_argument("--config", default=str(CONFIGS / "federated/classifier-quick.yaml"))
    ap.add_argument("--per-site", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--variants", default="fedavg,fedprox,fedbn,fedavg-gn")
    ap.add_argument("--seeds", default="0", help="comma-separated; data, split and "
                    "training all follow the seed")
    args = ap.parse_args()
    settings = ClassifierSettings(
        out=Path(args.out), config=Path(args.config), per_site=args.per_site,
        rounds=args.rounds, variants=[v for v in args.variants.split(",") if v],
        seeds=[int(s) for s in args.seeds.split(",")])
    _, text = run_classifier_benchmark(settings)
    print(text)


if __name__ == "__main__":
    main()
