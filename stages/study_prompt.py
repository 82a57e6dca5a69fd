"""studies/dvc.yaml matrix stage `prompt_quality`: stage 2 at one prompt-quality level and seed from full's stage 1,
evaluated on the whole test split (pipeline/studies/prompt_quality.py).

    python -m stages.study_prompt LEVEL SEED
    # -> models/studies/prompt_quality/RUN, metrics/studies/prompt_quality/RUN.json (+ RUN-loss.csv: stage-2 loss),
    #    metrics/studies/per_image/prompt_quality/RUN.csv        (RUN: LEVEL-sSEED)
"""

import sys

from pipeline import distributed, paths
from pipeline import studies as S
from pipeline.entry import arg
from pipeline.metrics_io import write_csv
from pipeline.stage_io import evaluation_rows, write_run
from pipeline.studies.prompt_quality import run_level, run_name
from pipeline.study_stage import prompt_level_name, study_stage


@study_stage(__doc__, arg("level", type=prompt_level_name), arg("seed", type=int), kind="model")
def main(args, cfg, study):
    name = run_name(args.level, args.seed)
    df = evaluation_rows(cfg)
    m, per_image, history = run_level(
        cfg, args.level, args.seed, foundation=paths.BACKBONE, teacher=paths.TEACHER,
        level_encoded=S.PROMPT_ENCODED / args.level, stage1=S.PROMPT_STAGE1 / f"s{args.seed}",
        reference=paths.EVAL_REFERENCE, df=df, out_dir=S.PROMPT_MODELS / name,
        work_dir=S.PROMPT_CHECKPOINTS / name, live=S.PROMPT_CHECKPOINTS / f"{name}-dvclive")
    if not distributed.world().main:  # launched on several processes, rank 0 alone writes the run's results
        return
    if per_image is None:  # nothing evaluated: one row per test image, no figures
        per_image = df[["id"]].assign(**{k: float("nan") for k in ("psnr", "ssim")})
    write_csv(S.PROMPT_RUNS / f"{name}-loss.csv", history)
    write_run(name, m, per_image, S.PROMPT_RUNS, S.PROMPT_PER_IMAGE)


if __name__ == "__main__":
    sys.exit(main())
