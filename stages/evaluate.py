"""DVC stage `evaluate`: the teacher, the backbone alone, student_stage1 and student inpaint the whole test
split (per-image noise, steps, CFG, conditioning scale; local prompts). The teacher's outputs are kept
(data/eval/teacher) as the agreement reference of every later evaluation (the ablations reuse them).

Writes metrics/eval/<model>.json and metrics/per_image/<model>.csv (small, cache: false) and
reports/samples/*.png for the report's grid.
"""

import argparse

from pipeline import paths
from pipeline.config import load
from pipeline.data.encode import joined
from pipeline.evaluation.evaluate import BACKBONE_ONLY, TEACHER, evaluate_models, save_samples, test_rows
from pipeline.metrics_io import write_csv, write_json
from pipeline.runtime import runtime

MODELS = {TEACHER: paths.TEACHER, BACKBONE_ONLY: None, "student_stage1": paths.STUDENT_STAGE1,
          "student": paths.STUDENT}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    cfg = load(ap.parse_args(argv).params)
    df = test_rows(joined(paths.TRIPLETS, paths.CAPTIONS), cfg.evaluate.num_images)
    evals = evaluate_models(cfg, runtime(cfg).load_foundation(paths.BACKBONE), MODELS, df,
                            reference=paths.EVAL_REFERENCE)
    for name, ev in evals.items():
        write_json(paths.EVAL_METRICS / f"{name}.json", ev.summary)
        write_csv(paths.PER_IMAGE / f"{name}.csv", ev.per_image)
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in ev.summary.items()
                     if k != "not_computed"})
    save_samples({k: v.samples for k, v in evals.items()}, df, cfg.data.image_size, paths.SAMPLES)


if __name__ == "__main__":
    main()
