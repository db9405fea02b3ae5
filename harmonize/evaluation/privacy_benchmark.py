"""Privacy vs quality of federated harmonization (eval/federated_privacy.py): each task
trained with patient-level DP-SGD at every node (`privacy.mode: patient-dp`) at several
epsilons per patient (inf = no DP) and seeds, scored as without DP.

Translators (`ddib`, `cyclegan`, `histogram`) are scored on the synthetic benchmark by
SSIM to the paired truth, with the share of the non-private gain over identity they
keep; the federated classifier by AUC on held-out patients and on an unseen site."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.classify.metrics import bootstrap_mean_auc, bootstrap_metrics
from harmonize.classify.train import load_classifier, load_images, predict
from harmonize.data.manifest import binary_targets, load_manifest, save_manifest
from harmonize.data.splits import patient_split
from harmonize.evaluation.federated_benchmark import (
    CONFIGS,
    Benchmark,
    Scores,
    cyclegan_federated,
    ddib_federated,
    translate_at_nodes,
)
from harmonize.evaluation.report import markdown_table
from harmonize.metrics import bootstrap_mean_ci
from harmonize.report.html import subplots
from harmonize.synth import generate

DELTA = 1e-5  # below 1 / patients at every node
TRANSLATOR_TASKS = ("ddib", "cyclegan", "histogram")
TASKS = (*TRANSLATOR_TASKS, "classifier")
METHODS = {"ddib": "federated DDIB, local priors", "cyclegan": "federated CycleGAN K=1",
           "histogram": "federated histogram matching"}


def privacy(eps: float, extra: dict | None = None) -> dict | None:
    """The `privacy` section of a federated config at `eps` per patient (None: no DP)."""
    if math.isinf(eps):
        return None
    return {"mode": "patient-dp", "epsilon": eps, "delta": DELTA, **(extra or {})}


def label(eps: float) -> str:
    """Epsilon as the tables and run folders name it ("inf", "10", "0.5")."""
    return "inf" if math.isinf(eps) else f"{eps:g}"


@dataclass
class PrivacySettings:
    """One privacy sweep. per_site (default 40, classifier 100) and steps (default 200,
    cyclegan 300) follow the task; runs (default OUT/runs) keeps the translators'
    finished runs for reuse. size: the translators' benchmark image size."""

    task: str
    out: Path
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epsilons: list[float] = field(default_factory=lambda: [math.inf, 50.0, 10.0, 3.0])
    per_site: int | None = None
    steps: int | None = None
    patients_per_step: int | None = None
    rounds: int = 10  # classifier rounds
    landmarks: int = 8  # histogram landmarks
    parallel_nodes: int = 2
    runs: Path | None = None
    size: int = 64

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}: choose one of {', '.join(TASKS)}")
        self.out = Path(self.out)
        self.per_site = self.per_site or (100 if self.task == "classifier" else 40)
        self.steps = self.steps or (300 if self.task == "cyclegan" else 200)
        self.runs = Path(self.runs) if self.runs else self.out / "runs"


# --- translators (synthetic benchmark, paired truth) ----------------------------------------
def run_translator(s: PrivacySettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (epsilon, seed) the translator's SSIM, spent epsilon and DP plan (results), and
    per epsilon the seed-mean SSIM with its CI over images (summary); writes
    OUT/scores.csv and OUT/per_image.csv. Finished runs in `s.runs` are reused."""
    bench = Benchmark(s.out, s.per_site, s.size)
    scores = Scores(bench)
    dp_extra = {"patients_per_step": s.patients_per_step}

    def histogram(run: Path, seed: int, eps: float) -> tuple[list, dict, dict]:
        from harmonize.federated.config import load_federated_config
        from harmonize.federated.run import run_federated
        from harmonize.translators import load_translator

        if not (run / "summary.json").is_file():
            cfg = load_federated_config(CONFIGS / "federated/histogram.yaml", {
                "manifest": str(bench.fed_manifest), "reference_site": bench.ref,
                "out": str(run), "seed": seed, "progress": False,
                "histogram.landmarks": s.landmarks,
                **({"privacy": privacy(eps)} if privacy(eps) else {})})
            run_federated(cfg)
        summary = json.loads((run / "summary.json").read_text())
        t = load_translator(summary["model"])
        return (t.transform(bench.inputs, list(bench.test["site"])), summary,
                {"wall_s": summary["seconds"]})

    def ddib(run: Path, seed: int, eps: float) -> tuple[list, dict, dict]:
        summary, extra = ddib_federated(
            bench, run, seed, s.steps, "local", rounds=s.rounds,
            parallel_nodes=s.parallel_nodes, privacy=privacy(eps, dp_extra))
        return translate_at_nodes(bench, summary["node_models"]), summary, extra

    def cyclegan(run: Path, seed: int, eps: float) -> tuple[list, dict, dict]:
        t, extra, summary = cyclegan_federated(
            bench, run, seed, s.steps, 2, 1, parallel_nodes=s.parallel_nodes,
            privacy=privacy(eps, dp_extra))
        if "patient_dp" not in summary and (run / "summary.json").is_file():
            summary = json.loads((run / "summary.json").read_text())
        return t.transform(bench.inputs, list(bench.test["site"])), summary, extra

    train = {"ddib": ddib, "cyclegan": cyclegan, "histogram": histogram}[s.task]
    prefix = {"ddib": "local", "cyclegan": "federated_k1",
              "histogram": f"hm{s.landmarks}"}[s.task]
    rows = []
    for seed in s.seeds:
        scores.add("identity", seed, bench.inputs, {})
        for eps in s.epsilons:
            name = prefix if math.isinf(eps) else f"{prefix}_dp{label(eps)}"
            outputs, summary, extra = train(s.runs / f"{name}_s{seed}", seed, eps)
            scores.add(f"eps {label(eps)}", seed, outputs, extra)
            plan = (summary.get("patient_dp") or {}).get(bench.ref, {})
            rows.append({"epsilon": label(eps), "seed": seed, "ssim": scores.rows[-1]["ssim"],
                         "spent_epsilon": summary.get("epsilon"),
                         "noise_multiplier": plan.get("noise_multiplier"),
                         "sample_rate": plan.get("sample_rate"), "dp_steps": plan.get("steps"),
                         "wall_s": extra["wall_s"]})
    per = pd.concat(scores.per_image)
    results = pd.DataFrame(rows)
    table = translator_summary(per, results, METHODS[s.task], s.epsilons)
    pd.DataFrame(scores.rows).to_csv(s.out / "scores.csv", index=False)
    per.to_csv(s.out / "per_image.csv", index=False)
    return results, table


def translator_summary(per: pd.DataFrame, results: pd.DataFrame, method: str,
                       epsilons: list[float]) -> pd.DataFrame:
    """Per epsilon: the seed-mean SSIM with a bootstrap CI over images, identity's SSIM,
    and the share of the non-private gain over identity kept ((SSIM - identity) /
    (SSIM at inf - identity)); `per` as `Scores.per_image` with methods "identity" and
    "eps LABEL", `results` one row per epsilon and seed."""
    ident = per[per["method"] == "identity"].groupby("relpath")["ssim"].mean()
    nonprivate = per[per["method"] == "eps inf"].groupby("relpath")["ssim"].mean()
    table = []
    for eps in epsilons:
        m = per[per["method"] == f"eps {label(eps)}"].groupby("relpath")["ssim"].mean()
        mean, lo, hi = bootstrap_mean_ci(m.tolist())
        gain = nonprivate.mean() - ident.mean() if len(nonprivate) else float("nan")
        r = results[results["epsilon"] == label(eps)]
        table.append({"method": method, "epsilon": label(eps),
                      "ssim": mean, "ssim_lo": lo, "ssim_hi": hi,
                      "identity": float(ident.mean()),
                      "share_of_nonprivate_gain": (mean - ident.mean()) / gain,
                      "ssim_per_seed": " / ".join(f"{v:.3f}" for v in r["ssim"]),
                      "noise_multiplier": r["noise_multiplier"].mean(),
                      "sample_rate": r["sample_rate"].mean(),
                      "wall_s": r["wall_s"].mean()})
    return pd.DataFrame(table)


# --- classifier ----------------------------------------------------------------------------
def run_classifier(s: PrivacySettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The federated GroupNorm CNN over 3 of 4 synthetic sites' nodes (OUT/data, runs in
    OUT/runs, reused when finished): per (epsilon, seed, test set) its AUC with a
    bootstrap CI (results), and per test set and epsilon the seed-mean AUC (summary)."""
    from harmonize.federated.config import load_federated_config
    from harmonize.federated.run import run_federated

    out = s.out
    data = out / "data"
    if not (data / "manifest.csv").is_file():
        generate(data, sites=4, per_site=s.per_site, size=128, seed=0, finding_scale=2.5,
                 progress=False)
    df = load_manifest(data / "manifest.csv")
    unseen_site = sorted(df["site"].astype(str).unique())[-1]
    unseen = df[df["site"] == unseen_site]
    nodes = pd.concat([patient_split(g, test_size=0.25, seed=0)
                       for site, g in df.groupby("site") if site != unseen_site]).sort_index()
    manifest = out / "manifest.csv"
    save_manifest(nodes, manifest)
    held = nodes[nodes["split"] == "test"]
    config = CONFIGS / "federated/classifier-quick.yaml"
    size = load_federated_config(config).classifier.image_size
    sets = {"held-out patients": (load_images(held["path"].tolist(), size, progress=False),
                                  binary_targets(held)),
            f"unseen site ({unseen_site})": (load_images(unseen["path"].tolist(), size,
                                                         progress=False),
                                             binary_targets(unseen))}
    rows, probs = [], {}
    for seed in s.seeds:
        for eps in s.epsilons:
            run = out / "runs" / f"eps{label(eps)}_s{seed}"
            if not (run / "summary.json").is_file():
                cfg = load_federated_config(config, {
                    "manifest": str(manifest), "out": str(run), "seed": seed,
                    "rounds": s.rounds, "progress": False, "evaluate": False,
                    "classifier.model.norm": "group",
                    "classifier.balance": "none",  # patient-dp needs it; same for all
                    **({"privacy": privacy(eps)} if privacy(eps) else {})})
                run_federated(cfg)
            summary = json.loads((run / "summary.json").read_text())
            model, _, _ = load_classifier(summary["model"])
            for name, (x, y) in sets.items():
                p = predict(model.eval(), x)
                probs[(label(eps), seed, name)] = p
                m = bootstrap_metrics(y, p, seed=0)
                rows.append({"epsilon": label(eps), "seed": seed, "test": name,
                             "auc": m["auc"], "auc_lo": m["auc_lo"], "auc_hi": m["auc_hi"],
                             "spent_epsilon": summary.get("epsilon"),
                             "seconds": summary.get("seconds")})
            print(rows[-2], rows[-1], flush=True)
    results = pd.DataFrame(rows)
    table = []
    for name, (_, y) in sets.items():
        for eps in s.epsilons:
            r = results[(results["epsilon"] == label(eps)) & (results["test"] == name)]
            m = bootstrap_mean_auc(y, [probs[(label(eps), seed, name)] for seed in s.seeds])
            table.append({"method": "federated CNN (GroupNorm)", "test": name,
                          "epsilon": label(eps), "auc": m["auc"],
                          "auc_lo": m["auc_lo"], "auc_hi": m["auc_hi"],
                          "auc_per_seed": " / ".join(f"{v:.3f}" for v in r["auc"]),
                          "seconds": r["seconds"].mean()})
    return results, pd.DataFrame(table)


def run_privacy_benchmark(s: PrivacySettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the sweep and write its outputs (`write_outputs`): (results, summary)."""
    s.out.mkdir(parents=True, exist_ok=True)
    results, table = run_classifier(s) if s.task == "classifier" else run_translator(s)
    write_outputs(s.out, s.task, results, table)
    return results, table


# --- outputs -------------------------------------------------------------------------------
def write_outputs(out: Path, task: str, results: pd.DataFrame, table: pd.DataFrame) -> None:
    """OUT/results.csv (per epsilon and seed), OUT/summary.csv and summary.md (per
    epsilon), and the plot OUT/epsilon_quality.png."""
    results.to_csv(out / "results.csv", index=False)
    table.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(markdown_table(table))
    plot(table, task, out / "epsilon_quality.png")


def plot(table: pd.DataFrame, task: str, path: Path) -> None:
    """The summary's score (SSIM, or AUC per test set) with its CI against epsilon."""
    metric = "auc" if task == "classifier" else "ssim"
    fig, ax = subplots(figsize=(5, 3.4))
    groups = table.groupby("test") if "test" in table else [("", table)]
    for name, part in groups:
        x = np.arange(len(part))
        ax.errorbar(x, part[metric], yerr=[part[metric] - part[f"{metric}_lo"],
                                           part[f"{metric}_hi"] - part[metric]],
                    marker="o", capsize=3, label=name or part["method"].iloc[0])
        ax.set_xticks(x, [f"eps {e}" for e in part["epsilon"]])
    if task != "classifier":
        ax.axhline(table["identity"].iloc[0], color="grey", ls="--", label="identity")
    ax.set_ylabel(metric.upper())
    ax.set_xlabel("epsilon per patient (delta 1e-5)")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, -0.5), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_combined(dirs: list[Path], path: Path) -> None:
    """The docs' figure: each translator's SSIM (left) and the classifier's AUC (right)
    against epsilon per patient, from finished runs' summary.csv."""
    tables = [pd.read_csv(d / "summary.csv") for d in dirs if (d / "summary.csv").is_file()]
    fig, (left, right) = subplots(1, 2, figsize=(9.5, 3.6))
    order = ["inf", "50", "10", "3"]
    for t in tables:
        t = t.assign(epsilon=[label(float(e)) for e in t["epsilon"]])
        parts = (t.groupby("test", sort=False) if "test" in t
                 else [(t["method"].iloc[0], t)])
        ax, metric = (right, "auc") if "test" in t else (left, "ssim")
        for name, part in parts:
            part = part[part["epsilon"].isin(order)]
            xs = [order.index(e) for e in part["epsilon"]]
            ax.errorbar(xs, part[metric], yerr=[part[metric] - part[f"{metric}_lo"],
                                                part[f"{metric}_hi"] - part[metric]],
                        marker="o", capsize=3, label=name)
        if metric == "ssim":
            ident = float(t["identity"].iloc[0])
    for ax, ylabel in ((left, "SSIM to the truth"), (right, "AUC")):
        ax.set_xticks(range(len(order)), [f"{e}" for e in order])
        ax.set_xlabel("epsilon per patient (delta 1e-5)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    if any("ssim" in t for t in tables):
        left.axhline(ident, color="grey", ls="--", lw=1)
        left.text(len(order) - 1, ident, "identity", fontsize=7, va="bottom", ha="right")
    right.axhline(0.5, color="grey", ls="--", lw=1)
    left.set_title("translators (synthetic, 30 patients per node)", fontsize=9)
    right.set_title("federated classifier (GroupNorm CNN)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
