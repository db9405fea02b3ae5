"""Part 1, built for many hospitals: how far is each hospital's image style from the
reference hospital's (radiomics), before and after harmonization.

Distance of a hospital: the mean over radiomics features of |mean(hospital) -
mean(reference)| in units of the feature's pooled standard deviation (a mean absolute
standardized difference), with a bootstrap CI over each side's images (all resamples at
once); per feature family (first-order, GLCM, ...) the same mean over the family's
features (the heat map). Hospitals are clustered (Ward, on their mean standardized
features) into as many groups as there are nodes: a proposal of node groups whose
members look alike. Features are extracted once per image (pyradiomics, cached); the
rest takes a second or two, so extraction dominates the cost. Where the manifest has no
mask, every set (raw, each harmonizer's) is measured inside the automatic body mask
found on its own images: found on the raw images, it carried the shutters and inverted
exports of each hospital into every "after" distance (see harmonize.radiomics.shift_report).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.data.manifest import load_manifest
from harmonize.radiomics.distance import pooled_scale
from harmonize.radiomics.extract import extract_features, feature_columns
from harmonize.radiomics.settings import RadiomicsSettings
from harmonize.radiomics.shift_report import freeze_auto_masks
from harmonize.radiomics.stats import feature_family
from harmonize.study.design import Design, natural_key


def features_of(frame: pd.DataFrame, settings: RadiomicsSettings, cache: Path,
                progress: bool) -> pd.DataFrame:
    features, errors = extract_features(frame, settings, workers=None, cache_dir=cache,
                                        progress=progress)
    if len(errors):
        raise RuntimeError(f"radiomics failed on {len(errors)} image(s), e.g. "
                           f"{errors['path'].iloc[0]}: {errors['error'].iloc[0]}")
    return features


def hospital_distances(features: pd.DataFrame, reference: str, scale=None,
                       n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """One row per hospital but the reference: distance, CI, distance per family."""
    cols = [c for c in feature_columns(features) if features[c].notna().all()]
    x = features[cols].to_numpy(float)
    mu, sd = scale if scale is not None else pooled_scale(x)
    keep = sd > 1e-12
    z = (x - mu) / sd
    z, cols = z[:, keep], [c for c, k in zip(cols, keep, strict=True) if k]
    families = np.array([feature_family(c) for c in cols])
    site = features["site"].astype(str).to_numpy()
    ref = z[site == reference]
    rng = np.random.default_rng(seed)
    ref_boot = ref[rng.integers(0, len(ref), (n_boot, len(ref)))].mean(axis=1)
    rows = []
    for name in sorted(set(site) - {reference}, key=natural_key):
        own = z[site == name]
        diff = np.abs(own.mean(0) - ref.mean(0))
        boot = np.abs(own[rng.integers(0, len(own), (n_boot, len(own)))].mean(axis=1)
                      - ref_boot).mean(axis=1)
        row = {"site": name, "n_images": len(own), "distance": float(diff.mean()),
               "distance_lo": float(np.quantile(boot, 0.025)),
               "distance_hi": float(np.quantile(boot, 0.975))}
        row.update({f"family_{f}": float(diff[families == f].mean())
                    for f in sorted(set(families))})
        rows.append(row)
    return pd.DataFrame(rows)


def propose_nodes(features: pd.DataFrame, groups: int, scale=None) -> dict[str, int]:
    """Hospitals clustered (Ward) on their mean standardized features into `groups`."""
    from scipy.cluster.hierarchy import fcluster, linkage

    cols = [c for c in feature_columns(features) if features[c].notna().all()]
    x = features[cols].to_numpy(float)
    mu, sd = scale if scale is not None else pooled_scale(x)
    means = pd.DataFrame((x - mu) / sd).groupby(features["site"].astype(str).to_numpy()).mean()
    labels = fcluster(linkage(means.to_numpy(), method="ward"), t=groups, criterion="maxclust")
    return {s: int(c) for s, c in zip(means.index, labels, strict=True)}


def run_shift(design: Design, harmonized: dict[str, str], folder: Path, n_boot: int,
              seed: int, progress: bool) -> dict:
    """Part 1's tables (CSV in `folder`): every hospital's distance to the reference on
    the raw images and after each harmonizer (`harmonized`: name -> manifest)."""
    started = time.perf_counter()
    df = design.df
    settings = RadiomicsSettings.from_data(df, progress=progress)
    frame = freeze_auto_masks(df, settings, folder / "roi_masks", progress)
    cache = folder.parent / "radiomics_cache"
    raw = features_of(frame, settings, cache, progress)
    extraction = time.perf_counter() - started
    cols = [c for c in feature_columns(raw) if raw[c].notna().all()]
    scale = pooled_scale(raw[cols].to_numpy(float))  # one scale for before and after
    table = hospital_distances(raw[["site", *cols]], design.reference_site, scale,
                               n_boot, seed)
    node_of = df.drop_duplicates("site").set_index("site")["node"].astype(str)
    table.insert(1, "node", table["site"].map(node_of))
    for name, manifest in harmonized.items():
        h = load_manifest(manifest)
        h_frame = df.copy()
        h_frame["path"] = h["path"].to_numpy()
        h_frame = freeze_auto_masks(h_frame, settings, folder / "roi_masks" / name, progress)
        t = time.perf_counter()
        after = features_of(h_frame, settings, cache, progress)
        extraction += time.perf_counter() - t
        d = hospital_distances(after[["site", *cols]], design.reference_site, scale,
                               n_boot, seed)
        table[f"after_{name}"] = d["distance"].to_numpy()
        table[f"after_{name}_lo"] = d["distance_lo"].to_numpy()
        table[f"after_{name}_hi"] = d["distance_hi"].to_numpy()
    proposal = propose_nodes(raw[["site", *cols]], len(set(df["node"])), scale)
    table["proposed_group"] = table["site"].map(proposal)
    table = table.sort_values("distance", ascending=False).reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table.to_csv(folder / "hospitals.csv", index=False)
    agreement = _node_agreement(proposal, node_of)
    return {"hospitals": str(folder / "hospitals.csv"), "n_features": len(cols),
            "n_images": len(df), "reference_site": design.reference_site,
            "reference_proposed_group": proposal.get(design.reference_site),
            "extraction_seconds": extraction,
            "total_seconds": time.perf_counter() - started,
            "node_agreement_ari": agreement}


def _node_agreement(proposal: dict[str, int], node_of: pd.Series) -> float:
    """Adjusted Rand index of the proposed groups against the actual nodes (1: the
    same grouping; about 0: unrelated, as for nodes formed by geography, not style)."""
    from sklearn.metrics import adjusted_rand_score

    sites = sorted(proposal)
    return float(adjusted_rand_score([node_of[s] for s in sites], [proposal[s] for s in sites]))
