"""What a distillation step costs next to a plain ControlNet training step, in one process, on one batch.

Arms, each one optimizer step on the same batch of the encoded labelled split (stage 1's data), drawing
the same noise per round (pipeline.training.step_generator):

* ``distill``: the stage-1 step exactly as training runs it: pipeline.distill.trainer.student_and_loss
  (student, DistillLoss: teacher forward without grad, student + backbone forward, the tri-level loss)
  through pipeline.training.train_step (autocast, backward, clipping, the configured optimizer), after
  the Loop's unused-parameter probe (Loop._freeze_unused) that training runs first.
* ``plain``: the same student trained as diffusers' examples/controlnet/train_controlnet_sd3.py trains a
  ControlNet: student + frozen backbone forward, the flow-matching loss (pipeline.models.flow), backward,
  optimizer step; no teacher. Same train_step, same optimizer settings.
* ``compiled`` (``step_benchmark.compile`` non-empty): the distill arm with those modules torch.compiled
  block by block (DistillLoss's ``compile``; ``distill.compile`` switches on all three): compile seconds (the
  probe's and the first steps' time beyond the steady state), steady-state step time, break-even steps.
  If inductor fails here, the error is recorded and the arm is reported as not available.

FLOPs: torch.utils.flop_counter.FlopCounterMode over one eager step (forward and backward; matmuls,
convolutions, attention). Times: ``warmup`` untimed steps per arm, then ``repeats`` rounds that run one
step of each arm in alternating order (so drift in the machine's load hits every arm), medians reported;
the clock is read after the device finished (pipeline.timing). The ceiling: GFLOP/s of a plain matmul
of the model's width, (batch x tokens, width) @ (width, width), in the compute dtype, same threads.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import Config, StepBenchmarkConfig
from pipeline.distill.trainer import StageData, build_student, place_frozen, stage_data, student_and_loss
from pipeline.models import flow
from pipeline.models.controlled import Controlled
from pipeline.models.mapping import STUDENT_CONVENTION
from pipeline.models.world import empty_prompt, load_controlnet, load_foundation
from pipeline.runtime import runtime
from pipeline.timing import median_ms, stopwatch
from pipeline.training import Loop, batch_indices, make_optimizer, step_generator, train_step

STAGE = "stage1"


class PlainControlNetLoss:
    """One ControlNet training step's loss as train_controlnet_sd3.py computes it (and the teacher stage,
    pipeline.foundation.teacher): noise with SD3's timestep density, ControlNet residuals into the frozen
    backbone, SD3-weighted flow-matching MSE against (noise - x0)."""

    def __init__(self, cfg: Config, backbone, student):
        self.cfg = cfg
        self.ctrl = Controlled(backbone, student, STUDENT_CONVENTION)
        self.train_sched = flow.training_scheduler(cfg.scheduler)

    def __call__(self, model, batch, gen) -> dict[str, torch.Tensor]:
        x0 = batch["latents"]
        s = flow.add_noise(x0, self.train_sched, self.cfg.scheduler, gen)
        args = (s.noisy, s.timesteps, batch["prompt_embeds"], batch["pooled_prompt_embeds"])
        res = self.ctrl.control(*args, batch["control"], controlnet=model)
        pred = self.ctrl.denoise(*args, res)
        return {"loss": flow.flow_loss(pred, flow.target(s, x0), s.weighting)}


class Arm:
    """A student, its loss and optimizer, prepared by accelerate; ``step(r)`` is one train_step."""

    def __init__(self, name: str, acc: Accelerator, cfg: Config, student, loss_fn, data, batch: dict):
        self.name, self.acc, self.cfg, self.loss_fn, self.batch = name, acc, cfg, loss_fn, batch
        train = cfg.distill.stage1.train
        # Training's unused-parameter probe (one batch-1 backward; freezes what gets no gradient)
        with tempfile.TemporaryDirectory() as tmp, stopwatch(acc.device) as t:
            Loop(name, student, data, loss_fn, train, cfg.seed, Path(tmp))._freeze_unused(acc)
        self.probe_seconds = t.seconds
        self.params = [p for p in student.parameters() if p.requires_grad]
        opt = make_optimizer(cfg.distill.optimizer, self.params, train.lr, train.weight_decay)
        self.model, self.opt = acc.prepare(student, opt)
        self.model.train()
        self.max_grad_norm = train.max_grad_norm

    def step(self, r: int) -> dict:
        return train_step(self.acc, self.model, self.opt, self.params, self.loss_fn, self.batch,
                          step_generator(self.cfg.seed, r, stream=2), self.max_grad_norm)

    def flops(self, r: int = 0) -> tuple[int, int]:
        """(FLOPs of one step: forward + backward, of its forward alone)."""
        with FlopCounterMode(display=False) as fc:
            self.step(r)
        with torch.no_grad(), FlopCounterMode(display=False) as ff, self.acc.autocast():
            self.loss_fn(self.model, self.batch, step_generator(self.cfg.seed, r, stream=2))
        return int(fc.get_total_flops()), int(ff.get_total_flops())


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, device, warmup: int, repeats: int,
                  inner: int | None = None) -> float:
    """GFLOP/s of (m, k) @ (k, n): ``inner`` products per timed call (short ones are timer-bound)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    flops = 2 * m * k * n
    inner = inner or max(1, int(2e8 // flops))

    def run():
        for _ in range(inner):
            torch.mm(a, b, out=out)

    ms = median_ms(run, max(1, warmup), max(3, repeats), device)
    return flops * inner / (ms / 1000) / 1e9


def run_step_benchmark(cfg: Config, bcfg: StepBenchmarkConfig, *, foundation: Path, teacher: Path,
                       encoded: Path) -> dict:
    """Time, FLOPs and GFLOP/s of the distillation step and the plain ControlNet step; the compiled arm.
    Returns the metrics dict (metrics/step_benchmark.json)."""
    threads_before = torch.get_num_threads()
    if bcfg.threads is not None:
        torch.set_num_threads(bcfg.threads)
    try:
        return _run(cfg, bcfg, foundation, teacher, encoded)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: Config, bcfg: StepBenchmarkConfig, foundation: Path, teacher: Path, encoded: Path) -> dict:
    """The benchmark in the threads set: the arms built, their FLOPs counted, their steps timed, the matmul
    ceiling measured; the compiled arm's figures once the eager ones are known."""
    load_before = os.getloadavg()
    s = _setup(cfg, bcfg, foundation, teacher, encoded)
    arms = _eager_arms(cfg, s)
    flops = {name: arm.flops() for name, arm in arms.items()}
    compiled, first_steps = _add_compiled_arm(cfg, bcfg, s, arms)
    times = _time_arms(arms, bcfg, s.acc.device)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    ceilings, shape = _ceilings(cfg, bcfg, s)
    out = {**_step_figures(flops, ms, times, ceilings["ceiling_gflops_per_s"]), **ceilings,
           "step_ms_rounds": {k: [1000 * t for t in v] for k, v in times.items()}, "compile": compiled,
           "batch_size": bcfg.batch_size, "warmup": bcfg.warmup, "repeats": bcfg.repeats,
           "threads": torch.get_num_threads(), "device": str(s.acc.device),
           "mixed_precision": cfg.distill.mixed_precision, "gradient_checkpointing": cfg.distill.gradient_checkpointing,
           **shape, "backbone_blocks": len(s.backbone.transformer_blocks),
           "teacher_layers": s.teacher.config.num_layers, "student_layers": arms["distill"].model.config.num_layers,
           "probe_seconds": {k: a.probe_seconds for k, a in arms.items()},
           "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())}
    if "compiled" in arms:
        probe_extra = compiled.pop("probe_seconds") - arms["distill"].probe_seconds
        compiled.update(_compile_figures(cfg, ms, probe_extra, first_steps))
    return out


@dataclass
class _Setup:
    """What every arm shares: the accelerator, the frozen backbone and teacher (placed on its device), the
    empty prompt's embeddings (prompt dropout; None without), stage 1's data and the one batch every step
    trains on."""

    acc: Accelerator
    backbone: torch.nn.Module
    teacher: torch.nn.Module
    empty: dict | None
    data: StageData
    batch: dict[str, torch.Tensor]


def _setup(cfg: Config, bcfg: StepBenchmarkConfig, foundation: Path, teacher: Path, encoded: Path) -> _Setup:
    """The models loaded as pipeline.distill.trainer.distill loads them (T5 only to embed the empty prompt),
    then placed; the batch: step 0's ``batch_size`` rows (batch_indices)."""
    rt = runtime(cfg)
    if rt.device.type == "cuda" and rt.device.index is not None:
        torch.cuda.set_device(rt.device)  # accelerate trains on the current CUDA device
    acc = Accelerator(mixed_precision=cfg.distill.accelerate_precision, cpu=rt.device.type == "cpu")
    dropout = cfg.distill.prompt_dropout > 0
    pipe = load_foundation(foundation, rt.dtype, with_t5=None if dropout else False)
    empty = empty_prompt(pipe, cfg.text.max_sequence_length) if dropout else None
    teacher_model = load_controlnet(teacher, rt.dtype, condition=cfg.condition)
    place_frozen(cfg, acc.device, pipe.transformer, teacher_model)
    data = stage_data(encoded, STAGE, cfg.distill.stage1.prompt, condition=cfg.condition)
    idx = batch_indices(len(data), bcfg.batch_size, cfg.seed, 0)
    batch = {k: v.to(acc.device) for k, v in data.batch(idx).items()}
    return _Setup(acc, pipe.transformer, teacher_model, empty, data, batch)


def _distill_arm(cfg: Config, s: _Setup, name: str, compile_: list[str]) -> Arm:
    """The stage-1 step as training builds it; ``compile_``: the modules DistillLoss compiles. Compiling is in
    place (pipeline.distill.trainer.compile_blocks): such an arm gets its own copies of the frozen models."""
    bb, te = (copy.deepcopy(s.backbone), copy.deepcopy(s.teacher)) if compile_ else (s.backbone, s.teacher)
    student, loss_fn = student_and_loss(cfg, STAGE, bb, te, empty=s.empty, compile=compile_)
    return Arm(name, s.acc, cfg, student, loss_fn, s.data, s.batch)


def _eager_arms(cfg: Config, s: _Setup) -> dict[str, Arm]:
    """The ``distill`` and ``plain`` arms, their students starting from the same initial weights."""
    plain_student = build_student(cfg, s.backbone, None)
    if cfg.distill.gradient_checkpointing:
        plain_student.enable_gradient_checkpointing()
    return {"distill": _distill_arm(cfg, s, "distill", []),
            "plain": Arm("plain", s.acc, cfg, plain_student, PlainControlNetLoss(cfg, s.backbone, plain_student),
                         s.data, s.batch)}


def _add_compiled_arm(cfg: Config, bcfg: StepBenchmarkConfig, s: _Setup, arms: dict[str, Arm]
                      ) -> tuple[dict, list[float]]:
    """With ``step_benchmark.compile``: the compiled arm added to ``arms``, its first ``warmup`` steps (at
    least one) timed. -> (the ``compile`` record so far: the modules, whether available, the seconds to build
    the arm (``probe_seconds``) or the error; the first steps' seconds). Inductor failing here (it needs a C++
    compiler etc.) is recorded, not raised; nothing asked: not measured."""
    compiled: dict = {"modules": list(bcfg.compile), "available": None}
    first_steps: list[float] = []
    if not bcfg.compile:
        compiled["error"] = "step_benchmark.compile is empty: not measured"
        return compiled, first_steps
    try:
        with stopwatch(s.acc.device) as build:
            arms["compiled"] = _distill_arm(cfg, s, "compiled", sorted(bcfg.compile))
        for r in range(max(1, bcfg.warmup)):
            with stopwatch(s.acc.device) as t:
                arms["compiled"].step(r)
            first_steps.append(t.seconds)
        compiled["available"] = True
        compiled["probe_seconds"] = build.seconds
    except Exception as exc:  # noqa: BLE001 - record why, fake nothing
        arms.pop("compiled", None)
        compiled.update(available=False, error=f"{type(exc).__name__}: {str(exc)[:800]}")
    return compiled, first_steps


def _time_arms(arms: dict[str, Arm], bcfg: StepBenchmarkConfig, device) -> dict[str, list[float]]:
    """``warmup`` untimed steps of each eager arm (the compiled arm's were its timed first steps), then
    ``repeats`` rounds of one step per arm in alternating order -> each arm's seconds per round."""
    for name, arm in arms.items():
        if name != "compiled":
            for r in range(bcfg.warmup):
                arm.step(r)
    times: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(bcfg.repeats):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]
        for name in order:
            with stopwatch(device) as t:
                arms[name].step(bcfg.warmup + r)
            times[name].append(t.seconds)
    return times


def _ceilings(cfg: Config, bcfg: StepBenchmarkConfig, s: _Setup) -> tuple[dict, dict]:
    """The ceiling: GFLOP/s of a matmul of the model's width on the batch's tokens, in the compute dtype
    (and of the MLP's, 4 x width, and a 1024^3 one) -> (those figures and shapes; the width, tokens and
    compute dtype they came from)."""
    config, latents = s.backbone.config, s.batch["latents"]
    width = config.num_attention_heads * config.attention_head_dim
    image_tokens = (latents.shape[-2] // config.patch_size) * (latents.shape[-1] // config.patch_size)
    tokens = image_tokens + s.batch["prompt_embeds"].shape[1]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.distill.mixed_precision]
    if s.acc.device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # accelerate's CPU autocast is bf16 only
    m = bcfg.batch_size * tokens
    timing = (dtype, s.acc.device, bcfg.warmup, bcfg.repeats)
    figures = {"ceiling_gflops_per_s": matmul_gflops(m, width, width, *timing), "ceiling_shape": [m, width, width],
               "ceiling_mlp_gflops_per_s": matmul_gflops(m, width, 4 * width, *timing),
               "ceiling_mlp_shape": [m, width, 4 * width],
               "peak_1024_gflops_per_s": matmul_gflops(1024, 1024, 1024, *timing)}
    return figures, {"compute_dtype": str(dtype).removeprefix("torch."), "width": width, "tokens": tokens,
                     "image_tokens": image_tokens}


def _step_figures(flops: dict[str, tuple[int, int]], ms: dict[str, float], times: dict[str, list[float]],
                  ceiling: float) -> dict:
    """The distill step against the plain one: median times and their ratio (and the median of the paired
    rounds' ratios) next to the FLOP ratio; FLOPs of a step, of its forward, and of the teacher's forward
    (the difference); GFLOP/s and their fraction of ``ceiling``."""
    def gflops(name: str) -> float:
        return flops[name][0] / (ms[name] / 1000) / 1e9

    time_ratio = ms["distill"] / ms["plain"]
    flop_ratio = flops["distill"][0] / flops["plain"][0]
    return {
        "distill_step_ms": ms["distill"],
        "plain_step_ms": ms["plain"],
        "time_ratio": time_ratio,
        "time_ratio_paired": statistics.median(a / b for a, b in zip(times["distill"], times["plain"])),
        "flop_ratio": flop_ratio,
        "time_over_flop_ratio": time_ratio / flop_ratio,
        "within_1_05_of_flop_ratio": abs(time_ratio / flop_ratio - 1) <= 0.05,
        "distill_flops": flops["distill"][0],
        "plain_flops": flops["plain"][0],
        "distill_forward_flops": flops["distill"][1],
        "plain_forward_flops": flops["plain"][1],
        "teacher_forward_flops": flops["distill"][1] - flops["plain"][1],
        "distill_gflops_per_s": gflops("distill"),
        "plain_gflops_per_s": gflops("plain"),
        "distill_fraction_of_ceiling": gflops("distill") / ceiling,
        "plain_fraction_of_ceiling": gflops("plain") / ceiling,
    }


def _compile_figures(cfg: Config, ms: dict[str, float], probe_extra: float, first_steps: list[float]) -> dict:
    """The compiled arm against the eager distill arm: steady-state step times and speedup; the compile
    seconds: the probe's extra time (``probe_extra``) plus each first step's time beyond the steady state;
    the steps to break even, and the net seconds saved at the configured budget (each stage is its own
    process: it compiles again)."""
    c_ms, e_ms = ms["compiled"], ms["distill"]
    compile_s = probe_extra + sum(max(0.0, t - c_ms / 1000) for t in first_steps)
    saved_per_step = (e_ms - c_ms) / 1000
    s1, s2 = cfg.distill.stage1.train.steps, cfg.distill.stage2.train.steps
    net = (s1 + s2) * saved_per_step - 2 * compile_s
    return dict(step_ms=c_ms, eager_step_ms=e_ms, speedup=e_ms / c_ms, compile_seconds=compile_s,
                first_step_seconds=first_steps,
                break_even_steps=compile_s / saved_per_step if saved_per_step > 0 else None,
                budget_steps=[s1, s2], net_seconds_saved_at_budget=net, pays_at_budget=net > 0)
