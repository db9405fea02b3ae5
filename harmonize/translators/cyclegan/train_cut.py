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
from torch.utils.data import DataLoader

from harmonize.data import polarity as pol
from harmonize.training.device import loader_options
from harmonize.training.run import TrainingRun, set_lr
from harmonize.training.sampler import EpochShuffle
from harmonize.translators.cyclegan import losses
from harmonize.translators.cyclegan.config import ConfigError, CycleGANConfig
from harmonize.translators.cyclegan.data import UnpairedCrops, prepare_training_set, sample_images
from harmonize.translators.cyclegan.networks import (
    ImagePool,
    NLayerDiscriminator,
    PatchProjection,
    ResnetGenerator,
    init_weights,
)
from harmonize.translators.cyclegan.run_parts import (
    check_same_sites,
    checkpoint_metadata,
    finish_selection,
    lr_factor,
    requires_grad,
    start_selection,
    translator_from_run,
    write_sample_grid,
)

LOSS_NAMES = ("G_gan", "nce", "nce_idt", "D_B", "inv")
ARCH_KEYS = ("model", "data.image_size")


def train_cut(config: CycleGANConfig) -> Path:
    """Train (or resume) CUT and return the checkpoint directory OUT/model."""
    tc, lw = config.train, config.loss
    pool_b = ImagePool(lw.pool_size, tc.seed + 1)
    patches = torch.Generator().manual_seed(tc.seed)  # PatchNCE's patch draws
    run = TrainingRun(config, f"train {config.kind}", ARCH_KEYS, LOSS_NAMES, pool_b=pool_b)
    accelerator = run.accelerator
    ts = prepare_training_set(config, progress=tc.progress and run.is_main)
    if tc.resume:
        check_same_sites(run.saved_metadata(), ts)
    run.start()

    dataset = UnpairedCrops(ts, config.data.image_size, config.data.load_size, tc.seed,
                            config.data.fingerprints)
    if len(dataset) < tc.batch_size * accelerator.num_processes:
        raise ConfigError(f"{len(dataset)} source images, fewer than one batch "
                          f"({tc.batch_size} x {accelerator.num_processes} processes)")
    loader = DataLoader(dataset, batch_size=tc.batch_size,
                        sampler=EpochShuffle(len(dataset), tc.seed), drop_last=True,
                        **loader_options(run.device, config.data.num_workers))

    m = config.model
    g = init_weights(ResnetGenerator(ngf=m.ngf, n_blocks=m.n_blocks, upsample=m.upsample,
                                     residual=m.residual))
    h = init_weights(PatchProjection(g.feature_channels()))
    d_b = init_weights(NLayerDiscriminator(ndf=m.ndf, n_layers=m.n_layers_d))
    betas = (tc.beta1, tc.beta2)
    opt_g = torch.optim.Adam([*g.parameters(), *h.parameters()], lr=tc.lr, betas=betas)
    opt_d = torch.optim.Adam(d_b.parameters(), lr=tc.lr, betas=betas)
    g, h, d_b = (run.optimize(net) for net in (g, h, d_b))
    g, h, d_b, opt_g, opt_d, loader = accelerator.prepare(g, h, d_b, opt_g, opt_d, loader)
    run.resume_if_asked()
    samples = sample_images(ts, config.data.load_size) if run.is_main else []
    raw_g, raw_h, raw_d = (accelerator.unwrap_model(n) for n in (g, h, d_b))
    selection = start_selection(run, ts, config, raw_g)

    w = losses.LossWeights.from_config(lw)
    for batch in run.batches(loader, dataset):
        real_a, real_b = batch["source"], batch["reference"]
        with accelerator.accumulate(g, h, d_b):
            requires_grad((d_b,), False)
            with accelerator.autocast():
                terms, fake_b = losses.cut_source_terms(raw_g, raw_h, raw_d, real_a, w, patches)
                if w.nce > 0:
                    terms.update(losses.cut_reference_terms(raw_g, raw_h, real_b, w, patches))
                total = losses.generator_loss(terms, w)
            accelerator.backward(total)
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)

            requires_grad((d_b,), True)
            with accelerator.autocast():
                pooled_b, _ = pool_b.query(fake_b.detach())
                terms["D_B"] = (losses.discriminator_real(d_b, real_b)
                                + losses.discriminator_fake(d_b, pooled_b))
            accelerator.backward(terms["D_B"])
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        terms["inv"] = pol.inverted_share(real_a, fake_b)
        if not run.end_micro_step(terms):
            continue

        lr = set_lr((opt_g, opt_d), tc.lr * lr_factor(run.step, tc.steps, tc.decay))
        run.log(lr)
        if run.is_main and run.due(tc.sample_every):
            translator = translator_from_run(raw_g, ts, config)
            translator.passthrough_reference = False
            run.log_sample_grid(write_sample_grid(
                run.out / "samples" / f"step_{run.step:07d}.png", translator, samples,
                config.data.image_size))
        if tc.snapshot_every and run.is_main and run.due(tc.snapshot_every):
            snapshot = translator_from_run(raw_g, ts, config)
            snapshot.save(run.out / "snapshots" / f"step_{run.step:07d}",
                          checkpoint_metadata(run, ts, config))
            if selection is not None:
                selection.record(run.step, snapshot)
        if run.due(tc.checkpoint_every):
            run.save_state()
            if run.is_main:
                translator_from_run(raw_g, ts, config).save(
                    run.out / "model", checkpoint_metadata(run, ts, config))
    if selection is not None:
        finish_selection(selection, run.out)
    return run.finish()
