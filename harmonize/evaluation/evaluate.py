"""The downstream evaluation matrix: does harmonization beat plain augmentation?

For every protocol fold x seed x classifier x regime (x translator), train a fresh
classifier with the same budget on the same patients and score the same test images:

- regimes: raw; raw + plain augmentation; harmonized (per translator); harmonized +
  augmentation. Test images go through the same translator as the training images.
- protocols: ``external`` (train on some sites, test on an unseen one; the same model is
  also scored on held-out patients of its training sites, protocol ``internal``, so the
  in-site vs external gap is measured on one model) and ``loso`` (leave one site out).
  Patient-grouped: the held-out patients of the training sites come from one fixed
  patient split (data.split_seed), the same for every seed and regime.

Outputs: results.csv (one row per cell, bootstrap CIs, gain over plain augmentation with
a paired bootstrap CI and p-value), predictions.csv, results.md, report.html, audit.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from harmonize.classify.metrics import bootstrap_metrics, paired_bootstrap_difference
from harmonize.classify.train import fit_classifier, load_images, predict
from harmonize.configs import ConfigError, dump_config
from harmonize.data.io import atomic_write
from harmonize.data.manifest import binary_targets, load_manifest, positive_label
from harmonize.data.splits import patient_split
from harmonize.evaluation.config import EvalConfig, Protocol
from harmonize.evaluation.harmonized_sets import HarmonizedSet, check_specs, harmonize_dataset
from harmonize.rerun import replacing_outputs

RESULT_COLUMNS = [
    "regime", "translator", "classifier", "protocol", "test_site", "seed", "n", "n_positive",
    "auc", "auc_lo", "auc_hi", "accuracy", "accuracy_lo", "accuracy_hi", "sensitivity",
    "sensitivity_lo", "sensitivity_hi", "specificity", "specificity_lo", "specificity_hi",
    "precision", "precision_lo", "precision_hi", "f1", "f1_lo", "f1_hi",
    "gain_auc", "gain_auc_lo", "gain_auc_hi", "gain_p",
]


@dataclass
class Fold:
    """One training set and the test sets scored with the model trained on it."""
    protocol: str
    train_idx: np.ndarray
    tests: dict[tuple[str, str], np.ndarray]  # (protocol, test_site) -> row indices


@dataclass
class Dataset:
    manifest: Path
    df: pd.DataFrame
    labels: np.ndarray
    positive: str
    reference_site: str
    synth_dir: Path | None


def prepare_data(config: EvalConfig, out: Path) -> Dataset:
    dc = config.data
    synth_dir = None
    if dc.synth is not None:
        from harmonize.synth import generate

        s = dc.synth
        synth_dir = out / "data"
        info = generate(synth_dir, sites=s.sites, per_site=s.per_site, size=s.size,
                        modality=s.modality, seed=s.seed, prevalence=s.prevalence,
                        finding_scale=s.finding_scale,
                        progress=config.progress)
        manifest = synth_dir / "manifest.csv"
        reference = dc.reference_site or info["reference_site"]
    else:
        manifest = Path(dc.manifest)
        reference = dc.reference_site
        if reference is None:
            raise ConfigError("data.reference_site is required with data.manifest")
    df = load_manifest(manifest).reset_index(drop=True)
    sites = sorted(df["site"].unique())
    if reference not in sites:
        raise ConfigError(f"data.reference_site '{reference}' not in {manifest} (sites: "
                          f"{sites})")
    positive = positive_label(df["label"].astype(str))
    labels = binary_targets(df, positive=positive)
    if (labels < 0).any():
        raise ConfigError(f"{manifest}: {(labels < 0).sum()} row(s) have no label")
    for p in config.protocols:
        unknown = [s for s in (p.train_sites or []) + [p.test_site or sites[0]]
                   if s not in sites]
        if unknown:
            raise ConfigError(f"protocol {p.kind}: unknown site(s) {unknown}; sites: {sites}")
    return Dataset(manifest, df, labels, positive, reference, synth_dir)


def make_folds(data: Dataset, protocols: list[Protocol], test_size: float,
               split_seed: int) -> list[Fold]:
    df = data.df
    held_out = patient_split(df, test_size=test_size, seed=split_seed)["split"].eq(
        "test").to_numpy()
    site = df["site"].astype(str).to_numpy()
    folds = []
    for p in protocols:
        if p.kind == "external":
            pairs = [(p.train_sites, p.test_site)]
        else:
            all_sites = sorted(set(site))
            pairs = [([s for s in all_sites if s != t], t) for t in all_sites]
        for train_sites, test_site in pairs:
            in_train = np.isin(site, train_sites)
            tests = {(p.kind, test_site): np.flatnonzero(site == test_site)}
            if p.kind == "external":
                tests[("internal", "+".join(train_sites))] = np.flatnonzero(in_train & held_out)
            folds.append(Fold(p.kind, np.flatnonzero(in_train & ~held_out), tests))
    return folds


class Stages:
    """'[n/m] what' lines on stderr, so a long run says where it is (with --quiet: none)."""

    def __init__(self, total: int, show: bool = True) -> None:
        self.total, self.show, self.done = total, show, 0

    def __call__(self, text: str) -> None:
        self.done += 1
        if self.show:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)


def run_evaluation(config: EvalConfig) -> Path:
    """Run the matrix; returns OUT (results.csv, results.md, report.html, ...)."""
    if config.out is None:
        raise ConfigError("out is required (--out DIR)")
    out = Path(config.out)
    replacing_outputs(out, "evaluation (results and report)", marker="report.html")
    out.mkdir(parents=True, exist_ok=True)
    check_specs(config.translators)
    dump_config(config, out / "config.yaml")
    timings: dict[str, float] = {}
    n_stages = 6 if config.shift_report else 5
    stage = Stages(n_stages, config.progress)
    stage("data: the manifest (or the synthetic benchmark) and the patient split")
    t = time.perf_counter()
    data = prepare_data(config, out)
    timings["data_s"] = time.perf_counter() - t

    sets: dict[str, HarmonizedSet] = {}
    stage(f"translators: train and apply {len(config.translators)} "
          f"({', '.join(s.name for s in config.translators) or 'none'})")
    for spec in config.translators:
        hs = harmonize_dataset(spec, data.manifest, data.df, data.reference_site,
                               out / "translators" / spec.name, config.progress)
        sets[spec.name] = hs
        timings.update({f"{spec.name}_{k}": v for k, v in hs.seconds.items()})

    t = time.perf_counter()
    size = config.data.image_size
    images = {"raw": load_images(data.df["path"].tolist(), size, progress=config.progress,
                                 desc="load raw")}
    for name, hs in sets.items():
        images[name] = load_images(hs.manifest["path"].tolist(), size,
                                   progress=config.progress, desc=f"load {name}")
    timings["load_s"] = time.perf_counter() - t

    folds = make_folds(data, config.protocols, config.data.internal_test_size,
                       config.data.split_seed)
    cells = [(f, seed, clf, regime, source)
             for f in folds for seed in config.seeds for clf in config.classifiers
             for regime in config.regimes
             for source in (["raw"] if regime in ("raw", "augment") else list(sets))]
    stage(f"classifiers: {len(cells)} models (fold x seed x classifier x regime)")
    t = time.perf_counter()
    rows, preds, frozen = [], [], None
    bar = tqdm(cells, desc="evaluate", unit="model", disable=not config.progress)
    for fold, seed, clf, regime, source in bar:
        bar.set_postfix_str(f"{fold.protocol} {clf.arch} {regime} {source}")
        train_cfg = config.train.model_copy(update={
            "seed": seed, "augment": regime.endswith("augment"), "progress": False})
        x = images[source]
        model = fit_classifier(x[fold.train_idx], data.labels[fold.train_idx], clf, train_cfg)
        translator = "" if source == "raw" else source
        if (fold is folds[0] and seed == config.seeds[0] and clf is config.classifiers[0]
                and regime == "augment"):
            frozen = model  # the audit's classifier: plain augmentation, first cell
        for (protocol, test_site), idx in fold.tests.items():
            p = predict(model, x[idx])
            y = data.labels[idx]
            m = bootstrap_metrics(y, p, n_boot=config.bootstrap, seed=seed)
            rows.append({"regime": regime, "translator": translator, "classifier": clf.arch,
                         "protocol": protocol, "test_site": test_site, "seed": seed,
                         **{k: m[k] for k in RESULT_COLUMNS if k in m}})
            preds.append(pd.DataFrame({
                "regime": regime, "translator": translator, "classifier": clf.arch,
                "protocol": protocol, "test_site": test_site, "seed": seed,
                "row": idx, "relpath": data.df["relpath"].to_numpy()[idx], "label": y,
                "p": p}))
    timings["classifiers_s"] = time.perf_counter() - t
    predictions = pd.concat(preds, ignore_index=True)
    results = add_gains(pd.DataFrame(rows), predictions, config.bootstrap)

    from harmonize.evaluation.audit import run_audit
    from harmonize.evaluation.report import write_outputs

    stage("audit: did a translator erase or invent findings (frozen classifier, Grad-CAM)")
    t = time.perf_counter()
    audit = run_audit(config, data, sets, images, frozen, folds[0], out)
    timings["audit_s"] = time.perf_counter() - t
    shifts = {}
    if config.shift_report:
        stage("site shift: radiomics before / after each translator")
        t = time.perf_counter()
        shifts = site_shift(config, data, sets, out / "shift_report")
        timings["shift_reports_s"] = time.perf_counter() - t
    stage("report: results.csv, results.md, report.html")
    write_outputs(out, config, data, sets, results, predictions, audit, timings, shifts)
    summary = {"results": str(out / "results.csv"), "report": str(out / "report.html"),
               "n_models": len(cells), "site_shift": shifts, "timings": timings}
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(text))
    return out


def site_shift(config: EvalConfig, data: Dataset, sets: dict, out: Path) -> dict:
    """Radiomics site shift (harmonize.radiomics) of the original images vs each
    translator's output, in the ROI of data.mask_column; {translator: {measure: {before,
    after}}}. The original images' features are cached, so they are extracted once."""
    from harmonize.radiomics.shift_report import run_shift_report

    column = config.data.mask_column
    mask_column = column if column and column in data.df.columns else None
    shifts = {}
    for name, hs in sets.items():
        s = run_shift_report(data.manifest, out / name, compare_with=hs.folder,
                             reference_site=data.reference_site, mask_column=mask_column,
                             cache_dir=out / "cache", progress=config.progress,
                             label=f"images harmonized by {name}",
                             back=("../../report.html", "back to the evaluation report"))
        shifts[name] = {r["measure"]: {"before": r["before"], "after": r["after"]}
                        for r in s["change"]}
    return shifts


CELL = ["classifier", "protocol", "test_site", "seed"]


def add_gains(results: pd.DataFrame, predictions: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    """Gain in AUC of each cell over plain augmentation on the same test images (paired
    bootstrap, same resamples for both models)."""
    results = results.copy()
    by_cell = {k: g for k, g in predictions.groupby(["regime", "translator", *CELL])}
    for col in ("gain_auc", "gain_auc_lo", "gain_auc_hi", "gain_p"):
        results[col] = np.nan
    for i, r in results.iterrows():
        if r["regime"] == "augment":
            continue
        cell = tuple(r[c] for c in CELL)
        a = by_cell[(r["regime"], r["translator"], *cell)].sort_values("row")
        b = by_cell[("augment", "", *cell)].sort_values("row")
        d = paired_bootstrap_difference(a["label"].to_numpy(), a["p"].to_numpy(),
                                        b["p"].to_numpy(), n_boot=n_boot, seed=int(r["seed"]))
        results.loc[i, ["gain_auc", "gain_auc_lo", "gain_auc_hi", "gain_p"]] = [
            d["diff"], d["diff_lo"], d["diff_hi"], d["p_value"]]
    return results[RESULT_COLUMNS]
