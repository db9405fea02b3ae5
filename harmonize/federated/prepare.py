"""What every simulated run does before it starts (plain or SecAgg+): absolute paths
and site lists, a patient split for the nodes' evaluation, and patient-dp's plans (a
target that cannot be met is refused here, before any node trains)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harmonize.data.manifest import load_manifest, save_manifest
from harmonize.data.splits import patient_split
from harmonize.federated.config import FederatedConfig
from harmonize.federated.nodes import fill_site_lists, node_names, node_rows, split_rows
from harmonize.federated.patient_dp import patient_index


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


def patient_dp_plans(cfg: FederatedConfig) -> dict:
    """patient-dp: every node's calibrated DP-SGD before anything starts (a target that
    cannot be met is refused here, with the reason, rather than at round 1)."""
    from harmonize.federated.tasks import build_task

    task = build_task(cfg)
    plans = {}
    for node in node_names(cfg.manifest):
        train, _ = split_rows(node_rows(cfg.manifest, node))
        planned = task.dp_plan(train, node)
        if planned is None:  # e.g. a node whose weights never leave
            continue
        plan, _ = planned
        how = patient_index(train)[1]
        if how != "patient_id column" and cfg.progress:
            print(f"note: node '{node}': no patient_id column, so each image counts as its "
                  "own patient (epsilon per image); add patient_id for epsilon per patient")
        plans[node] = {"patients": plan.patients, "patients_from": how,
                       "sample_rate": plan.sample_rate,
                       "expected_patients_per_step": plan.expected_patients,
                       "steps": plan.steps, "noise_multiplier": plan.noise_multiplier,
                       "max_grad_norm": plan.max_grad_norm, "epsilon": plan.epsilon(),
                       "delta": plan.delta}
    return plans
