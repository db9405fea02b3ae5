"""Config sections every translator training shares (CycleGAN, diffusion priors).

Each translator's config subclasses these and adds its own fields (CycleGAN's crop and
lr decay, the diffusion prior's EMA and warm-up), so one key means one thing everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from harmonize.configs import ConfigError, Section


class TranslatorDataConfig(Section):
    manifest: Path | None = Field(None, description="manifest CSV (required to train)")
    reference_site: str | None = Field(None, description="the site every image is mapped to")
    sites: list[str] | None = Field(None, description="train on these sites; None: all")
    split: str | None = Field(None, description="use only rows with this split, e.g. train")
    image_size: int = Field(256, description="the network's training input side")
    intensity: Literal["auto", "bit-depth", "percentile"] = "auto"
    bits: int | None = None
    polarity: Literal["auto", "keep"] = Field(
        "auto", description="flip images inverted relative to the reference site")
    cache_mb: int = Field(2048, ge=0, description="keep decoded images in memory up to this")
    num_workers: int | None = Field(
        None, ge=0, description="DataLoader workers; None: 4 on a GPU, 0 on the CPU")


class LoopConfig(Section):
    """The training loop's own settings (`harmonize.training.run.TrainingRun`)."""

    out: Path | None = Field(None, description="run folder (required to train)")
    steps: int = Field(100_000, ge=1, description="optimizer steps")
    batch_size: int = Field(1, ge=1, description="per device")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    seed: int = 0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU or CPU that runs it natively, else fp32")
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(1000, ge=1)
    checkpoint_every: int = Field(5000, ge=1)
    resume: bool = False
    progress: bool = True
    log_with: Literal["none", "tensorboard"] = Field(
        "none", description="also send the logged losses and the sample grids to this "
        "tracker through accelerate (OUT/tensorboard; pip install 'harmonize[tensorboard]')")
    # hardware switches, off (PyTorch's defaults) unless measured to help on your machine
    tf32: bool | None = Field(None, description="CUDA TF32 matmuls and convolutions: true "
                              "on, false off, null PyTorch's defaults")
    channels_last: bool = Field(False, description="NHWC memory format for the networks")
    compile: bool = Field(False, description="torch.compile the networks (first steps slow)")


class TranslatorInferenceConfig(Section):
    """How a trained translator runs (`harmonize apply`); each kind adds its own."""

    batch_size: int = Field(8, ge=1, description="images or tiles per forward pass")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the device runs it natively, else fp32")
    passthrough_reference: bool = Field(
        True, description="reference-site images are returned unchanged")


class TranslatorTrainingConfig(Section):
    """A whole translator training config: data and train sections at least."""

    data: TranslatorDataConfig = TranslatorDataConfig()
    train: LoopConfig = LoopConfig()

    def check_ready(self) -> None:
        """What training needs beyond a valid file: where the data is and where to write."""
        missing = [k for k, v in (("data.manifest", self.data.manifest),
                                  ("data.reference_site", self.data.reference_site),
                                  ("train.out", self.train.out)) if v is None]
        if missing:
            raise ConfigError(f"config misses {', '.join(missing)} (set them in the YAML or "
                              "with --data / --reference-site / --out)")
