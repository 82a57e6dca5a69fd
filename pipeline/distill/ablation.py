"""The ablation matrix: each variant is trained with pipeline.distill.trainer.distill on its own Config
(params.yaml deep-merged with the ablation budget and the variant's overrides) and evaluated exactly as
the `evaluate` stage evaluates the main student (same test images, seed, steps, CFG, conditioning scale,
pipeline.evaluation.evaluate.evaluate_models). It lives beside the trainer: it is a training recipe.

Variants (params ``ablations.variants``; each ``{two_stage: bool, overrides: {...params...}}``):
  full          two-stage, tri-level loss (the method)
  wo_af         no L_af (the asymmetric feature alignment) in either stage
  wo_mask       alpha = 0.5: no mask weighting of L_task
  single_stage  stage 1 only, for the same total steps
  from_scratch  L_task only, no teacher terms, stage 1 only for the same total steps
  global_prompt global instead of local prompts in both stages
  layers_10/15/6 other student depths (6 as a stress point)
A variant with ``two_stage: false`` trains stage 1 for ``stage1_steps + stage2_steps`` steps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.config import AblationConfig, Config, deep_merge, from_dict


def ablation_config(cfg: Config) -> AblationConfig:
    return cfg.ablations


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def raw_params(cfg: Config) -> dict:
    """The Config back as a params dict, for deep_merge."""
    return cfg.model_dump(mode="json")


def variant_config(cfg: Config, variant: str, seed: int) -> tuple[Config, bool]:
    """(the variant's Config, whether it runs stage 2)."""
    ab = ablation_config(cfg)
    if variant not in ab.variants:
        raise ValueError(f"ablations: unknown variant {variant!r}; known: {sorted(ab.variants)}")
    v = ab.variants[variant]
    s1 = ab.stage1_steps + (0 if v.two_stage else ab.stage2_steps)
    budget = {
        "seed": seed,
        "distill": {
            "stage1": {"train": {"steps": s1, "batch_size": ab.batch_size,
                                 "warmup_steps": min(ab.warmup_steps, s1 - 1)}},
            "stage2": {"train": {"steps": ab.stage2_steps, "batch_size": ab.batch_size,
                                 "warmup_steps": min(ab.warmup_steps, ab.stage2_steps - 1)}},
        },
    }
    raw = deep_merge(deep_merge(raw_params(cfg), budget), v.overrides)
    return from_dict(raw, f"ablations.variants.{variant}"), v.two_stage


def run_ablation(cfg: Config, variant: str, seed: int, *, foundation: Path, teacher: Path, encoded: Path,
                 df, out_dir: Path, work_dir: Path) -> dict:
    """Train one variant at one seed into ``out_dir`` and evaluate it against the teacher. ``df``: the
    test rows (as the evaluate stage reads them). Returns its metrics (training + evaluation)."""
    from pipeline.distill.trainer import distill
    from pipeline.evaluation.evaluate import evaluate_models
    from pipeline.models.mapping import TEACHER
    from pipeline.runtime import runtime

    vcfg, two_stage = variant_config(cfg, variant, seed)
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    kw = dict(foundation=foundation, teacher=teacher, encoded=encoded, live=None)
    s1_out = work_dir / "stage1" if two_stage else out_dir
    metrics = distill(vcfg, "stage1", out=s1_out, checkpoints=work_dir / "ck1", **kw)
    if two_stage:
        metrics.update(distill(vcfg, "stage2", out=out_dir, checkpoints=work_dir / "ck2", init=s1_out, **kw))
    shutil.rmtree(work_dir, ignore_errors=True)
    pipe = runtime(vcfg).load_foundation(foundation)
    ev, _, _ = evaluate_models(vcfg, pipe, {TEACHER: teacher, variant: out_dir}, df)
    train_seconds = sum(v for k, v in metrics.items() if k.endswith("_train_seconds"))
    return {**ev[variant], **metrics, "seed": seed, "two_stage": int(two_stage),
            "total_steps": vcfg.distill.stage1.train.steps + (vcfg.distill.stage2.train.steps if two_stage else 0),
            "train_seconds": train_seconds}
