"""Trained translators against paired truth on the synthetic benchmark: the experiments of
eval/cyclegan_fidelity.py (`cyclegan_fidelity`: CycleGAN or the histogram-residual
translator, optionally its federated form, vs histogram matching, and the seams of tiled
apply) and eval/diffusion_fidelity.py (`diffusion_fidelity`: SDEdit and DDIB vs identity,
and the faithfulness curves of their knobs).

Both synthesize and split by patient (`prepare_benchmark`), fit histogram matching on the
train half, harmonize the test half with `apply_translator` (files in, files out, into
OUT/harmonized/<method>/), score every non-reference test image against its reference
rendering (`score_harmonized`) and summarize with 95% bootstrap CIs per method and site.
Both write OUT/fidelity.csv and OUT/fidelity.json and return the latter's content.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from harmonize.apply import apply_translator
from harmonize.configs import ConfigError
from harmonize.data.manifest import load_manifest
from harmonize.evaluation import fidelity
from harmonize.evaluation.bench_support import ROOT, machine
from harmonize.evaluation.fidelity import (
    ci_cell,
    fidelity_image,
    prepare_benchmark,
    score_harmonized,
    score_pair,
)
from harmonize.fit import fit_and_save
from harmonize.translators import HistogramMatching, Translator, load_translator

CLASSICAL = ("identity", "histogram-matching")
START = "at-step-0"  # the histogram-residual translator before training
T0S = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)  # faithfulness curves: SDEdit t0,
STEPS = (5, 10, 20, 50)  # DDIM steps (SDEdit and DDIB),
DEPTHS = (0.25, 0.5, 0.75, 1.0)  # DDIB inversion depth


# --- shared by both experiments ----------------------------------------------------------


def benchmark(out: Path, sites: int, per_site: int, size: int, seed: int, progress: bool
              ) -> tuple[Path, Path, dict, dict[str, float]]:
    """The benchmark in OUT (`prepare_benchmark`) and histogram matching fitted on its
    train half into OUT/models/histogram-matching: (train manifest, test manifest,
    synth.json content, timings synth_s and hm_fit_s)."""
    t = time.perf_counter()
    train_csv, test_csv, info = prepare_benchmark(out, sites, per_site, size, seed,
                                                  progress=progress)
    timings = {"synth_s": time.perf_counter() - t}
    t = time.perf_counter()
    fit_and_save(HistogramMatching(), load_manifest(train_csv), train_csv,
                 info["reference_site"], out / "models" / "histogram-matching",
                 progress=progress)
    timings["hm_fit_s"] = time.perf_counter() - t
    return train_csv, test_csv, info, timings


def _print_heading(result: dict) -> None:
    print(f"\nfidelity to the paired reference renderings ({result['n_scored']} test images "
          f"of non-reference sites, {result['size']} px; mean [95% bootstrap CI])")


# --- CycleGAN / histogram residual vs histogram matching -----------------------------------


def cyclegan_fidelity(out: str | Path, *, config: str | Path,
                      overrides: dict[str, Any] | None = None, sites: int = 4,
                      per_site: int = 80, size: int = 128, seed: int = 0,
                      federated: str | Path | None = None, progress: bool = True) -> dict:
    """Train the translator of `config` (a CycleGAN config; one with a `landmarks`
    section trains the histogram-residual translator) with `overrides` on the train half,
    and, given a configs/federated/ file `federated`, its federated form (method
    "federated"); harmonize and score the test half. Writes OUT/fidelity.csv (one row per
    image and method) and OUT/fidelity.json (summary, seams, timings, config)."""
    from harmonize.translators.cyclegan import load_config, train_cyclegan

    out = Path(out)
    train_csv, test_csv, info, timings = benchmark(out, sites, per_site, size, seed, progress)
    ref = info["reference_site"]
    overrides = {**(overrides or {}), "data.manifest": str(train_csv),
                 "data.reference_site": ref, "train.out": str(out / "cyclegan_run"),
                 "train.progress": progress}
    cfg = load_config(config, overrides)
    kind = cfg.kind  # cyclegan, or histogram-residual
    if federated:
        _check_federated_batch(cfg, train_csv)  # before training, not after
    t = time.perf_counter()
    model_dir = train_cyclegan(cfg)
    timings["train_s"] = time.perf_counter() - t

    methods = [*CLASSICAL, kind]
    if kind == "histogram-residual":  # what training added to where it started
        load_translator(model_dir).at_start().save(out / "models" / START)
        methods.insert(2, START)
    if federated:
        t = time.perf_counter()
        federated_model(cfg, config, federated, overrides, train_csv, out,
                        progress).save(out / "models" / "federated")
        timings["federated_train_s"] = time.perf_counter() - t
        methods.append("federated")
    for method in methods[1:]:
        model = out / "models" / method if method != kind else model_dir
        t = time.perf_counter()
        apply_translator(load_translator(model), test_csv, out / "harmonized" / method,
                         progress=progress)
        timings[f"{method}_apply_s"] = time.perf_counter() - t

    test = load_manifest(test_csv)
    test = test[test["site"] != ref]  # reference-site images are their own truth
    seams = seam_check(load_translator(model_dir), cfg.data.image_size, seed)
    rows = score_harmonized(test, out, methods)
    rows.to_csv(out / "fidelity.csv", index=False)
    m = machine()
    result = {"kind": kind, "seed": seed, "cpu": m["cpu_kind"], "reference_site": ref,
              "n_scored": len(test), "sites": info["sites"],
              "size": size, "per_site": per_site, "timings": timings,
              "cpu_threads": m["torch_threads"], "summary": summarize_vs_hm(rows, kind),
              "seams": seams, "config": cfg.model_dump(mode="json")}
    (out / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _source_nodes(config, train_csv: Path) -> int:
    return len(config.data.sites or load_manifest(train_csv)["site"].unique()) - 1


def _check_federated_batch(config, train_csv: Path) -> None:
    sources = _source_nodes(config, train_csv)
    if config.train.batch_size % sources:
        raise ConfigError(f"--federated: train.batch_size {config.train.batch_size} must "
                          f"split evenly over the {sources} source nodes")


def federated_model(config, config_path: str | Path, federated: str | Path,
                    overrides: dict[str, Any], train_csv: Path, out: Path,
                    progress: bool = True) -> Translator:
    """The federated form of `config` (loaded from `config_path` with `overrides`),
    trained on the same rows with the configs/federated/ file `federated`: one node per
    site, the same translator config and overrides, each source node's batch the central
    batch over the source sites, rounds = the central steps."""
    from harmonize.federated.config import load_federated_config
    from harmonize.federated.run import run_federated

    _check_federated_batch(config, train_csv)
    common = {"manifest": str(train_csv), "reference_site": config.data.reference_site,
              "seed": config.train.seed, "progress": progress}
    tr_set = {k: v for k, v in overrides.items()
              if not k.startswith(("data.manifest", "data.reference_site", "train.out"))}
    tr_set["train.batch_size"] = config.train.batch_size // _source_nodes(config, train_csv)
    # released first: the landmarks (histogram-residual) and the reference thumbnail that
    # guards polarity at the nodes (every kind)
    n_landmarks = config.landmarks.n_quantiles if config.landmarks else 8
    hm = load_federated_config(ROOT / "configs/federated/histogram.yaml", {
        **common, "out": str(out / "federated_histogram"), "histogram.landmarks": n_landmarks})
    released = str(run_federated(hm)["model"])
    if config.kind == "histogram-residual":
        tr_set["landmarks.checkpoint"] = released
    cfg = load_federated_config(federated, {
        **common, "out": str(out / "federated_run"), "rounds": config.train.steps,
        "cyclegan.config": str(Path(config_path).resolve()), "cyclegan.set": tr_set,
        **({} if config.kind == "histogram-residual" else {"cyclegan.template": released})})
    return load_translator(run_federated(cfg)["model"])


def seam_check(translator: Translator, tile: int, seed: int, n: int = 6) -> dict:
    """Tiled apply on images rendered at 4x the training size (new phantoms, the
    non-reference sites' acquisitions): gradient energy across tile borders relative to
    like lines elsewhere (`seam_ratio`; 1 = no seam), for blended tiles, hard tiles
    (the measure must see those) and one whole-image pass (no tiles: the baseline)."""
    from harmonize.synth import default_sites, make_phantom, render
    from harmonize.translators.tiling import seam_ratio, tile_borders

    side = 4 * tile
    sites = default_sites(4, "xray", seed)[1:]
    images = []
    for i in range(n):
        phantom = make_phantom("xray", side, bool(i % 2), np.random.default_rng([seed, 77, i]))
        acq = sites[i % len(sites)]
        values = render(phantom.ideal, phantom.finding, acq, np.random.default_rng([seed, 78, i]))
        images.append((values / acq.max_value).astype(np.float32))
    overlap = translator.tile_overlap
    result: dict = {"image_side": side, "tile": tile, "overlap": overlap, "n": n}
    for name, ov, size in (("blended", overlap, tile), ("hard", 0.0, tile),
                           ("whole_image", overlap, side)):
        translator.tile_overlap, translator.tile_size = ov, size
        started = time.perf_counter()
        outputs = translator.transform(images)
        seconds = time.perf_counter() - started
        borders = tile_borders(side, tile, ov)
        ratios = [seam_ratio(y, x, borders) for y, x in zip(outputs, images, strict=True)]
        result[name] = {"mean": float(np.mean(ratios)), "max": float(np.max(ratios)),
                        "seconds_per_image": seconds / n}
    translator.tile_overlap, translator.tile_size = overlap, tile
    return result


def summarize_vs_hm(rows: pd.DataFrame, kind: str) -> dict:
    """Mean and 95% bootstrap CI per method (all sites, then per site), and the paired
    trained translator - histogram matching difference per image (`minus_hm`); with a
    "federated" method, the paired federated - central difference
    (`federated_minus_central`)."""
    out = fidelity.summarize(rows, baseline="histogram-matching")
    for entry in out.values():
        entry["minus_hm"] = entry[kind].pop("minus_histogram-matching")
    if "federated" in set(rows["method"]):  # federated - central, paired per image
        vs_central = fidelity.summarize(rows[rows["method"].isin([kind, "federated"])],
                                        baseline=kind)
        for scope, entry in out.items():
            entry["federated_minus_central"] = vs_central[scope]["federated"][f"minus_{kind}"]
    return out


def print_cyclegan_table(result: dict) -> None:
    s, kind = result["summary"], result["kind"]
    methods = [m for m in (*CLASSICAL, START, kind, "federated") if m in s["all"]]
    _print_heading(result)
    print(f"{'scope':10} {'method':20} {'SSIM':>26} {'PSNR dB':>26}")
    for scope, entry in s.items():
        for method in (*methods, "minus_hm", "federated_minus_central"):
            if method not in entry:
                continue
            cells = [ci_cell(entry[method][m], 7) for m in ("ssim", "psnr")]
            print(f"{scope:10} {method:20} {cells[0]:>26} {cells[1]:>26}")
    t = result["timings"]
    print(f"{kind} training: {t['train_s']:.0f} s on {result['cpu_threads']} "
          f"CPU thread(s) ({result['cpu']}); apply {t[f'{kind}_apply_s']:.1f} s")
    sm = result["seams"]
    print(f"seams at {sm['image_side']} px (tile {sm['tile']}; 1 = none): blended tiles "
          f"{sm['blended']['mean']:.3f} (max {sm['blended']['max']:.3f}), whole-image pass "
          f"{sm['whole_image']['mean']:.3f}, hard tiles {sm['hard']['mean']:.3f}")


# --- SDEdit and DDIB vs identity, and their faithfulness knob -------------------------------


def diffusion_fidelity(out: str | Path, *, config: str | Path,
                       overrides: dict[str, Any] | None = None,
                       cyclegan: str | Path | None = None, sites: int = 4,
                       per_site: int = 80, size: int = 128, seed: int = 0,
                       curve_images: int = 8, progress: bool = True) -> dict:
    """Train the diffusion priors of `config` with `overrides` in DDIB mode (one prior per
    site; SDEdit uses the reference prior) on the train half; harmonize and score the test
    half by identity, histogram matching, SDEdit, DDIB and, given a checkpoint `cyclegan`,
    CycleGAN. With `curve_images` > 0, the faithfulness curves on that many test images
    per site and the DDIM reconstruction error. Writes OUT/fidelity.csv, OUT/fidelity.json
    and, with curves, OUT/curve.csv and OUT/curve.png."""
    from harmonize.translators.diffusion import DiffusionTranslator, load_config, train_diffusion

    out = Path(out)
    train_csv, test_csv, info, timings = benchmark(out, sites, per_site, size, seed, progress)
    del timings["hm_fit_s"]  # fidelity.json as this experiment always wrote it
    ref = info["reference_site"]
    cfg = load_config(config, {**(overrides or {}), "data.manifest": str(train_csv),
                               "data.reference_site": ref, "inference.mode": "ddib",
                               "train.out": str(out / "diffusion_run"),
                               "train.progress": progress})
    t = time.perf_counter()
    model_dir = train_diffusion(cfg)
    timings["diffusion_train_s"] = time.perf_counter() - t

    methods = {"identity": None, "histogram-matching": out / "models" / "histogram-matching",
               "sdedit": model_dir, "ddib": model_dir}
    if cyclegan:
        methods["cyclegan"] = Path(cyclegan)
    test = load_manifest(test_csv)
    n_apply = int((test["site"] != ref).sum())
    for method, model in methods.items():
        if model is None:
            continue
        translator = load_translator(model)
        if isinstance(translator, DiffusionTranslator):
            translator.set_params(mode=method)
        t = time.perf_counter()
        apply_translator(translator, test_csv, out / "harmonized" / method, progress=progress)
        timings[f"{method}_apply_s_per_image"] = (time.perf_counter() - t) / n_apply

    test = test[test["site"] != ref]  # reference-site images are their own truth
    rows = score_harmonized(test, out, list(methods))
    rows.to_csv(out / "fidelity.csv", index=False)
    result = {"reference_site": ref, "n_scored": len(test), "sites": info["sites"],
              "size": size, "per_site": per_site, "timings": timings,
              "cpu_threads": machine()["torch_threads"], "methods": list(methods),
              "summary": summarize_vs_identity(rows, list(methods)),
              "config": cfg.model_dump(mode="json")}
    if curve_images > 0:
        translator = load_translator(model_dir)
        subset = pd.concat([g.head(curve_images) for _, g in test.groupby("site")])
        curve = faithfulness_curve(translator, subset, out / "synth")
        curve.to_csv(out / "curve.csv", index=False)
        result["curve"] = curve.to_dict("records")
        result["reconstruction"] = reconstruction(translator, load_manifest(test_csv), ref)
        plot_curve(curve, out / "curve.png")
    (out / "fidelity.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def summarize_vs_identity(rows: pd.DataFrame, methods: list[str]) -> dict:
    """Mean and 95% bootstrap CI per method (all sites, then per site), and the paired
    difference of each method to identity per image (`minus_identity`)."""
    return fidelity.summarize(rows[rows["method"].isin(methods)], baseline="identity")


def faithfulness_curve(t, subset: pd.DataFrame, truth_root: Path) -> pd.DataFrame:
    """SSIM/PSNR to the truth and SSIM to the (polarity-corrected) input versus SDEdit t0,
    DDIM steps and DDIB depth, for DiffusionTranslator `t` on the rows of `subset` (truths
    under `truth_root`, in memory); the first row ("input") scores the inputs themselves."""
    from harmonize.data import polarity as pol

    images = [fidelity_image(p) for p in subset["path"]]
    truths = [fidelity_image(truth_root / r) for r in subset["reference_path"]]
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


def reconstruction(t, test: pd.DataFrame, ref: str, n: int = 8) -> dict:
    """DDIM-invert then generate with the same (reference) prior of DiffusionTranslator
    `t`, at the training size: mean |error| in model space (0..1) per step count, plain
    and refined inversion."""
    from harmonize.translators.diffusion import sampling as smp

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
    """Four panels (SDEdit t0, SDEdit steps, DDIB steps, DDIB depth): SSIM to the truth
    and to the input, with the input's own SSIM to the truth as a line."""
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


def print_diffusion_tables(result: dict) -> None:
    _print_heading(result)
    print(f"{'scope':8} {'method':20} {'SSIM':>24} {'PSNR dB':>24} {'dSSIM vs identity':>24}")
    for scope, entry in result["summary"].items():
        for method in result["methods"]:
            e = entry[method]
            cells = [ci_cell(e[m], 6) for m in ("ssim", "psnr")]
            d = e.get("minus_identity", {}).get("ssim")
            diff = ci_cell(d, 6, signed=True) if d else ""
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
