"""Patient-level DP for the federated texture release (`privacy.mode: patient-dp`).

The plain release (`TextureMatching.fit_reference`) holds about 1,400 numbers, and part of
it pools pixels over all images (the noise model's std per level), which bounds no single
patient's influence. Gaussian noise on a sum grows with the square root of its
dimension, so the private release is compact and made only of means of per-patient
vectors, each in a public box:

- ``QUANTILES`` ROI quantiles, in [0, 1];
- the ROI's log ring spectrum in ``BANDS`` bands (single rings where the spectrum falls
  steeply, up to 8 rings at the top: ``BAND_EDGES``), clipped to
  [``LOG_LO``, ``LOG_HI``] and scaled to [0, 1]; the fine band's spectrum likewise;
- the fine band's robust std at ``N_LEVELS`` levels, each level a quantile of the
  image's own blurred ROI intensities (so every image has pixels at every level), and
  those levels: std clipped to [0, ``STD_MAX``] and scaled, levels in [0, 1];
- a ``TEMPLATE`` x ``TEMPLATE`` polarity thumbnail, in [0, 1].

A patient's vector is the mean over the patient's images. Each of the six blocks is
scaled to the same largest norm, sqrt(``QUANTILES``), so a patient's vector lies in a
box of L2 diameter sqrt(6 ``QUANTILES``) (about 9.8): replacing one patient moves the sum
over patients by at most that. One Gaussian release of the sum follows, calibrated by
Opacus' accountant for one release without subsampling (as the histogram task,
`harmonize.federated.histogram_task`); the patient count is public. Sorting, clipping
and interpolating back to rings and ``n_quantiles`` landmarks are post-processing.

The reference images are not put upright before they are measured: their orientation
defines upright, and a patient's vector must not depend on the other patients' images
(the template would make it). The reference node then fits its own site at home, like
every other node, against the released targets.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from harmonize.data import polarity as pol
from harmonize.data.texture import N_BINS, NoiseModel, radial_log_power, robust_std
from harmonize.federated import patient_dp
from harmonize.radiomics.masks import ROIError
from harmonize.translators.texture import TextureMatching

QUANTILES = 16
BAND_EDGES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, N_BINS)  # rings, narrow where steep
BANDS = len(BAND_EDGES) - 1
N_LEVELS = 16
TEMPLATE = 8
LOG_LO, LOG_HI = -24.0, 6.0  # log power per ring: the box every image's is clipped to
STD_MAX = 0.05  # fine-band std, model space (about 0.006 in the synthetic reference)
BLOCKS = (("quantiles", QUANTILES), ("log_power", BANDS), ("noise_log_power", BANDS),
          ("noise_levels", N_LEVELS), ("noise_std", N_LEVELS),
          ("template", TEMPLATE * TEMPLATE))
DIAMETER = float(np.sqrt(len(BLOCKS) * QUANTILES))


def _scale(size: int) -> float:
    """Each block's weight: its largest norm becomes sqrt(QUANTILES)."""
    return float(np.sqrt(QUANTILES / size))


def _bands(log_power: np.ndarray) -> np.ndarray:
    means = [log_power[a:b].mean() for a, b in zip(BAND_EDGES[:-1], BAND_EDGES[1:],
                                                     strict=True)]
    return np.clip(means, LOG_LO, LOG_HI)


def _rings(bands: np.ndarray) -> np.ndarray:
    centers = [(a + b - 1) / 2 for a, b in zip(BAND_EDGES[:-1], BAND_EDGES[1:], strict=True)]
    return np.interp(np.arange(N_BINS), centers, bands)


def image_vector(model: TextureMatching, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """One reference image's bounded vector (unscaled blocks, each in [0, 1])."""
    y, region = model._prepared(x, mask, upright=False)
    levels = (np.arange(N_LEVELS) + 0.5) / N_LEVELS
    noise = NoiseModel(model.noise_sigma)
    coarse_band, fine_band = noise.split(y)
    coarse, fine = coarse_band[region], fine_band[region]
    edges = np.quantile(coarse, np.linspace(0.0, 1.0, N_LEVELS + 1))
    which = np.clip(np.searchsorted(edges, coarse, side="right") - 1, 0, N_LEVELS - 1)
    stds = [robust_std(fine[which == k]) for k in range(N_LEVELS)]
    blocks = {
        "quantiles": np.quantile(y[region], np.linspace(0.0, 1.0, QUANTILES)),
        "log_power": (_bands(radial_log_power(y, region)) - LOG_LO) / (LOG_HI - LOG_LO),
        "noise_log_power": (_bands(radial_log_power(fine_band, region)) - LOG_LO)
        / (LOG_HI - LOG_LO),
        "noise_levels": np.quantile(coarse, levels),
        "noise_std": np.asarray(stds) / STD_MAX,
        "template": pol.thumbnail(x, TEMPLATE).ravel(),
    }
    return np.concatenate([np.clip(blocks[name], 0.0, 1.0) for name, _ in BLOCKS])


def patient_vectors(model: TextureMatching, images: list[tuple], patient_of_row: np.ndarray
                    ) -> np.ndarray:
    """(patients, dimension): each patient's mean image vector, blocks scaled (norm of
    each block at most sqrt(QUANTILES)). An image without a usable ROI (an empty mask, a
    constant image) is left out with a warning; a patient left with none is dropped (the
    count of patients with a usable image is the public one)."""
    weights = np.concatenate([np.full(size, _scale(size)) for _, size in BLOCKS])
    vectors, owners = [], []
    for k, (x, _, mask) in enumerate(images):
        try:
            vectors.append(image_vector(model, x, mask) * weights)
            owners.append(patient_of_row[k])
        except ROIError as err:
            warnings.warn(f"reference image {k} left out of the private release: {err}",
                          stacklevel=2)
    if not vectors:
        raise ValueError("no reference image has a usable ROI: nothing to release")
    owners = np.asarray(owners)
    sums = np.zeros((int(patient_of_row.max()) + 1, len(weights)))
    np.add.at(sums, owners, np.stack(vectors))
    counts = np.bincount(owners, minlength=len(sums))
    return sums[counts > 0] / counts[counts > 0, None]


def private_release(model: TextureMatching, images: list[tuple], rows: pd.DataFrame,
                    plan) -> TextureMatching:
    """`model` holding the reference targets from one Gaussian release of the patients'
    vectors (`plan`: `patient_dp.plan_patient_dp` with max_grad_norm = DIAMETER)."""
    patient_of_row, _ = patient_dp.patient_index(rows)
    per_patient = patient_vectors(model, images, patient_of_row)
    mean = patient_dp.gaussian_release(per_patient.sum(0), plan) / len(per_patient)
    parts, start = {}, 0
    for name, size in BLOCKS:
        parts[name] = mean[start:start + size] / _scale(size)
        start += size
    spectrum = lambda v: _rings(LOG_LO + np.clip(v, 0, 1) * (LOG_HI - LOG_LO))  # noqa: E731
    model.template_ = np.clip(parts["template"], 0, 1).reshape(TEMPLATE, TEMPLATE)
    model.target_quantiles_ = np.interp(model.levels, np.linspace(0.0, 1.0, QUANTILES),
                                        np.sort(np.clip(parts["quantiles"], 0, 1)))
    model.target_log_power_ = spectrum(parts["log_power"])
    model.site_quantiles_, model.log_power_, model.final_quantiles_ = {}, {}, {}
    noise = NoiseModel(model.noise_sigma)
    levels = np.sort(np.clip(parts["noise_levels"], 0, 1))
    noise.load_state({  # levels strictly increasing, for interpolation
        "log_power": spectrum(parts["noise_log_power"]),
        "levels": levels + 1e-9 * np.arange(N_LEVELS),
        "std": np.clip(parts["noise_std"], 0, 1) * STD_MAX})
    model.noise_model_ = noise
    return model
