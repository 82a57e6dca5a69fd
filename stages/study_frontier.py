"""studies/dvc.yaml matrix stage `frontier`: one student of the compression frontier (depth, with or without
L_af, seed) trained at the headline budget and evaluated on the whole test split (pipeline/studies/frontier.py).

    python -m stages.study_frontier DEPTH AF SEED     # AF: true | false
    # -> models/studies/frontier/RUN, metrics/studies/frontier/RUN.json,
    #    metrics/studies/per_image/frontier/RUN.csv   (RUN: d<DEPTH>-af_<AF>-s<SEED>)
"""

import sys

from pipeline import paths
from pipeline import studies as S
from pipeline.entry import arg
from pipeline.stage_io import evaluation_rows, stage1_prefixes, write_run
from pipeline.studies.frontier import parse_bool, run_frontier, run_name
from pipeline.study_stage import study_stage


@study_stage(__doc__, arg("depth", type=int), arg("af", type=parse_bool), arg("seed", type=int), kind="model")
def main(args, cfg, study):
    name = run_name(args.depth, args.af, args.seed)
    # full's stage 1 is taken only when the run's stage-1 key matches (depth distill.student_layers with L_af)
    m, ev = run_frontier(cfg, args.depth, args.af, args.seed, foundation=paths.BACKBONE, teacher=paths.TEACHER,
                         encoded=paths.ENCODED, trajectories=paths.TRAJECTORIES, headline=paths.STUDENT,
                         reference=paths.EVAL_REFERENCE, df=evaluation_rows(cfg), out_dir=S.FRONTIER_MODELS / name,
                         work_dir=S.FRONTIER_CHECKPOINTS / name, stage1_prefixes=stage1_prefixes(args.seed))
    if ev is not None:  # None: a rank other than 0 of a launched run (rank 0 writes the run's results)
        write_run(name, m, ev.per_image, S.FRONTIER_RUNS, S.FRONTIER_PER_IMAGE)


if __name__ == "__main__":
    sys.exit(main())
