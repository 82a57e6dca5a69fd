"""The spatial condition of the ControlNet (params ``condition``): the one place it changes anything.

- ``inpaint``: the control input of diffusers' StableDiffusion3ControlNetInpaintingPipeline
  (pipeline.models.inpaint): latents of the masked image + 1 mask channel (extra_conditioning_channels 1);
  L_task weights latent pixels alpha in the hole, 1 - alpha outside.
- ``edges``: the control image is an edge map of the scene (``sobel_edges``), prepared as diffusers'
  StableDiffusion3ControlNetPipeline prepares ``control_image`` for an SD3ControlNetModel: VAE-encoded,
  times ``scaling_factor``, no mask channel (extra_conditioning_channels 0), as InstantX's
  SD3-Controlnet-Canny. The stock pipeline subtracts the VAE's ``shift_factor`` only for a ControlNet with
  ``force_zeros_for_pooled_projection=False``; every ControlNet here forces zero pooled projections
  (pipeline.models.student, pipeline.models.controlled), so, as for InstantX's, there is no shift. There is
  no hole: the loss weight map is uniform 1 (``loss_mask`` is None; see pipeline.distill.losses.task_loss),
  so L_task is SD3's plain flow-matching MSE, the teacher's own loss, at its scale whatever alpha is.

Everything else (backbone, mapping, tri-level loss, sampler loop) is the same code path for both.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.models import inpaint

Condition = Literal["inpaint", "edges"]
CONDITIONS: tuple[str, ...] = ("inpaint", "edges")
EXTRA_CONDITIONING_CHANNELS = {"inpaint": 1, "edges": 0}  # SD3ControlNetModel's extra_conditioning_channels

# Sobel kernels (x: left -> right, y: top -> bottom); the magnitude of a unit step is 4.
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_SOBEL_Y = _SOBEL_X.t()
_GREY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as PIL's convert("L")
SOBEL_MAX = 4 * 2 ** 0.5  # bounds the magnitude a grey image in [0, 1] can give (|gx|, |gy| <= 4)


def check(condition: str) -> str:
    if condition not in CONDITIONS:
        raise ValueError(f"condition: {condition!r} is not one of {list(CONDITIONS)}")
    return condition


def extra_conditioning_channels(condition: str) -> int:
    """SD3ControlNetModel's ``extra_conditioning_channels`` for the condition: 1 (mask) or 0."""
    return EXTRA_CONDITIONING_CHANNELS[check(condition)]


def sobel_edges(image: torch.Tensor) -> torch.Tensor:
    """Edge map of images (B, 3, H, W) in [-1, 1] -> (B, 3, H, W) in [-1, 1]: the Sobel gradient magnitude
    of the BT.601 grey image in [0, 1] (replicate padding, so a flat image has no edges at its border),
    divided by its bound ``SOBEL_MAX`` (fixed, not per image: the same edge has the same
    value in every image) and clamped to [0, 1]; then mapped to [-1, 1] (no edge = -1, as a black pixel of
    a canny map after diffusers' image processor) and repeated to 3 channels, the RGB edge image canny
    ControlNets take. Deterministic: convolutions only, computed in float32."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image: expected (B, 3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
    x = (image.float() + 1) / 2
    grey = sum(w * x[:, i:i + 1] for i, w in enumerate(_GREY))
    kernels = torch.stack([_SOBEL_X, _SOBEL_Y])[:, None].to(grey.device)
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    mag = (g.pow(2).sum(1, keepdim=True).sqrt() / SOBEL_MAX).clamp(0, 1)
    return (mag * 2 - 1).expand(-1, 3, -1, -1).contiguous().to(image.dtype)


def control_image(image: torch.Tensor, mask: torch.Tensor | None, condition: str) -> torch.Tensor:
    """The pixel-space control image: the masked image (hole = -1) for inpaint, the edge map for edges
    (which ignores the mask)."""
    if check(condition) == "inpaint":
        if mask is None:
            raise ValueError("condition inpaint: a mask is required")
        return inpaint.masked_image(image, mask)
    return sobel_edges(image)


@torch.no_grad()
def encode_control(vae, pixels: torch.Tensor) -> torch.Tensor:
    """A control image in [-1, 1] -> the ControlNet's latents as StableDiffusion3ControlNetPipeline makes
    them for a ControlNet that forces zero pooled projections: ``latents * scaling_factor`` (no shift). The
    posterior's mode, as pipeline.models.inpaint.encode."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    return latents * vae.config.scaling_factor


def prepare_control(vae, image: torch.Tensor, mask: torch.Tensor | None,
                    condition: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image in [-1, 1], pixel mask 1 = hole or None) -> (``controlnet_cond``, latent loss mask).

    inpaint: pipeline.models.inpaint.prepare_control (17 channels; the latent hole mask). edges: the
    encoded edge map (the VAE's latent channels) and None = uniform weighting (no hole)."""
    if check(condition) == "inpaint":
        if mask is None:
            raise ValueError("condition inpaint: a mask is required")
        return inpaint.prepare_control(vae, image, mask)
    return encode_control(vae, sobel_edges(image)), None


def loss_mask(hole: torch.Tensor | None, condition: str) -> torch.Tensor | None:
    """The latent mask L_task weights by: the hole under inpaint, None (uniform 1) under edges."""
    return hole if check(condition) == "inpaint" else None


# What the encode stage stores per row for the control (pipeline.data.shards), so training runs no VAE:
# inpaint: the encoded masked image and the latent hole mask (as before the condition existed); edges: the
# encoded edge map, ``prepare_control``'s control as it is, under its own key. Not ``masked_latents`` with an
# all-ones mask: that would name an edge map a masked image, carry a mask channel edges does not feed the
# ControlNet, and leave L_task reading a fake hole.
SHARD_KEYS: dict[str, tuple[str, ...]] = {"inpaint": ("masked_latents", "mask"), "edges": ("control_latents",)}


def shard_keys(condition: str) -> tuple[str, ...]:
    """The encoded-shard tensors that hold the control under ``condition``."""
    return SHARD_KEYS[check(condition)]


@torch.no_grad()
def encode_for_shards(vae, images: torch.Tensor, masks: torch.Tensor | None,
                      condition: str) -> dict[str, torch.Tensor]:
    """What the encode stage writes for the control (``shard_keys``): inpaint the masked image's latents and
    the latent hole mask, edges the encoded edge map (``prepare_control``)."""
    if check(condition) == "inpaint":
        masked = inpaint.encode(vae, inpaint.masked_image(images, masks))
        return {"masked_latents": masked, "mask": inpaint.latent_mask(masks, masked.shape[-2:])}
    return {"control_latents": prepare_control(vae, images, None, condition)[0]}


def control_from_shards(t: dict[str, torch.Tensor], condition: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encoded-shard tensors -> (``controlnet_cond``, latent loss mask), as ``prepare_control`` returns them
    from pixels: inpaint the 17-channel control and the hole, edges the encoded edge map and None."""
    if check(condition) == "inpaint":
        return inpaint.control_input(t["masked_latents"], t["mask"]), t["mask"]
    return t["control_latents"], None
