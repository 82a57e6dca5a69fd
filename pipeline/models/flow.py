"""Flow matching as in diffusers' examples/controlnet/train_controlnet_sd3.py (SD3's rectified flow)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from pipeline.config import SchedulerConfig


@dataclass
class NoisySample:
    noisy: torch.Tensor       # (1 - sigma) * x0 + sigma * noise
    timesteps: torch.Tensor   # what the transformer is given (sigma * 1000, shifted schedule)
    sigmas: torch.Tensor      # (B, 1, 1, 1)
    weighting: torch.Tensor   # SD3 loss weighting per sample, (B, 1, 1, 1)
    noise: torch.Tensor


def add_noise(x0: torch.Tensor, scheduler, cfg: SchedulerConfig, generator: torch.Generator) -> NoisySample:
    """Sample timesteps with SD3's density (logit-normal by default) from the training scheduler's
    shifted schedule and noise ``x0``. Every random draw uses ``generator``."""
    b = x0.shape[0]
    u = compute_density_for_timestep_sampling(
        cfg.weighting_scheme, b, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, generator=generator
    )
    n = scheduler.config.num_train_timesteps
    idx = (u * n).long().clamp(0, n - 1)
    timesteps = scheduler.timesteps[idx].to(x0.device)
    sigmas = scheduler.sigmas[idx].to(x0.device, x0.dtype).view(b, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    weighting = compute_loss_weighting_for_sd3(cfg.weighting_scheme, sigmas)
    return NoisySample(noisy, timesteps, sigmas, weighting, noise)


def target(sample: NoisySample, x0: torch.Tensor) -> torch.Tensor:
    """The flow-matching velocity target (noise - x0): the one place a ground-truth image enters a loss."""
    return sample.noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor | None = None,
              pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """SD3's weighted flow-matching MSE, the one loss the backbone, the teacher and L_task train with.

    As train_controlnet_sd3.py: squared error times the per-sample SD3 weighting (B, 1, 1, 1), mean over
    each sample, then over the batch; ``pixel_weight`` (B, 1, h, w) also weights latent pixels (L_task's
    alpha / 1 - alpha). Computed in float32 whatever the autocast dtype."""
    err = (pred.float() - target.float()) ** 2
    if weighting is not None:
        err = err * weighting.float()
    if pixel_weight is not None:
        err = err * pixel_weight.float()
    return err.reshape(len(err), -1).mean(1).mean()


def training_scheduler(cfg: SchedulerConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)
