"""Does CycleGAN bring other sites closer to the reference site than histogram matching?

On the synthetic benchmark (paired reference renderings = ground truth): synthesize,
split by patient, train histogram matching and CycleGAN (a config, default quick; a
config with a `landmarks` section trains the histogram-residual translator instead, e.g.
configs/histogram_residual/quick.yaml) on the train half, harmonize the test half with
`apply_translator` (files in, files out, as a user would), and score every non-reference
test image against its reference rendering: SSIM and PSNR in model space, mean with 95%
bootstrap CIs, per method and per site, plus
the paired CycleGAN - histogram matching difference. CPU only by default.

    python eval/cyclegan_fidelity.py --out eval_out/cyclegan_fidelity
    python eval/cyclegan_fidelity.py --config configs/histogram_residual/quick.yaml \
        --sites 3 --seed 3 --out eval_out/hr_seed3
    python eval/cyclegan_fidelity.py --config configs/cyclegan/quick.yaml --set train.steps=500
    python eval/cyclegan_fidelity.py --config configs/histogram_residual/quick.yaml --sites 3 \
        --seed 10 --federated configs/federated/histogram-residual-quick.yaml \
        --set data.image_size=64 --set model.n_blocks=4 --set train.steps=300 \
        --set train.batch_size=2 --set train.select_fraction=0 --out eval_out/hr_fed_seed10

`--federated FEDCONFIG` also trains the federated form (Flower simulation, one node per
site, K local steps as FEDCONFIG says) on the same train half with the same translator
config and overrides (the source nodes' batch is the central batch over the source sites;
its rounds are the central steps), after a federated histogram release (the landmarks of
the histogram-residual kind; for every kind the reference thumbnail that lets the nodes
flip inverted exports, as central training does), and scores it as method `federated`.

Writes OUT/fidelity.csv (one row per image and method), OUT/fidelity.json (summary,
timings, config) and prints a table.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting stall each other 10-30x when the cores are shared;
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
from harmonize.data.manifest import load_manifest
from harmonize.evaluation import fidelity
from harmonize.evaluation.fidelity import prepare_benchmark, score_files
from harmonize.fit import fit_and_save
from harmonize.translators import HistogramMatching, load_translator
from harmonize.translators.cyclegan import load_config, train_cyclegan
from harmonize.translators.cyclegan.config import parse_override
from harmonize.translators.tiling import seam_ratio, tile_borders

ROOT = Path(__file__).resolve().parents[1]
CLASSICAL = ("identity", "histogram-matching")
START = "at-step-0"  # the histogram-residual translator before training


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval_out/cyclegan_fidelity")
    p.add_argument("--config", default=str(ROOT / "configs/cyclegan/quick.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--per-site", type=int, default=80)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--federated", default=None, metavar="FEDCONFIG",
                   help="also train the federated form with this configs/federated/ file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print_table(result)
    return 0


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    shown = not args.quiet
    t = time.perf_counter()
    train_csv, test_csv, info = prepare_benchmark(out, args.sites, args.per_site, args.size,
                                                  args.seed, progress=shown)
    timings: dict[str, float] = {"synth_s": time.perf_counter() - t}
    ref = info["reference_site"]

    t = time.perf_counter()
    fit_and_save(HistogramMatching(), load_manifest(train_csv), train_csv, ref,
                 out / "models" / "histogram-matching", progress=shown)
    timings["hm_fit_s"] = time.perf_counter() - t

    overrides = dict(parse_override(s) for s in args.overrides)
    overrides.update({"data.manifest": str(train_csv), "data.reference_site": ref,
                      "train.out": str(out / "cyclegan_run"), "train.progress": shown})
    config = load_config(args.config, overrides)
    kind = config.kind  # cyclegan, or histogram-residual
    t = time.perf_counter()
    model_dir = train_cyclegan(config)
    timings["train_s"] = time.perf_counter() - t

    methods = [*CLASSICAL, kind]
    if kind == "histogram-residual":  # what training added to where it started
        load_translator(model_dir).at_start().save(out / "models" / START)
        methods.insert(2, START)
    if args.federated:
        t = time.perf_counter()
        federated_model(args, config, overrides, train_csv, out).save(out / "models" /
                                                                       "federated")
        timings["federated_train_s"] = time.perf_counter() - t
        methods.append("federated")
    for method in methods[1:]:
        model = out / "models" / method if method != kind else model_dir
        t = time.perf_counter()
        apply_translator(load_translator(model), test_csv, out / "harmonized" / method,
                         progress=shown)
        timings[f"{method}_apply_s"] = time.perf_counter() - t

    test = load_manifest(test_csv)
    test = test[test["site"] != ref]  # reference-site images are their own truth
    seams = seam_check(load_translator(model_dir), config.data.image_size, args.seed)
    rows = score(test, out, methods)
    rows.to_csv(out / "fidelity.csv", index=False)
    result = {"kind": kind, "seed": args.seed, "cpu": _cpu_name(), "reference_site": ref,
              "n_scored": len(test), "sites": info["sites"],
              "size": args.size, "per_site": args.per_site, "timings": timings,
              "cpu_threads": _threads(), "summary": summarize(rows, kind), "seams": seams,
              "config": config.model_dump(mode="json")}
    (out / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def federated_model(args, config, overrides: dict, train_csv: Path, out: Path):
    """The federated form of `config`, trained on the same rows: one node per site, the
    same translator config and overrides, rounds = the central steps at K = 1."""
    from harmonize.federated.config import load_federated_config
    from harmonize.federated.run import run_federated

    sources = len(config.data.sites or load_manifest(train_csv)["site"].unique()) - 1
    if config.train.batch_size % sources:
        raise SystemExit(f"--federated: train.batch_size {config.train.batch_size} must split "
                         f"evenly over the {sources} source nodes")
    common = {"manifest": str(train_csv), "reference_site": config.data.reference_site,
              "seed": config.train.seed, "progress": not args.quiet}
    tr_set = {k: v for k, v in overrides.items()
              if not k.startswith(("data.manifest", "data.reference_site", "train.out"))}
    tr_set["train.batch_size"] = config.train.batch_size // sources
    # released first: the landmarks (histogram-residual) and the reference thumbnail that
    # guards polarity at the nodes (every kind)
    n_landmarks = config.landmarks.n_quantiles if config.landmarks else 8
    hm = load_federated_config(ROOT / "configs/federated/histogram.yaml", {
        **common, "out": str(out / "federated_histogram"), "histogram.landmarks": n_landmarks})
    released = str(run_federated(hm)["model"])
    if config.kind == "histogram-residual":
        tr_set["landmarks.checkpoint"] = released
    cfg = load_federated_config(args.federated, {
        **common, "out": str(out / "federated_run"), "rounds": config.train.steps,
        "cyclegan.config": str(Path(args.config).resolve()), "cyclegan.set": tr_set,
        **({} if config.kind == "histogram-residual" else {"cyclegan.template": released})})
    return load_translator(run_federated(cfg)["model"])


def seam_check(translator, tile: int, seed: int, n: int = 6) -> dict:
    """Tiled apply on images rendered at 4x the training size (new phantoms, the
    non-reference sites' acquisitions): gradient energy across tile borders relative to
    like lines elsewhere (`seam_ratio`; 1 = no seam), for blended tiles, hard tiles
    (the measure must see those) and one whole-image pass (no tiles: the baseline)."""
    from harmonize.synth import default_sites, make_phantom, render

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


def score(test: pd.DataFrame, out: Path, methods: list[str]) -> pd.DataFrame:
    return score_files(test, out / "synth", {
        m: (lambda rec, m=m: rec["path"] if m == "identity"
            else out / "harmonized" / m / rec["relpath"]) for m in methods})


def summarize(rows: pd.DataFrame, kind: str) -> dict:
    """Mean and 95% bootstrap CI per method (all sites, then per site), and the paired
    trained translator - histogram matching difference per image (`minus_hm`)."""
    out = fidelity.summarize(rows, baseline="histogram-matching")
    for entry in out.values():
        entry["minus_hm"] = entry[kind].pop("minus_histogram-matching")
    if "federated" in set(rows["method"]):  # federated - central, paired per image
        vs_central = fidelity.summarize(rows[rows["method"].isin([kind, "federated"])],
                                        baseline=kind)
        for scope, entry in out.items():
            entry["federated_minus_central"] = vs_central[scope]["federated"][f"minus_{kind}"]
    return out


def print_table(result: dict) -> None:
    s, kind = result["summary"], result["kind"]
    methods = [m for m in (*CLASSICAL, START, kind, "federated") if m in s["all"]]
    print(f"\nfidelity to the paired reference renderings ({result['n_scored']} test images "
          f"of non-reference sites, {result['size']} px; mean [95% bootstrap CI])")
    print(f"{'scope':10} {'method':20} {'SSIM':>26} {'PSNR dB':>26}")
    for scope, entry in s.items():
        for method in (*methods, "minus_hm", "federated_minus_central"):
            if method not in entry:
                continue
            e = entry[method]
            cells = [f"{e[m]['mean']:7.3f} [{e[m]['ci95'][0]:7.3f},{e[m]['ci95'][1]:7.3f}]"
                     for m in ("ssim", "psnr")]
            print(f"{scope:10} {method:20} {cells[0]:>26} {cells[1]:>26}")
    t = result["timings"]
    print(f"{kind} training: {t['train_s']:.0f} s on {result['cpu_threads']} "
          f"CPU thread(s) ({result['cpu']}); apply {t[f'{kind}_apply_s']:.1f} s")
    sm = result["seams"]
    print(f"seams at {sm['image_side']} px (tile {sm['tile']}; 1 = none): blended tiles "
          f"{sm['blended']['mean']:.3f} (max {sm['blended']['max']:.3f}), whole-image pass "
          f"{sm['whole_image']['mean']:.3f}, hard tiles {sm['hard']['mean']:.3f}")


def _cpu_name() -> str:
    """The CPU model and whether it runs bf16 natively (numbers depend on both)."""
    import platform

    from harmonize.training.device import cpu_kind

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}; {cpu_kind()}"


def _threads() -> int:
    return torch.get_num_threads() or os.cpu_count() or 1


if __name__ == "__main__":
    raise SystemExit(main())
