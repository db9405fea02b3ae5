"""The diffusion translator: SDEdit or DDIB with trained UNet priors, behind fit/transform.

transform, per image:
1. reference-site images pass through unchanged (already in the target style);
2. polarity guard, as CycleGAN: an image anti-correlated with the reference site's mean
   thumbnail is flipped first (the priors were trained on upright images);
3. model space -> the training square S x S (antialiased resize, aspect not kept, as in
   training) -> network space [-1, 1];
4. SDEdit (reference prior) or DDIB (the image's site model -> reference model) at S,
   batched; DDIB images of a site without a model (or of unknown site) fall back to
   SDEdit with a warning, unless the model is site-conditioned ("unknown site" class);
5. back to the input's size. ``large_images="residual"`` (default) adds the input's own
   high-frequency detail back: out = up(T(down(x))) + (x - up(down(x))), so the prior
   changes what it can see at S (intensity response, contrast, borders, polarity) and
   the native-resolution detail (fine structure, and also the site's noise) is kept;
   ``"resize"`` returns up(T(down(x))) alone (smooth, no site noise, no fine detail);
   ``"tiles"`` (priors trained on native-resolution crops, ``data.scale: crops``) runs
   steps 3-4 on overlapping S x S tiles at native size, blended by CycleGAN's `tiled_map`.

Deterministic for a seed, whatever the batch: SDEdit noises every image with the same
seeded noise field; DDIB has no randomness.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harmonize.training.device import pick_device, resolve_precision
from harmonize.translators.base import TrainedTranslator, adopt_weights
from harmonize.translators.diffusion import sampling
from harmonize.translators.diffusion.data import ALL_SITES, pad_to_at_least
from harmonize.translators.tiling import tiled_map

log = logging.getLogger(__name__)
MODES = ("sdedit", "ddib")
TILE_OVERLAP = 0.25  # fraction of the tile side shared by neighbouring tiles


class DiffusionTranslator(TrainedTranslator):
    kind = "diffusion"

    def __init__(self, unet_config: dict[str, Any] | None = None,
                 scheduler_config: dict[str, Any] | None = None,
                 model_sites: list[str] | None = None, class_sites: list[str] | None = None,
                 mode: str = "sdedit", steps: int = 50, sdedit_t0: float = 0.4,
                 ddib_t0: float = 1.0, inversion_refine: int = 1,
                 large_images: str = "residual", batch_size: int = 16,
                 precision: str = "auto", seed: int = 0, polarity: str = "auto",
                 passthrough_reference: bool = True, device: str = "auto", policy=None) -> None:
        super().__init__(policy)
        self.unet_config = dict(unet_config or {})
        self.scheduler_config = dict(scheduler_config or {})
        self.model_sites = list(model_sites or [])  # per-site: one UNet each; ["*"]: one
        self.class_sites = list(class_sites or [])  # site-conditioned: class index -> site
        self.device = device
        self.mode = mode
        self.steps = steps
        self.sdedit_t0 = sdedit_t0
        self.ddib_t0 = ddib_t0
        self.inversion_refine = inversion_refine
        self.large_images = large_images
        self.batch_size = batch_size
        self.precision = precision
        self.seed = seed
        self.polarity = polarity
        self.passthrough_reference = passthrough_reference

    def check_params(self) -> None:
        checks = {
            "mode": self.mode in MODES,
            "sdedit_t0": 0 < self.sdedit_t0 <= 1, "ddib_t0": 0 < self.ddib_t0 <= 1,
            "inversion_refine": self.inversion_refine >= 0, "batch_size": self.batch_size >= 1,
            "large_images": self.large_images in ("residual", "resize", "tiles"),
            "precision": self.precision in ("auto", "fp32", "bf16"),
            "polarity": self.polarity in ("auto", "keep"),
        }
        bad = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid diffusion translator settings: {', '.join(bad)} "
                             "(t0 in (0, 1]; mode sdedit|ddib; large_images residual|resize|tiles)")
        if self.scheduler_config:
            sampling.check_steps(self.scheduler, self.steps)

    @property
    def scheduler(self):
        """A new DDIM scheduler of the trained noise schedule (cheap to build; a caller
        keeps one instance for a whole sampling loop, since set_timesteps is state)."""
        return sampling.ddim_scheduler(self.scheduler_config)

    # --- learned state ------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.unet_config["sample_size"])

    @property
    def conditioned(self) -> bool:
        return bool(self.unet_config.get("num_class_embeds"))

    def set_trained(self, unets: dict[str, torch.nn.Module], template: np.ndarray,
                    reference_site: str) -> DiffusionTranslator:
        """Adopt UNets trained by `train_diffusion` (copies on the CPU, eval mode)."""
        from diffusers import UNet2DModel  # slow import: only once a model is needed

        self.model_sites = list(unets)
        self.unets_ = {}
        for key, unet in unets.items():
            self.unets_[key] = adopt_weights(UNet2DModel.from_config(self.unet_config), unet)
        return self._trained_on(template, reference_site)

    # --- inference ------------------------------------------------------------------------
    def transform(self, images: Sequence[np.ndarray], sites: Sequence[str | None] | None = None
                  ) -> list[np.ndarray]:
        self.check_fitted()
        out, todo, arrays, sites = self._split_batch(images, sites, self.passthrough_reference)
        full, small = [], []
        for x in arrays:  # already upright (polarity guard)
            t = torch.from_numpy(x)[None]
            full.append(t)
            small.append(_resize(t, (self.image_size, self.image_size)))
        if not todo:
            return out  # type: ignore[return-value]
        todo_sites = [sites[k] for k in todo]
        if self.large_images == "tiles":
            for k, y in zip(todo, self.translate_tiles(full, todo_sites), strict=True):
                out[k] = y[0].numpy().astype(np.float32)
            return out  # type: ignore[return-value]
        batch = torch.stack([s.clamp(0.0, 1.0) for s in small])
        translated = self.translate_at_size(batch, todo_sites)
        for k, x, low, y in zip(todo, full, small, translated, strict=True):
            size = tuple(x.shape[-2:])
            result = _resize(y, size)
            if self.large_images == "residual" and size != tuple(low.shape[-2:]):
                result = result + (x - _resize(low, size))
            out[k] = result[0].numpy().astype(np.float32)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def translate_at_size(self, x: torch.Tensor, sites: Sequence[str | None]) -> torch.Tensor:
        """(B, 1, S, S) images in [0, 1] of the given sites -> reference style, [0, 1]."""
        device = pick_device(self.device)
        out = torch.empty_like(x)
        for idx, site, ddib in self._plan(sites):
            for start in range(0, len(idx), self.batch_size):
                chunk = torch.tensor(idx[start:start + self.batch_size])
                y = self._run(x[chunk].to(device) * 2.0 - 1.0, site, ddib)
                out[chunk] = ((y.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
        return out

    @torch.inference_mode()
    def translate_tiles(self, images: list[torch.Tensor], sites: Sequence[str | None]
                        ) -> list[torch.Tensor]:
        """(1, H, W) images in [0, 1] at native resolution, in overlapping S x S tiles
        blended linearly (CycleGAN's `tiled_map`); images smaller than S are padded."""
        device = pick_device(self.device)
        s = self.image_size
        out: list[torch.Tensor | None] = [None] * len(images)
        for idx, site, ddib in self._plan(sites):
            padded = [pad_to_at_least(images[i].clamp(0.0, 1.0), s).to(device) * 2.0 - 1.0
                      for i in idx]
            results = tiled_map(padded, lambda b, site=site, ddib=ddib: self._run(b, site, ddib),
                                s, TILE_OVERLAP, self.batch_size)
            for i, y in zip(idx, results, strict=True):
                h, w = images[i].shape[-2:]
                out[i] = ((y[:, :h, :w].float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
        return out  # type: ignore[return-value]

    def _plan(self, sites: Sequence[str | None]) -> list[tuple[list[int], str | None, bool]]:
        """Batches to run: (image indices, source site, DDIB?). SDEdit needs no source, so
        one group; DDIB one group per site. A site without a model of its own (per-site
        priors) falls back to SDEdit; a site-conditioned prior has an 'unknown' class."""
        if self.mode == "sdedit":
            return [(list(range(len(sites))), None, False)]
        groups: dict[str | None, list[int]] = {}
        for i, site in enumerate(sites):
            groups.setdefault(site, []).append(i)
        missing = [s for s in groups if not self.conditioned and s not in self.unets_]
        if missing:
            log.warning("DDIB: no model for site(s) %s (models: %s); those %d image(s) are "
                        "translated with SDEdit instead", ", ".join(map(str, missing)),
                        ", ".join(self.model_sites), sum(len(groups[s]) for s in missing))
        return [(idx, site, site not in missing) for site, idx in groups.items()]

    def eps_fn(self, sites: Sequence[str | None], device: torch.device) -> sampling.EpsFn:
        """The noise predictor of the images' site prior: the site-conditioned model with
        per-image labels (unknown site: the extra class), or the one site's own model."""
        if self.conditioned:  # the extra last class: unknown site
            index = [self.class_sites.index(s) if s in self.class_sites
                     else len(self.class_sites) for s in sites]
            labels = torch.tensor(index, dtype=torch.long, device=device)
            unet = self.unets_[ALL_SITES]
        else:
            (site,) = set(sites)  # one site's own prior
            unet, labels = self.unets_[site], None
        return sampling.unet_eps(unet.to(device), labels,
                                 resolve_precision(self.precision, device),
                                 self.scheduler_config.get("prediction_type", "epsilon"),
                                 self.scheduler.alphas_cumprod)

    def _run(self, x0: torch.Tensor, site: str | None, ddib: bool) -> torch.Tensor:
        """Translate a batch in network space [-1, 1] of one site (or of any, for SDEdit)."""
        n = len(x0)
        reference = self.eps_fn([self.reference_site_] * n, x0.device)
        if ddib:
            source = self.eps_fn([site] * n, x0.device)
            return sampling.ddib(source, reference, x0, self.scheduler, self.steps,
                                 self.ddib_t0, self.inversion_refine)
        noise = self.noise(x0.device)[..., :x0.shape[-2], :x0.shape[-1]]
        return sampling.sdedit(reference, x0, self.scheduler, self.steps, self.sdedit_t0, noise)

    def noise(self, device: torch.device) -> torch.Tensor:
        """The seeded SDEdit noise field (1, 1, S, S), shared by every image."""
        g = torch.Generator().manual_seed(int(self.seed))
        s = self.image_size
        return torch.randn((1, 1, s, s), generator=g).to(device)

    @torch.inference_mode()
    def sample_prior(self, n: int, site: str | None = None) -> torch.Tensor:
        """n images drawn from a site's prior (default: the reference), [0, 1]; for the
        training sample grids: shows what the prior has learned."""
        device = pick_device(self.device)
        s = self.image_size
        g = torch.Generator().manual_seed(int(self.seed) + 1)
        x = torch.randn((n, 1, s, s), generator=g).to(device)
        eps = self.eps_fn([site or self.reference_site_] * n, device)
        scheduler = self.scheduler  # one instance: set_timesteps is state
        timesteps = sampling.timesteps_for(scheduler, self.steps, 1.0)
        y = sampling.ddim_generate(eps, x, scheduler, timesteps)
        return ((y.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)

    # --- persistence ----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"unet.{i}.{k}": v for i, key in enumerate(self.model_sites)
                   for k, v in self.unets_[key].state_dict().items()}
        tensors["polarity_template"] = torch.from_numpy(self.template_)
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], config: dict) -> None:
        from diffusers import UNet2DModel  # slow import: only once a model is needed

        self.unets_ = {}
        for i, key in enumerate(self.model_sites):
            prefix = f"unet.{i}."
            unet = UNet2DModel.from_config(self.unet_config)
            unet.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()
                                  if k.startswith(prefix)})
            self.unets_[key] = unet.eval()
        self.template_ = tensors["polarity_template"].numpy()


INFERENCE_KEYS = ("mode", "steps", "sdedit_t0", "ddib_t0", "inversion_refine", "large_images",
                  "batch_size", "precision", "seed", "polarity", "passthrough_reference")


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) -> (C, *size), bilinear, antialiased when shrinking (as training data)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False,
                         antialias=True)[0]
