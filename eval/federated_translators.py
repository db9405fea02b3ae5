"""Federated vs central translators on the synthetic benchmark (paired truth), several seeds.

CycleGAN (`--task cyclegan`): the central product (`train_cyclegan`, batch S x B) against
the federated CycleGAN (`harmonize federated`, Flower simulation, one node per site,
source batch B per node, reference batch S x B) at K local steps per round, K in --ks,
for the same total steps (rounds = steps / K); identity and histogram matching beside.
DDIB (`--task diffusion`): central per-site DDIB (`train_diffusion`) against federated
DDIB with local priors (each prior trained at its node, only the reference prior
travels, every node translates its own images) and with one shared site-conditioned
prior, same steps per prior.

Scores: SSIM / PSNR of every held-out non-reference image against its truth, per seed;
the table gives the mean over seeds, a 95% bootstrap CI over images (of the seed-mean
score), the per-seed means, and each method's paired difference to central (CI over
images). Also the memorization check of everything that leaves a node (translations and
F's renderings, or draws from each travelling prior, against the training images of the
site whose style they carry), bytes sent per node per round and wall time per round.

    python eval/federated_translators.py --task cyclegan --seeds 0,1,2 --ks 1,5,20
    python eval/federated_translators.py --task diffusion --seeds 0,1,2
    python eval/federated_translators.py --task cyclegan --seeds 0 --ks 1 --steps 20  # smoke

Writes OUT/results.csv (one row per method and seed), OUT/summary.csv + summary.md,
OUT/per_image.csv, OUT/k_sweep.png (CycleGAN) and prints the summary.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from harmonize.evaluation.federated_benchmark import (  # noqa: E402
    Benchmark,
    Scores,
    cyclegan_central,
    cyclegan_federated,
    ddib_central,
    ddib_federated,
    translate_at_nodes,
)
from harmonize.evaluation.report import markdown_table  # noqa: E402
from harmonize.memorization import memorization_report  # noqa: E402
from harmonize.translators import HistogramMatching, load_translator  # noqa: E402


def reverse_memorization(bench: Benchmark, run_dir: Path, cfg_path: Path) -> float:
    """F renders reference images as each source site: flagged share against that site's
    training images (F's weights leave every node)."""
    from safetensors.torch import load_file

    from harmonize.federated.config import load_federated_config as load
    from harmonize.federated.cyclegan_task import CycleGANTask
    from harmonize.federated.server_app import SHARED_WEIGHTS

    task = CycleGANTask(load(cfg_path))
    arrays = load_file(run_dir / SHARED_WEIGHTS)
    f = task.reverse_generator(arrays)
    ref_test = torch.from_numpy(np.stack(bench.site_images(bench.ref, "test")))[:, None]
    flagged = []
    for i, site in enumerate(task.sites):
        cond = torch.zeros(len(ref_test), len(task.sites))
        cond[:, i] = 1
        with torch.no_grad():
            x = torch.nn.functional.interpolate(ref_test, size=task.size, mode="area") * 2 - 1
            rendered = ((f(x, cond) + 1) / 2).clamp(0, 1)[:, 0].numpy()
        mem = memorization_report(list(rendered), bench.site_images(site, "train"),
                                  bench.site_images(site, "test"))
        flagged.append(mem["flagged_share"])
    return float(np.mean(flagged))


def run_cyclegan(args, out: Path) -> Scores:
    bench = Benchmark(out, args.per_site, 64)
    scores = Scores(bench)
    for seed in args.seeds:
        scores.add("identity", seed, bench.inputs, {})
        ref_train = bench.site_images(bench.ref, "train")
        hm = HistogramMatching().fit(zip(ref_train, [bench.ref] * len(ref_train), strict=True),
                                     bench.ref)
        scores.add("histogram-matching", seed, hm.transform(bench.inputs, list(bench.test["site"])),
                   {})
        t, wall = cyclegan_central(bench, args.runs / f"central_s{seed}", seed, args.steps,
                                   args.batch)
        scores.add("central", seed, t.transform(bench.inputs, list(bench.test["site"])),
                   {"wall_s": wall, "rounds": args.steps})
        for k in args.ks:
            lr_tag = "_lrk" if args.server_lr_scale == "k" else ""
            run_dir = args.runs / f"federated_k{k}{lr_tag}_s{seed}"
            t, extra, _ = cyclegan_federated(
                bench, run_dir, seed, args.steps, args.batch, k,
                parallel_nodes=args.parallel_nodes, local_lr=args.local_lr,
                server_lr_scale=args.server_lr_scale)
            extra["reverse_memorized_share"] = reverse_memorization(
                bench, run_dir, run_dir / "config.yaml")
            scores.add(f"federated K={k}" + (" lr x K" if lr_tag else ""), seed,
                       t.transform(bench.inputs, list(bench.test["site"])), extra)
    return scores


def plot_k_sweep(summary: pd.DataFrame, path: Path) -> None:
    fed = summary[summary["method"].str.startswith("federated K=")].sort_values("K")
    if fed.empty:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.5, 3.2))
    scaled = fed["method"].str.contains("lr x K")
    k1 = fed[(~scaled) & (fed["K"] == 1)]  # at K = 1 both rules are the same run
    for part, label in ((fed[~scaled], "server lr = central lr"),
                        (pd.concat([k1, fed[scaled]]) if scaled.any() else fed[scaled],
                         "server lr = central lr x K")):
        if not part.empty:
            a.errorbar(part["K"], part["ssim"], yerr=[part["ssim"] - part["ssim_lo"],
                                                      part["ssim_hi"] - part["ssim"]],
                       marker="o", capsize=3, label=label)
    a.legend(fontsize=7, loc="lower left")
    for name, style in (("central", "--"), ("identity", ":"), ("histogram-matching", "-.")):
        row = summary[summary["method"] == name]
        if not row.empty:
            a.axhline(float(row["ssim"].iloc[0]), ls=style, color="grey", lw=1)
            a.text(fed["K"].max(), float(row["ssim"].iloc[0]), f" {name}", fontsize=7,
                   va="bottom", ha="right")
    a.set_xscale("log")
    a.set_xticks(fed["K"], [str(int(k)) for k in fed["K"]])
    a.set_xlabel("K, local steps between aggregations")
    a.set_ylabel("SSIM to the paired truth")
    fed = fed[~scaled] if (~scaled).any() else fed
    total_mb = fed["bytes_per_node_round"] * fed["rounds"] / 1e6
    b.plot(fed["K"], total_mb, marker="o")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xticks(fed["K"], [str(int(k)) for k in fed["K"]])
    b.set_xlabel("K")
    b.set_ylabel("MB sent per node, whole run")
    b.set_title(f"{fed['bytes_per_node_round'].iloc[0] / 1e6:.2f} MB per node per round",
                fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["cyclegan", "diffusion"], default="cyclegan")
    ap.add_argument("--out", default=None, help="default: eval_out/federated_TASK")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--per-site", type=int, default=40)
    ap.add_argument("--steps", type=int, default=300, help="central optimizer steps; "
                    "federated: rounds x K")
    ap.add_argument("--batch", type=int, default=2, help="images per source node per step")
    ap.add_argument("--ks", default="1,5,20", help="CycleGAN: local steps per round")
    ap.add_argument("--local-lr", type=float, default=None)
    ap.add_argument("--server-lr-scale", choices=["1", "k"], default=None,
                    help="server Adam lr = central lr (1) or central lr x K (k)")
    ap.add_argument("--rounds", type=int, default=10, help="DDIB shared prior: rounds "
                    "(steps / rounds local steps each)")
    ap.add_argument("--parallel-nodes", type=int, default=2)
    ap.add_argument("--runs", default=None, help="training runs folder (default OUT/runs); "
                    "finished runs found there are reused, so several tables can share runs")
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.ks = [int(k) for k in args.ks.split(",") if k]
    out = Path(args.out or f"eval_out/federated_{args.task}")
    out.mkdir(parents=True, exist_ok=True)
    args.runs = Path(args.runs) if args.runs else out / "runs"
    torch.set_num_threads(2)
    started = time.perf_counter()
    scores = run_cyclegan(args, out) if args.task == "cyclegan" else run_diffusion(args, out)
    results = pd.DataFrame(scores.rows)
    results.to_csv(out / "results.csv", index=False)
    pd.concat(scores.per_image).to_csv(out / "per_image.csv", index=False)
    summary = scores.summary()
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(markdown_table(summary))
    if args.task == "cyclegan":
        plot_k_sweep(summary, out / "k_sweep.png")
    (out / "settings.json").write_text(json.dumps(
        {**vars(args), "runs": str(args.runs), "wall_s": time.perf_counter() - started},
        indent=2))
    print(markdown_table(summary))


def prior_memorization(bench: Benchmark, translator, sites: list[str]) -> float:
    """Draws from each travelling prior against that site's training images."""
    flagged = []
    for site in sites:
        draws = [x[0].numpy() for x in translator.sample_prior(16, site)]
        flagged.append(memorization_report(draws, bench.site_images(site, "train"),
                                           bench.site_images(site, "test"))["flagged_share"])
    return float(np.mean(flagged))


def run_diffusion(args, out: Path) -> Scores:
    bench = Benchmark(out, args.per_site, 64)
    scores = Scores(bench)
    sites = list(bench.test["site"])
    for seed in args.seeds:
        scores.add("identity", seed, bench.inputs, {})
        ref_train = bench.site_images(bench.ref, "train")
        hm = HistogramMatching().fit(zip(ref_train, [bench.ref] * len(ref_train), strict=True),
                                     bench.ref)
        scores.add("histogram-matching", seed, hm.transform(bench.inputs, sites), {})
        t, wall = ddib_central(bench, args.runs / f"central_s{seed}", seed, args.steps)
        scores.add("central", seed, t.transform(bench.inputs, sites),
                   {"wall_s": wall, "rounds": args.steps})
        summary, extra = ddib_federated(bench, args.runs / f"local_s{seed}", seed, args.steps,
                                        "local", rounds=args.rounds,
                                        parallel_nodes=args.parallel_nodes)
        extra["reverse_memorized_share"] = prior_memorization(
            bench, load_translator(summary["model"]), [bench.ref])
        scores.add("federated local priors", seed,
                   translate_at_nodes(bench, summary["node_models"]), extra)
        summary, extra = ddib_federated(bench, args.runs / f"shared_s{seed}", seed, args.steps,
                                        "shared", rounds=args.rounds,
                                        parallel_nodes=args.parallel_nodes)
        t = load_translator(summary["model"])
        extra["reverse_memorized_share"] = prior_memorization(bench, t, bench.sites)
        scores.add("federated shared prior", seed, t.transform(bench.inputs, sites), extra)
    return scores


if __name__ == "__main__":
    main()
