"""The plan of a profile: every model stage traced (pipeline.plan.steps) at two micro-batches, then the
bill (pipeline.plan.cost). ``make_plan`` returns it as one JSON-ready dict; pipeline.plan.report prints it.

Stages traced (their own code; pipeline.plan.steps says how):
  caption           the VLM's generate batch (when caption.backend or unlabelled_backend is qwen2_5_vl)
  encode            VAE + text encoders on runtime.encode_batch_size rows
  distill_stage1/2  one training micro-batch (distill.stageN.train.batch_size)
  evaluate          the sampler with the teacher (the largest ControlNet evaluate loads) and CFG
  trajectories      the sampler with the teacher and the trajectories section's settings
The student's and the backbone-alone sampler calls are traced at one size for their FLOPs (evaluate's
cost); their memory is the teacher's minus a smaller ControlNet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.config import Config
from pipeline.plan import models, steps
from pipeline.plan.fit import Linear
from pipeline.plan.trace import fake_world

QWEN = "qwen2_5_vl"
CAPTION_SIZES = (1, 2)  # the VLM's vision tower runs one attention call per window: traced small, extrapolated


@dataclass
class StagePlan:
    """A stage's traced figures: what ran, the profile's micro-batch, the two traced calls."""

    stage: str
    code: str
    micro_batch: int
    fit: Linear
    notes: list[str] = field(default_factory=list)


def _pair(trace_at: Callable[[int], steps.Call], sizes: tuple[int, int], log) -> Linear:
    calls = []
    for b in sizes:
        calls.append(trace_at(b))
        log(f"  {calls[-1].stage} @ {b}: {calls[-1].trace.peak_bytes / 2**30:.2f} GiB peak, "
            f"{calls[-1].trace.seconds:.1f} s traced")
    return Linear(*calls)


def uses_vlm(cfg: Config) -> bool:
    return QWEN in (cfg.caption.backend, cfg.caption.unlabelled_backend)


def trace_stages(cfg: Config, root: Path, log=print) -> tuple[list[StagePlan], dict, list[str]]:
    """(stage plans, sampler FLOPs {model: (fixed, per step) at runtime.sample_batch_size}, config sources).
    ``cfg``: the profile's Config (pipeline.plan.steps.plan_config is applied here)."""
    cfg = steps.plan_config(cfg)
    rt, ev, tj = cfg.runtime, cfg.evaluate, cfg.trajectories
    plans: list[StagePlan] = []
    with fake_world():
        names = ("foundation", "teacher", *(("captioner",) if uses_vlm(cfg) else ()))
        sources = {n: models.find_source(cfg, n, root) for n in names}
        if uses_vlm(cfg):
            fit = _pair(lambda b: steps.caption_call(cfg, sources, b), CAPTION_SIZES, log)
            plans.append(StagePlan("caption", fit.small.code, cfg.caption.qwen.batch_size, fit))
        b = rt.encode_batch_size
        enc = _pair(lambda n: steps.encode_call(cfg, sources, n), (b, 2 * b), log)
        plans.append(StagePlan("encode", enc.small.code, b, enc))
        for stage in ("stage1", "stage2"):
            b = getattr(cfg.distill, stage).train.batch_size
            fit = _pair(lambda n, s=stage: steps.distill_call(cfg, sources, s, n, enc.small.rows), (b, 2 * b), log)
            plans.append(StagePlan(f"distill_{stage}", fit.small.code, b, fit, _distill_notes(cfg)))
        b = rt.sample_batch_size
        for stage, s in (("evaluate", ev), ("trajectories", tj)):
            fit = _pair(lambda n, s=s: steps.sample_call(cfg, sources, "teacher", n, 1, s.guidance_scale,
                                                         s.conditioning_scale), (b, 2 * b), log)
            plans.append(StagePlan(stage, fit.small.code + " (teacher, 1 step)", b, fit))
        flops = {"teacher": _sampler_flops(plans[-2].fit.small)}
        for model in ("student", "backbone_only"):
            flops[model] = _sampler_flops(steps.sample_call(cfg, sources, model, b, 1, ev.guidance_scale,
                                                            ev.conditioning_scale))
    flops["trajectories"] = _sampler_flops(plans[-1].fit.small)
    return plans, flops, [s.describe() for s in sources.values()]


def _distill_notes(cfg: Config) -> list[str]:
    notes = []
    if cfg.distill.compile:
        notes.append("distill.compile: traced eagerly (torch.compile changes speed, not what is held)")
    if cfg.distill.optimizer != "adamw":
        notes.append(f"optimizer {cfg.distill.optimizer}: traced as configured")
    return notes


def _sampler_flops(call: steps.Call) -> tuple[float, float]:
    """(fixed FLOPs a batch: prompts, control encoding, decoding; FLOPs a denoising step) of a 1-step call."""
    return call.trace.flops - call.step_flops, call.step_flops
