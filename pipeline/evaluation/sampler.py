"""Inpainting sampler with the conventions of diffusers' StableDiffusion3ControlNetInpaintingPipeline
(prompt encoding, control input, zero pooled projections for the ControlNet, CFG, FlowMatch Euler steps,
no paste-back), but with the control-to-block mapping owned by pipeline.models.mapping, so a teacher
trained 1:1 is injected as trained whatever diffusers is installed. tests/test_sampler.py checks it
against the stock pipeline for a student, where both rules agree.

It runs where the models are (pipeline.runtime placed them) and in their dtype; images come back as
float32 on the CPU. ``micro_batch`` splits a batch's denoising loop into smaller calls after the batch's
noise is drawn, so it changes memory, not the noise an image gets."""

from __future__ import annotations

import copy

import torch
from diffusers.utils.torch_utils import randn_tensor

from pipeline.models import inpaint
from pipeline.models.controlled import Controlled


@torch.no_grad()
def inpaint_images(
    pipe,
    controlnet,
    convention: str,
    images: torch.Tensor,
    masks: torch.Tensor,
    prompts: list[str],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    conditioning_scale: float,
    seed: int,
    max_sequence_length: int,
    micro_batch: int | None = None,
) -> torch.Tensor:
    """One batch. ``controlnet=None`` samples with the backbone alone (the no-control baseline).
    Returns images in [-1, 1]. The initial noise comes from ``torch.Generator().manual_seed(seed)``, as
    ``pipe(..., generator=...)`` draws it (on the CPU, then moved)."""
    inpaint.check_pixels(images, masks)
    if len(prompts) != len(images):
        raise ValueError(f"prompts: {len(prompts)} prompts for {len(images)} images")
    t = pipe.transformer
    lat = [s // pipe.vae_scale_factor for s in images.shape[-2:]]
    noise = randn_tensor((len(images), t.config.in_channels, *lat), generator=torch.Generator().manual_seed(seed),
                         device=t.device, dtype=t.dtype)
    step = micro_batch or len(images)
    return torch.cat([
        _denoise(pipe, controlnet, convention, images[i:i + step], masks[i:i + step], list(prompts[i:i + step]),
                 noise[i:i + step], num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                 conditioning_scale=conditioning_scale, max_sequence_length=max_sequence_length).float().cpu()
        for i in range(0, len(images), step)])


def _denoise(pipe, controlnet, convention, images, masks, prompts, latents, *, num_inference_steps: int,
             guidance_scale: float, conditioning_scale: float, max_sequence_length: int) -> torch.Tensor:
    cfg = guidance_scale > 1
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=cfg,
        max_sequence_length=max_sequence_length, device=latents.device,
    )
    if cfg:
        embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
    control, _ = inpaint.prepare_control(pipe.vae, images, masks)
    if cfg:
        control = torch.cat([control, control])
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    ctrl = Controlled(pipe.transformer, controlnet, convention) if controlnet is not None else None
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents]) if cfg else latents
        ts = t.expand(x.shape[0])
        if ctrl is not None:
            pred, _ = ctrl(x, ts, embeds, pooled, control, conditioning_scale)
        else:
            pred = pipe.transformer(hidden_states=x, timestep=ts, encoder_hidden_states=embeds,
                                    pooled_projections=pooled, return_dict=False)[0]
        if cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return inpaint.decode(pipe.vae, latents)


def inpaint_all(pipe, controlnet, convention, images, masks, prompts, *, batch_size: int, seed: int, **kw):
    """Batched over a split; batch k (``batch_size`` images, evaluate.batch_size) uses seed + k: the batch
    size decides the noise; ``micro_batch`` in ``kw`` (runtime.sample_batch_size) only the memory."""
    out = []
    for k, i in enumerate(range(0, len(images), batch_size)):
        out.append(inpaint_images(pipe, controlnet, convention, images[i:i + batch_size], masks[i:i + batch_size],
                                  prompts[i:i + batch_size], seed=seed + k, **kw))
    return torch.cat(out)
