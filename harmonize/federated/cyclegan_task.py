"""Federated CycleGAN: every site's style mapped to the reference site, no image moving.

Design (docs/federated.md has the privacy argument):
- Shared (averaged by FedAvg every round): the pooled generator G (any site ->
  reference) and the reference discriminator D_B. Nothing else leaves a node.
- A non-reference node k trains G with D_B's adversarial loss, the cycle a -> G -> F_k -> a
  through its own reverse generator F_k, the structure term, and pushes D_B to call G's
  outputs fake. F_k holds site k's style and never leaves the node (like FedBN's local
  layers). The half of the cycle that starts from reference images (b -> F -> G -> b)
  needs reference images, so it does not exist here.
- The reference node teaches D_B what real reference images look like and G to leave
  them unchanged (identity loss). That is how the reference domain's knowledge reaches
  the other sites: through D_B's (and G's) weights, never through images.
- Averaging D_B trained on "real only" at one node and "fake only" at the others is,
  for small local steps, one discriminator trained on mixed batches; source nodes take
  D_B steps 1/(n-1) as large so that real and fake weigh the same.
- Central baseline: the same code with all images at one node (both halves every step).
- No polarity guard: it would need the reference site's mean image at every node; fix
  inverted exports at the node (MONOCHROME1 is handled on read).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harmonize.data.intensity import IntensityPolicy
from harmonize.federated.config import FederatedConfig
from harmonize.federated.node_state import Arrays, cached_images
from harmonize.training.device import autocast, pick_device
from harmonize.translators.cyclegan import losses
from harmonize.translators.cyclegan.config import load_config
from harmonize.translators.cyclegan.networks import (
    ImagePool,
    NLayerDiscriminator,
    ResnetGenerator,
    init_weights,
    local_ncc_loss,
)
from harmonize.translators.cyclegan.translator import CycleGANTranslator


def _split(arrays: Arrays, prefix: str) -> Arrays:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


class CycleGANTask:
    kind = "cyclegan"
    eval_keys = ()

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        overrides = {"data.reference_site": config.reference_site, **config.cyclegan.set}
        self.cg = load_config(config.cyclegan.config, overrides)
        self.size = self.cg.data.image_size

    def _g(self) -> ResnetGenerator:
        m = self.cg.model
        return ResnetGenerator(ngf=m.ngf, n_blocks=m.n_blocks, upsample=m.upsample,
                               residual=m.residual)

    def _d(self) -> NLayerDiscriminator:
        return NLayerDiscriminator(ndf=self.cg.model.ndf, n_layers=self.cg.model.n_layers_d)

    def initial_arrays(self) -> Arrays:
        torch.manual_seed(self.config.seed)
        g, d = init_weights(self._g()), init_weights(self._d())
        return {**{f"g.{k}": v for k, v in g.state_dict().items()},
                **{f"d_b.{k}": v for k, v in d.state_dict().items()}}

    def _images(self, rows: pd.DataFrame) -> torch.Tensor:
        x = cached_images(rows["path"].astype(str).tolist(), self.size)
        return x * 2 - 1  # network space

    def train(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame,
              round_config: dict) -> tuple[Arrays, Arrays, dict]:
        server_round = int(round_config.get("server-round", 0))
        device = pick_device()
        ref_site = self.config.reference_site
        is_ref = (rows["site"].astype(str) == ref_site).to_numpy()
        xa = self._images(rows[~is_ref]).to(device) if (~is_ref).any() else None
        xb = self._images(rows[is_ref]).to(device) if is_ref.any() else None
        node_seed = zlib.crc32(",".join(sorted(rows["site"].astype(str).unique())).encode())
        torch.manual_seed(self.config.seed * 100_003 + node_seed + server_round)
        g, d_b = self._g(), self._d()
        g.load_state_dict(_split(arrays, "g."))
        d_b.load_state_dict(_split(arrays, "d_b."))
        f = self._g()
        if local:
            f.load_state_dict(_split(local, "f."))
        else:
            init_weights(f)
        g, d_b, f = g.to(device), d_b.to(device), f.to(device)
        lw, tc = self.cg.loss, self.cg.train
        w = losses.LossWeights.from_config(lw)
        opt_g = torch.optim.Adam([*g.parameters(), *f.parameters()], lr=tc.lr,
                                 betas=(tc.beta1, tc.beta2))
        # FedAvg averages one "real" D_B update (reference node) with n - 1 "fake" ones;
        # a source node's smaller step gives real and fake equal weight, as in a central
        # mixed batch (Adam ignores loss scaling, so the learning rate carries it)
        sources = max(1, int(round_config.get("nodes", 2)) - 1)
        lr_d = tc.lr / sources if xb is None else tc.lr
        opt_d = torch.optim.Adam(d_b.parameters(), lr=lr_d, betas=(tc.beta1, tc.beta2))
        pool = ImagePool(lw.pool_size, self.config.seed + server_round)
        rng = np.random.default_rng([self.config.seed, server_round, node_seed])
        bs = tc.batch_size
        sums = torch.zeros(2, device=device)  # (generator, discriminator), read once
        for _ in range(self.config.cyclegan.local_steps):
            # generator step: the terms this node's images allow (losses.py)
            d_b.requires_grad_(False)
            terms: losses.Terms = {}
            fake_b = None
            with autocast(device, tc.mixed_precision):
                if xa is not None:  # source half, without D_A (no reference images here)
                    a = xa[torch.from_numpy(rng.integers(len(xa), size=bs)).to(device)]
                    fake_b = g(a)
                    terms["G_gan"] = losses.adversarial_term(d_b, fake_b)
                    terms["cycle"] = losses.cycle_term(f(fake_b), a)
                    terms["idt"] = losses.identity_term(f, a)
                    if w.structure > 0:
                        terms["struct"] = local_ncc_loss(a, fake_b)
                if xb is not None:  # reference node: G leaves reference images as they are
                    b = xb[torch.from_numpy(rng.integers(len(xb), size=bs)).to(device)]
                    terms = losses.merge(terms, {"idt": losses.identity_term(g, b)})
                loss_g = losses.generator_loss(terms, w)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            # discriminator step: real terms here if reference images, fake terms if not
            d_b.requires_grad_(True)
            with autocast(device, tc.mixed_precision):
                loss_d = torch.zeros((), device=device)
                if fake_b is not None:
                    pooled, _ = pool.query(fake_b.detach())
                    loss_d = loss_d + losses.discriminator_fake(d_b, pooled)
                if xb is not None:
                    loss_d = loss_d + losses.discriminator_real(d_b, b)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            sums += torch.stack([loss_g.detach(), loss_d.detach()])
        steps = self.config.cyclegan.local_steps
        mean_g, mean_d = (sums / steps).tolist()
        shared = {**{f"g.{k}": v.detach().cpu().clone() for k, v in g.state_dict().items()},
                  **{f"d_b.{k}": v.detach().cpu().clone() for k, v in d_b.state_dict().items()}}
        own = ({f"f.{k}": v.detach().cpu().clone() for k, v in f.state_dict().items()}
               if xa is not None else {})
        return shared, own, {"loss_g": mean_g, "loss_d": mean_d, "num-examples": steps}

    def evaluate(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame) -> dict:
        return {"num-examples": 0}

    def translator(self, arrays: Arrays) -> CycleGANTranslator:
        m, inf = self.cg.model, self.cg.inference
        t = CycleGANTranslator(ngf=m.ngf, n_blocks=m.n_blocks, upsample=m.upsample,
                               residual=m.residual, tile_size=self.size,
                               tile_overlap=inf.tile_overlap, batch_size=inf.batch_size,
                               precision=inf.precision, polarity="keep",
                               passthrough_reference=inf.passthrough_reference,
                               policy=IntensityPolicy(mode=self.cg.data.intensity,
                                                      bits=self.cg.data.bits))
        g = self._g()
        g.load_state_dict(_split(arrays, "g."))
        return t.set_trained(g, np.zeros((32, 32), np.float32), self.config.reference_site)

    def save(self, arrays: Arrays, out: Path, metadata: dict) -> Path:
        return self.translator(arrays).save(out, metadata)
