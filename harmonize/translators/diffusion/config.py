"""Diffusion training configuration: YAML validated by pydantic, with dotted overrides.

Same layout and override style as the CycleGAN config (``configs/diffusion/*.yaml``;
``--data``, ``--reference-site``, ``--mode``, ``--out``, ``--set train.steps=500``). Every
problem is reported at once, naming its key, before any image is read or network built.
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

__all__ = ["ConfigError", "DiffusionConfig", "dump_config", "load_config", "parse_override"]


class DataConfig(TranslatorDataConfig):
    image_size: int = Field(256, description="the prior's input side (whole images resized "
                            "to it, or crops of it)")
    scale: Literal["whole", "crops"] = Field(
        "whole", description="whole: train on whole images resized to image_size; crops: "
        "on random image_size crops at native resolution (then inference uses tiles)")


class ModelConfig(Section):
    conditioning: Literal["per-site", "site-conditioned"] = Field(
        "per-site", description="per-site: one UNet per site, each trained on its own data "
        "only (sdedit: the reference site only); site-conditioned: one UNet, class = site")
    block_out_channels: list[int] = Field([64, 128, 256, 256], min_length=2)
    layers_per_block: int = Field(2, ge=1)
    attention: list[bool] = Field([False, False, True, True],
                                  description="self-attention per resolution level (the "
                                  "middle block follows the last level)")
    norm_num_groups: int = Field(32, ge=1)
    attention_head_dim: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    class_dropout: float = Field(0.1, ge=0, lt=1, description="site-conditioned: share of "
                                 "images trained with the 'unknown site' label")


class DiffusionSchedule(Section):
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "v_prediction", description="v: errors are not amplified by 1/sqrt(alpha_bar) at "
        "high noise, so few-step DDIM from pure noise (DDIB) stays stable")


class TrainConfig(LoopConfig):
    steps: int = Field(100_000, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="per device and per model")
    lr: float = Field(1e-4, gt=0)
    lr_warmup_steps: int = Field(500, ge=0, description="linear lr warm-up")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="upper bound of the EMA decay")
    ema_power: float = Field(0.75, gt=0, description="EMA warm-up: decay = 1-(1+step)^-power")


class InferenceConfig(TranslatorInferenceConfig):
    mode: Literal["sdedit", "ddib"] = "sdedit"
    steps: int = Field(50, ge=1, description="DDIM steps over the whole noise range; SDEdit "
                       "runs int(t0 * steps) of them, DDIB twice int(ddib_t0 * steps)")
    sdedit_t0: float = Field(0.4, gt=0, le=1, description="SDEdit noise strength")
    ddib_t0: float = Field(1.0, gt=0, le=1, description="DDIB inversion depth (1: pure latent)")
    inversion_refine: int = Field(1, ge=0, description="fixed-point corrections per DDIM "
                                  "inversion step (each one model call; 0: plain inversion)")
    large_images: Literal["residual", "resize", "tiles"] = Field(
        "residual", description="residual: translate at image_size, add the input's "
        "high-frequency detail back; resize: translate at image_size and upsample; tiles: "
        "overlapping image_size tiles at native resolution (needs data.scale: crops)")
    batch_size: int = Field(16, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 where the device runs it natively, else fp32")
    seed: int = 0


class DiffusionConfig(TranslatorTrainingConfig):
    """A whole diffusion-prior run: data, UNet, noise schedule, training loop and the
    SDEdit / DDIB inference settings saved with the checkpoint."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionSchedule = DiffusionSchedule()  # the DDPM noise schedule and target
    train: TrainConfig = TrainConfig()
    inference: InferenceConfig = InferenceConfig()

    @model_validator(mode="after")
    def _consistent(self) -> DiffusionConfig:
        m, size = self.model, self.data.image_size
        levels = len(m.block_out_channels)
        factor = 2 ** (levels - 1)
        problems = []
        if size < 8 or size % factor:
            problems.append(f"data.image_size={size}: the UNet halves it {levels - 1} times, "
                            f"so it must be a multiple of {factor} (e.g. {max(factor, 64)})")
        if len(m.attention) != levels:
            problems.append(f"model.attention has {len(m.attention)} entries but "
                            f"model.block_out_channels has {levels}: give one per level")
        bad = [c for c in m.block_out_channels if c % m.norm_num_groups]
        if bad:
            problems.append(f"model.block_out_channels {bad} are not multiples of "
                            f"model.norm_num_groups={m.norm_num_groups}")
        bad = [c for c, a in zip(m.block_out_channels, m.attention, strict=False)
               if a and c % m.attention_head_dim]
        if bad:
            problems.append(f"model.block_out_channels {bad} of attention levels are not "
                            f"multiples of model.attention_head_dim={m.attention_head_dim}")
        tiles, crops = self.inference.large_images == "tiles", self.data.scale == "crops"
        if tiles != crops:
            problems.append(f"inference.large_images={self.inference.large_images} with "
                            f"data.scale={self.data.scale}: a prior trained on crops sees "
                            "native-resolution tiles, one trained on whole images sees whole "
                            "resized images (use tiles with crops, residual/resize with whole)")
        t = self.diffusion.num_train_timesteps
        steps = self.inference.steps
        if steps > t or t % steps:
            problems.append(f"inference.steps={steps}: must divide diffusion."
                            f"num_train_timesteps={t} (e.g. {', '.join(_divisors(t))}) so "
                            "that DDIM steps land on the training grid")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def unet_config(self, num_class_embeds: int | None) -> dict[str, Any]:
        """Keyword arguments of `diffusers.UNet2DModel` (1 channel in and out)."""
        m = self.model
        return {
            "sample_size": self.data.image_size, "in_channels": 1, "out_channels": 1,
            "block_out_channels": list(m.block_out_channels),
            "layers_per_block": m.layers_per_block,
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in m.attention],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D"
                               for a in reversed(m.attention)],
            "norm_num_groups": m.norm_num_groups, "attention_head_dim": m.attention_head_dim,
            "add_attention": bool(m.attention[-1]),
            "dropout": m.dropout, "num_class_embeds": num_class_embeds,
        }

    def scheduler_config(self) -> dict[str, Any]:
        """Shared by DDPMScheduler (training) and DDIMScheduler (sampling)."""
        return {"num_train_timesteps": self.diffusion.num_train_timesteps,
                "beta_schedule": self.diffusion.beta_schedule,
                "prediction_type": self.diffusion.prediction_type, "clip_sample": False}


def _divisors(n: int) -> list[str]:
    return [str(d) for d in (5, 10, 20, 25, 50, 100) if n % d == 0][:5]


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None
                ) -> DiffusionConfig:
    """Read a YAML config (None: all defaults) and apply dotted-key overrides, e.g.
    ``{"train.steps": 500, "inference.mode": "ddib"}``."""
    return load_yaml_config(DiffusionConfig, path, overrides)
