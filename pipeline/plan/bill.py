"""The bill of a profile: pipeline.plan.cost's lines for every model stage, the ablation matrix and the
studies, from the traced stages of pipeline.plan.build (the module docstring of pipeline.plan.cost says
how a call's time is obtained)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.plan.build import QWEN, StagePlan
from pipeline.plan.cost import Gpu, Line, batches_line, distill_line, measured_rate, split_rows

EVALUATED = ("teacher", "backbone_only", "student", "student")  # stages/evaluate.py: + student_stage1
GATED = ("teacher", "backbone_only")                            # stages/validate_teacher.py


@dataclass
class Rates:
    """Seconds of one unit of work: a distillation optimizer step per stage, a sampler batch per model
    (evaluate's settings) and one trajectories batch."""

    step: dict[str, float]
    sample: dict[str, float]
    trajectories: float
    sample_batch: int


def test_images(cfg: Config, rows: dict[str, int]) -> int:
    """Test images each evaluation samples: evaluate.num_images of the test split (null: all)."""
    return min(cfg.evaluate.num_images or rows["test"], rows["test"])


def _sampler_seconds(gpu: Gpu, flops: tuple[float, float], steps: int) -> float:
    fixed, per_step = flops
    return gpu.compute_s(fixed + steps * per_step)


def main_lines(cfg: Config, raw: dict | None, plans: dict[str, StagePlan], flops: dict, gpu: Gpu,
               root: Path) -> tuple[list[Line], Rates]:
    """The main pipeline's lines (stages in run order) and the per-unit rates the opt-in lines reuse.
    ``raw``: the active params as a dict, to take measured rates of runs made with them (None: never)."""
    rows = split_rows(cfg, root)
    test = test_images(cfg, rows)
    b = cfg.runtime.sample_batch_size
    ev_steps, tj_steps = cfg.evaluate.num_inference_steps, cfg.trajectories.num_inference_steps
    sample = {m: _sampler_seconds(gpu, f, ev_steps) for m, f in flops.items() if m != "trajectories"}
    rates = Rates({}, sample, _sampler_seconds(gpu, flops["trajectories"], tj_steps), b)
    distill = {}
    for stage in ("stage1", "stage2"):
        p = plans[f"distill_{stage}"]
        rate = raw and measured_rate(root, raw, f"distill_{stage}", f"metrics/distill/{stage}.json",
                                     f"{stage}_samples_per_s")
        distill[stage] = distill_line(stage, cfg, p.fit.at(p.micro_batch, lambda c: c.trace.flops), gpu, rate)
        rates.step[stage] = distill[stage].seconds * cfg.distill.gradient_accumulation_steps
    enc = plans["encode"]
    evaluated = f"{ev_steps} steps, FLOPs of traced sampler calls"
    lines = [
        *([_caption_line(cfg, plans["caption"], rows, gpu)] if "caption" in plans else []),
        batches_line("encode", sum(rows.values()), enc.micro_batch,
                     gpu.compute_s(enc.fit.at(enc.micro_batch, lambda c: c.trace.flops)), _flops_source(enc)),
        batches_line("validate_teacher", test * len(GATED), b, sum(sample[m] for m in GATED) / len(GATED),
                     evaluated, what="images (teacher, backbone alone)"),
        distill["stage1"],
        batches_line("trajectories", rows["unlabelled"], b, rates.trajectories,
                     f"{tj_steps} steps, FLOPs of a traced sampler call", what="unlabelled rows"),
        distill["stage2"],
        batches_line("evaluate", test * len(EVALUATED), b, sum(sample[m] for m in EVALUATED) / len(EVALUATED),
                     evaluated, what="images (4 models)"),
    ]
    return lines, rates


def _flops_source(p: StagePlan) -> str:
    return f"FLOPs: {p.fit.at(p.micro_batch, lambda c: c.trace.flops) / 1e12:.1f} TFLOP a call"


def _caption_line(cfg: Config, p: StagePlan, rows: dict, gpu: Gpu) -> Line:
    """The VLM's rows (splits captioned by qwen2_5_vl), a batch = two generate calls (local, global): the
    traced prefills' FLOPs plus max_new_tokens - 1 decoding steps each, bandwidth-bound."""
    c = cfg.caption
    n = sum(v for k, v in rows.items() if (c.unlabelled_backend if k == "unlabelled" else c.backend) == QWEN)
    b = p.micro_batch
    weights = sum(p.fit.small.weights.values())
    decode = 2 * (c.qwen.max_new_tokens - 1) * gpu.memory_s(weights)
    prefill = gpu.compute_s(p.fit.at(b, lambda call: call.trace.flops))
    steps = 2 * (c.qwen.max_new_tokens - 1)
    return batches_line("caption", n, b, prefill + decode,
                        f"FLOPs of the prefills ({prefill:.2f} s) + {steps} decoding steps reading "
                        f"{weights / 2**30:.1f} GiB of weights ({decode:.2f} s)")


def _training_seconds(rates: Rates, stage1: int, stage2: int) -> float:
    return stage1 * rates.step["stage1"] + stage2 * rates.step["stage2"]


def _eval_seconds(rates: Rates, images: int) -> float:
    return math.ceil(images / rates.sample_batch) * rates.sample["student"]


def _stage1_key(c: Config) -> dict:
    """What a stage-1 checkpoint key reads of a Config, less the number of steps (pipeline.training's
    prefix rule): two runs with equal keys share stage-1 checkpoints."""
    raw = c.model_dump(mode="json")
    raw["distill"].pop("stage2")
    raw["distill"]["stage1"]["train"].pop("steps")
    return raw


def _run_steps(cfg: Config, variant_cfg: Config, two_stage: bool, full_cfg: Config) -> tuple[int, int]:
    """(stage-1 steps trained, stage-2 steps) of one run: a run whose stage 1 is full's at its seed starts from
    full's stage-1 checkpoint (pipeline.distill.ablation) and trains only the steps beyond it."""
    s1 = variant_cfg.distill.stage1.train.steps
    if _stage1_key(variant_cfg) == _stage1_key(full_cfg):
        s1 = max(0, s1 - full_cfg.distill.stage1.train.steps)
    return s1, variant_cfg.distill.stage2.train.steps if two_stage else 0


def ablation_lines(cfg: Config, rates: Rates, test: int) -> list[Line]:
    """params.yaml's ablation matrix: full's stage-1 prefixes (ablate_stage1) and every (variant, seed) run."""
    from pipeline.distill.ablation import variant_config

    ab, d = cfg.ablations, cfg.distill
    prefixes = [s for s in ab.headline_seeds if s != cfg.seed]  # params' seed: copied from distill_stage1
    lines = [Line("ablate_stage1", f"full's stage 1 at seeds {prefixes}", len(prefixes),
                  _training_seconds(rates, d.stage1.train.steps, 0), "distill_stage1's step", "ablations")]
    s1 = s2 = 0
    for variant, seed in ab.runs():
        vcfg, two = variant_config(cfg, variant, seed)
        if not (two and vcfg == cfg):  # the headline student itself is evaluated, not trained
            a, b = _run_steps(cfg, vcfg, two, variant_config(cfg, "full", seed)[0])
            s1, s2 = s1 + a, s2 + b
    runs = len(ab.runs())
    lines.append(Line("ablations", f"{runs} runs: {s1} stage-1 + {s2} stage-2 steps, {test} test images each",
                      runs, (_training_seconds(rates, s1, s2) + runs * _eval_seconds(rates, test)) / runs,
                      "the headline's per-step and per-batch figures", "ablations"))
    return lines


def study_lines(cfg: Config, rates: Rates, test: int, rows: dict, encode_call_s: float, encode_batch: int,
                studies_path: Path) -> list[Line]:
    """studies/params.yaml: the frontier, prompt-quality and edges studies (make studies)."""
    from pipeline.studies.config import load

    st, d = load(cfg, studies_path), cfg.distill
    s1, s2, ev = d.stage1.train.steps, d.stage2.train.steps, _eval_seconds(rates, test)
    f = st.frontier
    seconds = 0.0
    for depth in f.depths:
        for af in f.feature_alignment:
            for seed in f.seeds:
                headline_arm = depth == d.student_layers and af
                if headline_arm and seed == cfg.seed:
                    seconds += ev  # the headline student
                else:
                    seconds += _training_seconds(rates, 0 if headline_arm else s1, s2) + ev
    n_f = len(f.depths) * len(f.feature_alignment) * len(f.seeds)
    pq = st.prompt_quality
    n_pq = len(pq.levels) * len(pq.seeds)
    n_e = len(st.edges.seeds)
    encode_s = math.ceil(sum(rows.values()) / encode_batch) * encode_call_s
    return [
        Line("study: frontier", f"{n_f} runs (depths {f.depths})", n_f, seconds / n_f,
             "the headline's per-step figures (depth changes only the student's share)", "studies"),
        Line("study: prompt_quality", f"{n_pq} stage-2 runs", n_pq, _training_seconds(rates, 0, s2) + ev,
             "distill_stage2's step (re-encoding the prompts of each level not costed)", "studies"),
        Line("study: edges", f"{n_e} two-stage runs + encode", n_e,
             _training_seconds(rates, s1, s2) + ev + encode_s / n_e,
             f"headline figures; its teacher's training ({cfg.teacher.train.steps} steps) not costed", "studies"),
    ]
