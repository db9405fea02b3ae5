"""Diffusion translation: how few DDIM steps keep fidelity, and what batching buys.

Trains the quick DDIB priors (configs/diffusion/quick.yaml: one prior per site, 64 px) on
the train half of a synthetic benchmark, then translates held-out images of the other
sites with SDEdit and DDIB at 5, 10, 20 and 50 DDIM steps and scores SSIM to the
synthetic ground truth (the same anatomy rendered by the reference site). Target: at 20
steps or fewer, SSIM within 0.01 of 50 steps. Also times the same translation one image
per call vs batched (all images per call).

    python eval/bench/bench_diffusion_steps.py --out eval_out/bench [--model RUN/model --data DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eval/bench/bench_diffusion.py

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.data.manifest import load_manifest, save_manifest
from harmonize.data.splits import patient_split
from harmonize.evaluation.bench_support import ROOT, machine, write_json
from harmonize.metrics import ssim
from harmonize.synth import generate
from harmonize.translators import load_translator
from harmonize.translators.diffusion import load_config, train_diffusion

STEPS = (5, 10, 20, 50)
POLICY = IntensityPolicy()


def model_space(path) -> np.ndarray:
    return POLICY.to_model(read_image(path))[0]


def prepare(out: Path, sites: int, per_site: int, size: int) -> tuple[Path, Path, str]:
    info = generate(out / "synth", sites=sites, per_site=per_site, size=size, seed=0,
                    progress=False)
    df = patient_split(load_manifest(out / "synth" / "manifest.csv"), test_size=0.5, seed=0)
    train_csv, test_csv = out / "train.csv", out / "test.csv"
    save_manifest(df[df["split"] == "train"], train_csv)
    save_manifest(df[df["split"] == "test"], test_csv)
    return train_csv, test_csv, info["reference_site"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("eval_out/bench"))
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--per-site", type=int, default=48)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--images", type=int, default=8, help="test images per non-reference site")
    p.add_argument("--train-steps", type=int, default=None, help="default: the config's")
    args = p.parse_args(argv)
    work = args.out / "diffusion_steps"
    train_csv, test_csv, ref = prepare(work, args.sites, args.per_site, args.size)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = {"data.manifest": str(train_csv), "data.reference_site": ref,
                 "inference.mode": "ddib", "train.out": str(run_dir), "train.progress": False}
    if args.train_steps:
        overrides["train.steps"] = args.train_steps
    config = load_config(ROOT / "configs/diffusion/quick.yaml", overrides)
    started = time.perf_counter()
    train_diffusion(config)
    train_seconds = time.perf_counter() - started

    test = load_manifest(test_csv)
    test = pd.concat([g.head(args.images) for s, g in test.groupby("site") if s != ref])
    images = [model_space(p) for p in test["path"]]
    truths = [model_space(work / "synth" / r) for r in test["reference_path"]]
    sites = list(test["site"])
    t = load_translator(run_dir / "model")
    rows = []
    for mode in ("sdedit", "ddib"):
        for steps in STEPS:
            t.set_params(mode=mode, steps=steps, batch_size=len(images))
            start = time.perf_counter()
            outs = t.transform(images, sites)
            seconds = time.perf_counter() - start
            rows.append({"mode": mode, "steps": steps, "s_per_image": seconds / len(images),
                         "ssim_truth": float(np.mean([ssim(y, g) for y, g in
                                                      zip(outs, truths, strict=True)]))})
            print(f"{mode} {steps:>2} steps: SSIM to truth {rows[-1]['ssim_truth']:.4f}, "
                  f"{rows[-1]['s_per_image']:.3f} s/img")
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "diffusion_steps.csv", index=False)

    verdicts = {}
    for mode, part in table.groupby("mode"):
        at50 = part[part["steps"] == 50].iloc[0]
        ok = part[(part["steps"] <= 20) & (part["ssim_truth"] >= at50["ssim_truth"] - 0.01)]
        fewest = ok.sort_values("steps").iloc[0] if len(ok) else None
        verdicts[mode] = {
            "ssim_50": float(at50["ssim_truth"]),
            "fewest_steps_within_0.01": None if fewest is None else int(fewest["steps"]),
            "ssim_at_fewest": None if fewest is None else float(fewest["ssim_truth"]),
            "speedup_vs_50": None if fewest is None else
            float(at50["s_per_image"] / fewest["s_per_image"])}

    # batched vs one image per call, DDIB at 20 steps
    t.set_params(mode="ddib", steps=20, batch_size=len(images))
    start = time.perf_counter()
    for x, s in zip(images, sites, strict=True):
        t.transform([x], [s])
    one_by_one = (time.perf_counter() - start) / len(images)
    ddib20 = table[(table["mode"] == "ddib") & (table["steps"] == 20)]
    batched = float(ddib20["s_per_image"].iloc[0])
    result = {"config": "configs/diffusion/quick.yaml (per-site priors, DDIB checkpoint)",
              "image_px": args.size, "prior_px": config.data.image_size,
              "sites": args.sites, "test_images": len(images), "train_seconds": train_seconds,
              "precision": t.precision, "rows": rows, "verdict": verdicts,
              "batching": {"mode": "ddib", "steps": 20, "s_per_image_one_by_one": one_by_one,
                           "s_per_image_batched": batched, "speedup": one_by_one / batched},
              "machine": machine()}
    write_json(args.out / "diffusion_steps.json", result)
    for mode, v in verdicts.items():
        met = v["fewest_steps_within_0.01"] is not None
        print(f"{mode}: 50 steps SSIM {v['ssim_50']:.4f}; fewest steps <= 20 within 0.01: "
              f"{v['fewest_steps_within_0.01']} ({'met' if met else 'MISSED'}), "
              f"{v['speedup_vs_50'] or float('nan'):.1f}x faster than 50")
    print(f"batched DDIB (20 steps): {batched:.3f} s/img vs {one_by_one:.3f} one by one "
          f"({one_by_one / batched:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
