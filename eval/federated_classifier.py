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

    python eval/federated_classifier.py --out eval_out/federated_classifier

Writes OUT/results.csv, OUT/results.md and prints the table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harmonize.classify.metrics import (
    binary_metrics,
    bootstrap_metrics,
    paired_bootstrap_difference,
)
from harmonize.classify.train import adapt_batchnorm, load_classifier, load_images, predict
from harmonize.data.manifest import binary_targets, load_manifest, save_manifest
from harmonize.data.splits import patient_split
from harmonize.evaluation.report import markdown_table
from harmonize.federated.classifier_task import ClassifierTask
from harmonize.federated.config import load_federated_config
from harmonize.federated.run import run_federated
from harmonize.synth import generate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="eval_out/federated_classifier")
    ap.add_argument("--config", default=str(ROOT / "configs/federated/classifier-quick.yaml"))
    ap.add_argument("--per-site", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--variants", default="fedavg,fedprox,fedbn,fedavg-gn")
    ap.add_argument("--seeds", default="0", help="comma-separated; data, split and "
                    "training all follow the seed")
    args = ap.parse_args()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        args.seed = seed
        rows += run_seed(args, Path(args.out) / f"seed_{seed}")
    table = pd.DataFrame(rows)
    out = Path(args.out)
    table.to_csv(out / "results.csv", index=False)
    columns = ["auc", "auc_per_site", "accuracy", "auc_minus_central", "wall_s"]
    mean = table.groupby("method", sort=False)[columns].mean().reset_index()
    text = (f"4 nodes, {args.rounds} rounds; seeds {args.seeds}\n\nper seed:\n\n"
            + markdown_table(table) + "\nmean over seeds:\n\n" + markdown_table(mean))
    (out / "results.md").write_text(text)
    print(text)


def run_seed(args, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    generate(out / "data", sites=4, per_site=args.per_site, size=128, seed=args.seed,
             finding_scale=2.5, progress=False)
    df = load_manifest(out / "data" / "manifest.csv")
    df = pd.concat([patient_split(g, test_size=0.25, seed=args.seed)
                    for _, g in df.groupby("node")]).sort_index()
    manifest = out / "manifest.csv"
    save_manifest(df, manifest)
    test = df[df["split"] == "test"]
    common = {"manifest": str(manifest), "rounds": args.rounds, "seed": args.seed,
              "progress": False}
    base = load_federated_config(args.config, common)
    size = base.classifier.image_size
    x_test = load_images(test["path"].tolist(), size, progress=False)
    y_test = binary_targets(test)
    train = df[df["split"] == "train"].reset_index(drop=True)
    sites = test["site"].astype(str).to_numpy()
    site_images = {s: load_images(train.loc[train["site"] == s, "path"].tolist(), size,
                                  progress=False) for s in np.unique(sites)}
    probs, seconds, rows = {}, {}, []

    def score(name: str, model) -> None:
        probs[name] = predict(model.eval(), x_test)
        if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
            p = np.zeros(len(sites), dtype=np.float32)
            for s, x in site_images.items():
                p[sites == s] = predict(adapt_batchnorm(model, x), x_test[sites == s])
            probs[f"{name} + site BN"] = p

    variants = {"fedavg": {}, "fedprox": {"strategy": "fedprox", "proximal_mu": 0.01},
                "fedbn": {"classifier.local_bn": True},
                "fedavg-gn": {"classifier.model.norm": "group"}}
    variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    centrals = {"central": {}}
    if "fedavg-gn" in variants:
        centrals["central-gn"] = {"classifier.model.norm": "group"}
    for name, overrides in centrals.items():
        # the same training step on all training rows pooled, same epochs in total
        t = time.perf_counter()
        cfg = load_federated_config(args.config, {**common, **overrides})
        task = ClassifierTask(cfg)
        arrays = task.initial_arrays()
        central = cfg.model_copy(deep=True)
        central.classifier.local_epochs = cfg.rounds * cfg.classifier.local_epochs
        arrays, _, _ = ClassifierTask(central).train(arrays, None, train, {"server-round": 1})
        model = task.build()
        model.load_state_dict(arrays)
        seconds[name] = time.perf_counter() - t
        score(name, model)

    for name, overrides in variants.items():
        cfg = load_federated_config(args.config, {**common, "out": str(out / "runs" / name),
                                                  **overrides})
        summary = run_federated(cfg)
        seconds[name] = summary["wall_seconds"]
        model, _, _ = load_classifier(summary["model"])
        score(name, model)

    torch.manual_seed(0)
    for name, p in probs.items():
        reference = "central-gn" if name.endswith("-gn") else "central"
        m = bootstrap_metrics(y_test, p, seed=args.seed)
        d = paired_bootstrap_difference(y_test, p, probs[reference], seed=args.seed)
        per_site = [binary_metrics(y_test[sites == s], p[sites == s])["auc"]
                    for s in np.unique(sites)]
        rows.append({"seed": args.seed, "method": name, "auc": m["auc"], "auc_lo": m["auc_lo"],
                     "auc_hi": m["auc_hi"], "auc_per_site": float(np.nanmean(per_site)),
                     "accuracy": m["accuracy"],
                     "auc_minus_central": d["diff"], "diff_lo": d["diff_lo"],
                     "diff_hi": d["diff_hi"], "p_value": d["p_value"],
                     "wall_s": seconds.get(name.removesuffix(" + site BN"))})
    print(f"seed {args.seed}: {len(train)} training / {len(test)} held-out images "
          f"({int(np.sum(y_test))} positive)", flush=True)
    return rows


if __name__ == "__main__":
    main()
