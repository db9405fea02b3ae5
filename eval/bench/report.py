"""The plots of docs/performance.md from the bench scripts' CSVs.

    python eval/bench/report.py --bench eval_out/bench --img docs/img

Reads the curves the eval/bench scripts wrote under BENCH (whichever exist) and writes
IMG/perf_*.png; the ratios themselves are printed by each script and kept in its JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

LOSSES = ("G_gan", "F_gan", "cycle", "idt", "D_B", "D_A")


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


def plot_apply(bench: Path, img: Path) -> None:
    g = pd.read_csv(bench / "apply_growth.csv")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.loglog(g["side"], g["seconds_per_image"], "o-", base=2)
    a.set(xlabel="image side (px)", ylabel="seconds per image",
          title="apply time vs size (tiles of 256)")
    b.plot(g["side"], g["peak_rss_mb"], "o-")
    b.axhline(2048, color="r", lw=0.8, ls="--", label="2 GB target")
    b.set_ylim(0, 2300)
    b.set(xlabel="image side (px)", ylabel="peak RSS (MB)", title="apply peak memory")
    b.legend()
    save(fig, img / "perf_apply_growth.png")


def plot_train(bench: Path, img: Path) -> None:
    c = pd.read_csv(bench / "train_cyclegan_curves.csv")
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.2), sharex=True)
    styles = {"fp32_seed0": ("C0", "-"), "fp32_seed1": ("C7", ":"), "bf16_seed0": ("C3", "--")}
    for ax, loss in zip(axes.flat, LOSSES, strict=True):
        for run, part in c.groupby("run"):
            color, ls = styles.get(run, ("k", "-"))
            ax.plot(part["step"], part[loss], color=color, ls=ls, label=run)
        ax.set_title(loss)
    axes[1, 0].set_xlabel("step")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("CycleGAN losses, reference architecture at 64 px: fp32 (2 seeds) vs bf16")
    save(fig, img / "perf_train_curves.png")


def plot_diffusion(bench: Path, img: Path) -> None:
    d = pd.read_csv(bench / "diffusion_steps.csv")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for mode, part in d.groupby("mode"):
        a.plot(part["steps"], part["ssim_truth"], "o-", label=mode)
        b.plot(part["steps"], part["s_per_image"], "o-", label=mode)
    a.set(xlabel="DDIM steps", ylabel="SSIM to ground truth", title="fidelity vs steps")
    b.set(xlabel="DDIM steps", ylabel="seconds per image", title="time vs steps (batched)")
    a.legend()
    save(fig, img / "perf_diffusion_steps.png")


def plot_radiomics(bench: Path, img: Path) -> None:
    g = pd.read_csv(bench / "radiomics_growth.csv")
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    ax.plot(g["images"], g["seconds"], "o-")
    ax.set(xlabel="images", ylabel="seconds (cold cache)",
           title=f"radiomics, {int(g['workers'].iloc[0])} workers")
    save(fig, img / "perf_radiomics_growth.png")


def plot_federated(bench: Path, img: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, label, color in (("federated_nodes.csv", "1 node at a time", "C0"),
                               ("federated_nodes_parallel2.csv", "2 at a time", "C1")):
        if not (bench / name).is_file():
            continue
        g = pd.read_csv(bench / name)
        ax.plot(g["nodes"], g["round_seconds"], "o-", color=color, label=f"round, {label}")
        ax.plot(g["nodes"], g["compute_seconds"], "s--", color=color, alpha=0.6,
                label=f"training in it, {label}")
    ax.set(xlabel="nodes", ylabel="seconds per round", title="federated round time vs nodes")
    ax.legend(fontsize=8)
    save(fig, img / "perf_federated_nodes.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", type=Path, default=Path("eval_out/bench"))
    p.add_argument("--img", type=Path, default=Path("docs/img"))
    args = p.parse_args(argv)
    args.img.mkdir(parents=True, exist_ok=True)
    plots = {"apply_growth.csv": plot_apply, "train_cyclegan_curves.csv": plot_train,
             "diffusion_steps.csv": plot_diffusion, "radiomics_growth.csv": plot_radiomics,
             "federated_nodes.csv": plot_federated}
    for csv_name, plot in plots.items():
        if (args.bench / csv_name).is_file():
            plot(args.bench, args.img)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
