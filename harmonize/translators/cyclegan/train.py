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

import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from harmonize.accel import make_accelerator
from harmonize.fit import training_metadata
from harmonize.precision import training_precision
from harmonize.translators import polarity as pol
from harmonize.translators.cyclegan.config import ConfigError, CycleGANConfig, dump_config
from harmonize.translators.cyclegan.data import (
    EpochShuffle,
    TrainingSet,
    UnpairedCrops,
    prepare_training_set,
    sample_images,
)
from harmonize.translators.cyclegan.networks import (
    ImagePool,
    NLayerDiscriminator,
    ResnetGenerator,
    local_ncc_loss,
    lsgan_loss,
)
from harmonize.translators.cyclegan.translator import CycleGANTranslator

LOSS_NAMES = ("G_gan", "F_gan", "cycle", "idt", "struct", "D_B", "D_A", "inv")
# model fields that must match when resuming (the saved weights have these shapes)
ARCH_KEYS = ("model", "data.image_size")


class Progress:
    """Optimizer-step counter and pools: what accelerate's save_state cannot see."""

    def __init__(self, pool_size: int, seed: int) -> None:
        self.step = 0
        self.micro = 0
        self.seconds = 0.0
        self.pool_a = ImagePool(pool_size, seed)
        self.pool_b = ImagePool(pool_size, seed + 1)

    def state_dict(self) -> dict:
        return {"step": self.step, "micro": self.micro, "seconds": self.seconds,
                "pool_a": self.pool_a.state_dict(), "pool_b": self.pool_b.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro = int(state["step"]), int(state["micro"])
        self.seconds = float(state["seconds"])
        self.pool_a.load_state_dict(state["pool_a"])
        self.pool_b.load_state_dict(state["pool_b"])


def lr_factor(step: int, steps: int, decay: int) -> float:
    """Constant, then linear decay to 0 over the last `decay` steps (reference schedule)."""
    if decay <= 0 or step < steps - decay:
        return 1.0
    return max(0.0, (steps - step) / (decay + 1))


def train_cyclegan(config: CycleGANConfig) -> Path:
    """Train (or resume) and return the checkpoint directory OUT/model."""
    config.check_ready()
    out = Path(config.train.out)
    state_dir = out / "state"
    if config.train.resume:
        _check_resumable(out, config)
    elif state_dir.exists():
        raise ConfigError(f"{out} holds a previous run (state/); pass --resume to continue "
                          "it or choose another --out")
    tc = config.train
    accelerator = make_accelerator(mixed_precision=training_precision(tc.mixed_precision),
                              gradient_accumulation_steps=tc.grad_accum)
    main = accelerator.is_main_process
    set_seed(tc.seed, device_specific=True)
    ts = prepare_training_set(config, progress=tc.progress and main)
    if tc.resume:
        _check_same_sites(out, ts)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(config, out / "config.yaml")

    # --- data ---------------------------------------------------------------------------
    dataset = UnpairedCrops(ts, config.data.image_size, config.data.load_size, tc.seed)
    if len(dataset) < tc.batch_size * accelerator.num_processes:
        raise ConfigError(f"{len(dataset)} source images, fewer than one batch "
                          f"({tc.batch_size} x {accelerator.num_processes} processes)")
    sampler = EpochShuffle(len(dataset), tc.seed)
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.data.num_workers,
                        persistent_workers=config.data.num_workers > 0)

    # --- networks -----------------------------------------------------------------------
    m = config.model
    n_cond = len(ts.source_sites) if m.reverse == "site-conditioned" else 0
    g_ab = ResnetGenerator(ngf=m.ngf, n_blocks=m.n_blocks, upsample=m.upsample,
                           residual=m.residual)
    f_ba = ResnetGenerator(ngf=m.ngf, n_blocks=m.n_blocks, upsample=m.upsample,
                           residual=m.residual, n_conditions=n_cond)
    d_a = NLayerDiscriminator(ndf=m.ndf, n_layers=m.n_layers_d, n_conditions=n_cond)
    d_b = NLayerDiscriminator(ndf=m.ndf, n_layers=m.n_layers_d)
    for net in (g_ab, f_ba, d_a, d_b):
        net.apply(_init_weights)
    betas = (tc.beta1, tc.beta2)
    opt_g = torch.optim.Adam([*g_ab.parameters(), *f_ba.parameters()], lr=tc.lr, betas=betas)
    opt_d = torch.optim.Adam([*d_a.parameters(), *d_b.parameters()], lr=tc.lr, betas=betas)
    g_ab, f_ba, d_a, d_b, opt_g, opt_d, loader = accelerator.prepare(
        g_ab, f_ba, d_a, d_b, opt_g, opt_d, loader)
    progress = Progress(config.loss.pool_size, tc.seed)
    accelerator.register_for_checkpointing(progress)
    if config.train.resume:
        accelerator.load_state(str(state_dir))
    samples = sample_images(ts, config.data.load_size) if main else []

    # --- loop ---------------------------------------------------------------------------
    lw = config.loss
    raw = {name: accelerator.unwrap_model(net) for name, net in
           (("g", g_ab), ("f", f_ba), ("d_a", d_a), ("d_b", d_b))}
    bar = tqdm(total=tc.steps, initial=progress.step, desc="train cyclegan", unit="step",
               disable=not (tc.progress and main), dynamic_ncols=True)
    running: dict[str, float] = {}
    log_path = out / "train_log.csv"
    started = time.perf_counter() - progress.seconds
    per_epoch = len(loader)
    while progress.step < tc.steps:
        epoch, skip = divmod(progress.micro, per_epoch)
        loader.set_epoch(epoch)
        dataset.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in epoch_loader:
            real_a, real_b = batch["source"], batch["reference"]
            cond = (F.one_hot(batch["site_index"], n_cond).float() if n_cond else None)
            with accelerator.accumulate(g_ab, f_ba, d_a, d_b):
                # generator step: D frozen, called unwrapped (no DDP sync for them here)
                _requires_grad((d_a, d_b), False)
                with accelerator.autocast():
                    fake_b = g_ab(real_a)
                    rec_a = f_ba(fake_b, cond)
                    fake_a = f_ba(real_b, cond)
                    rec_b = g_ab(fake_a)
                    loss = {"G_gan": lsgan_loss(raw["d_b"](fake_b), True),
                            "F_gan": lsgan_loss(raw["d_a"](fake_a, cond), True),
                            "cycle": F.l1_loss(rec_a.float(), real_a)
                            + F.l1_loss(rec_b.float(), real_b)}
                    total = loss["G_gan"] + loss["F_gan"] + lw.lambda_cycle * loss["cycle"]
                    if lw.lambda_identity > 0:
                        loss["idt"] = (F.l1_loss(g_ab(real_b).float(), real_b)
                                       + F.l1_loss(f_ba(real_a, cond).float(), real_a))
                        total = total + lw.lambda_cycle * lw.lambda_identity * loss["idt"]
                    if lw.lambda_structure > 0:
                        loss["struct"] = (local_ncc_loss(real_a, fake_b)
                                          + local_ncc_loss(real_b, fake_a))
                        total = total + lw.lambda_structure * loss["struct"]
                accelerator.backward(total)
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)

                # discriminator step: real vs a pool of past fakes
                _requires_grad((d_a, d_b), True)
                with accelerator.autocast():
                    pooled_b, _ = progress.pool_b.query(fake_b.detach())
                    pooled_a, pooled_cond = progress.pool_a.query(fake_a.detach(), cond)
                    loss["D_B"] = 0.5 * (lsgan_loss(d_b(real_b), True)
                                         + lsgan_loss(d_b(pooled_b), False))
                    loss["D_A"] = 0.5 * (lsgan_loss(d_a(real_a, cond), True)
                                         + lsgan_loss(d_a(pooled_a, pooled_cond), False))
                accelerator.backward(loss["D_A"] + loss["D_B"])
                opt_d.step()
                opt_d.zero_grad(set_to_none=True)
            loss["inv"] = inverted_fraction(real_a, fake_b)
            for k, v in loss.items():
                running[k] = running.get(k, 0.0) + float(torch.as_tensor(v).detach())
            running["_n"] = running.get("_n", 0) + 1
            progress.micro += 1
            if not accelerator.sync_gradients:
                continue

            # --- one optimizer step done ----------------------------------------------------
            progress.step += 1
            factor = lr_factor(progress.step, tc.steps, tc.decay)
            for opt in (opt_g, opt_d):
                for group in opt.param_groups:
                    group["lr"] = tc.lr * factor
            progress.seconds = time.perf_counter() - started
            bar.update(1)
            step = progress.step
            if step % tc.log_every == 0 or step == tc.steps:
                count = running.pop("_n")
                means = {k: v / count for k, v in running.items()}
                running.clear()
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items() if k != "inv"},
                                refresh=False)
                if main:
                    _append_log(log_path, step, tc.lr * factor, progress.seconds, means)
            if main and (step % tc.sample_every == 0 or step == tc.steps):
                translator = translator_from_run(raw["g"], ts, config)
                translator.passthrough_reference = False  # show what G does to the reference
                write_sample_grid(out / "samples" / f"step_{step:07d}.png", translator, samples,
                                  config.data.image_size)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                save_run(accelerator, out, raw["g"], ts, config, step, progress.seconds)
            if step >= tc.steps:
                break
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out / "model"


def _requires_grad(nets, flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def _init_weights(module: torch.nn.Module) -> None:
    """Reference initialization: N(0, 0.02) convolutions, zero biases."""
    if isinstance(module, torch.nn.Conv2d):
        torch.nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)


@torch.no_grad()
def inverted_fraction(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Share of the batch whose translation anti-correlates with its input (should be 0)."""
    flags = [pol.correlation(pol.thumbnail(a[0].float().cpu().numpy()),
                             pol.thumbnail(b[0].float().cpu().numpy())) < 0
             for a, b in zip(real, fake, strict=True)]
    return float(np.mean(flags))


def _append_log(path: Path, step: int, lr: float, seconds: float, means: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if new:
            writer.writerow(["step", "lr", "seconds", *LOSS_NAMES])
        writer.writerow([step, f"{lr:.3g}", f"{seconds:.1f}",
                         *(f"{means[k]:.5f}" if k in means else "" for k in LOSS_NAMES)])


def write_sample_grid(path: Path, translator: CycleGANTranslator,
                      samples: list[tuple[np.ndarray, str]], side: int) -> Path:
    """Top row the inputs, bottom row their translations (whole images, tiled inference
    as apply does it; the last column is a reference-site image); 8-bit PNG."""
    images = [x for x, _ in samples]
    outputs = translator.transform(images, [s for _, s in samples])

    def cell(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.clip(x, 0, 1).astype(np.float32))[None, None]
        return F.interpolate(t, size=(side, side), mode="area")[0, 0].numpy()

    grid = np.concatenate([np.concatenate([cell(x) for x in row], axis=1)
                           for row in (images, outputs)], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}")
    Image.fromarray(np.rint(grid * 255).astype(np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_run(accelerator: Accelerator, out: Path, g: torch.nn.Module, ts: TrainingSet,
             config: CycleGANConfig, step: int, seconds: float) -> None:
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
    translator_from_run(g, ts, config).save(out / "model", checkpoint_metadata(
        ts, config, step, seconds, accelerator.num_processes))


def translator_from_run(g: torch.nn.Module, ts: TrainingSet,
                        config: CycleGANConfig) -> CycleGANTranslator:
    m, inf = config.model, config.inference
    t = CycleGANTranslator(ngf=m.ngf, n_blocks=m.n_blocks, upsample=m.upsample,
                           residual=m.residual, tile_size=config.data.image_size,
                           tile_overlap=inf.tile_overlap, batch_size=inf.batch_size,
                           precision=inf.precision, polarity=config.data.polarity,
                           passthrough_reference=inf.passthrough_reference,
                           train_load_size=config.data.load_size, policy=ts.policy)
    return t.set_trained(g, ts.template, ts.reference_site)


def checkpoint_metadata(ts: TrainingSet, config: CycleGANConfig, step: int, seconds: float,
                        processes: int) -> dict:
    meta = training_metadata(ts.df, ts.reference_site, config.data.manifest, ts.policy,
                             image_size=config.data.image_size)
    tc = config.train
    meta.update({
        "source_sites": ts.source_sites,
        "polarity_flipped": ts.flipped_per_site(),
        "steps": step,
        "images_seen": step * tc.batch_size * tc.grad_accum * processes,
        "train_seconds": round(seconds, 1),
        "processes": processes,
        "training_config": config.model_dump(mode="json"),
    })
    return meta


def _check_resumable(out: Path, config: CycleGANConfig) -> None:
    """--resume needs a saved state and the same architecture."""
    if not (out / "state").is_dir():
        raise ConfigError(f"--resume: {out / 'state'} not found (nothing to resume); "
                          "start without --resume")
    from harmonize.translators.cyclegan.config import load_config

    saved = load_config(out / "config.yaml")
    for key in ARCH_KEYS:
        a, b = _get(saved, key), _get(config, key)
        if a != b:
            raise ConfigError(f"--resume: {key} differs from the saved run ({a} vs {b}); "
                              "the saved weights have the old shapes")
    if config.train.steps <= _saved_step(out):
        raise ConfigError(f"--resume: the run already did {_saved_step(out)} steps; raise "
                          f"train.steps above that to continue")


def _check_same_sites(out: Path, ts: TrainingSet) -> None:
    """The site-conditioned networks have one input plane per source site."""
    meta = out / "model" / "metadata.json"
    saved = json.loads(meta.read_text()).get("source_sites") if meta.is_file() else None
    if saved is not None and saved != ts.source_sites:
        raise ConfigError(f"--resume: the run trained on source sites {saved}, this data has "
                          f"{ts.source_sites}; resume with the same sites")


def _get(config: CycleGANConfig, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node.model_dump() if hasattr(node, "model_dump") else node


def _saved_step(out: Path) -> int:
    meta = out / "model" / "metadata.json"
    return int(json.loads(meta.read_text()).get("steps", 0)) if meta.is_file() else 0

