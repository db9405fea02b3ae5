"""Do harmonized images still tell which hospital they came from?

On the demo's synthetic 4-site benchmark (`harmonize demo`: 4 sites x 80 images at 128 px,
seed 0, the same prevalences), harmonize every image with histogram matching, fingerprint
removal alone, fingerprint removal + histogram matching (the histogram-residual translator
at step 0), the trained histogram-residual translator (configs/histogram_residual/
quick.yaml, fingerprints removed) and texture matching (`texture-matching`, with the
benchmark's anatomy masks as ROI: fingerprints kept out of the masks, its default, and
inpainted everywhere, since the phantom masks reach under the collimators; and
`spectrum: sharpen`, which never softens), then run
`harmonize shift-report --compare` on each. Per method:
- the radiomics site AUC (one-vs-rest, cross-validated logistic regression on every
  feature; 0.5 = the sites cannot be told apart) before and after, and after ComBat on
  the features (the report's baseline);
- the share of shifted features and the mean effect size (epsilon squared: the share of a
  feature's variance the site explains) over the texture families;
- what it costs: SSIM and PSNR of every non-reference image to its paired reference
  rendering (the truth), mean [95% bootstrap CI], and the audit's finding contrasts on
  every non-reference finding (`finding_contrast_audit`: erased, exaggerated, median
  contrast against the truth's).
The paired truth itself is scored as a method too (`truth`): the site AUC of perfectly
harmonized images. Every method is fitted on all images (no labels are used).

    python eval/fingerprint_site_auc.py --out eval_out/site_auc
    python eval/fingerprint_site_auc.py --seed 1 --without-trained --out eval_out/site_auc_seed1

(`--without-trained` leaves out the trained histogram-residual translator, the only
method that takes minutes.)

Writes OUT/site_auc.csv and OUT/site_auc.json (one row per method), OUT/fidelity.csv (one
row per image and method), OUT/grid.png (one image per site: raw, histogram matching,
texture matching, truth) and each report under OUT/reports/METHOD/report.html.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eval/cyclegan_fidelity.py

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.apply import apply_translator
from harmonize.data.manifest import load_manifest
from harmonize.evaluation.audit import finding_contrast_audit
from harmonize.evaluation.fidelity import mean_ci, score_files
from harmonize.fit import fit_and_save
from harmonize.radiomics.shift_report import run_shift_report
from harmonize.synth import generate
from harmonize.translators import HistogramMatching, TextureMatching, load_translator
from harmonize.translators.cyclegan import load_config, train_cyclegan

ROOT = Path(__file__).resolve().parents[1]
PREVALENCE = [0.5, 0.8, 0.2, 0.5]  # the demo's site-label shortcut
TEXTURE_FAMILIES = ("glcm", "glrlm", "glszm", "gldm", "ngtdm")
FITTED = {"histogram-matching": HistogramMatching,
          "texture-matching": lambda: TextureMatching(spectrum="site"),  # masks protected
          "texture-matching-everywhere": lambda: TextureMatching(fingerprints="everywhere",
                                                                 spectrum="site"),
          "texture-matching-sharpen": lambda: TextureMatching(fingerprints="everywhere",
                                                              spectrum="sharpen")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval_out/site_auc")
    p.add_argument("--config", default=str(ROOT / "configs/histogram_residual/quick.yaml"))
    p.add_argument("--per-site", type=int, default=80)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--without-trained", action="store_true",
                   help="leave out the trained histogram-residual translator")
    args = p.parse_args(argv)
    out = Path(args.out)
    data = out / "synth"
    if not (data / "manifest.csv").exists():
        generate(data, sites=4, per_site=args.per_site, size=args.size, seed=args.seed,
                 prevalence=PREVALENCE, finding_scale=2.5, progress=False)
    manifest = data / "manifest.csv"
    ref = "site_a"
    timings = {}
    models = {"fingerprints": "fingerprints"}
    for method, make in FITTED.items():
        model_dir = out / "models" / method
        if not model_dir.exists():
            started = time.perf_counter()
            fit_and_save(make(), load_manifest(manifest), manifest, ref, model_dir,
                         progress=False)
            timings[f"{method}_fit_s"] = time.perf_counter() - started
        models[method] = model_dir
    run_dir = out / "histogram_residual_run"
    if not args.without_trained:
        models.update(_trained(args.config, manifest, ref, run_dir, out, timings))
    folders = {"truth": data / "reference"}  # the paired truth, mirrored like an output
    for method, model in models.items():
        folders[method] = out / "harmonized" / method
        if not (folders[method] / "apply_log.csv").exists():
            started = time.perf_counter()
            apply_translator(load_translator(model), manifest, folders[method], progress=False)
            timings[f"{method}_apply_s"] = time.perf_counter() - started
    df = load_manifest(manifest)
    others = df[df["site"] != ref]
    fidelity = score_files(others, data, {m: (lambda rec, f=f: f / rec["relpath"])
                                          for m, f in folders.items() if m != "truth"})
    fidelity.to_csv(out / "fidelity.csv", index=False)
    rows = []
    for method, harmonized in folders.items():
        started = time.perf_counter()
        s = run_shift_report(manifest, out / "reports" / method, compare_with=harmonized,
                             reference_site=ref, progress=False, label=method)
        audit = ({} if method == "truth" else finding_contrast_audit(
            others, data, lambda rec, f=harmonized: f / rec["relpath"]))
        rows.append(_row(method, s, fidelity[fidelity["method"] == method], audit,
                         time.perf_counter() - started))
        print(f"{method:28s} site AUC {rows[-1]['site_auc_before']:.3f} -> "
              f"{rows[-1]['site_auc_after']:.3f}, texture effect size "
              f"{rows[-1]['texture_effect_size_before']:.3f} -> "
              f"{rows[-1]['texture_effect_size_after']:.3f}", flush=True)
    write_grid(out / "grid.png", df, folders)
    table = pd.DataFrame(rows)
    table.to_csv(out / "site_auc.csv", index=False, float_format="%.4f")
    (out / "site_auc.json").write_text(json.dumps(
        {"rows": rows, "timings": timings, "per_site": args.per_site, "size": args.size,
         "seed": args.seed, "config": str(args.config)}, indent=2) + "\n")
    return 0


def write_grid(path: Path, df: pd.DataFrame, folders: dict[str, Path]) -> None:
    """The same-numbered patient of every site: as stored (polarity as exported),
    harmonized two ways, and the paired truth (the reference site's rendering)."""
    from harmonize.data.intensity import IntensityPolicy
    from harmonize.data.io import read_image
    from harmonize.report.html import image_grid

    policy = IntensityPolicy()
    columns = {"as stored": None, "histogram matching": "histogram-matching",
               "texture matching": "texture-matching-everywhere", "truth": "truth"}
    rows, titles = [], []
    for site, group in df.groupby("site"):
        rec = group.iloc[0]
        cells = [policy.to_model(read_image(rec["path"] if m is None else
                                            folders[m] / rec["relpath"]))[0]
                 for m in columns.values()]
        rows.append(cells)
        titles.append(site)
    fig = image_grid(rows, list(columns), titles)
    fig.savefig(path, dpi=110)


def _trained(config_path: str, manifest: Path, ref: str, run_dir: Path, out: Path,
             timings: dict) -> dict[str, Path]:
    """The histogram-residual translator trained (once) with `config_path`, and its
    step-0 form (fingerprint removal + histogram matching)."""
    if not (run_dir / "model").exists():
        config = load_config(config_path, {"data.manifest": str(manifest),
                                           "data.reference_site": ref,
                                           "train.out": str(run_dir), "train.progress": False})
        started = time.perf_counter()
        train_cyclegan(config)
        timings["train_s"] = time.perf_counter() - started
    start_dir = out / "models" / "at-step-0"
    load_translator(run_dir / "model").at_start().save(start_dir)
    return {"at-step-0": start_dir, "histogram-residual": run_dir / "model"}


def _row(method: str, shift: dict, fidelity: pd.DataFrame, audit: dict,
         report_s: float) -> dict:
    """One method's line: site AUC (raw features and after ComBat), shifted share, mean
    texture effect size, fidelity to the truth and the finding audit (both empty for the
    truth itself)."""
    row = {"method": method}
    for when in ("before", "after"):
        s = shift[when]
        row[f"site_auc_{when}"] = s["site_auc"]
        row[f"combat_site_auc_{when}"] = s["combat_baseline"]["site_auc"]
        row[f"shifted_features_{when}"] = s["shifted_feature_share"]
        row[f"texture_effect_size_{when}"] = float(np.mean(
            [s["shift_by_family"][f]["mean_epsilon_sq"] for f in TEXTURE_FAMILIES]))
        row[f"firstorder_effect_size_{when}"] = s["shift_by_family"]["firstorder"][
            "mean_epsilon_sq"]
    for metric in ("ssim", "psnr"):
        stats = mean_ci(fidelity[metric]) if len(fidelity) else {"mean": np.nan,
                                                                  "ci95": [np.nan, np.nan]}
        row[metric] = stats["mean"]
        row[f"{metric}_lo"], row[f"{metric}_hi"] = stats["ci95"]
    for key in ("findings_erased", "findings_exaggerated", "finding_contrast_vs_truth"):
        row[key] = audit.get(key, np.nan)
    row["report_s"] = report_s
    return row


if __name__ == "__main__":
    raise SystemExit(main())
