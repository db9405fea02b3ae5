"""The site-shift report: report.html for people, features.csv / feature_tests.csv /
summary.json / errors.csv for machines, all in one folder."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import atomic_write, read_image
from harmonize.radiomics.analysis import ShiftAnalysis
from harmonize.report.html import HtmlReport, image_grid, subplots


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def _write_json(obj: dict, path: Path) -> None:
    text = json.dumps(obj, indent=2, default=float) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _fmt_ci(v: float, lo: float, hi: float) -> str:
    return f"{v:.3g} [{lo:.3g}, {hi:.3g}]"


def headline_table(res: ShiftAnalysis) -> pd.DataFrame:
    s = res.summary()
    c = res.combat
    n_sites = len(res.sites)
    return pd.DataFrame([
        {"measure": "site AUC (one-vs-rest, cross-validated)", "value": s["site_auc"],
         "chance": 0.5, "after ComBat on features": c["site_auc"]},
        {"measure": "site balanced accuracy", "value": s["site_balanced_accuracy"],
         "chance": 1 / n_sites, "after ComBat on features": c["site_balanced_accuracy"]},
        {"measure": "share of features shifted (Kruskal-Wallis, BH q < 0.05)",
         "value": s["shifted_feature_share"], "chance": 0.0,
         "after ComBat on features": c["shifted_feature_share"]},
    ])


def site_table(features: pd.DataFrame, res: ShiftAnalysis) -> pd.DataFrame:
    rows = []
    dist = res.distances.set_index("site") if len(res.distances) else None
    for site in res.sites:
        g = features[features["site"] == site]
        row = {"site": site, "images": len(g)}
        if "label" in g and g["label"].astype(str).str.len().gt(0).all():
            for label, n in g["label"].value_counts().sort_index().items():
                row[f"label {label}"] = int(n)
        if site == res.reference_site:
            row["FRD to reference [95% CI]"] = "(reference)"
            row["MMD² to reference [95% CI]"] = "(reference)"
        elif dist is not None and site in dist.index:
            d = dist.loc[site]
            row["FRD to reference [95% CI]"] = _fmt_ci(d["frd"], d["frd_lo"], d["frd_hi"])
            row["MMD² to reference [95% CI]"] = _fmt_ci(d["mmd2"], d["mmd2_lo"], d["mmd2_hi"])
        rows.append(row)
    return pd.DataFrame(rows).fillna(0)


def boxplots(features: pd.DataFrame, res: ShiftAnalysis, harmonized: pd.DataFrame | None = None,
             top: int = 6):
    """Per-site box plots of the most shifted features; with `harmonized`, each site's
    original (grey) and harmonized (blue) box side by side."""
    names = list(res.tests["feature"].head(top))
    cols = min(3, len(names))
    n_rows = -(-len(names) // cols)
    fig, axes = subplots(n_rows, cols, figsize=(3.4 * cols, 3.0 * n_rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    sets = [(features, "#bbbbbb")] + ([(harmonized, "#7aa6e0")] if harmonized is not None
                                      else [])
    width = 0.8 / len(sets)
    x = np.arange(len(res.sites))
    for ax, name in zip(axes.ravel(), names, strict=False):
        for k, (df, colour) in enumerate(sets):
            data = [df.loc[df["site"] == s, name].to_numpy(float) for s in res.sites]
            ax.boxplot(data, positions=x + (k - (len(sets) - 1) / 2) * width, widths=width * 0.9,
                       showfliers=False, patch_artist=True,
                       boxprops={"facecolor": colour}, medianprops={"color": "black"})
        ax.set_xticks(x, res.sites)
        eps = float(res.tests.set_index("feature").loc[name, "epsilon_sq"])
        ax.set_title(f"{name.removeprefix('original_')}\nε²={eps:.2f}", fontsize=8)
        ax.set_ylabel("feature value", fontsize=7)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def shift_answer(before: ShiftAnalysis, after: ShiftAnalysis | None, label: str | None) -> str:
    """The report's answer in a sentence: how predictable the site is from radiomics."""
    b = before.summary()
    text = (f"The site can be predicted from the radiomics features with AUC "
            f"{b['site_auc']:.2f} (chance 0.5); {b['shifted_feature_share']:.0%} of the "
            "features differ between sites")
    if after is None:
        return text + "."
    a = after.summary()
    what = label or "harmonized"
    return (f"{text} in the original images; {what}: AUC {a['site_auc']:.2f} and "
            f"{a['shifted_feature_share']:.0%} (point estimates; the tables below have the "
            "distances with CIs).")


def embedding(sets: list[tuple[str, pd.DataFrame]], cols: list[str], sites: list[str]):
    """PCA of standardized features, fitted on the first set so panels share axes."""
    fig, axes = subplots(1, len(sets), figsize=(4.5 * len(sets), 4), squeeze=False,
                             sharex=True, sharey=True)
    first = np.nan_to_num(sets[0][1][cols].to_numpy(float))
    scaler = StandardScaler().fit(first)
    pca = PCA(n_components=2, random_state=0).fit(scaler.transform(first))
    colours = matplotlib.colormaps["tab10"]
    for ax, (title, df) in zip(axes[0], sets, strict=True):
        xy = pca.transform(scaler.transform(np.nan_to_num(df[cols].to_numpy(float))))
        for i, site in enumerate(sites):
            m = (df["site"] == site).to_numpy()
            ax.scatter(xy[m, 0], xy[m, 1], s=10, alpha=0.7, color=colours(i % 10), label=site)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, fontsize=7, markerscale=1.5, loc="upper center",
               ncol=min(6, len(labels)), bbox_to_anchor=(0.5, 0.0), frameon=False)
    return fig


def thumbnails(features: pd.DataFrame, sites: list[str], per_site: int = 6,
               path_col: str = "path"):
    policy = IntensityPolicy()
    rows, titles = [], []
    for site in sites:
        paths = features.loc[features["site"] == site, path_col].head(per_site)
        images = [np.clip(policy.to_model(read_image(p))[0], 0, 1) for p in paths]
        images += [np.zeros((8, 8), np.float32)] * (per_site - len(images))
        rows.append(images)
        titles.append(site)
    return image_grid(rows, [""] * per_site, titles, cell_inches=1.6)


def write_shift_report(out: Path, features: pd.DataFrame, errors: pd.DataFrame,
                       res: ShiftAnalysis, settings: dict,
                       after: tuple[pd.DataFrame, ShiftAnalysis, pd.DataFrame] | None = None
                       ) -> Path:
    """Write every output; `after` = (features, analysis, change table) of a harmonized copy."""
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(features, out / "features.csv")
    _write_csv(res.tests, out / "feature_tests.csv")
    _write_csv(errors, out / "errors.csv")
    summary = {**res.summary(), "settings": settings, "n_errors": len(errors)}
    if after is not None:
        a_features, a_res, change = after
        _write_csv(a_features, out / "features_harmonized.csv")
        summary = {"before": summary, "after": {**a_res.summary(), "settings": settings},
                   "change": change.to_dict("records")}
    _write_json(summary, out / "summary.json")

    label = settings.get("label")
    if after is not None:
        subject = f"original images vs {label or 'harmonized images'}"
    else:
        subject = label or f"{res.n_images} images"
    report = HtmlReport(f"Site-shift report (radiomics): {subject}")
    if settings.get("back"):
        report.back_link(*settings["back"])
    report.answer(shift_answer(res, after[1] if after is not None else None, label))
    for note in settings.get("notes", []):
        report.paragraph(f"Note: {note}.")
    report.paragraph(
        f"{res.n_images} images from {len(res.sites)} sites, {len(res.feature_cols)} "
        f"radiomics features (pyradiomics {settings.get('pyradiomics_version', '')}; classes "
        f"{', '.join(settings.get('feature_classes', []))}), fixed bin width "
        f"{settings.get('bin_width', 0):.4g} in model-space intensity (0..1 = stored range), "
        f"ROI: {settings.get('roi', '')}. Reference site for distances: "
        f"{res.reference_site}.")
    if after is not None:
        report.heading("Before / after harmonization (same images)")
        report.table(change)
    report.heading("How well can the site be predicted from the features?")
    report.table(headline_table(res))
    report.paragraph("Cross-validated, patient-grouped L2 logistic regression on standardized "
                     "features. Lower = less site signal. The ComBat column is a baseline: "
                     "statistical harmonization of the features alone.", css="note")
    report.heading("Sites")
    report.table(site_table(features, res))
    report.paragraph("FRD: Frechet radiomics distance on features z-scored by the reference "
                     "site; MMD²: Gaussian-kernel maximum mean discrepancy; 95% bootstrap CIs.",
                     css="note")
    report.heading("Which feature families carry the shift")
    report.table(res.families)
    report.heading("Most shifted features")
    report.figure(boxplots(features, res, after[0] if after is not None else None),
                  "Per-site distributions of the features with the largest Kruskal-Wallis "
                  "effect size (epsilon squared) among the original images"
                  + ("; grey: original, blue: harmonized." if after is not None else "."))
    report.table(res.tests.head(15)[["feature", "family", "epsilon_sq", "H", "q"]])
    report.heading("Embedding")
    sets = [("original", features[features["site"].isin(res.sites)])]
    if after is not None:
        sets.append(("harmonized", after[0][after[0]["site"].isin(res.sites)]))
    report.figure(embedding(sets, res.feature_cols, res.sites),
                  "PCA of standardized features, coloured by site (harmonized points use the "
                  "original's axes).")
    report.heading("Images per site")
    report.figure(thumbnails(features, res.sites), "First images of each site (model space).")
    if after is not None:
        report.figure(thumbnails(after[0], res.sites), "The same images, harmonized.")
    if len(errors) or res.notes:
        report.heading("Problems")
        for note in res.notes:
            report.paragraph(note)
        if len(errors):
            report.table(errors)
    return report.save(out / "report.html")
