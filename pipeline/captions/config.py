"""Params section `caption` (validated with pipeline.config.section)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LOCAL_TEMPLATE = (
    "The first image is a crop of the region to describe; the second shows the whole image with that "
    "region tinted red. Describe only the content of the region in a short phrase (e.g. 'a red circle')."
)
GLOBAL_TEMPLATE = "Describe the whole image in one short phrase (e.g. 'two red circles on a striped background')."


class QwenConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = Field("Qwen/Qwen2.5-VL-3B-Instruct", description="local path or hub id")
    revision: str | None = None
    local_template: str = LOCAL_TEMPLATE
    global_template: str = GLOBAL_TEMPLATE
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(24, ge=1)
    vlm_image_size: int = Field(224, ge=28, description="crop/overlay/image side given to the VLM")
    crop_padding: float = Field(0.15, ge=0, le=1, description="crop margin around the hole's bbox")
    overlay_color: tuple[int, int, int] = (255, 0, 0)
    overlay_alpha: float = Field(0.5, ge=0, le=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    cache_dir: str = "data/caption_cache"


class CaptionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backend: Literal["annotations", "caption_noise", "qwen2_5_vl"] = "annotations"
    noise_fraction: float = Field(0.2, ge=0, le=1, description="caption_noise: share of wrong local prompts")
    noise_seed: int = 0
    qwen: QwenConfig = QwenConfig()
