"""DVC stage `evaluate`: the teacher, the backbone alone, student_stage1 and student inpaint the whole test
split (per-image noise, steps, CFG, conditioning scale; local prompts). The teacher's outputs are kept
(data/eval/teacher) as the agreement reference of every later evaluation (the ablations reuse them).

Writes metrics/eval/<model>.json and metrics/per_image/<model>.csv (small, cache: false) and
reports/samples/*.png for the report's grid.
"""

import sys

from pipeline import paths
from pipeline.entry import stage
from pipeline.evaluation.evaluate import BACKBONE_ONLY, TEACHER, evaluate_models, save_samples
from pipeline.runtime import runtime
from pipeline.stage_io import evaluation_rows, write_evaluations

MODELS = {TEACHER: paths.TEACHER, BACKBONE_ONLY: None, "student_stage1": paths.STUDENT_STAGE1,
          "student": paths.STUDENT}


@stage(__doc__, kind="model")
def main(args, cfg):
    df = evaluation_rows(cfg)
    evals = evaluate_models(cfg, runtime(cfg).load_foundation(paths.BACKBONE), MODELS, df,
                            reference=paths.EVAL_REFERENCE)
    if evals is None:  # a rank other than 0 of a launched run: rank 0 merged the rows and writes the outputs
        return
    write_evaluations(evals, paths.EVAL_METRICS, paths.PER_IMAGE)
    save_samples({k: v.samples for k, v in evals.items()}, df, cfg.data.image_size, paths.SAMPLES)


if __name__ == "__main__":
    sys.exit(main())
