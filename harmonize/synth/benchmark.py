"""Write the embedded multi-site benchmark: site images, paired reference renderings, masks.

Layout under ``OUT`` (all paths in the manifest are relative to ``OUT``)::

    <site>/<label>/<id>.png             16-bit image as the site acquired it
    reference/<site>/<label>/<id>.png   the same patient as the reference site acquires it
    masks/<site>/<label>/<id>.png       uint8 0/255 body ROI (radiomics ROI)
    findings/<site>/<label>/<id>.png    uint8 0/255 finding mask (empty for normals)
    manifest.csv                        path,site,label,patient_id,mask,finding_mask,reference_path
                                        (+ node, when sites are grouped into nodes)
    synth.json                          parameters, per-site acquisition, prevalence, version

Reference renderings are real acquisitions with their own quantum noise: each image's
reference uses a noise stream seeded from (seed, site, index) that is independent of the
site's own noise stream, so it is reproducible yet not a noise-free oracle. For images of
the reference site the image is rendered from that same stream, so image and reference
are identical. Every random draw comes from a stream keyed on (seed, purpose, site,
index), so a rerun with the same arguments writes the same bytes, and ``no_shift=True``
keeps the same patients and labels as the shifted benchmark (only the style changes).

A cohort shaped like a real multi-hospital study: hospitals of unequal sizes
(``per_site`` a list, e.g. from `cohort_sizes`), several images per patient (the same
anatomy and finding acquired again with its own noise, ``images_per_patient``), and
hospitals grouped into federation nodes (``nodes``: a ``node`` column).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

import harmonize
from harmonize.synth.acquisition import default_sites, render
from harmonize.synth.phantom import MODALITIES, make_phantom

LABELS = ("normal", "finding")
MANIFEST_COLUMNS = (
    "path", "site", "label", "patient_id", "mask", "finding_mask", "reference_path",
)
PREVALENCE_RANGE = (0.2, 0.5)
# Purposes of the independent random streams: np.random.default_rng([seed, purpose, ...]).
_SITES, _LABELS, _PHANTOM, _SITE_NOISE, _REF_NOISE, _COHORT = range(6)


def site_names(n: int) -> list[str]:
    """``site_a, site_b, ..., site_z, site_aa, ...``."""
    names = []
    for k in range(n):
        letters = ""
        k += 1
        while k:
            k, r = divmod(k - 1, 26)
            letters = chr(ord("a") + r) + letters
        names.append(f"site_{letters}")
    return names


def generate(
    out: str | Path,
    sites: int = 4,
    per_site: int = 50,
    size: int = 256,
    modality: str = "xray",
    seed: int = 0,
    no_shift: bool = False,
    reference_site: str | None = None,
    progress: bool = True,
    prevalence: list[float] | float | None = None,
    finding_scale: float = 1.0,
    images_per_patient: int | tuple[int, int] = 1,
    nodes: int | None = None,
) -> dict[str, Any]:
    """Write the synthetic multi-site benchmark to ``out`` and return its synth.json summary.

    ``sites`` sites of ``per_site`` patients each (or a list: one count per site),
    ``size`` x ``size`` pixels, ``modality``
    "xray" (chest, nodule) or "bonescan" (whole body, metastases). Each site has its own
    acquisition style and label prevalence (drawn in 0.2-0.5); ``no_shift`` gives every
    site the reference style (negative control). ``reference_site`` defaults to ``site_a``,
    whose style is the clean 16-bit one. ``prevalence`` (one fraction per site) sets each
    site's share of positives instead, e.g. [0.5, 0.8, 0.2, 0.5] for a strong site-label
    shortcut; one number gives every site that share. ``finding_scale`` enlarges the
    finding (radius factor), so that classifiers trained at low resolution on a CPU budget
    can see it. ``images_per_patient`` (a count, or (lo, hi) drawn per patient) acquires
    each patient several times; ``nodes`` groups the sites, in order, into that many
    federation nodes of near-equal numbers of sites (column ``node``: node_1, node_2, ...).
    """
    modality = {"bone_scan": "bonescan", "bone": "bonescan", "x-ray": "xray"}.get(
        modality, modality
    )
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    counts = [per_site] * sites if isinstance(per_site, int) else [int(c) for c in per_site]
    if sites < 1 or len(counts) != sites or min(counts) < 1:
        raise ValueError(f"need sites >= 1 and per_site >= 1 (one count, or one per site), "
                         f"got {sites} and {per_site}")
    lo, hi = ((images_per_patient, images_per_patient) if isinstance(images_per_patient, int)
              else tuple(int(v) for v in images_per_patient))
    if not 1 <= lo <= hi:
        raise ValueError(f"images_per_patient {images_per_patient}: give a count >= 1 or "
                         "(lo, hi) with 1 <= lo <= hi")
    if nodes is not None and not 1 <= nodes <= sites:
        raise ValueError(f"nodes {nodes}: between 1 and the number of sites ({sites})")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    names = site_names(sites)
    reference_site = reference_site or names[0]
    if reference_site not in names:
        raise ValueError(f"reference_site {reference_site!r} is not one of {', '.join(names)}")
    ref_idx = names.index(reference_site)

    acqs = default_sites(sites, modality, np.random.default_rng([seed, _SITES]))
    if no_shift:
        acqs = [acqs[ref_idx]] * sites
    ref_acq = acqs[ref_idx]
    if isinstance(prevalence, (int, float)):
        prevalence = [float(prevalence)] * sites
    if prevalence is not None and (len(prevalence) != sites
                                   or not all(0.0 <= p <= 1.0 for p in prevalence)):
        raise ValueError(f"prevalence {prevalence}: give one fraction in [0, 1] per site "
                         f"({sites} sites), or one for all")
    labels = _draw_labels(counts, seed, prevalence)
    node_of = node_groups(names, nodes) if nodes is not None else {}

    out = Path(out)
    rows = []
    repeats = [[1 if hi == 1 else int(np.random.default_rng([seed, _COHORT, k, i])
                                      .integers(lo, hi + 1)) for i in range(counts[k])]
               for k in range(sites)]
    bar = tqdm(total=sum(map(sum, repeats)), desc=f"synth {modality}", unit="img",
               disable=not progress)
    for k, (site, acq) in enumerate(zip(names, acqs, strict=True)):
        for i, positive in enumerate(labels[k]):
            phantom = make_phantom(modality, size, bool(positive),
                                   np.random.default_rng([seed, _PHANTOM, k, i]), finding_scale)
            patient_id = f"{site}_{i:04d}"
            for j in range(repeats[k][i]):
                # image j of the patient: the same anatomy acquired again (j = 0 keeps the
                # streams of a one-image-per-patient benchmark)
                stream = [k, i] if j == 0 else [k, i, j]
                ref_rng = np.random.default_rng([seed, _REF_NOISE, *stream])
                reference = render(phantom.ideal, phantom.finding, ref_acq, ref_rng)
                if k == ref_idx:
                    image = reference
                else:
                    site_rng = np.random.default_rng([seed, _SITE_NOISE, *stream])
                    image = render(phantom.ideal, phantom.finding, acq, site_rng)
                name = patient_id if repeats[k][i] == 1 else f"{patient_id}_{j + 1}"
                rel = f"{site}/{LABELS[int(positive)]}/{name}.png"
                row = {
                    "path": rel, "site": site, "label": LABELS[int(positive)],
                    "patient_id": patient_id, "mask": f"masks/{rel}",
                    "finding_mask": f"findings/{rel}", "reference_path": f"reference/{rel}",
                }
                if node_of:
                    row["node"] = node_of[site]
                write_png(out / row["path"], image)
                write_png(out / row["reference_path"], reference)
                write_png(out / row["mask"], phantom.roi.astype(np.uint8) * 255)
                write_png(out / row["finding_mask"], phantom.finding.astype(np.uint8) * 255)
                rows.append(row)
                bar.update()
    bar.close()

    buffer = io.StringIO()
    columns = MANIFEST_COLUMNS + (("node",) if node_of else ())
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _remove_stale(out, rows)
    _write_atomic(out / "manifest.csv", buffer.getvalue().encode())

    summary = {
        "modality": modality,
        "size": size,
        "seed": seed,
        "no_shift": no_shift,
        "sites": names,
        "reference_site": reference_site,
        "per_site": per_site if isinstance(per_site, int) else counts,
        "images_per_patient": [lo, hi],
        "n_patients": sum(counts),
        "nodes": {n: [s for s in names if node_of[s] == n]
                  for n in dict.fromkeys(node_of.values())} if node_of else None,
        "acquisition": {name: acq.to_dict() for name, acq in zip(names, acqs, strict=True)},
        "finding_scale": finding_scale,
        "prevalence": {name: float(np.mean(lab)) if len(lab) else 0.0
                       for name, lab in zip(names, labels, strict=True)},
        "n_images": len(rows),
        "labels": list(LABELS),
        "reference_noise": "independent seeded draw per image; identical to the image "
                           "for the reference site",
        "version": harmonize.__version__,
    }
    _write_atomic(out / "synth.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def _draw_labels(counts: list[int], seed: int,
                 prevalence: list[float] | None = None) -> list[np.ndarray]:
    """Per-site labels (of patients) with a site-specific prevalence, as in pooled real data.

    Exactly ``round(p * count)`` positives per site, shuffled, so the prevalence in
    synth.json is the realized one.
    """
    rng = np.random.default_rng([seed, _LABELS])
    drawn = rng.uniform(*PREVALENCE_RANGE, len(counts))
    labels = []
    for count, p in zip(counts, drawn if prevalence is None else prevalence, strict=True):
        lab = np.zeros(count, dtype=bool)
        lab[: int(round(p * count))] = True
        labels.append(rng.permutation(lab))
    return labels


def cohort_sizes(sites: int, mean_patients: float, spread: float = 0.6, seed: int = 0,
                 minimum: int = 3) -> list[int]:
    """Patients per hospital, unequal as in a real cohort: log-normal around
    `mean_patients` with log-sd `spread` (0.6: the largest hospitals about 5x the
    smallest in 72), at least `minimum`; the same seed, the same sizes."""
    rng = np.random.default_rng([seed, _COHORT])
    sizes = mean_patients * np.exp(spread * rng.standard_normal(sites) - spread**2 / 2)
    return [max(minimum, int(round(s))) for s in sizes]


def node_groups(sites: list[str], nodes: int) -> dict[str, str]:
    """The sites, in order, split into `nodes` contiguous groups of near-equal size."""
    bounds = np.linspace(0, len(sites), nodes + 1).round().astype(int)
    return {s: f"node_{n + 1}" for n in range(nodes)
            for s in sites[bounds[n]:bounds[n + 1]]}


def _remove_stale(out: Path, rows: list[dict[str, str]]) -> None:
    """Delete files a previous run into ``out`` listed but this run did not write.

    Rerunning with other arguments must not leave images in ``<site>/<label>/`` folders
    that folder-based readers would pick up. Only files named in the old manifest go.
    """
    old = out / "manifest.csv"
    if not old.is_file():
        return
    keep = {row[col] for row in rows for col in MANIFEST_COLUMNS[4:] + ("path",)}
    with old.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for col in ("path", "mask", "finding_mask", "reference_path"):
                rel = row.get(col)
                if rel and rel not in keep and ".." not in Path(rel).parts:
                    (out / rel).unlink(missing_ok=True)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8/uint16 grayscale PNG atomically (temp file in the same folder, then rename)."""
    if array.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"PNG needs uint8 or uint16 data, got {array.dtype} for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write bytes atomically so a crash never leaves a half-written manifest or summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
