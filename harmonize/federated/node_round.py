"""One node's round, the same under both apps: the Message-API ClientApp
(`client_app.py`) and the SecAgg+ adapter (`secure_aggregation.SecAggNode`) call these
and differ only in how the result travels (arrays in the clear, or a masked update).

A node reads only its own rows, keeps its local state (FedBN layers, CycleGAN's site
networks) in `context.state` and, at checkpoint rounds, on its disk for `--resume`; any
failure becomes one line that names the node, so the server can say which node failed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd
import torch
from flwr.app import ArrayRecord, Context

from harmonize.federated import patient_dp
from harmonize.federated.config import FederatedConfig
from harmonize.federated.node_state import Arrays
from harmonize.federated.nodes import node_rows, resolve_node, split_rows
from harmonize.federated.server_state import (
    is_checkpoint_round,
    load_node_state,
    save_node_state,
)
from harmonize.federated.task_interface import FederatedTask
from harmonize.federated.tasks import build_task


def node_label(context: Context) -> str:
    """How to name this node in an error before its name is known."""
    return str(context.node_config.get("node",
                                       f"partition {context.node_config.get('partition-id')}"))


def node_error(node: str, err: BaseException) -> str:
    """One line naming the node (once, however deep the error was raised)."""
    text = " ".join(str(err).split())
    return text if text.startswith(f"node {node}: ") else f"node {node}: {text}"


def run_round_config(config) -> dict:
    """The round's settings with `server-round` as the run counts it: Flower numbers the
    rounds of each start from 1, a resumed run sends how many were done before."""
    out = dict(config)
    out["server-round"] = int(out.get("server-round", 1)) + int(out.get("round-offset", 0))
    return out


def update_norm(new: Arrays, old: Arrays) -> float:
    """L2 norm of this round's change of the shared weights (what DP clipping bounds)."""
    total = sum(float(((new[k].float() - old[k].float()) ** 2).sum())
                for k in new if k in old and new[k].is_floating_point())
    return total ** 0.5


@dataclass
class NodeSetup:
    cfg: FederatedConfig
    node: str
    task: FederatedTask
    train_rows: pd.DataFrame
    test_rows: pd.DataFrame


def setup_node(cfg: FederatedConfig, context: Context) -> NodeSetup:
    torch.set_num_threads(cfg.threads_per_node)
    node, manifest = resolve_node(context.node_config, cfg.manifest)
    train, test = split_rows(node_rows(manifest, node))
    return NodeSetup(cfg, node, build_task(cfg), train, test)


def _kept(context: Context) -> Arrays | None:
    state = context.state
    return state["local"].to_torch_state_dict() if "local" in state.array_records else None


def train_round(setup: NodeSetup, context: Context, received: Arrays,
                config) -> tuple[Arrays, dict]:
    """This node's training round: (the arrays it sends, its public metrics)."""
    cfg, node = setup.cfg, setup.node
    round_config = run_round_config(config)
    server_round = int(round_config["server-round"])
    local = _kept(context)
    offset = int(round_config.get("round-offset", 0))
    if local is None and offset and server_round == offset + 1:  # resumed: what this
        local = load_node_state(cfg.out, node, offset)  # node kept at the saved round
    started = time.perf_counter()
    arrays, local, metrics = setup.task.train(received, local, setup.train_rows, round_config)
    metrics["compute_seconds"] = time.perf_counter() - started  # for overhead reports
    if local:
        context.state["local"] = ArrayRecord(local)
        if is_checkpoint_round(server_round, int(round_config.get("checkpoint-every", 10)),
                               int(round_config.get("rounds", 0))):
            save_node_state(cfg.out, node, server_round, local)
    metrics["update_norm"] = update_norm(arrays, received)
    # what leaves this node this round (weights; metrics are a few bytes)
    metrics["bytes_sent"] = float(sum(v.numel() * v.element_size() for v in arrays.values()))
    if cfg.privacy.dp != "none":
        metrics["num-examples"] = 1  # node DP: equal weights, so one node's sensitivity is C
    return arrays, patient_dp.public_metrics(metrics, cfg.privacy)  # no loss, no counts


def evaluate_round(setup: NodeSetup, context: Context, received: Arrays, config) -> dict:
    """This node's scores of the global model on its held-out rows; after the last round
    the task's `finish` (e.g. a node's own translator, kept there)."""
    config = run_round_config(config)
    if int(config.get("server-round", 0)) == int(config.get("rounds", -1)):
        setup.task.finish(received, setup.train_rows)
    if setup.test_rows.empty:  # same keys as the others (Flower requires it), zero weight
        return {**dict.fromkeys(setup.task.eval_keys, 0.0), "num-examples": 0}
    return setup.task.evaluate(received, _kept(context), setup.test_rows)
