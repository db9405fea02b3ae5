"""Federated CycleGAN whose objective decomposes exactly over the nodes (Song & Ye 2021).

The same task trains the histogram-residual translator (a CycleGAN config with a
`landmarks` section): the landmarks come from a finished federated histogram run
(`landmarks.checkpoint`, public numbers, DP if that run used it), every node maps its own
images onto them before its terms, and only the four networks travel, as below.

The central many-to-one objective (`translators/cyclegan/losses.py`) is a sum of terms
that each need one domain's real images. Every node computes exactly the terms its own
images allow, with the central loss functions:

- a source node k (site k's images a, condition c = k): G's adversarial term against
  D_B, the cycle a -> G -> F(., k) -> a, F's identity on a, the structure term, D_B's
  fake term on G(a) and D_A's real term on a;
- the reference node (images b): G's identity on b, the cycle b -> F(., c) -> G -> b and
  F's adversarial term against D_A for every source condition c in turn, the structure
  term, D_B's real term on b and D_A's fake term on F(b, c).

So all four networks are shared (averaged): G (any site -> reference; the translator),
F and D_A (conditioned on the source site) and D_B. Each node weighs its half by its
share of that half's images (the counts come from the server, else equal shares), takes
K local SGD steps, and the server sums the updates into one gradient and steps central
training's Adam on it (`server_optimizer.py`). With K = 1 every gradient is taken at the
same weights and their sum is the central gradient: a round is one central step. What
the shared weights reveal: G the reference site's style; F(., k) and D_A(., k) site k's
style (F renders reference anatomy the way site k's scanner would); D_B what reference
images look like. No image leaves a node; the image pool of past fakes stays local.

The reference node draws as many images per step as the source nodes together (S x
batch_size), one per source condition, as a central batch pairs each source image with
a reference image. The polarity guard of central training needs the reference site's
mean image at every node: a small thumbnail (histogram.template, 16 px) that the
federated histogram task releases (DP-noised with the landmarks when that run is
private). The histogram-residual translator takes it from `landmarks.checkpoint`;
CycleGAN and CUT from `cyclegan.template`. Without it there is no guard: fix inverted
exports at the node.

Patient-level DP (`privacy.mode: patient-dp`, `patient_dp.py`): every one of the four
networks' updates touches a node's real images (at a source node G, F through the
cycle, D_A through its real term, D_B through G(a); at the reference node the same with
the roles swapped), so all four train privately: each local step samples patients,
privatizes the generators' gradient (G, F) and then the discriminators' (D_A, D_B), each
clipped per patient and noised (two releases per step in the accounting). The image
pool is off (past fakes would carry other steps' patients into this step's gradient).
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from harmonize.configs import ConfigError, dotted
from harmonize.data import polarity as pol
from harmonize.data.fingerprints import remove_fingerprints
from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.federated import patient_dp
from harmonize.federated.config import FederatedConfig
from harmonize.federated.node_state import Arrays, cached_images
from harmonize.federated.nodes import read_manifest, split_rows
from harmonize.federated.server_optimizer import ServerOptimizerSpec
from harmonize.federated.task_interface import FederatedTask
from harmonize.training.device import autocast, pick_device
from harmonize.translators.cyclegan import losses
from harmonize.translators.cyclegan.config import CycleGANConfig, load_config
from harmonize.translators.cyclegan.data import load_landmarks
from harmonize.translators.cyclegan.histogram_residual import HistogramResidualTranslator
from harmonize.translators.cyclegan.networks import (
    ImagePool,
    NLayerDiscriminator,
    ResnetGenerator,
    init_weights,
)
from harmonize.translators.cyclegan.train import lr_factor
from harmonize.translators.cyclegan.translator import CUTTranslator, CycleGANTranslator
from harmonize.translators.histogram import HistogramMatching

NETS = ("g", "f", "d_a", "d_b")


class NetGroups:
    """What a node's training needs of its shared networks: which are stepped by the
    generator objective and which by the discriminators', and all of them as arrays."""

    GENERATORS: tuple[str, ...] = ()
    DISCRIMINATORS: tuple[str, ...] = ()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return (*cls.GENERATORS, *cls.DISCRIMINATORS)

    def generators(self) -> list[torch.nn.Parameter]:
        return [p for n in self.GENERATORS for p in getattr(self, n).parameters()]

    def discriminators(self) -> list[torch.nn.Parameter]:
        return [p for n in self.DISCRIMINATORS for p in getattr(self, n).parameters()]

    def named(self, group: tuple[str, ...]) -> list[tuple[str, torch.nn.Parameter]]:
        """(array key, parameter) of the networks in `group`."""
        return [(f"{n}.{k}", p) for n in group for k, p in getattr(self, n).named_parameters()]

    def arrays(self) -> Arrays:
        return {f"{name}.{k}": v.detach().cpu().clone() for name in self.names()
                for k, v in getattr(self, name).state_dict().items()}


@dataclass
class Nets(NetGroups):
    g: torch.nn.Module
    f: torch.nn.Module
    d_a: torch.nn.Module
    d_b: torch.nn.Module

    GENERATORS = ("g", "f")
    DISCRIMINATORS = ("d_a", "d_b")


@dataclass
class NodeBatch:
    """One step's images of one node, in network space, and the weight of each half."""
    a: torch.Tensor | None = None  # source images
    a_cond: torch.Tensor | None = None  # their site, one-hot
    b: torch.Tensor | None = None  # reference images
    b_cond: torch.Tensor | None = None  # the site each is rendered as by F
    source_weight: float = 0.0
    reference_weight: float = 0.0


def generator_objective(nets: Nets, batch: NodeBatch, w: losses.LossWeights
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """This node's share of the generators' loss; returns (loss, G(a), F(b))."""
    loss = torch.zeros((), device=next(nets.g.parameters()).device)
    fake_b = fake_a = None
    if batch.a is not None:
        terms, fake_b = losses.source_terms(nets.g, nets.f, nets.d_b, batch.a, batch.a_cond, w)
        loss = loss + batch.source_weight * losses.generator_loss(terms, w)
    if batch.b is not None:
        terms, fake_a = losses.reference_terms(nets.g, nets.f, nets.d_a, batch.b,
                                               batch.b_cond, w)
        loss = loss + batch.reference_weight * losses.generator_loss(terms, w)
    return loss, fake_b, fake_a


def discriminator_objective(nets: Nets, batch: NodeBatch, fake_b: torch.Tensor | None,
                            fake_a: torch.Tensor | None, pool_b: ImagePool,
                            pool_a: ImagePool) -> torch.Tensor:
    """This node's share of both discriminators' loss (real terms of its own images,
    fake terms of its own translations, through its local pool)."""
    loss = torch.zeros((), device=next(nets.d_b.parameters()).device)
    if batch.a is not None:
        pooled_b, _ = pool_b.query(fake_b.detach())
        loss = loss + batch.source_weight * (
            losses.discriminator_fake(nets.d_b, pooled_b)
            + losses.discriminator_real(nets.d_a, batch.a, batch.a_cond))
    if batch.b is not None:
        pooled_a, pooled_cond = pool_a.query(fake_a.detach(), batch.b_cond)
        loss = loss + batch.reference_weight * (
            losses.discriminator_real(nets.d_b, batch.b)
            + losses.discriminator_fake(nets.d_a, pooled_a, pooled_cond))
    return loss


def batch_indices(n: int, batch: int, step: int, seed: list[int]) -> np.ndarray:
    """Epoch-style sampling: a fixed permutation of the node's n images, read `batch` at
    a time from position step * batch (wrapping), so every image is used once per pass."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[(step * batch + np.arange(batch)) % n]


def condition_plan(site_counts: list[int], n: int) -> np.ndarray:
    """The source condition of each of the reference node's n images: every site in
    proportion to its size, allocated exactly (largest remainders), not drawn at random.
    Measured: random draws (what a central batch of pairs does) cost 0.014-0.032 SSIM
    against these stratified conditions on 2 of 2 seeds (docs/federated.md)."""
    share = np.asarray(site_counts, float) / max(1, sum(site_counts))
    counts = np.floor(share * n).astype(int)
    for k in np.argsort(-(share * n - counts))[: n - counts.sum()]:
        counts[k] += 1
    return np.repeat(np.arange(len(site_counts)), counts)


def half_weights(round_config: dict, n_source: int, n_reference: int) -> tuple[float, float]:
    """(source, reference) weight of this node: its share of each half's images when the
    server sent the totals ("count.source", "count.reference"), else equal shares (one
    reference node, the other nodes source nodes)."""
    nodes = max(1, int(round_config.get("nodes", 1)))
    total_src = float(round_config.get("count.source", 0))
    total_ref = float(round_config.get("count.reference", 0))
    w_src = n_source / total_src if total_src else 1.0 / max(1, nodes - 1)
    w_ref = n_reference / total_ref if total_ref else 1.0
    return (w_src if n_source else 0.0), (w_ref if n_reference else 0.0)


@functools.lru_cache(maxsize=64)
def _native_side(path: str) -> int:
    """The longer side of an image (read once per process: every round asks)."""
    return max(read_image(path).array.shape)


def _accumulate(summed: dict[str, torch.Tensor], named) -> None:
    for key, p in named:
        if p.grad is not None:
            summed[key] = summed[key] + p.grad.detach() if key in summed else p.grad.detach()


def _split(arrays: Arrays, prefix: str) -> Arrays:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _pool_arrays(name: str, pool: ImagePool) -> Arrays:
    if not pool.images:
        return {}
    return {f"{name}.images": torch.stack(pool.images).float().cpu(),  # no bf16 in arrays
            f"{name}.conditions": torch.stack(pool.conditions).float().cpu(),
            f"{name}.generator": pool.generator.get_state()}


def _load_pool(name: str, pool: ImagePool, local: Arrays | None, device) -> None:
    if local and f"{name}.images" in local:
        pool.load_state_dict({"images": [t.to(device) for t in local[f"{name}.images"]],
                              "conditions": [t.to(device) for t in local[f"{name}.conditions"]],
                              "generator": local[f"{name}.generator"]})


class CycleGANTask(FederatedTask):
    kind = "cyclegan"
    eval_keys = ()

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        self.cg = self.translator_config(config)
        self.size = self.cg.data.image_size
        if not config.cyclegan.sites:
            raise ConfigError("cyclegan.sites: list the source sites (the condition order "
                              "all nodes must agree on)")
        self.sites = list(config.cyclegan.sites)
        if config.reference_site in self.sites:
            raise ConfigError(f"cyclegan.sites lists the reference site "
                              f"'{config.reference_site}'; list the source sites only")
        self.landmarks = self._landmarks()
        self.template = self._template()
        self._first_stage: dict[tuple, torch.Tensor] = {}

    def _landmarks(self) -> HistogramMatching | None:
        """The histogram-residual translator's first stage: landmarks released before this
        run (the federated histogram task's model, its DP option included), never fitted
        here, so every node maps its own images onto the same public numbers."""
        if self.cg.landmarks is None:
            return None
        if self.cg.landmarks.checkpoint is None:
            raise ConfigError("a histogram-residual run needs the reference landmarks first: "
                              "harmonize federated --config configs/federated/histogram.yaml "
                              "... --out runs/fed_hm, then cyclegan.set "
                              "landmarks.checkpoint: runs/fed_hm/model")
        return load_landmarks(self.cg.landmarks.checkpoint, self.config.reference_site,
                              self.cg.data.polarity)

    def _template(self) -> np.ndarray | None:
        """The reference site's mean thumbnail that guards polarity at every node (central
        training's guard), from a released histogram checkpoint; None: no guard."""
        if self.cg.data.polarity != "auto":
            return None
        if self.landmarks is not None:
            return self.landmarks.template_
        path = self.config.cyclegan.template
        if path is None:
            return None
        return load_landmarks(path, self.config.reference_site, "auto").template_

    @staticmethod
    def translator_config(config: FederatedConfig) -> CycleGANConfig:
        """The CycleGAN / CUT / histogram-residual config this run trains."""
        overrides = {"data.reference_site": config.reference_site, **dotted(config.cyclegan.set)}
        return load_config(config.cyclegan.config, overrides)

    # --- the objective (the CycleGAN's halves; CUTTask overrides) ----------------------
    def generator_objective(self, nets, batch: NodeBatch, w: losses.LossWeights):
        return generator_objective(nets, batch, w)

    def discriminator_objective(self, nets, batch: NodeBatch, fake_b, fake_a,
                                pool_b: ImagePool, pool_a: ImagePool) -> torch.Tensor:
        return discriminator_objective(nets, batch, fake_b, fake_a, pool_b, pool_a)

    # --- networks -------------------------------------------------------------------
    def _g(self, n_conditions: int = 0) -> ResnetGenerator:
        m = self.cg.model
        return ResnetGenerator(ngf=m.ngf, n_blocks=m.n_blocks, upsample=m.upsample,
                               residual=m.residual, n_conditions=n_conditions)

    def nets(self, arrays: Arrays | None = None) -> Nets:
        m, s = self.cg.model, len(self.sites)
        nets = Nets(self._g(), self._g(s),
                    NLayerDiscriminator(ndf=m.ndf, n_layers=m.n_layers_d, n_conditions=s),
                    NLayerDiscriminator(ndf=m.ndf, n_layers=m.n_layers_d))
        return self._initialized(nets, arrays)

    def _initialized(self, nets, arrays: Arrays | None):
        for name in nets.names():
            net = getattr(nets, name)
            if arrays is None:
                init_weights(net)
            else:
                net.load_state_dict(_split(arrays, f"{name}."))
        return nets

    def initial_arrays(self) -> Arrays:
        torch.manual_seed(self.config.seed)
        return self.nets().arrays()

    def server_optimizer(self) -> ServerOptimizerSpec:
        c, tc = self.config.cyclegan, self.cg.train
        k = c.local_steps
        total = self.config.rounds * k  # central steps this run stands for
        decay = total // 2 if tc.decay_steps is None else tc.decay_steps
        return ServerOptimizerSpec(
            kind=c.server_optimizer, lr=c.server_lr or tc.lr, betas=(tc.beta1, tc.beta2),
            local_lr=c.local_lr, local_steps=k,
            lr_factor=lambda r: lr_factor((r - 1) * k, total, decay))

    def server_settings(self) -> dict:
        """Each half's image count, for the nodes' weights (when the server has the
        manifest, as in simulation; a deployment's nodes fall back to equal shares)."""
        manifest = self.config.manifest
        if manifest is None or not Path(manifest).is_file():
            return {}
        train, _ = split_rows(read_manifest(manifest))
        sites = train["site"].astype(str)
        is_ref = sites == self.config.reference_site
        return {"count.source": int((~is_ref).sum()), "count.reference": int(is_ref.sum()),
                "count.sites": [int((sites == s).sum()) for s in self.sites]}

    # --- a node's data ----------------------------------------------------------------
    def _images(self, rows: pd.DataFrame, first_stage: bool = False) -> torch.Tensor:
        """The node's images at the scale central training crops from (data.load_size,
        else the first image's native size), in network space; with `first_stage`, through
        the histogram-residual translator's fingerprint removal and landmark mapping
        (source images), as central training's `UnpairedCrops` does."""
        paths = rows["path"].astype(str).tolist()
        side = self.cg.data.load_size or _native_side(paths[0])
        x = cached_images(paths, max(side, self.size))
        staged = first_stage and (self.landmarks is not None or self.template is not None)
        if self.cg.data.fingerprints == "keep" and not staged:
            return x * 2 - 1
        key = (tuple(paths), first_stage)
        if key in self._first_stage:  # deterministic: once per node, not once per round
            return self._first_stage[key]
        if self.cg.data.fingerprints == "remove":
            x = torch.stack([torch.from_numpy(remove_fingerprints(i[0].numpy())[0])[None]
                             for i in x])
        if first_stage and self.landmarks is not None:  # flips inverted exports itself
            mapped = self.landmarks.transform([i[0].numpy() for i in x],
                                              rows["site"].astype(str).tolist())
            x = torch.stack([torch.from_numpy(m)[None] for m in mapped])
        elif first_stage and self.template is not None:  # the polarity guard alone
            x = torch.stack([torch.from_numpy(pol.upright(i[0].numpy(), self.template))[None]
                             for i in x])
        self._first_stage[key] = x * 2 - 1
        return self._first_stage[key]

    def _crops(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """A random image_size crop of each image (as central training's UnpairedCrops)."""
        s, side = self.size, x.shape[-1]
        if side == s:
            return x
        offsets = rng.integers(0, side - s + 1, size=(len(x), 2))
        return torch.stack([img[:, i:i + s, j:j + s] for img, (i, j) in zip(x, offsets,
                                                                           strict=True)])

    def node_data(self, rows: pd.DataFrame, device) -> tuple:
        sites = rows["site"].astype(str)
        is_ref = (sites == self.config.reference_site).to_numpy()
        unknown = sorted(set(sites[~is_ref]) - set(self.sites))
        if unknown:
            raise ConfigError(f"site(s) {unknown} are not in cyclegan.sites {self.sites}")
        xa = self._images(rows[~is_ref], True).to(device) if (~is_ref).any() else None
        ca = (torch.tensor([self.sites.index(s) for s in sites[~is_ref]], device=device)
              if xa is not None else None)
        xb = self._images(rows[is_ref]).to(device) if is_ref.any() else None
        return xa, ca, xb

    def node_batch(self, data: tuple, step: int, seed: list[int], weights,
                   site_counts: list[int] | None = None) -> NodeBatch:
        """This step's images: `batch_size` source images (a source node), or as many
        reference images as the source nodes draw together, rendered as the source sites
        in proportion to their sizes (`site_counts`, else equally), as central training
        pairs every source image with a reference image."""
        xa, ca, xb = data
        bs, s = self.cg.train.batch_size, len(self.sites)
        rng = np.random.default_rng([*seed, 2, step])
        batch = NodeBatch(source_weight=weights[0], reference_weight=weights[1])
        if xa is not None:
            idx = torch.from_numpy(batch_indices(len(xa), bs, step, [*seed, 0])).to(xa.device)
            batch.a, batch.a_cond = self._crops(xa[idx], rng), F.one_hot(ca[idx], s).float()
        if xb is not None:
            idx = torch.from_numpy(batch_indices(len(xb), bs * s, step, [*seed, 1]))
            batch.b = self._crops(xb[idx.to(xb.device)], rng)
            cond = torch.from_numpy(condition_plan(site_counts or [1] * s, bs * s))
            batch.b_cond = F.one_hot(cond.to(xb.device), s).float()
        return batch

    # --- patient-level DP ------------------------------------------------------------
    def dp_plan(self, rows: pd.DataFrame, node: str = ""):
        sites = rows["site"].astype(str)
        is_ref = sites == self.config.reference_site
        if is_ref.any() and (~is_ref).any():
            raise ConfigError(f"node '{node}': patient-dp needs the reference site and the "
                              "source sites at separate nodes (one node per site)")
        batch = self.cg.train.batch_size * (len(self.sites) if is_ref.any() else 1)
        return patient_dp.node_plan(self.config.privacy, rows, self.config.rounds,
                                    lambda patients, per_step: self.config.cyclegan.local_steps,
                                    batch, releases_per_step=2, node=node)

    def private_batch(self, data: tuple, idx: np.ndarray, rng: np.random.Generator,
                      site_counts: list[int] | None) -> NodeBatch:
        """The sampled patients' images (all of one half: one node per site)."""
        xa, ca, xb = data
        s = len(self.sites)
        batch = NodeBatch(source_weight=1.0, reference_weight=1.0)
        rows = torch.from_numpy(idx)
        if xa is not None:
            rows = rows.to(xa.device)
            batch.a, batch.a_cond = self._crops(xa[rows], rng), F.one_hot(ca[rows], s).float()
        else:
            rows = rows.to(xb.device)
            batch.b = self._crops(xb[rows], rng)
            cond = torch.from_numpy(condition_plan(site_counts or [1] * s, len(idx)))
            batch.b_cond = F.one_hot(cond.to(xb.device), s).float()
        return batch

    def _train_private(self, nets: Nets, data: tuple, rows: pd.DataFrame, weights,
                       round_config: dict, server_round: int, node_seed: int):
        """One round of patient-level DP-SGD (module docstring); returns the summed
        privatized gradients, the mean losses and the DP metrics."""
        c = self.config.cyclegan
        plan, patient_of_row = self.dp_plan(rows, str(rows["node"].iloc[0]))
        seed = self.config.seed * 100_003 + node_seed + server_round  # crops only
        sampler = patient_dp.PatientSampler(patient_of_row, plan.sample_rate)
        clip_g = patient_dp.PatientClipper(nets.generators(), plan)
        clip_d = patient_dp.PatientClipper(nets.discriminators(), plan)
        with patient_dp.private_gradients(*(getattr(nets, n) for n in NETS)) as wrapped:
            summed, history = self._private_steps(nets, Nets(*wrapped), data, sampler,
                                                  clip_g, clip_d, weights, round_config, seed)
        mean_g, mean_d = np.mean(history, axis=0).tolist() if history else (np.nan, np.nan)
        return summed, mean_g, mean_d, patient_dp.dp_metrics(plan, server_round * c.local_steps)

    def _private_steps(self, nets: Nets, private: Nets, data: tuple, sampler, clip_g,
                       clip_d, weights, round_config: dict, seed: int) -> tuple[dict, list]:
        """The round's DP-SGD steps; returns the summed privatized gradients and the
        (generator, discriminator) loss of each non-empty step."""
        c, w = self.config.cyclegan, losses.LossWeights.from_config(self.cg.loss)
        opt_g = torch.optim.SGD(nets.generators(), lr=c.local_lr)
        opt_d = torch.optim.SGD(nets.discriminators(), lr=c.local_lr)
        weight = weights[0] or weights[1]  # this node's share of its half (one half)
        named = {"g": [(f"{n}.{k}", p) for n in ("g", "f")
                       for k, p in getattr(nets, n).named_parameters()],
                 "d": [(f"{n}.{k}", p) for n in ("d_a", "d_b")
                       for k, p in getattr(nets, n).named_parameters()]}
        no_pool = ImagePool(0)
        counts = round_config.get("count.sites")
        summed: dict[str, torch.Tensor] = {}
        history = []
        for i in range(c.local_steps):
            rng = np.random.default_rng([seed, 2, i])
            idx, row_patient, n = sampler.sample()
            patients = torch.from_numpy(row_patient) if n else None
            batch = self.private_batch(data, idx, rng, list(counts) if counts else None) \
                if n else None
            for p in nets.discriminators():
                p.requires_grad_(False)
            for d in (private.d_a, private.d_b):  # frozen here: no per-image gradients
                d.disable_hooks()
            opt_g.zero_grad(set_to_none=True)
            fake_b = fake_a = None
            if batch is not None:
                loss_g, fake_b, fake_a = generator_objective(private, batch, w)
                loss_g.backward()
            clip_g.privatize(patients, n)
            for d in (private.d_a, private.d_b):
                d.enable_hooks()
            for p in nets.discriminators():
                p.requires_grad_(True)
            for p in nets.generators():
                p.grad *= weight  # post-processing: the node's share of the objective
            _accumulate(summed, named["g"])
            opt_g.step()
            opt_d.zero_grad(set_to_none=True)
            if batch is not None:
                loss_d = discriminator_objective(private, batch, fake_b, fake_a, no_pool,
                                                 no_pool)
                loss_d.backward()
                history.append((float(loss_g.detach()), float(loss_d.detach())))
            clip_d.privatize(patients, n)
            for p in nets.discriminators():
                p.grad *= weight
            _accumulate(summed, named["d"])
            opt_d.step()
        return summed, history

    # --- one round at a node ----------------------------------------------------------
    def train(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame,
              round_config: dict) -> tuple[Arrays, Arrays, dict]:
        server_round = int(round_config.get("server-round", 1))
        device = pick_device()
        data = self.node_data(rows, device)
        n_src = 0 if data[0] is None else len(data[0])
        n_ref = 0 if data[2] is None else len(data[2])
        weights = half_weights(round_config, n_src, n_ref)
        node_seed = zlib.crc32(",".join(sorted(rows["site"].astype(str).unique())).encode())
        torch.manual_seed(self.config.seed * 100_003 + node_seed + server_round)
        nets = self.nets(arrays)
        for name in nets.names():
            getattr(nets, name).to(device)
        if self.config.privacy.mode == "patient-dp":
            summed, mean_g, mean_d, extra = self._train_private(
                nets, data, rows, weights, round_config, server_round, node_seed)
            sent = {k: (v - summed[k].float().cpu()) if k in summed else v.clone()
                    for k, v in arrays.items()}
            return sent, {}, {"loss_g": mean_g, "loss_d": mean_d, "num-examples": 1, **extra}
        c, tc = self.config.cyclegan, self.cg.train
        w = losses.LossWeights.from_config(self.cg.loss)
        opt_g = torch.optim.SGD(nets.generators(), lr=c.local_lr)
        opt_d = torch.optim.SGD(nets.discriminators(), lr=c.local_lr)
        gen_named = nets.named(nets.GENERATORS)
        disc_named = nets.named(nets.DISCRIMINATORS)
        summed: dict[str, torch.Tensor] = {}  # each parameter's gradients over the K steps
        counts = round_config.get("count.sites")
        pool_b = ImagePool(self.cg.loss.pool_size, self.config.seed + node_seed)
        pool_a = ImagePool(self.cg.loss.pool_size, self.config.seed + node_seed + 1)
        _load_pool("pool_b", pool_b, local, device)
        _load_pool("pool_a", pool_a, local, device)
        sums = torch.zeros(2, device=device)  # (generators, discriminators), read once
        for i in range(c.local_steps):
            batch = self.node_batch(data, (server_round - 1) * c.local_steps + i,
                                    [self.config.seed, node_seed], weights,
                                    list(counts) if counts else None)
            for p in nets.discriminators():
                p.requires_grad_(False)
            with autocast(device, tc.mixed_precision):
                loss_g, fake_b, fake_a = self.generator_objective(nets, batch, w)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            _accumulate(summed, gen_named)
            opt_g.step()
            for p in nets.discriminators():
                p.requires_grad_(True)
            with autocast(device, tc.mixed_precision):
                loss_d = self.discriminator_objective(nets, batch, fake_b, fake_a, pool_b,
                                                      pool_a)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            _accumulate(summed, disc_named)
            opt_d.step()
            sums += torch.stack([loss_g.detach(), loss_d.detach()])
        mean_g, mean_d = (sums / c.local_steps).tolist()
        own = {**_pool_arrays("pool_b", pool_b), **_pool_arrays("pool_a", pool_a)}
        # sent: w - (sum of this node's local gradients), its update in gradient units
        # (weights minus lr-scaled steps would lose the gradient to fp32 rounding of w);
        # equal weights in the average: each node's share is already in its loss
        sent = {k: (v - summed[k].float().cpu()) if k in summed else v.clone()
                for k, v in arrays.items()}
        return sent, own, {"loss_g": mean_g, "loss_d": mean_d, "num-examples": 1}

    def evaluate(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame) -> dict:
        return {"num-examples": 0}

    def translator(self, arrays: Arrays) -> CycleGANTranslator:
        m, inf = self.cg.model, self.cg.inference
        kwargs = dict(ngf=m.ngf, n_blocks=m.n_blocks, upsample=m.upsample,
                      residual=m.residual, tile_size=self.size,
                      tile_overlap=inf.tile_overlap, batch_size=inf.batch_size,
                      precision=inf.precision, polarity="keep",
                      passthrough_reference=inf.passthrough_reference,
                      policy=IntensityPolicy(mode=self.cg.data.intensity, bits=self.cg.data.bits))
        g = self._g()
        g.load_state_dict(_split(arrays, "g."))
        template, ref = np.zeros((32, 32), np.float32), self.config.reference_site
        if self.template is not None:  # the released thumbnail guards polarity
            kwargs["polarity"], template = self.cg.data.polarity, self.template.copy()
        if self.landmarks is None:
            cls = CUTTranslator if self.cg.kind == "cut" else CycleGANTranslator
            return cls(**kwargs).set_trained(g, template, ref)
        t = HistogramResidualTranslator(**kwargs, landmarks_per=self.landmarks.per,
                                        n_quantiles=self.landmarks.n_quantiles,
                                        fingerprints=self.cg.data.fingerprints)
        return t.set_trained(g, template, ref, self.landmarks)

    def reverse_generator(self, arrays: Arrays) -> torch.nn.Module:
        """F (reference -> site k's style), for the memorization check of what leaves."""
        f = self._g(len(self.sites))
        f.load_state_dict(_split(arrays, "f."))
        return f.eval()

    def save(self, arrays: Arrays, out: Path, metadata: dict) -> Path:
        return self.translator(arrays).save(out, {**metadata, "source_sites": self.sites})
