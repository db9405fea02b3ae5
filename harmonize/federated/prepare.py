"""What every simulated run does before it starts (plain or SecAgg+): absolute paths
and site lists, a patient split for the nodes' evaluation, and the run's plan (nodes,
patient-dp plans, SecAgg+ settings), worked out once and handed to the apps; a design
that cannot run (a DP target that cannot be met, SecAgg+ settings that would wrap) is
refused here, before any node trains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harmonize.configs import ConfigError
from harmonize.data.manifest import load_manifest, save_manifest
from harmonize.data.splits import patient_split
from harmonize.federated import patient_dp
from harmonize.federated.config import FederatedConfig
from harmonize.federated.nodes import (
    fill_site_lists,
    node_names,
    node_rows,
    read_manifest,
    split_rows,
)
from harmonize.federated.secagg_settings import SecAggParams, protocol_settings
from harmonize.federated.task_interface import FederatedTask
from harmonize.federated.tasks import build_task


def with_split(manifest: Path, out: Path, seed: int) -> Path:
    """Each node scores the global model on held-out patients: when the manifest has no
    split column, add a patient-grouped 25% test split per node (OUT/manifest.csv)."""
    df = load_manifest(manifest)
    if "split" in df.columns:
        return manifest
    parts = [patient_split(g, test_size=0.25, seed=seed) for _, g in df.groupby("node")]
    path = out / "manifest.csv"
    save_manifest(pd.concat(parts).sort_index(), path)
    return path


def resolved_config(cfg: FederatedConfig) -> FederatedConfig:
    """Absolute paths (nodes run elsewhere) and the diffusion class labels, in place."""
    cfg.check_ready()
    cfg.manifest = Path(cfg.manifest).resolve()
    cfg.out = Path(cfg.out).resolve()
    if cfg.task == "cyclegan":
        cfg.cyclegan.config = Path(cfg.cyclegan.config).resolve()
    if cfg.task == "diffusion":
        cfg.diffusion.config = Path(cfg.diffusion.config).resolve()
    return fill_site_lists(cfg)


@dataclass(frozen=True)
class RunPlan:
    """The run as its config and manifest imply it, made once before anything starts and
    handed to the server app: the nodes (none listed where the server has no manifest,
    as in a deployment: then `min_nodes` counts them), the task (built once), each
    node's patient-dp plan (what summary.json reports) and the SecAgg+ settings."""

    nodes: list[str]
    n_nodes: int
    task: FederatedTask
    patient_dp: dict | None = None
    secagg: dict | None = None


def plan_run(cfg: FederatedConfig, secagg=None) -> RunPlan:
    """Read the manifest (if the server has it), build the task, plan patient-dp at
    every node and fix the SecAgg+ settings (`secagg`: its SecAggParams, None for
    automatic); raises ConfigError where the design cannot run."""
    manifest = (read_manifest(cfg.manifest) if cfg.manifest is not None
                and Path(cfg.manifest).is_file() else None)
    nodes = node_names(cfg.manifest) if manifest is not None else []
    n_nodes = cfg.min_nodes or len(nodes)
    if n_nodes == 0:
        raise ConfigError("the server has no manifest to count the nodes in; give "
                          "min-nodes (the number of SuperNodes taking part)")
    task = build_task(cfg)
    plans = None
    if cfg.privacy.mode == "patient-dp" and manifest is not None:
        plans = patient_dp.node_plans(
            task, {n: split_rows(node_rows(cfg.manifest, n))[0] for n in nodes},
            progress=cfg.progress)
    protocol = None
    if cfg.privacy.secagg:
        protocol = protocol_settings(secagg or SecAggParams(), n_nodes, cfg, manifest)
    return RunPlan(nodes, n_nodes, task, plans, protocol)
