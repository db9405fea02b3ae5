"""The CUT training loop (contrastive unpaired translation, Park et al. 2020): a config with
`loss.objective: patchnce`; `train_cyclegan` hands it here, so `harmonize train cut`,
`harmonize train histogram-residual` with that objective and `accelerate launch
recipes/train_cyclegan.py` all run it.

One generator G (any site -> reference), its PatchNCE projection heads H and one
discriminator D_B; no reverse generator, no cycle. Each step: G's adversarial term and
PatchNCE between a source image and its translation, the identity PatchNCE on a reference
image (`losses.cut_source_terms`, `losses.cut_reference_terms`), then D_B on real
reference images against a pool of past translations. Data, run folder, samples,
snapshots, the unlabelled snapshot choice and the checkpoint are the CycleGAN's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from harmonize.data import polarity as pol
from harmonize.training.distributed import average_gradients, broadcast_weights
from harmonize.training.run import set_lr
from harmonize.translators.cyclegan import losses
from harmonize.translators.cyclegan.config import CycleGANConfig
from harmonize.translators.cyclegan.data import sample_images
from harmonize.translators.cyclegan.networks import (
    ImagePool,
    NLayerDiscriminator,
    PatchProjection,
    ResnetGenerator,
    init_weights,
)
from harmonize.translators.cyclegan.run_parts import (
    after_step,
    crop_loader,
    finish_selection,
    lr_factor,
    requires_grad,
    start_run,
    start_selection,
)

LOSS_NAMES = ("G_gan", "nce", "nce_idt", "D_B", "inv")


class PatchDraws:
    """The generator PatchNCE samples patches with, saved and restored with the run (so a
    resumed run draws what the uninterrupted one would)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


def train_cut(config: CycleGANConfig) -> Path:
    """Train (or resume) CUT and return the checkpoint directory OUT/model."""
    tc, lw = config.train, config.loss
    pool_b = ImagePool(lw.pool_size, tc.seed + 1)
    draws = PatchDraws(tc.seed)  # PatchNCE's patch draws, resumed with the run
    patches = draws.generator
    run, ts = start_run(config, LOSS_NAMES, pool_b=pool_b, patch_draws=draws)
    accelerator = run.accelerator

    dataset, loader = crop_loader(run, ts, config)

    m = config.model
    g = init_weights(ResnetGenerator(ngf=m.ngf, n_blocks=m.n_blocks, upsample=m.upsample,
                                     residual=m.residual))
    h = init_weights(PatchProjection(g.feature_channels()))
    d_b = init_weights(NLayerDiscriminator(ndf=m.ndf, n_layers=m.n_layers_d))
    betas = (tc.beta1, tc.beta2)
    opt_g = torch.optim.Adam([*g.parameters(), *h.parameters()], lr=tc.lr, betas=betas)
    opt_d = torch.optim.Adam(d_b.parameters(), lr=tc.lr, betas=betas)
    # not wrapped by DDP: PatchNCE calls G's encoder, which DDP would not synchronize;
    # their gradients are averaged over the processes by hand (average_gradients)
    nets = [run.optimize(net).to(accelerator.device) for net in (g, h, d_b)]
    raw_g, raw_h, raw_d = nets
    broadcast_weights(accelerator, nets)
    accelerator.register_for_checkpointing(*nets)
    opt_g, opt_d, loader = accelerator.prepare(opt_g, opt_d, loader)
    run.resume_if_asked()
    samples = sample_images(ts, config.data.load_size) if run.is_main else []
    run.track(nets)
    selection = start_selection(run, ts, config, raw_g)

    w = losses.LossWeights.from_config(lw)
    for batch in run.batches(loader, dataset):
        real_a, real_b = batch["source"], batch["reference"]
        with accelerator.accumulate(*nets):
            requires_grad((raw_d,), False)
            with accelerator.autocast():
                terms, fake_b = losses.cut_source_terms(raw_g, raw_h, raw_d, real_a, w, patches)
                if w.nce > 0:
                    terms.update(losses.cut_reference_terms(raw_g, raw_h, real_b, w, patches))
                total = losses.generator_loss(terms, w)
            accelerator.backward(total)
            average_gradients(accelerator, (raw_g, raw_h))
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)

            requires_grad((raw_d,), True)
            with accelerator.autocast():
                pooled_b, _ = pool_b.query(fake_b.detach())
                terms["D_B"] = (losses.discriminator_real(raw_d, real_b)
                                + losses.discriminator_fake(raw_d, pooled_b))
            accelerator.backward(terms["D_B"])
            average_gradients(accelerator, (raw_d,))
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        terms["inv"] = pol.inverted_share(real_a, fake_b)
        if not run.end_micro_step(terms):
            continue

        lr = set_lr((opt_g, opt_d), tc.lr * lr_factor(run.step, tc.steps, tc.decay))
        run.log(lr)
        after_step(run, raw_g, ts, config, samples, selection)
    if selection is not None:
        finish_selection(selection, run.out)
    return run.finish()
