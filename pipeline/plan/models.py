"""A profile's models at their real configuration, built on fake tensors (inside pipeline.plan.trace's
``fake_world``): nothing is allocated, every shape and dtype is the real one.

Where each config comes from (``Source.how``), first found wins:
1. ``workspace``: the folder the stages load (models/backbone, models/teacher; pipeline.paths);
2. ``local_dir`` / ``hub_cache``: pipeline.models.pretrained.resolve (never a download);
3. ``reference``: the copy of the public config files in configs/reference/<repo id>/ (see its README);
4. ``params``: the embedded tiny world, built from the params by pipeline.models.world's builders.

Models are built as the stages load them: the frozen ones in the runtime policy's accelerator dtype
(``world.dtype``; pipeline.runtime), eval mode, no grad; ControlNets with the condition's
``extra_conditioning_channels`` (pipeline.models.world.load_controlnet). Tokenizers are stand-ins
(pipeline.models.standins) of the same padded lengths (CLIP: 77; T5: ``max_sequence_length``), so token
values differ from the real ones and nothing that memory or FLOPs depend on does; the captioner's
tokenizer and chat template are the real ones when the hub cache holds them, else the stand-in's (see
``captioner``).
"""

from __future__ import annotations

import functools
import importlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import paths
from pipeline.config import Config, ModelRef
from pipeline.plan.trace import default_dtype

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "configs" / "reference"
T5_SLOT = "text_encoder_3"
QWEN_TOKEN_IDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                  "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


@dataclass(frozen=True)
class Source:
    """Where a model's config files were read: ``path`` (a folder in the repo's layout) and ``how``."""

    name: str       # foundation | teacher | captioner
    repo: str
    path: Path | None
    how: str        # workspace | local_dir | hub_cache | reference | params

    def describe(self) -> str:
        where = "" if self.path is None else f": {_shown(self.path)}"
        return f"{self.name}: {self.repo} ({self.how}{where})"


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when inside it (the workspace, configs/reference)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _resolved(name: str, ref: ModelRef, cfg: Config) -> Source | None:
    from pipeline.models.pretrained.resolve import ModelError, resolve

    try:
        r = resolve(name, ref, cfg.world.cache_dir, allow_download=False)
    except ModelError:
        return None
    return Source(name, ref.repo, r.path, r.how)


def find_source(cfg: Config, name: str, root: Path = Path(".")) -> Source:
    """The config source of ``name`` (foundation | teacher | captioner), in the module docstring's order."""
    workspace = {"foundation": root / paths.BACKBONE / "model_index.json",
                 "teacher": root / paths.TEACHER / "config.json"}
    if name in workspace and workspace[name].exists():
        return Source(name, str(workspace[name].parent), workspace[name].parent, "workspace")
    if name == "captioner":
        ref = ModelRef(repo=cfg.caption.qwen.model, revision=cfg.caption.qwen.revision, local_dir=None)
    elif cfg.world.source == "pretrained":
        ref = getattr(cfg.world, name)
    else:
        return Source(name, "embedded tiny world", None, "params")
    found = _resolved(name, ref, cfg)
    if found is not None:
        return found
    if (REFERENCE / ref.repo).is_dir():
        return Source(name, ref.repo, REFERENCE / ref.repo, "reference")
    raise FileNotFoundError(f"{name}: no config for {ref.repo!r} (not in models/, the hub cache, nor "
                            f"{REFERENCE.relative_to(ROOT)}/{ref.repo}); add a reference copy of its configs")


def _class(library: str, name: str):
    return getattr(importlib.import_module(library), name)


def _component(folder: Path, library: str, cls_name: str):
    """One model of a pipeline folder from its config alone (diffusers or transformers), default dtype."""
    cls = _class(library, cls_name)
    if library == "diffusers":
        return cls.from_config(cls.load_config(folder))
    return cls(_config(folder))


def _config(folder: Path):
    """A transformers config, its dtype set to the one the model is built in, as from_pretrained(dtype=...)
    sets it (some modules are created in the config's dtype: a file saying float16 would leave them so)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    config.dtype = torch.get_default_dtype()
    return config


@functools.cache
def _stand_in_tokenizers() -> dict:
    from pipeline.models.standins import clip_tokenizer, t5_tokenizer

    clip = clip_tokenizer()
    return {"tokenizer": clip, "tokenizer_2": clip, "tokenizer_3": t5_tokenizer()}


def _tokenizers(folder: Path, index: dict) -> dict:
    """The folder's own tokenizers when it ships them (a workspace or hub-cache pipeline), else stand-ins."""
    slots = {s: index[s][:2] for s in ("tokenizer", "tokenizer_2", "tokenizer_3") if (index.get(s) or [None])[0]}
    if all((folder / s).is_dir() for s in slots):
        return {s: _class(*lib_cls).from_pretrained(folder / s) for s, lib_cls in slots.items()}
    return _stand_in_tokenizers()


def _frozen(*models) -> None:
    for m in models:
        if m is not None:
            m.eval().requires_grad_(False)


def foundation(cfg: Config, source: Source, dtype: torch.dtype, with_t5: bool = True):
    """The SD3 pipeline (backbone, VAE, CLIP-L/G, T5 when the folder ships one and ``with_t5``) as
    pipeline.models.world.load_foundation returns it, in ``dtype``."""
    from diffusers import StableDiffusion3Pipeline

    if source.how == "params":
        return _tiny_foundation(cfg, dtype)
    index = json.loads((source.path / "model_index.json").read_text())
    tokenizers = _tokenizers(source.path, index)
    parts = {}
    with default_dtype(dtype):
        for slot in ("transformer", "vae", "text_encoder", "text_encoder_2", T5_SLOT):
            library, cls_name = (index.get(slot) or [None, None])[:2]
            wanted = slot != T5_SLOT or with_t5
            parts[slot] = _component(source.path / slot, library, cls_name) if (cls_name and wanted) else None
    scheduler_cls = _class(*index["scheduler"][:2])
    scheduler = scheduler_cls.from_config(scheduler_cls.load_config(source.path / "scheduler"))
    _frozen(*parts.values())
    if parts[T5_SLOT] is None:
        tokenizers = {**tokenizers, "tokenizer_3": None}
    return StableDiffusion3Pipeline(scheduler=scheduler, **tokenizers, **parts)


def _tiny_foundation(cfg: Config, dtype: torch.dtype):
    """The embedded world's pipeline, from the params (pipeline.models.world), with a tokenizer trained on the
    stand-ins' prompt corpus (its vocabulary is at most text.vocab_size, as the foundation stage's)."""
    import pandas as pd

    from pipeline.foundation.text import build_text_components
    from pipeline.models.standins import CORPUS
    from pipeline.models.world import build_backbone, build_scheduler, build_vae, text_pipeline

    with default_dtype(dtype):
        vae = build_vae(cfg)
        comps = build_text_components(cfg, pd.DataFrame({"local_prompt": CORPUS}))
        pipe = text_pipeline({**comps, "transformer": build_backbone(cfg, vae), "vae": vae,
                              "scheduler": build_scheduler(cfg)})
    _frozen(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    return pipe


def teacher(cfg: Config, source: Source, dtype: torch.dtype, backbone=None):
    """The frozen teacher ControlNet as pipeline.models.world.load_controlnet returns it (the embedded
    world's: pipeline.models.student.controlnet_from_backbone over ``backbone``, as the teacher stage starts)."""
    from diffusers import SD3ControlNetModel

    from pipeline.models.condition import extra_conditioning_channels
    from pipeline.models.student import controlnet_from_backbone

    with default_dtype(dtype):
        if source.how == "params":
            model = controlnet_from_backbone(backbone, cfg.teacher.num_layers, cfg.condition)
        else:
            extra = extra_conditioning_channels(cfg.condition)
            model = SD3ControlNetModel.from_config(SD3ControlNetModel.load_config(source.path),
                                                   extra_conditioning_channels=extra)
    _frozen(model)
    return model


def captioner(cfg: Config, source: Source):
    """(Qwen2_5_VLForConditionalGeneration in caption.qwen.dtype, its processor). The processor is
    pipeline.captions.qwen.load_processor's: over the model's folder when it holds a tokenizer, else over the
    stand-in's (pipeline.models.standins.build_qwen: Qwen's special tokens and chat template, a small BPE
    vocabulary) with the image processor of the folder's preprocessor_config.json, and the model's
    special-token ids pointed at the stand-in's (ids change no shape)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pipeline.captions.qwen import load_processor

    own = (source.path / "tokenizer_config.json").exists()
    processor = load_processor(str(source.path)) if own else _stand_in_processor(source.path)
    with default_dtype(getattr(torch, cfg.caption.qwen.dtype)):
        config = _config(source.path)
        if not own:
            for key, token in QWEN_TOKEN_IDS.items():
                setattr(config, key, processor.tokenizer.convert_tokens_to_ids(token))
        model = Qwen2_5_VLForConditionalGeneration(config)
    _frozen(model)
    return model, processor


@functools.cache
def _stand_in_processor(folder: Path):
    from torch.utils._python_dispatch import _disable_current_modes
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from pipeline.captions.qwen import load_processor
    from pipeline.models.standins import build_qwen

    with tempfile.TemporaryDirectory() as tmp, _disable_current_modes():  # builds and saves a real tiny model
        processor = load_processor(str(build_qwen(Path(tmp) / "qwen")))
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    keys = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
            "image_std")
    processor.image_processor = Qwen2VLImageProcessorPil(**{k: pre[k] for k in keys if k in pre})
    return processor
