"""`harmonize federated`: the Flower simulation engine runs one SuperNode per node of the
manifest on this machine, with the same ClientApp / ServerApp a deployment runs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from harmonize.configs import ConfigError, dump_config
from harmonize.data.manifest import load_manifest
from harmonize.federated.client_app import make_client_app
from harmonize.federated.config import FederatedConfig
from harmonize.federated.prepare import plan_run, resolved_config, with_split
from harmonize.federated.server_app import make_server_app, resumable
from harmonize.federated.server_state import STATE_DIR, check_resumable
from harmonize.rerun import replacing_outputs


def run_federated(cfg: FederatedConfig, cpus: int | None = None, secagg=None) -> dict:
    """Simulate the federation; returns summary.json's content (+ wall time). With
    `privacy.secagg`, Flower's SecAgg+ (its legacy API, so its own apps; `secagg`: its
    `SecAggParams`, default automatic)."""
    cfg = resolved_config(cfg)
    out = Path(cfg.out)
    if cfg.resume and cfg.privacy.secagg:
        raise ConfigError("--resume: SecAgg+ runs cannot resume yet; run it again")
    if cfg.resume:  # refused here, before Ray starts, rather than inside the server
        check_resumable(out, resumable(cfg))
    else:
        replacing_outputs(out, "federated run (model, rounds, report)", marker="summary.json")
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)  # an old run's checkpoint
    out.mkdir(parents=True, exist_ok=True)
    if cfg.evaluate:
        cfg.manifest = with_split(cfg.manifest, out, cfg.seed)
        kept_at_nodes = (cfg.task == "texture"
                         or (cfg.task == "diffusion" and cfg.diffusion.prior == "local"))
        if not (load_manifest(cfg.manifest)["split"] == "test").any() and not kept_at_nodes:
            cfg.evaluate = False  # no node holds test rows: nothing to evaluate on
            # (local priors and texture keep it: the evaluation message delivers the
            # reference release, from which each node fits its own translator)
    plan = plan_run(cfg, secagg)  # refuses a design that cannot run, before Ray starts
    if cfg.privacy.secagg:
        from harmonize.federated.secure_aggregation import (
            make_secagg_client_app,
            make_secagg_server_app,
        )

        apps = make_secagg_server_app(cfg, plan), make_secagg_client_app(cfg)
    else:
        apps = make_server_app(cfg, plan), make_client_app(cfg)
    if plan.patient_dp is not None and cfg.evaluate and cfg.progress:
        print("note: patient-dp protects what the nodes train on; their evaluation on "
              "held-out patients (sent each round) is outside it: evaluate: false sends none")
    dump_config(cfg, out / "config.yaml")
    (out / "summary.json").unlink(missing_ok=True)
    from flwr.simulation import run_simulation

    # parallel_nodes Ray actors, one node's training each; with threads_per_node threads
    # each, parallel_nodes x threads_per_node should not exceed the cores; with a GPU,
    # each node asks for a share of it (Ray then sets the node's CUDA_VISIBLE_DEVICES)
    cpus = cpus or cfg.parallel_nodes
    if not cfg.progress:  # Flower logs every round at INFO and warns about deprecations
        logging.getLogger("flwr").setLevel(logging.ERROR)
    started = time.perf_counter()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(server_app=apps[0], client_app=apps[1], num_supernodes=len(plan.nodes),
                   backend_config={"client_resources": {"num_cpus": 1,
                                                        "num_gpus": cfg.gpu_share()},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False,
                                                 "logging_level": "ERROR"}},
                   verbose_logging=False)
    if not (out / "summary.json").is_file():
        raise RuntimeError(f"the federated run ended without a result in {out}; see the "
                           "log above")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - started
    summary["node_names"] = plan.nodes
    return summary
