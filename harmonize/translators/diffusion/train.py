"""The one diffusion training loop (accelerate): `harmonize train diffusion` and
`accelerate launch recipes/train_diffusion.py` both call `train_diffusion`.

Read top to bottom: check config and data, build UNets, loop, write samples / logs /
checkpoints. Each step trains every model on a batch of its own data: the reference
prior (SDEdit), one prior per site (DDIB; no model ever sees another site's image), or
one site-conditioned prior (class label = site, sometimes dropped to "unknown site").
The loss is the standard DDPM one: noise a clean image to a random timestep with
`DDPMScheduler.add_noise` and regress the noise (MSE), or, by default, the velocity
v = sqrt(a) eps - sqrt(1-a) x0, which keeps predictions usable at the highest noise levels
(eps-prediction errors are amplified ~150x there by 1/sqrt(alpha_bar)). EMA weights are
what is saved.

OUT/model (the checkpoint, contract format), OUT/state (accelerate state for --resume),
OUT/samples/step_NNNNNNN.png, OUT/train_log.csv, OUT/config.yaml (what ran).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from PIL import Image
from torch.utils.data import DataLoader

from harmonize.training.device import loader_options
from harmonize.training.metadata import training_metadata
from harmonize.training.run import TrainingRun, set_lr
from harmonize.training.sampler import EpochShuffle
from harmonize.translators.diffusion import losses
from harmonize.translators.diffusion.config import DiffusionConfig
from harmonize.translators.diffusion.data import SiteBatches, TrainingSet, prepare_training_set
from harmonize.translators.diffusion.translator import INFERENCE_KEYS, DiffusionTranslator

# what must match when resuming (the saved weights have these shapes / these models)
ARCH_KEYS = ("model", "diffusion", "data.image_size", "data.sites", "inference.mode")


def train_diffusion(config: DiffusionConfig) -> Path:
    """Train (or resume) and return the checkpoint directory OUT/model."""
    tc = config.train
    # the log's columns: the mean loss, then one per model (a site, or "*"), as logged
    run = TrainingRun(config, "train diffusion", ARCH_KEYS, loss_names=None)
    accelerator = run.accelerator
    ts = prepare_training_set(config, progress=tc.progress and run.is_main)
    run.desc += f" ({len(ts.model_keys)} model{'s' * (len(ts.model_keys) > 1)})"
    run.start()

    # --- data ---------------------------------------------------------------------------
    dataset = SiteBatches(ts, config.data.image_size, tc.batch_size * accelerator.num_processes,
                          tc.seed)
    loader = DataLoader(dataset, batch_size=tc.batch_size,
                        sampler=EpochShuffle(len(dataset), tc.seed), drop_last=True,
                        **loader_options(run.device, config.data.num_workers))

    # --- models -------------------------------------------------------------------------
    conditioned = config.model.conditioning == "site-conditioned"
    null_class = len(ts.class_sites)  # the "unknown site" label
    unet_config = config.unet_config(null_class + 1 if conditioned else None)
    unets = [UNet2DModel(**unet_config) for _ in ts.model_keys]
    params = [p for u in unets for p in u.parameters()]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    # foreach: one fused update over all parameters, not a Python loop over them
    ema = EMAModel(params, decay=tc.ema_decay, use_ema_warmup=True, power=tc.ema_power,
                   foreach=True)
    noise_scheduler = DDPMScheduler(**config.scheduler_config())
    *unets, optimizer, loader = accelerator.prepare(*(run.optimize(u) for u in unets),
                                                    optimizer, loader)
    accelerator.register_for_checkpointing(ema)
    run.resume_if_asked()
    ema.to(accelerator.device)
    raw = {key: accelerator.unwrap_model(u) for key, u in zip(ts.model_keys, unets, strict=True)}
    run.track(raw.values())
    samples = dataset.first_per_site() if run.is_main else None

    # --- loop: every model trains on a batch of its own data each step -------------------
    for batch in run.batches(loader, dataset):
        images, labels = batch["images"], batch["labels"]
        with accelerator.accumulate(*unets):
            per_model = {}
            for k, (key, unet) in enumerate(zip(ts.model_keys, unets, strict=True)):
                classes = (losses.drop_classes(labels[:, k], config.model.class_dropout,
                                               null_class) if conditioned else None)
                with accelerator.autocast():
                    per_model[key] = losses.denoising_loss(unet, noise_scheduler,
                                                           images[:, k], classes)
            accelerator.backward(sum(per_model.values()))
            if accelerator.sync_gradients:  # per model: the models stay independent
                for unet in unets:
                    accelerator.clip_grad_norm_(unet.parameters(), tc.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        logged = {"loss": sum(per_model.values()) / len(per_model),
                  **{f"loss_{k}": v for k, v in per_model.items()}}
        if not run.end_micro_step(logged):
            continue

        # --- one optimizer step done --------------------------------------------------------
        ema.step(params)
        lr = set_lr([optimizer], tc.lr * min(1.0, run.step / max(tc.lr_warmup_steps, 1)))
        run.log(lr)
        sample, save = run.due(tc.sample_every), run.due(tc.checkpoint_every)
        if sample or save:
            translator = translator_from_run(raw, ema, params, ts, config)
            if run.is_main and sample:
                run.log_sample_grid(write_sample_grid(
                    run.out / "samples" / f"step_{run.step:07d}.png", translator, *samples))
            if save:
                run.save_state()
                if run.is_main:
                    translator.save(run.out / "model", checkpoint_metadata(run, ts, config))
    return run.finish()


def translator_from_run(raw: dict[str, torch.nn.Module], ema: EMAModel, params: list,
                        ts: TrainingSet, config: DiffusionConfig) -> DiffusionTranslator:
    """A translator holding CPU copies of the EMA weights (training weights untouched)."""
    conditioned = config.model.conditioning == "site-conditioned"
    unet_config = config.unet_config(len(ts.class_sites) + 1 if conditioned else None)
    ema.store(params)
    ema.copy_to(params)
    try:
        inf = config.inference.model_dump()
        t = DiffusionTranslator(
            unet_config=unet_config, scheduler_config=config.scheduler_config(),
            class_sites=ts.class_sites, polarity=config.data.polarity, policy=ts.policy,
            **{k: inf[k] for k in INFERENCE_KEYS if k in inf})
        t.set_trained(raw, ts.template, ts.reference_site)
    finally:
        ema.restore(params)
    return t


@torch.no_grad()
def write_sample_grid(path: Path, translator: DiffusionTranslator, images: torch.Tensor,
                      sites: list[str]) -> Path:
    """Rows: the first image of each site (reference first), its translation, and draws
    from the reference prior; 8-bit PNG at the training size."""
    rows = [images, translator.translate_at_size(images, sites),
            translator.sample_prior(len(images))]
    strips = [torch.cat(list(r[:, 0].float().cpu()), dim=1) for r in rows]
    grid = (torch.cat(strips, dim=0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}")
    Image.fromarray(grid).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def checkpoint_metadata(run: TrainingRun, ts: TrainingSet, config: DiffusionConfig) -> dict:
    meta = training_metadata(ts.df, ts.reference_site, config.data.manifest, ts.policy,
                             image_size=config.data.image_size)
    meta.update({"mode": config.inference.mode, "conditioning": config.model.conditioning,
                 "model_sites": ts.model_keys, "polarity_flipped": ts.flipped_per_site(),
                 **run.run_metadata()})
    return meta
