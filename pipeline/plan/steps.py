"""One traced call of each model stage's own code, at a given micro-batch, on fake tensors.

Every function here runs inside pipeline.plan.trace.fake_world (or, given ``count=measure``, on real
tensors outside it), builds its models afresh (pipeline.plan.models) as the stage's process loads them,
then traces exactly one call of the stage's code (pipeline.plan.trace.trace):

- ``encode_call``: pipeline.data.encode.encode_rows on ``runtime.encode_batch_size`` rows: the VAE and the
  text encoders (T5 included) of the pipeline the encode stage loads. Its file reads (read_images /
  read_masks) are replaced by fake pixels of the same shape; its output row shapes are what the distill
  trace reads.
- ``distill_call``: one micro-batch of pipeline.training.train_step with the distill stage's student,
  DistillLoss (pipeline.distill.trainer.student_and_loss), optimizer (make_optimizer), EMA (diffusers'
  EMAModel) and accelerate settings, after the Loop's own freezing of unused parameters. It is the last
  micro-batch of an optimizer step in steady state: the optimizer state exists (one step on zero gradients
  creates it, as AdamW does at its first step), and with gradient accumulation the earlier micro-batches'
  gradients are held, so this call clips, steps the optimizer and the EMA.
- ``sample_call``: pipeline.evaluation.sampler.inpaint_images, the denoising loop of evaluate and
  trajectories, with ``steps`` steps (prompt encoding, control encoding, CFG steps, decoding).
- ``caption_call``: pipeline.captions.qwen.QwenCaptioner.caption_batch on ``caption.qwen.batch_size`` rows
  (PNG files written for it), with max_new_tokens 1: transformers' generate stops on a fake tensor's
  ``.item()`` after its first token (pipeline.plan.trace.FAKE_SCALAR), so the trace is the prefill, where
  memory peaks; the other decoding steps are costed by pipeline.plan.cost.

The traces run on the CPU device with the runtime policy's accelerator dtype (``plan_config``): the
frozen models in ``world.dtype``, autocast as ``distill.mixed_precision`` says.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import numpy as np
import torch

from pipeline.config import Config, deep_merge, from_dict
from pipeline.plan import models
from pipeline.plan.trace import Trace, module_tensors, trace

Counter = Callable[..., Trace]  # pipeline.plan.trace.trace (fake tensors) or .measure (real ones)

PROMPT = "a red circle"  # tokenizers pad to a fixed length: any prompt costs the same


@dataclass
class Call:
    """A traced call: the stage, what ran, its micro-batch, the trace, weight bytes per resident model."""

    stage: str
    code: str
    batch: int
    trace: Trace
    weights: dict[str, int] = field(default_factory=dict)
    rows: dict = field(default_factory=dict)  # encode: {key: (dtype, row shape)} of its output
    step_flops: int = 0  # sample: the FLOPs of one denoising step (the backbone's and ControlNet's modules)


def plan_config(cfg: Config) -> Config:
    """``cfg`` with the runtime policy's accelerator choices applied on the CPU the traces run on: device
    cpu and ``runtime.cpu_dtype = world.dtype`` (so pipeline.runtime gives the frozen models the GPU's
    dtype)."""
    return from_dict(deep_merge(cfg.model_dump(mode="json"),
                                {"runtime": {"device": "cpu", "cpu_dtype": cfg.world.dtype}}), "plan")


def _bytes(*modules: torch.nn.Module) -> int:
    return sum(t.untyped_storage().nbytes() for t in module_tensors(*modules))


def _pipe_models(pipe) -> dict[str, torch.nn.Module]:
    names = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def _placed(pipe, cfg: Config):
    """The pipeline as pipeline.runtime.Runtime.load_foundation leaves it: VAE sliced / tiled per policy."""
    if cfg.runtime.vae_slicing:
        pipe.vae.enable_slicing()
    if cfg.runtime.vae_tiling:
        pipe.vae.enable_tiling()
    return pipe


@contextlib.contextmanager
def _fake_pixels() -> Iterator[None]:
    """encode_rows' file reads -> fake pixels (images in [-1, 1], masks) of the requested size."""
    import pipeline.data.encode as encode

    def images(paths, size=None):
        return torch.zeros(len(list(paths)), 3, size, size)

    def masks(paths, size=None):
        return torch.zeros(len(list(paths)), 1, size, size)

    with mock.patch.object(encode, "read_images", images), mock.patch.object(encode, "read_masks", masks):
        yield


def encode_call(cfg: Config, sources: dict, batch: int) -> Call:
    """pipeline.data.encode.encode_rows on ``batch`` rows (see the module docstring)."""
    import pandas as pd

    from pipeline.data.encode import encode_rows
    from pipeline.runtime import runtime

    pipe = _placed(models.foundation(cfg, sources["foundation"], runtime(cfg).dtype), cfg)
    df = pd.DataFrame({"image": [""] * batch, "mask": [""] * batch, "local_prompt": [PROMPT] * batch,
                       "global_prompt": [PROMPT] * batch})
    out: dict = {}

    def call():
        out.update(encode_rows(pipe, df, cfg.data.image_size, cfg.text.max_sequence_length, cfg.condition))

    parts = _pipe_models(pipe)
    with _fake_pixels():
        tr = trace(call, {"weights": module_tensors(*parts.values())})
    rows = {k: (v.dtype, tuple(v.shape[1:])) for k, v in out.items()}
    return Call("encode", "pipeline.data.encode.encode_rows", batch, tr,
                {k: _bytes(m) for k, m in parts.items()}, rows)


class Rows:
    """Encoded-shard rows of the traced shapes (zeros), served as pipeline.distill.trainer.StageData serves
    them (its batch_from), for ``stage``'s prompt and condition; stage 2 with noisy: teacher gets the
    trajectory points (``noisy``, ``timestep``) instead of image latents, as TrajectoryData."""

    def __init__(self, cfg: Config, stage: str, rows: dict, n: int):
        from pipeline.distill.trainer import shard_keys

        stage_cfg = getattr(cfg.distill, stage)
        self.prompt, self.condition = stage_cfg.prompt, cfg.condition
        points = stage == "stage2" and cfg.distill.stage2.noisy == "teacher"
        shapes = {k: rows[k] for k in shard_keys(self.prompt, not points, cfg.condition)}
        if points:
            shapes.update(noisy=(torch.float32, rows["latents"][1]), timestep=(torch.float32, ()))
        self.t = {k: torch.zeros((n, *s), dtype=d) for k, (d, s) in shapes.items()}
        self.n = n

    def __len__(self) -> int:
        return self.n

    def batch(self, idx) -> dict[str, torch.Tensor]:
        from pipeline.distill.trainer import batch_from

        return batch_from({k: v[idx] for k, v in self.t.items()}, self.prompt, self.condition)

    def digest(self) -> str:
        return "pipeline.plan"


@contextlib.contextmanager
def fresh_accelerate() -> Iterator[None]:
    """A fresh accelerate state, as each stage process has (its state is a process-wide singleton that
    refuses a second mixed-precision setting); reset again on the way out for whatever runs next."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _prime(opt, params) -> None:
    """The optimizer's state as after its first step (AdamW creates it lazily): one step on zero gradients."""
    for p in params:
        p.grad = torch.zeros_like(p)
    getattr(opt, "optimizer", opt).step()
    opt.zero_grad(set_to_none=True)


def _held_gradients(acc, params, accumulation: int) -> list[torch.Tensor]:
    """With accumulation, the gradients the round's earlier micro-batches left, and accelerate's counter set
    so that the traced micro-batch is the round's last (it syncs, clips and steps)."""
    if accumulation == 1:
        return []
    for p in params:
        p.grad = torch.zeros_like(p)
    acc.step = accumulation - 1
    return [p.grad for p in params]


def empty_prompt_like(rows: dict) -> dict[str, torch.Tensor]:
    """The empty prompt's embeddings (pipeline.models.world.empty_prompt) as the rows store a prompt."""
    return {k: torch.zeros(rows[k][1], dtype=rows[k][0]) for k in ("prompt_embeds", "pooled_prompt_embeds")}


@dataclass
class _Session:
    """What pipeline.training.Loop sets up before its first step (its _prepare), for one traced step."""

    acc: object
    model: torch.nn.Module
    opt: object
    sched: object
    params: list
    ema: object | None


def _session(cfg: Config, stage: str, student, loss, data: Rows, checkpoints: Path) -> _Session:
    """accelerate with the distill section's precision and accumulation; the Loop's freezing of parameters
    that get no gradient; the optimizer (make_optimizer), accelerate's preparation, the EMA (EMAModel, as
    the Loop builds it) -- as pipeline.training.Loop does, in its order."""
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from pipeline.training import Loop, make_optimizer

    d, train = cfg.distill, getattr(cfg.distill, stage).train
    acc = Accelerator(gradient_accumulation_steps=d.gradient_accumulation_steps,
                      mixed_precision=d.accelerate_precision, cpu=True)
    with contextlib.redirect_stdout(sys.stderr):  # the Loop's note on frozen parameters, kept off the table
        Loop(stage, student, data, loss, train, cfg.seed, checkpoints)._freeze_unused(acc)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = make_optimizer(d.optimizer, params, train.lr, train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, opt = acc.prepare(student, opt)
    ema = EMAModel(params, decay=d.ema_decay, use_ema_warmup=True) if d.ema_decay is not None else None
    return _Session(acc, model, opt, sched, params, ema)


def distill_call(cfg: Config, sources: dict, stage: str, batch: int, rows: dict, count: Counter = trace) -> Call:
    """One training micro-batch of distill ``stage`` (see the module docstring). ``rows``: encode_call's.
    ``count``: pipeline.plan.trace.trace, or .measure to run the same step on real tensors."""
    from pipeline.distill.trainer import place_frozen, student_and_loss
    from pipeline.runtime import runtime
    from pipeline.training import step_generator, train_step

    rt, d, train = runtime(cfg), cfg.distill, getattr(cfg.distill, stage).train
    backbone = models.foundation(cfg, sources["foundation"], rt.dtype, with_t5=False).transformer
    teacher = models.teacher(cfg, sources["teacher"], rt.dtype, backbone)
    empty = empty_prompt_like(rows) if d.prompt_dropout > 0 else None
    student, loss = student_and_loss(cfg, stage, backbone, teacher, None, empty, compile=())
    place_frozen(cfg, rt.device, backbone, teacher)  # the Loop's on_start
    data = Rows(cfg, stage, rows, batch)
    with fresh_accelerate(), tempfile.TemporaryDirectory() as tmp:
        s = _session(cfg, stage, student, loss, data, Path(tmp))
        _prime(s.opt, s.params)
        held = _held_gradients(s.acc, s.params, d.gradient_accumulation_steps)
        inputs = data.batch(torch.arange(batch))
        state = [t for st in s.opt.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]

        def call():  # Loop._train's step: the micro-batch, then the EMA
            train_step(s.acc, s.model, s.opt, s.params, loss, inputs, step_generator(cfg.seed, 1, 2),
                       train.max_grad_norm, s.sched)
            if s.ema is not None:
                s.ema.step(s.params)

        tr = count(call, {"weights": module_tensors(backbone, teacher, student), "optimizer": state,
                          "ema": s.ema.shadow_params if s.ema else [], "gradients": held,
                          "inputs": [*inputs.values(), *(empty or {}).values()]}, s.params)
    weights = {"backbone": _bytes(backbone), "teacher": _bytes(teacher), "student": _bytes(student)}
    return Call(f"distill_{stage}", "pipeline.training.train_step (DistillLoss) + EMAModel.step", batch, tr,
                weights)


def sample_call(cfg: Config, sources: dict, model: str, batch: int, steps: int, guidance_scale: float,
                conditioning_scale: float, count: Counter = trace) -> Call:
    """pipeline.evaluation.sampler.inpaint_images on ``batch`` images, ``steps`` denoising steps, with
    ``model``'s ControlNet: teacher | student (the distilled depth, as built for training) | backbone_only.
    ``count``: as distill_call's."""
    from pipeline.evaluation.sampler import inpaint_images
    from pipeline.models.mapping import convention_of
    from pipeline.models.student import controlnet_from_backbone
    from pipeline.runtime import runtime

    dtype = runtime(cfg).dtype
    pipe = _placed(models.foundation(cfg, sources["foundation"], dtype), cfg)
    controlnet = None
    if model == "teacher":
        controlnet = models.teacher(cfg, sources["teacher"], dtype, pipe.transformer)
    elif model != "backbone_only":
        controlnet = controlnet_from_backbone(pipe.transformer, cfg.distill.student_layers, cfg.condition).eval()
    size = cfg.data.image_size
    images, masks = torch.zeros(batch, 3, size, size), torch.zeros(batch, 1, size, size)

    def call():
        inpaint_images(pipe, controlnet, convention_of(model), images, masks, [PROMPT] * batch,
                       num_inference_steps=steps, guidance_scale=guidance_scale,
                       conditioning_scale=conditioning_scale, seeds=list(range(batch)),
                       max_sequence_length=cfg.text.max_sequence_length, condition=cfg.condition)

    parts = {**_pipe_models(pipe), **({"controlnet": controlnet} if controlnet is not None else {})}
    tr = count(call, {"weights": module_tensors(*parts.values()), "inputs": [images, masks]})
    denoisers = {type(m).__name__ for m in (pipe.transformer, controlnet) if m is not None}
    step = sum(tr.flops_by_module.get(name, 0) for name in denoisers) // steps
    return Call(f"sample[{model}]", "pipeline.evaluation.sampler.inpaint_images", batch, tr,
                {k: _bytes(m) for k, m in parts.items()}, step_flops=step)


def _caption_rows(cfg: Config, folder: Path, batch: int) -> list[dict]:
    """``batch`` rows of PNG files at data.image_size (a grey image, a box hole) for caption_batch to read."""
    from PIL import Image

    size = cfg.data.image_size
    hole = np.zeros((size, size), np.uint8)
    hole[size // 4: size // 2, size // 4: size // 2] = 255
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(folder / "image.png")
    Image.fromarray(hole).save(folder / "mask.png")
    return [{"image": str(folder / "image.png"), "mask": str(folder / "mask.png")}] * batch


def caption_call(cfg: Config, sources: dict, batch: int) -> Call:
    """QwenCaptioner.caption_batch on ``batch`` rows, max_new_tokens 1 (see the module docstring)."""
    from pipeline.captions.qwen import QwenCaptioner

    model, processor = models.captioner(cfg, sources["captioner"])
    qcfg = cfg.caption.qwen.model_copy(update={"max_new_tokens": 1})

    class Traced(QwenCaptioner):  # QwenCaptioner's state without its from_pretrained (no weights here)
        def __init__(self):
            self.cfg, self.torch, self.device = qcfg, torch, torch.device("cpu")
            self.processor, self.model = processor, model
            self.processor.tokenizer.padding_side = "left"

    captioner = Traced()
    with tempfile.TemporaryDirectory() as tmp:
        rows = _caption_rows(cfg, Path(tmp), batch)
        tr = trace(lambda: captioner.caption_batch(rows), {"weights": module_tensors(model)})
    return Call("caption", "pipeline.captions.qwen.QwenCaptioner.caption_batch (max_new_tokens 1)", batch, tr,
                {"qwen2_5_vl": _bytes(model)})
