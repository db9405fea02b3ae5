"""One accelerate `Accelerator` per training, several trainings per process."""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.state import AcceleratorState


def make_accelerator(**kwargs) -> Accelerator:
    """A fresh Accelerator. accelerate keeps the first Accelerator's settings (mixed
    precision) process-wide and refuses different ones later, but an evaluation trains a
    CycleGAN (fp32), diffusion priors (bf16) and classifiers in turn in one process, so
    the settings are reset first. The process group (PartialState) is kept: under
    `accelerate launch` every process still knows its rank."""
    AcceleratorState._reset_state()
    return Accelerator(**kwargs)
