"""The downstream evaluation matrix: does harmonization beat plain augmentation?

For every protocol fold x seed x classifier x regime (x translator), train a fresh
classifier with the same budget on the same patients and score the same test images:

- regimes: raw; raw + plain augmentation; raw + acquisition-style augmentation;
  harmonized (per translator); harmonized + either augmentation.
- reference (per protocol): ``fixed``: every image is translated to data.reference_site,
  the classifier trains on harmonized images and is tested on harmonized images;
  ``train``: test-time harmonization: the raw (or augmented) classifier, untouched, is
  scored on the test site's images translated to its training site.
- protocols: ``external`` (train on some sites, test on an unseen one; the same model is
  also scored on held-out patients of its training sites, protocol ``internal``, so the
  in-site vs external gap is measured on one model) and ``loso`` (leave one site out).
  Patient-grouped: the held-out patients of the training sites come from one fixed
  patient split (data.split_seed), the same for every seed and regime.

Outputs: results.csv (one row per cell, bootstrap CIs, gain over the stronger of the two
augmentations with a paired bootstrap CI and p-value), predictions.csv, results.md,
report.html, audit.
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

from harmonize.classify.config import ModelConfig
from harmonize.classify.metrics import bootstrap_metrics, paired_bootstrap_difference
from harmonize.classify.train import fit_classifier, load_images, predict
from harmonize.configs import ConfigError, dump_config
from harmonize.data.io import atomic_write
from harmonize.data.manifest import binary_targets, load_manifest, positive_label
from harmonize.data.splits import patient_split
from harmonize.evaluation.config import EvalConfig, Protocol
from harmonize.evaluation.harmonized_sets import HarmonizedSet, check_specs, harmonize_dataset
from harmonize.evaluation.regimes import Regime, regime
from harmonize.rerun import output_folder

# what identifies a row: reference is fixed / train for the harmonized regimes (empty for
# the raw-image ones), reference_site the site the test images were translated to
ROW_KEYS = ["regime", "translator", "reference", "reference_site", "classifier", "protocol",
            "test_site", "train_sites", "seed"]
METRIC_COLUMNS = [
    "n", "n_positive",
    "auc", "auc_lo", "auc_hi", "accuracy", "accuracy_lo", "accuracy_hi", "sensitivity",
    "sensitivity_lo", "sensitivity_hi", "specificity", "specificity_lo", "specificity_hi",
    "precision", "precision_lo", "precision_hi", "f1", "f1_lo", "f1_hi"]
# gain: AUC minus the stronger augmentation's (`baseline`) on the same images
GAIN_COLUMNS = ["baseline", "gain_auc", "gain_auc_lo", "gain_auc_hi", "gain_p"]
RESULT_COLUMNS = [*ROW_KEYS, *METRIC_COLUMNS, *GAIN_COLUMNS]


@dataclass
class Fold:
    """One training set and the test sets scored with the model trained on it."""
    protocol: str
    train_idx: np.ndarray
    tests: dict[tuple[str, str], np.ndarray]  # (protocol, test_site) -> row indices
    train_sites: str  # "+"-joined
    modes: tuple[str, ...] = ("fixed",)  # reference modes (Protocol.reference)
    train_reference: str | None = None  # under reference: train, the site translated to


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
    counts = df["site"].astype(str).value_counts()
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
            # ties: the first site in sorted order, so the choice does not depend on input order
            largest = max(sorted(train_sites), key=lambda s: counts.get(s, 0))
            folds.append(Fold(p.kind, np.flatnonzero(in_train & ~held_out), tests,
                              "+".join(train_sites), p.modes,
                              (p.reference_site or largest) if "train" in p.modes else None))
    return folds


def set_label(name: str, reference: str, fixed_reference: str) -> str:
    """Key (and folder name) of a translator's harmonized copy: its name when it maps to
    the evaluation's reference site, NAME-to-SITE otherwise."""
    return name if reference == fixed_reference else f"{name}-to-{reference}"


def needed_references(folds: list[Fold], regimes: list[Regime], fixed_reference: str
                      ) -> list[str]:
    """The sites translators must map to: the fixed reference when a fold trains on
    harmonized images, and every fold's training reference under reference: train."""
    if not any(r.harmonized for r in regimes):
        return []
    refs = [fixed_reference] if any("fixed" in f.modes for f in folds) else []
    refs += [f.train_reference for f in folds if f.train_reference]
    return list(dict.fromkeys(refs))


@dataclass(frozen=True)
class Cell:
    """One model to train: its fold, seed, classifier, regime and image set (a key of the
    loaded images: "raw" or a translator's set label)."""
    fold: Fold
    seed: int
    classifier: ModelConfig
    regime: Regime
    source: str


def model_cells(folds: list[Fold], config: EvalConfig, names: list[str],
                fixed_reference: str) -> list[Cell]:
    """Every model to train: the raw-image regimes in every fold, the harmonized ones (one
    per translator) where the fold has reference: fixed."""
    cells = []
    for f in folds:
        for seed in config.seeds:
            for clf in config.classifiers:
                for r in config.regimes:
                    if not r.harmonized:
                        cells.append(Cell(f, seed, clf, r, "raw"))
                    elif "fixed" in f.modes:
                        cells += [Cell(f, seed, clf, r, set_label(n, fixed_reference,
                                                                  fixed_reference))
                                  for n in names]
    return cells


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
    out = output_folder(config.out, "evaluation (results and report)", marker="report.html")
    check_specs(config.translators)
    dump_config(config, out / "config.yaml")
    timings: dict[str, float] = {}
    stage = Stages(6 if config.shift_report else 5, config.progress)
    stage("data: the manifest (or the synthetic benchmark) and the patient split")
    t = time.perf_counter()
    data = prepare_data(config, out)
    timings["data_s"] = time.perf_counter() - t

    folds = make_folds(data, config.protocols, config.data.internal_test_size,
                       config.data.split_seed)
    references = needed_references(folds, config.regimes, data.reference_site)
    stage(f"translators: train and apply {len(config.translators)} "
          f"({', '.join(s.name for s in config.translators) or 'none'}) to "
          f"{', '.join(references) or 'no site'}")
    sets = harmonized_sets(config, data, references, out, timings)
    t = time.perf_counter()
    images = load_image_sets(config, data, sets)
    timings["load_s"] = time.perf_counter() - t

    cells = model_cells(folds, config, [spec.name for spec in config.translators],
                        data.reference_site)
    stage(f"classifiers: {len(cells)} models (fold x seed x classifier x regime); under "
          "reference: train the raw-image models are also scored on translated test images")
    t = time.perf_counter()
    scores = Scores(data, config.bootstrap)
    frozen = train_and_score(cells, config, data, sets, images, scores)
    timings["classifiers_s"] = time.perf_counter() - t
    predictions = pd.concat(scores.predictions, ignore_index=True)
    results = add_gains(pd.DataFrame(scores.rows), predictions, config.bootstrap)

    from harmonize.evaluation.audit import run_audit
    from harmonize.evaluation.report import write_outputs

    stage("audit: did a translator erase or invent findings (frozen classifier, Grad-CAM)")
    t = time.perf_counter()
    # the audit and the site shift look at the copies mapped to data.reference_site
    fixed_sets = {label: hs for label, hs in sets.items() if label == hs.name}
    audit = run_audit(config, data, fixed_sets, images, frozen, folds[0], out)
    timings["audit_s"] = time.perf_counter() - t
    shifts = {}
    if config.shift_report:
        stage("site shift: radiomics before / after each translator")
        t = time.perf_counter()
        shifts = site_shift(config, data, fixed_sets, out / "shift_report")
        timings["shift_reports_s"] = time.perf_counter() - t
    stage("report: results.csv, results.md, report.html")
    write_outputs(out, config, data, sets, results, predictions, audit, timings, shifts)
    summary = {"results": str(out / "results.csv"), "report": str(out / "report.html"),
               "n_models": len(cells), "site_shift": shifts, "timings": timings}
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(text))
    return out


def harmonized_sets(config: EvalConfig, data: Dataset, references: list[str], out: Path,
                    timings: dict[str, float]) -> dict[str, HarmonizedSet]:
    """Every translator trained (or loaded) and applied to every image, once per site it
    must map to; keyed by set_label."""
    sets = {}
    for spec in config.translators:
        for reference in references:
            label = set_label(spec.name, reference, data.reference_site)
            hs = harmonize_dataset(spec, data.manifest, data.df, reference,
                                   out / "translators" / label, config.progress)
            sets[label] = hs
            timings.update({f"{label}_{k}": v for k, v in hs.seconds.items()})
    return sets


def load_image_sets(config: EvalConfig, data: Dataset, sets: dict[str, HarmonizedSet]
                    ) -> dict[str, np.ndarray]:
    """The classifier inputs of every image set: "raw" and each harmonized copy."""
    size = config.data.image_size
    images = {"raw": load_images(data.df["path"].tolist(), size, progress=config.progress,
                                 desc="load raw")}
    for label, hs in sets.items():
        images[label] = load_images(hs.manifest["path"].tolist(), size,
                                    progress=config.progress, desc=f"load {label}")
    return images


class Scores:
    """The rows of results.csv and predictions.csv, one per model x test set."""

    def __init__(self, data: Dataset, n_boot: int) -> None:
        self.data, self.n_boot = data, n_boot
        self.rows: list[dict] = []
        self.predictions: list[pd.DataFrame] = []

    def add(self, model, x: np.ndarray, fold: Fold, idx: np.ndarray, protocol: str,
            test_site: str, **keys) -> None:
        p = predict(model, x[idx])
        y = self.data.labels[idx]
        m = bootstrap_metrics(y, p, n_boot=self.n_boot, seed=keys["seed"])
        keys = {**keys, "protocol": protocol, "test_site": test_site,
                "train_sites": fold.train_sites}
        self.rows.append({**keys, **{k: m[k] for k in METRIC_COLUMNS}})
        self.predictions.append(pd.DataFrame({
            **keys, "row": idx, "relpath": self.data.df["relpath"].to_numpy()[idx],
            "label": y, "p": p}))


def train_and_score(cells: list[Cell], config: EvalConfig, data: Dataset,
                    sets: dict[str, HarmonizedSet], images: dict[str, np.ndarray],
                    scores: Scores):
    """Train every cell's classifier and score it on its fold's test sets; under
    reference: train also on the test site translated to the training site. Returns the
    audit's frozen classifier (augmented raw images, first fold)."""
    names = [spec.name for spec in config.translators]
    test_time = [r for r in config.regimes if r.harmonized]
    first_fold, frozen = cells[0].fold if cells else None, None
    bar = tqdm(cells, desc="evaluate", unit="model", disable=not config.progress)
    for cell in bar:
        fold, regime, source = cell.fold, cell.regime, cell.source
        bar.set_postfix_str(f"{fold.protocol} {cell.classifier.arch} {regime} {source}")
        train_cfg = config.train.model_copy(update={
            "seed": cell.seed, "augment": regime.augment, "progress": False})
        x = images[source]
        model = fit_classifier(x[fold.train_idx], data.labels[fold.train_idx],
                               cell.classifier, train_cfg)
        if frozen is None and fold is first_fold and regime.is_baseline:
            frozen = model
        keys = {"classifier": cell.classifier.arch, "seed": cell.seed}
        harmonized = source != "raw"
        for (protocol, test_site), idx in fold.tests.items():
            scores.add(model, x, fold, idx, protocol, test_site, regime=regime.name,
                       translator=sets[source].name if harmonized else "",
                       reference="fixed" if harmonized else "",
                       reference_site=data.reference_site if harmonized else "", **keys)
        if harmonized or not fold.train_reference:
            continue
        # test-time harmonization: this very model on the test site, translated to its
        # training site (the internal test images are the training site's: unchanged)
        for scored_as in (r for r in test_time if r.test_time_model == regime.name):
            for name in names:
                label = set_label(name, fold.train_reference, data.reference_site)
                for (protocol, test_site), idx in fold.tests.items():
                    if protocol != "internal":
                        scores.add(model, images[label], fold, idx, protocol, test_site,
                                   regime=scored_as.name, translator=name, reference="train",
                                   reference_site=fold.train_reference, **keys)
    return frozen


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
SETTING = ["classifier", "protocol", "test_site"]


def stronger_augmentation(results: pd.DataFrame) -> dict[tuple, str]:
    """Per setting (classifier, protocol, test site): the augmentation regime with the
    higher AUC averaged over seeds, the baseline every gain is measured against. Chosen on
    the test images themselves, which favours the baseline, not harmonization."""
    aug = results[results["regime"].map(lambda name: regime(name).is_baseline)]
    means = aug.groupby([*SETTING, "regime"])["auc"].mean().reset_index()
    best = means.loc[means.groupby(SETTING)["auc"].idxmax()]
    return {tuple(r[c] for c in SETTING): r["regime"] for _, r in best.iterrows()}


def add_gains(results: pd.DataFrame, predictions: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    """Gain in AUC of each cell over the stronger augmentation on the same test images
    (paired bootstrap, same resamples for both models)."""
    results = results.copy()
    keys = ["regime", "translator", "reference", *CELL]
    by_cell = {k: g.sort_values("row") for k, g in predictions.groupby(keys)}
    baseline = stronger_augmentation(results)
    for col in GAIN_COLUMNS:
        results[col] = np.nan
    results["baseline"] = ""
    for i, r in results.iterrows():
        base = baseline[tuple(r[c] for c in SETTING)]
        results.loc[i, "baseline"] = base
        if r["regime"] == base:
            continue
        cell = tuple(r[c] for c in CELL)
        a = by_cell[(r["regime"], r["translator"], r["reference"], *cell)]
        b = by_cell[(base, "", "", *cell)]
        d = paired_bootstrap_difference(a["label"].to_numpy(), a["p"].to_numpy(),
                                        b["p"].to_numpy(), n_boot=n_boot, seed=int(r["seed"]))
        results.loc[i, ["gain_auc", "gain_auc_lo", "gain_auc_hi", "gain_p"]] = [
            d["diff"], d["diff_lo"], d["diff_hi"], d["p_value"]]
    return results[RESULT_COLUMNS]
