"""Inpainting sampler with the conventions of diffusers' StableDiffusion3ControlNetInpaintingPipeline
(prompt encoding, control input, zero pooled projections for the ControlNet, CFG, FlowMatch Euler steps,
no paste-back), but with the control-to-block mapping owned by pipeline.models.mapping, so a teacher
trained 1:1 is injected as trained whatever diffusers is installed. tests/test_sampler.py checks it
against the stock pipeline for a student, where both rules agree.

It runs where the models are (pipeline.runtime placed them) and in their dtype; images come back as
float32 on the CPU. Each image has its own seed: its initial noise is what ``pipe(..., generator=[one
torch.Generator per image])`` draws, so an image gets the same noise whatever batch it is sampled in, and
two models evaluated on the same image start from the same noise (paired comparisons).

``condition`` (pipeline.models.condition): inpaint (the default, above) or edges, where the control is the
image's edge map prepared as StableDiffusion3ControlNetPipeline prepares ``control_image`` and the mask is
not read (may be None); the denoising loop is the same. tests/evaluation/test_sampler.py checks edges
against the stock StableDiffusion3ControlNetPipeline too."""

from __future__ import annotations

import copy

import torch
from diffusers.utils.torch_utils import randn_tensor

from pipeline.models import condition as conditions
from pipeline.models import inpaint
from pipeline.models.controlled import Controlled
from pipeline.threads import follow as follow_threads


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
    seeds: list[int],
    max_sequence_length: int,
    on_step=None,
    condition: str = "inpaint",
) -> torch.Tensor:
    """One batch. ``controlnet=None`` samples with the backbone alone (the no-control baseline).
    Returns images in [-1, 1]. ``seeds``: one per image; its noise comes from
    ``torch.Generator().manual_seed(seed)`` as the stock pipeline draws it from a list of generators (on
    the CPU, then moved). ``on_step(i, t, latents)``: called with the latents before step i (trajectories)."""
    if masks is None and conditions.check(condition) == "edges":
        masks = torch.zeros_like(images[:, :1])  # shape checks only: edges reads no mask
    inpaint.check_pixels(images, masks)
    if len(prompts) != len(images) or len(seeds) != len(images):
        raise ValueError(f"{len(prompts)} prompts and {len(seeds)} seeds for {len(images)} images")
    t = pipe.transformer
    lat = [s // pipe.vae_scale_factor for s in images.shape[-2:]]
    noise = initial_noise(seeds, (t.config.in_channels, *lat), t.device, t.dtype)
    return _denoise(pipe, controlnet, convention, images, masks, list(prompts), noise,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    conditioning_scale=conditioning_scale, max_sequence_length=max_sequence_length,
                    on_step=on_step, condition=condition).float().cpu()


def initial_noise(seeds: list[int], shape, device, dtype) -> torch.Tensor:
    """What diffusers' randn_tensor draws for a list of per-image generators."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return randn_tensor((len(seeds), *shape), generator=gens, device=device, dtype=dtype)


def _denoise(pipe, controlnet, convention, images, masks, prompts, latents, *, num_inference_steps: int,
             guidance_scale: float, conditioning_scale: float, max_sequence_length: int,
             on_step=None, condition: str = "inpaint") -> torch.Tensor:
    cfg = guidance_scale > 1
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=cfg,
        max_sequence_length=max_sequence_length, device=latents.device,
    )
    if cfg:
        embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
    control, _ = conditions.prepare_control(pipe.vae, images, masks, condition)
    if cfg:
        control = torch.cat([control, control])
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    ctrl = Controlled(pipe.transformer, controlnet, convention) if controlnet is not None else None
    for i, t in enumerate(scheduler.timesteps):
        follow_threads()  # the concurrent executor may lend this process idle threads (pipeline.threads)
        if on_step is not None:
            on_step(i, t, latents)
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


