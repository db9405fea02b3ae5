"""The ClientApp: what runs at each hospital. It reads only its own rows, trains with the
task's code, and replies with weights and a few scalar metrics; nothing else leaves.

Local state that must never leave (FedBN normalization layers, CycleGAN's site-specific
reverse generator and discriminator) lives in the node's ``context.state`` between
rounds. Any failure (no rows, unreadable manifest, bad image) becomes an error reply that
names the node, so the server can say which node failed.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from harmonize.federated.config import FederatedConfig
from harmonize.federated.node_round import (
    evaluate_round,
    node_error,
    node_label,
    setup_node,
    train_round,
)

ERROR_CODE = 2  # Flower's CLIENT_APP_RAISED_EXCEPTION


def optional_clipping_mod(msg: Message, context: Context, call_next):
    """Flower's client-side clipping when the server asks for it (client-fixed DP)."""
    configs = list(msg.content.config_records.values())
    if configs and KEY_CLIPPING_NORM in configs[0]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def make_client_app(config: FederatedConfig | None = None, config_from_run=None) -> ClientApp:
    """A ClientApp for this config; or, under `flwr run`, one that reads the config from
    the run (``config_from_run(context.run_config)``)."""
    app = ClientApp(mods=[optional_clipping_mod])

    def config_of(context: Context) -> FederatedConfig:
        return config if config is not None else config_from_run(context.run_config)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node = node_label(context)
        try:
            setup = setup_node(config_of(context), context)
            node = setup.node
            arrays, metrics = train_round(setup, context,
                                          msg.content["arrays"].to_torch_state_dict(),
                                          msg.content["config"])
        except Exception as err:  # noqa: BLE001 - reported to the server, named
            return Message(Error(code=ERROR_CODE, reason=node_error(node, err)), reply_to=msg)
        return Message(RecordDict({"arrays": ArrayRecord(arrays),
                                   "metrics": MetricRecord(metrics),
                                   "node": ConfigRecord({"name": node})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        node = node_label(context)
        try:
            setup = setup_node(config_of(context), context)
            node = setup.node
            metrics = evaluate_round(setup, context,
                                     msg.content["arrays"].to_torch_state_dict(),
                                     msg.content.config_records.get("config", {}))
        except Exception as err:  # noqa: BLE001
            return Message(Error(code=ERROR_CODE, reason=node_error(node, err)), reply_to=msg)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app
