"""The pipeline on the embedded default, end to end: synthesize a multi-site benchmark,
fit a harmonizer on the reference site, harmonize held-out images of every site, and
measure each against its paired reference rendering (the ground truth the synthetic
benchmark provides). Ends with report.html, metrics.csv and summary.json."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from harmonize.apply import apply_translator
from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import atomic_write, read_image
from harmonize.data.manifest import load_manifest, save_manifest
from harmonize.data.splits import patient_split
from harmonize.fit import fit_and_save
from harmonize.metrics import bootstrap_mean_ci, psnr, ssim
from harmonize.radiomics.shift_report import run_shift_report
from harmonize.report.html import HtmlReport, image_grid
from harmonize.translators import HistogramMatching, load_translator


def run_demo(out: str | os.PathLike, sites: int = 4, per_site: int = 40, size: int = 256,
             modality: str = "xray", seed: int = 0, progress: bool = True) -> dict:
    from harmonize.synth import generate

    out = Path(out)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    synth_dir = out / "synth"
    info = generate(synth_dir, sites=sites, per_site=per_site, size=size, modality=modality,
                    seed=seed, progress=progress)
    timings["synth_s"] = time.perf_counter() - t
    reference = info["reference_site"]

    manifest = synth_dir / "manifest.csv"
    df = patient_split(load_manifest(manifest), test_size=0.5, seed=seed)
    train_manifest, test_manifest = out / "train.csv", out / "test.csv"
    save_manifest(df[df["split"] == "train"], train_manifest)
    save_manifest(df[df["split"] == "test"], test_manifest)

    t = time.perf_counter()
    model_dir = out / "models" / "histogram-matching"
    fit_and_save(HistogramMatching(), load_manifest(train_manifest), train_manifest, reference,
                 model_dir, progress=progress)
    timings["fit_s"] = time.perf_counter() - t

    t = time.perf_counter()
    harmonized = out / "harmonized"
    summary = apply_translator(load_translator(model_dir), test_manifest, harmonized,
                               progress=progress)
    timings["apply_s"] = time.perf_counter() - t

    t = time.perf_counter()
    shift = run_shift_report(test_manifest, out / "shift_report", compare_with=harmonized,
                             reference_site=reference, progress=progress)
    timings["shift_report_s"] = time.perf_counter() - t

    test = load_manifest(test_manifest)
    # reference-site images are their own ground truth: nothing to measure there
    test = test[test["site"] != reference]
    metrics = paired_fidelity(test, synth_dir, harmonized, progress=progress)
    metrics.to_csv(out / "metrics.csv", index=False)
    result = {
        "reference_site": reference,
        "sites": info["sites"],
        "n_test_images": int(summary.ok),
        "n_scored_images": len(test),
        "apply": {"ok": summary.ok, "errors": summary.errors},
        "fidelity": fidelity_summary(metrics),
        "site_shift": {r["measure"]: {"before": r["before"], "after": r["after"]}
                       for r in shift["change"]},
        "timings": timings,
    }
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(text))
    write_demo_report(out / "report.html", metrics, result)
    return result


def paired_fidelity(test: pd.DataFrame, synth_dir: Path, harmonized: Path,
                    progress: bool = True) -> pd.DataFrame:
    """SSIM/PSNR of each image against its reference rendering, before and after."""
    policy = IntensityPolicy()
    rows = []
    for rec in tqdm(test.to_dict("records"), desc="fidelity", unit="img",
                    disable=not progress):
        truth_path = synth_dir / rec["reference_path"]
        truth, _ = policy.to_model(read_image(truth_path))
        for method, path in (("identity", rec["path"]), ("histogram-matching",
                                                         harmonized / rec["relpath"])):
            x, _ = policy.to_model(read_image(path))
            rows.append({"relpath": rec["relpath"], "site": rec["site"], "label": rec["label"],
                         "method": method, "ssim": ssim(x, truth), "psnr": psnr(x, truth),
                         "image_path": str(path), "truth_path": str(truth_path)})
    return pd.DataFrame(rows)


def fidelity_summary(metrics: pd.DataFrame) -> dict:
    """Per method and site: mean SSIM/PSNR with 95% bootstrap CIs."""
    out: dict = {}
    for (method, site), g in metrics.groupby(["method", "site"]):
        entry = {"n": len(g)}
        for metric in ("ssim", "psnr"):
            mean, lo, hi = bootstrap_mean_ci(g[metric].to_numpy())
            entry[metric] = {"mean": mean, "ci95": [lo, hi]}
        out.setdefault(method, {})[site] = entry
    return out


def write_demo_report(path: Path, metrics: pd.DataFrame, result: dict,
                      per_site: int = 3) -> Path:
    report = HtmlReport("harmonize demo: synthetic multi-site benchmark")
    ref = result["reference_site"]
    report.paragraph(
        f"{len(result['sites'])} sites, reference site '{ref}'. Histogram matching was fitted "
        f"on the reference site's training images and applied to {result['n_test_images']} "
        "held-out images of every site. Fidelity of the other sites' images is measured "
        "against the paired rendering of the same phantom by the reference site (known "
        "ground truth; reference-site images are their own truth and are left out); higher "
        "is better.")
    table = []
    for method, per in result["fidelity"].items():
        for site, e in per.items():
            table.append({"method": method, "site": site, "n": e["n"],
                          "SSIM": e["ssim"]["mean"],
                          "SSIM 95% CI": "[{:.3f}, {:.3f}]".format(*e["ssim"]["ci95"]),
                          "PSNR dB": e["psnr"]["mean"],
                          "PSNR 95% CI": "[{:.1f}, {:.1f}]".format(*e["psnr"]["ci95"])})
    report.heading("Fidelity to the reference rendering")
    report.table(pd.DataFrame(table).sort_values(["site", "method"]))
    report.heading("Radiomics site shift, before and after")
    shift = pd.DataFrame([{"measure": k, **v} for k, v in result["site_shift"].items()])
    report.table(shift)
    report.link("shift_report/report.html", "the full site-shift report")
    report.heading("Before / after, per site")
    policy = IntensityPolicy()
    def load(path: str) -> np.ndarray:
        return policy.to_model(read_image(path))[0]

    by_method = metrics.set_index(["method", "relpath"])
    for site, g in metrics[metrics["method"] == "identity"].groupby("site"):
        rows, titles = [], []
        for rec in g.head(per_site).to_dict("records"):
            after = load(by_method.loc[("histogram-matching", rec["relpath"]), "image_path"])
            truth = load(rec["truth_path"])
            rows.append([load(rec["image_path"]), after, truth, np.abs(after - truth)])
            titles.append(Path(rec["relpath"]).stem)
        fig = image_grid(rows, ["before", "harmonized", f"truth ({ref})", "|harmonized - truth|"],
                         titles)
        report.heading(f"site {site}", level=3)
        report.figure(fig, f"site {site}: first {len(rows)} held-out images")
    t = result["timings"]
    report.paragraph(f"Timings: synth {t['synth_s']:.1f} s, fit {t['fit_s']:.1f} s, "
                     f"apply {t['apply_s']:.1f} s, site-shift report "
                     f"{t['shift_report_s']:.1f} s.", css="note")
    return report.save(path)
