"""Does the histogram-residual translator beat histogram matching on every seed?

Runs `eval/cyclegan_fidelity.py` (its own process per seed: synthesize, split by patient,
train on the train half, apply to the held-out half, score SSIM / PSNR against the paired
reference renderings) for each seed with one config, then writes one table and two
figures: SSIM per seed and method with 95% CIs, and a grid of held-out images (input,
histogram matching, the translator at step 0, the trained translator, the truth).

    python eval/histogram_residual_benchmark.py --out eval_out/hr --seeds 3 5 10
    python eval/histogram_residual_benchmark.py --out eval_out/hr --combine   # tables only

Writes OUT/summary.csv (one row per seed and method), OUT/summary.json and the figures
OUT/ssim_per_seed.png, OUT/grid.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/histogram_residual/quick.yaml"
ORDER = ("identity", "histogram-matching", "at-step-0", "histogram-residual", "cyclegan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval_out/histogram_residual")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 5, 10])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--per-site", type=int, default=80)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--combine", action="store_true", help="only tabulate finished seeds")
    args = p.parse_args(argv)
    out = Path(args.out)
    for seed in args.seeds:
        run_dir = out / f"seed{seed}"
        if args.combine or (run_dir / "fidelity.json").exists():
            continue
        cmd = [sys.executable, str(ROOT / "eval/cyclegan_fidelity.py"), "--config", args.config,
               "--sites", str(args.sites), "--per-site", str(args.per_site), "--size",
               str(args.size), "--seed", str(seed), "--out", str(run_dir), "--quiet",
               *[f"--set={s}" for s in args.overrides]]
        print("running", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    table = combine(out, args.seeds)
    print(table.to_string(index=False))
    return 0


def combine(out: Path, seeds: list[int]) -> pd.DataFrame:
    rows, runs = [], {}
    for seed in seeds:
        path = out / f"seed{seed}" / "fidelity.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        runs[seed] = result
        summary = result["summary"]["all"]
        for method in ORDER:
            if method not in summary:
                continue
            e = summary[method]
            rows.append({"seed": seed, "method": method, "ssim": e["ssim"]["mean"],
                         "ssim_lo": e["ssim"]["ci95"][0], "ssim_hi": e["ssim"]["ci95"][1],
                         "psnr": e["psnr"]["mean"]})
        d = summary["minus_hm"]
        rows.append({"seed": seed, "method": f"{result['kind']} - histogram-matching",
                     "ssim": d["ssim"]["mean"], "ssim_lo": d["ssim"]["ci95"][0],
                     "ssim_hi": d["ssim"]["ci95"][1], "psnr": d["psnr"]["mean"],
                     "train_s": result["timings"]["train_s"], "cpu": result["cpu"]})
    table = pd.DataFrame(rows)
    if table.empty:
        raise SystemExit(f"no finished seed under {out}")
    table.to_csv(out / "summary.csv", index=False, float_format="%.4f")
    (out / "summary.json").write_text(json.dumps(
        {"seeds": list(runs), "rows": table.to_dict("records")}, indent=2) + "\n")
    plot_ssim(table, out / "ssim_per_seed.png")
    first = min(runs)
    plot_grid(out / f"seed{first}", runs[first], out / "grid.png")
    return table


def plot_ssim(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ORDER if m in set(table["method"]) and m != "identity"]
    seeds = sorted(table["seed"].unique())
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=120)
    for k, method in enumerate(methods):
        part = table[table["method"] == method].set_index("seed").loc[seeds]
        x = np.arange(len(seeds)) + (k - (len(methods) - 1) / 2) * 0.2
        ax.errorbar(x, part["ssim"], yerr=[part["ssim"] - part["ssim_lo"],
                                           part["ssim_hi"] - part["ssim"]],
                    fmt="o", capsize=3, label=method)
    ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    ax.set_ylabel("SSIM to the paired truth")
    ax.set_title("held-out non-reference images, 95% bootstrap CIs")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_grid(run: Path, result: dict, path: Path) -> None:
    """One held-out image per non-reference site: input, each method, the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harmonize.data.intensity import IntensityPolicy
    from harmonize.data.io import read_image

    test = pd.read_csv(run / "test.csv")
    ref = result["reference_site"]
    methods = [m for m in ORDER[1:] if (run / "harmonized" / m).is_dir()]
    picks = [test[test["site"] == s].iloc[0] for s in sorted(test["site"].unique()) if s != ref]
    policy = IntensityPolicy()
    cols = ["input", *methods, "truth"]
    fig, axes = plt.subplots(len(picks), len(cols), figsize=(1.9 * len(cols), 2 * len(picks)),
                             dpi=110, squeeze=False)
    for r, row in enumerate(picks):
        rel = Path(row["path"])
        files = [run / rel, *[run / "harmonized" / m / rel for m in methods],
                 run / "synth" / row["reference_path"]]
        for c, (name, f) in enumerate(zip(cols, files, strict=True)):
            x, _ = policy.to_model(read_image(f))
            ax = axes[r, c]
            ax.imshow(np.clip(x, 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                ax.set_ylabel(row["site"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
