"""The downstream classifier as a federated task, with `run_epochs` from
`harmonize.classify.train` (FedAvg; FedProx's proximal term; FedBN keeps the
normalization layers local: the node trains and evaluates with its own, the server still
averages them for the global checkpoint used at unseen sites). Under `privacy.mode:
patient-dp` the node trains with patient-level DP-SGD (`patient_dp.py`) instead; a
BatchNorm CNN then uses GroupNorm (8 groups; BatchNorm mixes patients in a batch and its
running statistics would leave without noise, which is why Opacus refuses it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harmonize.classify.config import ClassifierConfig, TrainConfig
from harmonize.classify.metrics import binary_metrics
from harmonize.classify.networks import Classifier
from harmonize.classify.pretrained import load_imagenet_weights
from harmonize.classify.train import (
    check_labels,
    make_loader,
    make_loss,
    predict,
    run_epochs,
    save_classifier,
)
from harmonize.data.manifest import binary_targets
from harmonize.federated import patient_dp
from harmonize.federated.config import FederatedConfig
from harmonize.federated.node_state import (
    Arrays,
    cached_images,
    load_optimizer_state,
    optimizer_arrays,
)
from harmonize.federated.task_interface import FederatedTask
from harmonize.training.device import pick_device


class ClassifierTask(FederatedTask):
    kind = "classifier"
    eval_keys = ("auc", "accuracy")  # what evaluate() reports (besides num-examples)

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        self.cc = config.classifier

    @property
    def private(self) -> bool:
        return self.config.privacy.mode == "patient-dp"

    @property
    def norm(self) -> str:
        return "group" if self.private and self.cc.model.norm == "batch" else self.cc.model.norm

    def build(self) -> Classifier:
        m = self.cc.model
        return Classifier(m.arch, self.cc.image_size, m.width, self.norm,
                          imagenet_input=m.pretrained is not None)

    def steps_per_round(self, patients: int, per_step: int) -> int:
        """DP-SGD steps of one round: local_epochs passes in expectation."""
        return self.cc.local_epochs * max(1, round(patients / per_step))

    def dp_plan(self, rows: pd.DataFrame, node: str = ""):
        if self.cc.augment or self.cc.balance != "none":
            raise ValueError("patient-dp: set classifier.balance: none and augment: false "
                             "(class weights from a node's labels couple its patients' "
                             "gradients, a sampler replaces DP-SGD's patient sampling)")
        if self.cc.model.arch != "cnn":
            raise ValueError(f"patient-dp: classifier.model.arch {self.cc.model.arch} is not "
                             "supported (the ResNets and DenseNet keep BatchNorm, the ViT has "
                             "parameters Opacus cannot give per-image gradients); use cnn")
        return patient_dp.node_plan(self.config.privacy, rows, self.config.rounds,
                                    self.steps_per_round, self.cc.batch_size, node=node)

    def initial_arrays(self) -> Arrays:
        torch.manual_seed(self.config.seed)
        model = self.build()
        if self.cc.model.pretrained is not None:  # the server starts every node from it
            load_imagenet_weights(model, self.cc.model.pretrained)
        return dict(model.state_dict())

    def _local_keys(self, model: Classifier) -> list[str]:
        """What stays at the node: normalization layers (FedBN) and/or the head (FedPer).
        The server still averages them, which is what an unseen hospital gets."""
        local = set()
        if self.cc.local_bn:
            local |= {name for name, m in model.named_modules()
                      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm,
                                        torch.nn.GroupNorm))}
        if self.cc.local_head:
            local.add(model.head_name())
        return [k for k in model.state_dict() if k.rsplit(".", 1)[0] in local]

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
        seed = self.config.seed * 1000 + server_round  # not for DP noise (patient_dp.py)
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
        proximal = (proximal_mu, center) if center else None
        extra = {}
        if self.private:
            losses, extra = self._train_private(model, x, y, rows, loss_fn, opt, proximal,
                                                server_round)
        else:
            losses = run_epochs(model, make_loader(x, y, tc), loss_fn, opt,
                                self.cc.local_epochs, proximal=proximal)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        own = {k: state[k] for k in self._local_keys(model)}
        if self.cc.keep_optimizer:
            own.update({k: v.cpu() for k, v in optimizer_arrays(opt).items()})
        return state, own, {
            "train_loss": losses[-1], "num-examples": len(y), **extra}

    def _train_private(self, model, x, y, rows, loss_fn, opt, proximal,
                       server_round: int) -> tuple[list[float], dict]:
        """One round of patient-level DP-SGD (the module docstring of patient_dp)."""
        plan, patient_of_row = self.dp_plan(rows, str(rows["node"].iloc[0]))
        steps = plan.steps // self.config.rounds
        sampler = patient_dp.PatientSampler(patient_of_row, plan.sample_rate)
        clipper = patient_dp.PatientClipper(list(model.parameters()), plan)
        device = next(model.parameters()).device
        targets = torch.as_tensor(y, dtype=torch.float32)
        model.train()
        losses = []
        with patient_dp.private_gradients(model) as private:
            for _ in range(steps):
                idx, row_patient, n = sampler.sample()
                opt.zero_grad(set_to_none=True)
                if n:
                    xb, yb = x[idx].to(device), targets[idx].to(device)
                    loss = loss_fn(private(xb).float(), yb)
                    loss.backward()
                    losses.append(float(loss.detach()))
                    clipper.privatize(torch.from_numpy(row_patient), n)
                else:
                    clipper.privatize(None, 0)
                if proximal:  # data-independent: added after the noise
                    mu, center = proximal
                    for name, p in model.named_parameters():
                        p.grad += mu * (p.detach() - center[name])
                opt.step()
        done = server_round * steps
        return ([float(np.mean(losses)) if losses else float("nan")],
                patient_dp.dp_metrics(plan, done))

    def evaluate(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame) -> dict:
        x, y = self._data(rows)
        p = predict(self._model(arrays, local).eval(), x)
        m = binary_metrics(y, p)
        return {"auc": m["auc"], "accuracy": m["accuracy"], "num-examples": len(y)}

    def save(self, arrays: Arrays, out: Path, metadata: dict) -> Path:
        model = self.build()
        model.load_state_dict(arrays)
        cfg = ClassifierConfig.model_validate({"model": {**self.cc.model.model_dump(),
                                                         "norm": self.norm},
                                               "data": {"image_size": self.cc.image_size}})
        return save_classifier(model, out, cfg, metadata)
