"""Privacy vs quality of federated harmonization: patient-level DP-SGD at each node
(`privacy.mode: patient-dp`) at epsilon per patient in --epsilons (inf = no DP), seeds.

- `--task ddib`: federated DDIB with local priors on the synthetic benchmark (4 sites x
  --per-site patients, 64 px, paired truth). Only the reference prior leaves its node, so
  only it trains with DP-SGD. Score: SSIM of every held-out non-reference image to its
  truth; share of the non-private gain over identity = (SSIM - identity) / (SSIM at inf
  - identity). Non-private runs are reused from --runs (eval/federated_translators.py's).
- `--task cyclegan`: the federated CycleGAN at K = 1 (all four networks DP-SGD trained
  at every node), same data and score; non-private runs reused from --runs.
- `--task histogram`: federated histogram matching (the reference node releases
  --landmarks intensity quantiles once, with the Gaussian mechanism under DP), same data
  and score.
- `--task classifier`: the federated CNN (GroupNorm, as DP-SGD needs) over 3 sites' nodes;
  AUC on their held-out patients and on the unseen 4th site.

CIs: 95% bootstrap over images of the seed-mean score (SSIM) or of the seed-mean AUC
(`classify.metrics.bootstrap_mean_auc`: stratified, every seed's model scored on each
resample); each seed's own interval in results.csv. delta 1e-5 (below 1 / patients at
every node).

    python eval/federated_privacy.py --task ddib --seeds 0,1,2 --runs eval_out/fed_ddib/runs
    python eval/federated_privacy.py --task classifier --seeds 0,1,2

Writes OUT/results.csv (per method, epsilon, seed), OUT/summary.csv / summary.md, the
plot OUT/epsilon_quality.png, and prints the summary.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from harmonize.classify.metrics import bootstrap_mean_auc, bootstrap_metrics  # noqa: E402
from harmonize.classify.train import load_classifier, load_images, predict  # noqa: E402
from harmonize.data.manifest import binary_targets, load_manifest, save_manifest  # noqa: E402
from harmonize.data.splits import patient_split  # noqa: E402
from harmonize.evaluation.federated_benchmark import (  # noqa: E402
    Benchmark,
    Scores,
    cyclegan_federated,
    ddib_federated,
    translate_at_nodes,
)
from harmonize.evaluation.report import markdown_table  # noqa: E402
from harmonize.federated.config import load_federated_config  # noqa: E402
from harmonize.federated.run import run_federated  # noqa: E402
from harmonize.metrics import bootstrap_mean_ci  # noqa: E402
from harmonize.synth import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5


def privacy(eps: float, extra: dict | None = None) -> dict | None:
    if math.isinf(eps):
        return None
    return {"mode": "patient-dp", "epsilon": eps, "delta": DELTA, **(extra or {})}


def label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


# --- translators (synthetic benchmark, paired truth) ----------------------------------------
def run_translator(args, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    bench = Benchmark(out, args.per_site, 64)
    scores = Scores(bench)
    method = {"ddib": "federated DDIB, local priors", "cyclegan": "federated CycleGAN K=1",
              "histogram": "federated histogram matching"}[args.task]

    def histogram(run: Path, seed: int, eps: float) -> tuple[list, dict, dict]:
        from harmonize.translators import load_translator

        if not (run / "summary.json").is_file():
            cfg = load_federated_config(ROOT / "configs/federated/histogram.yaml", {
                "manifest": str(bench.fed_manifest), "reference_site": bench.ref,
                "out": str(run), "seed": seed, "progress": False,
                "histogram.landmarks": args.landmarks,
                **({"privacy": privacy(eps)} if privacy(eps) else {})})
            run_federated(cfg)
        summary = json.loads((run / "summary.json").read_text())
        t = load_translator(summary["model"])
        return (t.transform(bench.inputs, list(bench.test["site"])), summary,
                {"wall_s": summary["seconds"]})

    def ddib(run: Path, seed: int, eps: float) -> tuple[list, dict, dict]:
        summary, extra = ddib_federated(
            bench, run, seed, args.steps, "local", rounds=args.rounds,
            parallel_nodes=args.parallel_nodes,
            privacy=privacy(eps, {"patients_per_step": args.patients_per_step}))
        return translate_at_nodes(bench, summary["node_models"]), summary, extra

    def cyclegan(run: Path, seed: int, eps: float) -> tuple[list, dict, dict]:
        t, extra, summary = cyclegan_federated(
            bench, run, seed, args.steps, 2, 1, parallel_nodes=args.parallel_nodes,
            privacy=privacy(eps, {"patients_per_step": args.patients_per_step}))
        if "patient_dp" not in summary and (run / "summary.json").is_file():
            summary = json.loads((run / "summary.json").read_text())
        return t.transform(bench.inputs, list(bench.test["site"])), summary, extra

    train = {"ddib": ddib, "cyclegan": cyclegan, "histogram": histogram}[args.task]
    prefix = {"ddib": "local", "cyclegan": "federated_k1",
              "histogram": f"hm{args.landmarks}"}[args.task]
    rows = []
    for seed in args.seeds:
        scores.add("identity", seed, bench.inputs, {})
        for eps in args.epsilons:
            name = prefix if math.isinf(eps) else f"{prefix}_dp{label(eps)}"
            outputs, summary, extra = train(args.runs / f"{name}_s{seed}", seed, eps)
            scores.add(f"eps {label(eps)}", seed, outputs, extra)
            plan = (summary.get("patient_dp") or {}).get(bench.ref, {})
            rows.append({"epsilon": label(eps), "seed": seed, "ssim": scores.rows[-1]["ssim"],
                         "spent_epsilon": summary.get("epsilon"),
                         "noise_multiplier": plan.get("noise_multiplier"),
                         "sample_rate": plan.get("sample_rate"), "dp_steps": plan.get("steps"),
                         "wall_s": extra["wall_s"]})
    per = pd.concat(scores.per_image)
    table = []
    ident = per[per["method"] == "identity"].groupby("relpath")["ssim"].mean()
    nonprivate = per[per["method"] == "eps inf"].groupby("relpath")["ssim"].mean()
    results = pd.DataFrame(rows)
    for eps in args.epsilons:
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
    pd.DataFrame(scores.rows).to_csv(out / "scores.csv", index=False)
    per.to_csv(out / "per_image.csv", index=False)
    return results, pd.DataFrame(table)


# --- classifier ----------------------------------------------------------------------------
def run_classifier(args, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    data = out / "data"
    if not (data / "manifest.csv").is_file():
        generate(data, sites=4, per_site=args.per_site, size=128, seed=0, finding_scale=2.5,
                 progress=False)
    df = load_manifest(data / "manifest.csv")
    unseen_site = sorted(df["site"].astype(str).unique())[-1]
    unseen = df[df["site"] == unseen_site]
    nodes = pd.concat([patient_split(g, test_size=0.25, seed=0)
                       for s, g in df.groupby("site") if s != unseen_site]).sort_index()
    manifest = out / "manifest.csv"
    save_manifest(nodes, manifest)
    held = nodes[nodes["split"] == "test"]
    base = load_federated_config(ROOT / "configs/federated/classifier-quick.yaml")
    size = base.classifier.image_size
    sets = {"held-out patients": (load_images(held["path"].tolist(), size, progress=False),
                                  binary_targets(held)),
            f"unseen site ({unseen_site})": (load_images(unseen["path"].tolist(), size,
                                                         progress=False),
                                             binary_targets(unseen))}
    rows, probs = [], {}
    for seed in args.seeds:
        for eps in args.epsilons:
            run = out / "runs" / f"eps{label(eps)}_s{seed}"
            if not (run / "summary.json").is_file():
                cfg = load_federated_config(ROOT / "configs/federated/classifier-quick.yaml", {
                    "manifest": str(manifest), "out": str(run), "seed": seed,
                    "rounds": args.rounds, "progress": False, "evaluate": False,
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
        for eps in args.epsilons:
            r = results[(results["epsilon"] == label(eps)) & (results["test"] == name)]
            m = bootstrap_mean_auc(y, [probs[(label(eps), s, name)] for s in args.seeds])
            table.append({"method": "federated CNN (GroupNorm)", "test": name,
                          "epsilon": label(eps), "auc": m["auc"],
                          "auc_lo": m["auc_lo"], "auc_hi": m["auc_hi"],
                          "auc_per_seed": " / ".join(f"{v:.3f}" for v in r["auc"]),
                          "seconds": r["seconds"].mean()})
    return results, pd.DataFrame(table)


def plot(table: pd.DataFrame, task: str, path: Path) -> None:
    metric = "auc" if task == "classifier" else "ssim"
    fig, ax = plt.subplots(figsize=(5, 3.4))
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
    plt.close(fig)


def plot_combined(dirs: list[Path], path: Path) -> None:
    """The docs' figure: each translator's SSIM (left) and the classifier's AUC (right)
    against epsilon per patient, from finished runs' summary.csv."""
    tables = [pd.read_csv(d / "summary.csv") for d in dirs if (d / "summary.csv").is_file()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
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
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["ddib", "cyclegan", "histogram", "classifier"],
                    default="ddib")
    ap.add_argument("--out", default=None, help="default: eval_out/privacy_TASK")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epsilons", default="inf,50,10,3")
    ap.add_argument("--per-site", type=int, default=None, help="default: 40 (ddib), "
                    "100 (classifier)")
    ap.add_argument("--steps", type=int, default=None, help="ddib: steps of each prior "
                    "(default 200); cyclegan: rounds at K = 1 (default 300)")
    ap.add_argument("--patients-per-step", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=10, help="classifier rounds")
    ap.add_argument("--landmarks", type=int, default=8, help="histogram: landmarks")
    ap.add_argument("--parallel-nodes", type=int, default=2)
    ap.add_argument("--runs", default=None, help="runs folder (default OUT/runs); "
                    "finished runs there are reused")
    ap.add_argument("--combine", nargs="+", default=None, metavar="DIR",
                    help="only draw the combined figure of finished outputs to --out (a PNG)")
    args = ap.parse_args()
    if args.combine:
        plot_combined([Path(d) for d in args.combine], Path(args.out))
        return
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.epsilons = [float(e) for e in args.epsilons.split(",")]
    args.per_site = args.per_site or (100 if args.task == "classifier" else 40)
    args.steps = args.steps or (300 if args.task == "cyclegan" else 200)
    out = Path(args.out or f"eval_out/privacy_{args.task}")
    out.mkdir(parents=True, exist_ok=True)
    args.runs = Path(args.runs) if args.runs else out / "runs"
    torch.set_num_threads(2)
    started = time.perf_counter()
    rows, table = (run_classifier(args, out) if args.task == "classifier"
                   else run_translator(args, out))
    rows.to_csv(out / "results.csv", index=False)
    table.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(markdown_table(table))
    plot(table, args.task, out / "epsilon_quality.png")
    (out / "settings.json").write_text(json.dumps(
        {**vars(args), "runs": str(args.runs), "wall_s": time.perf_counter() - started},
        indent=2))
    print(markdown_table(table))


if __name__ == "__main__":
    main()
