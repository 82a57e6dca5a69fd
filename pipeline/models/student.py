"""A ControlNet initialised from a backbone's first N joint blocks (the student; also the teacher's init)."""

from __future__ import annotations

import torch
from diffusers import SD3ControlNetModel, SD3Transformer2DModel

from pipeline.models.condition import extra_conditioning_channels

_SHARED_CONFIG = (
    "sample_size", "patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
    "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
    "pos_embed_max_size", "qk_norm",
)


def controlnet_from_backbone(backbone: SD3Transformer2DModel, num_layers: int,
                             condition: str = "inpaint") -> SD3ControlNetModel:
    """SD3ControlNetModel with ``num_layers`` joint blocks copied from the backbone's first blocks, plus its
    pos_embed, time_text_embed and context_embedder; control projections and ``pos_embed_input`` zero.
    ``condition`` (pipeline.models.condition) sets extra_conditioning_channels: 1 (inpaint's mask channel)
    or 0 (edges).

    Unlike ``SD3ControlNetModel.from_transformer`` this never writes into the backbone's config (diffusers
    issue 13611): the ControlNet config is built from a copy.
    """
    blocks = backbone.transformer_blocks
    usable = [i for i, b in enumerate(blocks) if not getattr(b, "context_pre_only", False)]
    if not 1 <= num_layers <= len(usable):
        raise ValueError(
            f"student_layers: {num_layers} is out of range for a backbone with {len(blocks)} blocks "
            f"({len(usable)} that can seed a ControlNet layer)"
        )
    cfg = {k: backbone.config[k] for k in _SHARED_CONFIG if k in backbone.config}
    dual = tuple(i for i in backbone.config.get("dual_attention_layers", ()) if i < num_layers)
    cn = SD3ControlNetModel(
        num_layers=num_layers, extra_conditioning_channels=extra_conditioning_channels(condition), dual_attention_layers=dual,
        force_zeros_for_pooled_projection=True, **cfg,
    )
    cn.pos_embed.load_state_dict(backbone.pos_embed.state_dict())
    cn.time_text_embed.load_state_dict(backbone.time_text_embed.state_dict())
    cn.context_embedder.load_state_dict(backbone.context_embedder.state_dict())
    for i in range(num_layers):
        cn.transformer_blocks[i].load_state_dict(blocks[i].state_dict())
    with torch.no_grad():
        for module in (*cn.controlnet_blocks, cn.pos_embed_input):
            for p in module.parameters():
                p.zero_()
    return cn.to(backbone.dtype)
