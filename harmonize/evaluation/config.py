"""What `harmonize evaluate` runs: data, translators, classifiers, regimes, protocols,
seeds, one training budget for every cell. YAML (``configs/eval/*.yaml``), validated on
load; every problem is named before anything is trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from harmonize.classify.config import ModelConfig, TrainConfig
from harmonize.configs import ConfigError, Section, load_yaml_config
from harmonize.evaluation.regimes import REGIMES, RegimeField, regime


class SynthData(Section):
    """Generate the embedded synthetic benchmark (paired truth: enables the full audit)."""
    sites: int = Field(4, ge=2)
    per_site: int = Field(60, ge=10)
    size: int = Field(128, ge=32)
    seed: int = 0
    modality: Literal["xray", "bonescan"] = "xray"
    prevalence: list[float] | None = Field(
        None, description="positives per site; unequal values make a site-label shortcut")
    finding_scale: float = Field(1.0, gt=0, description="finding radius factor")


class EvalData(Section):
    manifest: Path | None = Field(None, description="manifest CSV (path,site,label,...)")
    synth: SynthData | None = Field(None, description="or: generate synthetic data")
    reference_site: str | None = Field(None, description="default: synth's reference site")
    mask_column: str | None = Field("mask", description="body/lung ROI column (Grad-CAM focus "
                                    "measure); ignored when absent")
    image_size: int = Field(64, ge=16, description="classifier input size")
    internal_test_size: float = Field(0.25, gt=0, lt=1, description="held-out patients of "
                                      "the training sites (the in-site test)")
    split_seed: int = Field(0, description="the patient split, fixed across seeds")

    @model_validator(mode="after")
    def _one_source(self) -> EvalData:
        if (self.manifest is None) == (self.synth is None):
            raise ValueError("give exactly one of data.manifest or data.synth")
        return self


class TranslatorSpec(Section):
    name: str = Field(description="label in the results (e.g. cyclegan, ddib)")
    kind: str | None = Field(None, description="translator kind; default: name")
    params: dict[str, Any] = Field(default_factory=dict, description="constructor arguments "
                                   "of a classical translator, e.g. {per: site}")
    checkpoint: Path | None = Field(None, description="use a trained translator")
    config: Path | None = Field(None, description="train it with this config (cyclegan, "
                                "diffusion)")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides of config")
    federated: bool = Field(False, description="config is a configs/federated YAML (task "
                            "cyclegan or diffusion): trained with Flower over the manifest's "
                            "nodes, no image leaving its node")

    @property
    def resolved_kind(self) -> str:
        return self.kind or self.name


class Protocol(Section):
    kind: Literal["external", "loso"]
    train_sites: list[str] | None = Field(None, description="external: training sites")
    test_site: str | None = Field(None, description="external: the unseen site")
    reference: Literal["fixed", "train", "both"] = Field(
        "fixed", description="fixed: every translator maps all images to data.reference_site "
        "and the classifier trains on harmonized images; train: the classifier trains on the "
        "training site's raw images, and only the test site's images are translated to the "
        "training site (test-time harmonization, how a hospital uses a model trained "
        "elsewhere); both: each")
    reference_site: str | None = Field(
        None, description="reference: train with several training sites: the site test "
        "images are translated to (default: the one with the most images)")

    @model_validator(mode="after")
    def _sites(self) -> Protocol:
        if self.kind == "external" and not (self.train_sites and self.test_site):
            raise ValueError("an external protocol needs train_sites and test_site")
        if self.kind == "external" and self.test_site in self.train_sites:
            raise ValueError(f"test_site {self.test_site} is also a training site")
        if self.reference_site is not None:
            if self.reference == "fixed":
                raise ValueError("reference_site is for reference: train (or both); with "
                                 "fixed, data.reference_site is the reference")
            if self.kind != "external" or self.reference_site not in self.train_sites:
                raise ValueError(f"reference_site {self.reference_site} must be one of the "
                                 "training sites of an external protocol")
        return self

    @property
    def modes(self) -> tuple[str, ...]:
        return ("fixed", "train") if self.reference == "both" else (self.reference,)


class AuditConfig(Section):
    gradcam_images: int = Field(4, ge=0, description="images per translator in the grid")
    contrast_erased_below: float = Field(0.5, gt=0, description="finding contrast ratio "
                                         "(translated / truth) below which a finding counts "
                                         "as erased")
    contrast_invented_above: float = Field(2.0, gt=1, description="... above which it counts "
                                           "as exaggerated")


class EvalConfig(Section):
    out: Path | None = None
    data: EvalData
    translators: list[TranslatorSpec] = Field(default_factory=list)
    classifiers: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig()])
    regimes: list[RegimeField] = Field(default_factory=lambda: [
        regime(r) for r in ("raw", "augment", "harmonized", "harmonized+augment")])
    protocols: list[Protocol] = Field(default_factory=lambda: [Protocol(kind="loso")])
    seeds: list[int] = Field(default_factory=lambda: [0])
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=30, progress=False))
    bootstrap: int = Field(1000, ge=100, description="bootstrap resamples for CIs")
    audit: AuditConfig = Field(default_factory=AuditConfig)
    shift_report: bool = Field(False, description="radiomics site shift before and after "
                               "each translator (data.mask_column as ROI when the manifest "
                               "has it, else the automatic body ROI)")
    progress: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        names = [t.name for t in self.translators]
        if len(set(names)) != len(names):
            raise ValueError(f"translator names must be unique: {names}")
        if len(set(self.regimes)) != len(self.regimes):
            raise ValueError(f"regimes are repeated: {[r.name for r in self.regimes]}")
        harmonized = [r.name for r in self.regimes if r.harmonized]
        if harmonized and not self.translators:
            raise ValueError(f"regimes {harmonized} need at least one translator")
        if not any(r.is_baseline for r in self.regimes):
            raise ValueError("regimes must include 'augment' or 'acquisition': gains are "
                             "measured against the stronger augmentation")
        if any("train" in p.modes for p in self.protocols):
            missing = sorted({r.test_time_model for r in self.regimes if r.harmonized}
                             - {r.name for r in self.regimes})
            if missing:
                raise ValueError(f"reference: train scores the {missing} model(s) on "
                                 f"translated test images: add {missing} to regimes")
        if not self.seeds:
            raise ValueError("seeds: give at least one")
        return self


def load_eval_config(path: str | Path | None,
                     overrides: dict[str, Any] | None = None) -> EvalConfig:
    return load_yaml_config(EvalConfig, path, overrides)


__all__ = ["EvalConfig", "ConfigError", "REGIMES", "load_eval_config"]
