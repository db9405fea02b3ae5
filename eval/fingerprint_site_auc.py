"""Do harmonized images still tell which hospital they came from?

On the demo's synthetic 4-site benchmark (`harmonize demo`: 4 sites x 80 images at 128 px,
seed 0, the same prevalences), harmonize every image with histogram matching, fingerprint
removal alone, fingerprint removal + histogram matching (the histogram-residual translator
at step 0) and the trained histogram-residual translator (configs/histogram_residual/
quick.yaml, fingerprints removed), then run `harmonize shift-report --compare` on each:
the radiomics site AUC (one-vs-rest, cross-validated; 0.5 = the sites cannot be told
apart) before and after.

    python eval/fingerprint_site_auc.py --out eval_out/site_auc

Writes OUT/site_auc.csv and OUT/site_auc.json (one row per method) and each report under
OUT/reports/METHOD/report.html.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eval/cyclegan_fidelity.py

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from harmonize.apply import apply_translator
from harmonize.data.manifest import load_manifest
from harmonize.fit import fit_and_save
from harmonize.radiomics.shift_report import run_shift_report
from harmonize.synth import generate
from harmonize.translators import HistogramMatching, load_translator
from harmonize.translators.cyclegan import load_config, train_cyclegan

ROOT = Path(__file__).resolve().parents[1]
PREVALENCE = [0.5, 0.8, 0.2, 0.5]  # the demo's site-label shortcut


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval_out/site_auc")
    p.add_argument("--config", default=str(ROOT / "configs/histogram_residual/quick.yaml"))
    p.add_argument("--per-site", type=int, default=80)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
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
    hm_dir = out / "models" / "histogram-matching"
    if not hm_dir.exists():
        fit_and_save(HistogramMatching(), load_manifest(manifest), manifest, ref, hm_dir,
                     progress=False)
    models["histogram-matching"] = hm_dir
    run_dir = out / "histogram_residual_run"
    if not (run_dir / "model").exists():
        config = load_config(args.config, {"data.manifest": str(manifest),
                                           "data.reference_site": ref,
                                           "train.out": str(run_dir), "train.progress": False})
        started = time.perf_counter()
        train_cyclegan(config)
        timings["train_s"] = time.perf_counter() - started
    trained = load_translator(run_dir / "model")
    start_dir = out / "models" / "at-step-0"
    trained.at_start().save(start_dir)
    models["at-step-0"] = start_dir
    models["histogram-residual"] = run_dir / "model"

    rows = []
    for method, model in models.items():
        harmonized = out / "harmonized" / method
        if not (harmonized / "apply_log.csv").exists():
            apply_translator(load_translator(model), manifest, harmonized, progress=False)
        started = time.perf_counter()
        s = run_shift_report(manifest, out / "reports" / method, compare_with=harmonized,
                             reference_site=ref, progress=False, label=method)
        rows.append({"method": method, "site_auc_before": s["before"]["site_auc"],
                     "site_auc_after": s["after"]["site_auc"],
                     "shifted_features_before": s["before"]["shifted_feature_share"],
                     "shifted_features_after": s["after"]["shifted_feature_share"],
                     "report_s": time.perf_counter() - started})
        print(f"{method:20s} site AUC {rows[-1]['site_auc_before']:.3f} -> "
              f"{rows[-1]['site_auc_after']:.3f}", flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "site_auc.csv", index=False, float_format="%.4f")
    (out / "site_auc.json").write_text(json.dumps(
        {"rows": rows, "timings": timings, "per_site": args.per_site, "size": args.size,
         "seed": args.seed, "config": str(args.config)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
