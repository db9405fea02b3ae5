"""Privacy accounting for DP-FedAvg with the Gaussian mechanism.

Each round releases sum_k clip(update_k) + N(0, (z C)^2) over the k sampled nodes (Flower's
fixed-clipping DP wrappers divide by k afterwards, which changes nothing). One node's
whole contribution changes the sum by at most C, so this is node-level DP with noise
multiplier z. When every node takes part in every round (the default) there is no
amplification by subsampling: the Renyi DP of R rounds is
eps_RDP(alpha) = R * alpha / (2 z^2) (Mironov 2017), converted to (eps, delta)-DP with
the bound of Balle et al. 2020 that opacus' RDP accountant uses,
eps = min_alpha eps_RDP - (log delta + log alpha) / (alpha - 1) + log((alpha - 1) / alpha),
over opacus' orders (z = 1, 20 rounds, delta = 1e-5: 30.13 as opacus and Flower's
dp-accounting give; a test pins it).

With `sample_nodes` (k of n nodes per round, classifier only) the rounds are accounted
as the sampled Gaussian mechanism at rate q = k / n (`subsampled_gaussian_epsilon`,
opacus' RDP accountant). That analysis assumes Poisson sampling; Flower draws exactly k
nodes, for which the amplification bound is of the same order but not identical (Wang,
Balle & Kasiviswanathan 2019), so read the number as the standard approximation.
"""

from __future__ import annotations

import numpy as np

ORDERS = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """(eps, delta) of `rounds` releases of the Gaussian mechanism, no subsampling."""
    if noise_multiplier <= 0:
        return float("inf")
    if rounds <= 0:
        return 0.0
    rdp = rounds * ORDERS / (2.0 * noise_multiplier**2)
    eps = (rdp - (np.log(delta) + np.log(ORDERS)) / (ORDERS - 1.0)
           + np.log((ORDERS - 1.0) / ORDERS))
    return float(eps.min())


def noise_for_epsilon(epsilon: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier (bisection) that keeps `rounds` rounds within epsilon."""
    lo, hi = 1e-3, 1e4
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        if gaussian_epsilon(mid, rounds, delta) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def subsampled_gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float,
                                rate: float) -> float:
    """(eps, delta) of `rounds` Gaussian releases, each over a random `rate` share of the
    nodes (see the module docstring for the sampling assumption)."""
    from harmonize.federated.patient_dp import accountant_epsilon

    if noise_multiplier <= 0:
        return float("inf")
    return accountant_epsilon(noise_multiplier, rate, rounds, delta)
