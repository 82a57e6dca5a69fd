"""Backbone + ControlNet forward, with the residual injection owned by pipeline.models.mapping."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.models.mapping import Convention, backbone_mapping, expand_to_blocks


@dataclass
class Controlled:
    """A frozen backbone driven by one ControlNet under a named mapping convention."""

    backbone: torch.nn.Module
    controlnet: torch.nn.Module
    convention: Convention

    def __post_init__(self):
        self.mapping = backbone_mapping(self.backbone, self.controlnet.config.num_layers, self.convention)

    def control(self, noisy, timesteps, prompt_embeds, pooled, control, scale: float = 1.0,
                controlnet=None) -> list[torch.Tensor]:
        """The ControlNet's per-layer residuals f_j (already times ``scale``). The ControlNet gets zero
        pooled projections, as the stock inpainting pipeline gives it. ``controlnet``: the same model
        wrapped for training (DDP), when it is. Inputs are cast to the ControlNet's dtype: a float32 student
        beside bf16 frozen models (runtime policy) without autocast; a no-op when they agree."""
        dt = self.controlnet.dtype
        net = self.controlnet if controlnet is None else controlnet  # not `or`: a compiled module has no bool
        return list(net(
            hidden_states=noisy.to(dt), timestep=timesteps, encoder_hidden_states=prompt_embeds.to(dt),
            pooled_projections=torch.zeros_like(pooled, dtype=dt), controlnet_cond=control.to(dt),
            conditioning_scale=scale, return_dict=False,
        )[0])

    def denoise(self, noisy, timesteps, prompt_embeds, pooled, residuals: list[torch.Tensor] | None) -> torch.Tensor:
        dt = self.backbone.dtype  # the frozen backbone's (runtime policy); residuals may come in float32
        blocks = expand_to_blocks([r.to(dt) for r in residuals], self.mapping) if residuals is not None else None
        return self.backbone(
            hidden_states=noisy.to(dt), timestep=timesteps, encoder_hidden_states=prompt_embeds.to(dt),
            pooled_projections=pooled.to(dt), block_controlnet_hidden_states=blocks, return_dict=False,
        )[0]

    def __call__(self, noisy, timesteps, prompt_embeds, pooled, control, scale: float = 1.0):
        """-> (backbone output, per-layer residuals)."""
        residuals = self.control(noisy, timesteps, prompt_embeds, pooled, control, scale)
        return self.denoise(noisy, timesteps, prompt_embeds, pooled, residuals), residuals
