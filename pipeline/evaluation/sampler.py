"""Inpainting sampler with the conventions of diffusers' StableDiffusion3ControlNetInpaintingPipeline
(prompt encoding, control input, zero pooled projections for the ControlNet, CFG, FlowMatch Euler steps,
no paste-back), but with the control-to-block mapping owned by pipeline.models.mapping, so a teacher
trained 1:1 is injected as trained whatever diffusers is installed. tests/test_sampler.py checks it
against the stock pipeline for a student, where both rules agree."""

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
) -> torch.Tensor:
    """One batch. ``controlnet=None`` samples with the backbone alone (the no-control baseline).
    Returns images in [-1, 1]. The initial noise comes from ``torch.Generator().manual_seed(seed)``, as
    ``pipe(..., generator=...)`` draws it."""
    inpaint.check_pixels(images, masks)
    if len(prompts) != len(images):
        raise ValueError(f"prompts: {len(prompts)} prompts for {len(images)} images")
    cfg = guidance_scale > 1
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, prompt_3=None, do_classifier_free_guidance=cfg,
        max_sequence_length=max_sequence_length, device=torch.device("cpu"),
    )
    if cfg:
        embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
    control, _ = inpaint.prepare_control(pipe.vae, images, masks)
    if cfg:
        control = torch.cat([control, control])
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps)
    b, _, h, w = control.shape[0] // (2 if cfg else 1), *control.shape[1:]
    latents = randn_tensor((b, pipe.transformer.config.in_channels, h, w),
                           generator=torch.Generator().manual_seed(seed), dtype=embeds.dtype)
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
    """Batched over a split; batch k uses seed + k, so results do not depend on the batch size only
    through the seed schedule (kept fixed in params)."""
    out = []
    for k, i in enumerate(range(0, len(images), batch_size)):
        out.append(inpaint_images(pipe, controlnet, convention, images[i:i + batch_size], masks[i:i + batch_size],
                                  prompts[i:i + batch_size], seed=seed + k, **kw))
    return torch.cat(out)
