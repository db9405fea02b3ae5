"""What the CycleGAN and CUT loops (`train.py`, `train_cut.py`) share besides
`TrainingRun`: the lr schedule, the translator a run's generator makes (CycleGAN, CUT or
histogram-residual), the sample grid, checkpoint metadata, and the unlabelled snapshot
choice (`selection.py`) at the start and end of a run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from harmonize.training.device import loader_options
from harmonize.training.metadata import training_metadata
from harmonize.training.run import TrainingRun
from harmonize.training.sampler import EpochShuffle
from harmonize.translators.cyclegan.config import ConfigError, CycleGANConfig
from harmonize.translators.cyclegan.data import (
    TrainingSet,
    UnpairedCrops,
    cached_images,
    prepare_training_set,
)
from harmonize.translators.cyclegan.histogram_residual import HistogramResidualTranslator
from harmonize.translators.cyclegan.selection import SnapshotSelection, verdict
from harmonize.translators.cyclegan.selection import install as install_snapshot
from harmonize.translators.cyclegan.translator import CUTTranslator, CycleGANTranslator

# model fields that must match when resuming (the saved weights have these shapes)
ARCH_KEYS = ("model", "data.image_size")


def start_run(config: CycleGANConfig, loss_names: tuple[str, ...], **extra_state
              ) -> tuple[TrainingRun, TrainingSet]:
    """The run folder and accelerator, the checked training data (a resumed run must have
    the same source sites), OUT/config.yaml written. `extra_state` is saved for --resume."""
    run = TrainingRun(config, f"train {config.kind}", ARCH_KEYS, loss_names, **extra_state)
    ts = prepare_training_set(config, progress=config.train.progress and run.is_main)
    if config.train.resume:
        check_same_sites(run.saved_metadata(), ts)
    run.start()
    return run, ts


def lr_factor(step: int, steps: int, decay: int) -> float:
    """Constant, then linear decay to 0 over the last `decay` steps (reference schedule)."""
    if decay <= 0 or step < steps - decay:
        return 1.0
    return max(0.0, (steps - step) / (decay + 1))


def start_selection(run: TrainingRun, ts: TrainingSet, config: CycleGANConfig,
                    g: torch.nn.Module) -> SnapshotSelection | None:
    """With train.select_fraction (main process): the held-out images, histogram
    matching's score on them and, for the histogram-residual translator, step 0's
    (histogram matching with its landmarks: a snapshot like the others)."""
    if ts.heldout is None or not run.is_main:
        return None
    selection = SnapshotSelection(ts.heldout, ts.reference_site, ts.template,
                                  config.data.polarity, ts.policy, run.out,
                                  config.data.fingerprints)
    if not config.train.resume:
        ref = ts.df[ts.df["site"].astype(str) == ts.reference_site]
        selection.record_baseline(cached_images(ref, ts.policy, ts.cache), ts.reference_site,
                                  ts.policy)
        if config.landmarks is not None:
            start = translator_from_run(g, ts, config)
            start.save(run.out / "snapshots" / f"step_{0:07d}",
                       {**checkpoint_metadata(run, ts, config), "steps": 0})
            selection.record(0, start)
    return selection


def finish_selection(selection: SnapshotSelection, out: Path) -> None:
    """Install the best-scoring snapshot as OUT/model and say how it compares."""
    best, baseline = selection.choose()
    model = out / "model"
    chosen = out / "snapshots" / f"step_{int(best['step']):07d}"
    if (chosen / "model.safetensors").read_bytes() != (model / "model.safetensors").read_bytes():
        install_snapshot(chosen, model)
    meta_path = model / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["selection"] = {"step": int(best["step"]), "score": best["score"],
                         "histogram_matching_score": baseline and baseline["score"],
                         "heldout_images": len(selection.sources) + len(selection.references)}
    tmp = meta_path.with_name(".metadata.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)
    print(verdict(best, baseline))


def requires_grad(nets, flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


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


def translator_from_run(g: torch.nn.Module, ts: TrainingSet,
                        config: CycleGANConfig) -> CycleGANTranslator:
    """The translator the config trains (CycleGAN, or histogram-residual with landmarks)
    holding a CPU copy of `g`."""
    m, inf = config.model, config.inference
    kwargs = dict(ngf=m.ngf, n_blocks=m.n_blocks, upsample=m.upsample, residual=m.residual,
                  tile_size=config.data.image_size, tile_overlap=inf.tile_overlap,
                  batch_size=inf.batch_size, precision=inf.precision,
                  polarity=config.data.polarity,
                  passthrough_reference=inf.passthrough_reference,
                  train_load_size=config.data.load_size, policy=ts.policy)
    if config.landmarks is None:
        cls = CUTTranslator if config.kind == "cut" else CycleGANTranslator
        return cls(**kwargs).set_trained(g, ts.template, ts.reference_site)
    t = HistogramResidualTranslator(**kwargs, landmarks_per=ts.landmarks.per,
                                    n_quantiles=ts.landmarks.n_quantiles,
                                    fingerprints=config.data.fingerprints)
    return t.set_trained(g, ts.template, ts.reference_site, ts.landmarks)


def checkpoint_metadata(run: TrainingRun, ts: TrainingSet, config: CycleGANConfig) -> dict:
    meta = training_metadata(ts.df, ts.reference_site, config.data.manifest, ts.policy,
                             image_size=config.data.image_size)
    meta.update({"source_sites": ts.source_sites, "polarity_flipped": ts.flipped_per_site(),
                 **run.run_metadata()})
    return meta


def check_same_sites(saved: dict, ts: TrainingSet) -> None:
    """The site-conditioned networks have one input plane per source site."""
    sites = saved.get("source_sites")
    if sites is not None and sites != ts.source_sites:
        raise ConfigError(f"--resume: the run trained on source sites {sites}, this data has "
                          f"{ts.source_sites}; resume with the same sites")


def crop_loader(run: TrainingRun, ts: TrainingSet, config: CycleGANConfig
                ) -> tuple[UnpairedCrops, DataLoader]:
    """The (source, reference) crops and their seeded, resumable loader."""
    tc = config.train
    dataset = UnpairedCrops(ts, config.data.image_size, config.data.load_size, tc.seed,
                            config.data.fingerprints)
    processes = run.accelerator.num_processes
    if len(dataset) < tc.batch_size * processes:
        raise ConfigError(f"{len(dataset)} source images, fewer than one batch "
                          f"({tc.batch_size} x {processes} processes)")
    loader = DataLoader(dataset, batch_size=tc.batch_size,
                        sampler=EpochShuffle(len(dataset), tc.seed), drop_last=True,
                        **loader_options(run.device, config.data.num_workers))
    return dataset, loader


def after_step(run: TrainingRun, g: torch.nn.Module, ts: TrainingSet, config: CycleGANConfig,
               samples: list, selection: SnapshotSelection | None) -> None:
    """What follows an optimizer step when it is due: the sample grid, a snapshot (scored
    for the unlabelled choice), the resumable state and OUT/model (main process writes)."""
    tc = config.train
    if run.is_main and run.due(tc.sample_every):
        translator = translator_from_run(g, ts, config)
        translator.passthrough_reference = False  # show what G does to the reference
        run.log_sample_grid(write_sample_grid(
            run.out / "samples" / f"step_{run.step:07d}.png", translator, samples,
            config.data.image_size))
    if tc.snapshot_every and run.is_main and run.due(tc.snapshot_every):
        snapshot = translator_from_run(g, ts, config)
        snapshot.save(run.out / "snapshots" / f"step_{run.step:07d}",
                      checkpoint_metadata(run, ts, config))
        if selection is not None:
            selection.record(run.step, snapshot)
    if run.due(tc.checkpoint_every):
        run.save_state()
        if run.is_main:
            translator_from_run(g, ts, config).save(run.out / "model",
                                                    checkpoint_metadata(run, ts, config))
