"""The server's strategy: Flower's (FedAvg, FedProx, FedMedian, FedTrimmedAvg, Krum,
optionally inside Flower's central-DP wrapper) inside `FederationStrategy`, a Flower
`Strategy` that wraps another the way Flower's own DP wrappers do.

What the wrapper adds around the inner strategy's aggregation, in this order:
1. the round log (rounds.csv's source): which nodes replied, which failed and why (one
   line each; Flower's own log has only random node ids), patient-dp budgets per node;
2. the update checks (`update_checks.py`): a reply that cannot be averaged is dropped
   and named;
3. too few good replies: the model stays as it was (a node killed for memory must not
   make one node's update the federation's model);
4. replies in node-name order, not arrival order: the float sums, hence the model, do
   not depend on which node answered first (reruns and resumed runs repeat exactly);
5. the inner aggregation, or the task's own (e.g. one node's release);
6. the task's server optimizer (FedOpt) on the aggregate: after any DP wrapper, so it
   only post-processes the noised mean;
7. `on_aggregated(round, arrays)`: the new model, for checkpoints.
Rounds are numbered as the run counts them (`offset`: rounds done before a resume).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from harmonize.federated.config import FederatedConfig
from harmonize.federated.server_optimizer import ServerOptimizer
from harmonize.federated.update_checks import UpdateCheck


def build_inner_strategy(cfg: FederatedConfig, n_nodes: int) -> Strategy:
    """Flower's strategy for `cfg.strategy`, inside its DP wrapper when `privacy.dp` asks."""
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


def one_line(text: str, limit: int = 300) -> str:
    """A reason fit for one CSV cell and one log line (Ray's can be 3 KB)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def numbers(metrics) -> dict[str, float]:
    """The numeric entries of an aggregated MetricRecord or dict (for the round log)."""
    items = metrics.items() if metrics is not None else []
    return {k: float(v) for k, v in items
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def round_entry(ok: list[str], failed: list[str], seconds: float | None, aggregated: bool,
                epsilon: dict[str, float], dropped: Iterable[str] = ()) -> dict:
    """One round of the round log, as both server apps write it."""
    return {"ok": list(ok), "failed": list(failed), "seconds": seconds,
            "aggregated": aggregated, "epsilon": dict(epsilon), "dropped": list(dropped)}


def reply_arrays(message: Message) -> dict | None:
    """The arrays a node sent (None: a reply without any)."""
    return message.content["arrays"].to_torch_state_dict() if "arrays" in message.content \
        else None


class FederationStrategy(Strategy):
    """A Flower strategy around `inner` (module docstring: what it adds, in which order)."""

    def __init__(self, inner: Strategy, log: dict, required: int, *,
                 check: UpdateCheck | None = None,
                 aggregation: Callable | None = None,
                 optimizer: ServerOptimizer | None = None, offset: int = 0,
                 clock: Callable[[], float] = time.perf_counter,
                 on_aggregated: Callable[[int, dict], None] | None = None) -> None:
        self.inner, self.log, self.required = inner, log, required
        self.check, self.aggregation, self.optimizer = check, aggregation, optimizer
        self.offset, self.clock, self.on_aggregated = offset, clock, on_aggregated

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        run_round = server_round + self.offset
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
        if self.check is not None and good:
            updates = [(n, reply_arrays(m) or {}) for n, m in zip(names, good, strict=True)]
            kept, dropped = self.check.screen(updates)
            good, names = [good[i] for i in kept], [names[i] for i in kept]
        order = sorted(range(len(good)), key=lambda i: names[i])
        good, names = [good[i] for i in order], [names[i] for i in order]
        complete = len(good) >= self.required
        self.log[run_round] = round_entry(
            names, failed, self.clock(), complete, epsilon,
            [f"node {n}: {why}" for n, why in dropped.items()])
        if not complete:
            return None, None  # Flower keeps the previous arrays
        aggregate = self.aggregation or self.inner.aggregate_train
        arrays, metrics = aggregate(server_round, good)
        if arrays is not None and self.optimizer is not None:
            new = self.optimizer.step(run_round, arrays.to_torch_state_dict(), len(good))
            arrays = ArrayRecord(new)
        self.log[run_round]["aggregated"] = arrays is not None
        self.log[run_round]["train_metrics"] = numbers(metrics)
        if arrays is not None and (self.check is not None or self.on_aggregated is not None):
            new = arrays.to_torch_state_dict()
            if self.check is not None:
                self.check.advance(new)
            if self.on_aggregated is not None:
                self.on_aggregated(run_round, new)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """A round in which no node held test rows has nothing to average (Flower would
        divide by a total weight of zero); e.g. local priors evaluate only to deliver."""
        replies = list(replies)
        weights = [float(m.content["metrics"].get("num-examples", 0)) for m in replies
                   if not m.has_error() and "metrics" in m.content]
        if not weights or sum(weights) == 0:
            return None
        metrics = self.inner.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.log.setdefault(server_round + self.offset, {})["eval_metrics"] = numbers(
                metrics)
        return metrics
