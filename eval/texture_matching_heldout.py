"""Does texture matching beat histogram matching on held-out images, on every seed?

The held-out benchmark of eval/histogram_residual_benchmark.py without training: per seed,
synthesize 3 sites x 80 at 128 px, split by patient (`prepare_benchmark`), fit histogram
matching and texture matching (`fingerprints: everywhere`, each `spectrum` mode) on the
train half, harmonize the test half with `apply_translator` (files in, files out), and
score every non-reference test image against its paired reference rendering: SSIM and
PSNR, mean with 95% bootstrap CIs, the paired difference to histogram matching, and the
finding audit without a classifier (`finding_contrast_audit`: erased, exaggerated, median
contrast against the truth's).

    python eval/texture_matching_heldout.py --out eval_out/tm_heldout --seeds 3 5 10

Writes OUT/summary.csv (one row per seed and method) and OUT/summary.json; the
benchmark folders stay in OUT/seed<S>/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from harmonize.apply import apply_translator
from harmonize.data.manifest import load_manifest
from harmonize.evaluation import fidelity
from harmonize.evaluation.audit import finding_contrast_audit
from harmonize.evaluation.bench_support import machine
from harmonize.evaluation.fidelity import score_harmonized
from harmonize.evaluation.translator_fidelity import benchmark
from harmonize.fit import fit_and_save
from harmonize.translators import TextureMatching, load_translator

SPECTRUM_MODES = ("site", "sharpen")


def run_seed(out: Path, seed: int, sites: int, per_site: int, size: int) -> list[dict]:
    """One seed: fit, apply and score; one summary row per method."""
    train_csv, test_csv, info, timings = benchmark(out, sites, per_site, size, seed,
                                                   progress=False)
    ref = info["reference_site"]
    train = load_manifest(train_csv)
    methods = ["identity", "histogram-matching"]
    for mode in SPECTRUM_MODES:
        name = f"texture-matching-{mode}"
        t = time.perf_counter()
        fit_and_save(TextureMatching(fingerprints="everywhere", spectrum=mode), train,
                     train_csv, ref, out / "models" / name, progress=False)
        timings[f"{name}_fit_s"] = time.perf_counter() - t
        methods.append(name)
    for method in methods[1:]:
        t = time.perf_counter()
        apply_translator(load_translator(out / "models" / method), test_csv,
                         out / "harmonized" / method, progress=False)
        timings[f"{method}_apply_s"] = time.perf_counter() - t
    test = load_manifest(test_csv)
    test = test[test["site"] != ref]  # reference-site images are their own truth
    scores = score_harmonized(test, out, methods)
    scores.to_csv(out / "fidelity.csv", index=False)
    summary = fidelity.summarize(scores, baseline="histogram-matching")["all"]
    rows = []
    for method in methods:
        audit = finding_contrast_audit(
            test, out / "synth", lambda rec, m=method: (
                rec["path"] if m == "identity"
                else out / "harmonized" / m / rec["relpath"]))
        entry = summary[method]
        row = {"seed": seed, "method": method, "n_images": len(test),
               "ssim": entry["ssim"]["mean"], "ssim_lo": entry["ssim"]["ci95"][0],
               "ssim_hi": entry["ssim"]["ci95"][1], "psnr": entry["psnr"]["mean"]}
        diff = entry.get("minus_histogram-matching")
        if diff:
            row.update({"ssim_minus_hm": diff["ssim"]["mean"],
                        "ssim_minus_hm_lo": diff["ssim"]["ci95"][0],
                        "ssim_minus_hm_hi": diff["ssim"]["ci95"][1]})
        row.update({"findings": audit["n"], "erased": audit["findings_erased"],
                    "exaggerated": audit["findings_exaggerated"],
                    "contrast_vs_truth": audit["finding_contrast_vs_truth"]})
        rows.append(row)
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval_out/texture_matching_heldout")
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 5, 10])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--per-site", type=int, default=80)
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        started = time.perf_counter()
        rows += run_seed(out / f"seed{seed}", seed, args.sites, args.per_site, args.size)
        print(f"seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "summary.csv", index=False, float_format="%.4f")
    (out / "summary.json").write_text(json.dumps(
        {"rows": rows, "machine": machine(), "sites": args.sites,
         "per_site": args.per_site, "size": args.size}, indent=2, default=float) + "\n")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
