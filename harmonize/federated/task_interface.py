"""What the server and the nodes ask of a federated task, in one place.

Every task (classifier, CycleGAN/CUT/histogram-residual, diffusion, histogram, local
priors) subclasses `FederatedTask`: the abstract methods are what every round needs;
the others have defaults that mean "this task does not use it", so the apps call them
unconditionally instead of probing for attributes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from harmonize.federated.server_optimizer import ServerOptimizerSpec

Arrays = dict[str, torch.Tensor]


class FederatedTask(ABC):
    eval_keys: tuple[str, ...] = ()  # what evaluate() reports besides num-examples

    @abstractmethod
    def initial_arrays(self) -> Arrays:
        """The global model (or release slot) the first round starts from."""

    @abstractmethod
    def train(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame,
              round_config: dict) -> tuple[Arrays, Arrays | None, dict]:
        """One node's round: (what it sends, what it keeps, its metrics)."""

    @abstractmethod
    def evaluate(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame) -> dict:
        """One node's scores of the global model on its held-out rows."""

    @abstractmethod
    def save(self, arrays: Arrays, out: Path, metadata: dict) -> Path:
        """The global model as a checkpoint of the contract format."""

    @abstractmethod
    def dp_plan(self, rows: pd.DataFrame, node: str = "") -> tuple[Any, Any] | None:
        """patient-dp: this node's calibrated plan and patient index (None: nothing it
        holds leaves the node); raise ConfigError where the task cannot run privately."""

    def custom_aggregation(self) -> Callable | None:
        """A replacement for averaging the replies (e.g. one node's release); None: the
        strategy's aggregation."""
        return None

    def server_optimizer(self) -> ServerOptimizerSpec | None:
        """A server-side optimizer over the averaged updates (FedOpt); None: the mean is
        the new model."""
        return None

    def server_settings(self) -> dict:
        """Extra values sent to every node each round."""
        return {}

    def home(self, node: str) -> Path:
        """Where a node keeps what it never sends (its own priors, its translator)."""
        return Path(self.config.out or ".") / "nodes" / node

    def finish(self, arrays: Arrays, rows: pd.DataFrame) -> Path | None:
        """At a node after the last round (e.g. a translator kept there)."""
        return None
