"""The study's report: one self-contained page in four sections, each opening with its
answer in a sentence (numbers with 95% CIs), then the tables and plots behind it."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.radiomics.extract import available_cpus
from harmonize.report.html import HtmlReport, image_grid, subplots
from harmonize.study.config import StudyConfig, classifier_seeds
from harmonize.study.design import Design, natural_key


def _ci(value: float, lo: float, hi: float) -> str:
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def _row(table: pd.DataFrame, name: str) -> pd.Series | None:
    found = table[table["arm"] == name]
    return None if found.empty else found.iloc[0]


def _difference(diffs: pd.DataFrame, arm: str, baseline: str) -> str:
    d = diffs[(diffs["arm"] == arm) & (diffs["baseline"] == baseline)]
    if d.empty:
        return "n/a"
    r = d.iloc[0]
    return f"{r['auc_difference']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"


def forest(table: pd.DataFrame, title: str):
    """AUC of each arm with its 95% CI, best at the top."""
    t = table.sort_values("auc")
    fig, ax = subplots(figsize=(7.5, 0.35 * len(t) + 1.2))
    y = np.arange(len(t))
    # a percentile interval can miss its point estimate by rounding (or a skewed
    # resample): drawn as a zero-length arm on that side, not an error
    ax.errorbar(t["auc"], y, xerr=[(t["auc"] - t["auc_lo"]).clip(lower=0),
                                   (t["auc_hi"] - t["auc"]).clip(lower=0)],
                fmt="o", ms=4, capsize=2)
    ax.set_yticks(y, t["label"], fontsize=7)
    ax.axvline(0.5, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("AUC on the external node (95% CI)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _part1(page: HtmlReport, out: Path, design: Design, shift: dict) -> None:
    page.heading("1. How different are the hospitals' images?")
    table = pd.read_csv(shift["hospitals"])
    top, bottom = table.iloc[0], table.iloc[-1]
    after = "after_central" if "after_central" in table else None
    moved = (f" Central histogram matching brings the mean distance from "
             f"{table['distance'].mean():.2f} to {table[after].mean():.2f}"
             f" (federated: {table['after_federated'].mean():.2f})."
             if after and "after_federated" in table else "")
    others = [c for c in table.columns if c.startswith("after_") and not c.endswith(
        ("_lo", "_hi")) and c not in ("after_central", "after_federated")]
    moved += "".join(f" After {c.removeprefix('after_')}: {table[c].mean():.2f}."
                     for c in others)
    page.answer(
        f"Of {len(table) + 1} hospitals, {top['site']} ({top['node']}) is the furthest from "
        f"the reference {shift['reference_site']}: mean standardized radiomics difference "
        f"{_ci(top['distance'], top['distance_lo'], top['distance_hi'])}; the closest is "
        f"{bottom['site']} "
        f"({_ci(bottom['distance'], bottom['distance_lo'], bottom['distance_hi'])})."
        + moved)
    page.paragraph(
        f"{shift['n_features']} radiomics features per image, {shift['n_images']} images; "
        "distance: the mean over features of |mean(hospital) - mean(reference)| in pooled "
        "standard deviations, 95% bootstrap CI over each side's images. Radiomics "
        f"extraction took {shift['extraction_seconds']:.0f} s of this part's "
        f"{shift['total_seconds']:.0f} s.", "note")
    page.figure(_ranking(table), "Hospitals ranked by distance to the reference (95% CI); "
                "crosses: after central histogram matching.")
    page.figure(_heatmap(table), "Distance per feature family (rows in ranking order).")
    groups = table.groupby("proposed_group")["site"].apply(
        lambda s: ", ".join(sorted(s, key=natural_key))).reset_index()
    groups.columns = ["proposed group", "hospitals"]
    page.heading("Hospitals that look alike: a proposal of node groups", 3)
    page.paragraph(f"Ward clustering of the hospitals' mean features into as many groups as "
                   f"there are nodes; agreement with the actual nodes: adjusted Rand index "
                   f"{shift['node_agreement_ari']:.2f} (1: the same grouping, 0: unrelated). "
                   f"The reference hospital falls in group {shift['reference_proposed_group']}.")
    page.table(groups)
    page.figure(_examples(design, table), "The reference hospital and the two most and two "
                "least shifted hospitals (three images each).")
    page.heading("The most shifted hospitals", 3)
    page.table(table.head(10).round(3))
    page.link("stages/part1_shift/hospitals.csv", "every hospital (CSV)")


def _ranking(table: pd.DataFrame):
    t = table.iloc[::-1]
    fig, ax = subplots(figsize=(6.5, max(2.5, 0.14 * len(t) + 1)))
    y = np.arange(len(t))
    ax.errorbar(t["distance"], y, xerr=[(t["distance"] - t["distance_lo"]).clip(lower=0),
                                        (t["distance_hi"] - t["distance"]).clip(lower=0)],
                fmt="o", ms=3, capsize=1.5, label="raw images")
    if "after_central" in t:
        ax.plot(t["after_central"], y, "x", ms=4, color="C1",
                label="after central histogram matching")
    ax.set_yticks(y, t["site"], fontsize=6 if len(t) > 30 else 8)
    ax.set_xlabel("distance to the reference (pooled SD)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _heatmap(table: pd.DataFrame):
    fams = [c for c in table.columns if c.startswith("family_")]
    m = table[fams].to_numpy(float)
    fig, ax = subplots(figsize=(1.0 + 0.7 * len(fams), max(2.5, 0.14 * len(table) + 1)))
    im = ax.imshow(m, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(fams)), [f.removeprefix("family_") for f in fams], rotation=45,
                  ha="right", fontsize=7)
    ax.set_yticks(range(len(table)), table["site"], fontsize=6 if len(table) > 30 else 8)
    fig.colorbar(im, ax=ax, label="distance (pooled SD)")
    fig.tight_layout()
    return fig


def _examples(design: Design, table: pd.DataFrame, per_site: int = 3):
    df = design.df
    policy = IntensityPolicy()
    ranked = table["site"].tolist()  # most shifted first
    picks = {design.reference_site: "reference"}
    ends = [(ranked[:2], ["most shifted", "2nd most shifted"]),
            (ranked[::-1][:2], ["least shifted", "2nd least shifted"])]
    for sites, titles in ends:
        for site, title in zip(sites, titles[:len(sites)], strict=True):
            picks.setdefault(site, title)  # a small cohort: each hospital shown once
    order = ["reference", "most shifted", "2nd most shifted", "2nd least shifted",
             "least shifted"]
    names = sorted(picks, key=lambda n: order.index(picks[n]))
    rows = []
    for name in names:
        paths = df.loc[df["site"] == name, "path"].head(per_site).tolist()
        images = [np.clip(policy.to_model(read_image(p))[0], 0, 1) for p in paths]
        images += [np.zeros_like(images[0])] * (per_site - len(images))
        rows.append(images)
    return image_grid(rows, [f"image {i + 1}" for i in range(per_site)],
                      [f"{picks[n]}: {n}" for n in names], cell_inches=1.6)


def _arm_table(table: pd.DataFrame, diffs: pd.DataFrame, part: str) -> pd.DataFrame:
    d = diffs[diffs["part"] == part].drop_duplicates("arm")
    t = table.merge(d[["arm", "baseline_label", "auc_difference", "lo", "hi"]], on="arm",
                    how="left")
    shown = t[["label", "auc", "auc_lo", "auc_hi", "ap", "ap_lo", "ap_hi", "sens_at_spec",
               "sens_at_spec_lo", "sens_at_spec_hi", "auc_difference", "lo", "hi",
               "baseline_label"]].round(3)
    return shown.rename(columns={"label": "arm", "auc_difference": "AUC - baseline",
                                 "lo": "diff lo", "hi": "diff hi",
                                 "sens_at_spec": "sensitivity at 90% specificity",
                                 "sens_at_spec_lo": "sens lo", "sens_at_spec_hi": "sens hi",
                                 "ap": "average precision", "baseline_label": "baseline"})


def _part2(page: HtmlReport, table: pd.DataFrame, diffs: pd.DataFrame, n_external: str
           ) -> None:
    page.heading("2. Does central harmonization beat augmentation on unseen hospitals?")
    part = diffs[diffs["part"] == "central"]
    t = table[table["arm"].isin(set(part["arm"]) | set(part["baseline"]))]
    hm, aug = _row(t, "hm-central_central"), _row(t, "raw_central_augment")
    raw = _row(t, "raw_central")
    if hm is not None and aug is not None:
        page.answer(
            f"On the unseen node ({n_external}), the central classifier on centrally "
            f"harmonized images reaches AUC {_ci(hm['auc'], hm['auc_lo'], hm['auc_hi'])}; "
            f"with plain augmentation instead {_ci(aug['auc'], aug['auc_lo'], aug['auc_hi'])}"
            f"; difference {_difference(diffs, 'hm-central_central', 'raw_central_augment')} "
            "(paired bootstrap over the same images)"
            + (f"; with neither, {_ci(raw['auc'], raw['auc_lo'], raw['auc_hi'])}."
               if raw is not None else ".") + _unseen_reference(t, diffs)
            + _other_archs(t, diffs))
    page.table(_arm_table(t, diffs, "central"))
    page.figure(forest(t, "Central training"), "")


def _part2_left_out(page: HtmlReport, table: pd.DataFrame, diffs: pd.DataFrame,
                    nodes: list[str]) -> None:
    page.heading("Leave one training node out", 3)
    hm, aug = _row(table, "hm-central_central"), _row(table, "raw_central_augment")
    if hm is not None and aug is not None:
        page.answer(
            f"Each of the {len(nodes)} training nodes scored by classifiers trained on the "
            f"other {len(nodes) - 1} ({int(hm['n'])} images pooled): harmonized "
            f"{_ci(hm['auc'], hm['auc_lo'], hm['auc_hi'])} against augmentation "
            f"{_ci(aug['auc'], aug['auc_lo'], aug['auc_hi'])}; difference "
            f"{_difference(diffs, 'hm-central_central', 'raw_central_augment')}.")
    page.paragraph("The harmonizer is the same in every fold: the reference hospital's "
                   "landmarks need no labels, so the fold that leaves the reference's node "
                   "out still maps onto its style (as a deployed harmonizer would).", "note")
    page.table(_arm_table(table, diffs, "central"))


def _unseen_reference(table: pd.DataFrame, diffs: pd.DataFrame) -> str:
    """The second reference protocol: every hospital mapped onto the unseen node's style."""
    r = _row(table, "hm-unseen_central")
    if r is None:
        return ""
    gain = _difference(diffs, "hm-unseen_central", "raw_central_augment")
    return (" With the unseen node's own style as the reference instead (its unlabelled "
            f"images give the landmarks): {_ci(r['auc'], r['auc_lo'], r['auc_hi'])}, "
            f"against augmentation {gain}.")


def _other_archs(table: pd.DataFrame, diffs: pd.DataFrame) -> str:
    """The same comparison for each further architecture of part 2, one sentence each."""
    text = ""
    for arch in sorted(table["arch"].dropna().unique()):
        hm, aug = f"hm-central_central_{arch}", f"raw_central_{arch}_augment"
        r = _row(table, hm)
        if r is not None:
            text += (f" The {arch} on harmonized images: "
                     f"{_ci(r['auc'], r['auc_lo'], r['auc_hi'])}, against its augmentation "
                     f"{_difference(diffs, hm, aug)}.")
    return text


def _part3(page: HtmlReport, table: pd.DataFrame, diffs: pd.DataFrame) -> None:
    page.heading("3. Federated harmonization and federated classifiers, against central")
    grid = {}
    for images in ("central", "federated"):
        for training in ("central", "fedavg"):
            r = _row(table, f"hm-{images}_{training}")
            grid[(images, training)] = (_ci(r["auc"], r["auc_lo"], r["auc_hi"])
                                        if r is not None else "n/a")
    fed = _row(table, "hm-federated_fedavg")
    if fed is not None:
        page.answer(
            f"Federated harmonization with a FedAvg classifier reaches AUC "
            f"{grid[('federated', 'fedavg')]} on the unseen node against "
            f"{grid[('central', 'central')]} for the central pipeline: difference "
            f"{_difference(diffs, 'hm-federated_fedavg', 'hm-central_central')}.")
    two = pd.DataFrame({"harmonization": ["central", "federated"],
                        "central classifier": [grid[("central", "central")],
                                               grid[("federated", "central")]],
                        "FedAvg classifier": [grid[("central", "fedavg")],
                                              grid[("federated", "fedavg")]]})
    page.heading("The 2 x 2: where harmonization and classifier are trained", 3)
    page.paragraph("Both harmonizers map every hospital onto the reference hospital's "
                   "intensity landmarks; the federated one is released by the reference "
                   "hospital's node as the mean of per-patient landmarks (what its DP option "
                   "needs), the central one is fitted on the reference images directly, so "
                   "their outputs differ slightly (part 1 gives both distances).")
    page.table(two)
    t = table[table["arm"].isin(diffs.loc[diffs["part"] == "federated", "arm"].tolist()
                                + ["hm-central_central"])]
    page.paragraph("Every arm against the central pipeline (central harmonization, central "
                   "classifier), paired over the same external images; augmentation under "
                   "each classifier, personalization (FedBN: normalization layers stay at "
                   "the nodes, the unseen node uses its own statistics; FedPer: each node "
                   "keeps its own classification layer, the unseen node gets the nodes' "
                   "mean), FedProx, and the hybrids (FedBN, FedPer on harmonized images).")
    page.table(_arm_table(t, diffs, "federated"))
    page.figure(forest(t, "Central and federated"), "")


def _part4(page: HtmlReport, table: pd.DataFrame, diffs: pd.DataFrame,
           config: StudyConfig) -> None:
    page.heading("4. The central/federated difference under privacy")
    d = diffs[(diffs["part"] == "privacy") & (diffs["baseline"] == "hm-central_central")]
    sentences = []
    for _, r in d.iterrows():
        arm = _row(table, r["arm"])
        sentences.append(f"{arm['label']}: {r['auc_difference']:+.3f} "
                         f"[{r['lo']:+.3f}, {r['hi']:+.3f}]")
    page.answer("AUC difference to the central pipeline on the unseen node: "
                + "; ".join(sentences) + ".")
    public = diffs[(diffs["part"] == "privacy") & diffs["arm"].str.startswith("hm-public_")
                   & (diffs["baseline"] != "hm-central_central")]
    if len(public):
        page.paragraph(
            "The public-reference design (landmarks from a public data set: no privacy "
            "budget on the harmonizer, only public numbers travel to the nodes, each maps "
            "its own images) against the private reference (the reference hospital's "
            "node releases its landmarks under DP) at the same target, and, with no DP "
            "on the classifier, against DP on the landmarks alone: "
            + "; ".join(f"{r['label']} against {r['baseline_label']}: "
                        f"{r['auc_difference']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"
                        for _, r in public.iterrows()) + ".")
    t = table[table["arm"].isin(d["arm"])]
    cols = [c for c in t.columns if c.startswith("cost_")]
    shown = _arm_table(t, diffs, "privacy")
    for c in cols:
        shown[c.removeprefix("cost_").replace("_", " ")] = t[c].to_numpy()
    page.paragraph(f"Patient-level DP (DP-SGD at each node for the classifier, one Gaussian "
                   f"release for the landmarks) at delta {config.privacy.delta:g}; every "
                   "arm of this part uses the same GroupNorm CNN without class weights, as "
                   "DP-SGD needs; epsilon is the classifier's, per patient, the largest over "
                   "nodes. Cost per round: median seconds and bytes each node sent.")
    page.table(shown.round(4))
    page.figure(forest(t, "Privacy"), "")


def write_study_report(out: Path, config: StudyConfig, design: Design, summary: dict,
                       table: pd.DataFrame, diffs: pd.DataFrame,
                       left_out: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> Path:
    page = HtmlReport("harmonize study: four answers")
    s = summary["design"]
    page.paragraph(
        f"{s['images']} images of {s['patients']} patients at {s['hospitals']} hospitals; "
        f"training nodes {', '.join(s['training_nodes'])}; external (unseen) node "
        f"{s['external_node']} ({s['external_images']} images); reference hospital "
        f"{s['reference_site']}; positive class '{s['positive']}'. Classifier: "
        f"{config.classifier.arch} at {config.data.image_size} px, "
        + (f"seeds {', '.join(map(str, seeds))} (every arm trained once per seed; AUC, AP, "
           "sensitivity and differences are seed means, CIs over the unseen images)."
           if len(seeds := classifier_seeds(config)) > 1 else f"seed {config.seed}."))
    if summary.get("shift"):
        _part1(page, out, design, summary["shift"])
    if "central" in config.parts:
        _part2(page, table, diffs, s["external_node"])
        if left_out is not None:
            _part2_left_out(page, *left_out, s["training_nodes"])
    if "federated" in config.parts:
        _part3(page, table, diffs)
    if "privacy" in config.parts:
        _part4(page, table, diffs, config)
    page.heading("Wall time per stage")
    times = pd.DataFrame({"stage": list(summary["stage_seconds"]),
                          "seconds": list(summary["stage_seconds"].values())})
    page.paragraph(f"Machine: {platform.processor() or platform.machine()}, "
                   f"{available_cpus()} CPU(s). Reused from an earlier run: "
                   f"{', '.join(summary['reused_stages']) or 'none'}.", "note")
    page.table(times.round(1))
    page.link("arms.csv", "every arm's scores (CSV)")
    page.link("differences.csv", "the paired differences (CSV)")
    if left_out is not None:
        page.link("arms_leave_one_node_out.csv", "leave one node out: every arm (CSV)")
        page.link("differences_leave_one_node_out.csv",
                  "leave one node out: the paired differences (CSV)")
    return page.save(out / "report.html")
