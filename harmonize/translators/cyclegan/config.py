"""CycleGAN training configuration: YAML validated by pydantic, with dotted overrides.

Everything a run needs sits in one file (``configs/cyclegan/*.yaml``); command-line
values override it (``--data``, ``--reference-site``, ``--out``, ``--set train.steps=500``).
Problems are reported all at once, each naming its key, before any data is read or any
network is built: a typo found after an hour of training is an hour lost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from harmonize.configs import ConfigError, Section, dump_config, load_yaml_config, parse_override
from harmonize.training.config import (
    LoopConfig,
    TranslatorDataConfig,
    TranslatorInferenceConfig,
    TranslatorTrainingConfig,
)
from harmonize.translators.cyclegan.networks import min_discriminator_size

__all__ = ["ConfigError", "CycleGANConfig", "dump_config", "load_config", "parse_override"]


class DataConfig(TranslatorDataConfig):
    image_size: int = Field(256, description="training crop side = inference tile side")
    load_size: int | None = Field(
        None, description="resize whole images to this square first; None: native size")
    fingerprints: Literal["keep", "remove"] = Field(
        "keep", description="remove: inpaint collimation borders and burned-in markers of "
        "every image before anything else, in training and at inference "
        "(harmonize.data.fingerprints; histogram-residual only)")


class ModelConfig(Section):
    ngf: int = Field(64, ge=1, description="generator width (reference: 64)")
    n_blocks: int = Field(9, ge=0, description="residual blocks (reference: 9 at 256 px)")
    ndf: int = Field(64, ge=1, description="discriminator width")
    n_layers_d: int = Field(3, ge=1, le=5, description="3: 70x70 PatchGAN")
    upsample: Literal["nearest", "bilinear"] = "nearest"
    residual: bool | Literal["additive"] = Field(
        False, description="generator adds its output to its input (true: under tanh; "
        "'additive': plain sum, head started at zero, so the untrained generator is the identity)")
    reverse: Literal["site-conditioned", "pooled"] = Field(
        "site-conditioned", description="reverse generator / source discriminator")


class LandmarksConfig(Section):
    """The monotone intensity mapping applied before the generator (histogram-residual):
    `HistogramMatching`'s quantile landmarks, fitted on the training rows."""

    per: Literal["image", "site"] = Field(
        "image", description="each image's own quantiles, or its site's average (sites not "
        "seen in training fall back to per image)")
    n_quantiles: int = Field(256, ge=3, description="quantile landmarks")
    checkpoint: Path | None = Field(
        None, description="use this fitted histogram-matching checkpoint instead of fitting "
        "(e.g. the federated histogram task's model: its landmarks, DP option included); "
        "its per and n_quantiles replace the two above")


class LossConfig(Section):
    objective: Literal["cycle", "patchnce"] = Field(
        "cycle", description="cycle: CycleGAN (reverse generator, cycle and identity terms); "
        "patchnce: CUT (one generator, PatchNCE keeps structure, Park et al. 2020)")
    lambda_nce: float = Field(1.0, ge=0, description="PatchNCE weight (CUT: 1, FastCUT: 10)")
    nce_patches: int = Field(256, ge=2, description="patches sampled per layer and image")
    nce_temperature: float = Field(0.07, gt=0)
    lambda_cycle: float = Field(10.0, ge=0)
    lambda_identity: float = Field(0.5, ge=0, description="times lambda_cycle, as the reference")
    lambda_structure: float = Field(0.0, ge=0, description="local-NCC structure consistency")
    pool_size: int = Field(50, ge=0)


class TrainConfig(LoopConfig):
    steps: int = Field(200_000, ge=1, description="optimizer steps")
    decay_steps: int | None = Field(None, ge=0, description="linear lr decay; None: steps/2")
    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    snapshot_every: int | None = Field(
        None, ge=1, description="also keep the translator every N steps in OUT/snapshots/"
        "step_N (choose among them without labels: harmonize.evaluation.artefacts)")
    select_fraction: float = Field(
        0.0, ge=0, lt=0.5, description="hold this fraction of the patients out of training "
        "and make the snapshot that scores best on them without labels OUT/model "
        "(needs snapshot_every; 0: the last step is the model)")

    @property
    def decay(self) -> int:
        return self.steps // 2 if self.decay_steps is None else self.decay_steps


class InferenceConfig(TranslatorInferenceConfig):
    tile_overlap: float = Field(0.25, ge=0, le=0.5, description="fraction of the tile side")


class CycleGANConfig(TranslatorTrainingConfig):
    """A whole CycleGAN run: data, networks, loss weights, training loop, inference."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = Field(default_factory=LossConfig,
                             description="weights of the terms in losses.py")
    train: TrainConfig = TrainConfig()
    inference: InferenceConfig = InferenceConfig()
    landmarks: LandmarksConfig | None = Field(
        None, description="set: the histogram-residual translator (histogram matching, then "
        "a residual generator trained on its output); null: a plain CycleGAN")

    @property
    def kind(self) -> str:
        """The translator kind this config trains."""
        if self.landmarks is not None:
            return "histogram-residual"
        return "cut" if self.loss.objective == "patchnce" else "cyclegan"

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
        if self.landmarks is not None and self.model.residual != "additive":
            raise ValueError(f"model.residual={self.model.residual!r} with landmarks: the "
                             "histogram-residual translator needs model.residual: additive "
                             "(it starts exactly at histogram matching)")
        if self.data.fingerprints == "remove" and self.landmarks is None:
            raise ValueError("data.fingerprints: remove needs the histogram-residual "
                             "translator (a landmarks section); for a plain CycleGAN, apply "
                             "--model fingerprints to the images first")
        if self.train.select_fraction > 0 and self.train.snapshot_every is None:
            raise ValueError("train.select_fraction needs train.snapshot_every (the snapshots "
                             "it chooses among)")
        if self.train.decay > self.train.steps:
            raise ValueError(f"train.decay_steps={self.train.decay} exceeds "
                             f"train.steps={self.train.steps}")
        return self


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None
                ) -> CycleGANConfig:
    """Read a YAML config (None: all defaults) and apply dotted-key overrides, e.g.
    ``{"train.steps": 500, "data.reference_site": "site_a"}``."""
    return load_yaml_config(CycleGANConfig, path, overrides)
