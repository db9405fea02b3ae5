"""The ServerApp: picks the strategy (FedAvg / FedProx, optionally wrapped by Flower's
central-DP wrappers), runs the rounds, and writes what a user needs: the global model as
a checkpoint of the contract format, rounds.csv + rounds.png (loss, metrics, epsilon per
round) and summary.json, including which node failed in which round and why."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
)
from matplotlib.ticker import MaxNLocator
from safetensors.torch import save_file

from harmonize.checkpoint import checkpoint_dir
from harmonize.configs import ConfigError
from harmonize.data.io import atomic_write
from harmonize.federated.config import FederatedConfig
from harmonize.federated.nodes import node_names
from harmonize.federated.patient_dp import DP_METRICS
from harmonize.federated.privacy import gaussian_epsilon, subsampled_gaussian_epsilon
from harmonize.federated.report import write_rounds_report
from harmonize.federated.server_optimizer import (
    ServerOptimizer,
    with_server_optimizer,
)
from harmonize.federated.server_state import (
    is_checkpoint_round,
    load_server_state,
    save_server_state,
)
from harmonize.federated.tasks import build_task
from harmonize.federated.update_checks import UpdateCheck
from harmonize.report.html import header_text, subplots

SHARED_WEIGHTS = "shared_weights.safetensors"


def make_server_app(config: FederatedConfig | None = None, config_from_run=None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else config_from_run(context.run_config)
        run_server(grid, cfg)

    return app


def build_strategy(cfg: FederatedConfig, n_nodes: int):
    sampled = cfg.sampled(n_nodes)  # Flower draws this many nodes at random each round
    kwargs = {"fraction_train": sampled / n_nodes,
              "fraction_evaluate": 1.0 if cfg.evaluate else 0.0,
              "min_train_nodes": sampled, "min_evaluate_nodes": n_nodes,
              "min_available_nodes": n_nodes}
    strategy = {
        "fedavg": lambda: FedAvg(**kwargs),
        "fedprox": lambda: FedProx(proximal_mu=cfg.proximal_mu, **kwargs),
        "fedmedian": lambda: FedMedian(**kwargs),
        "fedtrimmedavg": lambda: FedTrimmedAvg(beta=cfg.trim_beta, **kwargs),
        "krum": lambda: Krum(num_malicious_nodes=cfg.krum_malicious_nodes, **kwargs),
    }[cfg.strategy]()
    p = cfg.privacy
    wrapper = {"server-fixed": DifferentialPrivacyServerSideFixedClipping,
               "client-fixed": DifferentialPrivacyClientSideFixedClipping}.get(p.dp)
    if wrapper is not None:
        strategy = wrapper(strategy, noise_multiplier=p.noise_multiplier,
                           clipping_norm=p.clipping_norm, num_sampled_clients=sampled)
    return strategy


def reply_arrays(message) -> dict | None:
    """The arrays a node sent (None: a reply without any)."""
    return message.content["arrays"].to_torch_state_dict() if "arrays" in message.content \
        else None


def record_replies(strategy, log: dict, required: int, check: UpdateCheck | None = None,
                   offset: int = 0, clock=time.perf_counter, on_aggregated=None) -> None:
    """Note, per round, which nodes replied and which failed (with the reason, one line)
    before the strategy aggregates (Flower's own log only has random node ids); with a
    `check`, drop and name the updates that cannot be averaged (`update_checks.py`). A
    round with fewer than `required` good replies leaves the model as it was (a node
    killed for memory must not make one node's update the federation's model). The log
    (rounds.csv's source) is keyed by the run's round number (`offset`: rounds done
    before a resume); `on_aggregated(round, arrays)` is called with each new model."""
    aggregate = strategy.aggregate_train

    def aggregate_train(server_round, replies):
        server_round += offset
        replies = list(replies)
        good, names, failed, epsilon = [], [], [], {}
        for m in replies:
            if m.has_error():
                failed.append(one_line(m.error.reason))
                continue
            name = str(m.content["node"]["name"]) if "node" in m.content else "?"
            good.append(m)
            names.append(name)
            metrics = m.content["metrics"] if "metrics" in m.content else {}
            if "epsilon" in metrics:  # patient-dp: this node's spent budget
                epsilon[name] = float(metrics["epsilon"])
        dropped: dict[str, str] = {}
        if check is not None and good:
            updates = [(n, reply_arrays(m) or {}) for n, m in zip(names, good, strict=True)]
            kept, dropped = check.screen(updates)
            good, names = [good[i] for i in kept], [names[i] for i in kept]
        # in node order, not arrival order: the float sums, hence the model, do not
        # depend on which node answered first (reruns and resumed runs repeat exactly)
        order = sorted(range(len(good)), key=lambda i: names[i])
        good, names = [good[i] for i in order], [names[i] for i in order]
        complete = len(good) >= required
        log[server_round] = {"ok": names, "failed": failed, "seconds": clock(),
                             "aggregated": complete, "epsilon": epsilon,
                             "dropped": [f"node {n}: {why}" for n, why in dropped.items()]}
        if not complete:
            return None, None  # Flower keeps the previous arrays
        arrays, metrics = aggregate(server_round - offset, good)
        log[server_round]["aggregated"] = arrays is not None
        log[server_round]["train_metrics"] = numbers(metrics)
        if arrays is not None and (check is not None or on_aggregated is not None):
            new = arrays.to_torch_state_dict()
            if check is not None:
                check.advance(new)
            if on_aggregated is not None:
                on_aggregated(server_round, new)
        return arrays, metrics

    strategy.aggregate_train = aggregate_train


def skip_empty_evaluations(strategy, log: dict | None = None, offset: int = 0) -> None:
    """A round in which no node held test rows has nothing to average (Flower would
    divide by a total weight of zero); e.g. local priors evaluate only to deliver. The
    averaged scores go into `log` under the run's round number."""
    aggregate = strategy.aggregate_evaluate

    def aggregate_evaluate(server_round, replies):
        replies = list(replies)
        weights = [float(m.content["metrics"].get("num-examples", 0)) for m in replies
                   if not m.has_error() and "metrics" in m.content]
        if not weights or sum(weights) == 0:
            return None
        metrics = aggregate(server_round, replies)
        if log is not None and metrics is not None:
            log.setdefault(server_round + offset, {})["eval_metrics"] = numbers(metrics)
        return metrics

    strategy.aggregate_evaluate = aggregate_evaluate


def numbers(metrics) -> dict[str, float]:
    """The numeric entries of an aggregated MetricRecord (for the round log)."""
    items = metrics.items() if hasattr(metrics, "items") else []
    return {k: float(v) for k, v in items if isinstance(v, (int, float))}


def one_line(text: str, limit: int = 300) -> str:
    """A reason fit for one CSV cell and one log line (Ray's can be 3 KB)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_server(grid: Grid, cfg: FederatedConfig) -> dict:
    if cfg.privacy.secagg:  # never run "secure" aggregation without it
        raise ValueError("privacy.secagg: this is the plain ServerApp; a SecAgg+ run needs "
                         "harmonize.federated.app:secagg_server_app and secagg_client_app "
                         "(docs/federated.md, Secure aggregation)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n_nodes = cfg.min_nodes or len(node_names(cfg.manifest))
    task = build_task(cfg)
    strategy = build_strategy(cfg, n_nodes)
    fresh = initial = task.initial_arrays()  # fresh: the layout the nodes send
    aggregation = task.custom_aggregation()
    if aggregation is not None:  # e.g. local priors: nothing to average
        strategy.aggregate_train = aggregation
    replies: dict[int, dict] = {}
    done, elapsed, optimizer_state = 0, 0.0, None
    if cfg.resume:  # the last saved round: its model, optimizer state and round log
        done, initial, optimizer_state, replies = load_server_state(out, resumable(cfg))
        elapsed = max((v.get("seconds") or 0.0 for v in replies.values()), default=0.0)
        if done >= cfg.rounds:
            raise ConfigError(f"--resume: {out} already did {done} rounds; raise rounds "
                              "above that to continue")
    spec = task.server_optimizer()
    optimizer = ServerOptimizer(spec, initial) if spec is not None else None
    if optimizer is not None:  # FedOpt: after any DP wrapper (module docstring)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        with_server_optimizer(strategy, optimizer, offset=done)
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
                              replies, resumable(cfg))

    record_replies(strategy, replies, cfg.sampled(n_nodes), check, offset=done,
                   clock=lambda: elapsed + time.perf_counter() - started,
                   on_aggregated=checkpoint)
    skip_empty_evaluations(strategy, replies, offset=done)
    settings = {"seed": cfg.seed, "nodes": n_nodes, "round-offset": done,
                "checkpoint-every": cfg.checkpoint_every, "rounds": cfg.rounds}
    settings.update(task.server_settings())
    wall_start = time.time()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial),
                            num_rounds=cfg.rounds - done, train_config=ConfigRecord(settings),
                            evaluate_config=ConfigRecord({"rounds": cfg.rounds,
                                                          "round-offset": done}))
    seconds = time.perf_counter() - started
    rate = cfg.sampled(n_nodes) / n_nodes
    rounds = rounds_table(cfg, replies, rate)
    atomic_write(out / "rounds.csv", lambda tmp: rounds.to_csv(tmp, index=False))
    plot_rounds(rounds, out / "rounds.png")
    failures = [{"round": r, "reason": reason} for r, v in sorted(replies.items())
                for reason in v.get("failed", [])]
    skipped = [r for r, v in sorted(replies.items()) if not v.get("aggregated", False)]
    model_dir = None
    if len(result.arrays) > 0 and len(skipped) < cfg.rounds:  # some round was aggregated
        meta = {"federated": {"rounds": cfg.rounds, "nodes": n_nodes,
                              "strategy": cfg.strategy, "dp": cfg.privacy.model_dump(),
                              **privacy_summary(cfg, replies, rate)},
                "training_manifest": str(cfg.manifest)}
        model_dir = save_global_model(task, result.arrays.to_torch_state_dict(), out, meta)
    node_models = {d.name: str(d / "model") for d in sorted((out / "nodes").glob("*"))
                   if (d / "model" / "metadata.json").is_file()  # kept at the nodes,
                   and (d / "model" / "metadata.json").stat().st_mtime >= wall_start}  # now
    summary = {"model": str(model_dir) if model_dir else None, "node_models": node_models,
               "rounds": cfg.rounds,
               "nodes": n_nodes, "seconds": seconds, "failures": failures,
               "rounds_not_aggregated": skipped,
               "privacy": cfg.privacy.mode, **privacy_summary(cfg, replies, rate)}
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
        per_node: dict[str, float] = {}
        for r in sorted(replies):
            per_node.update(replies[r].get("epsilon", {}))
        return {"epsilon": max(per_node.values()) if per_node else None,
                "epsilon_per_node": per_node, "epsilon_unit": "patient",
                "delta": cfg.privacy.delta}
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
