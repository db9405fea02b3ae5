"""Secure aggregation (Flower's SecAgg+, Bell et al., CCS 2020) for the FedAvg tasks.

What it protects: each node masks its reply with pairwise masks (agreed by key exchange
with the other nodes) and a private mask, so the server learns only the *sum* of the
nodes' updates, never one hospital's update. It does not protect the aggregate itself:
the averaged model still reveals what the weights reveal (and with two nodes, a node
that knows its own update can subtract it); node-level differential privacy is what
bounds that. Each node's num-examples (its FedAvg weight; 1 under patient-dp) and its
scalar metrics still reach the server in the clear. The protocol is secure against an
honest-but-curious server and up to reconstruction_threshold - 1 colluding nodes.

How (flwr 1.42 has SecAgg+ only in the legacy API): the server runs Flower's legacy
`FedAvg` inside `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` with a
`LegacyContext`; each node is a legacy ClientApp (a `NumPyClient`) behind
`secaggplus_mod`. Both are adapters: a node runs the same round as the Message-API
ClientApp (`node_round.train_round` / `evaluate_round`: its own rows, its local state,
its checkpoints), and the server keeps the same round log and writes the same outputs
(`strategy.round_entry`, `server_app.finish_run`). Arrays travel as lists in the key
order of `task.initial_arrays()`.

What is summed: SecAgg+ sums whatever the node returns. Here a node returns its update
u_i = p_i - g (its new float weights minus the global weights g it received); the
server adds the secure mean of the updates to g, which is exactly the mean of the p_i
(the weights sum to one), so the model is the one FedAvg of the weights would give, and
the clipping range need only cover the updates (small for the classifier and the
diffusion prior; for CycleGAN, whose nodes send w - sum of raw gradients, the update is
in gradient units).

Weighting (read from flwr 1.42's `secaggplus_mod` / `SecAggPlusWorkflow`): node i with
weight w_i (its num-examples, as the task reports it) sends q_i = round(w_i / M * Q) and
the masked, quantized vector of (q_i / Q) * u_i (M = max_weight, Q = quantization_range);
the server unmasks the two sums and divides: sum_i (q_i/Q) u_i / sum_i (q_i/Q), the
num-examples-weighted FedAvg mean. Legacy `FedAvg.aggregate_fit` then receives that
mean in every reply; `SecureFedAvg` takes it as it is (no second averaging) and averages
the metrics by num-examples, as the Message-API FedAvg does.

Quantization error: each node clips (q_i/Q) u_i to [-C, C] (C = clipping_range) and
rounds it stochastically (unbiased) onto Q levels, a step of 2C/Q. Per element,

    |secure - plain| <= n (2C/Q) / S + n (1/2Q) 2 max|u| / S + float32 rounding,

S = sum_i w_i / M, n nodes (`quantization_error_bound`; the second term is the weights'
rounding). With M = the largest node's num-examples and equal nodes S = n, so the error
is about 2C/Q: 1.5e-8 at C = 8, Q = 2**30 (3 nodes), below float32's own step at 1
(nodes send their updates as float64: Flower quantizes in the arrays' dtype, and
float32 would round at its own step near C, ~1e-6).
Hence the defaults (`secagg_settings.SecAggParams`): M from the task (the largest node's
training rows for the classifier, 1 for CycleGAN, local_steps for the diffusion prior), not Flower's
1000, which would make the error ~1000 / w_i times larger; C covering the updates; Q as
large as the 2**32 modulus allows for n (n * Q must stay below it, or the sum wraps).
A node whose weighted update leaves [-C, C] (Flower would clip it silently: a wrong
aggregate) or whose weight exceeds M stops with an error that names it.

Integer buffers (BatchNorm's num_batches_tracked) do not take part: nodes send only the
floating-point arrays, and the global model keeps the integers' initial values (the
Message-API FedAvg averages them; BatchNorm ignores them at its default momentum).

Cost: four server-node exchanges per round instead of one (setup, key sharing, masked
vectors, unmasking), key agreement and Shamir shares with num_shares neighbours at each
node, one int64 per float sent (2x float32's bytes), and one pseudo-random mask per
neighbour over the whole model at every node and at the server (eval/bench/
bench_secagg.py measures it). Every node must finish the round: a round in which a node
failed is not aggregated (the model stays as it was).

Patient-level DP (`privacy.mode: patient-dp`, DP-SGD inside each node's task.train)
combines with it: the nodes' epsilon per patient is reported as in the plain app, and
SecAgg+ hides each node's noised update behind the sum. Not supported here: node-level
DP (`privacy.mode: node-dp` / `privacy.dp`: server-side clipping needs each update,
which SecAgg+ hides, and Flower's legacy client-side clipping mod expects the full
weight list); tasks with their own aggregation (local diffusion priors, histogram
landmarks: one node's arrays, nothing is averaged).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.app.message_type import MessageType
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from harmonize.federated.config import FederatedConfig
from harmonize.federated.node_round import (
    NodeSetup,
    evaluate_round,
    node_error,
    node_label,
    setup_node,
    train_round,
)
from harmonize.federated.node_state import Arrays
from harmonize.federated.prepare import RunPlan, plan_run
from harmonize.federated.server_app import finish_run
from harmonize.federated.server_optimizer import ServerOptimizer
from harmonize.federated.strategy import numbers, one_line, round_entry


# --- layout: dict <-> list of numpy arrays ----------------------------------------------
@dataclass(frozen=True)
class Layout:
    """The arrays' order (task.initial_arrays()'s keys) and which of them are secure-
    summed (floating point); the server sends all, the nodes return the float ones."""

    keys: tuple[str, ...]
    floats: tuple[str, ...]
    dtypes: dict

    @classmethod
    def of(cls, arrays: Arrays) -> Layout:
        return cls(tuple(arrays), tuple(k for k, v in arrays.items() if v.is_floating_point()),
                   {k: v.dtype for k, v in arrays.items()})

    def to_list(self, arrays: Arrays, keys=None) -> list[np.ndarray]:
        return [arrays[k].detach().cpu().contiguous().numpy() for k in keys or self.keys]

    def to_dict(self, values: list[np.ndarray], keys=None) -> Arrays:
        keys = keys or self.keys
        if len(values) != len(keys):
            raise ValueError(f"expected {len(keys)} arrays, got {len(values)}")
        return {k: torch.from_numpy(np.array(v)).to(self.dtypes[k])
                for k, v in zip(keys, values, strict=True)}


_LAYOUTS: dict[str, Layout] = {}  # per process and config: the task's array layout


def task_layout(cfg: FederatedConfig, task) -> Layout:
    key = cfg.model_dump_json()
    if key not in _LAYOUTS:
        _LAYOUTS[key] = Layout.of(task.initial_arrays())
    return _LAYOUTS[key]


def check_fits(update: Arrays, weight: float, clipping_range: float, max_weight: float,
               node: str) -> float:
    """SecAgg+ clips (weight / max_weight) * value to [-C, C] without a word, which would
    make the aggregate wrong: stop, naming the node, instead. Returns that peak value."""
    if weight > max_weight:
        raise ValueError(f"node {node}: num-examples {weight:g} exceeds the SecAgg+ "
                         f"max_weight {max_weight:g}; raise max_weight")
    peak = max((float(v.abs().max()) for v in update.values() if v.numel()), default=0.0)
    scaled = peak * weight / max_weight
    if not np.isfinite(scaled) or scaled > clipping_range:
        raise ValueError(f"node {node}: its update reaches {peak:.4g} (x weight {weight:g}"
                         f"/{max_weight:g}), outside the SecAgg+ clipping range "
                         f"+-{clipping_range:g}; raise clipping_range")
    return scaled


JSON_KEYS = "secagg.json-keys"


def encode_settings(settings: dict) -> dict:
    """The round settings as legacy config scalars: lists (CycleGAN's per-site counts)
    travel as JSON text, named in JSON_KEYS (the legacy API takes no lists)."""
    lists = sorted(k for k, v in settings.items() if isinstance(v, (list, tuple)))
    return {**{k: json.dumps(list(v)) if k in lists else v for k, v in settings.items()},
            JSON_KEYS: ",".join(lists)}


def decode_settings(config: dict) -> dict:
    lists = [k for k in str(config.get(JSON_KEYS, "")).split(",") if k]
    return {k: json.loads(v) if k in lists else v for k, v in config.items()
            if k != JSON_KEYS}


class RecordingGrid:
    """The server's Grid, noting every error reply per round (the SecAgg+ workflow
    drops a failed node's reason when it halts a round)."""

    def __init__(self, grid: Grid, errors: dict[int, list[str]]) -> None:
        self._grid, self.errors = grid, errors

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for m in replies:
            if m.has_error():
                reason = node_reason(m.error.reason)
                if m.metadata.message_type != MessageType.TRAIN:
                    reason = f"{m.metadata.message_type}: {reason}"
                rnd = int(m.metadata.group_id) if m.metadata.group_id.isdigit() else 0
                self.errors.setdefault(rnd, []).append(reason)
        return replies


def node_reason(text: str) -> str:
    """One line, starting at the node's own message ("node site_b: ...") if present."""
    text = " ".join(str(text).split())
    found = re.search(r"Error: (node \S+: .*?)(?: The above exception| Traceback|$)", text)
    return one_line(found.group(1) if found else text)


# --- the node ---------------------------------------------------------------------------
class SecAggNode(NumPyClient):
    """One hospital: the same round as the plain ClientApp (`node_round.py`); what it
    returns is the change of its float arrays (float64), which `secaggplus_mod`
    quantizes and masks before anything leaves."""

    def __init__(self, cfg: FederatedConfig, context: Context) -> None:
        self.cfg, self.ctx = cfg, context

    def _setup(self) -> tuple[NodeSetup, Layout]:
        setup = setup_node(self.cfg, self.ctx)
        return setup, task_layout(self.cfg, setup.task)

    def fit(self, parameters, config):
        node = node_label(self.ctx)
        try:
            setup, layout = self._setup()
            node = setup.node
            received = layout.to_dict(parameters)
            arrays, metrics = train_round(setup, self.ctx, received, decode_settings(config))
            weight = float(metrics.pop("num-examples"))
            # sent: this round's change of the float arrays (the server adds the secure
            # mean of the changes to the weights it sent: the mean of the new weights)
            # in float64: Flower quantizes in the arrays' dtype, and float32 would round
            # (w/M) u + C to float32's step at C (1e-6 at C = 8), not to 2C/Q
            update = {k: arrays[k].double() - received[k].double() for k in layout.floats}
            # nothing per node beyond its weight: no update norm, no peak value
            metrics.pop("update_norm", None)
            check_fits(update, weight, float(config["secagg.clipping-range"]),
                       float(config["secagg.max-weight"]), node)
            # what leaves: one int64 per float (masked), plus the weight factor
            metrics["bytes_sent"] = float(8 * (1 + sum(v.numel() for v in update.values())))
        except Exception as err:
            raise RuntimeError(node_error(node, err)) from err
        metrics["node"] = node
        return layout.to_list(update, layout.floats), int(weight), metrics

    def evaluate(self, parameters, config):
        node = node_label(self.ctx)
        try:
            setup, layout = self._setup()
            node = setup.node
            metrics = evaluate_round(setup, self.ctx, layout.to_dict(parameters), config)
        except Exception as err:
            raise RuntimeError(node_error(node, err)) from err
        n = int(metrics.pop("num-examples"))
        return float(metrics.get("loss", 0.0)), n, metrics


def make_secagg_client_app(cfg: FederatedConfig | None = None,
                           config_from_run=None) -> ClientApp:
    """A legacy ClientApp behind `secaggplus_mod` (or, under `flwr run`, one that reads
    the config from the run: ``config_from_run(context.run_config)``)."""

    def client_fn(context: Context):
        c = cfg if cfg is not None else config_from_run(context.run_config)
        if not c.progress:  # secaggplus_mod logs every stage of every node
            logging.getLogger("flwr").setLevel(logging.WARNING)
        return SecAggNode(c, context).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


# --- the server -------------------------------------------------------------------------
def weighted_metrics(results: list[tuple[int, dict]]) -> dict:
    """Numeric metrics averaged by num-examples (strings, e.g. the node name, dropped)."""
    total = sum(n for n, _ in results)
    if total <= 0:
        return {}
    keys = {k for _, m in results for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: sum(n * float(m[k]) for n, m in results if k in m) / total
            for k in sorted(keys)}


class SecureFedAvg(FedAvg):
    """Legacy FedAvg whose aggregate_fit takes SecAgg+'s weighted mean as it is, puts
    back the integer buffers, applies the task's server optimizer (CycleGAN) and notes
    each round in the round log the plain app keeps (`strategy.round_entry`); a round
    with any failed node is not aggregated."""

    def __init__(self, layout: Layout, initial: Arrays, required: int,
                 optimizer: ServerOptimizer | None = None,
                 clock=time.perf_counter, **kwargs) -> None:
        super().__init__(accept_failures=False, fit_metrics_aggregation_fn=weighted_metrics,
                         evaluate_metrics_aggregation_fn=weighted_metrics, **kwargs)
        self.layout, self.required, self.optimizer = layout, required, optimizer
        self.current = {k: v.clone() for k, v in initial.items()}
        self.clock = clock
        self.log: dict[int, dict] = {}

    def aggregate_fit(self, server_round, results, failures):
        ok = sorted(str(r.metrics.get("node", "?")) for _, r in results)
        epsilon = {str(r.metrics.get("node", "?")): float(r.metrics["epsilon"])
                   for _, r in results if "epsilon" in r.metrics}  # patient-dp, per node
        complete = not failures and len(results) >= self.required
        self.log[server_round] = round_entry(ok, [], self.clock(), complete, epsilon)
        if not complete:
            return None, {}
        # every reply carries the same unmasked weighted mean of the updates
        # (SecAggPlusWorkflow); float64 until the sum with the weights sent
        mean = parameters_to_ndarrays(results[0][1].parameters)
        if len(mean) != len(self.layout.floats):
            raise ValueError(f"expected {len(self.layout.floats)} arrays, got {len(mean)}")
        merged = dict(self.current)
        for k, v in zip(self.layout.floats, mean, strict=True):
            merged[k] = torch.from_numpy(self.current[k].double().numpy() + v)
        if self.optimizer is not None:
            merged = self.optimizer.step(server_round, merged, len(results))
        self.current = {k: merged[k].to(self.layout.dtypes[k]) for k in self.layout.keys}
        metrics = weighted_metrics([(r.num_examples, {k: v for k, v in r.metrics.items()
                                                      if k != "epsilon"})
                                    for _, r in results])
        self.log[server_round]["train_metrics"] = numbers(metrics)
        return ndarrays_to_parameters(self.layout.to_list(self.current)), metrics

    def aggregate_evaluate(self, server_round, results, failures):
        if not results or sum(r.num_examples for _, r in results) == 0 or failures:
            return None, {}
        loss, metrics = super().aggregate_evaluate(server_round, results, failures)
        self.log.setdefault(server_round, {})["eval_metrics"] = numbers(metrics)
        return loss, metrics


def make_secagg_server_app(cfg: FederatedConfig | None = None, plan: RunPlan | None = None,
                           config_from_run=None) -> ServerApp:
    """A ServerApp running FedAvg with SecAgg+ (or, under `flwr run`, reading the config
    from the run); `plan`: the run's (`prepare.plan_run`, whose SecAggParams fix the
    protocol), made here when not given; writes OUT/model, rounds.csv, summary.json like
    the plain app."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        c = cfg if cfg is not None else config_from_run(context.run_config)
        run_secagg_server(grid, context, c, plan or plan_run(c))

    return app


def run_secagg_server(grid: Grid, context: Context, cfg: FederatedConfig,
                      plan: RunPlan) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    n_nodes, protocol, task = plan.n_nodes, plan.secagg, plan.task
    initial = task.initial_arrays()
    layout = task_layout(cfg, task)
    settings = {"seed": cfg.seed, "nodes": n_nodes,
                "secagg.clipping-range": protocol["clipping_range"],
                "secagg.max-weight": protocol["max_weight"]}
    if cfg.strategy == "fedprox":
        settings["proximal-mu"] = cfg.proximal_mu
    settings.update(task.server_settings())
    settings = encode_settings(settings)
    spec = task.server_optimizer()
    optimizer = ServerOptimizer(spec, initial) if spec is not None else None
    started = time.perf_counter()
    strategy = SecureFedAvg(
        layout, initial, n_nodes, optimizer, clock=lambda: time.perf_counter() - started,
        fraction_fit=1.0,
        fraction_evaluate=1.0 if cfg.evaluate else 0.0, min_fit_clients=n_nodes,
        min_evaluate_clients=n_nodes, min_available_clients=n_nodes,
        on_fit_config_fn=lambda r: {**settings, "server-round": r},
        on_evaluate_config_fn=lambda r: {"server-round": r, "rounds": cfg.rounds},
        initial_parameters=ndarrays_to_parameters(layout.to_list(initial)))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds),
                           strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        protocol["num_shares"], protocol["reconstruction_threshold"],
        max_weight=protocol["max_weight"], clipping_range=protocol["clipping_range"],
        quantization_range=protocol["quantization_range"],
        modulus_range=protocol["modulus_range"], timeout=protocol["timeout"]))
    errors: dict[int, list[str]] = {}  # round -> the nodes' error replies
    workflow(RecordingGrid(grid, errors), legacy)
    seconds = time.perf_counter() - started
    log = strategy.log
    for r in range(1, cfg.rounds + 1):  # the workflow drops the reasons it halted on
        halted = r not in log or "ok" not in log[r]
        entry = log.setdefault(r, {})
        if halted:
            entry.update(round_entry([], [], None, False, {}))
        entry["failed"] = errors.get(r) or (
            ["secure aggregation halted (too few nodes replied)"] if halted else [])
    record = {k: protocol[k] for k in ("num_shares", "reconstruction_threshold",
                                       "clipping_range", "quantization_range", "max_weight")}
    return finish_run(cfg, task, log, strategy.current, n_nodes, seconds,
                      extra={"secagg": record}, patient_dp_plans=plan.patient_dp)


__all__ = ["make_secagg_client_app", "make_secagg_server_app"]
