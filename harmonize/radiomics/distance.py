"""Distribution distance between each site and the reference, in radiomics space.

Features are z-scored with the pooled mean and standard deviation of all images in the
analysis (so each feature counts equally; the reference's own spread would blow up
features that are nearly constant there), or with a given scale, so that a harmonized
copy is measured in the original's units, then:

- Frechet radiomics distance (FRD): the Frechet distance between Gaussians fitted to the
  two feature clouds, ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), as FID but on
  radiomics features (Osuala et al., frd-score). Covariances get a small ridge so the
  matrix square root stays defined with fewer images than features.
- MMD^2 with a Gaussian kernel (unbiased estimator, bandwidth by the median heuristic on
  the pooled sample): no Gaussian assumption.

Both come with bootstrap 95% CIs (images resampled within each site). Resampling with
replacement inflates both distances (duplicated images shrink covariances and add
kernel self-similarity), so the percentile interval is shifted back by the bootstrap's
own bias estimate (mean of the resamples minus the estimate). FRD is also biased upwards
in small samples: compare FRDs computed on similar numbers of images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def pooled_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per feature (1 where a feature is constant)."""
    sd = x.std(axis=0)
    sd[sd < 1e-12] = 1.0
    return x.mean(axis=0), sd


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray, ridge: float = 1e-6) -> float:
    """Tr((S_a S_b)^1/2) via the symmetric form S_a^1/2 S_b S_a^1/2, whose eigenvalues
    are those of S_a S_b: two eigendecompositions instead of a general matrix square
    root (which is slow and unstable on the near-singular covariances of small sites)."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    eye = np.eye(a.shape[1]) * ridge
    cov_a = np.atleast_2d(np.cov(a, rowvar=False)) + eye
    cov_b = np.atleast_2d(np.cov(b, rowvar=False)) + eye
    root_a = _psd_sqrt(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0.0, None)).sum()
    d = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
    return max(d, 0.0)


def mmd2(a: np.ndarray, b: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 with a Gaussian kernel."""
    pooled = np.vstack([a, b])
    sq = (pooled**2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * pooled @ pooled.T, 0.0)
    if bandwidth is None:
        off = d2[np.triu_indices_from(d2, k=1)]
        bandwidth = float(np.sqrt(np.median(off) / 2)) if off.size else 1.0
        bandwidth = bandwidth or 1.0
    k = np.exp(-d2 / (2 * bandwidth**2))
    n, m = len(a), len(b)
    kaa, kbb, kab = k[:n, :n], k[n:, n:], k[:n, n:]
    term_a = (kaa.sum() - np.trace(kaa)) / (n * (n - 1))
    term_b = (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
    return float(term_a + term_b - 2 * kab.mean())


def site_distances(df: pd.DataFrame, feature_cols: list[str], reference_site: str,
                   site_col: str = "site", n_boot: int = 200, seed: int = 0,
                   scale: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
    """FRD and MMD^2 of every site to the reference, with bootstrap 95% CIs."""
    rng = np.random.default_rng(seed)
    x = np.nan_to_num(df[feature_cols].to_numpy(float))
    mu, sd = scale if scale is not None else pooled_scale(x)
    z = (x - mu) / sd
    site = df[site_col].to_numpy()
    ref = z[site == reference_site]
    rows = []
    for name in sorted(set(site) - {reference_site}):
        other = z[site == name]
        row = {"site": name, "reference": reference_site, "n": len(other)}
        for metric, fn in (("frd", frechet_distance), ("mmd2", mmd2)):
            boots = [fn(ref[rng.integers(0, len(ref), len(ref))],
                        other[rng.integers(0, len(other), len(other))]) for _ in range(n_boot)]
            estimate = fn(ref, other)
            bias = float(np.mean(boots)) - estimate
            lo, hi = np.quantile(boots, [0.025, 0.975]) - bias
            row.update({metric: estimate, f"{metric}_lo": float(lo), f"{metric}_hi": float(hi)})
        rows.append(row)
    return pd.DataFrame(rows)
