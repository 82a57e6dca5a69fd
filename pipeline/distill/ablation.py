"""The ablation study: each variant is trained with pipeline.distill.trainer.distill on its own Config
(params.yaml deep-merged with the variant's overrides and its seed) at the headline student's budget, and
evaluated exactly as the `evaluate` stage evaluates the headline student (pipeline.evaluation.evaluate:
the whole test split, per-image noise, the teacher's outputs reused as the agreement reference).

Variants (params ``ablations.variants``; each ``{two_stage: bool, overrides: {...params...}}``):
  full           two-stage, tri-level loss (the method; the reference of every paired comparison)
  wo_af          no L_af (the asymmetric feature alignment) in either stage
  wo_mask        uniform weighting at the same scale: alpha 0.5 with twice the task weight (plain MSE)
  single_stage   stage 1 only, for stage-1 + stage-2 steps
  from_scratch   L_task only, no teacher terms, stage 1 only for the same total steps
  global_prompt  global instead of local prompts in both stages; evaluated with global prompts
  stage2_teacher stage 2 on the teacher's trajectory points (distill.stage2.noisy: teacher)
  layers_N       other student depths
A run whose Config equals the headline student's (full at params' seed) is that student: it is evaluated,
not trained again.

Shared prefixes (pipeline.training: a checkpoint's key leaves out the number of steps, and a run starts
from another run's checkpoint with its key, copied, never moved). The stage `ablate_stage1` trains full's
stage 1 once per headline seed into checkpoints/ablations/stage1-s<seed> (``train_stage1_prefix``); at
params' seed it copies the headline's final stage-1 checkpoint (checkpoints/distill_stage1) instead of
training. Every run's stage 1 is offered both folders (``stage1_prefixes``), and takes one when its stage-1
key is full's at its seed:
  full-sN           stage 1 is the prefix at its full length: no stage-1 step trained
  single_stage-sN   stage 1 for stage-1 + stage-2 steps: trains only the steps past stage 1's
  stage2_teacher-sN differs from full in stage 2 only: no stage-1 step trained
Every other variant changes stage 1 (loss, prompts, depth) and has another key: it trains as before. The
results are those of uninterrupted runs (bit for bit on the CPU); ``stage1_steps_trained_here`` in a run's
metrics shows the saving, and ``train_seconds`` stays the cost of the weights (a copied checkpoint carries
the seconds of the run that trained it).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from pipeline.atomic import write_dir
from pipeline.config import Config, deep_merge, from_dict


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def variant_config(cfg: Config, variant: str, seed: int) -> tuple[Config, bool]:
    """(the variant's Config, whether it runs stage 2). A stage-1-only variant trains stage 1 for the
    steps of both stages, so every variant trains the same number of steps at the same batch."""
    ab = cfg.ablations
    if variant not in ab.variants:
        raise ValueError(f"ablations: unknown variant {variant!r}; known: {sorted(ab.variants)}")
    v = ab.variants[variant]
    d = cfg.distill
    budget = {"seed": seed}
    if not v.two_stage:
        budget["distill"] = {"stage1": {"train": {"steps": d.stage1.train.steps + d.stage2.train.steps}}}
    raw = deep_merge(deep_merge(cfg.model_dump(mode="json"), budget), v.overrides)
    return from_dict(raw, f"ablations.variants.{variant}"), v.two_stage


def is_headline(cfg: Config, variant: str, seed: int) -> bool:
    """Whether the run is the headline student itself (same Config, two stages)."""
    vcfg, two_stage = variant_config(cfg, variant, seed)
    return two_stage and vcfg == cfg


def train_stage1_prefix(cfg: Config, seed: int, *, foundation: Path, teacher: Path, encoded: Path, out: Path,
                        prefixes: Sequence[Path] = ()) -> dict:
    """full's stage 1 at ``seed`` into the checkpoint folder ``out`` (its final checkpoint only, with its
    FINGERPRINT): the prefix every run whose stage 1 is full's starts from. ``prefixes``: the headline's
    stage-1 checkpoints, copied instead of training when their key is this run's (params' seed)."""
    from pipeline.distill.trainer import distill

    vcfg, _ = variant_config(cfg, "full", seed)
    return distill(vcfg, "stage1", foundation=foundation, teacher=teacher, encoded=encoded, out=None,
                   checkpoints=Path(out), live=None, prefixes=prefixes, keep_checkpoints=1)


def run_ablation(cfg: Config, variant: str, seed: int, *, foundation: Path, teacher: Path, encoded: Path,
                 trajectories: Path, headline: Path, reference: Path, df, out_dir: Path, work_dir: Path,
                 stage1_prefixes: Sequence[Path] = ()):
    """Train one variant at one seed into ``out_dir`` (or take the ``headline`` student when the run is it)
    and evaluate it on ``df`` (the test rows) against the teacher's outputs in ``reference``. Stage 1 starts
    from the newest checkpoint of ``stage1_prefixes`` with its key, if any (read, never changed). Returns
    (metrics, pipeline.evaluation.evaluate.Evaluation).

    Launched on several processes (pipeline.distributed): training is DDP (pipeline.training.Loop, rank 0
    saves), the evaluation splits the rows; rank 0 returns the results and alone writes the run's folders,
    the other ranks return ({}, None)."""
    from pipeline import distributed
    from pipeline.distill.trainer import distill
    from pipeline.evaluation.evaluate import PROMPT_COLUMNS, evaluate_model
    from pipeline.runtime import runtime

    vcfg, two_stage = variant_config(cfg, variant, seed)
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    rt = runtime(vcfg)
    w = distributed.connect(rt.device)
    metrics: dict = {}
    if two_stage and vcfg == cfg:  # is_headline, without building the Config twice
        model = Path(headline)
        if w.main:
            with write_dir(out_dir) as tmp:  # the run's DVC output: a pointer, not a second copy of the weights
                (tmp / "README.md").write_text(f"{run_name(variant, seed)} is the headline student: {model} "
                                               "(same Config; evaluated, not trained again).\n")
    else:
        model = out_dir
        if w.main:
            shutil.rmtree(work_dir, ignore_errors=True)
        kw = dict(foundation=foundation, teacher=teacher, encoded=encoded, live=None, trajectories=trajectories)
        s1_out = work_dir / "stage1" if two_stage else out_dir
        distributed.barrier()  # no rank trains into work_dir before rank 0 has cleared it
        # distill returns on every rank once rank 0 has saved: stage 2 and the evaluation read the weights
        metrics = distill(vcfg, "stage1", out=s1_out, checkpoints=work_dir / "ck1", prefixes=stage1_prefixes, **kw)
        if two_stage:
            metrics.update(distill(vcfg, "stage2", out=out_dir, checkpoints=work_dir / "ck2", init=s1_out, **kw))
        if w.main:
            shutil.rmtree(work_dir, ignore_errors=True)
    ev = evaluate_model(vcfg, rt.load_foundation(foundation), variant, model, df,
                        prompt=PROMPT_COLUMNS[vcfg.distill.stage1.prompt], reference=reference)
    if ev is None:
        return {}, None
    d = vcfg.distill
    return {**ev.summary, **metrics, "variant": variant, "seed": seed, "two_stage": int(two_stage),
            "model": str(model), "batch_size": d.stage1.train.batch_size,
            "total_steps": d.stage1.train.steps + (d.stage2.train.steps if two_stage else 0),
            "train_seconds": sum(v for k, v in metrics.items() if k.endswith("_train_seconds"))}, ev
