"""Classifier training configuration (``configs/classifier/*.yaml``), validated on load.

The same sections serve `harmonize train classifier`, the accelerate recipe and the
evaluation matrix (which fills in data per regime and seed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from harmonize.classify.networks import ARCHITECTURES, PRETRAINABLE
from harmonize.configs import ConfigError, Section, load_yaml_config

__all__ = ["ClassifierConfig", "ConfigError", "load_config"]


class DataConfig(Section):
    manifest: Path | None = Field(None, description="manifest CSV (required to train)")
    sites: list[str] | None = Field(None, description="train on these sites; None: all")
    split: str | None = Field(None, description="use only rows with this split, e.g. train")
    positive: str | None = Field(None, description="label of the positive class; None: guess")
    image_size: int = Field(64, ge=16, description="images are resized to this square")
    intensity: Literal["auto", "bit-depth", "percentile"] = "auto"


class ModelConfig(Section):
    arch: str = Field("cnn", description=f"one of {', '.join(ARCHITECTURES)}")
    width: int = Field(16, ge=4, description="cnn channels of the first block / vit width")
    norm: Literal["batch", "group"] = Field(
        "batch", description="cnn normalization: group (GroupNorm) suits federated training")
    weights: Path | None = Field(None, description="a harmonize classifier's safetensors "
                                 "to start from")
    pretrained: Path | None = Field(
        None, description="local ImageNet weights in torchvision's format (.pth or "
        ".safetensors) to start resnet18 / resnet50 / densenet121 from; the head starts "
        "fresh")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch not in ARCHITECTURES:
            raise ValueError(f"'{arch}' is not a classifier; choose one of {ARCHITECTURES}")
        return arch

    @model_validator(mode="after")
    def _pretrainable(self) -> ModelConfig:
        if self.pretrained is not None and self.arch not in PRETRAINABLE:
            raise ValueError(f"pretrained: ImageNet weights start {', '.join(PRETRAINABLE)} "
                             f"only; arch '{self.arch}' trains from scratch")
        return self


class TrainConfig(Section):
    out: Path | None = Field(None, description="run folder (required to train)")
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    augment: Literal["none", "plain", "acquisition"] = Field(
        "none", description="harmonize.data.transforms: plain (geometry + intensity) or "
        "acquisition (geometry + simulated X-ray system differences); true means plain")
    balance: Literal["weighted-loss", "sampler", "none"] = Field(
        "weighted-loss", description="class imbalance: positive weight n_neg/n_pos in the "
        "loss, or a class-balanced sampler")
    seed: int = 0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, else fp32")
    progress: bool = True

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_flag(cls, value: Any) -> Any:
        # true / false, as older configs and the --augment flag say it
        return {True: "plain", False: "none"}.get(value, value) if isinstance(value, bool) \
            else value


class ClassifierConfig(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    def check_ready(self) -> None:
        missing = [k for k, v in (("data.manifest", self.data.manifest),
                                  ("train.out", self.train.out)) if v is None]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (set them in the config or with "
                              "--data / --out)")
        if not self.data.manifest.is_file():
            raise ConfigError(f"data.manifest: {self.data.manifest} not found")
        if self.model.weights is not None and not self.model.weights.is_file():
            raise ConfigError(f"model.weights: {self.model.weights} not found")


def load_config(path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> ClassifierConfig:
    return load_yaml_config(ClassifierConfig, path, overrides)
