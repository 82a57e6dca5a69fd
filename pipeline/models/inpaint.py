"""The inpainting control input, exactly as diffusers' StableDiffusion3ControlNetInpaintingPipeline builds it.

Mask convention (the one place it is written down): a pixel mask is a float tensor (B, 1, H, W) in [0, 1]
where 1 = hole = the region to repaint; it is binarised at 0.5. The control input is
``cat([vae_latents(image with hole pixels set to -1), 1 - mask_at_latent_size(nearest)])``: 16 + 1
channels, whose last channel is 1 = keep, 0 = hole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HOLE_THRESHOLD = 0.5


def check_pixels(image: torch.Tensor, mask: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image: expected (B, 3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask: expected (B, 1, H, W), got shape {tuple(mask.shape)}")
    if mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match image {tuple(image.shape)}")
    if image.shape[0] == 0:
        raise ValueError("image: empty batch")


def binarise(mask: torch.Tensor) -> torch.Tensor:
    return (mask > HOLE_THRESHOLD).to(mask.dtype)


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hole pixels set to -1 (as the pipeline does before VAE encoding)."""
    check_pixels(image, mask)
    return torch.where(mask > HOLE_THRESHOLD, torch.full_like(image, -1.0), image)


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The binary hole mask (1 = hole) at latent size, resized as the pipeline does (nearest)."""
    return F.interpolate(binarise(mask), size=size)


@torch.no_grad()
def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> shifted, scaled latents. The posterior's mode (the pipeline samples; our VAEs
    are trained to a near-zero posterior variance, so the two agree to within noise)."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents.to(vae.dtype)).sample.clamp(-1, 1)


def control_input(masked_latents: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Encoded masked image + latent-size hole mask -> the 17-channel control (last channel 1 = keep)."""
    if hole.shape[-2:] != masked_latents.shape[-2:] or hole.shape[1] != 1:
        raise ValueError(
            f"mask: latent mask {tuple(hole.shape)} does not match masked latents {tuple(masked_latents.shape)}"
        )
    return torch.cat([masked_latents, 1 - hole.to(masked_latents)], dim=1)  # its dtype and device


def prepare_control(vae, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image in [-1, 1], pixel mask 1 = hole) -> (control input, latent hole mask)."""
    masked_latents = encode(vae, masked_image(image, mask))
    hole = latent_mask(mask, masked_latents.shape[-2:])
    return control_input(masked_latents, hole), hole
