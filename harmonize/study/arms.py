"""The study's arms as typed values: which images (raw, or harmonized by a central or a
federated harmonizer, with or without DP), which classifier training (central, or Flower
with FedAvg / FedProx / FedBN), plain augmentation or not, patient-level DP, SecAgg+.

Each arm trains one classifier and scores it on the external node's images (harmonized
the same way as its training images: a hospital translates its own images at home
before it uses the classifier); FedBN models, whose normalization layers stayed at the
training nodes, use the external node's own BatchNorm statistics (AdaBN, unlabelled)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

Images = Literal["raw", "central", "federated", "public", "unseen"]
Training = Literal["central", "fedavg", "fedprox", "fedbn", "fedper"]

IMAGES_TEXT = {"raw": "raw images", "central": "central histogram matching",
               "federated": "federated histogram matching",
               "public": "histogram matching to a public reference",
               "unseen": "histogram matching to the unseen node's style"}
ARCH_TEXT = {"cnn": "CNN", "vit": "ViT", "resnet18": "ResNet-18", "resnet50": "ResNet-50",
             "densenet121": "DenseNet-121"}
TRAINING_TEXT = {"central": "central classifier", "fedavg": "FedAvg", "fedprox": "FedProx",
                 "fedbn": "FedBN", "fedper": "FedPer"}


@dataclass(frozen=True)
class Arm:
    images: Images | str = "raw"  # or the name of a configured translator (part 2)
    training: Training = "central"
    augment: bool = False
    epsilon: float = math.inf  # the classifier's patient-level DP target (inf: none)
    harmonizer_epsilon: float = math.inf  # the landmarks' patient-level DP target
    secagg: bool = False
    norm: Literal["batch", "group"] = "batch"
    arch: str | None = None  # another architecture than the study's classifier (part 2)

    @property
    def federated(self) -> bool:
        return self.training != "central"

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    @property
    def name(self) -> str:
        parts = [self.images if self.images == "raw" else f"hm-{self.images}",
                 self.training]
        if self.arch:
            parts.append(self.arch)
        if self.augment:
            parts.append("augment")
        if self.norm == "group":
            parts.append("gn")
        if math.isfinite(self.harmonizer_epsilon):
            parts.append(f"hm-eps{self.harmonizer_epsilon:g}")
        if self.private:
            parts.append(f"eps{self.epsilon:g}")
        if self.secagg:
            parts.append("secagg")
        return "_".join(parts)

    @property
    def label(self) -> str:
        """The arm in words, for tables and plots."""
        images = IMAGES_TEXT.get(self.images, f"{self.images} translations")
        text = f"{TRAINING_TEXT[self.training]} on {images}"
        if self.arch:
            text = text.replace("classifier", ARCH_TEXT.get(self.arch, self.arch), 1)
        if self.norm == "group":
            text = text.replace(TRAINING_TEXT[self.training],
                                f"{TRAINING_TEXT[self.training]} (GroupNorm CNN)", 1)
        if math.isfinite(self.harmonizer_epsilon):
            text += f" (landmarks at epsilon {self.harmonizer_epsilon:g})"
        if self.augment:
            text += " + augmentation"
        if self.private:
            text += f", DP-SGD epsilon {self.epsilon:g}"
        if self.secagg:
            text += ", SecAgg+"
        return text

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def central_arms(other_archs: list[str] | tuple = (),
                 translators: list[str] | tuple = ()) -> list[Arm]:
    """Part 2: central harmonization against augmentation, all central; for the study's
    classifier and for each of `other_archs` (e.g. a ViT beside the CNN). Both reference
    protocols for the study's classifier: the reference hospital (a training node's), and
    the unseen node's own style (its unlabelled images give the landmarks: test-time
    adaptation to a new hospital). Each configured translator (`translators`, by name)
    with the study's classifier."""
    return [arm for arch in (None, *other_archs)
            for arm in (Arm("raw", arch=arch), Arm("raw", augment=True, arch=arch),
                        Arm("central", arch=arch), Arm("central", augment=True, arch=arch))
            ] + [Arm("unseen"), Arm("unseen", augment=True)] + [Arm(t) for t in translators]


def augmentation_baseline(arm: Arm) -> Arm:
    """What part 2 holds an arm to: the same classifier on raw images with augmentation."""
    return Arm("raw", "central", augment=True, arch=arm.arch)


def federated_arms() -> list[Arm]:
    """Part 3: the 2 x 2 of central/federated harmonization x central/federated
    classifier, augmentation under each classifier, personalization (FedBN, FedPer;
    FedProx beside FedAvg) and the hybrids of harmonization and personalization."""
    return [Arm("central", "central"), Arm("federated", "central"),
            Arm("central", "fedavg"), Arm("federated", "fedavg"),
            Arm("raw", "central", augment=True), Arm("raw", "fedavg", augment=True),
            Arm("raw", "fedavg"), Arm("raw", "fedprox"), Arm("raw", "fedbn"),
            Arm("raw", "fedper"), Arm("federated", "fedbn"), Arm("federated", "fedper")]


def privacy_arms(epsilons: list[float], secagg: bool, separate: bool = True,
                 public: bool = False) -> list[Arm]:
    """Part 4: the federated pipeline (federated landmarks, FedAvg) with patient-level DP
    at each target (the same GroupNorm CNN without class weights at every level, as
    DP-SGD needs): on the landmarks and the classifier together, and on each alone (which
    part costs); with SecAgg+; and, `public`, the public-reference design (landmarks of a
    public data set: DP on the classifier only)."""
    arms = []
    for e in epsilons:
        arms.append(Arm("federated", "fedavg", epsilon=e, harmonizer_epsilon=e, norm="group"))
        if math.isfinite(e) and separate:
            arms += [Arm("federated", "fedavg", epsilon=e, norm="group"),
                     Arm("federated", "fedavg", harmonizer_epsilon=e, norm="group")]
        if public:
            arms.append(public_reference_arm(e))
    if secagg:
        arms.append(Arm("federated", "fedavg", secagg=True))
    return arms


def public_reference_arm(epsilon: float) -> Arm:
    """The public-reference design at a DP target: only the classifier spends budget."""
    return Arm("public", "fedavg", epsilon=epsilon, norm="group")


def private_reference_arm(epsilon: float) -> Arm:
    """What the public-reference design is held to: the same target, the reference
    hospital's landmarks released under it."""
    return Arm("federated", "fedavg", epsilon=epsilon, harmonizer_epsilon=epsilon, norm="group")
