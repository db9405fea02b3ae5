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
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from harmonize.data.manifest import load_manifest, save_manifest  # noqa: E402
from harmonize.data.splits import patient_split  # noqa: E402
from harmonize.evaluation.fidelity import fidelity_image, score_images  # noqa: E402
from harmonize.evaluation.report import markdown_table  # noqa: E402
from harmonize.federated.config import load_federated_config  # noqa: E402
from harmonize.federated.run import run_federated  # noqa: E402
from harmonize.memorization import memorization_report  # noqa: E402
from harmonize.metrics import bootstrap_mean_ci  # noqa: E402
from harmonize.synth import generate  # noqa: E402
from harmonize.translators import HistogramMatching, load_translator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Federation:
    """A patient-split manifest as the runs need it: one node per site, one central node,
    and the held-out non-reference images every method is scored on."""

    def __init__(self, out: Path, df: pd.DataFrame, ref: str) -> None:
        self.df, self.ref = df, ref
        self.train = df[df["split"] == "train"]
        self.test = df[(df["split"] == "test") & (df["site"] != ref)]
        self.sites = sorted(self.train["site"].astype(str).unique())
        self.sources = [s for s in self.sites if s != ref]
        out.mkdir(parents=True, exist_ok=True)
        self.fed_manifest, self.central_manifest = out / "train_nodes.csv", out / "train.csv"
        save_manifest(self.train, self.fed_manifest)
        save_manifest(self.train.assign(node="central"), self.central_manifest)
        self.inputs = images(self.test["path"])

    def site_images(self, site: str, split: str) -> list[np.ndarray]:
        rows = self.df[(self.df["site"] == site) & (self.df["split"] == split)]
        return images(rows["path"])


class Benchmark(Federation):
    """The synthetic sites, with the paired truth of every held-out image."""

    def __init__(self, out: Path, per_site: int, size: int, seed: int = 0) -> None:
        info = generate(out / "data", sites=4, per_site=per_site, size=size, seed=seed,
                        progress=False)
        df = patient_split(load_manifest(out / "data" / "manifest.csv"), test_size=0.25,
                           seed=seed)
        super().__init__(out, df, info["reference_site"])
        self.truth = images([out / "data" / p for p in self.test["reference_path"]])


def images(paths) -> list[np.ndarray]:
    return [fidelity_image(p) for p in paths]


class Scores:
    def __init__(self, bench: Benchmark) -> None:
        self.bench, self.rows, self.per_image = bench, [], []

    def add(self, method: str, seed: int, outputs: list[np.ndarray], extra: dict) -> None:
        b = self.bench
        s = score_images(outputs, b.truth)
        mem = memorization_report(outputs, b.site_images(b.ref, "train"),
                                  b.site_images(b.ref, "test"))
        row = {"method": method, "seed": seed, "ssim": float(s["ssim"].mean()),
               "psnr": float(s["psnr"].mean()), "memorized_share": mem["flagged_share"],
               **extra}
        self.rows.append(row)
        self.per_image.append(pd.DataFrame({
            "method": method, "seed": seed, "relpath": b.test["relpath"].to_numpy(),
            "site": b.test["site"].to_numpy(), "ssim": s["ssim"], "psnr": s["psnr"]}))
        print(f"{method:26s} seed {seed}: SSIM {row['ssim']:.3f}  PSNR {row['psnr']:.2f} dB"
              f"  memorized {mem['flagged_share']:.0%}", flush=True)

    def summary(self) -> pd.DataFrame:
        """Per method: mean over its seeds, a CI over images of the seed-mean score (seed
        spread: the per-seed means), and the paired difference to central on the same
        seeds and images (so a one-seed method is compared with central's same seed)."""
        per = pd.concat(self.per_image)
        results = pd.DataFrame(self.rows)

        def image_means(method: str, seeds) -> pd.DataFrame:
            part = per[(per["method"] == method) & per["seed"].isin(seeds)]
            return part.groupby("relpath")[["ssim", "psnr"]].mean()

        out = []
        for method in results["method"].unique():
            r = results[results["method"] == method]
            seeds = sorted(r["seed"].unique())
            m = image_means(method, seeds)
            mean, lo, hi = bootstrap_mean_ci(m["ssim"].tolist())
            row = {"method": method, "ssim": mean, "ssim_lo": lo, "ssim_hi": hi,
                   "psnr": float(m["psnr"].mean()),
                   "ssim_per_seed": " / ".join(f"{v:.3f}" for v in r["ssim"]),
                   "seeds": len(seeds)}
            central = image_means("central", seeds)
            if len(central) and method != "central":
                d = (m["ssim"] - central["ssim"]).dropna()
                dm, dlo, dhi = bootstrap_mean_ci(d.tolist())
                row.update({"minus_central": dm, "minus_central_lo": dlo,
                            "minus_central_hi": dhi})
                identity = image_means("identity", seeds)["ssim"].mean()
                gain = central["ssim"].mean() - identity
                row["share_of_central_gain"] = (mean - identity) / gain if gain else None
            for col in ("K", "rounds", "bytes_per_node_round", "seconds_per_round", "wall_s",
                        "memorized_share", "reverse_memorized_share"):
                if col in r and r[col].notna().any():
                    row[col] = float(r[col].mean())
            out.append(row)
        return pd.DataFrame(out)


# --- CycleGAN ---------------------------------------------------------------------------
CG_SET = {"data.image_size": 64, "model.n_blocks": 4, "data.polarity": "keep"}


def cyclegan_central(bench: Benchmark, out: Path, seed: int, steps: int, batch: int,
                     cg_set: dict = CG_SET):
    from harmonize.translators.cyclegan.config import load_config
    from harmonize.translators.cyclegan.train import train_cyclegan

    config = load_config(ROOT / "configs/cyclegan/quick.yaml", {
        **cg_set, "data.manifest": str(bench.central_manifest),
        "data.reference_site": bench.ref, "train.batch_size": batch * len(bench.sources),
        "train.steps": steps, "train.seed": seed, "train.out": str(out),
        "train.progress": False, "train.sample_every": steps, "train.checkpoint_every": steps,
        "train.log_every": max(1, steps // 10)})
    done = out / "wall.json"
    if done.is_file():  # --runs: reuse a finished run
        return load_translator(out / "model"), json.loads(done.read_text())["wall_s"]
    shutil.rmtree(out, ignore_errors=True)  # an interrupted run starts afresh
    started = time.perf_counter()
    model = train_cyclegan(config)
    wall = time.perf_counter() - started
    done.write_text(json.dumps({"wall_s": wall}))
    return load_translator(model), wall


def cyclegan_federated(bench: Benchmark, out: Path, seed: int, steps: int, batch: int, k: int,
                       args, cg_set: dict = CG_SET, privacy: dict | None = None) -> tuple:
    overrides = {"manifest": str(bench.fed_manifest), "reference_site": bench.ref,
                 "out": str(out), "rounds": max(1, steps // k), "seed": seed,
                 "cyclegan.local_steps": k, "cyclegan.config": str(ROOT /
                                                                    "configs/cyclegan/quick.yaml"),
                 "cyclegan.set": {**cg_set, "train.batch_size": batch},
                 "parallel_nodes": args.parallel_nodes,
                 "threads_per_node": max(1, 2 // args.parallel_nodes), "progress": False,
                 **({"privacy": privacy} if privacy else {})}
    if getattr(args, "local_lr", None):
        overrides["cyclegan.local_lr"] = args.local_lr
    if getattr(args, "server_lr_scale", None):
        overrides["cyclegan.server_lr"] = 2e-4 * (k if args.server_lr_scale == "k" else 1)
    cfg = load_federated_config(ROOT / "configs/federated/cyclegan-quick.yaml", overrides)
    done = out / "wall.json"
    if done.is_file():  # --runs: reuse a finished run
        summary = json.loads((out / "summary.json").read_text())
        wall = json.loads(done.read_text())["wall_s"]
    else:
        started = time.perf_counter()
        summary = run_federated(cfg)
        wall = time.perf_counter() - started
        done.write_text(json.dumps({"wall_s": wall}))
    rounds = pd.read_csv(out / "rounds.csv")
    extra = {"K": k, "rounds": cfg.rounds, "wall_s": wall,
             "bytes_per_node_round": sent_per_round(out, rounds),
             "seconds_per_round": float(np.diff(rounds["seconds"], prepend=0).mean())}
    return load_translator(summary["model"]), extra, summary


def sent_per_round(out: Path, rounds: pd.DataFrame) -> float:
    """Bytes each node sent per round (the nodes report it; else the shared weights)."""
    if "train_bytes_sent" in rounds and rounds["train_bytes_sent"].notna().any():
        return float(rounds["train_bytes_sent"].mean())
    from safetensors.torch import load_file

    from harmonize.federated.server_app import SHARED_WEIGHTS

    return float(sum(v.numel() * v.element_size()
                     for v in load_file(out / SHARED_WEIGHTS).values()))


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
            t, extra, _ = cyclegan_federated(bench, run_dir, seed, args.steps, args.batch, k,
                                             args)
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


# --- DDIB ---------------------------------------------------------------------------------
DD_SET = {"inference.steps": 20, "data.polarity": "keep"}


def ddib_central(bench: Benchmark, out: Path, seed: int, steps: int, dd_set: dict = DD_SET):
    from harmonize.translators.diffusion.config import load_config
    from harmonize.translators.diffusion.train import train_diffusion

    done = out / "wall.json"
    if not done.is_file():
        shutil.rmtree(out, ignore_errors=True)  # an interrupted run starts afresh
        config = load_config(ROOT / "configs/diffusion/quick.yaml", {
            **dd_set, "data.manifest": str(bench.central_manifest),
            "data.reference_site": bench.ref, "model.conditioning": "per-site",
            "inference.mode": "ddib", "train.steps": steps, "train.seed": seed,
            "train.out": str(out), "train.progress": False, "train.sample_every": steps,
            "train.checkpoint_every": steps})
        started = time.perf_counter()
        train_diffusion(config)
        done.write_text(json.dumps({"wall_s": time.perf_counter() - started}))
    return load_translator(out / "model"), json.loads(done.read_text())["wall_s"]


def ddib_federated(bench: Benchmark, out: Path, seed: int, steps: int, prior: str,
                   args, dd_set: dict = DD_SET, privacy: dict | None = None
                   ) -> tuple[dict, dict]:
    rounds = 1 if prior == "local" else args.rounds
    overrides = {"manifest": str(bench.fed_manifest), "reference_site": bench.ref,
                 "out": str(out), "rounds": rounds, "seed": seed,
                 "diffusion.prior": prior, "diffusion.local_steps": max(1, steps // rounds),
                 "diffusion.config": str(ROOT / "configs/diffusion/quick.yaml"),
                 "diffusion.set": dd_set, "diffusion.sites": bench.sites,
                 "parallel_nodes": args.parallel_nodes,
                 "threads_per_node": max(1, 2 // args.parallel_nodes), "progress": False,
                 **({"privacy": privacy} if privacy else {})}
    cfg = load_federated_config(ROOT / "configs/federated/diffusion-quick.yaml", overrides)
    done = out / "wall.json"
    if not done.is_file():
        started = time.perf_counter()
        run_federated(cfg)
        done.write_text(json.dumps({"wall_s": time.perf_counter() - started}))
    summary = json.loads((out / "summary.json").read_text())
    table = pd.read_csv(out / "rounds.csv")
    extra = {"rounds": rounds, "wall_s": json.loads(done.read_text())["wall_s"],
             "bytes_per_node_round": float(table["train_bytes_sent"].mean())
             if "train_bytes_sent" in table else None,
             "seconds_per_round": float(np.diff(table["seconds"], prepend=0).mean())}
    return summary, extra


def translate_at_nodes(bench: Benchmark, node_models: dict) -> list[np.ndarray]:
    """Each site's held-out images translated with that node's own checkpoint (as
    `harmonize apply` would at the node), back in the test order."""
    outputs: list = [None] * len(bench.test)
    sites = list(bench.test["site"].astype(str))
    for site in sorted(set(sites)):
        idx = [i for i, s in enumerate(sites) if s == site]
        t = load_translator(node_models[site])
        for i, y in zip(idx, t.transform([bench.inputs[i] for i in idx], [site] * len(idx)),
                        strict=True):
            outputs[i] = y
    return outputs


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
                                        "local", args)
        extra["reverse_memorized_share"] = prior_memorization(
            bench, load_translator(summary["model"]), [bench.ref])
        scores.add("federated local priors", seed,
                   translate_at_nodes(bench, summary["node_models"]), extra)
        summary, extra = ddib_federated(bench, args.runs / f"shared_s{seed}", seed, args.steps,
                                        "shared", args)
        t = load_translator(summary["model"])
        extra["reverse_memorized_share"] = prior_memorization(bench, t, bench.sites)
        scores.add("federated shared prior", seed, t.transform(bench.inputs, sites), extra)
    return scores


if __name__ == "__main__":
    main()
