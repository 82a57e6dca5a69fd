"""DVC matrix stages `ablate_headline` / `ablate`: train one ablation variant at one seed (the headline
student's budget) and evaluate it on the whole test split.

    python -m stages.ablate VARIANT SEED
    # -> models/ablations/VARIANT-sSEED, metrics/ablations/VARIANT-sSEED.json,
    #    metrics/per_image/ablations/VARIANT-sSEED.csv
Variants: params `ablations` (pipeline/distill/ablation.py).
"""

import sys

from pipeline import paths
from pipeline.distill.ablation import run_ablation, run_name
from pipeline.entry import arg, stage
from pipeline.stage_io import evaluation_rows, stage1_prefixes, write_run


@stage(__doc__, arg("variant"), arg("seed", type=int), kind="model")
def main(args, cfg):
    name = run_name(args.variant, args.seed)
    df = evaluation_rows(cfg)
    m, ev = run_ablation(cfg, args.variant, args.seed, foundation=paths.BACKBONE, teacher=paths.TEACHER,
                         encoded=paths.ENCODED, trajectories=paths.TRAJECTORIES, headline=paths.STUDENT,
                         reference=paths.EVAL_REFERENCE, df=df, out_dir=paths.ABLATIONS / name,
                         work_dir=paths.CHECKPOINTS / "ablations" / name, stage1_prefixes=stage1_prefixes(args.seed))
    if ev is not None:  # None: a rank other than 0 of a launched run (rank 0 writes the run's results)
        write_run(name, m, ev.per_image, paths.ABLATION_METRICS, paths.PER_IMAGE / "ablations")


if __name__ == "__main__":
    sys.exit(main())
