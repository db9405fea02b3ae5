"""Federated CUT: the CycleGAN task's rounds, data and server optimizer with CUT's networks
and terms (`translators/cyclegan/losses.py`), so the objective decomposes over the nodes
the same way (K = 1 is central training).

Shared networks: G (the translator), H (PatchNCE's projection heads) and D_B. Each node
computes the terms its own images allow:

- a source node (images a): G's adversarial term against D_B, PatchNCE between a and
  G(a) (it needs only the node's own images and their translations), D_B's fake term on
  G(a);
- the reference node (images b): the identity PatchNCE between b and G(b), D_B's real
  term on b.

What the shared weights reveal: G and H the reference style and how patches of each
site's images are encoded; D_B what reference images look like. No reverse generator
travels, so unlike the CycleGAN no network renders the reference anatomy in a source
site's style. Patient-level DP is not available for CUT yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harmonize.configs import ConfigError
from harmonize.federated.cyclegan_task import CycleGANTask, NetGroups, NodeBatch
from harmonize.federated.node_state import Arrays
from harmonize.translators.cyclegan import losses
from harmonize.translators.cyclegan.networks import (
    ImagePool,
    NLayerDiscriminator,
    PatchProjection,
)


@dataclass
class CUTNets(NetGroups):
    g: torch.nn.Module
    h: torch.nn.Module
    d_b: torch.nn.Module

    GENERATORS = ("g", "h")
    DISCRIMINATORS = ("d_b",)


class CUTTask(CycleGANTask):
    kind = "cut"

    def __init__(self, config) -> None:
        super().__init__(config)
        if self.cg.loss.objective != "patchnce":
            raise ConfigError("CUTTask needs a config with loss.objective: patchnce")
        if config.privacy.mode == "patient-dp":
            raise ConfigError("privacy.mode patient-dp is not available for CUT yet; use "
                              "the CycleGAN (configs/cyclegan/quick.yaml) or mode none")

    def nets(self, arrays: Arrays | None = None) -> CUTNets:
        m = self.cg.model
        g = self._g()
        nets = CUTNets(g, PatchProjection(g.feature_channels()),
                       NLayerDiscriminator(ndf=m.ndf, n_layers=m.n_layers_d))
        return self._initialized(nets, arrays)

    def generator_objective(self, nets: CUTNets, batch: NodeBatch, w: losses.LossWeights):
        """This node's share of G's and H's loss; returns (loss, G(a), None)."""
        loss = torch.zeros((), device=next(nets.g.parameters()).device)
        fake_b = None
        if batch.a is not None:
            terms, fake_b = losses.cut_source_terms(nets.g, nets.h, nets.d_b, batch.a, w)
            loss = loss + batch.source_weight * losses.generator_loss(terms, w)
        if batch.b is not None and w.nce > 0:
            terms = losses.cut_reference_terms(nets.g, nets.h, batch.b, w)
            loss = loss + batch.reference_weight * losses.generator_loss(terms, w)
        return loss, fake_b, None

    def discriminator_objective(self, nets: CUTNets, batch: NodeBatch, fake_b, fake_a,
                                pool_b: ImagePool, pool_a: ImagePool) -> torch.Tensor:
        """D_B's real term on reference images, its fake term on this node's G(a)."""
        loss = torch.zeros((), device=next(nets.d_b.parameters()).device)
        if batch.a is not None:
            pooled_b, _ = pool_b.query(fake_b.detach())
            loss = loss + batch.source_weight * losses.discriminator_fake(nets.d_b, pooled_b)
        if batch.b is not None:
            loss = loss + batch.reference_weight * losses.discriminator_real(nets.d_b, batch.b)
        return loss

    def dp_plan(self, rows, node: str = ""):
        raise ConfigError("privacy.mode patient-dp is not available for CUT yet")

    def reverse_generator(self, arrays: Arrays):
        raise ConfigError("CUT has no reverse generator")
