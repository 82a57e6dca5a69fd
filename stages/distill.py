"""DVC stages `distill_stage1` and `distill_stage2`: REFINE-CONTROL distillation.

    python -m stages.distill stage1   # labelled triplets, tri-level loss -> models/student_stage1
    python -m stages.distill stage2   # unlabelled masked images, L_distill + L_af -> models/student
A killed run resumes from its last checkpoint (checkpoints/distill_<stage>) when re-run.
"""

import sys

from pipeline import distributed, paths
from pipeline.distill.trainer import distill
from pipeline.entry import arg, stage
from pipeline.metrics_io import write_json


@stage(__doc__, arg("stage", choices=["stage1", "stage2"]), kind="model")
def main(args, cfg):
    out, init = ((paths.STUDENT_STAGE1, None) if args.stage == "stage1" else (paths.STUDENT, paths.STUDENT_STAGE1))
    dvc_stage = f"distill_{args.stage}"
    m = distill(cfg, args.stage, foundation=paths.BACKBONE, teacher=paths.TEACHER, encoded=paths.ENCODED, out=out,
                checkpoints=paths.CHECKPOINTS / dvc_stage, live=paths.DVCLIVE / dvc_stage, init=init,
                trajectories=paths.TRAJECTORIES)
    if distributed.world().main:  # launched on several processes, rank 0 alone writes the outputs
        write_json(paths.DISTILL_METRICS / f"{args.stage}.json", m)
        print(m)


if __name__ == "__main__":
    sys.exit(main())
