"""SDEdit and DDIB as short loops: a model predicts the noise, the scheduler does the step.

Notation: x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps with a_t = alphas_cumprod[t]. A
deterministic DDIM step (eta = 0) from t to t' keeps the current estimates of x0 and eps
and re-mixes them at the new noise level:

    x0_pred = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    x_t'    = sqrt(a_t') * x0_pred + sqrt(1 - a_t') * eps

Generation (t' < t) is `DDIMScheduler.step`. Inversion (t' > t) is written here: the
stock `DDIMInverseScheduler` has open reports of wrong timestep arithmetic, and an
inversion is only useful if it is the exact mirror of the generation it feeds. So the
inversion walks the very (t, t') pairs `DDIMScheduler.step` uses, in reverse, with eps
predicted at the current (less noisy) point; the tests check reconstruction error.

Timesteps are "trailing" (the first step starts at t = T - 1, pure noise) and the number
of steps must divide T, so every step's previous timestep (t - T // steps, the scheduler's
arithmetic) is the next timestep of the grid; below 0 means clean (a = 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # diffusers takes seconds to import: only when a model is used
    from diffusers import DDIMScheduler

# (x_t of shape (B, 1, H, W), integer timestep) -> predicted noise, same shape
EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


def ddim_scheduler(scheduler_config: dict[str, Any]) -> DDIMScheduler:
    """The sampling scheduler for a model trained with `DDPMScheduler(**scheduler_config)`.

    Its prediction type is always epsilon: `unet_eps` converts a v-prediction model's
    output, so generation and inversion share one parameterization.
    """
    from diffusers import DDIMScheduler

    config = {**scheduler_config, "prediction_type": "epsilon"}
    return DDIMScheduler(**config, timestep_spacing="trailing", set_alpha_to_one=True,
                         steps_offset=0)


def check_steps(scheduler: DDIMScheduler, steps: int) -> None:
    t = scheduler.config.num_train_timesteps
    if not 1 <= steps <= t or t % steps:
        raise ValueError(f"steps={steps}: the number of DDIM steps must divide the "
                         f"{t} training timesteps (e.g. 5, 10, 20, 25, 50)")


def timesteps_for(scheduler: DDIMScheduler, steps: int, strength: float) -> list[int]:
    """The descending timesteps of a DDIM chain over `steps` that starts at noise level
    `strength` (1: pure noise) instead of the top: the last int(strength * steps) ones."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength t0={strength}: expected 0 < t0 <= 1")
    check_steps(scheduler, steps)
    scheduler.set_timesteps(steps)
    n = max(1, math.floor(strength * steps + 1e-6))
    return [int(t) for t in scheduler.timesteps[steps - n:]]


def _alpha(scheduler: DDIMScheduler, t: int) -> float:
    """a_t; below 0 is the clean end of the chain (the scheduler's final alpha, 1)."""
    return float(scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod)


def _previous(scheduler: DDIMScheduler, t: int) -> int:
    """Where `DDIMScheduler.step` goes from t (its own arithmetic, copied on purpose)."""
    return t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


@torch.no_grad()
def ddim_generate(eps_fn: EpsFn, x: torch.Tensor, scheduler: DDIMScheduler,
                  timesteps: list[int]) -> torch.Tensor:
    """Deterministic DDIM from x at timesteps[0] down to a clean image."""
    for t in timesteps:
        eps = eps_fn(x, t)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x


@torch.no_grad()
def ddim_invert(eps_fn: EpsFn, x0: torch.Tensor, scheduler: DDIMScheduler,
                timesteps: list[int], refine: int = 0) -> torch.Tensor:
    """The mirror of `ddim_generate(..., timesteps)`: clean x0 -> latent at timesteps[0].

    Walks generation's steps (t -> previous(t)) backwards, from previous(t) up to t, with
    eps predicted at the current point previous(t) (timestep 0 for the clean start).
    Generation will use eps predicted at the *target* x_t instead; `refine` fixed-point
    iterations re-predict eps there and redo the step, which shrinks that mismatch
    (the reconstruction error) several-fold per iteration at one model call each.
    """
    x = x0
    for t in reversed(timesteps):
        t_cur = _previous(scheduler, t)
        a_cur, a_next = _alpha(scheduler, t_cur), _alpha(scheduler, t)
        x_next = _renoise(x, eps_fn(x, max(t_cur, 0)), a_cur, a_next)
        for _ in range(refine):
            x_next = _renoise(x, eps_fn(x_next, t), a_cur, a_next)
        x = x_next
    return x


def _renoise(x: torch.Tensor, eps: torch.Tensor, a_cur: float, a_next: float) -> torch.Tensor:
    """One deterministic DDIM move from noise level a_cur to a_next, keeping eps."""
    x0_pred = (x - math.sqrt(1 - a_cur) * eps) / math.sqrt(a_cur)
    return math.sqrt(a_next) * x0_pred + math.sqrt(1 - a_next) * eps


def add_noise(scheduler: DDIMScheduler, x0: torch.Tensor, noise: torch.Tensor,
              t: int) -> torch.Tensor:
    """x_t from a clean image: the forward process at one timestep."""
    a = _alpha(scheduler, t)
    return math.sqrt(a) * x0 + math.sqrt(1 - a) * noise


def sdedit(eps_fn: EpsFn, x0: torch.Tensor, scheduler: DDIMScheduler, steps: int,
           t0: float, noise: torch.Tensor) -> torch.Tensor:
    """SDEdit: noise the input to strength t0, denoise with the (reference) prior.

    Low t0 keeps the input's structure and much of its style; high t0 gives the prior's
    style and, at 1, forgets the input. `noise` broadcasts over the batch.
    """
    timesteps = timesteps_for(scheduler, steps, t0)
    x = add_noise(scheduler, x0, noise.expand_as(x0), timesteps[0])
    return ddim_generate(eps_fn, x, scheduler, timesteps)


def ddib(source_eps: EpsFn, reference_eps: EpsFn, x0: torch.Tensor,
         scheduler: DDIMScheduler, steps: int, t0: float = 1.0, refine: int = 0
         ) -> torch.Tensor:
    """DDIB: DDIM-invert with the source site's model, DDIM-generate with the reference's.

    No randomness: the latent is a deterministic encoding of the input. t0 < 1 stops the
    inversion part-way (closer to the input, less of the reference style).
    """
    timesteps = timesteps_for(scheduler, steps, t0)
    latent = ddim_invert(source_eps, x0, scheduler, timesteps, refine)
    return ddim_generate(reference_eps, latent, scheduler, timesteps)


def unet_eps(unet: torch.nn.Module, class_labels: torch.Tensor | None = None,
             precision: str = "fp32", prediction_type: str = "epsilon",
             alphas_cumprod: torch.Tensor | None = None) -> EpsFn:
    """Wrap a `UNet2DModel` (optionally with per-image class labels) as an EpsFn.

    A v-prediction model (v = sqrt(a) eps - sqrt(1-a) x0) is turned into eps here,
    eps = sqrt(a) v + sqrt(1-a) x_t, so every loop above speaks eps only.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type='{prediction_type}': use epsilon or v_prediction")
    if prediction_type == "v_prediction" and alphas_cumprod is None:
        raise ValueError("a v-prediction model needs the scheduler's alphas_cumprod")

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = unet(x, tt, class_labels=class_labels).sample.float()
        if prediction_type == "v_prediction":
            a = float(alphas_cumprod[t])
            out = math.sqrt(a) * out + math.sqrt(1 - a) * x
        return out

    return eps
