"""Hallucination / finding-preservation audit of every translator (Cohen et al. 2018:
a translator trained to match a distribution can add or remove findings).

Audited: the test images of the first fold that are not from the reference site.

- Label flips: a frozen classifier (plain augmentation on raw images, first fold / seed /
  classifier of the matrix) scores each test image before and after translation; a flip
  is a change of the thresholded prediction. With the synthetic benchmark's paired
  truth (the same patient as the reference site renders it), flips are also counted
  against the truth, which separates style change from invented or erased findings.
- Finding contrast (synthetic): mean intensity inside the known finding mask minus a
  3-pixel ring around it, in units of the image's intensity spread inside the body ROI
  (so a global gain/offset, i.e. pure style, does not count). Translated vs the input
  image (|after| / |before|: polarity flips do not count): below 0.5 the translator
  erased the finding; above 2 it amplified it. Amplified is exaggerated only where it
  also exceeds twice the truth's contrast (the reference site's rendering of the same
  finding): a blurred, noisy or log-compressed input holds a fraction of the truth's
  contrast, and restoring it is what a translator is for. Without a truth, amplified
  counts as exaggerated. Translated vs truth is reported too (how much of the
  reference site's rendering of the finding was restored).
- Per-image risk flag (a flip against the truth or before/after, an erased or
  exaggerated finding) is written into the translator's apply_log.csv.
- Grad-CAM of the frozen CNN before and after translation, and the share of the map that
  falls outside the body ROI (site markers, borders, collimation live there).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch import nn

from harmonize.classify.train import load_images, predict
from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import atomic_write, read_image
from harmonize.training.device import model_on, pick_device

AUDIT_COLUMNS = ["p_before", "p_after", "p_truth", "flip_before_after", "flip_vs_truth",
                 "finding_contrast_ratio", "finding_contrast_vs_truth", "risk", "risk_reason"]


class _Logits2D(nn.Module):
    """MONAI's GradCAM wants (B, classes) logits."""

    def __init__(self, clf: nn.Module) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf(x)[:, None]


def _unit_range(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(len(x), -1)
    lo = flat.min(1).values.reshape(-1, *([1] * (x.ndim - 1)))
    hi = flat.max(1).values.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(x))


def gradcam_maps(model, images: torch.Tensor) -> np.ndarray | None:
    """(N, S, S) Grad-CAM maps in [0, 1], or None for a model without a conv stage."""
    layer = model.gradcam_layer()
    if not layer:
        return None
    from monai.visualize import GradCAM

    # MONAI's default post-processing maps (min, max) to (1, 0), i.e. flips the map;
    # scale each map to [0, 1] with 1 = most important instead
    cam = GradCAM(nn_module=_Logits2D(model), target_layers=f"clf.{layer}",
                  postprocessing=_unit_range)
    device = pick_device()
    with torch.enable_grad(), model_on(model, device):
        maps = [cam(images[i:i + 32].to(device), class_idx=0).detach()
                for i in range(0, len(images), 32)]
        return torch.cat(maps)[:, 0].cpu().numpy()


def outside_share(maps: np.ndarray, rois: np.ndarray) -> np.ndarray:
    """Per image: share of the Grad-CAM mass outside the ROI (nan for an all-zero map)."""
    total = maps.reshape(len(maps), -1).sum(1)
    outside = (maps * (~rois)).reshape(len(maps), -1).sum(1)
    return np.where(total > 0, outside / np.where(total > 0, total, 1.0), np.nan)


def finding_contrast(image: np.ndarray, finding: np.ndarray, roi: np.ndarray | None = None,
                     ring_px: int = 3) -> float:
    """(mean in finding - mean in a ring around it) / intensity sd inside the ROI."""
    ring = ndimage.binary_dilation(finding, iterations=ring_px) & ~finding
    if not finding.any() or not ring.any():
        return float("nan")
    spread = float(np.std(image[roi] if roi is not None and roi.any() else image))
    if spread == 0:
        return float("nan")
    return float(image[finding].mean() - image[ring].mean()) / spread


def findings_exaggerated(ratio: np.ndarray, vs_truth: np.ndarray, above: float) -> np.ndarray:
    """Per finding: contrast more than `above` x the input's and, where a truth exists
    (`vs_truth` not NaN), more than `above` x the truth's (see the module docstring)."""
    ratio, vs_truth = np.asarray(ratio, dtype=float), np.asarray(vs_truth, dtype=float)
    return (ratio > above) & ~(vs_truth <= above)


def finding_contrast_audit(df: pd.DataFrame, root: Path, where, mask_column: str = "mask",
                           erased_below: float = 0.5, above: float = 2.0) -> dict:
    """The finding-contrast part of the audit, without a classifier, on every row of
    `df` with a finding mask and a paired truth (the synthetic benchmark's
    `finding_mask` and `reference_path`, relative to `root`); `where(row)` is the
    translated image of the row. Returns the rates and medians of `run_audit`'s
    summary (findings_erased, findings_amplified, findings_exaggerated,
    finding_contrast_ratio, finding_contrast_vs_truth) and n, the findings counted."""
    policy = IntensityPolicy()
    ratio, vs_truth = [], []
    for rec in df.to_dict("records"):
        if not str(rec.get("finding_mask", "")) or not str(rec.get("reference_path", "")):
            continue
        finding = read_image(root / rec["finding_mask"]).array > 0
        roi = (read_image(root / rec[mask_column]).array > 0
               if str(rec.get(mask_column, "")) else None)
        before = finding_contrast(_model_space(root / rec["path"], policy), finding, roi)
        truth = finding_contrast(_model_space(root / rec["reference_path"], policy), finding,
                                 roi)
        after = finding_contrast(_model_space(where(rec), policy), finding, roi)
        ratio.append(abs(after) / abs(before) if before else np.nan)
        vs_truth.append(after / truth if truth else np.nan)
    ratio, vs_truth = np.array(ratio, dtype=float), np.array(vs_truth, dtype=float)
    counted = ~np.isnan(ratio)
    return {"n": int(counted.sum()),
            "findings_erased": _rate(ratio < erased_below, counted),
            "findings_amplified": _rate(ratio > above, counted),
            "findings_exaggerated": _rate(findings_exaggerated(ratio, vs_truth, above),
                                          counted),
            "finding_contrast_ratio": float(np.nanmedian(ratio)) if counted.any() else np.nan,
            "finding_contrast_vs_truth": float(np.nanmedian(vs_truth))
            if counted.any() else np.nan}


def _model_space(path: str | os.PathLike, policy: IntensityPolicy) -> np.ndarray:
    return policy.to_model(read_image(path))[0]


def run_audit(config, data, sets, images, frozen, fold, out: Path) -> dict:
    """Audit every translator with the frozen classifier (trained with plain augmentation
    on `fold`, the first seed and classifier); returns summaries + per-image tables."""
    seed, clf = config.seeds[0], config.classifiers[0]
    idx = np.unique(np.concatenate(list(fold.tests.values())))
    # reference-site images pass through every translator unchanged: nothing to audit
    idx = idx[data.df["site"].to_numpy()[idx] != data.reference_site]
    df = data.df.iloc[idx]
    y = data.labels[idx]
    size = config.data.image_size
    folder = data.manifest.parent
    has_truth = data.synth_dir is not None and "reference_path" in df.columns
    truth_paths = [str(folder / p) for p in df["reference_path"]] if has_truth else []
    x_truth = load_images(truth_paths, size, progress=False) if has_truth else None
    p_truth = predict(frozen, x_truth) if has_truth else np.full(len(idx), np.nan)
    p_raw = predict(frozen, images["raw"][idx])
    rois = _rois(df, config.data.mask_column, size, folder)
    cam_raw = gradcam_maps(frozen, images["raw"][idx])
    policy = IntensityPolicy()
    truth_contrast = {}
    if has_truth and "finding_mask" in df.columns:
        for i, rec in enumerate(df.to_dict("records")):
            if y[i] == 1:
                mask = read_image(folder / rec["finding_mask"]).array > 0
                column = config.data.mask_column
                roi = (read_image(folder / rec[column]).array > 0
                       if column and str(rec.get(column, "")) else None)
                truth = _model_space(folder / rec["reference_path"], policy)
                before = _model_space(rec["path"], policy)
                truth_contrast[i] = (mask, roi, finding_contrast(truth, mask, roi),
                                     finding_contrast(before, mask, roi))

    summaries, tables, cams = [], {}, {}
    erased_below = config.audit.contrast_erased_below
    invented_above = config.audit.contrast_invented_above
    sources = [("raw", None)] + [(name, hs) for name, hs in sets.items()]
    for name, hs in sources:
        p_after = p_raw if hs is None else predict(frozen, images[name][idx])
        t = pd.DataFrame({"input": df["path"].to_numpy(), "site": df["site"].to_numpy(),
                          "label": y, "p_before": p_raw, "p_after": p_after,
                          "p_truth": p_truth})
        t["flip_before_after"] = (p_raw >= 0.5) != (p_after >= 0.5)
        t["flip_vs_truth"] = ((p_after >= 0.5) != (p_truth >= 0.5)) if has_truth else False
        ratio = np.full(len(idx), np.nan)
        vs_truth = np.full(len(idx), np.nan)
        for i, (mask, roi, c_truth, c_before) in truth_contrast.items():
            path = df["path"].iloc[i] if hs is None else hs.manifest["path"].iloc[idx[i]]
            c_after = finding_contrast(_model_space(path, policy), mask, roi)
            ratio[i] = abs(c_after) / abs(c_before) if c_before else np.nan
            vs_truth[i] = c_after / c_truth if c_truth else np.nan
        t["finding_contrast_ratio"] = ratio
        t["finding_contrast_vs_truth"] = vs_truth
        reasons = np.where(t["flip_vs_truth"], "prediction differs from truth's; ", "")
        reasons = reasons + np.where(t["flip_before_after"], "prediction flipped; ", "")
        reasons = reasons + np.where(ratio < erased_below, "finding contrast erased; ", "")
        exaggerated = findings_exaggerated(ratio, vs_truth, invented_above)
        reasons = reasons + np.where(exaggerated, "finding exaggerated; ", "")
        t["risk_reason"] = pd.Series(reasons).str.rstrip("; ").to_numpy()
        t["risk"] = t["risk_reason"] != ""
        tables[name] = t
        cam = cam_raw if hs is None else gradcam_maps(frozen, images[name][idx])
        cams[name] = cam
        pos = y == 1
        summaries.append({
            "translator": name, "n": len(idx),
            "flip_rate_before_after": float(t["flip_before_after"].mean()),
            "flip_rate_vs_truth": float(t["flip_vs_truth"].mean()) if has_truth else np.nan,
            "erased_by_classifier": _rate((p_truth >= 0.5) & (p_after < 0.5) & pos, pos)
            if has_truth else np.nan,
            "invented_by_classifier": _rate((p_truth < 0.5) & (p_after >= 0.5) & ~pos, ~pos)
            if has_truth else np.nan,
            "finding_contrast_ratio": float(np.nanmedian(ratio)) if truth_contrast else np.nan,
            "finding_contrast_vs_truth": float(np.nanmedian(vs_truth))
            if truth_contrast else np.nan,
            "findings_erased": _rate(ratio < erased_below, ~np.isnan(ratio)),
            "findings_amplified": _rate(ratio > invented_above, ~np.isnan(ratio)),
            "findings_exaggerated": _rate(exaggerated, ~np.isnan(ratio)),
            "cam_outside_roi": float(np.nanmean(outside_share(cam, rois)))
            if cam is not None and rois is not None else np.nan,
            "risk_rate": float(t["risk"].mean()),
        })
        if hs is not None:
            add_to_apply_log(hs.folder / "apply_log.csv", t)
    audit_dir = out / "audit"
    audit_dir.mkdir(exist_ok=True)
    pd.concat([t.assign(translator=n) for n, t in tables.items()]).to_csv(
        audit_dir / "per_image.csv", index=False)
    summary = pd.DataFrame(summaries)
    summary.to_csv(audit_dir / "summary.csv", index=False)
    sample = _cam_sample(df, y, config.audit.gradcam_images)
    return {"summary": summary, "tables": tables, "cams": cams, "rows": idx,
            "cam_sample": sample, "frozen": f"{clf.arch}, plain augmentation, "
            f"{fold.protocol} fold (test: {', '.join(s for _, s in fold.tests)}), seed {seed}"}


def _rate(hit: np.ndarray, of: np.ndarray) -> float:
    n = int(np.sum(of))
    return float(np.sum(hit & of) / n) if n else float("nan")


def _rois(df: pd.DataFrame, column: str | None, size: int, folder: Path) -> np.ndarray | None:
    """ROI masks at the classifier's size (paths relative to the manifest's folder)."""
    if not column or column not in df.columns or (df[column].astype(str) == "").any():
        return None
    masks = load_images([str(folder / p) for p in df[column]], size, progress=False)
    return (masks[:, 0] > 0.5).numpy()


def _cam_sample(df: pd.DataFrame, y: np.ndarray, k: int) -> list[int]:
    """Positions (into the audited rows) of k images, positives first, spread over sites."""
    order = sorted(range(len(y)), key=lambda i: (-int(y[i]), df["site"].iloc[i], i))
    picked, seen = [], set()
    for i in order:  # one per site first
        if df["site"].iloc[i] not in seen:
            picked.append(i)
            seen.add(df["site"].iloc[i])
    picked += [i for i in order if i not in picked]
    return picked[:k]


def add_to_apply_log(log_path: Path, table: pd.DataFrame) -> None:
    """Add the audit columns to apply_log.csv (matched on the input path), atomically."""
    if not log_path.is_file():
        return
    log = pd.read_csv(log_path, dtype=str, keep_default_na=False)
    log = log.drop(columns=[c for c in AUDIT_COLUMNS if c in log.columns])
    cols = table[["input", *AUDIT_COLUMNS]].drop_duplicates("input")
    merged = log.merge(cols, on="input", how="left")
    atomic_write(log_path, lambda tmp: merged.to_csv(tmp, index=False))
