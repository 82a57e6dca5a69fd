"""What the stages that evaluate models share (evaluate, ablate and the studies' runs): the test rows every
evaluation reads, full's stage-1 checkpoints a run may start from, and how results are written and printed."""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.data.encode import joined
from pipeline.evaluation.evaluate import test_rows
from pipeline.metrics_io import write_csv, write_json


def evaluation_rows(cfg):
    """The rows every evaluation runs on: the test split's first evaluate.num_images, with their captions."""
    return test_rows(joined(paths.TRIPLETS, paths.CAPTIONS), cfg.evaluate.num_images)


def stage1_prefixes(seed: int) -> list[Path]:
    """Where a run at ``seed`` finds full's stage 1 trained (pipeline/distill/ablation.py): ablate_stage1's at
    that seed, then the headline's (distill_stage1); a run takes one only when its stage-1 key matches."""
    return [paths.ABLATION_STAGE1 / f"stage1-s{seed}", paths.CHECKPOINTS / "distill_stage1"]


def write_run(name: str, metrics: dict, per_image, metrics_dir: Path, per_image_dir: Path) -> None:
    """One trained and evaluated run: METRICS_DIR/NAME.json, PER_IMAGE_DIR/NAME.csv, its figures printed."""
    write_csv(per_image_dir / f"{name}.csv", per_image)
    write_json(metrics_dir / f"{name}.json", metrics)
    print(name, {k: v for k, v in metrics.items() if k != "not_computed"})


def write_evaluations(evals: dict, metrics_dir: Path, per_image_dir: Path, **extra) -> None:
    """Each evaluated model's summary (+ ``extra``) -> METRICS_DIR/<model>.json, its per-image table ->
    PER_IMAGE_DIR/<model>.csv, its figures printed (4 decimals)."""
    for name, ev in evals.items():
        write_json(metrics_dir / f"{name}.json", {**ev.summary, **extra})
        write_csv(per_image_dir / f"{name}.csv", ev.per_image)
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in ev.summary.items()
                     if k != "not_computed"})
