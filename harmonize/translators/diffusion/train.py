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

import csv
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from harmonize.accel import make_accelerator
from harmonize.fit import training_metadata
from harmonize.precision import training_precision
from harmonize.translators.cyclegan.data import EpochShuffle
from harmonize.translators.diffusion.config import (
    ConfigError,
    DiffusionConfig,
    dump_config,
    load_config,
)
from harmonize.translators.diffusion.data import SiteBatches, TrainingSet, prepare_training_set
from harmonize.translators.diffusion.translator import INFERENCE_KEYS, DiffusionTranslator

# what must match when resuming (the saved weights have these shapes / these models)
ARCH_KEYS = ("model", "diffusion", "data.image_size", "data.sites", "inference.mode")


class Progress:
    """Optimizer-step counter: what accelerate's save_state cannot see."""

    def __init__(self) -> None:
        self.step = 0
        self.micro = 0
        self.seconds = 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "micro": self.micro, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro = int(state["step"]), int(state["micro"])
        self.seconds = float(state["seconds"])


def train_diffusion(config: DiffusionConfig) -> Path:
    """Train (or resume) and return the checkpoint directory OUT/model."""
    config.check_ready()
    out = Path(config.train.out)
    if config.train.resume:
        _check_resumable(out, config)
    elif (out / "state").exists():
        raise ConfigError(f"{out} holds a previous run (state/); pass --resume to continue "
                          "it or choose another --out")
    tc = config.train
    accelerator = make_accelerator(mixed_precision=training_precision(tc.mixed_precision),
                                   gradient_accumulation_steps=tc.grad_accum)
    main = accelerator.is_main_process
    set_seed(tc.seed, device_specific=True)
    ts = prepare_training_set(config, progress=tc.progress and main)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(config, out / "config.yaml")

    # --- data ---------------------------------------------------------------------------
    dataset = SiteBatches(ts, config.data.image_size, tc.batch_size * accelerator.num_processes,
                          tc.seed)
    sampler = EpochShuffle(len(dataset), tc.seed)
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.data.num_workers,
                        persistent_workers=config.data.num_workers > 0)

    # --- models -------------------------------------------------------------------------
    conditioned = config.model.conditioning == "site-conditioned"
    null_class = len(ts.class_sites)  # the "unknown site" label
    unet_config = config.unet_config(null_class + 1 if conditioned else None)
    unets = [UNet2DModel(**unet_config) for _ in ts.model_keys]
    params = [p for u in unets for p in u.parameters()]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    ema = EMAModel(params, decay=tc.ema_decay, use_ema_warmup=True, power=tc.ema_power)
    noise_scheduler = DDPMScheduler(**config.scheduler_config())
    v_target = config.diffusion.prediction_type == "v_prediction"
    *unets, optimizer, loader = accelerator.prepare(*unets, optimizer, loader)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    accelerator.register_for_checkpointing(ema)
    if tc.resume:
        accelerator.load_state(str(out / "state"))
    ema.to(accelerator.device)
    raw = {key: accelerator.unwrap_model(u) for key, u in zip(ts.model_keys, unets, strict=True)}
    samples = dataset.first_per_site() if main else None

    # --- loop ---------------------------------------------------------------------------
    bar = tqdm(total=tc.steps, initial=progress.step, desc=f"train diffusion "
               f"({len(unets)} model{'s' * (len(unets) > 1)})", unit="step",
               disable=not (tc.progress and main), dynamic_ncols=True)
    running: dict[str, float] = {}
    started = time.perf_counter() - progress.seconds
    per_epoch = len(loader)
    while progress.step < tc.steps:
        epoch, skip = divmod(progress.micro, per_epoch)
        loader.set_epoch(epoch)
        dataset.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in epoch_loader:
            images, labels = batch["images"], batch["labels"]
            with accelerator.accumulate(*unets):
                losses = {}
                for k, (key, unet) in enumerate(zip(ts.model_keys, unets, strict=True)):
                    x0 = images[:, k]
                    noise = torch.randn_like(x0)
                    t = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                                      (len(x0),), device=x0.device)
                    classes = None
                    if conditioned:
                        drop = torch.rand(len(x0), device=x0.device) < config.model.class_dropout
                        classes = torch.where(drop, null_class, labels[:, k])
                    with accelerator.autocast():
                        pred = unet(noise_scheduler.add_noise(x0, noise, t), t,
                                    class_labels=classes).sample
                    target = noise_scheduler.get_velocity(x0, noise, t) if v_target else noise
                    losses[key] = F.mse_loss(pred.float(), target)
                accelerator.backward(sum(losses.values()))
                if accelerator.sync_gradients:  # per model: the models stay independent
                    for unet in unets:
                        accelerator.clip_grad_norm_(unet.parameters(), tc.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in losses.items():
                running[key] = running.get(key, 0.0) + float(value.detach())
            running["_n"] = running.get("_n", 0) + 1
            progress.micro += 1
            if not accelerator.sync_gradients:
                continue

            # --- one optimizer step done ----------------------------------------------------
            progress.step += 1
            step = progress.step
            ema.step(params)
            lr = tc.lr * min(1.0, step / max(tc.lr_warmup_steps, 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            progress.seconds = time.perf_counter() - started
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                count = running.pop("_n")
                means = {k: v / count for k, v in running.items()}
                running.clear()
                bar.set_postfix(loss=f"{sum(means.values()) / len(means):.4f}", refresh=False)
                if main:
                    _append_log(out / "train_log.csv", step, lr, progress.seconds, means)
            last = step == tc.steps
            if step % tc.sample_every == 0 or step % tc.checkpoint_every == 0 or last:
                translator = translator_from_run(raw, ema, params, ts, config)
                if main and (step % tc.sample_every == 0 or last):
                    write_sample_grid(out / "samples" / f"step_{step:07d}.png", translator,
                                      *samples)
                if step % tc.checkpoint_every == 0 or last:
                    save_run(accelerator, out, translator, ts, config, step, progress.seconds)
            if step >= tc.steps:
                break
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / "model"


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


def save_run(accelerator: Accelerator, out: Path, translator: DiffusionTranslator,
             ts: TrainingSet, config: DiffusionConfig, step: int, seconds: float) -> None:
    """Accelerate state for --resume (all processes take part), then, on the main
    process, the contract checkpoint OUT/model; both replaced atomically."""
    tmp_state = out / ".state.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp_state, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp_state))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    old = out / ".state.old"
    shutil.rmtree(old, ignore_errors=True)
    if (out / "state").exists():
        os.replace(out / "state", old)
    os.replace(tmp_state, out / "state")
    shutil.rmtree(old, ignore_errors=True)
    meta = training_metadata(ts.df, ts.reference_site, config.data.manifest, ts.policy,
                             image_size=config.data.image_size)
    tc = config.train
    meta.update({
        "mode": config.inference.mode, "conditioning": config.model.conditioning,
        "model_sites": ts.model_keys, "polarity_flipped": ts.flipped_per_site(),
        "steps": step, "train_seconds": round(seconds, 1),
        "images_seen_per_model": step * tc.batch_size * tc.grad_accum
        * accelerator.num_processes,
        "processes": accelerator.num_processes,
        "training_config": config.model_dump(mode="json"),
    })
    translator.save(out / "model", meta)


def _append_log(path: Path, step: int, lr: float, seconds: float, means: dict) -> None:
    new = not path.exists()
    keys = sorted(means)
    with open(path, "a", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if new:
            writer.writerow(["step", "lr", "seconds", "loss", *(f"loss_{k}" for k in keys)])
        writer.writerow([step, f"{lr:.3g}", f"{seconds:.1f}",
                         f"{sum(means.values()) / len(means):.5f}",
                         *(f"{means[k]:.5f}" for k in keys)])


def _check_resumable(out: Path, config: DiffusionConfig) -> None:
    """--resume needs a saved state, the same models and architecture, and more steps."""
    if not (out / "state").is_dir():
        raise ConfigError(f"--resume: {out / 'state'} not found (nothing to resume); "
                          "start without --resume")
    saved = load_config(out / "config.yaml")
    for key in ARCH_KEYS:
        a, b = _get(saved, key), _get(config, key)
        if a != b:
            raise ConfigError(f"--resume: {key} differs from the saved run ({a} vs {b}); "
                              "the saved weights have the old shapes")
    done = _saved_step(out)
    if config.train.steps <= done:
        raise ConfigError(f"--resume: the run already did {done} steps; raise train.steps "
                          "above that to continue")


def _get(config: DiffusionConfig, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node.model_dump() if hasattr(node, "model_dump") else node


def _saved_step(out: Path) -> int:
    meta = out / "model" / "metadata.json"
    return int(json.loads(meta.read_text()).get("steps", 0)) if meta.is_file() else 0
