"""Stage 1 (labelled triplets, tri-level loss) and stage 2 (unlabelled masked images, L_distill + L_af).

Stage 2 is unsupervised by construction: its batches are built by ``unlabelled_batch``, which keeps no
clean-image target, and its loss never calls ``flow.target``. Its noisy inputs (``distill.stage2.noisy``):
the unlabelled image's latent noised (image), or points of the teacher's sampling trajectory
(teacher, pipeline.distill.trajectories), which read no latent of the image at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Collection, Literal, Sequence

import torch
from diffusers import SD3ControlNetModel

from pipeline import distributed
from pipeline.config import Config, StageConfig
from pipeline.data.shards import EncodedSplit
from pipeline.distill.losses import af_loss, check_weights, distill_loss, task_loss
from pipeline.models import condition as conditions
from pipeline.models import flow
from pipeline.models.controlled import Controlled
from pipeline.models.mapping import STUDENT_CONVENTION, TEACHER_CONVENTION, af_pairs, skipped_blocks, unused_layers
from pipeline.models.student import controlnet_from_backbone
from pipeline.models.world import drop_prompts, empty_prompt, load_controlnet, load_foundation
from pipeline.runtime import dtype_for, runtime
from pipeline.training import Loop, save_atomic

Stage = Literal["stage1", "stage2"]
SPLIT_OF = {"stage1": "labelled", "stage2": "unlabelled"}
COMPILABLE = ("student", "backbone", "teacher")  # what distill.compile torch.compiles in DistillLoss


def compile_blocks(module: torch.nn.Module) -> torch.nn.Module:
    """Regional torch.compile, in place: each of the module's ``transformer_blocks`` (inductor, static
    shapes, so Loop's batch-1 probe gets its own graph instead of making the training batch's dynamic). The
    blocks share code and shapes, so one compiled graph serves all of them: compiling the whole model costs
    minutes per process on the CPU (a 24-block tiny-world backbone: ~10 min with 2 busy cores). The module
    itself, its parameters and state_dict keys are unchanged: Loop trains, keys and saves it as it is.
    Graphs per block code: grad / no grad (student / teacher) x probe / training batch x SD3's last block:
    dynamo's default limit of 8 would leave the rest eager, so it is raised."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in module.transformer_blocks:
        block.compile(dynamic=False)
    return module


def shard_keys(prompt: str, image: bool = True, condition: str = "inpaint") -> tuple[str, ...]:
    """The encoded-shard tensors a stage reads: local prompts are ``prompt_embeds``, global ``global_*``;
    the image's latents only when the stage noises them (``image``); the control's tensors of
    ``condition`` (pipeline.models.condition.shard_keys)."""
    p = "" if prompt == "local" else "global_"
    return (*(("latents",) if image else ()), *conditions.shard_keys(condition), f"{p}prompt_embeds",
            f"{p}pooled_prompt_embeds")


def batch_from(t: dict[str, torch.Tensor], prompt: str, condition: str = "inpaint") -> dict[str, torch.Tensor]:
    """Encoded-shard tensors (rows of them, or pipeline.data.encode output) -> what DistillLoss reads: the
    control input as the stock (inpainting or ControlNet) pipeline builds it, the latent loss mask when the
    condition has one (``mask``: inpaint's hole; edges has none, so L_task weighs uniformly;
    pipeline.models.condition.control_from_shards), and the stage's prompt embeddings."""
    p = "" if prompt == "local" else "global_"
    control, hole = conditions.control_from_shards(t, condition)
    return {**{k: t[k] for k in ("latents", "noisy", "timestep") if k in t},
            "control": control, **({"mask": hole} if hole is not None else {}),
            "prompt_embeds": t[f"{p}prompt_embeds"],
            "pooled_prompt_embeds": t[f"{p}pooled_prompt_embeds"]}


class StageData:
    """The rows a stage trains on (its split, SPLIT_OF), read from the encoded shards one batch at a time
    (pipeline.training.Data): memory holds a batch, not the split. Row i is the i-th id in sorted order, so
    pipeline.training.batch_indices draws the same rows whatever the number of shards. Stage 2 gets the
    image latents only to noise them; given ``trajectories`` (noisy: teacher) its items are the teacher's
    trajectory points instead, and no image latent is read."""

    def __init__(self, encoded_dir: Path, stage: Stage, prompt: str, trajectories: Path | None = None,
                 condition: str = "inpaint"):
        from pipeline.distill.trajectories import TrajectoryData

        self.prompt, self.condition = prompt, condition
        split = EncodedSplit(encoded_dir, SPLIT_OF[stage], shard_keys(prompt, trajectories is None, condition))
        self.split = split if trajectories is None else TrajectoryData(trajectories, split)

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        return batch_from(self.split.gather(idx), self.prompt, self.condition)

    def digest(self) -> str:
        return self.split.digest()


def stage_data(encoded_dir: Path, stage: Stage, prompt: str, trajectories: Path | None = None,
               condition: str = "inpaint") -> StageData:
    return StageData(encoded_dir, stage, prompt, trajectories, condition)


def place_frozen(cfg: Config, device, *models: torch.nn.Module) -> None:
    """Move the frozen backbone and teacher to the student's device, in the runtime policy's dtype there
    (pipeline.runtime: world.dtype on an accelerator, runtime.cpu_dtype on the CPU)."""
    dtype = dtype_for(cfg, torch.device(device))
    for m in models:
        m.to(device, dtype)


@dataclass
class Inputs:
    """What both ControlNets and the backbone see: no clean image, no target."""
    noisy: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    control: torch.Tensor
    weighting: torch.Tensor


def unlabelled_batch(batch: dict, train_sched, cfg: Config, gen) -> Inputs:
    """Noised image latents, or (noisy: teacher) the teacher's trajectory points as they are."""
    if "noisy" in batch:
        noisy = batch["noisy"]
        return Inputs(noisy, batch["timestep"].to(noisy.dtype), batch["prompt_embeds"],
                      batch["pooled_prompt_embeds"], batch["control"],
                      torch.ones(len(noisy), 1, 1, 1, device=noisy.device))
    s = flow.add_noise(batch["latents"], train_sched, cfg.scheduler, gen)
    return Inputs(s.noisy, s.timesteps, batch["prompt_embeds"], batch["pooled_prompt_embeds"], batch["control"],
                  s.weighting)


def labelled_batch(batch: dict, train_sched, cfg: Config, gen) -> tuple[Inputs, torch.Tensor, torch.Tensor | None]:
    """Inputs plus the flow-matching target and the latent mask L_task weighs by
    (pipeline.models.condition.loss_mask: the hole under inpaint, None = uniform under edges)."""
    x0 = batch["latents"]
    s = flow.add_noise(x0, train_sched, cfg.scheduler, gen)
    inputs = Inputs(s.noisy, s.timesteps, batch["prompt_embeds"], batch["pooled_prompt_embeds"], batch["control"],
                    s.weighting)
    return inputs, flow.target(s, x0), conditions.loss_mask(batch.get("mask"), cfg.condition)


class DistillLoss:
    """Callable for pipeline.training.Loop: one forward of teacher (no grad) and student, the terms.

    Prompt dropout (``distill.prompt_dropout``): after the noise is drawn, each sample's prompt is replaced
    with that probability by ``empty`` (pipeline.models.world.empty_prompt, the stock pipeline's negative
    prompt) for teacher and student alike, so the student learns the unconditional prediction that
    classifier-free guidance combines with the conditional one."""

    def __init__(self, cfg: Config, stage: Stage, stage_cfg: StageConfig, backbone, teacher, student,
                 empty: dict[str, torch.Tensor] | None = None, compile: Collection[str] | None = None):
        """``compile``: which of COMPILABLE to torch.compile, block by block and in place (compile_blocks;
        default: all when distill.compile, else none). The frozen models are shared: compile them once."""
        self.cfg, self.stage = cfg, stage
        self.compiled = set(COMPILABLE if cfg.distill.compile else ()) if compile is None else set(compile)
        if self.compiled - set(COMPILABLE):
            raise ValueError(f"compile: unknown {sorted(self.compiled - set(COMPILABLE))}; known: {COMPILABLE}")
        for name, module in (("student", student), ("backbone", backbone), ("teacher", teacher)):
            if name in self.compiled:
                compile_blocks(module)
        self.prompt_dropout, self.empty = cfg.distill.prompt_dropout, empty
        if self.prompt_dropout > 0 and empty is None:
            raise ValueError("distill.prompt_dropout > 0 needs the empty prompt's embeddings "
                             "(pipeline.models.world.empty_prompt)")
        self.weights = stage_cfg.loss.model_dump()
        check_weights(self.weights)
        self.supervised = stage == "stage1" and self.weights["task"] > 0
        self.uses_teacher = self.weights["distill"] > 0 or self.weights["af"] > 0
        self.teacher = Controlled(backbone, teacher, TEACHER_CONVENTION) if self.uses_teacher else None
        self.student = Controlled(backbone, student, STUDENT_CONVENTION)
        blocks = len(backbone.transformer_blocks)
        self.pairs = af_pairs(blocks, teacher.config.num_layers, student.config.num_layers,
                              TEACHER_CONVENTION, STUDENT_CONVENTION, skipped_blocks(backbone))
        self.train_sched = flow.training_scheduler(cfg.scheduler)

    def __call__(self, model, batch, gen) -> dict[str, torch.Tensor]:
        if self.supervised:
            x, tgt, hole = labelled_batch(batch, self.train_sched, self.cfg, gen)
        else:
            x = unlabelled_batch(batch, self.train_sched, self.cfg, gen)
        if self.prompt_dropout > 0:
            pe, pp = drop_prompts(batch, self.prompt_dropout, gen, self.empty)
            x = replace(x, prompt_embeds=pe, pooled=pp)
        args = (x.noisy, x.timesteps, x.prompt_embeds, x.pooled)
        s_res = self.student.control(*args, x.control, controlnet=model)
        s_pred = self.student.denoise(*args, s_res)
        terms: dict[str, torch.Tensor] = {}
        if self.supervised:
            terms["task"] = task_loss(s_pred, tgt, hole, self.cfg.distill.alpha, x.weighting)
        if self.uses_teacher:
            with torch.no_grad():
                t_res = self.teacher.control(*args, x.control)
                t_pred = self.teacher.denoise(*args, t_res)
            terms["distill"] = distill_loss(s_pred, t_pred)
            terms["af"] = af_loss(s_res, t_res, self.pairs)
        terms["loss"] = sum(self.weights[k] * v for k, v in terms.items())
        return terms


def build_student(cfg: Config, backbone, init: Path | None) -> SD3ControlNetModel:
    """The trainable student, in float32 whatever the frozen models' dtype (the optimizer's weights;
    distill.mixed_precision decides the compute dtype)."""
    if init is None:
        torch.manual_seed(cfg.seed)
        return controlnet_from_backbone(backbone, cfg.distill.student_layers, cfg.condition).float()
    return SD3ControlNetModel.from_pretrained(init, torch_dtype=torch.float32)


def student_and_loss(cfg: Config, stage: Stage, backbone, teacher, init: Path | None = None,
                     empty: dict[str, torch.Tensor] | None = None, compile: Collection[str] | None = None):
    """(student, DistillLoss) exactly as ``distill`` trains them; the encode benchmark times the same.
    ``empty``: the empty prompt's embeddings, needed when distill.prompt_dropout > 0. ``compile``: what
    DistillLoss torch.compiles (default: distill.compile's choice; the step benchmark sets it)."""
    student = build_student(cfg, backbone, init)
    dead = unused_layers(Controlled(backbone, student, STUDENT_CONVENTION).mapping, student.config.num_layers)
    if dead:
        print(f"warning: student layers {dead} feed no backbone block (SD3's last block takes no residual)")
    if cfg.distill.gradient_checkpointing:
        student.enable_gradient_checkpointing()
        backbone.enable_gradient_checkpointing()
    return student, DistillLoss(cfg, stage, getattr(cfg.distill, stage), backbone, teacher, student, empty,
                                compile)


def distill(cfg: Config, stage: Stage, *, foundation: Path, teacher: Path, encoded: Path, out: Path | None,
            checkpoints: Path, live: Path | None, init: Path | None = None,
            max_steps_this_run: int | None = None, trajectories: Path | None = None,
            prefixes: Sequence[Path] = (), keep_checkpoints: int | None = None) -> dict:
    """Train one stage into ``out`` (None: only the checkpoints). ``trajectories``: the teacher's trajectory
    points (pipeline.distill.trajectories), read when stage 2's noisy input is the teacher's. ``prefixes``:
    other runs' checkpoint folders to start from when their key is this run's (pipeline.training.Loop);
    ``keep_checkpoints``: default distill.keep_checkpoints. Launched on several processes (DDP), every rank
    trains and returns the metrics; rank 0 alone writes ``out``, and every rank returns once it has."""
    stage_cfg: StageConfig = getattr(cfg.distill, stage)
    from_teacher = stage == "stage2" and cfg.distill.stage2.noisy == "teacher"
    if from_teacher and trajectories is None:
        raise ValueError("distill.stage2.noisy: teacher needs the trajectories stage's output (data/trajectories)")
    rt = runtime(cfg)
    # Loaded on the CPU in the policy's dtype; Loop's on_start moves them to accelerate's device (one GPU per
    # process under `accelerate launch`). Prompts come embedded from the encode stage; T5 (when the folder
    # ships one) is loaded only to embed the empty prompt for prompt dropout, as the encode stage embeds.
    dropout = cfg.distill.prompt_dropout > 0
    pipe = load_foundation(foundation, rt.dtype, with_t5=None if dropout else False)
    empty = empty_prompt(pipe, cfg.text.max_sequence_length) if dropout else None
    pipe.text_encoder_3 = pipe.tokenizer_3 = None  # freed: training reads no more text
    backbone = pipe.transformer
    teacher_model = load_controlnet(teacher, rt.dtype, condition=cfg.condition)
    student, loss = student_and_loss(cfg, stage, backbone, teacher_model, init, empty)
    data = stage_data(encoded, stage, stage_cfg.prompt, trajectories if from_teacher else None, cfg.condition)

    def on_start(acc):  # the frozen models follow the student onto the accelerator's device (GPU)
        place_frozen(cfg, acc.device, backbone, teacher_model)

    loop = Loop(stage, student, data, loss, stage_cfg.train, cfg.seed + (0 if stage == "stage1" else 1), checkpoints,
                checkpoint_every=cfg.distill.checkpoint_every,
                keep_checkpoints=cfg.distill.keep_checkpoints if keep_checkpoints is None else keep_checkpoints,
                live_dir=live, gradient_accumulation_steps=cfg.distill.gradient_accumulation_steps,
                mixed_precision=cfg.distill.accelerate_precision, ema_decay=cfg.distill.ema_decay,
                max_steps_this_run=max_steps_this_run, on_start=on_start, optimizer=cfg.distill.optimizer,
                device=rt.device, prefixes=list(prefixes),
                # The code the loss and model come from, whatever else the stage's process imported: the
                # distill stages and the ablation runs then share keys, hence checkpoints (prefixes).
                code=("pipeline.distill.trainer",),
                # What the loss reads beyond the Loop's own settings; not the other stage's params, nor
                # checkpoint cadence or gradient checkpointing, which change no result.
                fingerprint=json.dumps({"scheduler": cfg.scheduler.model_dump(mode="json"), "alpha": cfg.distill.alpha,
                                        **({"condition": cfg.condition} if cfg.condition != "inpaint" else {}),
                                        "stage": stage_cfg.model_dump(mode="json", exclude={"train"}),
                                        **({"prompt_dropout": cfg.distill.prompt_dropout} if dropout else {})}),
                frozen={"backbone": backbone, **({"teacher": teacher_model} if loss.uses_teacher else {}),
                        **({f"empty_{k}": v for k, v in empty.items()} if dropout else {})})
    result = loop.run()
    metrics = {f"{stage}_train_seconds": result.seconds, f"{stage}_samples_per_s": result.samples_per_second,
               f"{stage}_steps": result.steps, f"{stage}_steps_trained_here": result.steps - result.prefix_steps,
               **{f"{stage}_final_{k}": v for k, v in result.last.items()}}
    # one writer when several processes train; the others wait for its save, so a caller may read ``out``
    if out is not None and result.steps == stage_cfg.train.steps and result.main:
        save_atomic(loop.model.eval(), out)
        write_model_card(out, cfg, stage, metrics, loss.pairs)
    distributed.barrier()
    return metrics


def write_model_card(out: Path, cfg: Config, stage: Stage, metrics: dict, pairs) -> None:
    stage_cfg: StageConfig = getattr(cfg.distill, stage)
    n = cfg.distill.student_layers
    text = f"""---
library_name: diffusers
tags: [controlnet, sd3, inpainting, distillation, refine-control]
---
# REFINE-CONTROL student ({n} layers, after {stage})

A {n}-layer SD3 inpainting ControlNet distilled from a {cfg.teacher.num_layers}-layer teacher with
REFINE-CONTROL (arXiv 2509.22139) by the refine-control pipeline. Initialised from the backbone's first
{n} joint blocks; {'stage 1: labelled triplets, tri-level loss' if stage == 'stage1' else
'stage 1 then stage 2: unlabelled masked images, L_distill + L_af'}.

- loss weights: {json.dumps(stage_cfg.loss.model_dump())}, alpha (hole weight) = {cfg.distill.alpha}
- prompts: {stage_cfg.prompt}; steps: {stage_cfg.train.steps}, batch {stage_cfg.train.batch_size},
  lr {stage_cfg.train.lr}
- feature-alignment pairs (student layer -> teacher layers): {pairs}
- residual injection: block i <- layer i * {n} // num_blocks (diffusers' own rule for this depth), so the
  stock `StableDiffusion3ControlNetInpaintingPipeline` runs it unchanged.

Training figures: {json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()})}.
Evaluation metrics, when computed, are in the pipeline's metrics/ folder (reports/report.md).
"""
    (Path(out) / "README.md").write_text(text)
