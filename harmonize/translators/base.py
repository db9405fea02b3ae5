"""The interface every harmonizer follows, from histogram matching to diffusion.

Like a scikit-learn estimator: hyperparameters in ``__init__``, learned state set by
``fit`` with a trailing underscore, ``fit`` returns self, ``transform`` never learns.
Images cross this interface in model space (see `harmonize.data.intensity`): float32
(H, W) arrays, 0..1 for the stored range. ``save``/``load`` use the checkpoint format.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from harmonize.checkpoint import load_checkpoint, save_checkpoint
from harmonize.data.intensity import IntensityPolicy


class NotFittedError(RuntimeError):
    pass


class Translator:
    """Maps images of any site to the style of one reference site."""

    kind: ClassVar[str] = ""
    needs_fit: ClassVar[bool] = True

    @property
    def fit_uses_all_sites(self) -> bool:
        """False when fit only looks at the reference site (saves reading the others)."""
        return True

    def __init__(self, policy: IntensityPolicy | None = None) -> None:
        self.policy = policy or IntensityPolicy()
        self.reference_site_: str | None = None

    # --- learning -------------------------------------------------------------------
    def fit(self, images: Iterable[tuple[np.ndarray, str]], reference_site: str) -> Translator:
        """Learn from (model-space image, site) pairs; returns self."""
        raise NotImplementedError

    def transform(
        self, images: Sequence[np.ndarray], sites: Sequence[str | None] | None = None
    ) -> list[np.ndarray]:
        """Translate a batch of model-space images (sites may be unknown: None)."""
        raise NotImplementedError

    # --- persistence ----------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """Hyperparameters: enough to rebuild an unfitted instance."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], config: dict) -> None:
        pass

    def check_fitted(self) -> None:
        if self.needs_fit and self.reference_site_ is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit() or load()")

    def save(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        self.check_fitted()
        config = {**self.get_config(), "intensity_policy": self.policy.to_dict()}
        meta = {"reference_site": self.reference_site_, **(metadata or {})}
        return save_checkpoint(directory, self.kind, self.state_tensors(), config, meta)

    @classmethod
    def load(cls, directory: str | Path) -> Translator:
        ckpt = load_checkpoint(directory)
        if ckpt.kind != cls.kind:
            raise ValueError(f"{directory}: a '{ckpt.kind}' checkpoint, not '{cls.kind}'")
        config = dict(ckpt.config)
        policy = IntensityPolicy.from_dict(config.pop("intensity_policy", None))
        model = cls(policy=policy, **config)
        model.reference_site_ = ckpt.metadata.get("reference_site")
        model.load_state_tensors(ckpt.tensors, config)
        model.metadata_ = ckpt.metadata
        return model
