"""`harmonize shift-report`: extract, analyze, write, for one image set or a before/after
pair. In a comparison both sets are measured with the same settings (bin width chosen on
the original images) and the same ROIs, so only the intensities differ: the manifest's
mask, or else the automatic body mask found on the *harmonized* image, saved once and
used for both. Found on the originals, the automatic mask carried the sites into the
"after" numbers: shutters cut it and inverted exports fool its threshold, so even a
perfect harmonization (the synthetic benchmark's paired truth) scored a site AUC of
0.999 (0.528 with the mask found on the harmonized image)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from harmonize.data.io import atomic_write
from harmonize.data.manifest import load_manifest, manifest_from_folder
from harmonize.radiomics.analysis import analyze, compare
from harmonize.radiomics.extract import extract_features
from harmonize.radiomics.masks import frozen_mask_name, load_roi
from harmonize.radiomics.report import write_shift_report
from harmonize.radiomics.settings import RadiomicsSettings


def load_image_set(data: str | os.PathLike, mask_column: str | None = None) -> pd.DataFrame:
    """A manifest CSV, or a folder laid out ROOT/<site>/[<label>/]..."""
    data = Path(data)
    if data.is_file():
        return load_manifest(data, mask_column=mask_column)
    if data.is_dir():
        return manifest_from_folder(data)
    raise FileNotFoundError(f"{data}: neither a manifest CSV nor a folder of site subfolders")


def mask_hint(df: pd.DataFrame, mask_column: str | None) -> str | None:
    """A manifest column that looks like ROI masks but is not used: say so, and how."""
    if mask_column or ("mask" in df and df["mask"].astype(str).str.len().gt(0).any()):
        return None
    candidates = [c for c in df.columns if c.lower().endswith("mask") and c != "mask"
                  and "finding" not in c.lower() and df[c].astype(str).str.len().gt(0).any()]
    if not candidates:
        return None
    c = candidates[0]
    n = int(df[c].astype(str).str.len().gt(0).sum())
    return (f"the manifest's column '{c}' looks like ROI masks ({n} of {len(df)} images "
            f"have one) but is not used: every image is measured in an automatic body mask; "
            f"add --mask-column {c} to measure inside those masks")


def harmonized_counterpart(df: pd.DataFrame, root: str | os.PathLike) -> pd.DataFrame:
    """The same rows pointing at ROOT/<relpath> (the tree `harmonize apply` writes)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: harmonized folder not found")
    out = df.copy()
    out["path"] = [str(root / r) for r in df["relpath"]]
    return out


def freeze_auto_masks(df: pd.DataFrame, settings: RadiomicsSettings, folder: Path,
                      progress: bool = True, find_on: Path | None = None) -> pd.DataFrame:
    """Save automatic ROIs as mask files so both sets of a comparison are measured inside
    exactly the same pixels. `find_on`: a harmonized tree (ROOT/<relpath>) whose image
    the mask is found on, where it exists (else the original's)."""
    import SimpleITK as sitk

    out = df.copy()
    if "mask" not in out:
        out["mask"] = ""
    todo = out[out["mask"] == ""]  # images with a mask of their own need none
    for i, rec in tqdm(list(todo.iterrows()), desc="automatic ROI masks", unit="img",
                       disable=not progress or todo.empty):
        source = rec["path"]
        if find_on is not None and (Path(find_on) / rec["relpath"]).is_file():
            source = Path(find_on) / rec["relpath"]
        try:
            _, roi = load_roi(source, None, settings.policy, settings.auto_mask)
        except (ValueError, OSError):
            continue  # extraction reports the same problem for this image
        path = folder / frozen_mask_name(rec["relpath"], roi.source)
        path.parent.mkdir(parents=True, exist_ok=True)
        mask = (roi.mask.astype(np.uint8) * 255)
        atomic_write(path, lambda tmp, m=mask: sitk.WriteImage(sitk.GetImageFromArray(m),
                                                                  str(tmp)))
        out.at[i, "mask"] = str(path)
    return out


def run_shift_report(data: str | os.PathLike, out: str | os.PathLike,
                     compare_with: str | os.PathLike | None = None,
                     reference_site: str | None = None, mask_column: str | None = None,
                     workers: int | None = None, cache_dir: str | os.PathLike | None = None,
                     ray_address: str | None = None, n_boot: int = 200,
                     progress: bool = True, label: str | None = None,
                     back: tuple[str, str] | None = None) -> dict:
    """`label` names the compared set in the report's title (e.g. the translator);
    `back` = (href, text) links the report to the one it belongs to."""
    out = Path(out)
    df = load_image_set(data, mask_column)
    notes = [h for h in [mask_hint(df, mask_column)] if h]
    settings = RadiomicsSettings.from_data(df, progress=progress)
    kwargs = {"workers": workers, "cache_dir": cache_dir, "ray_address": ray_address,
              "progress": progress}
    if compare_with is not None:
        if (df.get("mask", pd.Series("", index=df.index)).astype(str) == "").any():
            notes.append("images without a manifest mask are measured, before and after, "
                         "inside the automatic body mask of their harmonized copy")
        df = freeze_auto_masks(df, settings, out / "roi_masks", progress, find_on=compare_with)
    features, errors = extract_features(df, settings, **kwargs)
    settings_info = {**settings.report_dict(features), "notes": notes, "label": label,
                     "back": back}
    if compare_with is None:
        result = analyze(features, reference_site, n_boot=n_boot)
        write_shift_report(out, features, errors, result, settings_info)
        summary = result.summary()
        return {**summary, "n_errors": len(errors),
                "notes": [*summary.get("notes", []), *notes], "roi": settings_info["roi"]}
    h_df = harmonized_counterpart(df, compare_with)
    h_features, h_errors = extract_features(h_df, settings, **kwargs)
    errors = pd.concat([errors.assign(set="original"), h_errors.assign(set="harmonized")],
                       ignore_index=True)
    before, after, change = compare(features, h_features, reference_site, n_boot=n_boot)
    write_shift_report(out, features, errors, before, settings_info,
                       after=(h_features, after, change))
    return {"before": before.summary(), "after": after.summary(),
            "change": change.to_dict("records"), "n_errors": len(errors), "notes": notes,
            "roi": settings_info["roi"]}
