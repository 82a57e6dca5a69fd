"""The pretrained world: SD3-medium (backbone, VAE, CLIP-L, CLIP-G, T5), the alimama inpainting teacher and
the Qwen2.5-VL captioner, resolved from a local folder or the Hugging Face hub cache and checked before
anything runs. One module per concern: ``resolve`` (find the files), ``check`` (configs and weight
shapes against the params; ``load_world``), ``materialise`` (link them into models/).

Params section ``world`` (pipeline.config.WorldConfig; ``source: embedded`` = the tiny world trained by
the foundation stages, the default). With ``source: pretrained`` the stages ``vae``, ``backbone``
and ``teacher`` call ``materialise`` instead of training: it resolves the model, checks its
configs (and the shapes of a few weights, read from the safetensors headers, without loading them), then
links (or copies) the files into models/vae, models/backbone, models/teacher in the standard
diffusers layouts, and writes ``SOURCE.json`` (repo, requested and resolved revision, path) beside them.

Resolution order: ``resolve``. Nothing here passes ``trust_remote_code``.

    python -m pipeline.models.pretrained check [--params params.yaml] [--load]    (__main__.py)
"""

from __future__ import annotations

from pipeline.config import Config, WorldConfig
from pipeline.models.pretrained.check import (World, check_captioner, check_foundation, check_teacher,
                                              load_world, preflight)
from pipeline.models.pretrained.materialise import materialise
from pipeline.models.pretrained.resolve import ALLOW_PATTERNS, ModelError, Resolved, resolve

__all__ = ["ALLOW_PATTERNS", "ModelError", "Resolved", "World", "check_captioner", "check_foundation",
           "check_teacher", "is_pretrained", "load_world", "materialise", "preflight", "resolve",
           "world_config"]


def world_config(cfg: Config) -> WorldConfig:
    return cfg.world


def is_pretrained(cfg: Config) -> bool:
    return world_config(cfg).source == "pretrained"
