"""Federated diffusion prior for DDIB: one site-conditioned UNet, trained by FedAvg.

Design (docs/federated.md has the privacy argument):
- Shared (averaged every round): one `diffusers.UNet2DModel` whose class label is the site
  (plus an "unknown site" label, used with probability `model.class_dropout`). Node k
  trains it on its own images with label k only; no image or per-image output leaves.
- Translation is DDIB with that one model: invert an image to noise under its site's
  label, regenerate under the reference site's label. The reference style reaches the
  other sites through the shared weights (the reference node's label), never through
  images; the structure shared by all sites (anatomy) is learned from everyone's data.
- Each site's class-embedding row is trained at that site only, so FedAvg (equal
  weights: every node reports its step count) would move it 1/n as far as the site did;
  the node scales its own row's change by the number of nodes, which makes the average
  move it as a central run would (this assumes one node per site, the default).
- Adam moments stay at the node between rounds (local state, never sent).
- Central baseline: the same code with all images at one node (labels per image).
- No polarity guard (it would need the reference site's mean image at every node); fix
  inverted exports at the node.
- `privacy.mode: patient-dp`: each local step is a patient-level DP-SGD step
  (`patient_dp.py`: Poisson-sampled patients, per-patient clipping, noise), fp32.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harmonize.configs import ConfigError, dotted
from harmonize.data.intensity import IntensityPolicy
from harmonize.federated import patient_dp
from harmonize.federated.config import FederatedConfig
from harmonize.federated.node_state import (
    Arrays,
    cached_images,
    load_optimizer_state,
    optimizer_arrays,
)
from harmonize.federated.task_interface import FederatedTask
from harmonize.training.device import autocast, pick_device
from harmonize.training.run import set_lr
from harmonize.translators.diffusion import losses
from harmonize.translators.diffusion.config import load_config
from harmonize.translators.diffusion.data import ALL_SITES
from harmonize.translators.diffusion.translator import INFERENCE_KEYS, DiffusionTranslator

CLASS_ROWS = "class_embedding.weight"


class DiffusionTask(FederatedTask):
    kind = "diffusion"
    eval_keys = ("loss",)

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        overrides = {"data.reference_site": config.reference_site,
                     "model.conditioning": "site-conditioned", "inference.mode": "ddib",
                     **dotted(config.diffusion.set)}
        self.dc = load_config(config.diffusion.config, overrides)
        if not config.diffusion.sites:
            raise ConfigError("diffusion.sites: list every site of the federation (class "
                              "labels all nodes must agree on)")
        self.sites = list(config.diffusion.sites)
        if config.reference_site not in self.sites:
            raise ConfigError(f"reference site '{config.reference_site}' is not one of "
                              f"diffusion.sites {self.sites}")
        self.size = self.dc.data.image_size
        self.null_class = len(self.sites)  # "unknown site"

    def _unet(self, arrays: Arrays | None = None):
        from diffusers import UNet2DModel  # slow import: only when a node trains

        unet = UNet2DModel(**self.dc.unet_config(self.null_class + 1))
        if arrays is not None:
            unet.load_state_dict(arrays)
        return unet

    def _scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.dc.scheduler_config())

    def initial_arrays(self) -> Arrays:
        torch.manual_seed(self.config.seed)
        return dict(self._unet().state_dict())

    def _data(self, rows: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        sites = rows["site"].astype(str)
        unknown = sorted(set(sites) - set(self.sites))
        if unknown:
            raise ConfigError(f"site(s) {unknown} are not in diffusion.sites {self.sites}")
        x = cached_images(rows["path"].astype(str).tolist(), self.size) * 2 - 1
        return x, torch.tensor([self.sites.index(s) for s in sites])

    def train(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame,
              round_config: dict) -> tuple[Arrays, Arrays, dict]:
        server_round = int(round_config.get("server-round", 1))
        nodes = int(round_config.get("nodes", 1))
        device = pick_device()
        x, labels = self._data(rows)
        x, labels = x.to(device), labels.to(device)
        node_seed = zlib.crc32(",".join(sorted(rows["site"].astype(str).unique())).encode())
        torch.manual_seed(self.config.seed * 100_003 + node_seed + server_round)
        rng = np.random.default_rng([self.config.seed, server_round, node_seed])
        unet, scheduler, tc = self._unet(arrays).to(device), self._scheduler(), self.dc.train
        unet.train()
        opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        if local:
            load_optimizer_state(opt, local)  # torch moves the moments to the parameters
        steps = self.config.diffusion.local_steps
        total = torch.zeros((), device=device)  # read once, after the last step
        extra, sampler, clipper, private = {}, None, None, unet
        if self.config.privacy.mode == "patient-dp":
            plan, patient_of_row = self.dp_plan(rows, str(rows["node"].iloc[0]))
            sampler = patient_dp.PatientSampler(patient_of_row, plan.sample_rate)
            clipper = patient_dp.PatientClipper(list(unet.parameters()), plan)
            private = patient_dp.per_sample(unet)
            extra = patient_dp.dp_metrics(plan, server_round * steps)
        try:
            with patient_dp.expected_hook_warnings():
                self._steps(unet, private, scheduler, opt, clipper, sampler, x, labels, rng,
                            server_round, steps, total)
        finally:
            if clipper is not None:
                private._close()  # Opacus' hooks off: the UNet is plain again
        shared = {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
        own_rows = labels.unique().cpu()
        if nodes > 1 and len(own_rows) == 1:  # see the module docstring
            before = arrays[CLASS_ROWS][own_rows]
            shared[CLASS_ROWS][own_rows] = before + nodes * (shared[CLASS_ROWS][own_rows] - before)
        own = {k: v.cpu() for k, v in optimizer_arrays(opt).items()}
        return shared, own, {"train_loss": float(total) / steps, "num-examples": steps,
                             **extra}

    def _steps(self, unet, private, scheduler, opt, clipper, sampler, x, labels, rng,
               server_round: int, steps: int, total: torch.Tensor) -> None:
        """The round's local steps (patient-level DP-SGD when a clipper is given); adds
        the losses to `total` in place."""
        tc, device = self.dc.train, x.device
        for i in range(steps):
            done = (server_round - 1) * steps + i + 1  # this node's steps so far: warm-up
            set_lr([opt], tc.lr * min(1.0, done / max(tc.lr_warmup_steps, 1)))
            if clipper is not None:  # patient-dp: its own sampling, clipping and noise
                total += self._private_step(private, scheduler, clipper, sampler, opt, x,
                                            labels)
                continue
            idx = torch.from_numpy(rng.integers(len(x), size=tc.batch_size)).to(device)
            classes = losses.drop_classes(labels[idx], self.dc.model.class_dropout,
                                          self.null_class)
            with autocast(device, tc.mixed_precision):
                loss = losses.denoising_loss(unet, scheduler, x[idx], classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), tc.max_grad_norm)
            opt.step()
            total += loss.detach()

    def dp_plan(self, rows: pd.DataFrame, node: str = ""):
        return patient_dp.node_plan(self.config.privacy, rows, self.config.rounds,
                                    lambda patients, per_step: self.config.diffusion.local_steps,
                                    self.dc.train.batch_size, node=node)

    def _private_step(self, private, scheduler, clipper, sampler, opt, x, labels
                      ) -> torch.Tensor:
        """One patient-level DP-SGD step; returns its loss (0 for an empty sample)."""
        idx, row_patient, n = sampler.sample()
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=x.device)
        if n:
            rows = torch.from_numpy(idx).to(x.device)
            classes = losses.drop_classes(labels[rows], self.dc.model.class_dropout,
                                          self.null_class)
            loss = losses.denoising_loss(private, scheduler, x[rows], classes)
            loss.backward()
        clipper.privatize(torch.from_numpy(row_patient) if n else None, n)
        opt.step()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame) -> dict:
        """The denoising loss of the global model on this node's held-out images (fixed
        noise and timesteps, so rounds compare); one number, nothing per image."""
        device = pick_device()
        x, labels = self._data(rows)
        unet = self._unet(arrays).to(device).eval()
        g = torch.Generator().manual_seed(self.config.seed)
        with autocast(device, self.dc.train.mixed_precision):
            loss = losses.denoising_loss(unet, self._scheduler(), x.to(device),
                                         labels.to(device), generator=g)
        return {"loss": float(loss), "num-examples": len(x)}

    def translator(self, arrays: Arrays) -> DiffusionTranslator:
        inf = self.dc.inference.model_dump()
        t = DiffusionTranslator(
            unet_config=self.dc.unet_config(self.null_class + 1),
            scheduler_config=self.dc.scheduler_config(), class_sites=self.sites,
            polarity="keep", policy=IntensityPolicy(mode=self.dc.data.intensity,
                                                    bits=self.dc.data.bits),
            **{k: inf[k] for k in INFERENCE_KEYS if k in inf and k != "polarity"})
        return t.set_trained({ALL_SITES: self._unet(arrays)}, np.zeros((32, 32), np.float32),
                             self.config.reference_site)

    def save(self, arrays: Arrays, out: Path, metadata: dict) -> Path:
        return self.translator(arrays).save(out, metadata)
