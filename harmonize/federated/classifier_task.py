"""The downstream classifier as a federated task, with `run_epochs` from
`harmonize.classify.train` (FedAvg; FedProx's proximal term; FedBN keeps the
normalization layers local: the node trains and evaluates with its own, the server still
averages them for the global checkpoint used at unseen sites)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harmonize.classify.config import ClassifierConfig, TrainConfig
from harmonize.classify.metrics import binary_metrics
from harmonize.classify.networks import Classifier
from harmonize.classify.train import (
    check_labels,
    make_loader,
    make_loss,
    predict,
    run_epochs,
    save_classifier,
)
from harmonize.data.manifest import binary_targets
from harmonize.federated.config import FederatedConfig
from harmonize.federated.node_state import (
    Arrays,
    cached_images,
    load_optimizer_state,
    optimizer_arrays,
)
from harmonize.training.device import pick_device


class ClassifierTask:
    kind = "classifier"
    eval_keys = ("auc", "accuracy")  # what evaluate() reports (besides num-examples)

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        self.cc = config.classifier

    def build(self) -> Classifier:
        m = self.cc.model
        return Classifier(m.arch, self.cc.image_size, m.width, m.norm)

    def initial_arrays(self) -> Arrays:
        torch.manual_seed(self.config.seed)
        return dict(self.build().state_dict())

    def _local_keys(self, model: Classifier) -> list[str]:
        if not self.cc.local_bn:
            return []
        norm_modules = {name for name, m in model.named_modules()
                        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm,
                                          torch.nn.GroupNorm))}
        return [k for k in model.state_dict() if k.rsplit(".", 1)[0] in norm_modules]

    def _data(self, rows: pd.DataFrame) -> tuple[torch.Tensor, np.ndarray]:
        return (cached_images(rows["path"].astype(str).tolist(), self.cc.image_size),
                binary_targets(rows))

    def _model(self, arrays: Arrays, local: Arrays | None) -> Classifier:
        model = self.build()
        state = dict(arrays)
        if local:  # FedBN: this node's own normalization layers
            state.update({k: v for k, v in local.items() if not k.startswith("opt.")})
        model.load_state_dict(state)
        return model

    def train(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame,
              round_config: dict) -> tuple[Arrays, Arrays, dict]:
        """round_config: the server's settings for this round (server-round, proximal-mu)."""
        server_round = int(round_config.get("server-round", 0))
        proximal_mu = float(round_config.get("proximal-mu", 0.0))
        x, y = self._data(rows)
        check_labels(y)
        model = self._model(arrays, local).to(pick_device())
        seed = self.config.seed * 1000 + server_round
        torch.manual_seed(seed)
        tc = TrainConfig(batch_size=self.cc.batch_size, lr=self.cc.lr,
                         weight_decay=self.cc.weight_decay, augment=self.cc.augment,
                         balance=self.cc.balance, seed=seed, progress=False)
        opt = (torch.optim.SGD(model.parameters(), lr=tc.lr, momentum=0.9,
                               weight_decay=tc.weight_decay)
               if self.cc.optimizer == "sgd" else
               torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay))
        if self.cc.keep_optimizer and local:
            load_optimizer_state(opt, local)  # torch moves the moments to the parameters
        center = ({n: p.detach().clone() for n, p in model.named_parameters()}
                  if proximal_mu > 0 else None)
        loss_fn = make_loss(y, tc.balance).to(pick_device())
        losses = run_epochs(model, make_loader(x, y, tc), loss_fn, opt,
                            self.cc.local_epochs,
                            proximal=(proximal_mu, center) if center else None)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        own = {k: state[k] for k in self._local_keys(model)}
        if self.cc.keep_optimizer:
            own.update({k: v.cpu() for k, v in optimizer_arrays(opt).items()})
        return state, own, {
            "train_loss": losses[-1], "num-examples": len(y)}

    def evaluate(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame) -> dict:
        x, y = self._data(rows)
        p = predict(self._model(arrays, local).eval(), x)
        m = binary_metrics(y, p)
        return {"auc": m["auc"], "accuracy": m["accuracy"], "num-examples": len(y)}

    def save(self, arrays: Arrays, out: Path, metadata: dict) -> Path:
        model = self.build()
        model.load_state_dict(arrays)
        cfg = ClassifierConfig.model_validate({"model": self.cc.model.model_dump(),
                                               "data": {"image_size": self.cc.image_size}})
        return save_classifier(model, out, cfg, metadata)
