"""studies/dvc.yaml matrix stage `edges_student`: one edges student (condition edges, distill.student_layers
layers, the tri-level loss, both stages, headline budget) distilled from the edges teacher at SEED and
evaluated on the whole test split against the edges teacher's outputs (pipeline/studies/edges.py).

    python -m stages.study_edges_student SEED
    # -> models/studies/edges/student-sSEED, metrics/studies/edges/student-sSEED.json,
    #    metrics/studies/per_image/edges/student-sSEED.csv
"""

import sys

from pipeline import paths
from pipeline import studies as S
from pipeline.entry import arg
from pipeline.stage_io import evaluation_rows, write_run
from pipeline.studies.edges import run_student, student_name
from pipeline.study_stage import study_stage


@study_stage(__doc__, arg("seed", type=int), kind="model")
def main(args, cfg, study):
    name = student_name(args.seed)
    m, ev = run_student(cfg, args.seed, foundation=paths.BACKBONE, teacher=S.EDGES_TEACHER, encoded=S.EDGES_ENCODED,
                        reference=S.EDGES_REFERENCE, df=evaluation_rows(cfg), out_dir=S.EDGES_MODELS / name,
                        work_dir=S.EDGES_CHECKPOINTS / name)
    if ev is not None:  # None: a rank other than 0 of a launched run (rank 0 writes the run's results)
        write_run(name, m, ev.per_image, S.EDGES_METRICS, S.EDGES_PER_IMAGE)


if __name__ == "__main__":
    sys.exit(main())
