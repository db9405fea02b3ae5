"""CycleGAN training configuration: YAML validated by pydantic, with dotted overrides.

Everything a run needs sits in one file (``configs/cyclegan/*.yaml``); command-line
values override it (``--data``, ``--reference-site``, ``--out``, ``--set train.steps=500``).
Problems are reported all at once, each naming its key, before any data is read or any
network is built: a typo found after an hour of training is an hour lost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from harmonize.configs import ConfigError, dump_config, load_yaml_config, parse_override
from harmonize.translators.cyclegan.networks import min_discriminator_size

__all__ = ["ConfigError", "CycleGANConfig", "dump_config", "load_config", "parse_override"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    manifest: Path | None = Field(None, description="manifest CSV (required to train)")
    reference_site: str | None = Field(None, description="the site every image is mapped to")
    sites: list[str] | None = Field(None, description="train on these sites; None: all")
    split: str | None = Field(None, description="use only rows with this split, e.g. train")
    image_size: int = Field(256, description="training crop side = inference tile side")
    load_size: int | None = Field(
        None, description="resize whole images to this square first; None: native size")
    intensity: Literal["auto", "bit-depth", "percentile"] = "auto"
    bits: int | None = None
    polarity: Literal["auto", "keep"] = Field(
        "auto", description="flip images inverted relative to the reference site")
    num_workers: int = Field(0, ge=0)


class ModelConfig(_Section):
    ngf: int = Field(64, ge=1, description="generator width (reference: 64)")
    n_blocks: int = Field(9, ge=0, description="residual blocks (reference: 9 at 256 px)")
    ndf: int = Field(64, ge=1, description="discriminator width")
    n_layers_d: int = Field(3, ge=1, le=5, description="3: 70x70 PatchGAN")
    upsample: Literal["nearest", "bilinear"] = "nearest"
    residual: bool = Field(False, description="generator adds its output to its input")
    reverse: Literal["site-conditioned", "pooled"] = Field(
        "site-conditioned", description="reverse generator / source discriminator")


class LossConfig(_Section):
    lambda_cycle: float = Field(10.0, ge=0)
    lambda_identity: float = Field(0.5, ge=0, description="times lambda_cycle, as the reference")
    lambda_structure: float = Field(0.0, ge=0, description="local-NCC structure consistency")
    pool_size: int = Field(50, ge=0)


class TrainConfig(_Section):
    out: Path | None = Field(None, description="run folder (required to train)")
    steps: int = Field(200_000, ge=1, description="optimizer steps")
    decay_steps: int | None = Field(None, ge=0, description="linear lr decay; None: steps/2")
    batch_size: int = Field(1, ge=1, description="per device")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    seed: int = 0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU or CPU that runs it natively, else fp32")
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(1000, ge=1)
    checkpoint_every: int = Field(5000, ge=1)
    resume: bool = False
    progress: bool = True

    @property
    def decay(self) -> int:
        return self.steps // 2 if self.decay_steps is None else self.decay_steps


class InferenceConfig(_Section):
    tile_overlap: float = Field(0.25, ge=0, le=0.5, description="fraction of the tile side")
    batch_size: int = Field(8, ge=1, description="tiles per forward pass")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the device runs it natively, else fp32")
    passthrough_reference: bool = True


class CycleGANConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    inference: InferenceConfig = InferenceConfig()

    @model_validator(mode="after")
    def _sizes(self) -> CycleGANConfig:
        size, d_min = self.data.image_size, min_discriminator_size(self.model.n_layers_d)
        if size % 4:
            raise ValueError(f"data.image_size={size}: the generator downsamples twice, so it "
                             f"must be a multiple of 4 (e.g. {size + 4 - size % 4})")
        if size < d_min:
            raise ValueError(f"data.image_size={size}: a {self.model.n_layers_d}-layer PatchGAN "
                             f"needs at least {d_min} px (or lower model.n_layers_d)")
        if self.data.load_size is not None and self.data.load_size < size:
            raise ValueError(f"data.load_size={self.data.load_size} is smaller than "
                             f"data.image_size={size}: crops cannot be larger than the image")
        if self.train.decay > self.train.steps:
            raise ValueError(f"train.decay_steps={self.train.decay} exceeds "
                             f"train.steps={self.train.steps}")
        return self

    def check_ready(self) -> None:
        """What training needs beyond a valid file: where the data is and where to write."""
        missing = [k for k, v in (("data.manifest", self.data.manifest),
                                  ("data.reference_site", self.data.reference_site),
                                  ("train.out", self.train.out)) if v is None]
        if missing:
            raise ConfigError(f"config misses {', '.join(missing)} (set them in the YAML or "
                              "with --data / --reference-site / --out)")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None
                ) -> CycleGANConfig:
    """Read a YAML config (None: all defaults) and apply dotted-key overrides, e.g.
    ``{"train.steps": 500, "data.reference_site": "site_a"}``."""
    return load_yaml_config(CycleGANConfig, path, overrides)
