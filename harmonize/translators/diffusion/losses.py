"""The diffusion prior's training objective as pure functions: central training
(`train.py`) and the federated nodes (`harmonize.federated.diffusion_task`) call them.

The standard DDPM loss: noise a clean image to a random timestep with
`DDPMScheduler.add_noise` and regress the noise (MSE), or, by default, the velocity
v = sqrt(a) eps - sqrt(1-a) x0, which keeps predictions usable at the highest noise levels
(eps-prediction errors are amplified ~150x there by 1/sqrt(alpha_bar)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def denoising_loss(unet, scheduler, x0: torch.Tensor, class_labels: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE of the UNet's prediction (noise or velocity, as the scheduler's
    prediction_type says) at random timesteps; fp32. Run it under autocast for mixed
    precision. `generator` (on any device) fixes noise and timesteps, e.g. to score
    rounds on the same draws; None uses the global RNG of x0's device."""
    if generator is None:
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), device=x0.device)
    else:
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),),
                          generator=generator, device=generator.device).to(x0.device)
    pred = unet(scheduler.add_noise(x0, noise, t), t, class_labels=class_labels).sample
    v_target = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(x0, noise, t) if v_target else noise
    return F.mse_loss(pred.float(), target.float())


def drop_classes(labels: torch.Tensor, probability: float, null_class: int) -> torch.Tensor:
    """Classifier-free style label dropout: each label replaced by the 'unknown site'
    class with `probability`, so the prior also learns the pooled distribution."""
    drop = torch.rand(labels.shape, device=labels.device) < probability
    return torch.where(drop, null_class, labels)
