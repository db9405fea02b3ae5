"""Outputs of `harmonize evaluate`: results.csv and predictions.csv for machines,
results.md for a README or a paper draft, report.html (self-contained) for people."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from harmonize.classify.metrics import mean_over_seeds, roc_points
from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import atomic_write, read_image
from harmonize.data.transforms import ACQUISITION_DOC, AUGMENTATION_DOC
from harmonize.evaluation.regimes import regime
from harmonize.report.html import HtmlReport, image_grid, subplots

GROUP = ["protocol", "test_site", "classifier", "regime", "translator", "reference"]
SETTING_KEYS = ["classifier", "protocol", "test_site"]
# the audit's columns a reader must not miss, shown first
AUDIT_FIRST = ["translator", "findings_erased", "findings_exaggerated", "risk_rate"]


def summary_table(results: pd.DataFrame, predictions: pd.DataFrame | None = None,
                  n_boot: int = 1000) -> pd.DataFrame:
    """Per cell averaged over seeds: AUC (t-CI over seeds, or the bootstrap CI when there
    is one seed); the gain over the stronger augmentation (`baseline`) with a paired
    bootstrap CI of the seed-averaged gain (with predictions); seeds with a significant
    gain; for external sites the in-site AUC (the baseline model on held-out patients of
    its training sites) and the share of the in-site/external gap the cell closes beyond
    the baseline."""
    results = results.copy()
    results["reference"] = results["reference"].fillna("")
    results["translator"] = results["translator"].fillna("")
    auc = mean_over_seeds(results, GROUP, "auc")
    out = auc[GROUP].copy()
    out["seeds"] = auc["count"]
    out["auc"] = auc["mean"]
    one = results.groupby(GROUP, dropna=False)[["auc_lo", "auc_hi"]].mean().reset_index()
    merged = auc.merge(one, on=GROUP, how="left")
    out["auc_lo"] = np.where(auc["count"] > 1, auc["ci_lo"], merged["auc_lo"])
    out["auc_hi"] = np.where(auc["count"] > 1, auc["ci_hi"], merged["auc_hi"])
    first = results.groupby(GROUP, dropna=False)[["baseline", "train_sites"]].first()
    out = out.merge(first.reset_index(), on=GROUP, how="left")
    out["gain"] = mean_over_seeds(results, GROUP, "gain_auc")["mean"].to_numpy()
    # one pass over the predictions: (regime, translator, reference, classifier,
    # protocol, test site) -> that cell's predictions of every seed
    cells = {} if predictions is None else dict(list(predictions.fillna(
        {"reference": "", "translator": ""}).groupby(
            ["regime", "translator", "reference", *SETTING_KEYS])))
    pooled = [_pooled_gain(cells, r, n_boot) for _, r in out.iterrows()]
    out["gain_lo"], out["gain_hi"], out["gain_p"] = (np.array([g[i] for g in pooled])
                                                     for i in range(3))
    sig = results.assign(sig=(results["gain_p"] < 0.05) & (results["gain_auc"] > 0),
                         worse=(results["gain_p"] < 0.05) & (results["gain_auc"] < 0))
    counts = sig.groupby(GROUP, dropna=False)[["sig", "worse"]].sum().reset_index()
    out = out.merge(counts, on=GROUP, how="left").rename(
        columns={"sig": "seeds_better_p05", "worse": "seeds_worse_p05"})
    out = _gap_closed(out)
    out["_o"] = out["regime"].map(lambda name: regime(name).order)
    return out.sort_values(["protocol", "test_site", "classifier", "reference", "_o",
                            "translator"]).drop(columns=["_o", "train_sites"]).reset_index(
                                drop=True)


def _pooled_gain(cells: dict, r, n_boot: int) -> tuple:
    """(lo, hi, p) of the seed-averaged gain of one summary row over its baseline."""
    from harmonize.classify.metrics import paired_bootstrap_mean_auc_difference

    if r["regime"] == r["baseline"]:
        return (np.nan,) * 3
    setting = tuple(r[c] for c in SETTING_KEYS)
    a = cells.get((r["regime"], r["translator"], r["reference"], *setting))
    b = cells.get((r["baseline"], "", "", *setting))
    if a is None or b is None:
        return (np.nan,) * 3
    seeds = sorted(set(a["seed"]) & set(b["seed"]))
    if not seeds:
        return (np.nan,) * 3
    side_a = [a[a["seed"] == s].sort_values("row") for s in seeds]
    side_b = [b[b["seed"] == s].sort_values("row") for s in seeds]
    y = side_a[0]["label"].to_numpy()
    if len(np.unique(y)) < 2:
        return (np.nan,) * 3
    d = paired_bootstrap_mean_auc_difference(y, [g["p"].to_numpy() for g in side_a],
                                             [g["p"].to_numpy() for g in side_b],
                                             n_boot=n_boot)
    return d["diff_lo"], d["diff_hi"], d["p_value"]


def _gap_closed(table: pd.DataFrame) -> pd.DataFrame:
    """in_site_auc and gap_closed for external rows: (AUC - baseline's external AUC) /
    (baseline's in-site AUC - baseline's external AUC)."""
    table = table.copy()
    table["in_site_auc"] = np.nan
    table["gap_closed"] = np.nan
    internal = table[table["protocol"] == "internal"].set_index(
        ["classifier", "test_site", "regime", "translator", "reference"])["auc"]
    for i, r in table[table["protocol"] == "external"].iterrows():
        key = (r["classifier"], r["train_sites"], r["baseline"], "", "")
        base = table[(table["protocol"] == r["protocol"]) & (table["test_site"] == r["test_site"])
                     & (table["classifier"] == r["classifier"])
                     & (table["regime"] == r["baseline"]) & (table["translator"] == "")]
        if key not in internal.index or base.empty:
            continue
        in_site, ext = float(internal[key]), float(base["auc"].iloc[0])
        table.loc[i, "in_site_auc"] = in_site
        if in_site - ext > 0.01:  # no gap, no share of it
            table.loc[i, "gap_closed"] = (r["auc"] - ext) / (in_site - ext)
    return table


def answer_sentence(table: pd.DataFrame) -> str:
    """The evaluation's answer in words: per external test site and classifier, the best
    harmonized regime against the stronger augmentation, and whether the gain is
    significant."""
    parts = []
    ext = table[table["protocol"] == "external"] if "protocol" in table else table.iloc[:0]
    for (site, clf), g in ext.groupby(["test_site", "classifier"], sort=False):
        aug = g[g["regime"] == g["baseline"]]
        harm = g[g["regime"].map(lambda name: regime(name).harmonized)]
        if aug.empty or harm.empty:
            continue
        best = harm.loc[harm["auc"].idxmax()]
        a, base = float(aug["auc"].iloc[0]), regime(aug["regime"].iloc[0]).description
        gain = float(best["auc"]) - a
        better, seeds = int(best.get("seeds_better_p05", 0) or 0), int(best["seeds"])
        name = _label(best)
        closed = best.get("gap_closed", np.nan)
        share = (f"; it closes {closed:.0%} of the in-site/external gap beyond it"
                 if pd.notna(closed) else "")
        ci = (f" (paired 95% CI [{best['gain_lo']:+.2f}, {best['gain_hi']:+.2f}])"
              if pd.notna(best.get("gain_lo", np.nan)) else "")
        if gain > 0 and better > 0:
            verdict = (f"beats {base} ({a:.2f}) by {gain:+.2f}{ci}, significant in "
                       f"{better} of {seeds} seed(s){share}")
        elif gain > 0:
            verdict = (f"is above {base} ({a:.2f}) by {gain:+.2f}{ci}, but in no seed "
                       f"significantly: not a demonstrated gain{share}")
        else:
            verdict = f"does not beat {base} ({a:.2f}; {gain:+.2f})"
        picked = (f"the best of {len(harm)} harmonized regimes by mean AUC (picking the "
                  "best flatters it)" if len(harm) > 1 else "the harmonized regime")
        parts.append(f"Unseen site {site}, {clf}: {picked}, {name}, has "
                     f"AUC {float(best['auc']):.2f} [{float(best['auc_lo']):.2f}, "
                     f"{float(best['auc_hi']):.2f}] and {verdict}.")
    return " ".join(parts) or "No external-site comparison of harmonized and augmented " \
        "training in this run."


def _label(r) -> str:
    if not r["translator"]:
        return r["regime"]
    when = {"train": ", test-time", "fixed": ""}.get(r.get("reference", ""), "")
    return f"{r['regime']} ({r['translator']}{when})"


def auc_figure(table: pd.DataFrame):
    panels = list(table.groupby(["protocol", "test_site", "classifier"], sort=False))
    # panels differ in rows (test-time rows exist for the external site only), so each
    # has its own y axis; the height follows the longest
    rows = max(len(g) for _, g in panels)
    fig, axes = subplots(1, len(panels), figsize=(5.6 * len(panels), 1.2 + 0.28 * rows),
                             squeeze=False)
    for ax, ((protocol, site, clf), g) in zip(axes[0], panels, strict=True):
        labels = [_label(r) for _, r in g.iterrows()]
        y = np.arange(len(g))
        ax.errorbar(g["auc"], y, xerr=[g["auc"] - g["auc_lo"], g["auc_hi"] - g["auc"]],
                    fmt="o", capsize=3)
        aug = g.loc[g["regime"] == g["baseline"], "auc"]
        if len(aug):
            ax.axvline(float(aug.iloc[0]), color="grey", ls="--", lw=1)
        ax.axvline(0.5, color="red", ls=":", lw=1)
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_title(f"{protocol}: {site}\n{clf}", fontsize=9)
        ax.set_xlabel("AUC (mean over seeds, 95% CI)")
        ax.invert_yaxis()
    fig.tight_layout()
    return fig


def roc_figure(predictions: pd.DataFrame, seed: int, classifier: str):
    p = predictions[(predictions["seed"] == seed) & (predictions["classifier"] == classifier)]
    panels = list(p.groupby(["protocol", "test_site"], sort=False))
    fig, axes = subplots(1, len(panels), figsize=(3.8 * len(panels), 3.6), squeeze=False)
    for ax, ((protocol, site), g) in zip(axes[0], panels, strict=True):
        for (name, translator, reference), h in g.fillna({"reference": ""}).groupby(
                ["regime", "translator", "reference"], sort=False):
            if h["label"].nunique() < 2:
                continue
            fpr, tpr = roc_points(h["label"].to_numpy(), h["p"].to_numpy())
            ax.plot(fpr, tpr, lw=1.2, label=_label({"regime": name, "translator": translator,
                                                    "reference": reference}))
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        ax.set_title(f"{protocol}: {site}", fontsize=9)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
    # one legend below the panels, so that it covers no curve
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, fontsize=7, loc="upper center", ncol=min(3, len(labels)),
               bbox_to_anchor=(0.5, 0.0), frameon=False)
    return fig


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        cells = [f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def shift_table(shifts: dict) -> pd.DataFrame:
    return pd.DataFrame([{"translator": name, "measure": m, **v}
                         for name, s in shifts.items() for m, v in s.items()])


def write_outputs(out: Path, config, data, sets, results: pd.DataFrame,
                  predictions: pd.DataFrame, audit: dict, timings: dict,
                  shifts: dict | None = None) -> Path:
    atomic_write(out / "results.csv", lambda tmp: results.to_csv(tmp, index=False))
    atomic_write(out / "predictions.csv", lambda tmp: predictions.to_csv(tmp, index=False))
    table = summary_table(results, predictions, config.bootstrap)
    table.to_csv(out / "summary_table.csv", index=False)
    audit_table = audit["summary"]
    md = ["# Downstream evaluation\n",
          f"Data: {data.manifest} ({len(data.df)} images, sites "
          f"{', '.join(sorted(data.df['site'].unique()))}, reference {data.reference_site}); "
          f"seeds {config.seeds}; {config.train.epochs} epochs per model.\n",
          "## AUC per regime (mean over seeds, 95% CI) and gain over the stronger "
          "augmentation\n",
          markdown_table(table),
          "\n## Hallucination audit\n", markdown_table(audit_table)]
    if shifts:
        md += ["\n## Radiomics site shift before / after each translator\n",
               markdown_table(shift_table(shifts))]
    text = "\n".join(md)
    atomic_write(out / "results.md", lambda tmp: tmp.write_text(text))
    write_report(out / "report.html", config, data, sets, table, predictions, audit, timings,
                 shifts or {})
    return out


def _setup_text(config, data, sets) -> str:
    prev = data.df.assign(y=data.labels).groupby("site")["y"].mean()
    prevalence = ", ".join(f"{s} {v:.0%}" for s, v in prev.items())
    protocols = "; ".join(
        f"external: train {'+'.join(p.train_sites)}, test {p.test_site}" if p.kind == "external"
        else "leave-one-site-out" for p in config.protocols)
    tc = config.train
    return (
        f"{len(data.df)} images from {data.df['site'].nunique()} sites (positives per site: "
        f"{prevalence}); positive class '{data.positive}'; reference site "
        f"'{data.reference_site}'. Protocols: {protocols}. The external protocol's model is "
        f"also scored on held-out patients ({config.data.internal_test_size:.0%}, fixed split) "
        "of its training sites ('internal'). Classifiers "
        f"{', '.join(c.arch for c in config.classifiers)} at {config.data.image_size} px, "
        f"trained from scratch for {tc.epochs} epochs (batch {tc.batch_size}, AdamW lr "
        f"{tc.lr:g}, one-cycle schedule, class imbalance: {tc.balance}); seeds "
        f"{config.seeds}. Plain augmentation: {AUGMENTATION_DOC}. Acquisition-style "
        f"augmentation: {ACQUISITION_DOC}. Reference: fixed = every image translated to "
        f"'{data.reference_site}', the classifier trained and tested on harmonized images; "
        "test-time (reference: train) = the raw-image classifier, untouched, tested on the "
        "unseen site's images translated to its training site. Translators "
        f"({', '.join(sets) or 'none'}) never see labels but are fitted on unlabelled images "
        "of every site, the test site included (as unsupervised domain adaptation does). "
        "CIs: percentile bootstrap over test images (stratified by class) for one seed; "
        "t-interval over seeds when there are several. Gain: AUC minus that of the stronger "
        "augmentation (baseline: higher mean AUC of plain and acquisition-style in that "
        "setting) of the same classifier, fold and seed on the same images; gain_lo/hi: "
        "paired bootstrap of the seed-averaged gain over test images. gap_closed: the gain "
        "as a share of the baseline's in-site minus external AUC.")


def write_report(path: Path, config, data, sets, table, predictions, audit, timings,
                 shifts: dict) -> Path:
    report = HtmlReport("harmonize evaluate: does harmonization beat augmentation?")
    report.answer(answer_sentence(table))
    report.paragraph(_setup_text(config, data, sets))
    report.link("results.csv", "results.csv (one row per model)")
    report.link("predictions.csv", "predictions.csv (one row per test image and model)")
    report.link("audit/per_image.csv", "audit/per_image.csv")
    report.heading("AUC per regime")
    report.figure(auc_figure(table), "dashed: the stronger augmentation; dotted: chance")
    report.table(table)
    shortcut = table[(table["regime"] == "raw")]
    if {"external", "internal"} <= set(shortcut["protocol"]):
        report.heading("In-site vs external site (raw images)", level=3)
        report.paragraph("The same raw-trained models scored on held-out patients of their "
                         "training sites and on the unseen site: the gap is what the site "
                         "shift (and any site-label shortcut) costs.")
        report.table(shortcut)
    report.heading("ROC curves")
    report.figure(roc_figure(predictions, config.seeds[0], config.classifiers[0].arch),
                  f"seed {config.seeds[0]}, {config.classifiers[0].arch}")
    report.heading("Hallucination audit")
    report.paragraph(
        f"Frozen classifier: {audit['frozen']}. flip_rate_before_after: share of test images "
        "whose thresholded prediction changes with translation; flip_rate_vs_truth: share "
        "whose prediction differs from that on the paired truth rendering (synthetic data); "
        "erased/invented_by_classifier: truth positive -> translated negative (among "
        "positives) and the reverse (among normals); finding_contrast_ratio: median over "
        "positives of |finding contrast| translated / input (1 = kept; contrast in units of "
        "the body ROI's intensity sd, so pure gain/offset does not count); "
        "finding_contrast_vs_truth: translated / truth (1 = the reference rendering's "
        "contrast restored); findings_erased / exaggerated: share of positives whose ratio "
        "to the input is below / above the configured bounds; cam_outside_roi: share of the "
        "Grad-CAM map outside the body ROI (markers, borders). Per-image flags are in each "
        "translator's apply_log.csv (columns risk, risk_reason).")
    report.table(audit["summary"], first=AUDIT_FIRST)
    if shifts:
        report.heading("Radiomics site shift, before and after each translator")
        report.paragraph(
            "pyradiomics features in the ROI of every image, original vs translated: site "
            "predictability (cross-validated AUC / balanced accuracy of a site classifier, "
            "chance = 0.5), share of features that differ between sites (Kruskal-Wallis, "
            "FDR 5%) and distances of each site to the reference (FRD, MMD). Lower after = "
            "less site shift. Full reports per translator:")
        report.table(shift_table(shifts))
        for name in shifts:
            report.link(f"shift_report/{name}/report.html", f"site-shift report: {name}")
    _image_sections(report, data, sets, audit)
    report.paragraph("Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
                     css="note")
    return report.save(path)


def cam_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB: the image in grey with the Grad-CAM map (resized to it) in a heat colour map."""
    from scipy.ndimage import zoom

    if cam.shape != image.shape:
        cam = zoom(cam, (image.shape[0] / cam.shape[0], image.shape[1] / cam.shape[1]),
                   order=1)
    heat = matplotlib.colormaps["inferno"](np.clip(cam, 0, 1))[..., :3]
    return (1 - alpha) * np.clip(image, 0, 1)[..., None] + alpha * heat


def _image_sections(report: HtmlReport, data, sets, audit: dict) -> None:
    rows_idx = audit["rows"]
    sample = audit["cam_sample"]
    if not sample:
        return
    policy = IntensityPolicy()
    cams = audit["cams"]
    names = list(cams)
    report.heading("Before / after and Grad-CAM")
    grid, titles, outlines = [], [], []
    root = Path(data.manifest).parent
    for i in sample:
        row_index = rows_idx[i]
        rec = data.df.iloc[row_index]
        finding = str(rec.get("finding_mask", "") or "")
        outlines.append(read_image(root / finding).array > 0 if finding else None)
        line = []
        for name in names:
            path = rec["path"] if name == "raw" else sets[name].manifest["path"].iloc[row_index]
            line.append(np.clip(policy.to_model(read_image(path))[0], 0, 1))
        for k, name in enumerate(names):
            if cams[name] is not None:
                line.append(cam_overlay(line[k], cams[name][i]))
        grid.append(line)
        titles.append(f"{rec['site']} {Path(rec['relpath']).stem} ({rec['label']})")
    columns = (["input" if n == "raw" else n for n in names]
               + [f"Grad-CAM {'input' if n == 'raw' else n}" for n in names
                  if cams[n] is not None])
    report.figure(image_grid(grid, columns, titles, outlines=outlines,
                             colorbar="Grad-CAM weight (normalized per image)"),
                  "Each row: one test image as acquired (input) and after each translator, "
                  "then the frozen classifier's Grad-CAM on each (bright = drives the "
                  "prediction). Red outline: the finding, where the data knows it.")
