"""DVC stage `evaluate`: teacher, backbone alone, student_stage1 and student inpaint the first
evaluate.num_images test images (fixed seed, steps, CFG, conditioning scale; local prompts).

Writes metrics/eval/<model>.json (small, cache: false) and reports/samples/*.png for the report's grid.
"""

import argparse

from pipeline import paths
from pipeline.config import load
from pipeline.data.encode import joined
from pipeline.evaluation.evaluate import BACKBONE_ONLY, TEACHER, evaluate_models, save_samples, test_rows
from pipeline.metrics_io import write_json
from pipeline.runtime import runtime

MODELS = {TEACHER: paths.TEACHER, BACKBONE_ONLY: None, "student_stage1": paths.STUDENT_STAGE1,
          "student": paths.STUDENT}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    cfg = load(ap.parse_args(argv).params)
    df = test_rows(joined(paths.TRIPLETS, paths.CAPTIONS), cfg.evaluate.num_images)
    metrics, outputs, inputs = evaluate_models(cfg, runtime(cfg).load_foundation(paths.BACKBONE), MODELS, df)
    for name, m in metrics.items():
        write_json(paths.EVAL_METRICS / f"{name}.json", m)
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items() if k != "not_computed"})
    save_samples(outputs, inputs, cfg.evaluate.num_samples, paths.SAMPLES)


if __name__ == "__main__":
    main()
