"""params.yaml -> a typed, validated config: the schema of every section, in one place.

Values live in params.yaml alone (it is fully specified; the schema has no defaults that change an
output), so `dvc params diff` shows every setting and each DVC stage depends on the dotted keys it
reads. Profiles (configs/NAME.yaml) are deep-merged overrides of params.yaml; `pipeline.profile`
applies them. Everything is validated at load, before any stage writes: a wrong value names its
dotted key (``data.image_size: Input should be greater than 0``), an unknown key names the closest
known one (``ablatoins: unknown key; did you mean 'ablations'?``).

    python -m pipeline.config [FILE]     # validate FILE (default params.yaml) and print it resolved
"""

from __future__ import annotations

import copy
import difflib
import re
import sys
import typing
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
# The splits of the distillation data (triplets). The synthetic generator also renders WORLD_SPLIT: the
# tiny world's own "pretraining" data (VAE, backbone, teacher), disjoint from all of these, as the data
# Stability and alimama trained on is disjoint from a user's.
SPLITS = ("labelled", "unlabelled", "val", "test")
WORLD_SPLIT = "world"
SHA = re.compile(r"^[0-9a-f]{40}$")


class ConfigError(ValueError):
    """A params file that does not validate; the message names file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


# ------------------------------------------------------------------------------------------- data

class Splits(_Strict):
    labelled: int = Field(..., ge=1, description="stage-1 pool: image, mask, local prompt")
    unlabelled: int = Field(..., ge=1, description="stage-2 pool: image and mask, no prompt")
    val: int = Field(..., ge=1, description="gates and tuning")
    test: int = Field(..., ge=1, description="reported numbers only")
    world: int = Field(..., ge=1, description="trains the tiny world's VAE, backbone and teacher only")


class DataConfig(_Strict):
    image_size: int = Field(..., ge=16, le=2048)
    min_objects: int = Field(..., ge=1)
    max_objects: int = Field(..., ge=1)
    min_object_size: float = Field(..., gt=0, le=1, description="object size as a fraction of the image side")
    max_object_size: float = Field(..., gt=0, le=1)
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    backgrounds: tuple[str, ...]
    splits: Splits
    random_mask_fraction: float = Field(..., ge=0, le=1, description="masks drawn as boxes/strokes, not objects")
    num_workers: int = Field(0, ge=0, description="data loader workers (no effect on outputs)")

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


class TripletsConfig(_Strict):
    """build_triplets: the synthetic scenes, a user manifest, or image/mask folders."""
    source: Literal["synthetic", "manifest", "folders"]
    manifest: str | None = Field(..., description="user manifest (csv/parquet/jsonl) for source=manifest")
    image_dir: str | None
    mask_dir: str | None
    default_split: Literal["labelled", "unlabelled", "val", "test"]
    mask_kinds: tuple[Literal["stroke", "box"], ...]
    mask_seed: int
    resize: Literal["center_crop", "stretch"]
    on_bad: Literal["fail", "skip"]
    report_rows: int = Field(10, ge=1, description="bad rows listed in the failure message")


class QwenConfig(_Strict):
    model: str = Field(..., description="local path or hub id")
    revision: str | None
    local_template: str
    global_template: str
    batch_size: int = Field(..., ge=1)
    max_new_tokens: int = Field(..., ge=1)
    vlm_image_size: int = Field(..., ge=28, description="crop/overlay/image side given to the VLM")
    crop_padding: float = Field(..., ge=0, le=1, description="crop margin around the hole's bbox")
    overlay_color: tuple[int, int, int]
    overlay_alpha: float = Field(..., ge=0, le=1)
    dtype: Literal["float32", "bfloat16", "float16"]
    device: str = Field(..., pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="resolved by pipeline/runtime.py")
    cache_dir: str


class PseudoLabellerConfig(_Strict):
    """pipeline/captions/pseudo_labeller.py: a small CNN, image + mask -> background and objects, trained on
    the labelled split's annotations; it captions the unlabelled split in Qwen2.5-VL's role."""
    image_size: int = Field(..., ge=8, description="side the images and masks are read at (resized)")
    channels: tuple[int, ...] = Field(..., min_length=1, description="conv widths; each after the first halves the side")
    epochs: int = Field(..., ge=1)
    batch_size: int = Field(..., ge=1, description="labelled rows per step (each read locally and globally)")
    lr: float = Field(..., gt=0)
    weight_decay: float = Field(..., ge=0)
    device: str = Field(..., pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="resolved by pipeline/runtime.py")
    min_exact_match: float | None = Field(..., ge=0, le=1,
                                          description="val local-prompt exact match the stage requires; null: report only")


# Backends that write prompts from the ground truth: never for the unlabelled split (stage 2's premise).
ANNOTATION_BACKENDS = ("annotations", "caption_noise")


class CaptionConfig(_Strict):
    backend: Literal["annotations", "caption_noise", "qwen2_5_vl"] = Field(
        ..., description="labelled, val and test splits")
    unlabelled_backend: str = Field(..., description="the unlabelled split: pseudo_labeller | qwen2_5_vl")
    noise_fraction: float = Field(..., ge=0, le=1, description="caption_noise: share of wrong local prompts")
    noise_seed: int
    qwen: QwenConfig
    pseudo_labeller: PseudoLabellerConfig

    @model_validator(mode="after")
    def _check(self):
        if self.unlabelled_backend in ANNOTATION_BACKENDS:
            raise ValueError(f"caption.unlabelled_backend: {self.unlabelled_backend!r} reads the ground-truth "
                             "annotations, which the unlabelled split must not see; use pseudo_labeller or qwen2_5_vl")
        if self.unlabelled_backend not in ("pseudo_labeller", "qwen2_5_vl"):
            raise ValueError(f"caption.unlabelled_backend: unknown {self.unlabelled_backend!r}; "
                             "allowed: pseudo_labeller, qwen2_5_vl")
        return self


class GatesConfig(_Strict):
    """Great Expectations gates (pipeline/validation); they write to pipeline.paths.GATES. Every prompt must
    also be printable text (pipeline.validation.gates.caption_problem: any script, quotes and punctuation;
    no control or format characters, line breaks, undecodable bytes or blank prompts)."""
    mask_fraction_min: float = Field(..., ge=0, le=1)
    mask_fraction_max: float = Field(..., ge=0, le=1)
    caption_min_chars: int = Field(..., ge=1)
    caption_max_chars: int = Field(..., ge=1)
    require_global: bool


# ------------------------------------------------------------------------------------------ world

class ModelRef(_Strict):
    repo: str = Field(..., description="hub repo id, e.g. stabilityai/stable-diffusion-3-medium-diffusers")
    revision: str | None = Field(..., description="commit sha (pin it) or branch; null = main")
    local_dir: str | None = Field(..., description="a folder in the repo's layout; used before the hub cache")


class WorldConfig(_Strict):
    source: Literal["embedded", "pretrained"]
    foundation: ModelRef | None = Field(..., description="pretrained: the SD3 pipeline (backbone, VAE, text)")
    teacher: ModelRef | None = Field(..., description="pretrained: the 23-layer inpainting ControlNet")
    cache_dir: str | None = Field(..., description="hub cache; null = HF_HUB_CACHE / HF_HOME/hub default")
    allow_download: bool = Field(..., description="download what the cache lacks (needs network)")
    require_t5: bool = Field(..., description="the foundation must ship text_encoder_3 / tokenizer_3")
    require_pinned: bool = Field(..., description="fail unless every revision is a 40-hex commit sha")
    link: Literal["symlink", "hardlink", "copy"] = Field(
        ..., description="how models/* are materialised from the resolved files (no effect on values)")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        ..., description="dtype of the frozen models (VAE, text encoders, backbone, teacher) on an accelerator; "
                         "runtime.cpu_dtype on the CPU (pipeline/runtime.py)")

    @model_validator(mode="after")
    def _check(self):
        if self.source == "pretrained":
            missing = [k for k in ("foundation", "teacher") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"world.{missing[0]}: required when world.source is 'pretrained'")
            if self.require_pinned:
                for k in ("foundation", "teacher"):
                    rev = getattr(self, k).revision
                    if not (rev and SHA.match(rev)):
                        raise ValueError(f"world.{k}.revision: {rev!r} is not a commit sha "
                                         "(world.require_pinned is true)")
        return self


class RuntimeConfig(_Strict):
    """pipeline/runtime.py: where models run and in what micro-batches (every stage that runs a model)."""
    device: str = Field(..., pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                        description="auto (the accelerator when present) | cpu | cuda[:i] | mps")
    cpu_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        ..., description="frozen models' dtype on the CPU (world.dtype applies on accelerators)")
    encode_batch_size: int = Field(..., ge=1, description="rows per VAE / text-encoder call in encode")
    sample_batch_size: int = Field(..., ge=1, description="images per denoising loop in the sampler "
                                                          "(memory only; each image's noise is seed + its index)")
    vae_slicing: bool = Field(..., description="VAE one image at a time (same values, less memory)")
    vae_tiling: bool = Field(..., description="VAE in tiles above its sample size (values change slightly)")


class TextConfig(_Strict):
    vocab_size: int = Field(..., ge=300, description="BPE vocabulary trained on the prompt corpus")
    tokenizer_max_length: int = Field(..., ge=4, le=77)
    # Rows of T5 embeddings that SD3's encode_prompt appends (zeros when text_encoder_3 is None).
    # Users of the stock pipeline must pass the same value: pipe(..., max_sequence_length=N).
    max_sequence_length: int = Field(..., ge=1, le=512)
    hidden_size: int = Field(..., ge=8)
    projection_dim: int = Field(..., ge=8)
    num_hidden_layers: int = Field(..., ge=1)
    num_attention_heads: int = Field(..., ge=1)


class TrainLoop(_Strict):
    steps: int = Field(..., ge=1)
    batch_size: int = Field(..., ge=1)
    lr: float = Field(..., gt=0)
    warmup_steps: int = Field(..., ge=0)
    weight_decay: float = Field(..., ge=0)
    max_grad_norm: float = Field(..., gt=0)


class VaeConfig(_Strict):
    block_out_channels: tuple[int, ...]
    layers_per_block: int = Field(..., ge=1)
    train: TrainLoop


class BackboneConfig(_Strict):
    num_layers: int = Field(..., ge=2)
    num_attention_heads: int = Field(..., ge=1)
    attention_head_dim: int = Field(..., ge=4)
    patch_size: int = Field(..., ge=1)
    prompt_dropout: float = Field(..., ge=0, lt=1, description="empty prompts, for classifier-free guidance")
    train: TrainLoop


class TeacherConfig(_Strict):
    num_layers: int = Field(..., ge=1)
    prompt_dropout: float = Field(..., ge=0, lt=1)
    # validate_teacher: whole-image PSNR gain (dB) over the backbone alone that the teacher must reach;
    # null = report only (the smoke profile, whose teacher trains for a few steps).
    gate_min_gain_db: float | None
    train: TrainLoop


class SchedulerConfig(_Strict):
    shift: float = Field(..., gt=0)
    weighting_scheme: Literal["logit_normal", "sigma_sqrt", "mode", "cosmap", "none"]
    logit_mean: float
    logit_std: float = Field(..., gt=0)
    mode_scale: float


# ---------------------------------------------------------------------------------------- distill

class LossWeights(_Strict):
    task: float = Field(..., ge=0)
    distill: float = Field(..., ge=0)
    af: float = Field(..., ge=0)


class StageConfig(_Strict):
    train: TrainLoop
    loss: LossWeights
    prompt: Literal["local", "global"]


class Stage2Config(StageConfig):
    # Two readings of the paper's stage 2. image: noise the unlabelled image's latent (the forward process;
    # the image's content reaches the student only through the noisy latent). teacher: points on the
    # teacher's own sampling trajectory from pure noise given the masked image and the pseudo prompt
    # (data/trajectories, params `trajectories`): nothing of the hole's content is used.
    noisy: Literal["image", "teacher"]


class TrajectoriesConfig(_Strict):
    """The `trajectories` stage: the teacher samples each unlabelled row from noise (the evaluation sampler)
    and keeps ``points_per_image`` of its intermediate latents (x_t, t), for stage 2 with noisy: teacher."""
    num_inference_steps: int = Field(..., ge=1)
    points_per_image: int = Field(..., ge=1, description="(x_t, t) kept per row: disk ~ this x the latents")
    guidance_scale: float = Field(..., ge=0)
    conditioning_scale: float = Field(..., ge=0)
    seed: int


class DistillConfig(_Strict):
    student_layers: int = Field(..., ge=1)
    alpha: float = Field(..., ge=0, le=1, description="L_task weight inside the hole; 1-alpha outside")
    # Both stages: a sample's prompt is replaced by the empty prompt's embedding ("" through the stock
    # pipeline's encode_prompt, its negative prompt) for teacher and student alike, so the student also
    # learns the teacher's unconditional prediction that classifier-free guidance needs.
    prompt_dropout: float = Field(..., ge=0, lt=1, description="share of samples trained on the empty prompt")
    stage1: StageConfig
    stage2: Stage2Config
    gradient_accumulation_steps: int = Field(..., ge=1)
    # fp32, not accelerate's "no": `dvc exp run -S` rewrites params.yaml unquoted and YAML reads no as false.
    mixed_precision: Literal["fp32", "bf16", "fp16"]
    gradient_checkpointing: bool
    optimizer: Literal["adamw", "adamw8bit"] = Field(..., description="adamw8bit: bitsandbytes' AdamW8bit (CUDA)")
    ema_decay: float | None = Field(..., gt=0, lt=1)
    checkpoint_every: int = Field(..., ge=1)
    keep_checkpoints: int = Field(..., ge=1)
    # torch.compile (inductor) of the student's, backbone's and teacher's forwards in DistillLoss: wrappers
    # that share the modules' parameters, so the Loop keys, checkpoints and saves the original student.
    # metrics/step_benchmark.json says whether it pays (compile time is paid again in every process).
    compile: bool = Field(..., description="torch.compile the forwards DistillLoss runs (same results)")

    @model_validator(mode="after")
    def _check(self):
        if self.stage2.loss.task != 0:
            raise ValueError("distill.stage2.loss.task: stage 2 has no ground truth; it must be 0")
        return self

    @property
    def accelerate_precision(self) -> str:
        """accelerate's name for ``mixed_precision``."""
        return "no" if self.mixed_precision == "fp32" else self.mixed_precision


# ------------------------------------------------------------------------------ evaluation, study

class EvaluateConfig(_Strict):
    """The evaluate stage, the teacher gate and the ablations: sampling settings and optional metrics."""
    num_images: int | None = Field(..., ge=1, description="first N test images; null = the whole test split")
    num_inference_steps: int = Field(..., ge=1)
    guidance_scale: float = Field(..., ge=0)
    conditioning_scale: float = Field(..., ge=0)
    seed: int = Field(..., description="image i of the split starts from the noise of seed + i")
    num_samples: int = Field(..., ge=0, description="test images saved as PNGs for the report's sample grid")
    lpips_weights: str | None = Field(..., description="TORCH_HOME holding torchvision's backbone weights "
                                                       "(hub/checkpoints/*.pth); needs torchvision")
    lpips_net: str
    fid_weights: str | None = Field(..., description="InceptionV3 FID weights file (pt_inception-2015-12-05); "
                                                     "needs torch-fidelity")
    cmmd_weights: str | None = Field(..., description="a local CLIP model folder (CLIPVisionModelWithProjection)")


class EncodeBenchmarkConfig(_Strict):
    steps: int = Field(..., ge=1, description="timed training steps per arm and round")
    batch_size: int = Field(..., ge=1)
    repeats: int = Field(..., ge=1, description="alternating rounds; the median rate is reported")
    warmup_steps: int = Field(..., ge=0, description="untimed steps per arm before the rounds")


class MemoryBenchmarkConfig(_Strict):
    """pipeline/memory_benchmark.py: peak RSS of encode and stage-1 distillation at N and factor x N rows."""
    rows: int = Field(..., ge=1, description="N (the labelled triplets repeated as needed)")
    factor: int = Field(..., ge=2)
    steps: int = Field(..., ge=1, description="stage-1 steps per run")
    batch_size: int = Field(..., ge=1, description="stage-1 batch size")
    max_ratio: float = Field(..., gt=1, description="the stage fails when peak RSS grows more than this")


class StepBenchmarkConfig(_Strict):
    """pipeline/evaluation/step_benchmark.py: one distillation step vs one plain ControlNet training step
    (time, FLOPs, GFLOP/s against a matmul ceiling), and torch.compile of the distillation step."""
    batch_size: int = Field(..., ge=1)
    warmup: int = Field(..., ge=0, description="untimed steps per arm before the timed rounds")
    repeats: int = Field(..., ge=1, description="alternating rounds, one step per arm each; medians reported")
    threads: int | None = Field(..., ge=1, description="torch.set_num_threads; null keeps the default")
    compile: list[Literal["student", "backbone", "teacher"]] = Field(
        ..., description="modules the compiled arm torch.compiles (distill.compile: all three); [] = no arm")


class BenchmarkConfig(_Strict):
    batch_size: int = Field(..., ge=1)
    warmup: int = Field(..., ge=0)
    repeats: int = Field(..., ge=1)
    timestep: float = Field(..., ge=0, le=1000)
    extra_layers: list[int] = Field(..., description="untrained student depths measured too")
    threads: int | None = Field(..., ge=1, description="torch.set_num_threads; null keeps the default")


class Variant(_Strict):
    two_stage: bool
    overrides: dict = Field(..., description="params deep-merged over the ablation budget")


class AblationConfig(_Strict):
    """The ablation study (pipeline/distill/ablation.py); the variants are defined here only. Every variant
    trains at the headline student's budget (distill.*): same steps, batch and warm-up."""
    headline: list[str] = Field(..., description="variants run at every headline seed; `full` is the reference")
    headline_seeds: list[int]
    others: list[str] = Field(..., description="variants run at `seeds`")
    seeds: list[int] = Field(..., description="a subset of headline_seeds (ablate_stage1 runs at those)")
    variants: dict[str, Variant]

    @model_validator(mode="after")
    def _check(self):
        unknown = [v for v in (*self.headline, *self.others) if v not in self.variants]
        if unknown:
            raise ValueError(f"ablations: unknown variants {unknown}; defined: {sorted(self.variants)}")
        if "full" not in self.headline:
            raise ValueError("ablations.headline: must hold `full`, the reference every variant is compared with")
        both = set(self.headline) & set(self.others)
        if both:
            raise ValueError(f"ablations: variants {sorted(both)} are in both headline and others "
                             "(one DVC stage each)")
        extra = sorted(set(self.seeds) - set(self.headline_seeds))
        if extra:
            raise ValueError(f"ablations.seeds: {extra} not in ablations.headline_seeds {self.headline_seeds}: "
                             "every run at ablations.seeds starts from full's stage 1 at its seed, which the "
                             "ablate_stage1 stage trains at ablations.headline_seeds only")
        return self

    def runs(self) -> list[tuple[str, int]]:
        """Every (variant, seed) the two matrix stages run, headline first."""
        return ([(v, s) for v in self.headline for s in self.headline_seeds]
                + [(v, s) for v in self.others for s in self.seeds])


class ReportConfig(_Strict):
    loss_stages: list[str] = Field(..., description="dvclive/<stage> loss curves plotted")
    title: str


# ----------------------------------------------------------------------------------- orchestration

class FlowSettings(_Strict):
    """How the Prefect flows run the DVC stages (no effect on any output)."""
    retries: int = Field(1, ge=0, description="retries of a stage after a transient failure")
    jobs: int | None = Field(None, ge=1, description="threads for stages run side by side (null = CPUs; 1 = one "
                             "stage at a time through dvc repro)")
    retry_delay_seconds: float = Field(10, ge=0)
    no_retry_stages: list[str] = Field(["validate*"], description="globs: failures here are never retried")
    dask_address: str | None = Field(None, description="a dask.distributed scheduler the flows run independent "
                                      "stages on; null = this machine's threads (jobs)")


class LaunchConfig(_Strict):
    """pipeline/launch.py: the processes that run each model stage, one per accelerator (torchrun). No effect
    on any output, so no stage depends on it. REFINE_LAUNCH_<KEY> in the environment overrides a key."""
    processes: int = Field(1, ge=1, description="processes per machine, one per GPU (torchrun --nproc_per_node); "
                                                "1 x 1 machine starts no launcher")
    machines: int = Field(1, ge=1, description="machines that run each model stage together (--nnodes)")
    machine_rank: int = Field(0, ge=0, description="this machine's index (--node_rank): set it per machine, "
                                                   "REFINE_LAUNCH_MACHINE_RANK")
    main_address: str = Field("127.0.0.1", min_length=1,
                              description="machine 0's address, reachable from every machine (--master_addr)")
    main_port: int = Field(29500, ge=1, le=65535, description="a free port on machine 0 (--master_port)")

    @model_validator(mode="after")
    def _check(self):
        if self.machine_rank >= self.machines:
            raise ValueError(f"launch.machine_rank: {self.machine_rank} is not below launch.machines ({self.machines})")
        return self

    @property
    def world_size(self) -> int:
        return self.processes * self.machines


class Config(_Strict):
    seed: int
    condition: Literal["inpaint", "edges"] = Field(..., description=(
        "the spatial condition (pipeline/models/condition.py): inpaint = masked image + mask channel "
        "(SD3 inpainting ControlNet); edges = Sobel edge map of the image, no mask channel"))
    data: DataConfig
    world: WorldConfig
    runtime: RuntimeConfig
    triplets: TripletsConfig
    caption: CaptionConfig
    gates: GatesConfig
    text: TextConfig
    scheduler: SchedulerConfig
    vae: VaeConfig
    backbone: BackboneConfig
    teacher: TeacherConfig
    distill: DistillConfig
    evaluate: EvaluateConfig
    trajectories: TrajectoriesConfig
    encode_benchmark: EncodeBenchmarkConfig
    memory_benchmark: MemoryBenchmarkConfig
    step_benchmark: StepBenchmarkConfig
    flows: FlowSettings
    launch: LaunchConfig = Field(default_factory=LaunchConfig)  # a params file without it: one process
    ablations: AblationConfig
    benchmark: BenchmarkConfig
    report: ReportConfig

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


# --------------------------------------------------------------------------------------- loading

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


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``loc`` (for 'did you mean' hints)."""
    for part in loc:
        if isinstance(part, int) or model is None:
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann, model = field.annotation, None
        for cand in (ann, *typing.get_args(ann)):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
    return model


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        parent = _model_at(Config, loc[:-1])
        known = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
        hint = f"did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else \
            f"known keys here: {', '.join(known)}"
        return f"{key}: unknown key; {hint}"
    if err["type"] == "missing":
        return f"{key}: missing (params.yaml sets every key; copy it from the repository's params.yaml)"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}: {msg}" if key and not msg.startswith(key) else msg


def from_dict(raw: dict, source: str = "<params>") -> Config:
    """Validate a whole params mapping, including every ablation variant's merged params."""
    try:
        cfg = Config(**(raw or {}))
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{source}: invalid params:\n  " + "\n  ".join(lines)) from None
    for name, variant in cfg.ablations.variants.items():
        try:
            Config(**deep_merge(raw, variant.overrides))
        except ValidationError as exc:
            lines = [_describe(e) for e in exc.errors()]
            raise ConfigError(f"{source}: ablations.variants.{name}.overrides give invalid params:\n  "
                              + "\n  ".join(lines)) from None
    return cfg


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


def section(cfg: Config, name: str, model: type[BaseModel] | None = None) -> BaseModel:
    """The validated section ``name`` (kept for callers that still name the section)."""
    return getattr(cfg, name)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "params.yaml"
    try:
        cfg = load(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=110), end="")
    print(f"# {path}: valid", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
