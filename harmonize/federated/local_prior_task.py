"""Federated DDIB with local priors (Su et al., ICLR 2023: the two priors of DDIB are
trained independently, so translation needs no shared training at all).

- Every node trains the prior of its own site(s) on its own images, with the central
  per-site training code (`train_diffusion`, the node's rows only, that site as its one
  model); the weights stay at the node (OUT/nodes/NODE/prior_SITE).
- Only the reference node sends anything: its prior's (EMA) weights. The server passes
  them to every node in the evaluation message that ends the round.
- Each node then holds DDIB's two priors for its own images (its own and the reference
  site's) and saves a translator checkpoint at the node (OUT/nodes/NODE/model):
  `harmonize apply --model` runs there, on images that never leave; only the denoising
  loss on its held-out images returns.

Equal to central per-site DDIB by construction (the same code trains each prior on the
same images), up to seeds. What travels: the reference prior, which can draw
reference-style images (the memorization check runs on its draws). Node-level DP has
nothing to average here. Patient-level DP (`privacy.mode: patient-dp`) is needed for the
reference prior alone, the only weights that leave a node: the reference node trains it
with DP-SGD (`patient_dp.py`; same UNet, loss, optimizer, warm-up and EMA as central
training, fp32, patients drawn by Poisson sampling instead of epochs); the other priors
never leave their node and train as before.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harmonize.configs import ConfigError
from harmonize.data.intensity import IntensityPolicy
from harmonize.data.manifest import save_manifest
from harmonize.federated import patient_dp
from harmonize.federated.config import FederatedConfig
from harmonize.federated.node_state import Arrays, cached_images
from harmonize.federated.task_interface import FederatedTask
from harmonize.translators.diffusion.config import load_config
from harmonize.translators.diffusion.translator import INFERENCE_KEYS, DiffusionTranslator


def aggregate_reference_reply(server_round: int, replies) -> tuple:
    """The reference node's arrays (its prior, or its landmarks); the other nodes sent
    no weights. Shared by the tasks in which only the reference node sends."""
    from flwr.app import ArrayRecord, MetricRecord

    replies = [m for m in replies if not m.has_error()]
    ref = [m for m in replies if float(m.content["metrics"].get("is_reference", 0)) > 0]
    if len(ref) != 1:  # nothing from the reference node (or two): nothing to pass on
        return None, None
    metrics = {}
    for key in ("train_loss", "compute_seconds"):
        values = [float(m.content["metrics"][key]) for m in replies
                  if key in m.content["metrics"]]
        if values:
            metrics[key] = float(np.mean(values))
    # what left a node: the reference node's arrays; every other node sent nothing
    metrics["bytes_sent"] = float(ref[0].content["metrics"].get("bytes_sent", 0))
    return ArrayRecord(ref[0].content["arrays"].to_torch_state_dict()), MetricRecord(metrics)


class LocalPriorTask(FederatedTask):
    kind = "diffusion"
    eval_keys = ("loss",)

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        self.ref = str(config.reference_site)
        self.dc = self._prior_config(self.ref, None, None)
        self.size = self.dc.data.image_size

    def _prior_config(self, site: str, manifest: Path | None, out: Path | None):
        """The central per-site config of one site's prior."""
        c = self.config.diffusion
        overrides = {"model.conditioning": "per-site", "inference.mode": "ddib", **c.set,
                     "data.reference_site": site, "train.steps": c.local_steps,
                     "train.seed": self.config.seed, "train.progress": False,
                     "train.sample_every": c.local_steps, "train.checkpoint_every":
                     c.local_steps}
        if manifest is not None:
            overrides.update({"data.manifest": str(manifest), "train.out": str(out),
                              "inference.mode": "sdedit"})  # one site: its own prior only
        return load_config(c.config, overrides)

    def initial_arrays(self) -> Arrays:
        return {}  # nothing exists before the reference node has trained its prior

    def custom_aggregation(self):
        return aggregate_reference_reply

    # --- at a node ----------------------------------------------------------------------
    def train(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame,
              round_config: dict) -> tuple[Arrays, Arrays, dict]:
        from harmonize.translators.diffusion.train import train_diffusion

        node = str(rows["node"].iloc[0])
        losses, shared, extra = [], {}, {}
        # a rerun into the same OUT trains afresh (this run's priors, this run's model)
        shutil.rmtree(self.home(node), ignore_errors=True)
        for site in sorted(rows["site"].astype(str).unique()):
            run = self.home(node) / f"prior_{site}"
            run.mkdir(parents=True, exist_ok=True)
            manifest = run / "manifest.csv"
            save_manifest(rows[rows["site"].astype(str) == site], manifest)
            config = self._prior_config(site, manifest, run / "run")
            private = self.config.privacy.mode == "patient-dp" and site == self.ref
            if private:
                model, loss, extra = self._train_private(config, rows[rows["site"].astype(
                    str) == site].reset_index(drop=True), node)
                losses.append(loss)
            else:
                model = train_diffusion(config)
                log = pd.read_csv(run / "run" / "train_log.csv")
                losses.append(float(log["loss"].tail(max(1, len(log) // 5)).mean()))
            if site == self.ref:
                shared = self._own_prior(model, site).state_dict()
        return ({k: v.detach().cpu().clone() for k, v in shared.items()}, {},
                {"train_loss": float(np.mean(losses)), "is_reference": float(bool(shared)),
                 "num-examples": 1, **extra})

    # --- patient-level DP of the reference prior ------------------------------------------
    def dp_plan(self, rows: pd.DataFrame, node: str = ""):
        """The reference prior's DP-SGD; None at a node without the reference site
        (nothing of it leaves)."""
        ref_rows = rows[rows["site"].astype(str) == self.ref].reset_index(drop=True)
        if ref_rows.empty:
            return None
        return patient_dp.node_plan(self.config.privacy, ref_rows, 1,
                                    lambda patients, per_step: self.config.diffusion.local_steps,
                                    self.dc.train.batch_size, node=node)

    def _train_private(self, config, rows: pd.DataFrame, node: str) -> tuple[Path, float, dict]:
        """Train the reference prior with patient-level DP-SGD; returns (checkpoint,
        mean loss of the last fifth of the steps, the DP metrics)."""
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.training_utils import EMAModel

        from harmonize.training.device import pick_device
        from harmonize.training.run import set_lr
        from harmonize.translators.diffusion import losses

        tc, device = config.train, pick_device()
        plan, patient_of_row = self.dp_plan(rows, node)
        torch.manual_seed(self.config.seed * 7919 + 1)  # initial weights, timesteps
        unet = UNet2DModel(**config.unet_config(None)).to(device)
        params = list(unet.parameters())
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        ema = EMAModel(params, decay=tc.ema_decay, use_ema_warmup=True, power=tc.ema_power,
                       foreach=True)
        ema.to(device)
        scheduler = DDPMScheduler(**config.scheduler_config())
        x = (cached_images(rows["path"].astype(str).tolist(), self.size) * 2 - 1).to(device)
        sampler = patient_dp.PatientSampler(patient_of_row, plan.sample_rate)  # OS entropy
        clipper = patient_dp.PatientClipper(params, plan)
        unet.train()
        history = []
        with patient_dp.private_gradients(unet) as private:
            for step in range(1, plan.steps + 1):
                set_lr([opt], tc.lr * min(1.0, step / max(tc.lr_warmup_steps, 1)))
                idx, row_patient, n = sampler.sample()
                opt.zero_grad(set_to_none=True)
                if n:
                    loss = losses.denoising_loss(private, scheduler, x[torch.from_numpy(idx)])
                    loss.backward()
                    history.append(float(loss.detach()))
                    clipper.privatize(torch.from_numpy(row_patient), n)
                else:
                    clipper.privatize(None, 0)
                opt.step()
                ema.step(params)
        ema.copy_to(params)
        meta = {"federated": {"prior": "local", "node": node, "patient_dp":
                              patient_dp.dp_metrics(plan, plan.steps)}}
        model = self.translator({self.ref: unet.eval()}).save(Path(tc.out) / "model", meta)
        tail = history[-max(1, len(history) // 5):]
        return model, float(np.mean(tail)) if tail else float("nan"), \
            patient_dp.dp_metrics(plan, plan.steps)

    @staticmethod
    def _own_prior(model: Path, site: str):
        from harmonize.translators import load_translator

        return load_translator(model).unets_[site]

    def finish(self, arrays: Arrays, rows: pd.DataFrame) -> Path | None:
        """After the last round: the node's DDIB translator (its own priors + the
        reference prior just received), saved at the node."""
        if not arrays:
            return None
        node = str(rows["node"].iloc[0])
        sites = sorted(rows["site"].astype(str).unique())
        unets = {s: self._own_prior(self.home(node) / f"prior_{s}" / "run" / "model", s)
                 for s in sites if s != self.ref}
        unets[self.ref] = self._unet(arrays)
        meta = {"federated": {"prior": "local", "node": node}, "sites": sites}
        return self.translator(unets).save(self.home(node) / "model", meta)

    @torch.no_grad()
    def evaluate(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame) -> dict:
        """Denoising loss of this node's own prior(s) on its held-out images."""
        from diffusers import DDPMScheduler

        from harmonize.translators.diffusion import losses

        node = str(rows["node"].iloc[0])
        total, n = 0.0, 0
        for site, part in rows.groupby(rows["site"].astype(str)):
            unet = self._own_prior(self.home(node) / f"prior_{site}" / "run" / "model", site)
            x = cached_images(part["path"].astype(str).tolist(), self.size) * 2 - 1
            g = torch.Generator().manual_seed(self.config.seed)
            loss = losses.denoising_loss(unet.eval(), DDPMScheduler(**self.dc.scheduler_config()),
                                         x, None, generator=g)
            total, n = total + float(loss) * len(x), n + len(x)
        return {"loss": total / max(n, 1), "num-examples": n}

    # --- the translator -----------------------------------------------------------------
    def _unet(self, arrays: Arrays):
        from diffusers import UNet2DModel

        unet = UNet2DModel(**self.dc.unet_config(None))
        unet.load_state_dict(arrays)
        return unet.eval()

    def translator(self, unets: dict) -> DiffusionTranslator:
        inf = self.dc.inference.model_dump()
        t = DiffusionTranslator(
            unet_config=self.dc.unet_config(None), scheduler_config=self.dc.scheduler_config(),
            polarity="keep", policy=IntensityPolicy(mode=self.dc.data.intensity,
                                                    bits=self.dc.data.bits),
            **{k: inf[k] for k in INFERENCE_KEYS if k in inf and k != "polarity"})
        return t.set_trained(unets, np.zeros((32, 32), np.float32), self.ref)

    def save(self, arrays: Arrays, out: Path, metadata: dict) -> Path:
        """The server's checkpoint: the reference prior alone (a new site trains its own
        prior and translates with both at its node)."""
        if not arrays:
            raise ConfigError("no reference prior arrived: is the reference site a node?")
        return self.translator({self.ref: self._unet(arrays)}).save(out, metadata)
