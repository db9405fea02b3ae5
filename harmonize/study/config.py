"""What `harmonize study` runs: one design, four answers (docs/study.md).

The unit of the federation is the node (a group of hospitals, the manifest's `node`
column); one node is held out entirely as the unseen hospitals every classifier is
tested on. The harmonizer is histogram matching to the reference hospital, trained
centrally or with the federated histogram task; classifiers are trained centrally on the
pooled training nodes or with Flower over them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from harmonize.classify.config import ModelConfig
from harmonize.configs import Section, load_yaml_config
from harmonize.evaluation.config import TranslatorSpec

# the study's own image sets (arms.IMAGES_TEXT); configured translators take other names
BUILT_IN_IMAGES = ("raw", "central", "federated", "public", "unseen")


class CohortSynth(Section):
    """A synthetic cohort shaped like the real one (`harmonize synth`)."""
    sites: int = Field(72, ge=3, description="hospitals")
    patients_per_site: float = Field(17, gt=0, description="mean patients per hospital")
    size_spread: float = Field(0.6, ge=0, description="log-sd of hospital sizes (0: equal)")
    images_per_patient: tuple[int, int] = (2, 5)
    nodes: int = Field(6, ge=2, description="federation nodes (hospitals grouped in order)")
    prevalence: float = Field(0.2, gt=0, lt=1, description="share of positive patients")
    size: int = Field(128, ge=32, description="image side in pixels")
    finding_scale: float = Field(2.5, gt=0)
    public_images: int = Field(0, ge=0, description="also generate a public reference data "
                               "set of this many images (other patients, acquired like the "
                               "reference hospital): the public-reference design of part 4")
    seed: int = 0


class StudyData(Section):
    manifest: Path | None = Field(None, description="manifest CSV with a node column")
    synth: CohortSynth | None = Field(None, description="or: generate a synthetic cohort")
    reference_site: str | None = Field(None, description="the hospital whose style is the "
                                       "target (default: synth's reference, site_a)")
    external_node: str | None = Field(None, description="the node held out as unseen "
                                      "hospitals (default: the last node)")
    image_size: int = Field(64, ge=16, description="classifier input size")
    split_nodes: dict[str, int] = Field(
        default_factory=dict, description="split a hospital into this many "
        "patient-disjoint nodes (stratified by label), e.g. {shenzhen: 2}: a two-hospital "
        "cohort then has two training nodes and an external one")
    public_reference: Path | None = Field(
        None, description="manifest of a public data set whose style is the target of the "
        "public-reference design (no privacy budget on the harmonizer: its landmarks come "
        "from public images, each node maps its own); with synth: synth.public_images")

    @model_validator(mode="after")
    def _one_source(self) -> StudyData:
        if (self.manifest is None) == (self.synth is None):
            raise ValueError("data: give exactly one of manifest or synth")
        if self.public_reference is not None and self.synth is not None:
            raise ValueError("data.public_reference: with synth, set synth.public_images")
        return self


class CentralTraining(Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    other_classifiers: list[str] = Field(default_factory=list, description="part 2 also "
                                         "with these architectures (e.g. [vit]), beside "
                                         "the study's classifier")
    leave_one_node_out: bool = Field(False, description="part 2 also leaves each "
                                     "training node out in turn (the study's classifier; "
                                     "one training per node and arm)")
    translators: list[TranslatorSpec] = Field(
        default_factory=list, description="part 2 (and part 1) also with these "
        "harmonizers beside histogram matching, e.g. {name: hr, kind: histogram-residual, "
        "params: {...}} or {name: cyclegan, config: configs/cyclegan/quick.yaml}: fitted or "
        "trained on the training nodes' images, every hospital's images translated")
    pretrained: dict[str, Path] = Field(
        default_factory=dict, description="ImageNet weights in torchvision's format for "
        "other_classifiers, by architecture (e.g. {densenet121: densenet121.pth})")

    @field_validator("other_classifiers")
    @classmethod
    def _known(cls, archs: list[str]) -> list[str]:
        from harmonize.classify.networks import ARCHITECTURES

        unknown = [a for a in archs if a not in ARCHITECTURES]
        if unknown:
            raise ValueError(f"central.other_classifiers: {unknown} unknown; choose from "
                             f"{', '.join(ARCHITECTURES)}")
        return archs

    @field_validator("translators")
    @classmethod
    def _own_names(cls, specs: list[TranslatorSpec]) -> list[TranslatorSpec]:
        names = [t.name for t in specs]
        taken = [n for n in names if n in BUILT_IN_IMAGES or names.count(n) > 1]
        if taken:
            raise ValueError(f"central.translators: names {sorted(set(taken))} are taken "
                             f"(built in: {', '.join(BUILT_IN_IMAGES)}; one name each)")
        return specs

    @model_validator(mode="after")
    def _pretrained_for_listed(self) -> CentralTraining:
        from harmonize.classify.networks import PRETRAINABLE

        for arch, path in self.pretrained.items():
            if arch not in self.other_classifiers:
                raise ValueError(f"central.pretrained: {arch} is not in other_classifiers "
                                 f"({self.other_classifiers}); list it there too")
            if arch not in PRETRAINABLE:
                raise ValueError(f"central.pretrained: {arch} trains from scratch; ImageNet "
                                 f"weights start {', '.join(PRETRAINABLE)}")
            if not path.is_file():
                raise ValueError(f"central.pretrained: {path} not found (a local "
                                 f"torchvision {arch} weights file)")
        return self


class FederatedTraining(Section):
    rounds: int = Field(10, ge=1)
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    proximal_mu: float = Field(0.01, ge=0)
    parallel_nodes: int = Field(2, ge=1)


class PrivacyAxis(Section):
    """Part 4: patient-level DP at these targets (inf: none) for the classifier and for
    the harmonizer's landmarks, and SecAgg+ on and off."""
    epsilons: list[float] = Field(default_factory=lambda: [math.inf, 10.0, 3.0])
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    secagg: bool = Field(True, description="also run the federated pipeline with SecAgg+")
    separate: bool = Field(True, description="also DP on the landmarks alone and on the "
                           "classifier alone at each target (which part costs)")

    @field_validator("epsilons")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        if not values or any(v <= 0 for v in values):
            raise ValueError("privacy.epsilons: positive numbers (inf: no DP)")
        return values


class StudyConfig(Section):
    out: Path | None = None
    data: StudyData
    classifier: ModelConfig = Field(default_factory=ModelConfig)
    central: CentralTraining = Field(default_factory=CentralTraining)
    federated: FederatedTraining = Field(default_factory=FederatedTraining)
    privacy: PrivacyAxis = Field(default_factory=PrivacyAxis)
    parts: list[Literal["shift", "central", "federated", "privacy"]] = Field(
        default_factory=lambda: ["shift", "central", "federated", "privacy"])
    seed: int = Field(0, description="the cohort split, the harmonizers, and the "
                      "classifiers unless seeds is given")
    seeds: list[int] | None = Field(None, min_length=1, description="train every "
                                    "classifier arm once per seed: AUC, AP, sensitivity "
                                    "and differences are then seed means, their CIs "
                                    "over the test images of the seed mean")
    bootstrap: int = Field(1000, ge=100, description="bootstrap resamples for CIs")
    progress: bool = True


def classifier_seeds(config: StudyConfig) -> list[int]:
    return list(dict.fromkeys(config.seeds)) if config.seeds else [config.seed]


def load_study_config(path: str | Path | None, overrides: dict | None = None) -> StudyConfig:
    return load_yaml_config(StudyConfig, path, overrides)
