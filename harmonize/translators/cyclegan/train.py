"""The one CycleGAN training loop (accelerate): `harmonize train cyclegan` and
`accelerate launch recipes/train_cyclegan.py` both call `train_cyclegan`.

Read top to bottom: check config and data, build networks, loop (generator step, then
discriminator step), write samples / logs / checkpoints. Domain A is every non-reference
site pooled, domain B the reference site:

- G: A -> B is pooled (no site input), so inference needs no site label and works for
  sites never seen in training; it is the only network kept in the checkpoint.
- F: B -> A and D_A are conditioned on the source site (one-hot planes) by default:
  F(G(a), site) must rebuild a's style, and a pooled F could only do that if G hid the
  site's style in its output (the "steganography" failure of CycleGAN); told the site,
  F needs no hidden message, so G is free to remove the style entirely.

OUT/model (the checkpoint, contract format), OUT/state (accelerate state for --resume),
OUT/samples/step_NNNNNNN.png, OUT/train_log.csv, OUT/config.yaml (what ran).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from harmonize.data import polarity as pol
from harmonize.training.run import set_lr
from harmonize.translators.cyclegan import losses
from harmonize.translators.cyclegan.config import CycleGANConfig
from harmonize.translators.cyclegan.data import (
    sample_images,
)
from harmonize.translators.cyclegan.networks import (
    ImagePool,
    NLayerDiscriminator,
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

LOSS_NAMES = ("G_gan", "F_gan", "cycle", "idt", "struct", "D_B", "D_A", "inv")


def train_cyclegan(config: CycleGANConfig) -> Path:
    """Train (or resume) and return the checkpoint directory OUT/model (a config with
    `loss.objective: patchnce` trains CUT instead: `train_cut`)."""
    if config.loss.objective == "patchnce":
        from harmonize.translators.cyclegan.train_cut import train_cut

        return train_cut(config)
    tc, lw = config.train, config.loss
    pool_a, pool_b = ImagePool(lw.pool_size, tc.seed), ImagePool(lw.pool_size, tc.seed + 1)
    run, ts = start_run(config, LOSS_NAMES, pool_a=pool_a, pool_b=pool_b)
    accelerator = run.accelerator

    # --- data ---------------------------------------------------------------------------
    dataset, loader = crop_loader(run, ts, config)

    # --- networks -----------------------------------------------------------------------
    m = config.model
    n_cond = len(ts.source_sites) if m.reverse == "site-conditioned" else 0
    g_ab = init_weights(ResnetGenerator(ngf=m.ngf, n_blocks=m.n_blocks, upsample=m.upsample,
                                        residual=m.residual))
    f_ba = init_weights(ResnetGenerator(ngf=m.ngf, n_blocks=m.n_blocks, upsample=m.upsample,
                                        residual=m.residual, n_conditions=n_cond))
    d_a = init_weights(NLayerDiscriminator(ndf=m.ndf, n_layers=m.n_layers_d,
                                           n_conditions=n_cond))
    d_b = init_weights(NLayerDiscriminator(ndf=m.ndf, n_layers=m.n_layers_d))
    betas = (tc.beta1, tc.beta2)
    opt_g = torch.optim.Adam([*g_ab.parameters(), *f_ba.parameters()], lr=tc.lr, betas=betas)
    opt_d = torch.optim.Adam([*d_a.parameters(), *d_b.parameters()], lr=tc.lr, betas=betas)
    g_ab, f_ba, d_a, d_b = (run.optimize(net) for net in (g_ab, f_ba, d_a, d_b))
    g_ab, f_ba, d_a, d_b, opt_g, opt_d, loader = accelerator.prepare(
        g_ab, f_ba, d_a, d_b, opt_g, opt_d, loader)
    run.resume_if_asked()
    samples = sample_images(ts, config.data.load_size) if run.is_main else []
    selection = start_selection(run, ts, config, accelerator.unwrap_model(g_ab))

    # --- loop: both halves of the objective every step (losses.py) ---------------------
    w = losses.LossWeights.from_config(lw)
    raw = {name: accelerator.unwrap_model(net) for name, net in
           (("g", g_ab), ("f", f_ba), ("d_a", d_a), ("d_b", d_b))}
    run.track(raw.values())
    for batch in run.batches(loader, dataset):
        real_a, real_b = batch["source"], batch["reference"]
        cond = F.one_hot(batch["site_index"], n_cond).float() if n_cond else None
        with accelerator.accumulate(g_ab, f_ba, d_a, d_b):
            # generator step: D frozen, called unwrapped (no DDP sync for them here)
            requires_grad((d_a, d_b), False)
            with accelerator.autocast():
                src, fake_b = losses.source_terms(g_ab, f_ba, raw["d_b"], real_a, cond, w)
                ref, fake_a = losses.reference_terms(g_ab, f_ba, raw["d_a"], real_b, cond, w)
                terms = losses.merge(src, ref)
                total = losses.generator_loss(terms, w)
            accelerator.backward(total)
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)

            # discriminator step: real vs a pool of past fakes
            requires_grad((d_a, d_b), True)
            with accelerator.autocast():
                pooled_b, _ = pool_b.query(fake_b.detach())
                pooled_a, pooled_cond = pool_a.query(fake_a.detach(), cond)
                terms["D_B"] = (losses.discriminator_real(d_b, real_b)
                                + losses.discriminator_fake(d_b, pooled_b))
                terms["D_A"] = (losses.discriminator_real(d_a, real_a, cond)
                                + losses.discriminator_fake(d_a, pooled_a, pooled_cond))
            accelerator.backward(terms["D_A"] + terms["D_B"])
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        terms["inv"] = pol.inverted_share(real_a, fake_b)
        if not run.end_micro_step(terms):
            continue

        # --- one optimizer step done --------------------------------------------------------
        lr = set_lr((opt_g, opt_d), tc.lr * lr_factor(run.step, tc.steps, tc.decay))
        run.log(lr)
        after_step(run, raw["g"], ts, config, samples, selection)
    if selection is not None:
        finish_selection(selection, run.out)
    return run.finish()

