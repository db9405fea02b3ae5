"""Federated vs central downstream classifier on synthetic sites (eval/federated_classifier.py).

Per seed: 4 synthetic sites (one node each), a patient split per site (25% held out);
central training on the pooled training images with the same step code for the same
epochs, and FedAvg / FedProx / FedBN / FedAvg of the GroupNorm CNN over the nodes. Every
final model is scored on the same held-out images: pooled AUC with a bootstrap CI, the
paired AUC difference to central, and the mean per-site AUC; BatchNorm models also with
each site's own BN statistics ("+ site BN")."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.classify.metrics import (
    binary_metrics,
    bootstrap_metrics,
    paired_bootstrap_difference,
)
from harmonize.evaluation.federated_benchmark import CONFIGS
from harmonize.evaluation.report import markdown_table

# config overrides of each federated variant, in the order the table lists them
VARIANTS = {"fedavg": {}, "fedprox": {"strategy": "fedprox", "proximal_mu": 0.01},
            "fedbn": {"classifier.local_bn": True},
            "fedavg-gn": {"classifier.model.norm": "group"}}
# the per-seed columns the summary averages over seeds
MEAN_COLUMNS = ["auc", "auc_per_site", "accuracy", "auc_minus_central", "wall_s"]


@dataclass
class ClassifierSettings:
    """One comparison: `config` a federated classifier config, `rounds` its rounds (central
    trains rounds x local_epochs epochs), `variants` among VARIANTS; data, split and
    training all follow each seed. Seed SEED's data and runs live in OUT/seed_SEED."""

    out: Path
    config: Path = CONFIGS / "federated/classifier-quick.yaml"
    per_site: int = 100
    rounds: int = 30
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        self.out, self.config = Path(self.out), Path(self.config)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants {unknown}: choose among {', '.join(VARIANTS)}")


def run_seed(s: ClassifierSettings, seed: int) -> list[dict]:
    """Generate, split, train every model and score it (`score_rows`) for one seed."""
    import torch

    from harmonize.classify.train import adapt_batchnorm, load_classifier, load_images, predict
    from harmonize.data.manifest import binary_targets, load_manifest, save_manifest
    from harmonize.data.splits import patient_split
    from harmonize.federated.classifier_task import ClassifierTask
    from harmonize.federated.config import load_federated_config
    from harmonize.federated.run import run_federated
    from harmonize.synth import generate

    out = s.out / f"seed_{seed}"
    out.mkdir(parents=True, exist_ok=True)
    generate(out / "data", sites=4, per_site=s.per_site, size=128, seed=seed,
             finding_scale=2.5, progress=False)
    df = load_manifest(out / "data" / "manifest.csv")
    df = pd.concat([patient_split(g, test_size=0.25, seed=seed)
                    for _, g in df.groupby("node")]).sort_index()
    manifest = out / "manifest.csv"
    save_manifest(df, manifest)
    test = df[df["split"] == "test"]
    common = {"manifest": str(manifest), "rounds": s.rounds, "seed": seed, "progress": False}
    base = load_federated_config(s.config, common)
    size = base.classifier.image_size
    x_test = load_images(test["path"].tolist(), size, progress=False)
    y_test = binary_targets(test)
    train = df[df["split"] == "train"].reset_index(drop=True)
    sites = test["site"].astype(str).to_numpy()
    site_images = {site: load_images(train.loc[train["site"] == site, "path"].tolist(), size,
                                     progress=False) for site in np.unique(sites)}
    probs, seconds = {}, {}

    def score(name: str, model) -> None:
        probs[name] = predict(model.eval(), x_test)
        if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
            p = np.zeros(len(sites), dtype=np.float32)
            for site, x in site_images.items():
                p[sites == site] = predict(adapt_batchnorm(model, x), x_test[sites == site])
            probs[f"{name} + site BN"] = p

    variants = {k: v for k, v in VARIANTS.items() if k in s.variants}
    centrals = {"central": {}}
    if "fedavg-gn" in variants:
        centrals["central-gn"] = {"classifier.model.norm": "group"}
    for name, overrides in centrals.items():
        # the same training step on all training rows pooled, same epochs in total
        t = time.perf_counter()
        cfg = load_federated_config(s.config, {**common, **overrides})
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
        cfg = load_federated_config(s.config, {**common, "out": str(out / "runs" / name),
                                               **overrides})
        summary = run_federated(cfg)
        seconds[name] = summary["wall_seconds"]
        model, _, _ = load_classifier(summary["model"])
        score(name, model)

    torch.manual_seed(0)
    rows = score_rows(y_test, sites, probs, seconds, seed)
    print(f"seed {seed}: {len(train)} training / {len(test)} held-out images "
          f"({int(np.sum(y_test))} positive)", flush=True)
    return rows


def score_rows(y: np.ndarray, sites: np.ndarray, probs: dict[str, np.ndarray],
               seconds: dict[str, float], seed: int) -> list[dict]:
    """One row per model: pooled AUC with its bootstrap CI, mean per-site AUC, accuracy,
    the paired AUC difference to central ("central-gn" for names ending in -gn), and the
    training seconds of the model (a "+ site BN" row: its model's)."""
    rows = []
    for name, p in probs.items():
        reference = "central-gn" if name.endswith("-gn") else "central"
        m = bootstrap_metrics(y, p, seed=seed)
        d = paired_bootstrap_difference(y, p, probs[reference], seed=seed)
        per_site = [binary_metrics(y[sites == s], p[sites == s])["auc"]
                    for s in np.unique(sites)]
        rows.append({"seed": seed, "method": name, "auc": m["auc"], "auc_lo": m["auc_lo"],
                     "auc_hi": m["auc_hi"], "auc_per_site": float(np.nanmean(per_site)),
                     "accuracy": m["accuracy"],
                     "auc_minus_central": d["diff"], "diff_lo": d["diff_lo"],
                     "diff_hi": d["diff_hi"], "p_value": d["p_value"],
                     "wall_s": seconds.get(name.removesuffix(" + site BN"))})
    return rows


def summary_text(table: pd.DataFrame, rounds: int, seeds: list[int]) -> str:
    """The per-seed table and its mean over seeds per method (first-seen order), as
    OUT/results.md holds them."""
    mean = table.groupby("method", sort=False)[MEAN_COLUMNS].mean().reset_index()
    return (f"4 nodes, {rounds} rounds; seeds {','.join(str(s) for s in seeds)}\n\n"
            "per seed:\n\n" + markdown_table(table)
            + "\nmean over seeds:\n\n" + markdown_table(mean))


def run_classifier_benchmark(s: ClassifierSettings) -> tuple[pd.DataFrame, str]:
    """Every seed, then OUT/results.csv (one row per seed and model) and OUT/results.md
    (`summary_text`): (the table, the text)."""
    rows = []
    for seed in s.seeds:
        rows += run_seed(s, seed)
    table = pd.DataFrame(rows)
    table.to_csv(s.out / "results.csv", index=False)
    text = summary_text(table, s.rounds, s.seeds)
    (s.out / "results.md").write_text(text)
    return table, text
