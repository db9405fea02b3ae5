"""The ServerApp: runs the rounds with the run's strategy (`strategy.py`: Flower's
strategy inside `FederationStrategy`), checkpoints for `--resume`, and writes what a user
needs (`finish_run`, shared with the SecAgg+ server): the global model as a checkpoint
of the contract format, rounds.csv + rounds.png (loss, metrics, epsilon per round) and
summary.json, including which node failed in which round and why."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from matplotlib.ticker import MaxNLocator
from safetensors.torch import save_file

from harmonize.checkpoint import checkpoint_dir
from harmonize.configs import ConfigError
from harmonize.data.io import atomic_write
from harmonize.federated.config import FederatedConfig
from harmonize.federated.patient_dp import DP_METRICS, run_epsilon
from harmonize.federated.prepare import RunPlan, plan_run
from harmonize.federated.privacy import gaussian_epsilon, subsampled_gaussian_epsilon
from harmonize.federated.report import write_rounds_report
from harmonize.federated.server_optimizer import ServerOptimizer
from harmonize.federated.server_state import (
    is_checkpoint_round,
    load_server_state,
    save_server_state,
)
from harmonize.federated.strategy import FederationStrategy, build_inner_strategy
from harmonize.federated.update_checks import UpdateCheck
from harmonize.report.html import header_text, subplots

SHARED_WEIGHTS = "shared_weights.safetensors"


def make_server_app(config: FederatedConfig | None = None, plan: RunPlan | None = None,
                    config_from_run=None) -> ServerApp:
    """The ServerApp for this config and its plan (`prepare.plan_run`; made here when not
    given, as under `flwr run`, which reads the config from the run)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else config_from_run(context.run_config)
        run_server(grid, cfg, plan)

    return app


def run_server(grid: Grid, cfg: FederatedConfig, plan: RunPlan | None = None) -> dict:
    if cfg.privacy.secagg:  # never run "secure" aggregation without it
        raise ValueError("privacy.secagg: this is the plain ServerApp; a SecAgg+ run needs "
                         "harmonize.federated.app:secagg_server_app and secagg_client_app "
                         "(docs/federated.md, Secure aggregation)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan or plan_run(cfg)
    n_nodes, task = plan.n_nodes, plan.task
    fresh = initial = task.initial_arrays()  # fresh: the layout the nodes send
    aggregation = task.custom_aggregation()  # e.g. local priors: nothing to average
    log: dict[int, dict] = {}
    done, elapsed, optimizer_state = 0, 0.0, None
    if cfg.resume:  # the last saved round: its model, optimizer state and round log
        done, initial, optimizer_state, log = load_server_state(out, resumable(cfg))
        elapsed = max((v.get("seconds") or 0.0 for v in log.values()), default=0.0)
        if done >= cfg.rounds:
            raise ConfigError(f"--resume: {out} already did {done} rounds; raise rounds "
                              "above that to continue")
    spec = task.server_optimizer()
    optimizer = ServerOptimizer(spec, initial) if spec is not None else None
    if optimizer is not None and optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    # norms are comparable only where every node optimizes the same objective: in the
    # translator tasks each node holds other terms (its site's), so sizes differ by design
    check = UpdateCheck(fresh,
                        cfg.update_norm_factor if cfg.task == "classifier" else None,
                        compare_arrays=aggregation is None)
    check.advance(initial)  # a resumed run compares with the saved model
    started = time.perf_counter()

    def checkpoint(server_round: int, arrays: dict) -> None:
        if is_checkpoint_round(server_round, cfg.checkpoint_every, cfg.rounds):
            save_server_state(out, server_round, arrays,
                              optimizer.state_dict() if optimizer is not None else None,
                              log, resumable(cfg))

    strategy = FederationStrategy(
        build_inner_strategy(cfg, n_nodes), log, cfg.sampled(n_nodes), check=check,
        aggregation=aggregation, optimizer=optimizer, offset=done,
        clock=lambda: elapsed + time.perf_counter() - started, on_aggregated=checkpoint)
    settings = {"seed": cfg.seed, "nodes": n_nodes, "round-offset": done,
                "checkpoint-every": cfg.checkpoint_every, "rounds": cfg.rounds}
    settings.update(task.server_settings())
    wall_start = time.time()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial),
                            num_rounds=cfg.rounds - done, train_config=ConfigRecord(settings),
                            evaluate_config=ConfigRecord({"rounds": cfg.rounds,
                                                          "round-offset": done}))
    node_models = {d.name: str(d / "model") for d in sorted((out / "nodes").glob("*"))
                   if (d / "model" / "metadata.json").is_file()  # kept at the nodes,
                   and (d / "model" / "metadata.json").stat().st_mtime >= wall_start}  # now
    final = result.arrays.to_torch_state_dict() if len(result.arrays) > 0 else None
    return finish_run(cfg, task, log, final, n_nodes, time.perf_counter() - started,
                      node_models=node_models, patient_dp_plans=plan.patient_dp)


def finish_run(cfg: FederatedConfig, task, log: dict, final: dict | None, n_nodes: int,
               seconds: float, node_models: dict | None = None,
               extra: dict | None = None, patient_dp_plans: dict | None = None) -> dict:
    """What every server writes at the end (plain or SecAgg+): rounds.csv and rounds.png
    from the round log, OUT/model when some round was aggregated, summary.json and
    report.html. `extra` (e.g. the SecAgg+ settings) goes into metadata and summary;
    `patient_dp_plans` (each node's DP-SGD as planned) into the summary."""
    out = Path(cfg.out)
    rate = cfg.sampled(n_nodes) / n_nodes
    rounds = rounds_table(cfg, log, rate)
    atomic_write(out / "rounds.csv", lambda tmp: rounds.to_csv(tmp, index=False))
    plot_rounds(rounds, out / "rounds.png")
    failures = [{"round": r, "reason": reason} for r, v in sorted(log.items())
                for reason in v.get("failed", [])]
    skipped = [r for r in range(1, cfg.rounds + 1)
               if not log.get(r, {}).get("aggregated", False)]
    privacy = privacy_summary(cfg, log, rate)
    extra = extra or {}
    model_dir = None
    if final is not None and len(skipped) < cfg.rounds:  # some round was aggregated
        meta = {"federated": {"rounds": cfg.rounds, "nodes": n_nodes,
                              "strategy": cfg.strategy, "dp": cfg.privacy.model_dump(),
                              **privacy, **extra},
                "training_manifest": str(cfg.manifest)}
        model_dir = save_global_model(task, final, out, meta)
    summary = {"model": str(model_dir) if model_dir else None,
               "node_models": node_models or {}, "rounds": cfg.rounds, "nodes": n_nodes,
               "seconds": seconds, "failures": failures, "rounds_not_aggregated": skipped,
               "privacy": cfg.privacy.mode, **privacy, **extra}
    if patient_dp_plans is not None:
        summary["patient_dp"] = patient_dp_plans
    write_summary(out, cfg, rounds, summary)
    return summary


def resumable(cfg: FederatedConfig) -> dict:
    """The config as the checkpoint records it (what must match on --resume)."""
    return cfg.model_dump(mode="json")


def save_global_model(task, arrays: dict, out: Path, meta: dict) -> Path:
    """OUT/model (the task's checkpoint, checked complete) and OUT/shared_weights
    (everything the nodes shared, e.g. CycleGAN's F and discriminators, which the
    translator checkpoint leaves out: for checks of what left the nodes)."""
    model_dir = task.save(arrays, out / "model", meta)
    checkpoint_dir(model_dir)  # raises if any file, the weights above all, is missing
    shared = {k: v.contiguous() for k, v in arrays.items()}
    atomic_write(out / SHARED_WEIGHTS, lambda tmp: save_file(shared, str(tmp)))
    return model_dir


def write_summary(out: Path, cfg: FederatedConfig, rounds: pd.DataFrame,
                  summary: dict) -> None:
    """OUT/summary.json and OUT/report.html (after rounds.csv / rounds.png)."""
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(text))
    write_rounds_report(out, cfg, rounds, summary, out / "rounds.png")


def privacy_summary(cfg: FederatedConfig, replies: dict, rate: float = 1.0) -> dict:
    """epsilon (node-dp: per hospital; patient-dp: per patient, the largest over nodes,
    each node's in epsilon_per_node) and delta; None without DP."""
    if cfg.privacy.mode == "patient-dp":
        return run_epsilon(replies, cfg.privacy.delta)
    eps = _epsilon(cfg, cfg.rounds, rate)
    return {"epsilon": eps, "epsilon_unit": "hospital" if eps is not None else None,
            "delta": cfg.privacy.delta if cfg.privacy.mode == "node-dp" else None}


def _epsilon(cfg: FederatedConfig, rounds: int, rate: float = 1.0) -> float | None:
    """Node-level epsilon after `rounds`; with node sampling (`rate` < 1), amplified by
    it (`subsampled_gaussian_epsilon`)."""
    if cfg.privacy.mode != "node-dp":
        return None
    eps = (gaussian_epsilon(cfg.privacy.noise_multiplier, rounds, cfg.privacy.delta)
           if rate >= 1 else subsampled_gaussian_epsilon(
               cfg.privacy.noise_multiplier, rounds, cfg.privacy.delta, rate))
    return eps if math.isfinite(eps) else None


def rounds_table(cfg: FederatedConfig, replies: dict, rate: float = 1.0) -> pd.DataFrame:
    """One row per round from the server's round log: metrics, epsilon, nodes that
    replied, and `seconds` from the run's start to this round's training replies being
    in (round times; a resumed run goes on counting)."""
    rows = []
    for r in range(1, cfg.rounds + 1):
        entry = replies.get(r, {})
        row: dict = {"round": r, "seconds": entry.get("seconds")}
        for prefix, source in (("train_", entry.get("train_metrics", {})),
                               ("eval_", entry.get("eval_metrics", {}))):
            for k, v in source.items():
                if k != "num-examples" and k not in DP_METRICS:  # per node: epsilon_NODE
                    row[prefix + k.removeprefix("train_")] = float(v)
        row["epsilon"] = _epsilon(cfg, r, rate)
        per_node = replies.get(r, {}).get("epsilon", {})
        if per_node:  # patient-dp: each node's budget spent so far, and the largest
            row["epsilon"] = max(per_node.values())
            row.update({f"epsilon_{name}": v for name, v in sorted(per_node.items())})
        row["nodes_ok"] = len(replies.get(r, {}).get("ok", []))
        row["aggregated"] = bool(replies.get(r, {}).get("aggregated", False))
        row["failed"] = " | ".join(replies.get(r, {}).get("failed", []))
        row["dropped"] = " | ".join(replies.get(r, {}).get("dropped", []))
        rows.append(row)
    return pd.DataFrame(rows)


def plot_rounds(rounds: pd.DataFrame, path: Path) -> None:
    # one panel per quantity: the per-node epsilons are in the table (their maximum is
    # plotted)
    skip = {"round", "seconds", "nodes_ok", "failed", "aggregated", "train_compute_seconds"}
    metrics = [c for c in rounds.columns if c not in skip and not c.startswith("epsilon_")
               and rounds[c].notna().any()]
    if not metrics:
        return
    fig, axes = subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.8), squeeze=False)
    for ax, col in zip(axes[0], metrics, strict=True):
        ax.plot(rounds["round"], rounds[col], marker="o", ms=3)
        ax.set_title(header_text(col), fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}")
    fig.savefig(tmp, format="png", dpi=90)
    tmp.replace(path)
