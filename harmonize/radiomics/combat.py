"""ComBat (Johnson et al. 2007; Fortin et al. 2018): statistical harmonization of
features, not images. The report shows it as a baseline row: what removing per-site
location and scale of each feature alone achieves.

Model per feature f, image i of site s: y = alpha + X beta + gamma_s + delta_s * eps.
Site effects gamma/delta are shrunk towards their across-feature prior by parametric
empirical Bayes, then removed; covariates X (e.g. the label) are kept, which matters
when label prevalence differs by site. fit/transform as in scikit-learn.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


class ComBat:
    def __init__(self, empirical_bayes: bool = True, max_iter: int = 100, tol: float = 1e-4):
        self.empirical_bayes = empirical_bayes
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, x: np.ndarray, sites: np.ndarray, covariates: np.ndarray | None = None):
        x = np.asarray(x, dtype=float)
        sites = np.asarray(sites)
        self.sites_ = np.unique(sites)
        design = self._design(sites, covariates)
        n_sites = len(self.sites_)
        beta, *_ = np.linalg.lstsq(design, x, rcond=None)
        counts = np.array([(sites == s).sum() for s in self.sites_])
        self.grand_mean_ = (counts / counts.sum()) @ beta[:n_sites]
        self.beta_cov_ = beta[n_sites:]
        resid = x - design @ beta
        self.pooled_sd_ = np.sqrt((resid**2).mean(axis=0))
        self.pooled_sd_[self.pooled_sd_ < 1e-12] = 1.0
        z = (x - self._expected(sites, covariates)) / self.pooled_sd_
        gamma = np.stack([z[sites == s].mean(axis=0) for s in self.sites_])
        delta2 = np.stack([z[sites == s].var(axis=0, ddof=1) for s in self.sites_])
        delta2 = np.maximum(delta2, 1e-8)
        if self.empirical_bayes:
            gamma, delta2 = self._shrink(z, sites, gamma, delta2)
        self.gamma_, self.delta2_ = gamma, delta2
        return self

    def transform(self, x: np.ndarray, sites: np.ndarray,
                  covariates: np.ndarray | None = None) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        sites = np.asarray(sites)
        unknown = set(np.unique(sites)) - set(self.sites_)
        if unknown:
            raise ValueError(f"ComBat was not fitted on site(s) {sorted(unknown)}")
        z = (x - self._expected(sites, covariates)) / self.pooled_sd_
        out = np.empty_like(z)
        for i, s in enumerate(self.sites_):
            m = sites == s
            out[m] = (z[m] - self.gamma_[i]) / np.sqrt(self.delta2_[i])
        return out * self.pooled_sd_ + self._expected(sites, covariates)

    def fit_transform(self, x, sites, covariates=None) -> np.ndarray:
        return self.fit(x, sites, covariates).transform(x, sites, covariates)

    def _design(self, sites: np.ndarray, covariates: np.ndarray | None) -> np.ndarray:
        onehot = (sites[:, None] == self.sites_[None, :]).astype(float)
        if covariates is None:
            return onehot
        return np.hstack([onehot, np.asarray(covariates, dtype=float).reshape(len(sites), -1)])

    def _expected(self, sites: np.ndarray, covariates: np.ndarray | None) -> np.ndarray:
        """Grand mean plus covariate effects: what a site-free image would show."""
        exp = np.tile(self.grand_mean_, (len(sites), 1))
        if covariates is not None and self.beta_cov_.size:
            exp = exp + np.asarray(covariates, float).reshape(len(sites), -1) @ self.beta_cov_
        return exp

    def _shrink(self, z, sites, gamma_hat, delta2_hat):
        """Parametric empirical Bayes: normal prior on gamma, inverse-gamma on delta^2."""
        gamma_bar = gamma_hat.mean(axis=1, keepdims=True)
        tau2 = gamma_hat.var(axis=1, ddof=1, keepdims=True)
        mean_d = delta2_hat.mean(axis=1, keepdims=True)
        var_d = delta2_hat.var(axis=1, ddof=1, keepdims=True) + 1e-12
        a = (2 * var_d + mean_d**2) / var_d
        b = (mean_d * var_d + mean_d**3) / var_d
        gamma, delta2 = gamma_hat.copy(), delta2_hat.copy()
        for i, s in enumerate(self.sites_):
            zs = z[sites == s]
            n = len(zs)
            g_old, d_old = gamma_hat[i], delta2_hat[i]
            for _ in range(self.max_iter):
                g_new = (n * tau2[i] * gamma_hat[i] + d_old * gamma_bar[i]) / (n * tau2[i] + d_old)
                ss = ((zs - g_new) ** 2).sum(axis=0)
                d_new = (b[i] + 0.5 * ss) / (n / 2 + a[i] - 1)
                done = max(np.abs(g_new - g_old).max(), np.abs(d_new - d_old).max()) < self.tol
                g_old, d_old = g_new, d_new
                if done:
                    break
            gamma[i], delta2[i] = g_old, d_old
        return gamma, delta2


def label_covariates(df: pd.DataFrame, label_col: str | None = "label",
                     levels: list[str] | None = None) -> np.ndarray | None:
    """One-hot label columns (first level dropped), or None when unlabelled."""
    if not label_col or label_col not in df:
        return None
    labels = df[label_col].astype(str)
    levels = levels or sorted(labels.unique())
    if len(levels) < 2 or (labels == "").any():
        return None
    return np.stack([(labels == lv).to_numpy(float) for lv in levels[1:]], axis=1)


def combat_features(df: pd.DataFrame, feature_cols: list[str], site_col: str = "site",
                    label_col: str | None = "label") -> pd.DataFrame:
    """A copy of df with ComBat-harmonized features (label kept as covariate if any)."""
    out = df.copy()
    x = np.nan_to_num(df[feature_cols].to_numpy(float))
    out[feature_cols] = ComBat().fit_transform(x, df[site_col].to_numpy(),
                                               label_covariates(df, label_col))
    return out


def combat_fold_transform(feature_cols: list[str], site_col: str = "site",
                          label_col: str | None = "label"):
    """For cross-validation: fit ComBat on the training rows, apply it to the test rows."""

    def transform(train: pd.DataFrame, test: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        levels = sorted(pd.concat([train, test])[label_col].astype(str).unique()) \
            if label_col and label_col in train else None
        model = ComBat().fit(np.nan_to_num(train[feature_cols].to_numpy(float)),
                             train[site_col].to_numpy(),
                             label_covariates(train, label_col, levels))
        return tuple(model.transform(np.nan_to_num(d[feature_cols].to_numpy(float)),
                                     d[site_col].to_numpy(),
                                     label_covariates(d, label_col, levels))
                     for d in (train, test))

    return transform
