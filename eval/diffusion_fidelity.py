"""Do SDEdit and DDIB bring other sites closer to the reference site, and at what cost in
structure? Fidelity table against paired ground truth plus the faithfulness curves.

On the synthetic benchmark (same synth and patient split as eval/cyclegan_fidelity.py):
train the quick diffusion priors on the train half (DDIB mode: one prior per site, each on
its own images; SDEdit uses the reference prior of the same run), harmonize the test
half with `apply_translator` (files in, files out) by identity, histogram matching, SDEdit,
DDIB and, given --cyclegan DIR, CycleGAN, and score every non-reference test image
against its reference rendering (SSIM / PSNR in model space, mean and 95% bootstrap CI,
per method and per site, paired differences to identity). Then the faithfulness knob on
a subset: SSIM to the truth (realism in the reference style, on the right anatomy) and
SSIM to the (polarity-corrected) input (structure kept) versus SDEdit t0, DDIM steps and
DDIB depth, and the DDIM inversion -> generation reconstruction error. CPU by default.

    python eval/diffusion_fidelity.py --out eval_out/diffusion_fidelity
    python eval/diffusion_fidelity.py --cyclegan eval_out/cyclegan_fidelity/cyclegan_run/model

Writes OUT/fidelity.csv (per image and method), OUT/curve.csv, OUT/fidelity.json
(summary, curves, timings, config), OUT/curve.png; prints the tables.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting stall each other 10-30x when the cores are shared
# (measured here: a 2-thread training step went from 0.26 s to 20 s next to another job);
# passive waiting costs nothing measurable alone. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harmonize.apply import apply_translator
from harmonize.data import polarity as pol
from harmonize.data.manifest import load_manifest
from harmonize.evaluation import fidelity
from harmonize.evaluation.fidelity import fidelity_image, prepare_benchmark, score_files, score_pair
from harmonize.fit import fit_and_save
from harmonize.translators import TRANSLATORS, HistogramMatching, load_translator
from harmonize.translators.diffusion import DiffusionTranslator, load_config, train_diffusion
from harmonize.translators.diffusion import sampling as smp
from harmonize.translators.diffusion.config import parse_override

ROOT = Path(__file__).resolve().parents[1]
TRANSLATORS.setdefault("diffusion", DiffusionTranslator)  # until the registry line lands
T0S = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
STEPS = (5, 10, 20, 50)
DEPTHS = (0.25, 0.5, 0.75, 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval_out/diffusion_fidelity")
    p.add_argument("--config", default=str(ROOT / "configs/diffusion/quick.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cyclegan", default=None, help="a CycleGAN checkpoint to compare with "
                   "(trained on the same train split, e.g. by eval/cyclegan_fidelity.py)")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--per-site", type=int, default=80)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curve-images", type=int, default=8, help="test images per site for "
                   "the curves (0: no curves)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print_tables(result)
    return 0


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    shown = not args.quiet
    t = time.perf_counter()
    train_csv, test_csv, info = prepare_benchmark(out, args.sites, args.per_site, args.size,
                                                  args.seed, progress=shown)
    timings: dict[str, float] = {"synth_s": time.perf_counter() - t}
    ref = info["reference_site"]
    fit_and_save(HistogramMatching(), load_manifest(train_csv), train_csv, ref,
                 out / "models" / "histogram-matching", progress=shown)

    overrides = dict(parse_override(s) for s in args.overrides)
    overrides.update({"data.manifest": str(train_csv), "data.reference_site": ref,
                      "inference.mode": "ddib", "train.out": str(out / "diffusion_run"),
                      "train.progress": shown})
    config = load_config(args.config, overrides)
    t = time.perf_counter()
    model_dir = train_diffusion(config)
    timings["diffusion_train_s"] = time.perf_counter() - t

    methods = {"identity": None, "histogram-matching": out / "models" / "histogram-matching",
               "sdedit": model_dir, "ddib": model_dir}
    if args.cyclegan:
        methods["cyclegan"] = Path(args.cyclegan)
    test = load_manifest(test_csv)
    n_apply = int((test["site"] != ref).sum())
    for method, model in methods.items():
        if model is None:
            continue
        translator = load_translator(model)
        if isinstance(translator, DiffusionTranslator):
            translator.set_params(mode=method)
        t = time.perf_counter()
        apply_translator(translator, test_csv, out / "harmonized" / method, progress=shown)
        timings[f"{method}_apply_s_per_image"] = (time.perf_counter() - t) / n_apply

    test = test[test["site"] != ref]  # reference-site images are their own truth
    rows = score(test, out, list(methods))
    rows.to_csv(out / "fidelity.csv", index=False)
    result = {"reference_site": ref, "n_scored": len(test), "sites": info["sites"],
              "size": args.size, "per_site": args.per_site, "timings": timings,
              "cpu_threads": torch.get_num_threads(), "methods": list(methods),
              "summary": summarize(rows, list(methods)),
              "config": config.model_dump(mode="json")}
    if args.curve_images > 0:
        translator = load_translator(model_dir)
        subset = pd.concat([g.head(args.curve_images) for _, g in test.groupby("site")])
        curve = faithfulness_curve(translator, subset, out)
        curve.to_csv(out / "curve.csv", index=False)
        result["curve"] = curve.to_dict("records")
        result["reconstruction"] = reconstruction(translator, load_manifest(test_csv), ref)
        plot_curve(curve, out / "curve.png")
    (out / "fidelity.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def score(test: pd.DataFrame, out: Path, methods: list[str]) -> pd.DataFrame:
    return score_files(test, out / "synth", {
        m: (lambda rec, m=m: rec["path"] if m == "identity"
            else out / "harmonized" / m / rec["relpath"]) for m in methods})


def summarize(rows: pd.DataFrame, methods: list[str]) -> dict:
    """Mean and 95% bootstrap CI per method (all sites, then per site), and the paired
    difference of each method to identity per image."""
    return fidelity.summarize(rows[rows["method"].isin(methods)], baseline="identity")


def faithfulness_curve(t: DiffusionTranslator, subset: pd.DataFrame, out: Path
                       ) -> pd.DataFrame:
    """SSIM/PSNR to the truth and SSIM to the input versus the knobs (in memory)."""
    images = [fidelity_image(p) for p in subset["path"]]
    truths = [fidelity_image(out / "synth" / r) for r in subset["reference_path"]]
    inputs = [pol.invert(x) if pol.is_inverted(x, t.template_) else x for x in images]
    sites = list(subset["site"])
    default = {"steps": t.steps, "sdedit_t0": t.sdedit_t0, "ddib_t0": t.ddib_t0}
    grid = ([("sdedit", "t0", v, {"sdedit_t0": v}) for v in T0S]
            + [("sdedit", "steps", v, {"steps": v}) for v in STEPS]
            + [("ddib", "steps", v, {"steps": v}) for v in STEPS]
            + [("ddib", "t0", v, {"ddib_t0": v}) for v in DEPTHS])
    rows = []
    for mode, knob, value, params in grid:
        t.set_params(mode=mode, **{**default, **params})
        start = time.perf_counter()
        outs = t.transform(images, sites)
        seconds = (time.perf_counter() - start) / len(images)
        rows.append({"mode": mode, "knob": knob, "value": value, "steps": t.steps,
                     "t0": t.sdedit_t0 if mode == "sdedit" else t.ddib_t0,
                     **_scores(outs, truths, inputs), "s_per_image": seconds})
    t.set_params(**default)
    base = {"mode": "input", "knob": "-", "value": 0, "steps": 0, "t0": 0.0,
            **_scores(inputs, truths, inputs), "s_per_image": 0.0}
    return pd.DataFrame([base, *rows])


def _scores(outs: list, truths: list, inputs: list) -> dict:
    pairs = list(zip(outs, truths, inputs, strict=True))
    to_truth = [score_pair(y, g) for y, g, _ in pairs]
    return {"ssim_truth": float(np.mean([r["ssim"] for r in to_truth])),
            "psnr_truth": float(np.mean([r["psnr"] for r in to_truth])),
            "ssim_input": float(np.mean([score_pair(y, x)["ssim"] for y, _, x in pairs]))}


def reconstruction(t: DiffusionTranslator, test: pd.DataFrame, ref: str, n: int = 8) -> dict:
    """DDIM-invert then generate with the same (reference) prior, at the training size:
    mean |error| in model space (0..1) per step count, plain and refined inversion."""
    rows = test[test["site"] == ref].head(n)
    x = torch.stack([torch.from_numpy(fidelity_image(p))[None] for p in rows["path"]])
    s = t.image_size
    x0 = torch.nn.functional.interpolate(x, size=(s, s), mode="area").clamp(0, 1) * 2 - 1
    eps = t.eps_fn([ref] * len(x0), torch.device("cpu"))
    out = {}
    scheduler = t.scheduler  # one instance for every loop below (set_timesteps is state)
    for steps in (20, 50):
        ts = smp.timesteps_for(scheduler, steps, 1.0)
        for refine in (0, 1):
            with torch.inference_mode():
                rec = smp.ddim_generate(eps, smp.ddim_invert(eps, x0, scheduler, ts, refine),
                                        scheduler, ts)
            out[f"steps{steps}_refine{refine}"] = float((rec - x0).abs().mean() / 2)
    return out


def plot_curve(curve: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = curve[curve["mode"] == "input"].iloc[0]
    panels = [("sdedit", "t0", "SDEdit noise strength t0"),
              ("sdedit", "steps", "SDEdit DDIM steps"),
              ("ddib", "steps", "DDIB DDIM steps"), ("ddib", "t0", "DDIB inversion depth")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), sharey=True)
    for ax, (mode, knob, title) in zip(axes, panels, strict=True):
        part = curve[(curve["mode"] == mode) & (curve["knob"] == knob)]
        ax.plot(part["value"], part["ssim_truth"], "o-", label="SSIM to truth")
        ax.plot(part["value"], part["ssim_input"], "s--", label="SSIM to input")
        ax.axhline(base["ssim_truth"], color="grey", lw=0.8, label="input: SSIM to truth")
        ax.set_title(title)
        ax.set_xlabel(knob)
        if knob == "steps":
            ax.set_xscale("log")
            ax.set_xticks(list(STEPS), [str(v) for v in STEPS])
            ax.minorticks_off()
    axes[0].set_ylabel("mean SSIM")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_tables(result: dict) -> None:
    s = result["summary"]
    print(f"\nfidelity to the paired reference renderings ({result['n_scored']} test images "
          f"of non-reference sites, {result['size']} px; mean [95% bootstrap CI])")
    print(f"{'scope':8} {'method':20} {'SSIM':>24} {'PSNR dB':>24} {'dSSIM vs identity':>24}")
    for scope, entry in s.items():
        for method in result["methods"]:
            e = entry[method]
            cells = [f"{e[m]['mean']:6.3f} [{e[m]['ci95'][0]:6.3f},{e[m]['ci95'][1]:6.3f}]"
                     for m in ("ssim", "psnr")]
            d = e.get("minus_identity", {}).get("ssim")
            diff = f"{d['mean']:+6.3f} [{d['ci95'][0]:+6.3f},{d['ci95'][1]:+6.3f}]" if d else ""
            print(f"{scope:8} {method:20} {cells[0]:>24} {cells[1]:>24} {diff:>24}")
    t = result["timings"]
    print(f"diffusion training: {t['diffusion_train_s']:.0f} s on {result['cpu_threads']} CPU "
          f"thread(s); apply s/image: " + ", ".join(
              f"{k.removesuffix('_apply_s_per_image')} {v:.3f}" for k, v in t.items()
              if k.endswith("_apply_s_per_image")))
    if "curve" in result:
        print("\nfaithfulness (curve subset): mode knob value -> SSIM to truth, SSIM to input, "
              "s/image")
        for r in result["curve"]:
            print(f"  {r['mode']:8} {r['knob']:5} {r['value']:>5} -> {r['ssim_truth']:.3f} "
                  f"{r['ssim_input']:.3f} {r['s_per_image']:.3f}")
        print("DDIM inversion -> generation, mean |error| (0..1 scale):",
              json.dumps({k: round(v, 4) for k, v in result["reconstruction"].items()}))


if __name__ == "__main__":
    raise SystemExit(main())
