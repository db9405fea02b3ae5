"""Classifier training: one loop (accelerate) shared by `harmonize train classifier`,
`accelerate launch recipes/train_classifier.py` and the evaluation matrix.

Images are decoded once into a tensor (N, 1, S, S) in model space: at the sizes a
classifier sees (64-256 px) a few hundred images fit in memory many times over, and
the evaluation matrix retrains on the same images dozens of times.
Class imbalance: by default the positive class gets loss weight n_neg / n_pos
(``balance: weighted-loss``); ``sampler`` draws classes equally instead.
"""

from __future__ import annotations

import copy
import csv
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm import tqdm

from harmonize.checkpoint import load_checkpoint, save_checkpoint
from harmonize.classify.config import ClassifierConfig, ModelConfig, TrainConfig
from harmonize.classify.networks import Classifier, load_weights
from harmonize.classify.pretrained import load_imagenet_weights
from harmonize.configs import ConfigError, dump_config
from harmonize.data.datasets import load_image_tensor
from harmonize.data.intensity import IntensityPolicy
from harmonize.data.manifest import binary_targets, positive_label, select_rows
from harmonize.data.transforms import AUGMENTATIONS, augment
from harmonize.training.device import (
    loader_options,
    make_accelerator,
    model_on,
    pick_device,
    training_precision,
)
from harmonize.training.distributed import check_ranks_agree
from harmonize.training.metadata import training_metadata

KIND = "classifier"


def load_images(paths: list[str], image_size: int, policy: IntensityPolicy | None = None,
                progress: bool = True, desc: str = "load") -> torch.Tensor:
    """Decode and resize images (threads: decoding releases the GIL) into (N, 1, S, S)."""
    policy = policy or IntensityPolicy()
    out = torch.empty(len(paths), 1, image_size, image_size)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        loaded = pool.map(lambda p: load_image_tensor(p, image_size, policy), paths)
        for i, x in enumerate(tqdm(loaded, total=len(paths), desc=desc, unit="img",
                                   disable=not progress)):
            out[i] = x
    return out


class TensorImages(Dataset):
    """(image, label) from an in-memory tensor, optionally augmented (plain or acquisition)."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, augmentation: str = "none",
                 seed: int = 0):
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.float32)
        self.aug = (AUGMENTATIONS[augmentation](images.shape[-1], seed)
                    if augmentation != "none" else None)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        x = self.images[index]
        return (augment(self.aug, x) if self.aug is not None else x), self.labels[index]


def make_loader(images: torch.Tensor, labels: np.ndarray, tc: TrainConfig) -> DataLoader:
    """Shuffled batches (or class-balanced draws), augmented if asked; seeded."""
    data = TensorImages(images, labels, tc.augment, tc.seed)
    generator = torch.Generator().manual_seed(tc.seed)
    # on a GPU: pinned memory, and workers for the per-image augmentation (in-memory
    # images without augmentation need none)
    options = loader_options(pick_device(), None if tc.augment != "none" else 0)
    if tc.balance == "sampler":
        n_pos = int(labels.sum())
        weights = np.where(labels == 1, 0.5 / n_pos, 0.5 / (len(labels) - n_pos))
        sampler = WeightedRandomSampler(weights.tolist(), len(labels), generator=generator)
        return DataLoader(data, batch_size=tc.batch_size, sampler=sampler, **options)
    return DataLoader(data, batch_size=tc.batch_size, shuffle=True, generator=generator,
                      **options)


def make_loss(labels: np.ndarray, balance: str) -> torch.nn.Module:
    n_pos = int(labels.sum())
    weight = (len(labels) - n_pos) / n_pos if balance == "weighted-loss" else 1.0
    return torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(weight))


def check_labels(labels: np.ndarray) -> None:
    if set(np.unique(labels)) - {0, 1} or len(np.unique(labels)) < 2:
        raise ValueError(f"training labels must contain both classes 0 and 1; got "
                         f"{sorted(set(np.unique(labels).tolist()))}")


def run_epochs(model: torch.nn.Module, loader, loss_fn, opt, epochs: int, sched=None,
               accelerator: Accelerator | None = None, proximal: tuple | None = None,
               bar=None) -> list[float]:
    """The training loop proper; returns the mean loss per epoch. ``proximal`` =
    (mu, {name: tensor}) adds FedProx's (mu / 2) * ||w - w_global||^2."""
    model.train()
    device = next(model.parameters()).device
    history = []
    for _ in range(epochs):
        losses = []  # kept on the device, read once per epoch
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x).float(), y)
            if proximal is not None and proximal[0] > 0:
                mu, center = proximal
                loss = loss + 0.5 * mu * sum(((p - center[n]) ** 2).sum()
                                             for n, p in model.named_parameters())
            opt.zero_grad(set_to_none=True)
            (accelerator.backward(loss) if accelerator is not None else loss.backward())
            opt.step()
            if sched is not None:
                sched.step()
            losses.append(loss.detach())
            if bar is not None:
                bar.update(1)
        history.append(float(torch.stack(losses).mean()))
        if bar is not None:
            bar.set_postfix(loss=f"{history[-1]:.3f}")
    return history


def new_classifier(model_cfg: ModelConfig, image_size: int) -> Classifier:
    """A classifier as its config starts it: from a harmonize classifier's weights
    (model.weights), from ImageNet weights in torchvision's format (model.pretrained), or
    from scratch."""
    model = Classifier(model_cfg.arch, image_size, model_cfg.width, model_cfg.norm,
                       imagenet_input=model_cfg.pretrained is not None)
    if model_cfg.pretrained is not None:
        load_imagenet_weights(model, model_cfg.pretrained)
    if model_cfg.weights is not None:
        load_weights(model, model_cfg.weights)
    return model


def one_cycle(opt: torch.optim.Optimizer, lr: float, total: int):
    """One-cycle schedule with a 10% warm-up of at least two steps; a constant rate for
    runs too short to have one (torch's OneCycleLR divides by zero on them)."""
    if total < 6:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total,
                                               pct_start=max(0.1, 2.5 / total))


def fit_classifier(images: torch.Tensor, labels: np.ndarray, model_cfg: ModelConfig,
                   train_cfg: TrainConfig, desc: str = "train classifier",
                   log: list[dict] | None = None) -> Classifier:
    """Train a fresh classifier on (N, 1, S, S) images and 0/1 labels; returns it in eval
    mode on the CPU. Same inputs and seed give the same weights."""
    labels = np.asarray(labels)
    check_labels(labels)
    tc = train_cfg
    torch.manual_seed(tc.seed)
    accelerator = make_accelerator(mixed_precision=training_precision(tc.mixed_precision,
                                                                     cpu_bf16=False))
    model = new_classifier(model_cfg, images.shape[-1])
    loader = make_loader(images, labels, tc)
    loss_fn = make_loss(labels, tc.balance)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    total = tc.epochs * len(loader)
    sched = one_cycle(opt, tc.lr, total)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    loss_fn = loss_fn.to(accelerator.device)
    bar = tqdm(total=total, desc=desc, unit="step", leave=False,
               disable=not (tc.progress and accelerator.is_main_process))
    history = run_epochs(model, loader, loss_fn, opt, tc.epochs, sched, accelerator, bar=bar)
    bar.close()
    if log is not None:
        log.extend({"epoch": i + 1, "loss": v} for i, v in enumerate(history))
    trained = accelerator.unwrap_model(model)
    check_ranks_agree(accelerator, [trained], desc)
    return trained.cpu().eval()


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Probability of the positive class per image."""
    model.eval()
    device = pick_device()
    with model_on(model, device):
        out = [torch.sigmoid(model(images[i:i + batch_size].to(device, non_blocking=True))
                             .float()) for i in range(0, len(images), batch_size)]
        return torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.float32)


@torch.no_grad()
def adapt_batchnorm(model: Classifier, images: torch.Tensor, batch_size: int = 64
                    ) -> Classifier:
    """A copy of the model whose BatchNorm statistics are those of `images` (unlabelled
    images of one site; AdaBN, Li et al. 2016). A federated model was trained with each
    node's batches normalized by that site's own statistics; a site that normalizes with
    its own statistics at test time uses it as it was trained. Labels are not needed and
    nothing leaves the site. Models without BatchNorm are returned unchanged (copied)."""
    adapted = copy.deepcopy(model)
    norms = [m for m in adapted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    if norms:
        adapted.train()
        device = pick_device()
        with model_on(adapted, device):
            for i in range(0, len(images), batch_size):
                adapted(images[i:i + batch_size].to(device, non_blocking=True))
    return adapted.eval()


def train_classifier(config: ClassifierConfig) -> Path:
    """Train from a manifest and save OUT/model (checkpoint contract) + OUT/train_log.csv."""
    config.check_ready()
    dc, tc = config.data, config.train
    manifest = Path(dc.manifest)
    df, _, _ = select_rows(manifest, dc.sites, dc.split)
    if dc.sites is not None:
        df = df[df["site"].astype(str).isin(dc.sites)]
    positive = dc.positive or positive_label(df["label"].astype(str))
    labels = binary_targets(df, positive=positive)
    if (labels < 0).any():
        raise ConfigError(f"{manifest}: {(labels < 0).sum()} row(s) have no label; a "
                          "classifier needs labelled rows (filter them or fill the label)")
    policy = IntensityPolicy(mode=dc.intensity)
    images = load_images(df["path"].astype(str).tolist(), dc.image_size, policy, tc.progress)
    log: list[dict] = []
    model = fit_classifier(images, labels, config.model, tc, log=log)
    out = Path(tc.out)
    state = PartialState()
    if not state.is_main_process:  # N processes, one writer (same weights); the others
        state.wait_for_everyone()  # stay until it is done (leaving early aborts gloo)
        return out / "model"
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "config.yaml")
    with open(out / "train_log.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["epoch", "loss"])
        writer.writeheader()
        writer.writerows(log)
    meta = training_metadata(df, "", manifest, policy, dc.image_size)
    meta.pop("reference_site")
    meta.update({"positive_label": positive, "n_positive": int(labels.sum()),
                 "n_images": len(labels)})
    saved = save_classifier(model, out / "model", config, meta)
    state.wait_for_everyone()
    return saved


def save_classifier(model: Classifier, directory: Path, config: ClassifierConfig,
                    metadata: dict) -> Path:
    arch = {"arch": model.arch, "width": config.model.width, "norm": model.norm,
            "imagenet_input": model.imagenet_input,
            "image_size": config.data.image_size, "intensity": config.data.intensity}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return save_checkpoint(directory, KIND, state, arch, metadata)


def load_classifier(directory: str | Path) -> tuple[Classifier, dict, dict]:
    """(model in eval mode, its config: arch/width/image_size/intensity, metadata)."""
    ckpt = load_checkpoint(directory)
    if ckpt.kind != KIND:
        raise ValueError(f"{directory}: a '{ckpt.kind}' checkpoint, not a classifier")
    cfg = ckpt.config
    model = Classifier(cfg["arch"], int(cfg["image_size"]), int(cfg["width"]),
                       cfg.get("norm", "batch"), bool(cfg.get("imagenet_input", False)))
    model.load_state_dict(ckpt.tensors)
    return model.eval(), cfg, ckpt.metadata
