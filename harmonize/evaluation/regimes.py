"""The training regimes of `harmonize evaluate`, as values: what a classifier trains on
(raw or a translator's harmonized images) and with which augmentation. Everything the
evaluation and its report need to know about a regime is a field or property here, so a
regime's meaning is stated once (it was five tables of strings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BeforeValidator, PlainSerializer

Augmentation = Literal["none", "plain", "acquisition"]


@dataclass(frozen=True)
class Regime:
    name: str  # as in the config and the results' `regime` column
    harmonized: bool  # trains on a translator's output (reference: fixed)
    augment: Augmentation  # TrainConfig.augment
    order: int  # position in tables and plots
    description: str

    @property
    def is_baseline(self) -> bool:
        """An augmentation of raw images: what harmonization is measured against."""
        return not self.harmonized and self.augment != "none"

    @property
    def test_time_model(self) -> str:
        """Under reference: train a harmonized regime scores the raw-image model with the
        same augmentation on translated test images: that model's regime name."""
        return {"none": "raw", "plain": "augment", "acquisition": "acquisition"}[self.augment]

    def __str__(self) -> str:
        return self.name


REGIMES: dict[str, Regime] = {r.name: r for r in (
    Regime("raw", False, "none", 0, "raw images"),
    Regime("augment", False, "plain", 1, "plain augmentation"),
    Regime("acquisition", False, "acquisition", 2, "acquisition-style augmentation"),
    Regime("harmonized", True, "none", 3, "harmonized images"),
    Regime("harmonized+augment", True, "plain", 4, "harmonized images, plain augmentation"),
    Regime("harmonized+acquisition", True, "acquisition", 5,
           "harmonized images, acquisition-style augmentation"),
)}


def regime(value: str | Regime) -> Regime:
    """The Regime called `value` (a config entry or a results row)."""
    if isinstance(value, Regime):
        return value
    if value not in REGIMES:
        raise ValueError(f"unknown regime '{value}'; choose from {list(REGIMES)}")
    return REGIMES[value]


# a config field: written as its name in YAML and in the resolved config.yaml
RegimeField = Annotated[Regime, BeforeValidator(regime), PlainSerializer(lambda r: r.name)]
