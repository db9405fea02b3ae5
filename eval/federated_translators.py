"""Federated vs central translators (DDIB diffusion, CycleGAN), and what DP costs.

On the synthetic benchmark (paired reference renderings = ground truth), 4 sites at
64 px, patient split: train the same federated code (a) centrally (all training images
at one node), (b) federated over one node per site, (c) federated with central DP
(server-side clipping + Gaussian noise) at two or more epsilons; same rounds, and the
central run gets as many steps per round as the federation's training nodes together
(diffusion: every node; CycleGAN: the source nodes). Then harmonize every held-out
non-reference image and score it against its truth (SSIM, PSNR; mean and 95% bootstrap
CI), next to identity and histogram matching, with the memorization check of each
translator (harmonize.memorization: translated images, and for diffusion also draws from
every site's prior, against that site's training images) and the wall time.

    python eval/federated_translators.py --task diffusion --out eval_out/federated_diffusion
    python eval/federated_translators.py --task cyclegan --out eval_out/federated_cyclegan
    python eval/federated_translators.py --rounds 4 --epsilons 50 --per-site 20   # smoke run

Writes OUT/results.csv, OUT/results.md, OUT/per_image.csv and prints the table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.data.manifest import load_manifest, save_manifest
from harmonize.data.splits import patient_split
from harmonize.evaluation.fidelity import fidelity_image, score_images
from harmonize.evaluation.report import markdown_table
from harmonize.federated.config import load_federated_config
from harmonize.federated.privacy import noise_for_epsilon
from harmonize.federated.run import run_federated
from harmonize.memorization import memorization_report
from harmonize.metrics import bootstrap_mean_ci
from harmonize.synth import generate
from harmonize.translators import HistogramMatching, load_translator

ROOT = Path(__file__).resolve().parents[1]


def model_space(paths) -> list[np.ndarray]:
    return [fidelity_image(p) for p in paths]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["diffusion", "cyclegan"], default="diffusion")
    ap.add_argument("--out", default=None, help="default: eval_out/federated_TASK")
    ap.add_argument("--config", default=None,
                    help="default: configs/federated/TASK-quick.yaml")
    ap.add_argument("--per-site", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=None,
                    help="default: the config's")
    ap.add_argument("--epsilons", default="50,8", help="DP runs, comma-separated")
    ap.add_argument("--clipping-norm", type=float, default=None,
                    help="default: the median update norm of the non-DP run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out = args.out or f"eval_out/federated_{args.task}"
    args.config = args.config or str(ROOT / f"configs/federated/{args.task}-quick.yaml")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = generate(out / "data", sites=4, per_site=args.per_site, size=64, seed=args.seed,
                    progress=False)
    ref = info["reference_site"]
    df = patient_split(load_manifest(out / "data" / "manifest.csv"), test_size=0.25,
                       seed=args.seed)
    train = df[df["split"] == "train"]
    test = df[(df["split"] == "test") & (df["site"] != ref)]
    fed_manifest, central_manifest = out / "train_nodes.csv", out / "train_central.csv"
    save_manifest(train, fed_manifest)
    save_manifest(train.assign(node="central"), central_manifest)
    # the central run takes as many steps per round as the federation's training nodes
    n_training = train["site"].nunique() - (1 if args.task == "cyclegan" else 0)
    base = load_federated_config(args.config, {"reference_site": ref})
    local_steps = args.local_steps or getattr(base, args.task).local_steps

    truth = model_space([out / "data" / p for p in test["reference_path"]])
    inputs = model_space(test["path"])
    ref_train = model_space(train.loc[train["site"] == ref, "path"])
    ref_new = model_space(df.loc[(df["split"] == "test") & (df["site"] == ref), "path"])
    rows, per_image = [], []

    def score(method: str, outputs: list[np.ndarray], extra: dict) -> None:
        scores = score_images(outputs, truth)
        s, p = scores["ssim"].tolist(), scores["psnr"].tolist()
        mean, lo, hi = bootstrap_mean_ci(s)
        mem = memorization_report(outputs, ref_train, ref_new)
        rows.append({"method": method, **extra, "ssim": mean, "ssim_lo": lo, "ssim_hi": hi,
                     "psnr": float(np.mean(p)), "memorized_share": mem["flagged_share"],
                     "nearest_train_median": mem["output_nearest_median"]})
        per_image.append(pd.DataFrame({"method": method, "relpath": test["relpath"].to_numpy(),
                                       "site": test["site"].to_numpy(), "ssim": s,
                                       "psnr": p}))
        print(f"{method:28s} SSIM {mean:.3f} [{lo:.3f}, {hi:.3f}]  PSNR {np.mean(p):.2f} dB  "
              f"memorized {mem['flagged_share']:.0%}", flush=True)

    score("identity", inputs, {})
    hm = HistogramMatching().fit(zip(ref_train, [ref] * len(ref_train), strict=True), ref)
    score("histogram-matching", hm.transform(inputs, list(test["site"])), {})

    def run(name: str, manifest: Path, local_steps: int, dp: dict | None) -> dict:
        overrides = {"manifest": str(manifest), "reference_site": ref,
                     "out": str(out / "runs" / name), "rounds": args.rounds,
                     "seed": args.seed, f"{args.task}.local_steps": local_steps,
                     f"{args.task}.config": str(ROOT / f"configs/{args.task}/quick.yaml"),
                     "progress": False}
        if args.task == "diffusion":  # the same class labels for central and federated
            overrides["diffusion.sites"] = sorted(train["site"].astype(str).unique())
        for k, v in (dp or {}).items():
            overrides[f"privacy.{k}"] = v
        cfg = load_federated_config(args.config, overrides)
        t = time.perf_counter()
        summary = run_federated(cfg)
        seconds = time.perf_counter() - t
        translator = load_translator(summary["model"])
        if args.task == "diffusion":
            prior_memorization(name, translator)
        score(name, translator.transform(inputs, list(test["site"])),
              {"rounds": args.rounds, "nodes": summary["nodes"],
               "epsilon": summary["epsilon"], "noise_multiplier": (dp or {}).get(
                   "noise_multiplier"), "clipping_norm": (dp or {}).get("clipping_norm"),
               "wall_s": seconds})
        return summary

    def prior_memorization(method: str, translator) -> None:
        """Draws from each site's prior vs that site's training images (a site-conditioned
        model can generate every site's images, so each is checked)."""
        for site in sorted(train["site"].astype(str).unique()):
            draws = [x[0].numpy() for x in translator.sample_prior(16, site)]
            mem = memorization_report(
                draws, model_space(train.loc[train["site"] == site, "path"]),
                model_space(df.loc[(df["split"] == "test") & (df["site"] == site), "path"]))
            prior_rows.append({"method": method, "site": site, **mem})

    prior_rows: list[dict] = []
    run("central", central_manifest, local_steps * n_training, None)
    run("federated", fed_manifest, local_steps, None)
    norms = pd.read_csv(out / "runs" / "federated" / "rounds.csv")["train_update_norm"]
    clip = args.clipping_norm or float(norms.median())
    for eps in [float(e) for e in args.epsilons.split(",") if e]:
        z = noise_for_epsilon(eps, args.rounds, 1e-5)
        run(f"federated+dp eps={eps:g}", fed_manifest, local_steps,
            {"dp": "server-fixed", "noise_multiplier": z, "clipping_norm": clip,
             "delta": 1e-5})
    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False)
    pd.concat(per_image).to_csv(out / "per_image.csv", index=False)
    if prior_rows:
        pd.DataFrame(prior_rows).to_csv(out / "prior_memorization.csv", index=False)
    (out / "results.md").write_text(markdown_table(table))
    (out / "settings.json").write_text(json.dumps(vars(args), indent=2))
    print(markdown_table(table))


if __name__ == "__main__":
    main()
