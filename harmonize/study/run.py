"""`harmonize study`: one run, four answers (docs/study.md).

1. How different are the hospitals' images (radiomics, before and after harmonization)?
2. Does central harmonization make the classifier better on unseen hospitals than plain
   augmentation does?
3. How does federated harmonization (and a federated classifier) change that, compared
   with central?
4. How big is the central/federated difference under patient-level DP and SecAgg+?

Every stage is cached (`cache.py`): a rerun reuses what its inputs did not change.
A design that cannot run is refused before anything trains (`design.py`, and the DP
plans of every private arm here).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.classify.metrics import (
    binary_metrics,
    bootstrap_mean_auc,
    bootstrap_metrics,
    paired_bootstrap_difference,
    paired_bootstrap_mean_auc_difference,
    rare_class_metrics,
)
from harmonize.configs import ConfigError, dump_config
from harmonize.data.io import atomic_write
from harmonize.evaluation.harmonized_sets import check_specs
from harmonize.rerun import output_folder
from harmonize.study.arms import (
    Arm,
    augmentation_baseline,
    central_arms,
    federated_arms,
    privacy_arms,
    private_reference_arm,
)
from harmonize.study.cache import StageCache
from harmonize.study.config import BUILT_IN_IMAGES, StudyConfig, classifier_seeds
from harmonize.study.design import make_design
from harmonize.study.pipeline import Pipeline

CENTRAL_PIPELINE = Arm("central", "central")  # what every federated/private arm is held to


def planned_arms(config: StudyConfig, public: Path | None = None) -> dict[str, list[Arm]]:
    """The arms of each part; `public`: the public reference's manifest (part 4 then
    runs the public-reference design too)."""
    parts = {}
    if "central" in config.parts:
        parts["central"] = central_arms(config.central.other_classifiers,
                                        [t.name for t in config.central.translators])
    if "federated" in config.parts:
        parts["federated"] = federated_arms()
    if "privacy" in config.parts:
        p = config.privacy
        parts["privacy"] = privacy_arms(p.epsilons, p.secagg, p.separate,
                                        public=public is not None)
    return parts


def comparisons(parts: dict[str, list[Arm]]) -> list[tuple[str, Arm, Arm]]:
    """(part, arm, baseline): each paired AUC difference the report states."""
    pairs = []
    for arm in parts.get("central", []):
        if arm != augmentation_baseline(arm):
            pairs.append(("central", arm, augmentation_baseline(arm)))
        if arm.images not in BUILT_IN_IMAGES:  # a configured translator: also against HM
            pairs.append(("central", arm, Arm("central", arch=arm.arch)))
    for arm in parts.get("federated", []):
        if arm != CENTRAL_PIPELINE:
            pairs.append(("federated", arm, CENTRAL_PIPELINE))
    for arm in parts.get("privacy", []):
        pairs.append(("privacy", arm, CENTRAL_PIPELINE))
        if arm.secagg:
            pairs.append(("privacy", arm, Arm("federated", "fedavg")))
        if arm.images == "public":
            pairs.append(("privacy", arm, private_reference_arm(arm.epsilon)))
            if not arm.private:  # what the public reference saves: the landmarks' DP
                pairs += [("privacy", arm, other) for other in parts["privacy"]
                          if other.images == "federated" and not other.private
                          and math.isfinite(other.harmonizer_epsilon)]
    return pairs


def check_privacy_design(pipeline: Pipeline, arms: list[Arm], folder: Path) -> None:
    """Plan patient-level DP at every training node for every private arm (classifier
    and landmarks) before anything trains: a target the budget cannot meet stops here."""
    from harmonize.federated.prepare import plan_run

    d = pipeline.design
    folder.mkdir(parents=True, exist_ok=True)
    train = d.training_manifest(d.df, folder / "train.csv")
    for arm in arms:
        try:
            if arm.private:
                plan_run(pipeline.classifier_config(arm, train, folder / "plan"))
            if math.isfinite(arm.harmonizer_epsilon):
                plan_run(pipeline.harmonizer_config(train, folder / "plan",
                                                    arm.harmonizer_epsilon))
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"privacy arm '{arm.label}': {err}") from None


def scores(results: list[dict]) -> np.ndarray:
    """(seeds, images): each seed's predicted probabilities."""
    return np.asarray([r["p"] for r in results], dtype=float)


def mean_cost(results: list[dict]) -> dict:
    """The cost of an arm's runs, averaged over its seeds."""
    keys = dict.fromkeys(k for r in results for k in r.get("cost", {}))
    out = {}
    for k in keys:
        values = [r["cost"].get(k) for r in results if r.get("cost", {}).get(k) is not None]
        out[k] = float(np.mean(values)) if values else None
    return out


def score_arms(y: np.ndarray, preds: dict[Arm, list[dict]], n_boot: int,
               seed: int) -> pd.DataFrame:
    """Every arm's AUC, average precision and sensitivity at 90% specificity (CIs) on the
    images whose labels are `y` (the external node's, or the left-out nodes'): of its
    one model, or the mean over its seeds' models (the CI over test images)."""
    rows = []
    for arm, results in preds.items():
        p = scores(results)
        if len(p) == 1:
            m = bootstrap_metrics(y, p[0], n_boot=n_boot, seed=seed)
        else:
            m = bootstrap_mean_auc(y, p, n_boot=n_boot, seed=seed)
        r = rare_class_metrics(y, p, n_boot=n_boot, seed=seed)
        per_seed = [binary_metrics(y, q)["auc"] for q in p]
        rows.append({"arm": arm.name, "label": arm.label, **arm.as_dict(),
                     "n": len(y), "n_positive": int(np.sum(y)), "seeds": len(p),
                     **{k: m[k] for k in ("auc", "auc_lo", "auc_hi")},
                     "auc_per_seed": " / ".join(f"{v:.3f}" for v in per_seed),
                     **{k: r[k] for k in ("ap", "ap_lo", "ap_hi", "sens_at_spec",
                                          "sens_at_spec_lo", "sens_at_spec_hi")},
                     **{f"cost_{k}": v for k, v in mean_cost(results).items()}})
    return pd.DataFrame(rows)


def paired_differences(y: np.ndarray, preds: dict[Arm, list[dict]],
                       pairs: list[tuple[str, Arm, Arm]], n_boot: int,
                       seed: int) -> pd.DataFrame:
    """Each pair's AUC difference on the same images (seed by seed when several)."""
    rows = []
    for part, arm, base in pairs:
        a, b = scores(preds[arm]), scores(preds[base])
        if len(a) == 1:
            d = paired_bootstrap_difference(y, a[0], b[0], n_boot=n_boot, seed=seed)
        else:
            d = paired_bootstrap_mean_auc_difference(y, list(a), list(b), n_boot=n_boot,
                                                     seed=seed)
        rows.append({"part": part, "arm": arm.name, "label": arm.label,
                     "baseline": base.name, "baseline_label": base.label,
                     "auc_difference": d["diff"], "lo": d["diff_lo"], "hi": d["diff_hi"],
                     "p_value": d["p_value"]})
    return pd.DataFrame(rows)


def run_study(config: StudyConfig) -> Path:
    out = output_folder(config.out, "study (tables and report)", marker="report.html")
    started = time.perf_counter()
    design = make_design(config, out)
    cache = StageCache(out / "stages", config.progress)
    pipeline = Pipeline(config, design, cache)
    parts = planned_arms(config, design.public_manifest)
    arms = list(dict.fromkeys(a for group in parts.values() for a in group))
    pairs = comparisons(parts)
    arms += [b for _, _, b in pairs if b not in arms]  # baselines outside the parts
    check_privacy_design(pipeline, arms, out / "stages" / "design")
    check_specs(config.central.translators)  # unknown kinds, missing configs: now
    dump_config(config, out / "config.yaml")
    seconds = {"design": time.perf_counter() - started}
    shift = None
    if "shift" in config.parts:
        from harmonize.study.shift import run_shift

        t = time.perf_counter()
        harmonized = {"central": pipeline.harmonized("central"),
                      "federated": pipeline.harmonized("federated"),
                      **{t.name: pipeline.harmonized(t.name)
                         for t in config.central.translators}}
        shift = cache.run("part1_shift", {"harmonized": harmonized, "seed": config.seed,
                                          "bootstrap": config.bootstrap},
                          lambda folder: run_shift(design, harmonized, folder,
                                                   config.bootstrap, config.seed,
                                                   config.progress))
        seconds["part 1: site shift"] = time.perf_counter() - t
    seeds = classifier_seeds(config)
    preds = {}
    for part, group in parts.items():
        t = time.perf_counter()
        for arm in group:
            if arm not in preds:
                preds[arm] = [pipeline.predictions(arm, s) for s in seeds]
        seconds[f"part: {part}"] = time.perf_counter() - t
    for arm in arms:  # baselines not trained by their own part
        if arm not in preds:
            preds[arm] = [pipeline.predictions(arm, s) for s in seeds]
    y = design.labels[design.test_rows]
    table = score_arms(y, preds, config.bootstrap, config.seed)
    diffs = paired_differences(y, preds, pairs, config.bootstrap, config.seed)
    write_csv(table, out / "arms.csv")
    write_csv(diffs, out / "differences.csv")
    left_out = None
    if "central" in parts and config.central.leave_one_node_out:
        t = time.perf_counter()
        left_out = score_left_out(pipeline, parts["central"], config)
        write_csv(left_out[0], out / LEFT_OUT_ARMS)
        write_csv(left_out[1], out / LEFT_OUT_DIFFERENCES)
        seconds["part 2: leave one node out"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    summary = {"design": {"manifest": str(design.manifest), "images": len(design.df),
                          "patients": int(design.df["patient_id"].nunique()),
                          "hospitals": int(design.df["site"].nunique()),
                          "training_nodes": design.training_nodes,
                          "external_node": design.external_node,
                          "external_images": len(design.test_rows),
                          "reference_site": design.reference_site,
                          "positive": design.positive},
               "shift": shift, "arms": str(out / "arms.csv"),
               "differences": str(out / "differences.csv"), "seconds": seconds,
               "stage_seconds": cache.seconds, "reused_stages": cache.reused}
    text = json.dumps(summary, indent=2, default=str) + "\n"
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(text))
    from harmonize.study.report import write_study_report

    write_study_report(out, config, design, summary, table, diffs, left_out)
    return out


LEFT_OUT_ARMS = "arms_leave_one_node_out.csv"
LEFT_OUT_DIFFERENCES = "differences_leave_one_node_out.csv"


def score_left_out(pipeline: Pipeline, central: list[Arm], config: StudyConfig
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Part 2 under leave-one-node-out, for the study's classifier: every training node's
    images scored by the arm trained on the other training nodes, pooled (the study's
    seed only: one training per node and arm already)."""
    arms = [a for a in central if a.arch is None and a.images in ("raw", "central")]
    preds = {arm: [pipeline.left_out_predictions(arm)] for arm in arms}
    pairs = [("central", a, augmentation_baseline(a)) for a in arms
             if a != augmentation_baseline(a)]
    y = pipeline.design.labels[pipeline.design.train_rows]
    return (score_arms(y, preds, config.bootstrap, config.seed),
            paired_differences(y, preds, pairs, config.bootstrap, config.seed))


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
