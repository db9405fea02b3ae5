"""The interface every harmonizer follows, from histogram matching to diffusion.

Like a scikit-learn estimator: hyperparameters in ``__init__``, learned state set by
``fit`` with a trailing underscore, ``fit`` returns self, ``transform`` never learns.
Images cross this interface in model space (see `harmonize.data.intensity`): float32
(H, W) arrays, 0..1 for the stored range. ``save``/``load`` use the checkpoint format.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from harmonize.checkpoint import load_checkpoint, save_checkpoint
from harmonize.data import polarity as pol
from harmonize.data.intensity import IntensityPolicy


class NotFittedError(RuntimeError):
    pass


class Translator:
    """Maps images of any site to the style of one reference site.

    scikit-learn's contract: ``__init__`` only stores its arguments (one attribute per
    parameter, same name); `get_params` / `set_params` read the parameters from the
    signature; values are checked where they are used (`check_params`, called by `fit`,
    `transform` and `set_params`); learned state ends in an underscore. Classical kinds
    learn with `fit` (`FittedTranslator`); network kinds are trained by their own
    `train_*` entry point from a manifest and adopt the result (`TrainedTranslator`).
    """

    kind: ClassVar[str] = ""
    # True where `transform` feeds _split_batch images that an earlier stage has already
    # put upright: a second polarity check on them (after a contrast change) could flip
    # an upright image
    inputs_upright: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = True
    # True where `fit` takes (image, site, mask) and `transform` a `masks=` list: the
    # manifest's ROI masks (None for an image without one)
    uses_masks: ClassVar[bool] = False
    # run-time choices, not hyperparameters: left out of a saved checkpoint's config
    runtime_params: ClassVar[tuple[str, ...]] = ("device",)
    # learned: the site every image is mapped to (None until fit, set_trained or load)
    reference_site_: str | None = None

    def __init__(self, policy: IntensityPolicy | None = None) -> None:
        self.policy = policy if policy is not None else IntensityPolicy()

    # --- parameters (scikit-learn style) ----------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        """The keyword parameters of ``__init__``, in order."""
        signature = inspect.signature(cls.__init__)
        return [name for name, p in signature.parameters.items()
                if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self, deep: bool = False) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.param_names()}

    def set_params(self, **params: Any) -> Translator:
        """Change parameters (e.g. inference settings of a loaded translator); an unknown
        name or an invalid value raises and leaves the translator as it was."""
        names = self.param_names()
        unknown = [k for k in params if k not in names]
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown parameter(s) {unknown}; "
                             f"settable: {', '.join(names)}")
        old = {k: getattr(self, k) for k in params}
        for key, value in params.items():
            setattr(self, key, value)
        try:
            self.check_params()
        except ValueError:
            for key, value in old.items():
                setattr(self, key, value)
            raise
        return self

    def check_params(self) -> None:
        """Raise ValueError naming any invalid parameter value (subclasses add checks)."""

    # --- inference --------------------------------------------------------------------
    def transform(
        self, images: Sequence[np.ndarray], sites: Sequence[str | None] | None = None
    ) -> list[np.ndarray]:
        """Translate a batch of model-space images (sites may be unknown: None)."""
        raise NotImplementedError

    def _split_batch(self, images: Sequence[np.ndarray], sites: Sequence[str | None] | None,
                     passthrough: bool = True
                     ) -> tuple[list[np.ndarray | None], list[int], list[np.ndarray], list]:
        """Checked float32 (H, W) images of a batch: returns (out, todo, arrays, sites)
        where `out` already holds the reference-site images passed through unchanged
        (with `passthrough`), `todo` indexes the images still to translate and `arrays`
        holds them, flipped first when inverted relative to the reference site (with
        `polarity="auto"` and a `template_`; see `polarity`)."""
        sites = list(sites) if sites is not None else [None] * len(images)
        out: list[np.ndarray | None] = [None] * len(images)
        todo, arrays = [], []
        for k, (image, site) in enumerate(zip(images, sites, strict=True)):
            x = np.asarray(image, dtype=np.float32)
            if x.ndim != 2:
                raise ValueError(f"expected a 2D (H, W) image, got shape {x.shape}")
            if passthrough and site is not None and site == self.reference_site_:
                out[k] = x.copy()
                continue
            if (getattr(self, "polarity", "keep") == "auto" and hasattr(self, "template_")
                    and not self.inputs_upright):
                x = pol.upright(x, self.template_)
            todo.append(k)
            arrays.append(x)
        return out, todo, arrays, sites

    # --- persistence ----------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """Hyperparameters saved with the checkpoint: enough to rebuild an unfitted
        instance (every parameter but the intensity policy, saved apart, and run-time
        choices such as the device)."""
        return {k: v for k, v in self.get_params().items()
                if k != "policy" and k not in self.runtime_params}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], config: dict) -> None:
        pass

    def check_fitted(self) -> None:
        """Before any use of learned state: valid parameters, and fitted or loaded."""
        self.check_params()
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
        model.check_params()
        model.reference_site_ = ckpt.metadata.get("reference_site")
        model.load_state_tensors(ckpt.tensors, config)
        model.metadata_ = ckpt.metadata
        return model


def adopt_weights(fresh: torch.nn.Module, trained: torch.nn.Module) -> torch.nn.Module:
    """`fresh` (same architecture) holding a float32 CPU copy of `trained`'s weights, in
    eval mode: a translator never shares tensors with a training still running."""
    trained = getattr(trained, "_orig_mod", trained)  # torch.compile'd in training
    fresh.load_state_dict({k: v.detach().float().cpu() for k, v in trained.state_dict().items()})
    return fresh.eval()


class FittedTranslator(Translator):
    """A classical translator: learns from (model-space image, site) pairs in `fit`."""

    @property
    def fit_uses_all_sites(self) -> bool:
        """False when fit only looks at the reference site (saves reading the others)."""
        return True

    def fit(self, images: Iterable[tuple[np.ndarray, str]], reference_site: str
            ) -> FittedTranslator:
        """Learn from (model-space image, site) pairs; returns self."""
        raise NotImplementedError


class TrainedTranslator(Translator):
    """A translator whose networks are trained from a manifest by the kind's own entry
    point (`train_cyclegan(config)`, `train_diffusion(config)`: many steps, a GPU if
    there is one, resumable), which hands them over with `set_trained`; there is no
    `fit` on a list of images."""

    def _trained_on(self, template: np.ndarray, reference_site: str) -> TrainedTranslator:
        """What every set_trained records besides the networks: the reference site and
        its mean thumbnail (the polarity guard's template)."""
        self.template_ = np.asarray(template, dtype=np.float32)
        self.reference_site_ = reference_site
        return self
