"""The ClientApp: what runs at each hospital. It reads only its own rows, trains with the
task's code, and replies with weights and a few scalar metrics; nothing else leaves.

Local state that must never leave (FedBN normalization layers, CycleGAN's site-specific
reverse generator and discriminator) lives in the node's ``context.state`` between
rounds. Any failure (no rows, unreadable manifest, bad image) becomes an error reply that
names the node, so the server can say which node failed.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from harmonize.federated import patient_dp
from harmonize.federated.config import FederatedConfig
from harmonize.federated.nodes import node_rows, resolve_node, split_rows
from harmonize.federated.server_state import (
    is_checkpoint_round,
    load_node_state,
    save_node_state,
)
from harmonize.federated.tasks import build_task

ERROR_CODE = 2  # Flower's CLIENT_APP_RAISED_EXCEPTION


def optional_clipping_mod(msg: Message, context: Context, call_next):
    """Flower's client-side clipping when the server asks for it (client-fixed DP)."""
    configs = list(msg.content.config_records.values())
    if configs and KEY_CLIPPING_NORM in configs[0]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def update_norm(new: dict, old: dict) -> float:
    """L2 norm of this round's change of the shared weights (what DP clipping bounds)."""
    total = sum(float(((new[k].float() - old[k].float()) ** 2).sum())
                for k in new if k in old and new[k].is_floating_point())
    return total ** 0.5


def run_round_config(config) -> dict:
    """The round's settings with `server-round` as the run counts it: Flower numbers the
    rounds of each start from 1, a resumed run sends how many were done before."""
    out = dict(config)
    out["server-round"] = int(out.get("server-round", 1)) + int(out.get("round-offset", 0))
    return out


def _label(context: Context) -> str:
    """How to name this node in an error before its name is known."""
    return str(context.node_config.get("node",
                                       f"partition {context.node_config.get('partition-id')}"))


def make_client_app(config: FederatedConfig | None = None, config_from_run=None) -> ClientApp:
    """A ClientApp for this config; or, under `flwr run`, one that reads the config from
    the run (``config_from_run(context.run_config)``)."""
    app = ClientApp(mods=[optional_clipping_mod])

    def setup(context: Context):
        cfg = config if config is not None else config_from_run(context.run_config)
        torch.set_num_threads(cfg.threads_per_node)
        node, manifest = resolve_node(context.node_config, cfg.manifest)
        return cfg, node, manifest

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node = _label(context)
        try:
            cfg, node, manifest = setup(context)
            task = build_task(cfg)
            rows, _ = split_rows(node_rows(manifest, node))
            round_config = run_round_config(msg.content["config"])
            server_round = int(round_config["server-round"])
            local = (context.state["local"].to_torch_state_dict()
                     if "local" in context.state.array_records else None)
            offset = int(round_config.get("round-offset", 0))
            if local is None and offset and server_round == offset + 1:  # resumed: what
                local = load_node_state(cfg.out, node, offset)  # this node kept then
            received = msg.content["arrays"].to_torch_state_dict()
            started = time.perf_counter()
            arrays, local, metrics = task.train(received, local, rows, round_config)
            metrics["compute_seconds"] = time.perf_counter() - started  # for overhead reports
            if local:
                context.state["local"] = ArrayRecord(local)
                if is_checkpoint_round(server_round, int(round_config.get(
                        "checkpoint-every", 10)), int(round_config.get("rounds", 0))):
                    save_node_state(cfg.out, node, server_round, local)
            metrics["update_norm"] = update_norm(arrays, received)
            # what leaves this node this round (weights; metrics are a few bytes)
            metrics["bytes_sent"] = float(sum(v.numel() * v.element_size()
                                              for v in arrays.values()))
        except Exception as err:  # noqa: BLE001 - reported to the server, named
            return Message(Error(code=ERROR_CODE, reason=f"node {node}: "
                                 f"{' '.join(str(err).split())}"), reply_to=msg)
        if cfg.privacy.dp != "none":
            metrics["num-examples"] = 1  # DP: equal weights, so one node's sensitivity is C
        metrics = patient_dp.public_metrics(metrics, cfg.privacy)  # no loss, no counts
        return Message(RecordDict({"arrays": ArrayRecord(arrays),
                                   "metrics": MetricRecord(metrics),
                                   "node": ConfigRecord({"name": node})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        node = _label(context)
        try:
            cfg, node, manifest = setup(context)
            task = build_task(cfg)
            train_rows, test = split_rows(node_rows(manifest, node))
            config = run_round_config(msg.content.config_records.get("config", {}))
            last = int(config.get("server-round", 0)) == int(config.get("rounds", -1))
            if last:  # e.g. a node's own translator, kept there
                task.finish(msg.content["arrays"].to_torch_state_dict(), train_rows)
            if test.empty:  # same keys as the others (Flower requires it), zero weight
                metrics = {**dict.fromkeys(task.eval_keys, 0.0), "num-examples": 0}
            else:
                local = (context.state["local"].to_torch_state_dict()
                         if "local" in context.state.array_records else None)
                metrics = task.evaluate(msg.content["arrays"].to_torch_state_dict(), local,
                                        test)
        except Exception as err:  # noqa: BLE001
            return Message(Error(code=ERROR_CODE, reason=f"node {node}: "
                                 f"{' '.join(str(err).split())}"), reply_to=msg)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app
