"""params.yaml -> a typed, validated config: the one place that knows every key and its default.

Profiles (configs/NAME.yaml) are deep-merged overrides of params.yaml; `pipeline.profile` applies them.
Validation errors name the dotted key, e.g. ``data.image_size: Input should be greater than 0``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "gradient")


class ConfigError(ValueError):
    """A params file that does not validate; the message names file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Splits(_Strict):
    labelled: int = Field(2048, ge=1, description="stage-1 pool: image, mask, local prompt")
    unlabelled: int = Field(2048, ge=1, description="stage-2 pool: image and mask, no prompt")
    val: int = Field(128, ge=1)
    test: int = Field(256, ge=1)


class DataConfig(_Strict):
    image_size: int = Field(32, ge=16, le=2048)
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(4, ge=1)
    min_object_size: float = Field(0.25, gt=0, le=1, description="object size as a fraction of the image side")
    max_object_size: float = Field(0.5, gt=0, le=1)
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    splits: Splits = Splits()
    # Fraction of training masks drawn as random boxes/strokes rather than object masks.
    random_mask_fraction: float = Field(0.3, ge=0, le=1)
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self):
        for key, values, allowed in (
            ("shapes", self.shapes, SHAPES),
            ("colors", self.colors, tuple(COLORS)),
            ("backgrounds", self.backgrounds, BACKGROUNDS),
        ):
            if not values:
                raise ValueError(f"data.{key}: must not be empty")
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ValueError(f"data.{key}: unknown {unknown}; allowed: {list(allowed)}")
        if self.min_objects > self.max_objects:
            raise ValueError(f"data.min_objects ({self.min_objects}) > data.max_objects ({self.max_objects})")
        if self.min_object_size > self.max_object_size:
            raise ValueError("data.min_object_size > data.max_object_size")
        # An object must keep at least a few pixels of its own once others are drawn over it.
        side = max(3, round(self.min_object_size * self.image_size))
        if self.max_objects * side * side > 2 * self.image_size**2:
            raise ValueError(
                f"data.max_objects: {self.max_objects} objects of at least {side}px do not fit "
                f"in a {self.image_size}px image"
            )
        return self


class TextConfig(_Strict):
    vocab_size: int = Field(512, ge=300, description="BPE vocabulary trained on the prompt corpus")
    tokenizer_max_length: int = Field(24, ge=4, le=77)
    # Rows of T5 embeddings that SD3's encode_prompt appends (zeros when text_encoder_3 is None).
    # Users of the stock pipeline must pass the same value: pipe(..., max_sequence_length=N).
    max_sequence_length: int = Field(8, ge=1, le=512)
    hidden_size: int = Field(32, ge=8)
    projection_dim: int = Field(32, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(2, ge=1)


class TrainLoop(_Strict):
    steps: int = Field(..., ge=1)
    batch_size: int = Field(..., ge=1)
    lr: float = Field(..., gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)


class VaeConfig(_Strict):
    block_out_channels: tuple[int, ...] = (32, 32)
    layers_per_block: int = Field(1, ge=1)
    train: TrainLoop = TrainLoop(steps=500, batch_size=32, lr=1e-3, warmup_steps=20)


class BackboneConfig(_Strict):
    num_layers: int = Field(24, ge=2)
    num_attention_heads: int = Field(2, ge=1)
    attention_head_dim: int = Field(32, ge=4)
    patch_size: int = Field(2, ge=1)
    prompt_dropout: float = Field(0.1, ge=0, lt=1, description="empty prompts, for classifier-free guidance")
    train: TrainLoop = TrainLoop(steps=600, batch_size=32, lr=5e-4, warmup_steps=50)


class TeacherConfig(_Strict):
    num_layers: int = Field(23, ge=1)
    prompt_dropout: float = Field(0.1, ge=0, lt=1)
    # teacher_gate: whole-image PSNR gain (dB) over the backbone alone that the teacher must reach;
    # null = report only (the smoke profile, whose teacher trains for a few steps).
    gate_min_gain_db: float | None = 1.0
    train: TrainLoop = TrainLoop(steps=600, batch_size=32, lr=5e-4, warmup_steps=50)


class SchedulerConfig(_Strict):
    shift: float = Field(3.0, gt=0)
    weighting_scheme: Literal["logit_normal", "sigma_sqrt", "mode", "cosmap", "none"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29


class LossWeights(_Strict):
    task: float = Field(1.0, ge=0)
    distill: float = Field(1.0, ge=0)
    af: float = Field(1.0, ge=0)


class StageConfig(_Strict):
    train: TrainLoop
    loss: LossWeights = LossWeights()
    prompt: Literal["local", "global"] = "local"


class DistillConfig(_Strict):
    student_layers: int = Field(12, ge=1)
    alpha: float = Field(0.975, ge=0, le=1, description="L_task weight inside the hole; 1-alpha outside")
    stage1: StageConfig = StageConfig(train=TrainLoop(steps=300, batch_size=32, lr=3e-4, warmup_steps=20))
    stage2: StageConfig = StageConfig(
        train=TrainLoop(steps=200, batch_size=32, lr=1e-4, warmup_steps=10), loss=LossWeights(task=0.0)
    )
    gradient_accumulation_steps: int = Field(1, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit: bitsandbytes' AdamW8bit (CUDA)")
    ema_decay: float | None = Field(None, gt=0, lt=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.stage2.loss.task != 0:
            raise ValueError("distill.stage2.loss.task: stage 2 has no ground truth; it must be 0")
        return self


class EvaluateConfig(_Strict):
    num_images: int = Field(64, ge=1, description="test images evaluated (first N of the test split)")
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(1.0, ge=0)
    conditioning_scale: float = Field(1.0, ge=0)
    seed: int = 1234
    batch_size: int = Field(32, ge=1)


class Config(_Strict):
    seed: int = 0
    data: DataConfig = DataConfig()
    text: TextConfig = TextConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    vae: VaeConfig = VaeConfig()
    backbone: BackboneConfig = BackboneConfig()
    teacher: TeacherConfig = TeacherConfig()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    extra: dict[str, Any] = Field(default_factory=dict, description="sections owned by other modules")

    @model_validator(mode="after")
    def _check(self):
        if self.teacher.num_layers > self.backbone.num_layers:
            raise ValueError("teacher.num_layers: deeper than backbone.num_layers")
        if self.distill.student_layers > self.backbone.num_layers:
            raise ValueError(
                f"distill.student_layers: {self.distill.student_layers} is deeper than the backbone "
                f"({self.backbone.num_layers} blocks)"
            )
        if self.data.image_size % (2 ** (len(self.vae.block_out_channels) - 1) * self.backbone.patch_size):
            raise ValueError("data.image_size: must be divisible by the VAE downsampling times the patch size")
        return self


_OWN_KEYS = set(Config.model_fields) - {"extra"}


def merge_into(doc: Any, override: dict) -> None:
    """Deep-merge ``override`` into the mapping ``doc`` in place: nested mappings are merged key by key,
    anything else is replaced (a ruamel document keeps its comments and key order)."""
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            merge_into(doc[key], value)
        else:
            doc[key] = value


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` deep-merged over a copy of ``base`` (neither is changed)."""
    out = copy.deepcopy(base)
    merge_into(out, copy.deepcopy(override))
    return out


def from_dict(raw: dict, source: str = "<params>") -> Config:
    raw = dict(raw or {})
    extra = {k: raw.pop(k) for k in list(raw) if k not in _OWN_KEYS}
    try:
        return Config(**raw, extra=extra)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg}" if key and not msg.startswith(key) else msg)
        raise ConfigError(f"{source}: invalid params:\n  " + "\n  ".join(lines)) from None


def load_raw(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load(path: str | Path = "params.yaml") -> Config:
    return from_dict(load_raw(path), str(path))


def section(cfg: Config, name: str, model: type[BaseModel]) -> BaseModel:
    """Validate a section that a module owns (``cfg.extra[name]``) against that module's pydantic model."""
    try:
        return model(**(cfg.extra.get(name) or {}))
    except ValidationError as exc:
        lines = [f"{name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                 for e in exc.errors()]
        raise ConfigError("invalid params:\n  " + "\n  ".join(lines)) from None
