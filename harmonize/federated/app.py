"""The Flower app that `flwr run .` (pyproject: [tool.flwr.app]) and a deployment load:
the same ClientApp / ServerApp as `harmonize federated`, configured from the run config
(``config`` = a configs/federated YAML, ``data``, ``reference-site``, ``out``; absolute
paths, as SuperNodes run elsewhere)."""

from __future__ import annotations

from pathlib import Path

from harmonize.federated.client_app import make_client_app
from harmonize.federated.config import FederatedConfig, load_federated_config
from harmonize.federated.nodes import fill_site_lists
from harmonize.federated.secure_aggregation import (
    make_secagg_client_app,
    make_secagg_server_app,
)
from harmonize.federated.server_app import make_server_app

APP_ROOT = Path(__file__).resolve().parents[2]


def config_from_run(run_config: dict) -> FederatedConfig:
    overrides = {"manifest": run_config.get("data") or None,
                 "reference_site": run_config.get("reference-site") or None,
                 "out": run_config.get("out") or None,
                 "rounds": run_config.get("rounds") or None,
                 "min_nodes": run_config.get("min-nodes") or None,
                 "progress": False}
    path = Path(str(run_config["config"]))
    if not path.is_absolute() and not path.is_file():  # relative to the app (FAB) root
        path = APP_ROOT / path
    return fill_site_lists(load_federated_config(path, overrides))


client_app = make_client_app(config_from_run=config_from_run)
server_app = make_server_app(config_from_run=config_from_run)

# SecAgg+ (privacy.secagg) runs Flower's legacy API, so it is a second pair of apps: point
# [tool.flwr.app.components] at harmonize.federated.app:secagg_server_app /
# secagg_client_app for such a deployment (docs/federated.md)
secagg_client_app = make_secagg_client_app(config_from_run=config_from_run)
secagg_server_app = make_secagg_server_app(config_from_run=config_from_run)
