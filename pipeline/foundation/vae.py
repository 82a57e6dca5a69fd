"""Train the tiny world's AutoencoderKL (16 latent channels) and set its shift/scale from the data."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.evaluation.quality import psnr
from pipeline.foundation.data import TRAIN_SPLITS, pixels, scenes
from pipeline.models.world import build_vae
from pipeline.training import Loop, save_atomic

KL_WEIGHT = 1e-6  # small: the posterior variance collapses, so the pipeline's latent sampling ~= the mode


class VAETraining(torch.nn.Module):
    """The VAE as the Loop trains it: the loss terms are this module's forward, since DDP syncs the gradients
    of what its forward ran (the VAE's own forward returns no posterior; a loss calling the wrapped model's
    encode / decode would bypass DDP). Its one child is the VAE: the same parameters, in the same order."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        post = self.vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator).to(x.device)
        recon = self.vae.decode(z).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        kl = post.kl().mean() / x[0].numel()
        return {"loss": rec + KL_WEIGHT * kl, "recon": rec, "kl": kl}


def vae_loss(model: VAETraining, batch, generator):
    """The Loop's loss: ``model`` is VAETraining (DDP-wrapped under several processes)."""
    return model(batch["image"], generator)


@torch.no_grad()
def set_latent_stats(vae, images: torch.Tensor) -> tuple[float, float]:
    """SD3-style shift_factor / scaling_factor: latents are (z - shift) * scale with unit variance."""
    z = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mode() for i in range(0, len(images), 256)])
    shift, scale = float(z.mean()), float(1.0 / z.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor) -> float:
    from pipeline.models import inpaint

    recon = torch.cat([inpaint.decode(vae, inpaint.encode(vae, images[i:i + 256]))
                       for i in range(0, len(images), 256)])
    return float(psnr(recon, images).mean())


def train_vae(cfg: Config, scenes_dir: Path, out: Path, checkpoints: Path, live: Path | None) -> dict:
    """Train into ``out`` -> its metrics. Launched on several processes, every rank trains (DDP) and rank 0
    alone saves and returns the metrics; the others return {}."""
    images, _ = pixels(scenes(scenes_dir, TRAIN_SPLITS), cfg.data.image_size)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg)
    loop = Loop("vae", VAETraining(vae), {"image": images}, vae_loss, cfg.vae.train, cfg.seed, checkpoints,
                checkpoint_every=cfg.distill.checkpoint_every, keep_checkpoints=1, live_dir=live, fingerprint=str(cfg.seed),
                device=cfg.runtime.device)
    result = loop.run()
    if not result.main:  # several processes trained it (DDP): rank 0 alone measures and saves
        return {}
    vae = loop.model.vae.eval().requires_grad_(False)
    shift, scale = set_latent_stats(vae, images[:2048])
    val, _ = pixels(scenes(scenes_dir, ("val",)), cfg.data.image_size)
    save_atomic(vae, out)
    return {"vae_val_psnr": reconstruction_psnr(vae, val), "shift_factor": shift, "scaling_factor": scale,
            "vae_train_seconds": result.seconds}

