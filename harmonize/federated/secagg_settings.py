"""The settings of a SecAgg+ run, fixed before it starts (`prepare.plan_run`): how many
neighbours share keys, the reconstruction threshold, the clipping and quantization
ranges and the largest weight; and the error bound they imply. Why these defaults:
`secure_aggregation.py`'s docstring (weighting, quantization error)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from harmonize.configs import ConfigError
from harmonize.federated.config import FederatedConfig
from harmonize.federated.nodes import split_rows

MODULUS = 2**32  # Flower's largest modulus_range: the masks' (and the sums') range


@dataclass(frozen=True)
class SecAggParams:
    """SecAgg+ settings; None: chosen from the number of nodes n and the task.

    num_shares: neighbours each node secret-shares its keys with (itself included);
      default every node (full SecAgg; SecAgg+'s sparse graph pays off for many nodes).
    reconstruction_threshold: shares needed to rebuild a key; default a majority,
      n // 2 + 1, so the server cannot get both a node's mask seed and its key shares.
    clipping_range: C, the bound of (weight / max_weight) * update; default 8 for the
      classifier and the diffusion prior (their per-round changes are far smaller), 128 x
      local_steps for CycleGAN (its nodes send sums of raw gradients, ~5-15 per step).
    quantization_range: Q levels over [-C, C]; default the largest power of two with
      n * Q below the 2**32 modulus, at most 2**30 (Flower rounds into int32).
    max_weight: M; default the largest num-examples a node reports (module docstring).
    timeout: seconds the server waits for each stage's replies (None: no limit).
    """

    num_shares: int | float | None = None
    reconstruction_threshold: int | float | None = None
    clipping_range: float | None = None
    quantization_range: int | None = None
    max_weight: float | None = None
    timeout: float | None = None


def protocol_settings(params: SecAggParams, n_nodes: int,
                      cfg: FederatedConfig | None = None,
                      manifest: pd.DataFrame | None = None) -> dict:
    """The values the SecAggPlusWorkflow gets for `n_nodes` nodes (checked); `manifest`:
    the run's, where the server has it (for max_weight)."""
    if n_nodes < 2:
        raise ConfigError("SecAgg+ needs at least 2 nodes (with one the sum is its update)")
    q = params.quantization_range or default_quantization_range(n_nodes)
    if n_nodes * q >= MODULUS or q > 2**30:
        raise ConfigError(f"SecAgg+: quantization_range {q} with {n_nodes} nodes: n x Q "
                          "must stay below the 2**32 modulus (else the sum wraps) and Q at "
                          "most 2**30; lower quantization_range")
    shares, threshold = params.num_shares, params.reconstruction_threshold
    if shares is None:
        shares = n_nodes if n_nodes > 2 else 1.0  # Flower: an int must exceed 2
    if threshold is None:
        threshold = n_nodes // 2 + 1 if n_nodes > 2 else 1.0  # 2 of 2
    clipping = params.clipping_range
    if clipping is None:
        clipping = default_clipping_range(cfg)
    max_weight = params.max_weight
    if max_weight is None:
        max_weight = default_max_weight(cfg, manifest) if cfg is not None else 1000.0
    return {"num_shares": shares, "reconstruction_threshold": threshold,
            "clipping_range": float(clipping), "quantization_range": int(q),
            "max_weight": float(max_weight), "modulus_range": MODULUS,
            "timeout": params.timeout}


def default_quantization_range(n_nodes: int) -> int:
    return min(2**30, 1 << ((MODULUS - 1) // n_nodes).bit_length() - 1)


def default_clipping_range(cfg: FederatedConfig | None) -> float:
    if cfg is not None and cfg.task == "cyclegan":
        return 128.0 * cfg.cyclegan.local_steps
    return 8.0


def default_max_weight(cfg: FederatedConfig, manifest: pd.DataFrame | None = None) -> float:
    """The largest num-examples a node of this task reports: the precision of SecAgg+'s
    weighted sum scales with max_weight / the nodes' weights (module docstring)."""
    if cfg.task == "cyclegan":
        return 1.0  # every node reports 1 (each node's share is in its loss)
    if cfg.task == "diffusion":
        return float(cfg.diffusion.local_steps)  # every node reports its steps
    if manifest is not None:
        train, _ = split_rows(manifest)
        return float(train.groupby(train["node"].astype(str)).size().max())
    return 1000.0  # Flower's default, when the server has no manifest


def quantization_error_bound(weights: list[float], *, clipping_range: float,
                             quantization_range: int, max_weight: float,
                             max_update: float, max_value: float = 0.0) -> float:
    """Largest per-element |SecAgg+ model - exact weighted FedAvg mean| for nodes of these
    weights (num-examples) whose updates are at most `max_update` in magnitude (and the
    weights at most `max_value`): stochastic rounding (< one step 2C/Q per node), the
    weights' rounding to multiples of 1/Q, and the float32 rounding of the result (the
    updates are sent in float64)."""
    n, q = len(weights), quantization_range
    total = sum(w / max_weight for w in weights) - n * 0.5 / q
    rounding = n * (2 * clipping_range / q) / total
    weight_rounding = n * (0.5 / q) * 2 * max_update / total
    return rounding + weight_rounding + 2.0**-23 * max_value
