"""One training run, whatever is trained: what the CycleGAN and diffusion loops share.

`TrainingRun` owns the accelerator, the seed, the run folder (refusing to overwrite a
previous run, checking that a --resume can continue it), the progress bar, the
resumable (epoch, batch) order, the running loss sums (kept on the device, read only
when a log row is written), OUT/train_log.csv (and, with `train.log_with: tensorboard`,
the same rows and the sample grids in OUT/tensorboard through accelerate's trackers) and
the atomic OUT/state for --resume.
The translator's `train.py` keeps the algorithm: it builds its networks, runs its own
step on each batch and says when to sample and what to save.

    run = TrainingRun(config, "train cyclegan", ARCH_KEYS, LOSS_NAMES)
    ...
    for batch in run.batches(loader, dataset):
        with run.accelerator.accumulate(*nets):
            losses = my_step(batch)
        if not run.end_micro_step(losses):
            continue              # gradient accumulation: no optimizer step yet
        run.log(lr)
        if run.due(config.train.checkpoint_every):
            run.save_state(); save_checkpoint(...)
    run.finish()
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm import tqdm

from harmonize.configs import ConfigError, dump_config, load_yaml_config
from harmonize.training.config import TranslatorTrainingConfig
from harmonize.training.device import make_accelerator, training_precision
from harmonize.training.distributed import check_ranks_agree


class StepCounter:
    """Optimizer and micro-batch steps, seconds trained, and any extra state the loop
    registers (e.g. CycleGAN's image pools): what accelerate's save_state cannot see."""

    def __init__(self, **extra) -> None:
        self.step = 0
        self.micro = 0
        self.seconds = 0.0
        self.extra = extra

    def state_dict(self) -> dict:
        return {"step": self.step, "micro": self.micro, "seconds": self.seconds,
                **{k: v.state_dict() for k, v in self.extra.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro = int(state["step"]), int(state["micro"])
        self.seconds = float(state["seconds"])
        for key, value in self.extra.items():
            value.load_state_dict(state[key])


class TrainingRun:
    """See the module docstring. `arch_keys`: config entries that must equal the saved
    run's on --resume (the saved weights have their shapes); `loss_names`: the log's
    columns after step, lr, seconds, in order (None: the losses of the first row, in
    the order the loop gave them)."""

    def __init__(self, config: TranslatorTrainingConfig, desc: str,
                 arch_keys: Sequence[str], loss_names: Sequence[str] | None,
                 **extra_state) -> None:
        config.check_ready()
        self.config = config
        self.tc = tc = config.train
        self.out = Path(tc.out)
        if tc.resume:
            self._check_resumable(arch_keys)
        elif (self.out / "state").exists():
            raise ConfigError(f"{self.out} holds a previous run (state/); pass --resume to "
                              "continue it or choose another --out")
        self.accelerator = make_accelerator(
            mixed_precision=training_precision(tc.mixed_precision),
            gradient_accumulation_steps=tc.grad_accum, **_tracker_options(tc))
        self.is_main = self.accelerator.is_main_process
        set_seed(tc.seed, device_specific=True)
        if tc.tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = tc.tf32
            torch.backends.cudnn.allow_tf32 = tc.tf32
        self.counter = StepCounter(**extra_state)
        self.accelerator.register_for_checkpointing(self.counter)
        self.desc = desc
        self.loss_names = list(loss_names) if loss_names is not None else None
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._bar: tqdm | None = None
        self.last_means: dict[str, float] = {}
        self.nets: list[torch.nn.Module] = []  # set by track()

    # --- set-up ---------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.counter.step

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def start(self) -> None:
        """Call once the data is checked: creates OUT and writes what runs (config.yaml)."""
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(self.config, self.out / "config.yaml")
        if self.tc.log_with != "none":  # every process calls it; only the main one writes
            self.accelerator.init_trackers(TRACKER_RUN, config=_flat_scalars(
                self.config.model_dump(mode="json")))

    def optimize(self, net: torch.nn.Module) -> torch.nn.Module:
        """train.channels_last / train.compile applied to a network (before prepare)."""
        if self.tc.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if self.tc.compile:
            net = torch.compile(net)
        return net

    def resume_if_asked(self) -> None:
        """Call after accelerator.prepare and any register_for_checkpointing."""
        if self.tc.resume:
            self.accelerator.load_state(str(self.out / "state"))

    # --- the loop -------------------------------------------------------------------
    def batches(self, loader, dataset) -> Iterator:
        """Batches until train.steps optimizer steps are done. Epoch e uses the order
        seeded by (seed, e) (`loader.set_epoch`, `dataset.set_epoch`); a resumed run
        skips the micro-batches already done in its epoch, so it continues exactly."""
        self._bar = tqdm(total=self.tc.steps, initial=self.counter.step, desc=self.desc,
                         unit="step", disable=not (self.tc.progress and self.is_main),
                         dynamic_ncols=True)
        self._started = time.perf_counter() - self.counter.seconds
        per_epoch = len(loader)
        while self.counter.step < self.tc.steps:
            epoch, skip = divmod(self.counter.micro, per_epoch)
            loader.set_epoch(epoch)
            dataset.set_epoch(epoch)
            epoch_loader = (self.accelerator.skip_first_batches(loader, skip) if skip
                            else loader)
            for batch in epoch_loader:
                yield batch
                if self.counter.step >= self.tc.steps:
                    return

    def end_micro_step(self, losses: dict[str, torch.Tensor | float]) -> bool:
        """Add this micro-batch's losses to the running sums (on the device: no host
        sync) and count it; True when an optimizer step has just completed."""
        for key, value in losses.items():
            value = torch.as_tensor(value).detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._count += 1
        self.counter.micro += 1
        if not self.accelerator.sync_gradients:
            return False
        self.counter.step += 1
        self.counter.seconds = time.perf_counter() - self._started
        self._bar.update(1)
        return True

    def due(self, every: int) -> bool:
        """Whether this optimizer step is a multiple of `every`, or the last one."""
        return self.counter.step % every == 0 or self.counter.step == self.tc.steps

    def log(self, lr: float) -> dict[str, float] | None:
        """Every train.log_every steps: the mean losses since the last row (one host
        sync), to the progress bar and OUT/train_log.csv; returns them."""
        if not self.due(self.tc.log_every) or not self._count:
            return None
        names = list(self._sums)
        values = torch.stack([self._sums[k] for k in names]).cpu().tolist()
        means = {k: v / self._count for k, v in zip(names, values, strict=True)}
        self._sums.clear()
        self._count = 0
        self.last_means = means
        self._bar.set_postfix({k: f"{v:.3f}" for k, v in list(means.items())[:4]},
                              refresh=False)
        if self.is_main:
            self._append_log(lr, means)
        if self.tc.log_with != "none":
            self.accelerator.log({**means, "lr": lr}, step=self.counter.step)
        return means

    def log_sample_grid(self, png: Path) -> None:
        """Show a sample grid the loop has written (OUT/samples/...) in TensorBoard too."""
        if self.tc.log_with != "tensorboard" or not self.is_main:
            return
        import numpy as np
        from PIL import Image

        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("samples", np.asarray(Image.open(png).convert("L")),
                         self.counter.step, dataformats="HW")

    def _append_log(self, lr: float, means: dict[str, float]) -> None:
        path = self.out / "train_log.csv"
        new = not path.exists()
        if self.loss_names is None:
            self.loss_names = list(means)
        with open(path, "a", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            if new:
                writer.writerow(["step", "lr", "seconds", *self.loss_names])
            writer.writerow([self.counter.step, f"{lr:.3g}", f"{self.counter.seconds:.1f}",
                             *(f"{means[k]:.5f}" if k in means else ""
                               for k in self.loss_names)])

    # --- saving ---------------------------------------------------------------------
    def track(self, nets) -> None:
        """The (unwrapped) networks whose replicas must agree across processes; checked
        before every saved state and at the end (`harmonize.training.distributed`)."""
        self.nets = list(nets)

    def check_ranks_agree(self) -> None:
        check_ranks_agree(self.accelerator, self.nets,
                          f"{self.out} at step {self.step}")

    def save_state(self) -> None:
        """Accelerate state for --resume (every process takes part), replacing OUT/state
        atomically: an interruption leaves the previous state or the new one."""
        self.check_ranks_agree()
        out, acc = self.out, self.accelerator
        tmp_state = out / ".state.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp_state, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp_state))
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        old = out / ".state.old"
        shutil.rmtree(old, ignore_errors=True)
        if (out / "state").exists():
            os.replace(out / "state", old)
        os.replace(tmp_state, out / "state")
        shutil.rmtree(old, ignore_errors=True)

    def run_metadata(self) -> dict:
        """Steps, time and processes, for the checkpoint's metadata."""
        tc = self.tc
        return {"steps": self.counter.step, "train_seconds": round(self.counter.seconds, 1),
                "processes": self.accelerator.num_processes,
                "images_seen_per_network": self.counter.step * tc.batch_size * tc.grad_accum
                * self.accelerator.num_processes,
                "training_config": self.config.model_dump(mode="json")}

    def finish(self) -> Path:
        if self._bar is not None:
            self._bar.close()
        self.check_ranks_agree()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return self.out / "model"

    # --- resume checks --------------------------------------------------------------
    def _check_resumable(self, arch_keys: Sequence[str]) -> None:
        """--resume needs a saved state, the same architecture, and more steps to do."""
        out = self.out
        if not (out / "state").is_dir():
            raise ConfigError(f"--resume: {out / 'state'} not found (nothing to resume); "
                              "start without --resume")
        saved = load_yaml_config(type(self.config), out / "config.yaml")
        for key in arch_keys:
            a, b = _get(saved, key), _get(self.config, key)
            if a != b:
                raise ConfigError(f"--resume: {key} differs from the saved run ({a} vs {b}); "
                                  "the saved weights have the old shapes")
        done = int(self.saved_metadata().get("steps", 0))
        if self.tc.steps <= done:
            raise ConfigError(f"--resume: the run already did {done} steps; raise "
                              "train.steps above that to continue")

    def saved_metadata(self) -> dict:
        meta = self.out / "model" / "metadata.json"
        return json.loads(meta.read_text()) if meta.is_file() else {}


TRACKER_RUN = "tensorboard"  # OUT/tensorboard holds the event files


def _tracker_options(tc) -> dict:
    """Accelerator keywords for `train.log_with`; a missing package is a config error
    named before anything trains."""
    if tc.log_with == "none":
        return {}
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("train.log_with: tensorboard needs the tensorboard package: "
                          "pip install 'harmonize[tensorboard]' (or set log_with: none)") from None
    return {"log_with": tc.log_with, "project_dir": str(tc.out)}


def _flat_scalars(config: dict, prefix: str = "") -> dict:
    """A nested config as TensorBoard's hyperparameters: dotted keys, scalar values."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_scalars(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node.model_dump() if hasattr(node, "model_dump") else node


def set_lr(optimizers, lr: float) -> float:
    """Set every parameter group's learning rate; returns it (for the log)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
    return lr
