"""The method under condition edges (issue 15, item 3): does it carry over to another spatial condition?

One code path (params ``condition``, pipeline.models.condition): the control image is the scene's Sobel
edge map, so every ControlNet takes 16 input channels (no mask channel) and L_task weighs every latent
pixel 1 (no hole). The study, in the same tiny world as the inpainting pipeline:

- its own teacher (params' ``teacher`` section, teacher.num_layers layers), trained on the world split by
  pipeline.foundation.teacher.train_teacher under condition edges;
- the splits distillation reads (labelled, unlabelled) encoded with the edge map as control latents;
- the edges teacher and the backbone alone evaluated on the whole test split exactly as the `evaluate`
  stage evaluates the inpainting models (the teacher's outputs kept as the agreement reference);
- students distilled to distill.student_layers layers with the same tri-level loss, both stages, at the
  headline budget, at studies/params.yaml ``edges.seeds``: each a variant of the inpainting Config (an
  ``edges`` entry added to ablations.variants, ``{condition: edges}``) run by the ablation study's own
  pipeline.distill.ablation.run_ablation, so training and evaluation are the main study's, line for line.

Nothing here reads the inpainting pipeline's encoded data, trajectories, teacher or students. Statistics
and the report section: pipeline.studies.edges_report (a module of its own, so editing the report does not
rerun the training stages, whose code deps are this module's import closure).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.config import Config, ConfigError, deep_merge, from_dict

CONDITION = "edges"
VARIANT = "edges"          # the ablation variant the students are
# the splits distillation reads (pipeline.distill.trainer.SPLIT_OF: stage1 -> labelled, stage2 -> unlabelled)
DISTILL_SPLITS = ("labelled", "unlabelled")


def student_name(seed: int) -> str:
    """student-s<seed>: the run's model folder, metrics and per-image table name (studies/dvc.yaml)."""
    return f"student-s{int(seed)}"


def _check(cfg: Config) -> None:
    if cfg.condition != "inpaint":
        raise ConfigError(f"studies.edges: params.yaml's condition is {cfg.condition!r}; the study derives "
                          "its edges Configs from the inpainting pipeline's (condition: inpaint)")
    if cfg.distill.stage2.noisy != "image":
        raise ConfigError("studies.edges: distill.stage2.noisy: teacher needs the edges teacher's trajectories, "
                          "which this study does not generate; it runs with noisy: image only")


def edges_config(cfg: Config) -> Config:
    """params' Config under condition edges (everything else as in params.yaml): the edges teacher's,
    the encode's and the evaluation's."""
    _check(cfg)
    return from_dict(deep_merge(cfg.model_dump(mode="json"), {"condition": CONDITION}), "studies.edges")


def with_variant(cfg: Config) -> tuple[Config, str]:
    """(cfg with the ``edges`` variant added to ablations.variants, its name): two stages, overrides
    {condition: edges}. run_ablation(…, name, seed) trains it at the headline budget and seed ``seed``; it
    never equals cfg (the condition differs), so it is always trained, never the headline student."""
    _check(cfg)
    raw = cfg.model_dump(mode="json")
    raw["ablations"]["variants"][VARIANT] = {"two_stage": True, "overrides": {"condition": CONDITION}}
    return from_dict(raw, f"studies.edges.{VARIANT}"), VARIANT


# ------------------------------------------------------------------------------------------- stages

def train_edges_teacher(cfg: Config, *, scenes: Path, foundation: Path, out: Path, checkpoints: Path,
                        live: Path | None) -> dict:
    """The edges teacher (params' teacher section, condition edges) on the world split -> ``out``."""
    from pipeline.foundation.teacher import train_teacher

    return train_teacher(edges_config(cfg), scenes, foundation, out, checkpoints, live)


def encode_edges(cfg: Config, df, *, foundation: Path, out: Path) -> dict[str, int]:
    """The rows of ``df`` (the joined triplets + captions) in the splits distillation reads, encoded with
    the edge map as control latents -> ``out``/<split>/ shards (replaced whole)."""
    from pipeline import distributed
    from pipeline.data.encode import encode_dataset
    from pipeline.runtime import runtime

    ecfg = edges_config(cfg)
    rows = df[df["split"].isin(DISTILL_SPLITS)]
    missing = sorted(set(DISTILL_SPLITS) - set(rows["split"]))
    if missing:
        raise ValueError(f"studies.edges: the dataset has no rows in split(s) {missing}")
    if distributed.world().main:  # launched on several processes, rank 0 alone writes `out` (encode_dataset)
        shutil.rmtree(out, ignore_errors=True)
    rt = runtime(ecfg)
    return encode_dataset(rt.load_foundation(foundation), rows, out, ecfg.data.image_size,
                          ecfg.text.max_sequence_length, batch=rt.encode_batch_size, condition=CONDITION)


def evaluate_edges(cfg: Config, df, *, foundation: Path, teacher: Path, reference: Path) -> dict:
    """The edges teacher (writes its outputs to ``reference``) and the backbone alone on the test rows
    ``df``: {name: pipeline.evaluation.evaluate.Evaluation}, as the `evaluate` stage."""
    from pipeline.evaluation.evaluate import BACKBONE_ONLY, TEACHER, evaluate_models
    from pipeline.runtime import runtime

    ecfg = edges_config(cfg)
    return evaluate_models(ecfg, runtime(ecfg).load_foundation(foundation), {TEACHER: teacher, BACKBONE_ONLY: None},
                           df, reference=reference)


def run_student(cfg: Config, seed: int, *, foundation: Path, teacher: Path, encoded: Path, reference: Path, df,
                out_dir: Path, work_dir: Path):
    """Distil (both stages, tri-level loss, headline budget) and evaluate one edges student at ``seed``:
    run_ablation's (metrics, Evaluation), the metrics with ``condition``."""
    from pipeline.distill.ablation import run_ablation

    vcfg, name = with_variant(cfg)
    m, ev = run_ablation(vcfg, name, seed, foundation=foundation, teacher=teacher, encoded=encoded,
                         trajectories=None,   # noisy: image (checked): no trajectory is read
                         headline=None,       # never the headline student (the condition differs)
                         reference=reference, df=df, out_dir=out_dir, work_dir=work_dir)
    return {**m, "condition": CONDITION}, ev
